"""Device memory over a long stream: full cache vs sliding window vs retrieval memory vs
KV budgets (InfiniPot-V, HERMES).

Streams a long video (a looped synthetic clip by default, or a looped real video) at 1 fps
through a reduced-size model with random weights and records, every ``--every``
video-seconds, for each memory policy:

- device bytes: on CUDA ``torch.cuda.memory_allocated()`` minus what the model held before
  the stream; on CPU the bytes of the live KV cache (what would sit on an accelerator);
- CPU bytes held by the retrieval memory's offloaded blocks and summary keys;
- the time in ``add_frames`` (per-frame time: the policy's stream seconds / frames; on CPU
  without the shared vision tower) and, for the budget policies (``infinipot``: InfiniPot-V,
  ``hermes``: HERMES, ``--budget`` visual tokens per layer and KV head, default the window's
  visual token count so that they hold as much video as the window), the number of
  compressions and their seconds as the store times them (``BudgetStore.after_add``: plan +
  gather, HERMES's guidance forwards included), summarized as ms per compression, its ratio to
  the per-frame time and the compressions' share of the stream time. Their device bytes
  include the slot table (it lives next to the cache);
- on CUDA also the peak: ``torch.cuda.max_memory_allocated()`` minus the same baseline,
  since the policy's stream began (``peak_device_bytes`` per row, ``peak_device_mib`` in the
  summary and a column of the policy table), and the model's own bytes (``model_device_mib``).

Default model: the Qwen2.5-VL-7B architecture with its KV geometry per layer (4 KV heads x
head dim 128, so KV bytes per token and layer are the 7B's) in 2 LLM layers, its vision
block shapes in 1 vision block, and the LLM's hidden size reduced to ``--hidden`` (512: 4
query heads, MLP 2x hidden) so that a 30-minute stream fits a CPU; ``--hidden 0`` keeps
the real 3584-wide layers. 112x112 frames: 4x4 = 16 visual tokens per temporal patch of 2
frames. ``--chunk`` video-seconds go into one ``add_frames`` call (default ``--every``: one
call per sample; the budget policies compress after each call that reaches the budget, so
within a call the cache briefly holds budget + chunk tokens; ``--chunk 2`` feeds one item
per call, InfiniPot-V's own schedule, at many more calls). On CPU the policies run in
lockstep, chunk by chunk, and share the vision tower's output (it is the same for all); on
CUDA they run one after another so that ``memory_allocated`` belongs to one stream.

At the end each policy answers one question (retrieval: top-k blocks per layer). Output:
a Markdown table of sampled rows, a summary (growth per video-minute, whether the device
bytes are flat once the window / budget is full), a table of per-frame and compression
times, ``--json PATH`` and ``--plot PATH`` (matplotlib).

    python benchmarks/long_stream_memory.py --minutes 3 --every 30          # short check
    python benchmarks/long_stream_memory.py --json out.json --plot out.png  # 30 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from streampress import BudgetMemory, RetrievalMemory, SlidingWindow, load_model  # noqa: E402
from streampress.session import StreamingSession  # noqa: E402

MIB = 1 << 20
POLICIES = ("full", "window", "retrieval", "infinipot", "hermes")
BUDGET_METHODS = {"infinipot": "infinipot_v", "hermes": "hermes"}


def loop_frames(args) -> np.ndarray:
    """The clip that is looped: ``--video`` decoded at ``--fps`` (first ``--loop`` frames,
    resized), else the built-in synthetic video."""
    size = args.size
    if args.video:
        from streampress.video import open_video

        images = [f.image for _, f in zip(range(args.loop), open_video(args.video, fps=args.fps))]
        if not images:
            raise SystemExit(f"no frames decoded from {args.video}")
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    from streampress.bench.synthetic import synthetic_video

    frames, _ = synthetic_video(num_frames=args.loop, size=(size, size), fps=args.fps)
    return frames


def policies(args) -> dict:
    table = {"full": "full", "window": SlidingWindow(seconds=args.window),
             "retrieval": RetrievalMemory(window_seconds=args.window, top_k=args.top_k)}
    for name, method in BUDGET_METHODS.items():
        if name in args.policies:
            try:
                table[name] = BudgetMemory(method=method, budget=args.budget)
            except ValueError as exc:
                raise SystemExit(f"--budget: {exc}") from exc
    return {name: table[name] for name in args.policies}


def tokens_per_item(model, clip: np.ndarray, fps: float) -> int:
    """Visual tokens of one item (``frames_per_item`` frames), from a one-item probe stream."""
    probe = StreamingSession(model, memory="full")
    n = model.frames_per_item
    probe.add_frames(clip[np.arange(n) % len(clip)], np.arange(n) / fps)
    tokens = int(probe.stats()["visual_tokens_kept"])
    del probe
    return tokens


def build_model(args):
    """``--model`` through ``load_model``; random Qwen architectures with ``--hidden`` > 0 get
    their LLM width reduced (head dim and KV heads kept, so KV bytes per token are real)."""
    kw = dict(num_layers=args.num_layers, vision_depth=args.vision_depth) if args.model.startswith("random:") else {}
    narrow = args.model.startswith("random:qwen") and args.hidden
    if args.model.startswith("random:qwen"):
        kw["min_pixels"] = args.size * args.size  # keep small frames small
    if narrow:
        kw.update(hidden_size=args.hidden, vocab_size=1024)
    try:
        model = load_model(args.model, dtype=args.dtype, device=args.device, **kw)
    except ValueError as exc:
        if narrow and "hidden_size" in str(exc):
            raise SystemExit(f"--hidden: {exc}") from exc
        raise
    if narrow:
        model.name = f"{args.model} (hidden {args.hidden})"
    return model


class SharedEncoder:
    """The adapter, except that ``encode`` is served from a cache keyed by ``key`` (set by the
    driver per chunk), so the vision tower runs once per chunk for all policies."""

    def __init__(self, adapter):
        self._adapter = adapter
        self.key, self._cached = None, {}  # key -> output, for the keys of the current sample
        self.encode_seconds = 0.0

    def __getattr__(self, name):
        return getattr(self._adapter, name)

    def clear(self) -> None:
        self._cached = {}

    def encode(self, batch, cacher_state=None, cacher=None):
        if self.key is None or self.key not in self._cached:
            t0 = time.perf_counter()
            out = self._adapter.encode(batch, cacher_state=cacher_state, cacher=cacher)
            self.encode_seconds += time.perf_counter() - t0
            if self.key is None:
                return out
            self._cached[self.key] = out
        return self._cached[self.key]


class PolicyRun:
    """One policy's stream: ``step(frames, times)`` per chunk, then ``finish(question)``."""

    def __init__(self, model, memory, fps: float):
        self.model, self.fps, self.frames = model, fps, 0
        cuda = model.device.type == "cuda"
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(model.device)
        self.baseline = torch.cuda.memory_allocated(model.device) if cuda else 0
        self.session = StreamingSession(model, memory=memory)
        self.rows, self.seconds, self.calls = [], 0.0, 0

    def clock(self) -> float:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        return time.perf_counter()

    def device_bytes(self, stats: dict) -> int:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
            return torch.cuda.memory_allocated(self.model.device) - self.baseline
        return int(stats["kv_cache_bytes"]) + int(stats.get("slot_table_bytes", 0))  # the table is device-resident

    def step(self, calls: list) -> dict:
        """``calls``: ``(key, frames, times)`` per ``add_frames`` call of this sample."""
        for key, frames, times in calls:
            if isinstance(self.model, SharedEncoder):
                self.model.key = key
            shared = getattr(self.model, "encode_seconds", 0.0)
            t0 = self.clock()
            self.session.add_frames(frames, times)
            self.seconds += self.clock() - t0 - (getattr(self.model, "encode_seconds", 0.0) - shared)
            self.frames += len(frames)
            self.calls += 1
        s = self.session.stats()
        self.rows.append({"video_seconds": self.frames / self.fps,
                          "device_bytes": self.device_bytes(s),
                          "kv_cache_bytes": s["kv_cache_bytes"], "kv_cache_tokens": s["kv_cache_tokens"],
                          "cpu_offloaded_bytes": s.get("offloaded_bytes", 0) + s.get("summary_bytes", 0),
                          "wall_seconds": self.seconds})
        if "compressions" in s:
            self.rows[-1].update(visual_slots=s["visual_slots"], slot_table_bytes=s["slot_table_bytes"],
                                 compressions=s["compressions"], compress_seconds=s["compress_seconds"])
        if self.model.device.type == "cuda":
            self.rows[-1]["peak_device_bytes"] = torch.cuda.max_memory_allocated(self.model.device) - self.baseline
        return self.rows[-1]

    def finish(self, question: str, max_new_tokens: int) -> dict:
        cuda = self.model.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.model.device)
        t0 = time.perf_counter()
        answer = self.session.ask(question, max_new_tokens=max_new_tokens)
        s = self.session.stats()
        result = {"rows": self.rows, "stream_seconds": self.seconds, "answer_seconds": time.perf_counter() - t0,
                  "frames": self.frames, "add_frames_calls": self.calls,
                  "answer_tokens": answer.token_ids, "items": s["items"], "visual_tokens": s["visual_tokens_kept"],
                  "retrieved_blocks_per_layer": s.get("retrieved_blocks_last"),
                  "retrieved_tokens_per_layer": s.get("retrieved_tokens_last"),
                  "offloaded_blocks": s.get("offloaded_blocks", 0)}
        if cuda:
            result["answer_peak_device_bytes"] = torch.cuda.max_memory_allocated(self.model.device) - self.baseline
        if "compressions" in s:
            result.update(budget=s["budget"], budget_method=s["budget_method"], visual_slots=s["visual_slots"],
                          compressions=s["compressions"], compress_seconds=s["compress_seconds"],
                          evicted_items=s.get("evicted_items"), evicted_tokens=s.get("evicted_tokens"))
        self.session = None
        return result


