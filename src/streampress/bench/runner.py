"""Run the dense baseline and each method on the same frames, in one process.

Every run is a fresh :class:`~streampress.session.StreamingSession` on the same model, fed
the same frames one model item at a time (a temporal patch of 2 frames for Qwen), then
asked one fixed question. Per run we record the session's own timers (encoder, pruning,
prefill; per frame), the time to the first answer token, the visual tokens kept, the KV
cache bytes and the peak memory. One warm-up pass runs first so that one-time costs
(allocator growth, lazy initialisation) do not land on whichever run comes first.

The result is the plain dict that :mod:`streampress.bench.report` renders.
"""

from __future__ import annotations

import gc
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

__all__ = ["RunSpec", "PeakMemory", "run_bench", "default_runs", "DEFAULT_METHODS", "DEFAULT_MODEL"]

DEFAULT_METHODS = ("streaming_assistant", "stc", "dtd", "random")
# The built-in default: Qwen2.5-VL-3B's real layer shapes (hidden 2048, 16/2 heads, MLP 11008;
# vision hidden 1280, 16 heads, MLP 3420, window 112), cut to a few layers so that the whole
# report takes a minute or two on a 2-core CPU; the vocabulary is cut too (it only sizes the
# embedding table and the one-token output projection, not the measured stream path).
DEFAULT_MODEL = "random:qwen2.5-vl-3b"
DEFAULT_MODEL_CUTS = {"num_layers": 2, "vision_depth": 2, "vocab_size": 32768}
DEFAULT_FRAMES = 8
DEFAULT_SIZE = (336, 336)


@dataclass
class RunSpec:
    """One row of the report: a method (None = dense) with its parameters, optionally a cacher."""

    name: str
    method: str | None = None
    params: dict = field(default_factory=dict)
    cacher: dict | None = None  # create_cacher(**cacher)


def default_runs(methods: Sequence[str], keep_ratio: float | None, cacher: dict | None) -> list[RunSpec]:
    """Dense, each method at the matched ``keep_ratio`` (when the method takes one), dense + cacher."""
    from streampress.pruners.registry import resolve_name

    runs = [RunSpec("dense")]
    for name in methods:
        info = resolve_name(name)
        params = {"keep_ratio": keep_ratio} if keep_ratio is not None and "keep_ratio" in info.defaults else {}
        runs.append(RunSpec(info.name, info.name, params))
    if cacher is not None:
        runs.append(RunSpec("dense+cacher", None, {}, dict(cacher)))
    return runs


class PeakMemory:
    """Peak memory of a run: CUDA max allocated on a GPU; on CPU the process's resident-set
    high-water mark (VmHWM, reset before each run through /proc/self/clear_refs where Linux
    allows it, else the process-lifetime maximum from getrusage)."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.resettable = False
        if self.cuda:
            self.kind = "CUDA max memory allocated (reset before each run)"
            self.short = "peak = CUDA max allocated"
        else:
            self.resettable = self._reset_hwm()
            self.kind = ("process RSS high-water mark (VmHWM, reset before each run)" if self.resettable
                         else "process RSS high-water mark since start (getrusage ru_maxrss, not resettable)")
            self.short = "peak = process RSS"

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            self._reset_hwm()

    def peak(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            return int(self.torch.cuda.max_memory_allocated(self.device))
        if self.resettable:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        import resource

        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def _stream(model, spec: RunSpec, frames: np.ndarray, timestamps: Sequence[float], question: str,
            max_new_tokens: int, on_item: Callable[[], None] | None = None):
    from streampress import StreamingSession, create_cacher, create_pruner

    pruner = create_pruner(spec.method, **spec.params) if spec.method else None
    cacher = create_cacher(**spec.cacher) if spec.cacher is not None else None
    session = StreamingSession(model, pruner=pruner, cacher=cacher)
    step = model.frames_per_item
    for i in range(0, len(frames), step):
        session.add_frames(frames[i:i + step], list(timestamps[i:i + step]))
        if on_item is not None:
            on_item()
    answer = session.ask(question, max_new_tokens=max_new_tokens)
    return session, answer


def _warm_up(model, runs: Sequence[RunSpec], frames, timestamps, question) -> None:
    """Run each distinct pipeline once (dense, the cacher path) and each pruner on grids of the
    stream's shape, so first-call costs land on no measured run."""
    import torch

    from streampress import create_pruner

    session, _ = _stream(model, runs[0], frames, timestamps, question, 1)
    height, width = session.stats()["grid"]
    for spec in [r for r in runs if r.cacher is not None][:1]:
        _stream(model, spec, frames, timestamps, question, 1)
    grids = torch.randn(2, height, width, model.hidden_size, generator=torch.Generator().manual_seed(0))
    grids = grids.to(model.device, model.dtype)
    for spec in runs:
        if spec.method:
            pruner = create_pruner(spec.method, **spec.params)
            pruner(grids)
            pruner(grids)


