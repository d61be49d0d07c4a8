"""``streampress eval``: benchmark accuracy, the command-line front end of :mod:`streampress.eval.runner`.

``python -m streampress.eval`` runs the same command (the same parser, checks and errors).
Under ``torchrun --nproc-per-node K`` it shards the videos over K processes.

Options are checked as they are read (one line, exit status 2, like every command). Bad
input found after that (an annotation entry, a busy output folder, no video found) is
reported as one line ``streampress eval: error: ...`` per problem and exit status 1, before
any model loads.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

from streampress.eval.datasets import BENCHMARKS
from streampress.eval.proactive import FORWARD_MODES
from streampress.eval.runner import MODES

from . import model as model_arg
from . import options

__all__ = ["add_parser", "main"]

PROG = "streampress eval"
MAX_NEW_TOKENS = 16
EXAMPLES = """examples:
  streampress eval ovobench --annotations ovo_bench_new.json --dry-run
  streampress eval streamingbench --annotations streamingbench_real_stream.json --videos DIR \\
      --model Qwen/Qwen2.5-VL-7B-Instruct --method streaming_assistant --keep-ratio 0.1 --out runs/sb
  torchrun --nproc-per-node 8 -m streampress.eval ovobench --annotations ... --videos DIR --model ...
  streampress eval ovobench --annotations ovo_bench_new.json --videos DIR --model ... \
      --proactive --chunk-frames 2 --tasks REC SSR CRR     # forward tasks: probe vs proactive

input checks (before any model loads or anything is written):
  every annotation entry: times finite and >= 0, options a list of strings, the ground truth
  one of the options, video paths inside --videos, no missing field. Each problem is one line
  naming the file, the entry (position from 0, id, video; StreamingBench: video and question)
  and the field. --skip-invalid runs the valid questions and counts the others as skipped.
  --out is locked (eval.lock) while a run writes it.

exit status: 0 done; 1 bad annotations (nothing run), no video found, output folder in use,
  or some videos failed (see errors.rank*.txt); 2 bad options.