def run_all(model, memories: dict, clip: np.ndarray, args) -> tuple[dict, float | None]:
    """CPU: all policies in lockstep with a shared encoder (returns its seconds, which the
    policies' add_frames times exclude); CUDA: one policy after another (None)."""
    total = int(round(args.minutes * 60 * args.fps))
    fpi = model.frames_per_item
    chunk = max(fpi, int(round(args.every * args.fps)))
    chunk -= chunk % fpi
    call = chunk if args.chunk is None else max(fpi, int(round(args.chunk * args.fps)))
    call -= call % fpi
    starts = list(range(0, total, chunk))

    def frames_at(start):
        end = min(start + chunk, total)
        out = []
        for s in range(start, end, call):
            idx = np.arange(s, min(s + call, end))
            out.append((s, clip[idx % len(clip)], idx / args.fps))
        return out

    def report(name, row):
        if args.progress:
            print(f"  {name:9s} {row['video_seconds'] / 60:6.1f} min  device {row['device_bytes'] / MIB:9.1f} MiB  "
                  f"cpu {row['cpu_offloaded_bytes'] / MIB:9.1f} MiB  {row['wall_seconds']:7.1f} s",
                  file=sys.stderr, flush=True)

    results = {}
    if model.device.type == "cuda":
        for name, memory in memories.items():
            run = PolicyRun(model, memory, args.fps)
            for start in starts:
                report(name, run.step(frames_at(start)))
            results[name] = run.finish(args.question, args.max_new_tokens)
        return results, None
    shared = SharedEncoder(model)
    runs = {name: PolicyRun(shared, memory, args.fps) for name, memory in memories.items()}
    for start in starts:
        shared.clear()
        calls = frames_at(start)
        for name, run in runs.items():
            report(name, run.step(calls))
    return {name: run.finish(args.question, args.max_new_tokens) for name, run in runs.items()}, shared.encode_seconds


