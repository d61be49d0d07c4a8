"""Pruning overhead: median time per grid of every pruning method, streaming one grid per call.

Shapes: the Qwen2.5-VL-7B grid (16x16x3584: 448x448 input after the 2x2 merger) and the
LLaVA-OneVision-7B grid (14x14x3584: 384x384 after 2x2 pooling). float32 on the CPU, and
float16/bfloat16 on CUDA when a GPU is available. Every call is one grid (T = 1), as in a
live stream; each pruner is warmed up first, then timed call by call (CUDA: synchronised
after each call, since the session needs the mask), and the median is reported.

    python benchmarks/pruning_overhead.py                    # full run (a few minutes)
    python benchmarks/pruning_overhead.py --reps 20 --warmup 5   # quick check
    python benchmarks/pruning_overhead.py --json results.json
    python benchmarks/pruning_overhead.py --targets cuda:float16,cuda:bfloat16 \
        --fast-paths cudagraph,compile        # GPU: eager, plus the graphed / compiled call

Prints a Markdown table and the device (CPU model, torch version, threads).

``--fast-paths`` also times, for ``--fast-methods`` on the first shape, the per-frame call
through a CUDA graph (the pruner's scoring captured once, replayed per grid: the grid is
copied into the graph's input and the stream state copied back after each replay) and/or
through ``torch.compile`` (``--compile-mode``, e.g. reduce-overhead, which itself uses CUDA
graphs). Each fast path is first checked against eager masks on the same stream
(``masks_match_eager``); a path that cannot run (no CUDA for graphs, a host sync inside the
captured region, a compile error) is recorded as skipped with its reason, not fatal.
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
from streampress.bench.host import cpu_name

SHAPES = [(16, 16, 3584), (14, 14, 3584)]
# Every registered method at its defaults, plus the matched-budget mode of the threshold methods.
CONFIGS = [(name, {}) for name in streampress.list_pruners()] + [
    ("dtd", {"keep_ratio": 0.25}),
    ("mssavt", {"keep_ratio": 0.75}),
    ("streaming_assistant", {"keep_ratio": 0.25}),
    ("stc", {"keep_ratio": 0.25}),
]
DISTINCT_GRIDS = 8  # cycled, so consecutive grids differ as in a real stream


def device_info(cuda: bool) -> dict:
    info = {
        "cpu": cpu_name(),
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if cuda:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def stream_grids(shape, dtype, device) -> list[torch.Tensor]:
    """``DISTINCT_GRIDS`` single-grid inputs ``[1, *shape]`` (seeded, so every method sees the same ones)."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randn((1,) + shape, generator=gen).to(device=device, dtype=dtype) for _ in range(DISTINCT_GRIDS)]


def time_calls(fn, grids, reps, warmup, sync) -> list[float]:
    """Seconds per call of ``fn`` over ``reps`` grids (cycled), after ``warmup`` untimed calls;
    ``sync()`` after the warm-up and after each timed call."""
    for i in range(warmup):
        fn(grids[i % len(grids)])
    sync()
    times = []
    for i in range(reps):
        grid = grids[i % len(grids)]
        start = time.perf_counter()
        fn(grid)
        sync()
        times.append(time.perf_counter() - start)
    return times


def summary_ms(times: list[float]) -> dict:
    """``{"median_ms", "p10_ms", "p90_ms"}`` of per-call seconds."""
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return {"median_ms": statistics.median(times) * 1e3, "p10_ms": q[0] * 1e3, "p90_ms": q[-1] * 1e3}


def time_pruner(name, params, shape, dtype, device, reps, warmup) -> list[float]:
    """Seconds per call for ``reps`` single-grid calls on one stream."""
    grids = stream_grids(shape, dtype, device)
    pruner = streampress.create_pruner(name, **params)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    return time_calls(pruner, grids, reps, warmup, sync)


