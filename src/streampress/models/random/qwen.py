"""Random-weight Qwen2-VL / Qwen2.5-VL / Qwen3-VL architectures (see :mod:`streampress.models.random`).

Tiny ones (hidden 64, 2 layers, vision depth 2) are for tests and demos; ``qwen2.5-vl-7b``
and ``qwen2.5-vl-3b`` carry the real layer shapes of the released checkpoints (for speed
benchmarks) and can be cut to fewer LLM layers (``num_layers``) and vision blocks
(``vision_depth``). When a cut removes every full-attention vision block, the last kept
block becomes full-attention, so the encoder keeps both attention kinds.

Weights are drawn uniformly with the standard deviation ``initializer_range`` (half the
cost of a normal draw); norm scales are 1, biases 0.
"""

from __future__ import annotations

import torch

from ..base import positive_int
from ..tokenizer import ByteTokenizer
from . import build_random_model

__all__ = ["ARCHS", "tokenizer", "build_config", "build_model"]

_TINY_VOCAB = 512

# Real Qwen2.5-VL vision tower (shared by the 3B and 7B checkpoints).
_QWEN25_VISION = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=112, tokens_per_second=2,
                      fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", in_channels=3)

# What the released Qwen2.5-VL LLMs (3B and 7B) share.
_QWEN25_TEXT = dict(max_position_embeddings=128000, rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})

# The tiny LLM of every tiny architecture (Qwen3-VL adds its head dim and interleaved M-RoPE).
_TINY_TEXT = dict(vocab_size=_TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 20, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]})

_ARCHS = {
    "qwen2.5-vl-7b": dict(
        model_type="qwen2_5_vl",
        text=dict(_QWEN25_TEXT, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4),
        vision=dict(_QWEN25_VISION, out_hidden_size=3584), tie=False),
    "qwen2.5-vl-3b": dict(
        model_type="qwen2_5_vl",
        text=dict(_QWEN25_TEXT, vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                  num_attention_heads=16, num_key_value_heads=2),
        vision=dict(_QWEN25_VISION, out_hidden_size=2048), tie=True),
    "qwen2.5-vl-tiny": dict(
        model_type="qwen2_5_vl",
        text=_TINY_TEXT,
        vision=dict(depth=2, hidden_size=32, num_heads=4, intermediate_size=64, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=112, tokens_per_second=2,
                    fullatt_block_indexes=[1], out_hidden_size=64, hidden_act="silu"), tie=False),
    "qwen2-vl-tiny": dict(
        model_type="qwen2_vl",
        text=_TINY_TEXT,
        vision=dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                    temporal_patch_size=2, hidden_size=64), tie=False),
    "qwen3-vl-tiny": dict(
        model_type="qwen3_vl",
        text=dict(_TINY_TEXT, head_dim=16,
                  rope_parameters=dict(_TINY_TEXT["rope_parameters"], mrope_interleaved=True)),
        vision=dict(depth=2, hidden_size=32, num_heads=4, intermediate_size=64, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                    num_position_embeddings=64, deepstack_visual_indexes=[0, 1]), tie=False),
}

ARCHS = tuple(_ARCHS)


def tokenizer() -> ByteTokenizer:
    """The byte-level tokenizer of every random Qwen architecture (Qwen's special tokens)."""
    return ByteTokenizer()


# model_type -> (config class, model class) in transformers.
_CLASSES = {"qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
            "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
            "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration")}


def _transformers_class(model_type: str, which: int):
    """The transformers class (0: config, 1: model) of ``model_type``."""
    import transformers

    return getattr(transformers, _CLASSES[model_type][which])


def build_config(arch: str, num_layers: int | None = None, vision_depth: int | None = None,
                 vocab_size: int | None = None, tokenizer: ByteTokenizer | None = None,
                 hidden_size: int | None = None):
    """The HF config of a built-in architecture, optionally cut (see the module docstring).

    ``hidden_size`` narrows the LLM (and the merger's output) to that width with the same
    head dim and KV heads (so KV bytes per token stay real) and an MLP of twice the width."""
    if arch not in _ARCHS:
        raise ValueError(f"unknown random architecture {arch!r}; expected one of {list(ARCHS)}")
    spec = _ARCHS[arch]
    text, vision = dict(spec["text"]), dict(spec["vision"])
    text["rope_parameters"] = dict(text["rope_parameters"])
    for name, value, key, target in (("num_layers", num_layers, "num_hidden_layers", text),
                                     ("vision_depth", vision_depth, "depth", vision),
                                     ("vocab_size", vocab_size, "vocab_size", text)):
        if value is not None:
            target[key] = positive_int(name, value)
    if hidden_size is not None:
        hidden_size = positive_int("hidden_size", hidden_size)
        head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        if hidden_size % head_dim or hidden_size // head_dim < text["num_key_value_heads"]:
            raise ValueError(f"hidden_size must be a multiple of the head dim {head_dim} with at least "
                             f"{text['num_key_value_heads']} heads, got {hidden_size}")
        text.update(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                    num_attention_heads=hidden_size // head_dim)
        vision["hidden_size" if spec["model_type"] == "qwen2_vl" else "out_hidden_size"] = hidden_size
    if "fullatt_block_indexes" in vision:
        full = [i for i in vision["fullatt_block_indexes"] if i < vision["depth"]]
        vision["fullatt_block_indexes"] = full or [vision["depth"] - 1]
    if "deepstack_visual_indexes" in vision:
        vision["deepstack_visual_indexes"] = [i for i in vision["deepstack_visual_indexes"] if i < vision["depth"]]
    tok = tokenizer or ByteTokenizer()
    if tok.vocab_size > text["vocab_size"]:
        raise ValueError(f"vocab_size must be at least {tok.vocab_size} (the byte tokenizer's size), "
                         f"got {text['vocab_size']}")
    ids = dict(image_token_id=tok.token_id("<|image_pad|>"), video_token_id=tok.token_id("<|video_pad|>"),
               vision_start_token_id=tok.token_id("<|vision_start|>"),
               vision_end_token_id=tok.token_id("<|vision_end|>"))
    text.update(bos_token_id=tok.token_id("<|endoftext|>"), eos_token_id=tok.token_id("<|im_end|>"),
                pad_token_id=tok.token_id("<|endoftext|>"))
    cls = _transformers_class(spec["model_type"], 0)
    config = cls(text_config=text, vision_config=vision, tie_word_embeddings=spec["tie"], **ids)
    if spec["tie"]:
        config.text_config.tie_word_embeddings = True
    return config


def build_model(config, dtype: torch.dtype, device: torch.device | str, seed: int = 0):
    """The ``...ForConditionalGeneration`` of ``config`` with random weights (uniform,
    ``initializer_range`` standard deviation; norm scales 1, biases 0)."""
    bound = getattr(config.text_config, "initializer_range", 0.02) * 3.0 ** 0.5

    def init_parameter(name: str, param: torch.nn.Parameter, gen: torch.Generator) -> None:
        if name.endswith(".bias"):
            param.zero_()
        elif param.ndim == 1:  # LayerNorm / RMSNorm scales
            param.fill_(1.0)
        else:
            param.uniform_(-bound, bound, generator=gen)

    return build_random_model(_transformers_class(config.model_type, 1), config, dtype, device, seed, init_parameter)
