"""KV memory within a budget: peak KV bytes and time per item, full vs window vs InfiniPot-V vs HERMES.

Streams a long synthetic video (random frames, 1 fps, one item = a temporal patch of 2
frames per ``add_frames`` call, so InfiniPot-V runs its exact item schedule) through a
random-weights Qwen2.5-VL-7B architecture cut to ``--layers`` LLM layers (its KV geometry:
4 KV heads x head dim 128, so KV bytes per token and layer are the 7B's), 1 vision block,
LLM width ``--hidden`` (512) so that it runs on a CPU; 112x112 frames give 4x4 = 16 visual
tokens per item. For each policy: the KV bytes after every item (the peak is the largest;
slot tables of the budget policies included), the mean wall time per item, and for the
budget policies the number of compressions, their mean time and that time as a fraction
of the mean per-item time. Two more rows run both budget policies with ``reindex="eager"``
(positions re-indexed after every compression; the default ``"lazy"`` never fires in a
stream this short), so the difference in time per compression is the re-indexing's cost,
and one runs HERMES with ``chunk_frames=16`` (the paper's chunk: one budget check per 8 items).

    python benchmarks/budget_memory.py                      # 600 items (20 min of video)
    python benchmarks/budget_memory.py --items 200 --budget 512 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

import streampress
from streampress.memory import BudgetMemory, SlidingWindow
from streampress.session import StreamingSession


def run(model, policy, frames: np.ndarray, items: int) -> dict:
    s = StreamingSession(model, memory=policy)
    peak, times = 0, []
    for k in range(items):
        t0 = time.perf_counter()
        s.add_frames(frames[(2 * k) % len(frames):(2 * k) % len(frames) + 2], [2 * k, 2 * k + 1])
        times.append(time.perf_counter() - t0)
        st = s.stats()
        peak = max(peak, st["kv_cache_bytes"] + st.get("slot_table_bytes", 0))
    st = s.stats()
    per_item = float(np.mean(times))
    out = {"peak_kv_mib": peak / 2 ** 20, "final_kv_mib": st["kv_cache_bytes"] / 2 ** 20,
           "ms_per_item": 1e3 * per_item, "kv_tokens": st["kv_cache_tokens"]}
    if "compressions" in st:
        n = st["compressions"]
        mean = st["compress_seconds"] / n if n else 0.0
        out.update(compressions=n, ms_per_compression=1e3 * mean, compression_over_item=mean / per_item,
                   visual_slots=st["visual_slots"])
    t0 = time.perf_counter()
    s.ask("What happens in the video?", max_new_tokens=1)
    out["ms_first_token"] = 1e3 * (time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=600)
    p.add_argument("--budget", type=int, default=1024, help="visual tokens per layer (and KV head)")
    p.add_argument("--window", type=float, default=128.0, help="sliding window seconds (64 items: 2 s each)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--json", default=None)
    p.add_argument("--only", nargs="+", default=None, metavar="PREFIX",
                   help="run only the rows whose memory text starts with one of these (e.g. full hermes)")
    p.add_argument("--no-reindex", dest="reindex", action="store_false",
                   help="skip the two rows with eager position re-indexing")
    args = p.parse_args()
    torch.manual_seed(0)
    model = streampress.load_model("random:qwen2.5-vl-7b", dtype="float32", device="cpu", num_layers=args.layers,
                                   vision_depth=1, hidden_size=args.hidden, vocab_size=1024,
                                   min_pixels=112 * 112)
    frames = np.random.default_rng(0).integers(0, 256, size=(64, 112, 112, 3), dtype=np.uint8)
    policies = {"full": "full", f"window:{args.window:g}": SlidingWindow(seconds=args.window),
                f"infinipot:budget={args.budget}": BudgetMemory("infinipot_v", budget=args.budget),
                f"hermes:budget={args.budget}": BudgetMemory("hermes", budget=args.budget)}
    # the paper's chunk: the budget checked once per 16 frames (8 items) instead of after every call
    policies[f"hermes:budget={args.budget},chunk_frames=16"] = BudgetMemory("hermes", budget=args.budget,
                                                                            chunk_frames=16)
    if args.reindex:  # every compression followed by position re-indexing: its cost is the difference
        policies.update({f"infinipot:budget={args.budget},reindex=eager":
                         BudgetMemory("infinipot_v", budget=args.budget, reindex="eager"),
                         f"hermes:budget={args.budget},reindex=eager":
                         BudgetMemory("hermes", budget=args.budget, reindex="eager")})
    if args.only:
        policies = {name: pol for name, pol in policies.items() if any(name.startswith(o) for o in args.only)}
    rows = {name: run(model, pol, frames, args.items) for name, pol in policies.items()}
    env = {"device": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
           "torch": torch.__version__, "items": args.items, "tokens_per_item": 16}
    print(f"{args.items} items x 16 visual tokens, Qwen2.5-VL-7B KV geometry, {args.layers} LLM layers; {env}")
    print("| memory | peak KV MiB | final KV MiB | ms / item | compressions | ms / compression | "
          "compression / item time | first token ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        comp = (f"{r['compressions']} | {r['ms_per_compression']:.1f} | {100 * r['compression_over_item']:.0f} %"
                if "compressions" in r else "- | - | -")
        print(f"| {name} | {r['peak_kv_mib']:.2f} | {r['final_kv_mib']:.2f} | {r['ms_per_item']:.1f} | {comp} | "
              f"{r['ms_first_token']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
