"""``streampress eval``: command-line front end of :mod:`streampress.eval.runner`.

The main ``streampress`` command dispatches its ``eval`` sub-command here through
:func:`add_arguments` and :func:`run`; ``python -m streampress.eval`` runs it alone. Under
``torchrun --nproc-per-node K`` the same command shards the videos over K processes.

Bad input (an option, an annotation entry, a busy output folder) is reported as one line
``streampress eval: error: ...`` per problem and exit status 1, the status the command has
always used for it, before any model loads; argparse's own syntax errors keep its status 2.
"""

from __future__ import annotations

import argparse
import sys

from streampress.cli import parse_param

from .datasets import BENCHMARKS
from .runner import MODES, EvalConfig, dry_run, evaluate

EXAMPLES = """examples:
  streampress eval ovobench --annotations ovo_bench_new.json --dry-run
  streampress eval streamingbench --annotations streamingbench_real_stream.json --videos DIR \\
      --model Qwen/Qwen2.5-VL-7B-Instruct --method streaming_assistant --keep-ratio 0.1 --out runs/sb
  torchrun --nproc-per-node 8 -m streampress.eval ovobench --annotations ... --videos DIR --model ...

input checks (before any model loads or anything is written):
  every annotation entry: times finite and >= 0, options a list of strings, the ground truth
  one of the options, video paths inside --videos, no missing field. Each problem is one line
  naming the file, the entry (position from 0, id, video; StreamingBench: video and question)
  and the field. --skip-invalid runs the valid questions and counts the others as skipped.
  Options (--fps, --max-new-tokens, --keep-ratio, --cacher-rho, ...) are checked the same way.
  --out is locked (eval.lock) while a run writes it.

exit status: 0 done; 1 bad options or annotations (nothing run), output folder in use, or
  some videos failed (see errors.rank*.txt); 2 command-line syntax.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``eval`` arguments to ``parser``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    parser.add_argument("benchmark", choices=BENCHMARKS,
                        help="ovobench, streamingbench (real-time), or an offline multiple-choice set")
    parser.add_argument("--annotations", required=True, help="the benchmark's annotation file, as published")
    parser.add_argument("--videos", default=None, help="folder holding the benchmark's videos")
    parser.add_argument("--model", default=None,
                        help="checkpoint (hub id or folder) or random:NAME; required unless --dry-run")
    parser.add_argument("--method", default="none", help="pruning method (streampress list), or none")
    parser.add_argument("--keep-ratio", type=float, default=None, help="matched budget for the pruner")
    parser.add_argument("--param", action="append", type=parse_param, default=[], metavar="KEY=VALUE",
                        help="native pruner parameter, e.g. --param tau=0.5 (repeatable)")
    parser.add_argument("--fps", type=float, default=1.0, help="frames sampled per second (default 1)")
    parser.add_argument("--mode", choices=MODES, default="stream",
                        help="stream: one pass per video, each question at its time (default); "
                             "clip: a new session per question on frames 0..t, like the papers' drivers")
    parser.add_argument("--chunk-frames", type=int, default=16, help="frames per add_frames call")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--window", type=float, default=None, help="sliding-window memory in seconds")
    parser.add_argument("--cacher", action="store_true", help="reuse vision-encoder work (STC-Cacher)")
    parser.add_argument("--cacher-rho", type=float, default=0.25)
    parser.add_argument("--cacher-interval", type=int, default=2)
    parser.add_argument("--tasks", nargs="+", default=None, help="only these tasks")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="run the valid questions of a partly invalid annotation file; the invalid "
                             "ones are listed (invalid_annotations.txt) and counted as skipped")
    parser.add_argument("--strict", action="store_true",
                        help="stricter answer parsing (first option letter / number / yes-no word)")
    parser.add_argument("--out", default=None, help="output folder (default eval_results/BENCHMARK)")
    parser.add_argument("--dtype", default=None, help="model dtype, e.g. bfloat16")
    parser.add_argument("--device", default=None, help="cpu, cuda (default: cuda:LOCAL_RANK when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-logits", type=int, default=0, metavar="K",
                        help="also record the K largest first-token logits of each question (to compare runs)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list tasks and question counts (and videos present); needs no model")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The :class:`EvalConfig` the parsed arguments describe."""
    params = dict(args.param)
    if args.keep_ratio is not None:
        params["keep_ratio"] = args.keep_ratio
    cacher = {"rho": args.cacher_rho, "interval": args.cacher_interval} if args.cacher else None
    return EvalConfig(benchmark=args.benchmark, annotations=args.annotations, videos=args.videos,
                      out=args.out or f"eval_results/{args.benchmark}", model=args.model,
                      method=args.method, params=params, fps=args.fps, mode=args.mode,
                      chunk_frames=args.chunk_frames, max_new_tokens=args.max_new_tokens,
                      limit=args.limit, tasks=args.tasks, strict=args.strict, window=args.window,
                      cacher=cacher, dtype=args.dtype, device=args.device, seed=args.seed,
                      top_logits=args.top_logits, skip_invalid=args.skip_invalid)


def _summary(scores: dict) -> str:
    """The overall figure(s), labelled: OVO-Bench has two (see :mod:`.scoring`)."""
    def pct(x):
        return "-" if x is None else f"{100 * x:.2f}%"

    if "labels" in scores:
        return "; ".join(f"{scores['labels'][k]}: {pct(scores[k])}" for k in ("overall", "task_mean"))
    return f"overall: {pct(scores['overall'])}"


def run(args: argparse.Namespace) -> int:
    """Run ``streampress eval``; returns the exit status (1 on bad input or failed videos)."""
    try:
        cfg = config_from_args(args)
        cfg.validate()
        if args.dry_run:
            _, text = dry_run(cfg)
            print(text)
            return 0
        if not cfg.model:
            raise ValueError("model: --model is required (a checkpoint or random:NAME) unless --dry-run")
        report = evaluate(cfg)
    except ValueError as exc:
        for line in str(exc).splitlines() or [""]:
            print(f"streampress eval: error: {line}", file=sys.stderr)
        return 1
    if report is None:  # not rank 0
        return 0
    print(f"scores: {cfg.out}/scores.md  {_summary(report['scores'])}")
    return 1 if report["errors"] else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="streampress eval", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
