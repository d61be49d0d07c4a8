"""STC-Cacher benchmark: vision-encoder time per frame, dense vs cached, on real clips.

For every clip (default: the clips in ../shared/data/videos, plus any paths given), frames
are decoded at ``--fps`` with PyAV (``--sampling stream``: the first frame at or after each
tick, as a live stream delivers them; ``--sampling qwen``: Qwen2.5-VL's own offline
sampling, an even number of frames spread over the clip), resized to ``--size`` x ``--size`` and patchified for a
Qwen2.5-VL-7B-shaped vision encoder (hidden 1280, 16 heads, MLP 3420, window 112, patch 14,
merge 2, output 3584) with RANDOM weights. On a CPU it keeps the first ``--depth`` blocks
(default 16: the real encoder's first half, full attention at blocks 7 and 15),
float32; on CUDA the whole encoder (depth 32, full attention at 7/15/23/31) in bfloat16.

The stream is fed one temporal patch (2 frames) per call, as a streaming session does.
Dense and cached calls of the same item alternate, in one process, so a busy machine
slows both alike. Reported per clip:

* ``dense ms/frame`` and ``cached ms/frame``: total encoder time over the clip / frames
  (the whole tower: patch embedding, blocks and merger);
* ``ratio (clip)``: cached total / dense total. A stream's first item is always a
  reference, so on short clips the start weighs in (5 items at N = 2 have 3 references);
* ``ratio (steady)``: one reference period of a long stream,
  ``(median reference + (N - 1) * median dependent) / (N * median dense)``;
* ``reference / dense`` and ``dependent / dense``: median cached time of each kind of item
  over the median dense time. A clip of I items has ceil(I / N) references, so its ratio
  is about ``(R * reference + (I - R) * dependent) / I``;
* cosine similarity of cached vs dense final features (merger output), mean over all
  tokens and over the dependent items' tokens only; the fraction of (token, block)
  pairs recomputed. Random weights give unrealistic key-similarity statistics, so the
  cosine figures show the mechanism, not the quality on a trained model.

Usage: ``PYTHONPATH=src python benchmarks/vit_cache.py [VIDEO ...] [--depth 16] [--fps 2] [--json out.json]``
(``--max-items 2`` for a quick check).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# The streampress imports must follow the sys.path insert above (the script runs from a checkout).
import streampress  # noqa: E402
from streampress.models.qwen_preprocess import QwenVisionParams, normalize  # noqa: E402
from streampress.models.qwen_preprocess import patchify as qwen_patchify  # noqa: E402

VIDEOS = ROOT.parent / "shared" / "data" / "videos"
PARAMS = QwenVisionParams.defaults("qwen2_5_vl")  # Qwen2.5-VL image processor
PATCH, TEMPORAL, MERGE = PARAMS.patch_size, PARAMS.temporal_patch_size, PARAMS.merge_size


def decode(path: Path, fps: float, size: int, sampling: str = "stream") -> np.ndarray:
    """uint8 ``[F, size, size, 3]`` frames of a clip sampled at ``fps`` (read with the package's
    :func:`~streampress.video.open_video`).

    ``sampling="stream"``: what a streaming session sees, the first frame at or after each
    tick ``k / fps`` (the clip's length is not known in advance; an odd count is padded with
    the last frame in :func:`patchify`). ``sampling="qwen"``: Qwen2.5-VL's own video sampling
    (qwen-vl-utils' ``smart_nframes``): ``duration * fps`` frames floored to a multiple of the
    temporal patch (2), at least 4, spread evenly over the clip (indices
    ``linspace(0, frames - 1, n)`` rounded), so a clip is always whole temporal patches.
    """
    from streampress.video import open_video

    if sampling == "stream":
        with open_video(path, fps=fps, size=(size, size)) as source:
            frames = [f.image for f in source]
    elif sampling == "qwen":
        with open_video(path, size=(size, size)) as source:
            total, rate = source.info.frame_count, source.info.fps
            if not total or not rate:
                raise ValueError(f"{path}: frame rate or frame count unknown; use --sampling stream")
            top = max(TEMPORAL, min(768, total) // TEMPORAL * TEMPORAL)
            n = max(TEMPORAL, int(min(max(total / rate * fps, 4), top) // TEMPORAL) * TEMPORAL)
            wanted = set(np.round(np.linspace(0, total - 1, n)).astype(int).tolist())
            frames = [f.image for i, f in enumerate(source) if i in wanted]
    else:
        raise ValueError(f"sampling must be 'qwen' or 'stream', got {sampling!r}")
    if not frames:
        raise ValueError(f"no frames decoded from {path}")
    return np.stack(frames)


def patchify(frames: np.ndarray) -> tuple[list[torch.Tensor], int, int]:
    """Frames -> one ``pixel_values`` tensor per temporal patch (the package's Qwen preprocessing)."""
    if len(frames) % TEMPORAL:
        frames = np.concatenate([frames, frames[-1:]])  # Qwen pads with the last frame
    x = normalize(torch.from_numpy(frames).permute(0, 3, 1, 2), PARAMS)
    pixel_values, grid = qwen_patchify(x, PARAMS)
    gt, gh, gw = grid[0].tolist()
    return list(pixel_values.view(gt, gh * gw, -1).unbind(0)), gh, gw


def build_encoder(depth: int, fullatt: list[int], device, dtype):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
        Qwen2_5_VLVisionConfig,
    )
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    cfg = Qwen2_5_VLVisionConfig(depth=depth, hidden_size=1280, num_heads=16, intermediate_size=3420,
                                 patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
                                 window_size=112, fullatt_block_indexes=fullatt, out_hidden_size=3584,
                                 hidden_act="silu")
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg, dtype=dtype)
    return model.eval()


