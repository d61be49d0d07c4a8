"""Helpers of the vLLM plugin tests (tests/test_vllm*.py), which run in the separate vLLM
environment (scripts/vllm_env.sh, .ci/run) and skip where vLLM is not installed.

- ``vllm_checkpoint(folder, family)``: a tiny random checkpoint folder in the HF layout
  (tests/_checkpoint_helpers.py) widened to what vLLM's CPU attention supports: LLM hidden
  128 with 4 heads of 32 (2 KV heads), M-RoPE sections [8, 4, 4].
- ``video(n_frames, seed)``: ``(frames uint8 [n, S, S, 3], metadata)`` as vLLM's Qwen parser
  wants it (S = 112 for Qwen2.5-VL, 128 for Qwen3-VL: 4x4 merged tokens per temporal patch).
- ``make_llm(folder, **kwargs)``: ``vllm.LLM`` in single-process mode (set the environment with
  ``single_process_env()`` before importing vLLM).
"""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

FRAME_SIZE = {"qwen2_5_vl": 112, "qwen3_vl": 128}
VLLM_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
}


def single_process_env() -> None:
    for k, v in VLLM_ENV.items():
        os.environ.setdefault(k, v)


def widen(cfg) -> None:
    """LLM width vLLM's CPU attention takes (head dim 32), in place."""
    text = cfg.text_config
    text.hidden_size, text.intermediate_size = 128, 256
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = 4, 2, 32
    rope = dict(text.rope_parameters)
    rope["mrope_section"] = [8, 4, 4]
    text.rope_parameters = rope
    cfg.vision_config.out_hidden_size = 128


def vllm_checkpoint(folder, family: str) -> Path:
    from _checkpoint_helpers import write_checkpoint
    from streampress.models.random import qwen as spec

    original = spec.build_config

    def build_config(*args, **kwargs):
        cfg = original(*args, **kwargs)
        widen(cfg)
        return cfg

    with mock.patch.object(spec, "build_config", build_config):
        return write_checkpoint(folder, family)


def video(n_frames: int, family: str = "qwen2_5_vl", seed: int = 0, fps: float = 2.0):
    import numpy as np

    size = FRAME_SIZE[family]
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, size, size, 3))
    drift = rng.integers(-40, 40, (n_frames, size, size, 3)) * (rng.random((n_frames, 1, 1, 1)) < 0.7)
    frames = np.clip(base + np.cumsum(drift, axis=0), 0, 255).astype(np.uint8)
    meta = {"total_num_frames": n_frames, "fps": fps, "duration": n_frames / fps,
            "frames_indices": list(range(n_frames)), "do_sample_frames": False, "video_backend": "opencv"}
    return frames, meta


def make_llm(folder, **kwargs):
    single_process_env()
    from vllm import LLM

    args = dict(model=str(folder), max_model_len=1024, enforce_eager=True, distributed_executor_backend="uni",
                dtype="float32", seed=0, enable_prefix_caching=False, limit_mm_per_prompt={"video": 1, "image": 0},
                mm_processor_cache_gb=0, max_num_seqs=4)
    args.update(kwargs)
    return LLM(**args)


def prompt(question: str = "What happens in the video?") -> str:
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"<|vision_start|><|video_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n")