def summarize(name: str, result: dict, window: float) -> dict:
    """``window``: video-seconds after which the policy's memory is full (the window, or the
    budget's worth of video for the budget policies)."""
    rows = result["rows"]
    t = np.array([r["video_seconds"] for r in rows])
    dev = np.array([r["device_bytes"] for r in rows], dtype=np.float64)
    filled = t > window + 1e-9  # samples taken after the window filled
    fit = filled if filled.sum() >= 2 else np.ones_like(filled)
    slope = float(np.polyfit(t[fit] / 60, dev[fit], 1)[0]) if fit.sum() >= 2 else 0.0
    after = dev[filled] if filled.any() else dev[-1:]
    peak = {}
    if "peak_device_bytes" in rows[-1]:
        peak["peak_device_mib"] = max(r["peak_device_bytes"] for r in rows) / MIB
        if "answer_peak_device_bytes" in result:
            peak["answer_peak_device_mib"] = result["answer_peak_device_bytes"] / MIB
    frames = result.get("frames") or 1
    out = {"policy": name, **peak, "final_device_mib": dev[-1] / MIB,
           "device_growth_mib_per_min": round(slope / MIB, 4) + 0.0,  # + 0.0: no "-0.00"
           "flat_after_window": bool(after.max() - after.min() <= 0.01 * max(after.max(), 1)),
           "final_cpu_mib": rows[-1]["cpu_offloaded_bytes"] / MIB,
           "stream_seconds": result["stream_seconds"], "answer_seconds": result["answer_seconds"],
           "ms_per_frame": 1e3 * result["stream_seconds"] / frames, "final_kv_tokens": rows[-1]["kv_cache_tokens"],
           "add_frames_calls": result.get("add_frames_calls")}
    if "compressions" in result:
        n, sec = result["compressions"], result["compress_seconds"]
        per = 1e3 * sec / n if n else None
        slots = [r["visual_slots"] for r in rows]
        out.update(budget=result["budget"], full_after_video_s=window, visual_slots=result["visual_slots"],
                   max_visual_slots=max(slots), within_budget=max(slots) <= result["budget"],
                   compressions=n, compress_seconds=sec, ms_per_compression=per,
                   compression_over_frame_time=per / out["ms_per_frame"] if per and out["ms_per_frame"] else None,
                   compression_share_of_stream=sec / result["stream_seconds"] if result["stream_seconds"] else None)
    return out


