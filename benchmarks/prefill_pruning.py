"""Prefill time per temporal patch: dense streaming session vs StreamingAssistant pruning.

Qwen2.5-VL-7B architecture with random weights (real layer shapes; on CPU cut to a few
LLM and vision layers, on CUDA the whole model by default), fed a real clip at 1 fps with
448x448 frames, one temporal patch (2 frames) per ``add_frames`` call. Both sessions run
in one process, item by item in turn, on the same encoder output (the vision tower runs
once per item and is not part of the measurement). Reported: median prefill seconds per
temporal patch for each, the kept-token fraction, their ratio, and the acceptance
criterion ``ratio <= kept fraction + 0.2`` (``--margin``), for the paper operating point (tau_t = tau_s
= 0.2) and for a matched budget (``keep_ratio``, default 0.1: random weights make
consecutive grids nearly identical, so the threshold rule drops almost every later grid).

    python benchmarks/prefill_pruning.py                      # defaults for this machine
    python benchmarks/prefill_pruning.py --seconds 12 --json  # short check
    python benchmarks/prefill_pruning.py --keep-ratio 0.1 0.25 --margin 0.1 --ask 3 --json-file out.json  # GPU run

``--keep-ratio`` takes several budgets (one session each); ``--margin`` sets the criterion
``ratio <= kept fraction + margin`` (default 0.2); ``--ask N`` then asks every session the
question N times, interleaved (one answer token each), and reports the median time to the
first answer token.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from streampress import create_pruner, load_model  # noqa: E402
from streampress.session import StreamingSession  # noqa: E402

DEFAULT_VIDEOS = sorted(glob.glob(os.path.join(ROOT, "..", "shared", "data", "videos", "*.mp4")))


class SharedEncoder:
    """Delegates to an adapter but serves ``encode`` from the dense session's last call, so
    the vision tower runs once per item for both sessions (only prefill is compared)."""

    def __init__(self, adapter):
        self._adapter = adapter
        self.last = None

    def __getattr__(self, name):
        return getattr(self._adapter, name)

    def encode(self, batch, cacher_state=None, cacher=None):
        if self.last is None:
            self.last = self._adapter.encode(batch)
        return self.last

    def take(self):
        out, self.last = self.last, None
        return out


def decode(path: str, fps: float, size: int, seconds: float) -> tuple[np.ndarray, list[float]]:
    """Frames ``[F, size, size, 3]`` uint8 sampled at ``fps`` for at most ``seconds``."""
    frames, times = [], []
    try:
        from streampress.video import open_video

        for frame in open_video(path, fps=fps, size=(size, size)):
            if frame.timestamp >= seconds:
                break
            frames.append(frame.image)
            times.append(float(frame.timestamp))
    except ImportError:  # the video module is optional here: PyAV directly
        import av

        with av.open(path) as container:
            next_tick = 0.0
            for frame in container.decode(video=0):
                t = float(frame.time or 0.0)
                if t >= seconds:
                    break
                if t + 1e-6 >= next_tick:
                    frames.append(frame.to_ndarray(format="rgb24", width=size, height=size))
                    times.append(t)
                    next_tick += 1.0 / fps
    if len(frames) < 4:
        raise SystemExit(f"{path}: fewer than 4 frames decoded in {seconds} s at {fps} fps")
    n = len(frames) // 2 * 2
    return np.stack(frames[:n]), times[:n]


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    extra = {k: v for k, v in (("hidden_size", args.hidden), ("min_pixels", args.min_pixels)) if v}
    adapter = load_model("random:qwen2.5-vl-7b", dtype=dtype, device=device, num_layers=args.num_layers,
                         vision_depth=args.vision_depth, vocab_size=args.vocab_size, **extra)
    build_s = time.perf_counter() - t0
    frames, times = decode(args.video, args.fps, args.size, args.seconds)
    shared = SharedEncoder(adapter)
    sessions = {"dense": StreamingSession(shared)}
    sessions[f"streaming_assistant(tau_t={args.tau_t}, tau_s={args.tau_s})"] = StreamingSession(
        shared, pruner=create_pruner("streaming_assistant", tau_t=args.tau_t, tau_s=args.tau_s))
    for ratio in [r for r in args.keep_ratio if r]:
        sessions[f"streaming_assistant(keep_ratio={ratio})"] = StreamingSession(
            shared, pruner=create_pruner("streaming_assistant", keep_ratio=ratio))
    per_item = {name: [] for name in sessions}
    kept_item = {name: [] for name in sessions}
    for i in range(0, len(frames), 2):
        for name, session in sessions.items():
            before = session.stats()
            session.add_frames(frames[i:i + 2], times[i:i + 2])
            after = session.stats()
            per_item[name].append(after["prefill_seconds"] - before["prefill_seconds"])
            kept_item[name].append(after["visual_tokens_kept"] - before["visual_tokens_kept"])
        shared.take()
    ttft = {name: [] for name in sessions}
    for _ in range(args.ask):  # interleaved, so a busy machine slows every session alike
        for name, session in sessions.items():
            ttft[name].append(session.ask(args.question, max_new_tokens=1).time_to_first_token)
    skip = min(args.warmup, len(per_item["dense"]) - 1)
    dense_ms = 1e3 * statistics.median(per_item["dense"][skip:])
    rows = []
    for name, session in sessions.items():
        st = session.stats()
        ms = 1e3 * statistics.median(per_item[name][skip:])
        kept, ratio = st["kept_fraction"], ms / dense_ms
        timed = kept_item[name][skip:]
        rows.append({"session": name, "kept_fraction": kept, "prefill_ms_median": ms, "ratio": ratio,
                     "kept_fraction_timed": sum(timed) / (len(timed) * kept_item["dense"][0]),
                     "passes": None if name == "dense" else ratio <= kept + args.margin,
                     "kv_cache_tokens": st["kv_cache_tokens"],
                     "prefill_ms_per_item": [round(1e3 * v, 3) for v in per_item[name]]})
        if args.ask:
            rows[-1]["ttft_ms_median"] = 1e3 * statistics.median(ttft[name])
            rows[-1]["ttft_ms"] = [round(1e3 * v, 3) for v in ttft[name]]
    cfg = adapter.hf_model.config
    return {
        "model": "random:qwen2.5-vl-7b",
        "llm_layers": cfg.text_config.num_hidden_layers, "vision_blocks": cfg.vision_config.depth,
        "hidden": cfg.text_config.hidden_size, "heads": f"{cfg.text_config.num_attention_heads}/"
                                                         f"{cfg.text_config.num_key_value_heads}",
        "vocab_size": cfg.text_config.vocab_size, "dtype": args.dtype, "device": _device_name(device),
        "threads": args.threads, "video": os.path.basename(args.video), "fps": args.fps,
        "frame_size": f"{args.size}x{args.size}", "temporal_patches": len(per_item["dense"]),
        "warmup_skipped": skip, "grid": sessions["dense"].stats()["grid"], "build_seconds": build_s,
        "criterion": f"ratio <= kept_fraction + {args.margin:g}", "sessions": rows,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def markdown(r: dict) -> str:
    ask = all("ttft_ms_median" in s for s in r["sessions"])
    head = [
        f"Configuration: {r['model']}, {r['llm_layers']} LLM layers (hidden {r['hidden']}, heads {r['heads']}), "
        f"{r['vision_blocks']} vision blocks, vocab {r['vocab_size']}, {r['dtype']}; device {r['device']}, "
        f"{r['threads']} threads.",
        f"Input: {r['video']} at {r['fps']} fps, {r['frame_size']}, {r['temporal_patches']} temporal patches "
        f"(grid {r['grid'][0]}x{r['grid'][1]}), the first {r['warmup_skipped']} not timed. "
        f"Criterion: {r['criterion']}.", "",
        "| session | kept fraction (timed patches) | prefill / temporal patch (median) | ratio to dense | criterion |"
        + (" first answer token (median) |" if ask else ""),
        "|---|---|---|---|---|" + ("---|" if ask else "")]
    rows = [f"| {s['session']} | {s['kept_fraction']:.3f} ({s['kept_fraction_timed']:.3f}) | "
            f"{s['prefill_ms_median']:.1f} ms | {s['ratio']:.3f} | "
            f"{'-' if s['passes'] is None else ('pass' if s['passes'] else 'FAIL')} |"
            + (f" {s['ttft_ms_median']:.1f} ms |" if ask else "") for s in r["sessions"]]
    return "\n".join(head + rows)


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", default=DEFAULT_VIDEOS[0] if DEFAULT_VIDEOS else None)
    p.add_argument("--fps", type=float, default=1.0)
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--seconds", type=float, default=60.0, help="video seconds to stream")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default: faster than float32 on this CPU)")
    p.add_argument("--num-layers", type=int, default=None if cuda else 2, help="LLM layers (default: all on CUDA)")
    p.add_argument("--vision-depth", type=int, default=None if cuda else 2, help="vision blocks")
    p.add_argument("--vocab-size", type=int, default=None if cuda else 32768,
                   help="vocabulary (not used by prefill; cut on CPU to save memory)")
    p.add_argument("--hidden", type=int, default=None,
                   help="narrow the LLM to this width (quick checks; default: the 7B's 3584)")
    p.add_argument("--min-pixels", type=int, default=None,
                   help="Qwen preprocessing min_pixels (quick checks with small frames; default: Qwen's)")
    p.add_argument("--tau-t", type=float, default=0.2)
    p.add_argument("--tau-s", type=float, default=0.2)
    p.add_argument("--keep-ratio", type=float, nargs="+", default=[0.1],
                   help="also run streaming_assistant at these matched budgets (default 0.1; 0 to skip)")
    p.add_argument("--margin", type=float, default=0.2, help="criterion: ratio <= kept fraction + MARGIN (0.2)")
    p.add_argument("--ask", type=int, default=0, metavar="N",
                   help="then ask each session N times (1 token) and report the median time to first token")
    p.add_argument("--question", default="What is happening in the video?", help="the question of --ask")
    p.add_argument("--warmup", type=int, default=2, help="first temporal patches not timed")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    p.add_argument("--json-file", default=None, metavar="PATH", help="also write the JSON result to PATH")
    args = p.parse_args(argv)
    if not args.video or not os.path.exists(args.video):  # a file or a folder of images
        p.error(f"video not found: {args.video!r}")
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else markdown(result))
    if args.json_file:
        with open(args.json_file, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
