"""Device memory over a long stream: full cache vs sliding window vs retrieval memory.

Streams a long video (a looped synthetic clip by default, or a looped real video) at 1 fps
through a reduced-size model with random weights -- by default the Qwen2.5-VL-7B
architecture (real layer shapes: hidden 3584, 28 query / 4 KV heads, head dim 128, MLP
18944) cut to 2 LLM layers and 1 vision block, 112x112 frames (4x4 = 16 visual tokens per
temporal patch of 2 frames) -- once per memory policy, and records every ``--every``
video-seconds:

- device bytes: on CUDA ``torch.cuda.memory_allocated()`` minus what the model held before
  the stream; on CPU the bytes of the live KV cache (what would sit on an accelerator);
- CPU bytes held by the retrieval memory's offloaded blocks and summary keys.

At the end each policy answers one question (retrieval: top-k blocks per layer). Output:
a Markdown table of sampled rows, a summary (growth per video-minute, whether the device
bytes are flat once the window is full), ``--json PATH`` and ``--plot PATH`` (matplotlib).

    python benchmarks/long_stream_memory.py --minutes 2 --every 30      # short check
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


def device_bytes(model, stats: dict, baseline: int) -> int:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
        return torch.cuda.memory_allocated(model.device) - baseline
    return int(stats["kv_cache_bytes"])


def run_policy(model, memory, clip: np.ndarray, args) -> dict:
    total = int(round(args.minutes * 60 * args.fps))
    chunk = max(model.frames_per_item, int(round(args.every * args.fps)))
    chunk -= chunk % model.frames_per_item
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated(model.device)
    else:
        baseline = 0
    session = StreamingSession(model, memory=memory)
    rows, t0, done = [], time.perf_counter(), 0
    while done < total:
        n = min(chunk, total - done)
        idx = np.arange(done, done + n)
        session.add_frames(clip[idx % len(clip)], idx / args.fps)
        done += n
        s = session.stats()
        rows.append({"video_seconds": done / args.fps, "device_bytes": device_bytes(model, s, baseline),
                     "kv_cache_bytes": s["kv_cache_bytes"], "kv_cache_tokens": s["kv_cache_tokens"],
                     "cpu_offloaded_bytes": s.get("offloaded_bytes", 0) + s.get("summary_bytes", 0),
                     "wall_seconds": time.perf_counter() - t0})
        if args.progress:
            print(f"  {done / args.fps / 60:6.1f} min  device {rows[-1]['device_bytes'] / MIB:9.1f} MiB  "
                  f"cpu {rows[-1]['cpu_offloaded_bytes'] / MIB:9.1f} MiB", file=sys.stderr, flush=True)
    stream_seconds = time.perf_counter() - t0
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    t1 = time.perf_counter()
    answer = session.ask(args.question, max_new_tokens=args.max_new_tokens)
    s = session.stats()
    result = {"rows": rows, "stream_seconds": stream_seconds, "answer_seconds": time.perf_counter() - t1,
              "answer_tokens": answer.token_ids, "items": s["items"], "visual_tokens": s["visual_tokens_kept"],
              "retrieved_blocks_per_layer": s.get("retrieved_blocks_last"),
              "retrieved_tokens_per_layer": s.get("retrieved_tokens_last"),
              "offloaded_blocks": s.get("offloaded_blocks", 0)}
    if model.device.type == "cuda":
        result["answer_peak_device_bytes"] = torch.cuda.max_memory_allocated(model.device) - baseline
    del session
    return result


def summarize(name: str, result: dict, window: float) -> dict:
    rows = result["rows"]
    t = np.array([r["video_seconds"] for r in rows])
    dev = np.array([r["device_bytes"] for r in rows], dtype=np.float64)
    slope = float(np.polyfit(t / 60, dev, 1)[0]) if len(rows) > 1 else 0.0
    after = dev[t > window + 60] if np.any(t > window + 60) else dev[-1:]
    return {"policy": name, "final_device_mib": dev[-1] / MIB, "device_growth_mib_per_min": slope / MIB,
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
    lines += ["", "| policy | final device MiB | device growth MiB/min | flat after window | CPU MiB | "
                  "stream s | answer s |", "|---|---:|---:|:---:|---:|---:|---:|"]
    for s in summary:
        lines.append(f"| {s['policy']} | {s['final_device_mib']:.1f} | {s['device_growth_mib_per_min']:.2f} | "
                     f"{'yes' if s['flat_after_window'] else 'no'} | {s['final_cpu_mib']:.1f} | "
                     f"{s['stream_seconds']:.0f} | {s['answer_seconds']:.2f} |")
    cfg = ", ".join(f"{k}={v}" for k, v in config.items())
    return "\n".join(lines) + f"\n\nConfiguration: {cfg}\n"


def plot(results: dict, path: str, config: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, res in results.items():
        t = [r["video_seconds"] / 60 for r in res["rows"]]
        ax.plot(t, [r["device_bytes"] / MIB for r in res["rows"]], label=f"{name}: device", lw=2)
        if name == "retrieval":
            ax.plot(t, [r["cpu_offloaded_bytes"] / MIB for r in res["rows"]], "--", label="retrieval: CPU (offloaded)")
    ax.set_xlabel("video time (minutes, 1 fps)")
    ax.set_ylabel("MiB")
    ax.set_title(f"KV memory over a long stream ({config['model']}, {config['device']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="random:qwen2.5-vl-7b")
    p.add_argument("--num-layers", type=int, default=2)
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
    kw = {}
    if args.model.startswith("random:"):
        kw = dict(num_layers=args.num_layers, vision_depth=args.vision_depth)
        if "qwen" in args.model:
            kw["min_pixels"] = args.size * args.size  # keep small frames small
    model = load_model(args.model, dtype=args.dtype, device=args.device, **kw)
    clip = loop_frames(args)
    config = {"model": args.model, "llm_layers": args.num_layers, "vision_blocks": args.vision_depth,
              "dtype": str(model.dtype).replace("torch.", ""), "device": str(model.device),
              "frame": f"{args.size}x{args.size}", "fps": args.fps, "minutes": args.minutes,
              "window_s": args.window, "top_k": args.top_k, "video": args.video or f"synthetic loop of {args.loop}",
              "host": platform.processor() or platform.machine(), "threads": args.threads}
    results = {}
    for name, memory in policies(args).items():
        if args.progress:
            print(f"{name}:", file=sys.stderr, flush=True)
        results[name] = run_policy(model, memory, clip, args)
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