def markdown(results: dict, summary: list, config: dict, max_rows: int) -> str:
    names = list(results)
    rows = results[names[0]]["rows"]
    pick = np.unique(np.linspace(0, len(rows) - 1, min(max_rows, len(rows))).round().astype(int))
    head = ["video (min)"] + [f"{n} device MiB" for n in names]
    if "retrieval" in results:
        head.append("retrieval CPU MiB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for i in pick:
        cells = [f"{rows[i]['video_seconds'] / 60:.1f}"]
        cells += [f"{results[n]['rows'][i]['device_bytes'] / MIB:.1f}" for n in names]
        if "retrieval" in results:
            cells.append(f"{results['retrieval']['rows'][i]['cpu_offloaded_bytes'] / MIB:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    peak = all("peak_device_mib" in s for s in summary)
    lines += ["", "| policy | final device MiB | device growth once full MiB/min | flat once full (window / budget) | "
                  "CPU MiB | add_frames s | answer s |" + (" peak device MiB (stream / answer) |" if peak else ""),
              "|---|---:|---:|:---:|---:|---:|---:|" + ("---:|" if peak else "")]
    for s in summary:
        lines.append(f"| {s['policy']} | {s['final_device_mib']:.1f} | {s['device_growth_mib_per_min']:.2f} | "
                     f"{'yes' if s['flat_after_window'] else 'no'} | {s['final_cpu_mib']:.1f} | "
                     f"{s['stream_seconds']:.0f} | {s['answer_seconds']:.2f} |"
                     + (f" {s['peak_device_mib']:.1f} / {s.get('answer_peak_device_mib', float('nan')):.1f} |"
                        if peak else ""))
    lines += ["", "| policy | KV tokens (final) | visual slots / layer: max sampled (within budget) "
                  "| add_frames calls | ms / frame | compressions | ms / compression "
                  "| one compression / frame time | compression share of add_frames |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        if "compressions" in s:
            per, rel, share = s["ms_per_compression"], s["compression_over_frame_time"], \
                s["compression_share_of_stream"]
            comp = (f"{s['compressions']} | {'-' if per is None else f'{per:.1f}'} | "
                    f"{'-' if rel is None else f'{rel:.2f}x'} | {'-' if share is None else f'{100 * share:.1f} %'}")
            name = f"{s['policy']} (budget {s['budget']})"
            slots = f"{s['max_visual_slots']} ({'yes' if s['within_budget'] else 'NO'})"
        else:
            comp, name, slots = "- | - | - | -", s["policy"], "-"
        lines.append(f"| {name} | {s['final_kv_tokens']} | {slots} | {s['add_frames_calls']} | "
                     f"{s['ms_per_frame']:.1f} | {comp} |")
    cfg = ", ".join(f"{k}={v}" for k, v in config.items())
    return "\n".join(lines) + f"\n\nConfiguration: {cfg}\n"


def plot(results: dict, path: str, config: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"full": dict(lw=2), "window": dict(lw=4, ls=":", alpha=0.8), "retrieval": dict(lw=1.8),
             "infinipot": dict(lw=1.5, ls="-."), "hermes": dict(lw=1.5, ls="--")}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, res in results.items():
        t = [r["video_seconds"] / 60 for r in res["rows"]]
        label = f"{name} (budget {config['budget']}): device" if name in BUDGET_METHODS else f"{name}: device"
        ax.plot(t, [r["device_bytes"] / MIB for r in res["rows"]], label=label, **style.get(name, {}))
        if name == "retrieval":
            ax.plot(t, [r["cpu_offloaded_bytes"] / MIB for r in res["rows"]], "--", label="retrieval: CPU (offloaded)")
    ax.set_xlabel("video time (minutes, 1 fps)")
    ax.set_ylabel("MiB (device: " + ("memory_allocated)" if config["device"].startswith("cuda")
                                     else "live KV cache)"))
    ax.set_title(f"KV memory over a long stream ({config['model']}, {config['device']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="random:qwen2.5-vl-7b")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512, help="LLM width of a random Qwen model (0: real)")
    p.add_argument("--vision-depth", type=int, default=1)
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--device", default=None)
    p.add_argument("--video", default=None, help="a video file to loop (default: synthetic)")
    p.add_argument("--loop", type=int, default=120, help="frames in the looped clip")
    p.add_argument("--size", type=int, default=112, help="square frame side in pixels")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--fps", type=float, default=1.0)
    p.add_argument("--every", type=float, default=60.0, help="video-seconds between samples")
    p.add_argument("--chunk", type=float, default=None,
                   help="video-seconds per add_frames call (default: --every, one call per sample)")
    p.add_argument("--window", type=float, default=60.0, help="seconds of recent video kept live")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--budget", type=int, default=None,
                   help="visual tokens per layer (and KV head) of infinipot / hermes (default: the window's "
                        "visual token count, window * fps / frames per item * tokens per item)")
    p.add_argument("--policies", default=",".join(POLICIES), help=f"some of {','.join(POLICIES)}")
    p.add_argument("--question", default="What happened at the beginning of the video?")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--rows", type=int, default=11, help="rows in the Markdown table")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--plot", default=None, metavar="PATH")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    args.policies = [s.strip() for s in args.policies.split(",") if s.strip()]
    unknown = sorted(set(args.policies) - set(POLICIES))
    if unknown:
        raise SystemExit(f"--policies: unknown {unknown}; expected some of {list(POLICIES)}")
    if args.chunk is not None and args.chunk > args.every:
        raise SystemExit("--chunk must not exceed --every")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = build_model(args)
    model_bytes = torch.cuda.memory_allocated(model.device) if model.device.type == "cuda" else None
    clip = loop_frames(args)
    per_item = tokens_per_item(model, clip, args.fps)
    window_items = int(round(args.window * args.fps / model.frames_per_item))
    if args.budget is None:
        args.budget = window_items * per_item
    budget_seconds = args.budget // per_item * model.frames_per_item / args.fps  # video held at the budget
    text = model.hf_model.config.text_config
    config = {"model": getattr(model, "name", args.model), "llm_layers": text.num_hidden_layers,
              "llm_hidden": text.hidden_size, "kv_heads": text.num_key_value_heads,
              "head_dim": text.hidden_size // text.num_attention_heads, "vision_blocks": args.vision_depth,
              "dtype": str(model.dtype).replace("torch.", ""), "device": str(model.device),
              "frame": f"{args.size}x{args.size}", "fps": args.fps, "minutes": args.minutes,
              "window_s": args.window, "top_k": args.top_k, "budget": args.budget, "tokens_per_item": per_item,
              "every_s": args.every, "chunk_s": args.chunk if args.chunk is not None else args.every,
              "video": args.video or f"synthetic loop of {args.loop}",
              "host": platform.processor() or platform.machine(), "threads": args.threads,
              "torch": torch.__version__}
    if model_bytes is not None:
        config.update(gpu=torch.cuda.get_device_name(model.device), model_device_mib=round(model_bytes / MIB, 1))
    results, encoder_seconds = run_all(model, policies(args), clip, args)
    if encoder_seconds is not None:
        config["shared_encoder_seconds"] = round(encoder_seconds, 1)
    config["total_seconds"] = round(time.perf_counter() - t0, 1)
    summary = [summarize(n, r, budget_seconds if n in BUDGET_METHODS else args.window) for n, r in results.items()]
    print(markdown(results, summary, config, args.rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": config, "summary": summary, "results": results}, f, indent=1)
    if args.plot:
        plot(results, args.plot, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
