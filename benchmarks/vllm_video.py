"""Offline throughput and time to first token of video requests in vLLM: dense, vLLM's own EVS,
and streampress's methods through the plugin (streampress.vllm_plugin) at matched rates.

Runs in the vLLM environment (``bash scripts/vllm_env.sh`` -> .venv-vllm/bin/python). Weights
are random (vLLM's ``load_format="dummy"``) on a real configuration, so nothing is downloaded:

    # CPU, tiny model (a checkpoint folder written here), single-process mode
    .venv-vllm/bin/python benchmarks/vllm_video.py --tiny --requests 8 --frames 8
    # GPU, a real configuration (a folder with config.json + tokenizer + processor configs)
    python benchmarks/vllm_video.py --model /path/to/Qwen2.5-VL-7B-Instruct --frames 64 --size 448

Per configuration: ``TTFT`` = median wall time of one request with ``max_tokens=1`` (video
processing, encoder, pruning and prefill), ``throughput`` = requests per second of a batch of
``--requests`` requests generating ``--max-tokens`` tokens each, ``prompt`` = mean prompt
tokens per request. EVS is vLLM's own mask; the streampress methods run in exact-count mode
with the same count (vLLM sizes every video's placeholder from ``video_pruning_rate``). One
LLM per rate: the method is switched on the loaded model (``LLM.apply_model``); videos are
new per configuration so no cache is reused.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_METHODS = ["evs", "streaming_assistant", "stc", "dtd", "mssavt", "divprune", "uniform"]


def _videos(n, frames, size, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.integers(0, 256, (1, size, size, 3))
        drift = rng.integers(-30, 30, (frames, size, size, 3)) * (rng.random((frames, 1, 1, 1)) < 0.5)
        clip = np.clip(base + np.cumsum(drift, axis=0), 0, 255).astype(np.uint8)
        meta = {"total_num_frames": frames, "fps": 2.0, "duration": frames / 2.0,
                "frames_indices": list(range(frames)), "do_sample_frames": False, "video_backend": "opencv"}
        out.append((clip, meta))
    return out


PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
          "<|vision_start|><|video_pad|><|vision_end|>Describe the video.<|im_end|>\n<|im_start|>assistant\n")


def measure(llm, args, seed):
    from vllm import SamplingParams

    one = SamplingParams(max_tokens=1, temperature=0.0)
    many = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    ttfts, prompt_tokens = [], []
    for i, v in enumerate(_videos(args.ttft_runs + 1, args.frames, args.size, seed)):
        t = time.perf_counter()
        out = llm.generate({"prompt": PROMPT, "multi_modal_data": {"video": v}}, one, use_tqdm=False)[0]
        if i:  # the first is a warm-up
            ttfts.append(time.perf_counter() - t)
            prompt_tokens.append(len(out.prompt_token_ids))
    batch = [{"prompt": PROMPT, "multi_modal_data": {"video": v}}
             for v in _videos(args.requests, args.frames, args.size, seed + 1000)]
    t = time.perf_counter()
    outs = llm.generate(batch, many, use_tqdm=False)
    wall = time.perf_counter() - t
    return {"prompt_tokens": statistics.mean(prompt_tokens), "ttft_s": statistics.median(ttfts),
            "requests_per_s": len(batch) / wall, "output_tokens_per_s": sum(len(o.outputs[0].token_ids)
                                                                              for o in outs) / wall,
            "batch_wall_s": wall}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder (config + tokenizer + processor configs)")
    p.add_argument("--tiny", action="store_true", help="write and use a tiny Qwen2.5-VL folder (CPU)")
    p.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_5_vl", "qwen3_vl"], help="with --tiny")
    p.add_argument("--rates", type=float, nargs="+", default=[0.5, 0.75])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=None, help="frame side in pixels (default 112 tiny, 448)")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--ttft-runs", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if not args.tiny and not args.model:
        p.error("give --model PATH or --tiny")

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if args.tiny:
        sys.path.insert(0, str(HERE.parent / "tests"))
        from _vllm_helpers import FRAME_SIZE, vllm_checkpoint

        folder = vllm_checkpoint(Path(tempfile.mkdtemp(prefix="vllm-bench-")) / args.family, args.family)
        args.size = args.size or FRAME_SIZE[args.family]
        load = {"load_format": "auto"}  # the tiny folder has its (random) weights
    else:
        folder = Path(args.model)
        args.size = args.size or 448
        load = {"load_format": "dummy"}
    import torch
    import vllm
    from vllm import LLM

    import streampress.vllm_plugin as plugin

    cpu = not torch.cuda.is_available()
    common = dict(model=str(folder), enforce_eager=cpu, seed=0, enable_prefix_caching=False,
                  mm_processor_cache_gb=0, limit_mm_per_prompt={"video": 1, "image": 0},
                  max_model_len=args.max_model_len or (4096 if args.tiny else 32768),
                  max_num_seqs=max(args.requests, 1), **load)
    if cpu:
        common["distributed_executor_backend"] = "uni"
    results, seed = [], 0

    def record(name, rate, llm):
        nonlocal seed
        seed += 1
        r = measure(llm, args, seed * 7919)
        r.update(method=name, rate=rate)
        results.append(r)
        print(f"{name:>20} rate {rate:<5} prompt {r['prompt_tokens']:7.1f}  TTFT {r['ttft_s'] * 1000:8.1f} ms  "
              f"{r['requests_per_s']:6.2f} req/s  {r['output_tokens_per_s']:7.1f} tok/s", flush=True)

    llm = LLM(**common)
    record("dense", 0.0, llm)
    del llm
    gc.collect()
    for rate in args.rates:
        first = next(m for m in args.methods if m != "evs") if any(m != "evs" for m in args.methods) else None
        overrides = {"streampress": {"method": first}} if first else None
        llm = LLM(**common, video_pruning_rate=rate, hf_overrides=overrides)
        for method in args.methods:
            spec = None if method == "evs" else plugin.parse_spec({"method": method})
            llm.apply_model(lambda model, spec=spec: setattr(model, "_streampress", spec))
            record("vLLM EVS" if method == "evs" else method, rate, llm)
        del llm
        gc.collect()
    meta = {"vllm": vllm.__version__, "torch": torch.__version__, "device": "cuda" if not cpu else "cpu",
            "model": "tiny " + args.family if args.tiny else str(folder), "frames": args.frames, "size": args.size,
            "requests": args.requests, "max_tokens": args.max_tokens}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print("\n| method | rate | prompt tokens | TTFT (ms) | req/s | output tok/s |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['rate']} | {r['prompt_tokens']:.0f} | {r['ttft_s'] * 1000:.1f} | "
              f"{r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} |")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
