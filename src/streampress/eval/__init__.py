"""Benchmark evaluation: OVO-Bench, StreamingBench and offline multiple-choice sets.

Readers take the published annotation files as they are and check every entry before a run
(:mod:`.datasets`), prompts and answer parsing follow each benchmark's own code
(:mod:`.prompts`), scores are computed as each benchmark defines them (:mod:`.scoring`), and
:func:`evaluate` streams every video once through a session, asking each question at its
time, resumably and sharded over ``torchrun`` processes (:mod:`.runner`, :mod:`.protocol`,
:mod:`.sharding`). OVO-Bench's forward-active tasks can also be answered proactively, by
watches that speak when the scene changes, and scored beside probe mode (:mod:`.proactive`).
"""

from .datasets import BENCHMARKS, AnnotationError, Question, load_benchmark, read_annotations, resolve_videos
from .prompts import build_prompt, is_correct, parse_response
from .runner import EvalConfig, dry_run, evaluate
from .scoring import score_questions

__all__ = ["BENCHMARKS", "AnnotationError", "EvalConfig", "Question", "build_prompt", "dry_run", "evaluate",
           "is_correct", "load_benchmark", "parse_response", "read_annotations", "resolve_videos",
           "score_questions"]
