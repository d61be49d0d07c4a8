"""Run the dense baseline and each method on the same frames, interleaved, in one process.

Why interleaved: on a shared or thermally throttled machine the speed drifts over seconds,
so runs measured one after another compare the machine at different moments, not the
methods. Every run gets a fresh :class:`~streampress.session.StreamingSession` on the same
model, and each model item (a temporal patch of 2 frames for Qwen) is fed to every run back
to back before the next item, the order rotated and reversed per item (as
``benchmarks/vit_cache.py`` alternates dense and cached calls), so a slow spell hits every
run alike. The question at the end is asked ``asks`` times per run, interleaved the same way.

Per run and item we keep the session's own stage timers (encoder, pruning, prefill) as
per-frame samples; the report gives their median with the interquartile range, and ratios to
dense as the median of per-sample *paired* ratios (each sample over dense's sample of the same
item, measured moments apart). A pruning method without the cacher runs exactly dense's
encoder work, so its encoder ratio is a same-work control: it should be 1.0, and
:func:`streampress.bench.report.noise_check` flags the run as noisy when it is not.

The result is the plain dict that :mod:`streampress.bench.report` renders.
"""

from __future__ import annotations

import gc
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .host import cpu_name

__all__ = ["RunSpec", "PeakMemory", "run_bench", "default_runs", "summarize", "summarize_runs", "step_order",
           "DEFAULT_METHODS", "DEFAULT_MODEL"]

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
    """Peak memory of a step: CUDA max allocated on a GPU; on CPU the process's resident-set
    high-water mark (VmHWM, reset before each step through /proc/self/clear_refs where Linux
    allows it, else the process-lifetime maximum from getrusage)."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.resettable = False
        if self.cuda:
            self.kind = "CUDA max memory allocated (reset before each measured step)"
            self.short = "peak = CUDA max allocated"
        else:
            self.resettable = self._reset_hwm()
            self.kind = ("process RSS high-water mark (VmHWM, reset before each measured step)"
                         if self.resettable else
                         "process RSS high-water mark since start (getrusage ru_maxrss, not resettable)")
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


def _session(model, spec: RunSpec, kv_memory="full"):
    import streampress

    pruner = streampress.create_pruner(spec.method, **spec.params) if spec.method else None
    cacher = streampress.create_cacher(**spec.cacher) if spec.cacher is not None else None
    return streampress.StreamingSession(model, pruner=pruner, cacher=cacher, memory=kv_memory)


def step_order(num_runs: int, step: int) -> list[int]:
    """The order in which the runs take step ``step``: rotated by one run every second step and
    reversed on odd steps, so no run always goes first and every run has each neighbour on
    both sides (a step's cache pollution or a slow spell then hits every run alike)."""
    order = np.roll(np.arange(num_runs), -(step // 2))
    return (order[::-1] if step % 2 else order).tolist()


_STAGE_KEYS = ("encode_seconds", "prune_seconds", "prefill_seconds")


def _round(model, specs, frames, timestamps, question, max_new_tokens, asks, memory, kv_memory, offset=0,
           on_step: Callable[[int, str], None] | None = None) -> dict:
    """One interleaved round: a fresh session per run, item k fed to every run back to back in
    ``step_order(R, offset + k)``, then the question asked ``asks`` times the same way.

    Returns per-item stage times ``[R, items, 3]`` (seconds), whether each item was a cacher
    reference ``[R, items]``, times to first token ``[R, asks]``, per-run wall seconds and
    peak memory, the first answers and the sessions' final stats.
    """
    runs, step = len(specs), model.frames_per_item
    items = len(frames) // step
    sessions = [_session(model, spec, kv_memory) for spec in specs]
    stages = np.zeros((runs, items, len(_STAGE_KEYS)))
    reference = np.zeros((runs, items), bool)
    ttft = np.zeros((runs, asks))
    wall = np.zeros(runs)
    peak = np.zeros(runs, np.int64)
    answers: list[str | None] = [None] * runs

    def timed(i, call, *args, **kwargs):
        memory.reset()
        start = time.perf_counter()
        out = call(*args, **kwargs)
        wall[i] += time.perf_counter() - start
        peak[i] = max(peak[i], memory.peak())
        return out

    for k in range(items):
        chunk = slice(k * step, (k + 1) * step)
        for i in step_order(runs, offset + k):
            before = sessions[i].stats()
            timed(i, sessions[i].add_frames, frames[chunk], timestamps[chunk])
            after = sessions[i].stats()
            stages[i, k] = [after[key] - before[key] for key in _STAGE_KEYS]
            reference[i, k] = after.get("cacher_references", 0) > before.get("cacher_references", 0)
            if on_step is not None:
                on_step(i, "item")
    for a in range(asks):
        for i in step_order(runs, offset + items + a):
            answer = timed(i, sessions[i].ask, question, max_new_tokens=max_new_tokens)
            ttft[i, a] = answer.time_to_first_token
            answers[i] = answer.text if answers[i] is None else answers[i]
            if on_step is not None:
                on_step(i, "ask")
    return {"stages": stages, "reference": reference, "ttft": ttft, "wall": wall, "peak": peak,
            "answers": answers, "stats": [s.stats() for s in sessions]}


def summarize(samples, groups=None) -> dict:
    """Median and spread of per-frame samples: ``{"median", "q1", "q3", "min", "max", "n"}``.

    ``groups`` (one label per sample, optional) marks samples of different, known workloads,
    such as the cacher's full reference items and its cheap dependent ones: then "median" is
    the mean of the per-group medians weighted by group size (a plain median would pick one
    kind of item or fall between them) and q1/q3 add the quartiles of the samples' deviations
    from their group's median. With one group this is the plain median and quartiles
    (``numpy.percentile``, linear interpolation)."""
    x = np.asarray(samples, dtype=float)
    if x.size == 0:
        raise ValueError("no samples")
    labels = np.zeros(x.size, int) if groups is None else np.asarray(groups).reshape(-1)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    medians = np.array([np.median(x[inverse == g]) for g in range(len(counts))])
    center = float(medians @ counts / x.size)
    q1, q3 = np.percentile(x - medians[inverse], [25, 75])
    return {"median": center, "q1": center + float(q1), "q3": center + float(q3),
            "min": float(x.min()), "max": float(x.max()), "n": int(x.size)}


_TIMED = ("encode_ms", "prune_ms", "prefill_ms", "total_ms")
TIMING = ("interleaved: each item (a temporal patch) goes to every run back to back, the order rotated and "
          "reversed per item; per-frame samples = the session's stage timers per item / frames per item; "
          "value = median over samples (cacher reference and dependent items: size-weighted mean of the two "
          "medians); spread = interquartile range; ratio to dense = median of per-sample paired ratios")


def summarize_runs(names: Sequence[str], stages_ms: np.ndarray, reference: np.ndarray,
                   ttft_ms: np.ndarray) -> list[dict]:
    """Per run (index 0 = dense): ``stats`` and ``paired_ratios`` (vs dense) of each timed key
    from per-frame stage times ``[R, N, 3]`` (ms), cacher-reference flags ``[R, N]`` and times
    to first token ``[R, A]``; sample j of every run is paired with sample j of dense (the
    same item or ask, measured back to back)."""
    per_frame = np.concatenate([stages_ms, stages_ms.sum(-1, keepdims=True)], axis=-1)  # [R, N, 4]
    with np.errstate(divide="ignore", invalid="ignore"):
        paired = per_frame / per_frame[:1]
        paired_ttft = ttft_ms / ttft_ms[:1]
    rows = []
    for i, name in enumerate(names):
        groups = reference[i]
        stats = {key: summarize(per_frame[i, :, j], groups) for j, key in enumerate(_TIMED)}
        stats["ttft_ms"] = summarize(ttft_ms[i])
        ratios = {key: summarize(paired[i, :, j], groups) for j, key in enumerate(_TIMED) if key != "prune_ms"}
        ratios["ttft_ms"] = summarize(paired_ttft[i])
        samples = {key: per_frame[i, :, j].round(4).tolist() for j, key in enumerate(_TIMED)}
        samples["ttft_ms"] = ttft_ms[i].round(4).tolist()
        if groups.any():
            samples["reference"] = groups.tolist()
        rows.append({"name": name, "stats": stats, "paired_ratios": ratios, "samples": samples,
                     **{key: s["median"] for key, s in stats.items()}})
    return rows


def run_bench(model, frames: np.ndarray, timestamps: Sequence[float], runs: Sequence[RunSpec],
              question: str = "What is moving in the video?", max_new_tokens: int = 8, repeats: int = 1,
              progress=None, asks: int = 3, on_step: Callable[[int, str], None] | None = None,
              kv_memory="full") -> dict:
    """Measure every run on the same frames, interleaved; return ``{"config", "runs", "noise"}``.

    ``frames``: uint8 ``[F, H, W, 3]`` with F a multiple of ``model.frames_per_item`` (extra
    frames are dropped). ``repeats``: rounds of the whole stream (fresh sessions each round);
    per-frame samples of all rounds are pooled. ``asks``: times each run is asked the question
    at the end of each round (interleaved too). ``progress``: an optional
    ``rich.progress.Progress``. ``on_step(run_index, "item" | "ask")``: called after each
    measured step (tests use it to check the interleaving). ``kv_memory``: the sessions'
    memory policy (``"full"``, a SlidingWindow, a RetrievalMemory), the same for every run.
    """
    import torch

    from .report import noise_check

    if not runs or runs[0].method is not None or runs[0].cacher is not None or runs[0].name != "dense":
        raise ValueError("runs must start with the dense baseline RunSpec('dense')")
    for name, value in (("repeats", repeats), ("asks", asks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    step = model.frames_per_item
    usable = len(frames) // step * step
    if usable == 0:
        raise ValueError(f"need at least {step} frames (one model item), got {len(frames)}")
    frames, timestamps = frames[:usable], list(timestamps[:usable])
    items = usable // step
    memory = PeakMemory(model.device)

    def advance(i, kind):
        if progress is not None and kind == "item":
            progress.advance(task)
        if on_step is not None:
            on_step(i, kind)

    rounds = []
    with torch.inference_mode():
        # Warm-up: every pipeline (each pruner, the cacher's reference and dependent paths,
        # the question) once on two items, so first-call costs land on no measured step.
        task = progress.add_task("warming up every run", total=None) if progress else None
        _round(model, runs, frames[:2 * step], timestamps[:2 * step], question, 1, 1, memory, kv_memory)
        if progress:
            progress.remove_task(task)
            task = progress.add_task(f"measuring {len(runs)} runs, interleaved per item",
                                     total=repeats * items * len(runs))
        for r in range(repeats):
            gc.collect()
            rounds.append(_round(model, runs, frames, timestamps, question, max_new_tokens, asks, memory, kv_memory,
                                 offset=r * (items + asks), on_step=advance))
    stages = np.concatenate([r["stages"] for r in rounds], axis=1) * 1000 / step  # ms per frame
    reference = np.concatenate([r["reference"] for r in rounds], axis=1)
    ttft = np.concatenate([r["ttft"] for r in rounds], axis=1) * 1000
    rows = summarize_runs([spec.name for spec in runs], stages, reference, ttft)
    first = rounds[0]
    for i, (spec, row) in enumerate(zip(runs, rows)):
        stats = first["stats"][i]
        row.update({
            "method": spec.method, "params": dict(spec.params), "cacher": spec.cacher, "frames": stats["frames"],
            "tokens_seen": stats["visual_tokens_seen"], "tokens_kept": stats["visual_tokens_kept"],
            "kv_tokens": stats["kv_cache_tokens"], "kv_bytes": stats["kv_cache_bytes"],
            "peak_bytes": int(max(r["peak"][i] for r in rounds)),
            "wall_s": float(np.median([r["wall"][i] for r in rounds])), "answer": first["answers"][i],
            "repeats": repeats})
    config = {
        "device": _device_name(model.device), "dtype": str(model.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "frames": usable,
        "frame_size": [int(frames.shape[2]), int(frames.shape[1])], "repeats": repeats, "asks": asks,
        "samples_per_run": repeats * items, "question": question, "max_new_tokens": max_new_tokens,
        "timing": TIMING, "peak_memory": memory.kind + "; per run: the highest over its own steps "
        "(process-wide, so other runs' live KV caches count too)",
        "peak_memory_short": memory.short, "model_detail": _model_detail(model),
        "torch": torch.__version__, "python": platform.python_version(),
    }
    result = {"config": config, "runs": rows}
    result["noise"] = noise_check(result)
    return result


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"cpu ({cpu_name()}, {torch.get_num_threads()} threads)"


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