_TIMES = ("encode_ms", "prune_ms", "prefill_ms", "ttft_ms", "wall_s")


def _measure(model, spec: RunSpec, frames, timestamps, question, max_new_tokens, memory, on_item) -> dict:
    gc.collect()
    memory.reset()
    start = time.perf_counter()
    session, answer = _stream(model, spec, frames, timestamps, question, max_new_tokens, on_item)
    wall = time.perf_counter() - start
    stats = session.stats()
    n = stats["frames"]
    return {
        "name": spec.name, "method": spec.method, "params": dict(spec.params), "cacher": spec.cacher,
        "frames": n,
        "encode_ms": 1000 * stats["encode_seconds"] / n,
        "prune_ms": 1000 * stats["prune_seconds"] / n,
        "prefill_ms": 1000 * stats["prefill_seconds"] / n,
        "ttft_ms": 1000 * answer.time_to_first_token,
        "tokens_seen": stats["visual_tokens_seen"], "tokens_kept": stats["visual_tokens_kept"],
        "kv_tokens": stats["kv_cache_tokens"], "kv_bytes": stats["kv_cache_bytes"],
        "peak_bytes": memory.peak(), "wall_s": wall, "answer": answer.text,
    }


def run_bench(model, frames: np.ndarray, timestamps: Sequence[float], runs: Sequence[RunSpec],
              question: str = "What is moving in the video?", max_new_tokens: int = 8, repeats: int = 1,
              progress=None) -> dict:
    """Measure every run on the same frames; return ``{"config": {...}, "runs": [...]}``.

    ``frames``: uint8 ``[F, H, W, 3]`` with F a multiple of ``model.frames_per_item`` (extra
    frames are dropped). ``repeats``: rounds over all runs, interleaved (dense, a, b, dense, a,
    b, ...) so that a slow spell of the machine hits every run alike; times are the median
    over rounds. ``progress``: an optional ``rich.progress.Progress``.
    """
    import torch

    if not runs or runs[0].method is not None or runs[0].cacher is not None or runs[0].name != "dense":
        raise ValueError("runs must start with the dense baseline RunSpec('dense')")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    step = model.frames_per_item
    usable = len(frames) // step * step
    if usable == 0:
        raise ValueError(f"need at least {step} frames (one model item), got {len(frames)}")
    frames, timestamps = frames[:usable], list(timestamps[:usable])
    memory = PeakMemory(model.device)
    tasks = [progress.add_task(f"{spec.name:<20}", total=repeats * usable // step) if progress else None
             for spec in runs]
    samples: list[list[dict]] = [[] for _ in runs]
    with torch.inference_mode():
        _warm_up(model, runs, frames[:2 * step], timestamps[:2 * step], question)
        for _ in range(repeats):
            for i, spec in enumerate(runs):
                advance = (lambda t=tasks[i]: progress.advance(t)) if progress else None
                samples[i].append(_measure(model, spec, frames, timestamps, question, max_new_tokens,
                                           memory, advance))
                if progress:
                    total = sum(samples[i][-1][k] for k in ("encode_ms", "prune_ms", "prefill_ms"))
                    progress.update(tasks[i], description=f"{spec.name:<20} {total:8.1f} ms/frame")
    rows = []
    for runs_of_spec in samples:
        row = dict(runs_of_spec[0])
        for key in _TIMES:
            row[key] = float(np.median([r[key] for r in runs_of_spec]))
        row["peak_bytes"] = max(r["peak_bytes"] for r in runs_of_spec)
        row["total_ms"] = row["encode_ms"] + row["prune_ms"] + row["prefill_ms"]
        row["repeats"] = repeats
        rows.append(row)
    device = model.device
    config = {
        "device": _device_name(device), "dtype": str(model.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "frames": usable,
        "frame_size": [int(frames.shape[2]), int(frames.shape[1])], "repeats": repeats,
        "question": question, "max_new_tokens": max_new_tokens, "peak_memory": memory.kind,
        "peak_memory_short": memory.short, "model_detail": _model_detail(model),
        "torch": torch.__version__, "python": platform.python_version(),
    }
    return {"config": config, "runs": rows}


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    cpu = platform.processor() or platform.machine()
    try:  # Linux names the processor model here; platform.processor() is often empty
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"cpu ({cpu}, {torch.get_num_threads()} threads)"


def _model_detail(model) -> str:
    cfg = getattr(model.hf_model, "config", None)
    text = getattr(cfg, "text_config", cfg)
    vision = getattr(cfg, "vision_config", None)
    parts = []
    if text is not None and hasattr(text, "num_hidden_layers"):
        parts.append(f"{text.num_hidden_layers} LLM layers, hidden {text.hidden_size}")
    if vision is not None:
        depth = getattr(vision, "depth", None) or getattr(vision, "num_hidden_layers", None)
        parts.append(f"{depth} vision blocks, hidden {getattr(vision, 'hidden_size', '?')}")
    return ", ".join(parts)
