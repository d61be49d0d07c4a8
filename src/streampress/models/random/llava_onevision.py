"""Random-weight LLaVA-OneVision architectures (see :mod:`streampress.models.random`).

``llava-onevision-tiny`` (SigLIP of 2 blocks on 70x70 frames, LLM hidden 64, 2 layers) is
for tests and demos; ``llava-onevision-7b`` carries the real layer shapes of the released
checkpoint (for speed benchmarks) and can be cut (``num_layers``, ``vision_depth``).
Weights are drawn from a normal distribution with the architecture's standard deviation
(``initializer_range``); norm scales are 1, biases 0, ``image_newline`` ``N(0, 1/D)``.
"""

from __future__ import annotations

import torch

from ..base import positive_int
from ..tokenizer import ByteTokenizer
from . import build_random_model

__all__ = ["ARCHS", "LLAVA_SPECIAL_TOKENS", "tokenizer", "build_config", "build_model"]

LLAVA_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
"""Special tokens of the built-in byte tokenizer for random LLaVA-OneVision models (ids 256-260)."""

# SigLIP so400m-patch14-384 as LLaVA-OneVision uses it: 26 of its 27 blocks (the released
# Hugging Face configs drop the last block and read the last hidden state, which is the
# original model's "second to last layer"), no attention-pooling head.
_SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                      image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
_ARCHS = {
    "llava-onevision-7b": dict(
        vision=_SIGLIP_SO400M,
        text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu"),
        std=0.02),
    "llava-onevision-tiny": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    image_size=70, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
        text=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 20,
                  rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu"),
        std=0.1),
}
ARCHS = tuple(_ARCHS)


def tokenizer() -> ByteTokenizer:
    """The byte-level tokenizer of every random LLaVA-OneVision architecture."""
    return ByteTokenizer(LLAVA_SPECIAL_TOKENS)


def build_config(arch: str, num_layers: int | None = None, vision_depth: int | None = None,
                 vocab_size: int | None = None, tokenizer: ByteTokenizer | None = None):
    """The ``LlavaOnevisionConfig`` of a built-in architecture, optionally cut to
    ``num_layers`` LLM layers and ``vision_depth`` SigLIP blocks (and ``vocab_size``).

    Special-token ids are those of the built-in byte tokenizer (all below ``vocab_size``).
    """
    from transformers import LlavaOnevisionConfig

    if arch not in _ARCHS:
        raise ValueError(f"unknown random architecture {arch!r}; expected one of {list(ARCHS)}")
    spec = _ARCHS[arch]
    vision = dict(spec["vision"], model_type="siglip_vision_model", vision_use_head=False)
    text = dict(spec["text"], model_type="qwen2", tie_word_embeddings=False, use_sliding_window=False)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta")}
    if num_layers is not None:
        text["num_hidden_layers"] = positive_int("num_layers", num_layers)
    if vision_depth is not None:
        vision["num_hidden_layers"] = positive_int("vision_depth", vision_depth)
    if vocab_size is not None:
        text["vocab_size"] = positive_int("vocab_size", vocab_size)
    tok = tokenizer or ByteTokenizer(LLAVA_SPECIAL_TOKENS)
    if tok.vocab_size > text["vocab_size"]:
        raise ValueError(f"vocab_size must be at least {tok.vocab_size} (the byte tokenizer's size), "
                         f"got {text['vocab_size']}")
    ids = dict(image_token_index=tok.token_id("<image>"), video_token_index=tok.token_id("<video>"))
    text.update(bos_token_id=tok.token_id("<|endoftext|>"), eos_token_id=tok.token_id("<|im_end|>"),
                pad_token_id=tok.token_id("<|endoftext|>"))
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", projector_hidden_act="gelu",
                                  tie_word_embeddings=False, **ids)
    config.text_config.initializer_range = spec["std"]
    return config


def build_model(config, dtype: torch.dtype, device: torch.device | str, seed: int = 0):
    """``LlavaOnevisionForConditionalGeneration`` of ``config`` with random weights (normal,
    ``initializer_range`` standard deviation; norm scales 1, biases 0, ``image_newline``
    ``normal_(0, 1/sqrt(D))``)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    std = config.text_config.initializer_range
    newline_std = config.text_config.hidden_size ** -0.5

    def init_parameter(name: str, param: torch.nn.Parameter, gen: torch.Generator) -> None:
        if name.endswith("image_newline"):
            param.normal_(0.0, newline_std, generator=gen)
        elif name.endswith(".bias"):
            param.zero_()
        elif param.ndim == 1:  # LayerNorm / RMSNorm scales
            param.fill_(1.0)
        else:
            param.normal_(0.0, std, generator=gen)

    return build_random_model(LlavaOnevisionForConditionalGeneration, config, dtype, device, seed, init_parameter)