def parse_targets(text: str) -> list[tuple[str, torch.dtype]]:
    """``"cpu:float32,cuda:bfloat16"`` -> ``[("cpu", torch.float32), ("cuda", torch.bfloat16)]``."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        device, _, dtype = item.partition(":")
        dt = getattr(torch, dtype or "float32", None)
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
            raise SystemExit(f"--targets: {item!r}: not a floating torch dtype")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit(f"--targets: {item!r}: CUDA is not available")
        out.append((device, dt))
    return out


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """``"16x16x3584,14x14x3584"`` -> ``[(16, 16, 3584), (14, 14, 3584)]``."""
    shapes = [tuple(int(v) for v in s.split("x")) for s in filter(None, (t.strip() for t in text.split(",")))]
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise SystemExit(f"--shapes: expected HxWxD[,HxWxD...], got {text!r}")
    return shapes


class FastPathSkipped(Exception):
    """A fast path that cannot run here (its reason is recorded)."""


def _tree_map(fn, obj):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_tree_map(fn, v) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_tree_map(fn, v) for v in obj)
    return obj


def _tree_copy_(dst, src, copy: bool = True) -> None:
    """Copy the tensors of ``src`` into those of ``dst`` (same structure; ``copy=False``: only
    check that); other leaves must be equal."""
    if isinstance(dst, torch.Tensor):
        if not isinstance(src, torch.Tensor) or src.shape != dst.shape:
            raise FastPathSkipped("the stream state changes shape from call to call")
        if copy and src.data_ptr() != dst.data_ptr():
            dst.copy_(src)
    elif isinstance(dst, (tuple, list)):
        if not isinstance(src, (tuple, list)) or len(src) != len(dst):
            raise FastPathSkipped("the stream state changes structure from call to call")
        for a, b in zip(dst, src):
            _tree_copy_(a, b, copy)
    elif dst != src:
        raise FastPathSkipped(f"the stream state holds a Python value that changes per call ({dst!r} -> {src!r})")


class GraphedPruner:
    """One pruner whose per-grid call is a CUDA graph replay (state carried in static buffers)."""

    def __init__(self, pruner, first_grids):
        if first_grids[0].device.type != "cuda":
            raise FastPathSkipped("CUDA graphs need a CUDA device")
        self.pruner = pruner
        for g in first_grids:  # eager: the stream state exists and has its steady structure
            pruner(g)
        self.x = first_grids[-1].clone()
        self.state = _tree_map(lambda t: t.clone(), pruner._state)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                for _ in range(2):
                    pruner._prune(pruner._validated(self.x), self.state)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.keep, self.out = pruner._prune(pruner._validated(self.x), self.state)
        except FastPathSkipped:
            raise
        except Exception as exc:  # typically a host sync (bool(tensor), .item()) inside the call
            try:
                torch.cuda.synchronize()
            except Exception:
                pass
            raise FastPathSkipped(f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
        _tree_copy_(self.state, self.out, copy=False)  # raises now if the state cannot be carried

    def __call__(self, grid):
        self.x.copy_(grid)
        self.graph.replay()
        _tree_copy_(self.state, self.out)
        return self.keep


def make_fast(path: str, pruner, first_grids, backend: str, mode: str | None):
    """A callable ``grid -> keep`` for ``path`` (``cudagraph`` or ``compile``), having fed
    ``first_grids`` to the stream."""
    if path == "cudagraph":
        return GraphedPruner(pruner, first_grids)
    if path == "compile":
        kw = {"backend": backend}
        if backend == "inductor" and mode and mode != "default":
            kw["mode"] = mode
        try:
            fn = torch.compile(pruner.__call__, **kw)
        except Exception as exc:
            raise FastPathSkipped(f"torch.compile: {type(exc).__name__}: {str(exc)[:200]}") from exc
        for g in first_grids:
            fn(g)
        return fn
    raise SystemExit(f"--fast-paths: unknown path {path!r} (cudagraph, compile)")


def time_fast(path, name, params, shape, dtype, device, reps, warmup, backend, mode) -> dict:
    """Median time per call of a fast path, after checking its masks against eager ones."""
    grids = stream_grids(shape, dtype, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    n_first, n_check = 2, 2 * DISTINCT_GRIDS
    eager = streampress.create_pruner(name, **params)
    order = [grids[i % DISTINCT_GRIDS] for i in range(n_first + n_check)]
    want = [eager(g).clone() for g in order]
    if path == "compile":
        torch._dynamo.reset()  # each method and dtype compiles afresh (no recompile limit reached)
    try:
        t0 = time.perf_counter()
        fn = make_fast(path, streampress.create_pruner(name, **params), order[:n_first], backend, mode)
        got = [fn(g).clone() for g in order[n_first:]]
        sync()
        setup_s = time.perf_counter() - t0
        mismatches = sum(int((a != b).sum()) for a, b in zip(want[n_first:], got))
        times = time_calls(fn, grids, reps, warmup, sync)
    except FastPathSkipped as exc:
        return {"skipped": str(exc)}
    except Exception as exc:  # recorded, not fatal: the other paths and methods still run
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        if device.startswith("cuda"):
            try:
                torch.cuda.synchronize()
            except Exception:
                pass
        return {"skipped": f"failed: {type(exc).__name__}: {text}"}
    return {**summary_ms(times), "setup_s": setup_s, "masks_match_eager": mismatches == 0,
            "mask_mismatches": mismatches}


def label(name, params) -> str:
    return name + (" (" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")" if params else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=300, help="timed calls per method and shape (default 300)")
    ap.add_argument("--warmup", type=int, default=30, help="untimed calls first (default 30)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--methods", nargs="*", help="only these method names")
    ap.add_argument("--no-cuda", action="store_true", help="skip the GPU even when one is available")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file (rewritten as results come)")
    ap.add_argument("--targets", help="device:dtype list, e.g. cuda:float16,cuda:bfloat16 (default: cpu:float32, "
                                      "plus cuda:float16,cuda:bfloat16 when CUDA is available)")
    ap.add_argument("--shapes", help="HxWxD list (default 16x16x3584,14x14x3584)")
    ap.add_argument("--fast-paths", default="", help="also time these per-frame paths: cudagraph, compile (comma list)")
    ap.add_argument("--fast-methods", default="streaming_assistant,stc",
                    help="methods (at their defaults) given the fast paths, on the first shape")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    ap.add_argument("--compile-mode", default="reduce-overhead",
                    help="torch.compile mode with inductor (default reduce-overhead: CUDA graphs)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and not args.no_cuda
    if args.targets:
        targets = parse_targets(args.targets)
        cuda = any(d.startswith("cuda") for d, _ in targets)
    else:
        targets = [("cpu", torch.float32)] + ([("cuda", torch.float16), ("cuda", torch.bfloat16)] if cuda else [])
    global SHAPES
    if args.shapes:
        SHAPES = parse_shapes(args.shapes)
    configs = [c for c in CONFIGS if not args.methods or c[0] in args.methods]
    fast_paths = [p.strip() for p in args.fast_paths.split(",") if p.strip()]
    fast_methods = [m.strip() for m in args.fast_methods.split(",") if m.strip()]

    results, fast = [], []

    def dump():
        if args.json:
            data = {"device": device_info(cuda), "results": results}
            if fast_paths:
                data["fast_paths"] = fast
            args.json.write_text(json.dumps(data, indent=2))

    for device, dtype in targets:
        for name, params in configs:
            for shape in SHAPES:
                times = time_pruner(name, params, shape, dtype, device, args.reps, args.warmup)
                results.append({
                    "method": name, "params": params, "shape": list(shape), "device": device,
                    "dtype": str(dtype).replace("torch.", ""), "reps": args.reps, **summary_ms(times),
                })
                print(f"  {label(name, params):45s} {device}/{results[-1]['dtype']:8s} {shape}: "
                      f"{results[-1]['median_ms']:.3f} ms", file=sys.stderr)
                dump()
    for device, dtype in sorted(targets, key=lambda t: t[1] != torch.bfloat16):  # bf16 first: the target dtype
        for path in fast_paths:
            for name in fast_methods:
                r = {"method": name, "params": {}, "shape": list(SHAPES[0]), "device": device,
                     "dtype": str(dtype).replace("torch.", ""), "path": path, "reps": args.reps}
                if path == "compile":
                    r["compile"] = {"backend": args.compile_backend,
                                    "mode": args.compile_mode if args.compile_backend == "inductor" else None}
                r.update(time_fast(path, name, {}, SHAPES[0], dtype, device, args.reps, args.warmup,
                                   args.compile_backend, args.compile_mode))
                fast.append(r)
                print(f"  {name:45s} {device}/{r['dtype']:8s} {path}: "
                      + (f"{r['median_ms']:.3f} ms" if "median_ms" in r else f"skipped ({r['skipped']})"),
                      file=sys.stderr)
                dump()

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
    if fast_paths:
        print(f"\nPer-frame call through a fast path, {'x'.join(map(str, SHAPES[0]))} (eager for comparison):\n")
        print("| method | device / dtype | path | median ms [p10-p90] | masks match eager | setup s |")
        print("|---|---|---|---|---|---|")
        shown = set()
        for r in sorted(fast, key=lambda r: (r["device"], r["dtype"], r["method"])):
            key = (r["device"], r["dtype"], r["method"])
            e = next((x for x in results if x["method"] == r["method"] and not x["params"]
                      and x["shape"] == r["shape"] and x["device"] == r["device"] and x["dtype"] == r["dtype"]), None)
            if e is not None and key not in shown:
                shown.add(key)
                print(f"| {r['method']} | {r['device']} / {r['dtype']} | eager | {e['median_ms']:.3f} "
                      f"[{e['p10_ms']:.3f}-{e['p90_ms']:.3f}] | - | - |")
            if "median_ms" in r:
                print(f"| {r['method']} | {r['device']} / {r['dtype']} | {r['path']} | {r['median_ms']:.3f} "
                      f"[{r['p10_ms']:.3f}-{r['p90_ms']:.3f}] | {'yes' if r['masks_match_eager'] else 'NO'} "
                      f"| {r['setup_s']:.1f} |")
            else:
                print(f"| {r['method']} | {r['device']} / {r['dtype']} | {r['path']} | skipped: {r['skipped']} "
                      f"| - | - |")
    dump()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
