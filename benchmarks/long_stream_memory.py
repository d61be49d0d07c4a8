"""Device memory over a long stream: full cache vs sliding window vs retrieval memory.

Streams a long video (a looped synthetic clip by default, or a looped real video) at 1 fps
through a reduced-size model with random weights and records, every ``--every``
video-seconds, for each memory policy:

- device bytes: on CUDA ``torch.cuda.memory_allocated()`` minus what the model held before
  the stream; on CPU the bytes of the live KV cache (what would sit on an accelerator);
- CPU bytes held by the retrieval memory's offloaded blocks and summary keys;
- on CUDA also the peak: ``torch.cuda.max_memory_allocated()`` minus the same baseline,
  since the policy's stream began (``peak_device_bytes`` per row, ``peak_device_mib`` in the
  summary and a column of the policy table), and the model's own bytes (``model_device_mib``).

Default model: the Qwen2.5-VL-7B architecture with its KV geometry per layer (4 KV heads x
head dim 128, so KV bytes per token and layer are the 7B's) in 2 LLM layers, its vision
block shapes in 1 vision block, and the LLM's hidden size reduced to ``--hidden`` (512: 4
query heads, MLP 2x hidden) so that a 30-minute stream fits a CPU; ``--hidden 0`` keeps
the real 3584-wide layers. 112x112 frames: 4x4 = 16 visual tokens per temporal patch of 2
frames. On CPU the policies run in lockstep, chunk by chunk, and share the vision tower's
output (it is the same for all); on CUDA they run one after another so that
``memory_allocated`` belongs to one stream.

At the end each policy answers one question (retrieval: top-k blocks per layer). Output:
a Markdown table of sampled rows, a summary (growth per video-minute, whether the device
bytes are flat once the window is full), ``--json PATH`` and ``--plot PATH`` (matplotlib).

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

from streampress import RetrievalMemory, SlidingWindow, load_model  # noqa: E402
from streampress.session import StreamingSession  # noqa: E402

MIB = 1 << 20


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
    unknown = set(args.policies) - set(table)
    if unknown:
        raise SystemExit(f"--policies: unknown {sorted(unknown)}; expected some of {sorted(table)}")
    return {name: table[name] for name in args.policies}


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
        self.key, self._cached = None, (None, None)
        self.encode_seconds = 0.0

    def __getattr__(self, name):
        return getattr(self._adapter, name)

    def encode(self, batch, cacher_state=None, cacher=None):
        if self._cached[0] != self.key or self.key is None:
            t0 = time.perf_counter()
            self._cached = (self.key, self._adapter.encode(batch, cacher_state=cacher_state, cacher=cacher))
            self.encode_seconds += time.perf_counter() - t0
        return self._cached[1]


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
        self.rows, self.seconds = [], 0.0

    def device_bytes(self, stats: dict) -> int:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
            return torch.cuda.memory_allocated(self.model.device) - self.baseline
        return int(stats["kv_cache_bytes"])

    def step(self, frames: np.ndarray, times: np.ndarray) -> dict:
        shared = getattr(self.model, "encode_seconds", 0.0)
        t0 = time.perf_counter()
        self.session.add_frames(frames, times)
        self.seconds += time.perf_counter() - t0 - (getattr(self.model, "encode_seconds", 0.0) - shared)
        s = self.session.stats()
        self.frames += len(frames)
        self.rows.append({"video_seconds": self.frames / self.fps,
                          "device_bytes": self.device_bytes(s),
                          "kv_cache_bytes": s["kv_cache_bytes"], "kv_cache_tokens": s["kv_cache_tokens"],
                          "cpu_offloaded_bytes": s.get("offloaded_bytes", 0) + s.get("summary_bytes", 0),
                          "wall_seconds": self.seconds})
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
                  "answer_tokens": answer.token_ids, "items": s["items"], "visual_tokens": s["visual_tokens_kept"],
                  "retrieved_blocks_per_layer": s.get("retrieved_blocks_last"),
                  "retrieved_tokens_per_layer": s.get("retrieved_tokens_last"),
                  "offloaded_blocks": s.get("offloaded_blocks", 0)}
        if cuda:
            result["answer_peak_device_bytes"] = torch.cuda.max_memory_allocated(self.model.device) - self.baseline
        self.session = None
        return result


def run_all(model, memories: dict, clip: np.ndarray, args) -> tuple[dict, float | None]:
    """CPU: all policies in lockstep with a shared encoder (returns its seconds, which the
    policies' add_frames times exclude); CUDA: one policy after another (None)."""
    total = int(round(args.minutes * 60 * args.fps))
    chunk = max(model.frames_per_item, int(round(args.every * args.fps)))
    chunk -= chunk % model.frames_per_item
    starts = list(range(0, total, chunk))

    def frames_at(start):
        idx = np.arange(start, min(start + chunk, total))
        return clip[idx % len(clip)], idx / args.fps

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
                report(name, run.step(*frames_at(start)))
            results[name] = run.finish(args.question, args.max_new_tokens)
        return results, None
    shared = SharedEncoder(model)
    runs = {name: PolicyRun(shared, memory, args.fps) for name, memory in memories.items()}
    for start in starts:
        shared.key = start
        for name, run in runs.items():
            report(name, run.step(*frames_at(start)))
    return {name: run.finish(args.question, args.max_new_tokens) for name, run in runs.items()}, shared.encode_seconds


def summarize(name: str, result: dict, window: float) -> dict:
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
    return {"policy": name, **peak, "final_device_mib": dev[-1] / MIB,
            "device_growth_mib_per_min": round(slope / MIB, 4) + 0.0,  # + 0.0: no "-0.00"
            "flat_after_window": bool(after.max() - after.min() <= 0.01 * max(after.max(), 1)),
            "final_cpu_mib": rows[-1]["cpu_offloaded_bytes"] / MIB,
            "stream_seconds": result["stream_seconds"], "answer_seconds": result["answer_seconds"]}


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
    lines += ["", "| policy | final device MiB | device growth after window MiB/min | flat after window | "
                  "CPU MiB | add_frames s | answer s |" + (" peak device MiB (stream / answer) |" if peak else ""),
              "|---|---:|---:|:---:|---:|---:|---:|" + ("---:|" if peak else "")]
    for s in summary:
        lines.append(f"| {s['policy']} | {s['final_device_mib']:.1f} | {s['device_growth_mib_per_min']:.2f} | "
                     f"{'yes' if s['flat_after_window'] else 'no'} | {s['final_cpu_mib']:.1f} | "
                     f"{s['stream_seconds']:.0f} | {s['answer_seconds']:.2f} |"
                     + (f" {s['peak_device_mib']:.1f} / {s.get('answer_peak_device_mib', float('nan')):.1f} |"
                        if peak else ""))
    cfg = ", ".join(f"{k}={v}" for k, v in config.items())
    return "\n".join(lines) + f"\n\nConfiguration: {cfg}\n"


def plot(results: dict, path: str, config: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"full": dict(lw=2), "window": dict(lw=4, ls=":", alpha=0.8), "retrieval": dict(lw=1.8)}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, res in results.items():
        t = [r["video_seconds"] / 60 for r in res["rows"]]
        ax.plot(t, [r["device_bytes"] / MIB for r in res["rows"]], label=f"{name}: device", **style.get(name, {}))
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
    p.add_argument("--every", type=float, default=60.0, help="video-seconds between samples (one add_frames call)")
    p.add_argument("--window", type=float, default=60.0, help="seconds of recent video kept live")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--policies", default="full,window,retrieval")
    p.add_argument("--question", default="What happened at the beginning of the video?")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--rows", type=int, default=11, help="rows in the Markdown table")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--plot", default=None, metavar="PATH")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    args.policies = [s.strip() for s in args.policies.split(",") if s.strip()]
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = build_model(args)
    model_bytes = torch.cuda.memory_allocated(model.device) if model.device.type == "cuda" else None
    clip = loop_frames(args)
    text = model.hf_model.config.text_config
    config = {"model": getattr(model, "name", args.model), "llm_layers": text.num_hidden_layers,
              "llm_hidden": text.hidden_size, "kv_heads": text.num_key_value_heads,
              "head_dim": text.hidden_size // text.num_attention_heads, "vision_blocks": args.vision_depth,
              "dtype": str(model.dtype).replace("torch.", ""), "device": str(model.device),
              "frame": f"{args.size}x{args.size}", "fps": args.fps, "minutes": args.minutes,
              "window_s": args.window, "top_k": args.top_k, "video": args.video or f"synthetic loop of {args.loop}",
              "host": platform.processor() or platform.machine(), "threads": args.threads}
    if model_bytes is not None:
        config.update(gpu=torch.cuda.get_device_name(model.device), model_device_mib=round(model_bytes / MIB, 1))
    results, encoder_seconds = run_all(model, policies(args), clip, args)
    if encoder_seconds is not None:
        config["shared_encoder_seconds"] = round(encoder_seconds, 1)
    config["total_seconds"] = round(time.perf_counter() - t0, 1)
    summary = [summarize(n, r, args.window) for n, r in results.items()]
    print(markdown(results, summary, config, args.rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": config, "summary": summary, "results": results}, f, indent=1)
    if args.plot:
        plot(results, args.plot, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