class Timer:
    def __init__(self, device, cpu_time: bool):
        self.cuda = torch.device(device).type == "cuda"
        self.clock = time.process_time if cpu_time else time.perf_counter

    def __call__(self, fn):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = self.clock()
        out = fn()
        if self.cuda:
            torch.cuda.synchronize()
        return out, self.clock() - t0


def run_clip(model, cacher, items, gh, gw, device, timer) -> dict:
    grid = torch.tensor([[1, gh, gw]], device=device)
    state = cacher.new_state()
    dense_t, cached_t, roles, cos_all, cos_dep = [], [], [], [], []
    for i, px in enumerate(items):
        px = px.to(device=device, dtype=model.dtype)
        refs_before = state.stats.references

        def dense(px=px):
            return model(px, grid_thw=grid).pooler_output

        def cached(px=px):
            return cacher.encode(model, px, grid, state).pooler_output

        with torch.no_grad():
            if i % 2 == 0:
                d, td = timer(dense)
                c, tc = timer(cached)
            else:
                c, tc = timer(cached)
                d, td = timer(dense)
        is_ref = state.stats.references > refs_before
        cos = F.cosine_similarity(c.float(), d.float(), dim=-1)
        cos_all.append(cos)
        if not is_ref:
            cos_dep.append(cos)
        dense_t.append(td)
        cached_t.append(tc)
        roles.append("ref" if is_ref else "dep")
    ref_t = [t for t, r in zip(cached_t, roles) if r == "ref"]
    dep_t = [t for t, r in zip(cached_t, roles) if r == "dep"]
    n = cacher.interval
    steady = None
    if dep_t:
        steady = (statistics.median(ref_t) + (n - 1) * statistics.median(dep_t)) / (n * statistics.median(dense_t))
    md = statistics.median(dense_t)
    return {
        "items": len(items), "frames": TEMPORAL * len(items), "references": len(ref_t),
        "dense_s": sum(dense_t), "cached_s": sum(cached_t), "ratio_clip": sum(cached_t) / sum(dense_t),
        "ratio_steady": steady, "ref_over_dense": statistics.median(ref_t) / md,
        "dep_over_dense": statistics.median(dep_t) / md if dep_t else None,
        "cos_mean": torch.cat(cos_all).mean().item(),
        "cos_dep_mean": torch.cat(cos_dep).mean().item() if cos_dep else None,
        "cos_min": torch.cat(cos_all).min().item(), "recompute_fraction": state.stats.recompute_fraction,
        "dense_item_s": dense_t, "cached_item_s": cached_t, "roles": roles,
    }


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("videos", nargs="*", type=Path, help="extra video files (default clips always included)")
    p.add_argument("--no-default-clips", action="store_true", help="only the videos given")
    p.add_argument("--fps", type=float, default=2.0, help="sampling rate (default 2: Qwen2.5-VL's own video default)")
    p.add_argument("--sampling", choices=("stream", "qwen"), default="stream",
                   help="stream (default): the first frame at or after each 1/fps tick, as a live stream delivers "
                        "them; qwen: Qwen2.5-VL's own offline sampling (whole temporal patches spread over the clip)")
    p.add_argument("--size", type=int, default=448, help="frame side (multiple of 28)")
    p.add_argument("--depth", type=int, default=None, help="encoder blocks (CPU default 16, CUDA 32)")
    p.add_argument("--fullatt", type=int, nargs="*", default=None,
                   help="full-attention block indexes (default: every 8th from 7, else the last block)")
    p.add_argument("--rho", type=float, default=0.25)
    p.add_argument("--interval", type=int, default=2)
    p.add_argument("--refresh-threshold", type=float, default=None)
    p.add_argument("--max-items", type=int, default=None, help="temporal patches per clip (quick checks)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--cpu-time", action="store_true", help="time with process CPU time instead of wall clock")
    p.add_argument("--json", type=Path, default=None, help="write all results (per item times too) here")
    args = p.parse_args(argv)

    if args.size % (PATCH * MERGE):
        p.error(f"--size must be a multiple of {PATCH * MERGE}")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.set_num_threads(args.threads)
    depth = args.depth or (32 if cuda else 16)
    fullatt = args.fullatt if args.fullatt is not None else ([i for i in range(depth) if i % 8 == 7] or [depth - 1])
    videos = ([] if args.no_default_clips else sorted(VIDEOS.glob("*.mp4"))) + list(args.videos)
    if not videos:
        p.error("no videos")
    cacher = streampress.create_cacher(rho=args.rho, interval=args.interval, refresh_threshold=args.refresh_threshold)
    model = build_encoder(depth, fullatt, device, dtype)
    timer = Timer(device, args.cpu_time)

    clips = []
    for path in videos:
        items, gh, gw = patchify(decode(path, args.fps, args.size, args.sampling))
        clips.append((path, items[: args.max_items] if args.max_items else items, gh, gw))
    _, warm, gh, gw = clips[0]  # warm-up: allocator, kernels, thread pool
    run_clip(model, cacher, warm[:2], gh, gw, device, timer)

    results = []
    for path, items, gh, gw in clips:
        r = run_clip(model, cacher, items, gh, gw, device, timer)
        r["clip"] = path.name
        results.append(r)
        print(f"  {path.name}: ratio {r['ratio_clip']:.3f} (steady {_fmt(r['ratio_steady'])})", file=sys.stderr)

    dev = torch.cuda.get_device_name(device) if cuda else f"CPU, {args.threads} threads"
    total_d = sum(r["dense_s"] for r in results)
    total_c = sum(r["cached_s"] for r in results)
    lines = [
        (f"STC-Cacher, Qwen2.5-VL-7B vision encoder shapes, depth {depth} (full attention at {fullatt}), "
        f"{args.size}x{args.size}, {args.fps:g} fps ({args.sampling} sampling), "
        f"{str(dtype).replace('torch.', '')}, {dev}, "
        f"torch {torch.__version__}; rho={args.rho}, N={args.interval}, refresh={args.refresh_threshold}; "
        f"{'process CPU time' if args.cpu_time else 'wall clock'}, one temporal patch per call."),
        "",
        ("| clip | items (refs) | dense ms/frame | cached ms/frame | ratio (clip) | ratio (steady) "
        "| reference / dense | dependent / dense | cos mean | cos dependents | cos min | recomputed |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['clip']} | {r['items']} ({r['references']}) | {1e3 * r['dense_s'] / r['frames']:.0f} "
            f"| {1e3 * r['cached_s'] / r['frames']:.0f} | {r['ratio_clip']:.3f} | {_fmt(r['ratio_steady'])} "
            f"| {r['ref_over_dense']:.3f} | {_fmt(r['dep_over_dense'])} "
            f"| {r['cos_mean']:.4f} | {_fmt(r['cos_dep_mean'], '.4f')} | {r['cos_min']:.4f} "
            f"| {r['recompute_fraction']:.3f} |")
    steady = [r["ratio_steady"] for r in results if r["ratio_steady"] is not None]
    lines += ["", (f"All clips: cached / dense encoder time = {total_c / total_d:.3f} (totals); "
                  f"steady-state ratio, median over clips = {_fmt(statistics.median(steady) if steady else None)}."),
              ("Weights are random: the cosine figures come from random weights, whose key similarities "
              "are not those of a trained encoder.")]
    print("\n".join(lines))
    if args.json:
        meta = {"device": dev, "torch": torch.__version__, "depth": depth, "fullatt": fullatt,
                "size": args.size, "fps": args.fps, "sampling": args.sampling, "dtype": str(dtype), "rho": args.rho,
                "interval": args.interval, "refresh_threshold": args.refresh_threshold,
                "timer": "cpu" if args.cpu_time else "wall", "weights": "random",
                "ratio_total": total_c / total_d}
        args.json.write_text(json.dumps({"meta": meta, "clips": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
