"""Pruning overhead: median time per grid of every pruning method, streaming one grid per call.

Shapes: the Qwen2.5-VL-7B grid (16x16x3584: 448x448 input after the 2x2 merger) and the
LLaVA-OneVision-7B grid (14x14x3584: 384x384 after 2x2 pooling). float32 on the CPU, and
float16/bfloat16 on CUDA when a GPU is available. Every call is one grid (T = 1), as in a
live stream; each pruner is warmed up first, then timed call by call (CUDA: synchronised
after each call, since the session needs the mask), and the median is reported.

    python benchmarks/pruning_overhead.py                    # full run (a few minutes)
    python benchmarks/pruning_overhead.py --reps 20 --warmup 5   # quick check
    python benchmarks/pruning_overhead.py --json results.json

Prints a Markdown table and the device (CPU model, torch version, threads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without install

import streampress

SHAPES = [(16, 16, 3584), (14, 14, 3584)]
# Every registered method at its defaults, plus the matched-budget mode of the threshold methods.
CONFIGS = [(name, {}) for name in streampress.list_pruners()] + [
    ("dtd", {"keep_ratio": 0.25}),
    ("mssavt", {"keep_ratio": 0.75}),
    ("streaming_assistant", {"keep_ratio": 0.25}),
    ("stc", {"keep_ratio": 0.25}),
]
DISTINCT_GRIDS = 8  # cycled, so consecutive grids differ as in a real stream


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(cuda: bool) -> dict:
    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if cuda:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def time_pruner(name, params, shape, dtype, device, reps, warmup) -> list[float]:
    """Seconds per call for ``reps`` single-grid calls on one stream."""
    gen = torch.Generator().manual_seed(0)
    grids = [torch.randn((1,) + shape, generator=gen).to(device=device, dtype=dtype) for _ in range(DISTINCT_GRIDS)]
    pruner = streampress.create_pruner(name, **params)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for i in range(warmup):
        pruner(grids[i % DISTINCT_GRIDS])
    sync()
    times = []
    for i in range(reps):
        grid = grids[i % DISTINCT_GRIDS]
        start = time.perf_counter()
        pruner(grid)
        sync()
        times.append(time.perf_counter() - start)
    return times


def label(name, params) -> str:
    return name + (" (" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")" if params else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=300, help="timed calls per method and shape (default 300)")
    ap.add_argument("--warmup", type=int, default=30, help="untimed calls first (default 30)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--methods", nargs="*", help="only these method names")
    ap.add_argument("--no-cuda", action="store_true", help="skip the GPU even when one is available")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and not args.no_cuda
    targets = [("cpu", torch.float32)] + ([("cuda", torch.float16), ("cuda", torch.bfloat16)] if cuda else [])
    configs = [c for c in CONFIGS if not args.methods or c[0] in args.methods]

    results = []
    for device, dtype in targets:
        for name, params in configs:
            for shape in SHAPES:
                times = time_pruner(name, params, shape, dtype, device, args.reps, args.warmup)
                q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
                results.append({
                    "method": name, "params": params, "shape": list(shape), "device": device,
                    "dtype": str(dtype).replace("torch.", ""), "reps": args.reps,
                    "median_ms": statistics.median(times) * 1e3, "p10_ms": q[0] * 1e3, "p90_ms": q[-1] * 1e3,
                })
                print(f"  {label(name, params):45s} {device}/{results[-1]['dtype']:8s} {shape}: "
                      f"{results[-1]['median_ms']:.3f} ms", file=sys.stderr)

    info = device_info(cuda)
    print(f"Device: {info['cpu']} ({info['cpu_count']} cores), torch {info['torch']}, "
          f"{info['threads']} threads" + (f", GPU {info['gpu']}" if cuda else ""))
    print(f"Median time per grid (ms), one grid per call, {args.reps} calls after {args.warmup} warm-up calls; "
          f"[p10-p90] in brackets.\n")
    header = "| method | device / dtype | " + " | ".join("x".join(map(str, s)) for s in SHAPES) + " |"
    print(header)
    print("|" + "---|" * (2 + len(SHAPES)))
    for device, dtype in targets:
        dname = str(dtype).replace("torch.", "")
        for name, params in configs:
            cells = []
            for shape in SHAPES:
                r = next(r for r in results if r["method"] == name and r["params"] == params
                         and r["shape"] == list(shape) and r["device"] == device and r["dtype"] == dname)
                cells.append(f"{r['median_ms']:.3f} [{r['p10_ms']:.3f}-{r['p90_ms']:.3f}]")
            print(f"| {label(name, params)} | {device} / {dname} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"device": info, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
