"""Built-in random-weight architectures (``random:<arch>`` in :func:`streampress.load_model`).

Why: tests, demos and speed benchmarks need real model code and real layer shapes without
downloading checkpoints. Every family builds its random models the same way, in one
module per family side by side here, each with the same names:

- ``ARCHS``: the architecture names it builds (the same names its
  ``register_family(..., random_archs=...)`` line lists, so that listing needs no torch);
- ``tokenizer()``: the built-in byte-level tokenizer with the family's special tokens
  (:mod:`streampress.models.tokenizer`); every special-token id of a config lies in its
  range, below ``vocab_size``;
- ``build_config(arch, num_layers=None, vision_depth=None, vocab_size=None,
  tokenizer=None, ...)``: the Hugging Face config, optionally cut to fewer LLM layers and
  vision blocks;
- ``build_model(config, dtype, device, seed=0)``: the model, through
  :func:`build_random_model` with the family's ``init_parameter`` rule.

The family's adapter (``from_random``) wraps the result with its preprocessing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

__all__ = ["build_random_model"]


@torch.no_grad()
def build_random_model(model_cls, config, dtype: torch.dtype, device: torch.device | str, seed: int,
                       init_parameter: Callable[[str, torch.nn.Parameter, torch.Generator], None]):
    """``model_cls`` on ``config`` with random weights, fast.

    The module tree is built directly on ``device`` in ``dtype`` (as ``from_pretrained``
    does: rotary frequency buffers stay float32) with transformers' initialisation switched
    off, so memory is only allocated; then ``init_parameter(name, param, generator)`` fills
    every parameter in place from one generator seeded with ``seed``, in
    ``named_parameters()`` order. On the ``meta`` device only the shapes are built."""
    from transformers.initialization import no_init_weights

    t0 = time.perf_counter()
    device = torch.device(device)
    with torch.device(device), no_init_weights():
        model = model_cls._from_config(config, dtype=dtype)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if device.type != "meta":  # meta: shapes only (e.g. to inspect an architecture without memory)
        gen = torch.Generator(device=device).manual_seed(seed)
        for name, param in model.named_parameters():
            init_parameter(name, param, gen)
    model.eval()
    model.build_seconds = time.perf_counter() - t0
    return model