"""


def add_parser(subparsers, common) -> None:
    p = subparsers.add_parser("eval", parents=[common], help="benchmark accuracy (OVO-Bench, StreamingBench, ...)",
                              description="Benchmark accuracy: every video streamed once, each question asked "
                                          "at its time.",
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    p.add_argument("benchmark", choices=BENCHMARKS,
                   help="ovobench, streamingbench (real-time), or an offline multiple-choice set")
    p.add_argument("--annotations", required=True, help="the benchmark's annotation file, as published")
    p.add_argument("--videos", default=None, metavar="FOLDER", help="folder holding the benchmark's videos")
    options.add_model_options(p, model_help="checkpoint folder, hub id OWNER/NAME or random:ARCH; "
                                            "required unless --dry-run")
    options.add_method_options(p)
    options.add_cacher_options(p)
    g = p.add_argument_group("frames and memory")
    options.add_frame_options(g, size_help="resize frames: W sets the longer side (aspect kept), WxH both "
                                           "(stretching videos of another shape); default: as decoded")
    g.add_argument("--mode", choices=MODES, default="stream",
                   help="stream: one pass per video, each question at its time (default); "
                        "clip: a new session per question on frames 0..t, like the papers' drivers")
    g.add_argument("--chunk-frames", type=options.positive_int, default=16, metavar="N",
                   help="frames per add_frames call (default %(default)s)")
    options.add_memory_option(g)
    g.add_argument("--forward-mode", choices=FORWARD_MODES, default="probe",
                   help="OVO-Bench forward tasks (REC, SSR, CRR): probe = ask at every annotated time "
                        "(default); proactive = also answer them with watches that speak when the scene "
                        "changes, scored side by side with probe mode (stream mode; --chunk-frames 2 "
                        "for live latency)")
    g.add_argument("--proactive", dest="forward_mode", action="store_const", const="proactive",
                   help="same as --forward-mode proactive")
    g = p.add_argument_group("questions and output")
    options.add_max_new_tokens(g, MAX_NEW_TOKENS)
    g.add_argument("--tasks", nargs="+", default=None, help="only these tasks")
    g.add_argument("--limit", type=options.positive_int, default=None, metavar="N", help="only the first N questions")
    g.add_argument("--skip-invalid", action="store_true",
                   help="run the valid questions of a partly invalid annotation file; the invalid "
                        "ones are listed (invalid_annotations.txt) and counted as skipped")
    g.add_argument("--strict", action="store_true",
                   help="stricter answer parsing (first option letter / number / yes-no word)")
    g.add_argument("--out", default=None, metavar="FOLDER", help="output folder (default eval_results/BENCHMARK)")
    g.add_argument("--seed", type=options.integer, default=0, help="seed of random weights (default 0)")
    g.add_argument("--top-logits", type=options.count, default=0, metavar="K",
                   help="also record the K largest first-token logits of each question (to compare runs)")
    g.add_argument("--dry-run", action="store_true",
                   help="list tasks and question counts (and videos present); needs no model")
    p.set_defaults(func=main, check=partial(check, p))


def check(parser, args) -> None:
    if args.model is None and not args.dry_run:
        parser.error("--model is required (a checkpoint folder, hub id or random:ARCH) unless --dry-run")
    options.check(parser, args)


def config_from_args(args: argparse.Namespace):
    """The :class:`~streampress.eval.runner.EvalConfig` the checked arguments describe."""
    from streampress.eval.runner import EvalConfig

    return EvalConfig(benchmark=args.benchmark, annotations=args.annotations, videos=args.videos,
                      out=args.out or f"eval_results/{args.benchmark}", model=args.model,
                      method=args.method, params=options.pruner_params(args.keep_ratio, args.params),
                      fps=args.fps, size=args.size, mode=args.mode, chunk_frames=args.chunk_frames,
                      max_new_tokens=args.max_new_tokens, limit=args.limit, tasks=args.tasks, strict=args.strict,
                      memory=args.memory, cacher=args.cacher, dtype=args.dtype, device=args.device,
                      seed=args.seed, top_logits=args.top_logits, skip_invalid=args.skip_invalid,
                      forward_mode=args.forward_mode)


def _summary(scores: dict) -> str:
    """The overall figure(s), labelled: OVO-Bench has two (see :mod:`streampress.eval.scoring`)."""
    def pct(x):
        return "-" if x is None else f"{100 * x:.2f}%"

    if "labels" in scores:
        return "; ".join(f"{scores['labels'][k]}: {pct(scores[k])}" for k in ("overall", "task_mean"))
    return f"overall: {pct(scores['overall'])}"


def _forward_summary(fm: dict) -> str:
    """Forward accuracy and model calls of both modes, labelled."""
    def pct(x):
        return "-" if x is None else f"{100 * x:.2f}%"

    return "; ".join(f"{m} {pct(fm[m]['forward'])} in {fm[m]['model_calls']} model calls"
                     for m in ("probe", "proactive"))


def main(args: argparse.Namespace) -> int:
    """Run ``streampress eval``; returns the exit status (1 on bad input or failed videos)."""
    from streampress.eval.runner import dry_run, evaluate

    try:
        cfg = config_from_args(args)
        cfg.validate()
        if args.dry_run:
            print(dry_run(cfg)[1])
            return 0
        cfg.model = model_arg.resolve_model(cfg.model)  # no hub: the local snapshot, or one line
        report = evaluate(cfg)
    except ValueError as exc:
        for line in str(exc).splitlines() or [""]:
            print(f"{PROG}: error: {line}", file=sys.stderr)
        return 1
    if report is None:  # not rank 0
        return 0
    print(f"scores: {cfg.out}/scores.md  {_summary(report['scores'])}")
    if "forward_modes" in report:
        print("forward tasks: " + _forward_summary(report["forward_modes"]))
    return 1 if report["errors"] else 0
