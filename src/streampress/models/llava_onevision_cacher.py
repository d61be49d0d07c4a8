"""Glue between STC-Cacher and the SigLIP vision tower (LLaVA-OneVision; transformers 5.x).

It lives with the LLaVA-OneVision family, whose encoder SigLIP is; the cacher finds it
through the family registry (``register_family(..., vision_glue=...)`` in
:mod:`streampress.models`), keyed by the tower's class, and drives it through the
:class:`~streampress.cacher.core.EncoderGlue` protocol.

``SiglipVisionModel`` runs ``layer(hidden_states [B, S, D], attention_mask=None)`` for every
encoder layer, and each of the B frames attends only to itself, so an *item* is one frame
(``x = hidden_states``, full attention, no rotary embedding). Patch and position
embeddings, the final layer norm and the optional pooling head are the model's own code.
LLaVA-OneVision reads ``hidden_states[config.vision_feature_layer]`` of this tower
(``-1`` in its configs, i.e. the last layer's output before ``post_layernorm``); pass
``output_hidden_states=True`` through the cacher to get them, exactly as the model does, or
capture only that layer's output (:func:`streampress.models.llava_onevision.feature_capture`,
what the LLaVA-OneVision adapter does) instead of holding every layer's until the end.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..cacher.core import AttentionPattern

_FULL = AttentionPattern("full")


class SiglipBlockParts:
    """:class:`~streampress.cacher.core.BlockParts` of one SigLIP encoder layer."""

    def __init__(self, layer: nn.Module) -> None:
        attn = layer.self_attn
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.scale = attn.scale
        self._q, self._k, self._v = attn.q_proj, attn.k_proj, attn.v_proj
        self.norm1 = layer.layer_norm1
        self.norm2 = layer.layer_norm2
        self.out_proj = attn.out_proj
        self.mlp = layer.mlp

    def _heads(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (self.num_heads, self.head_dim))

    def qkv(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self._heads(self._q(u)), self._heads(self._k(u)), self._heads(self._v(u))

    def k(self, u: Tensor) -> Tensor:
        return self._heads(self._k(u))

    def qv(self, u: Tensor) -> tuple[Tensor, Tensor]:
        return self._heads(self._q(u)), self._heads(self._v(u))


class SiglipGlue:
    """Adapts a SigLIP vision tower to the cacher (one item = one frame)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @staticmethod
    def call_kwargs(grid_thw: Tensor | None, kwargs: dict) -> dict:
        """The tower's keywords for ``cacher.encode(tower, pixel_values, None, ...)``."""
        if grid_thw is not None:
            raise ValueError("grid_thw must be None for a SigLIP tower (one item per frame)")
        return kwargs

    def blocks(self) -> list[nn.Module]:
        return list(self.module.encoder.layers)

    def parts(self, block: nn.Module) -> SiglipBlockParts:
        return SiglipBlockParts(block)

    @staticmethod
    def call_layout(args: tuple, kwargs: dict) -> tuple[int, tuple]:
        """``(items, layout)`` of a tower call ``(pixel_values [B, C, H, W], ...)``."""
        px = kwargs["pixel_values"] if "pixel_values" in kwargs else (args[0] if args else None)
        if not isinstance(px, Tensor) or px.dim() != 4 or px.shape[0] < 1:
            raise ValueError(f"pixel_values must be a tensor [frames, channels, height, width], got "
                             f"{getattr(px, 'shape', px)!r}")
        return int(px.shape[0]), tuple(px.shape[1:])

    @staticmethod
    def unpack(args: tuple, kwargs: dict, items: int, state, memo: dict) -> tuple[Tensor, None, AttentionPattern]:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if mask is not None:
            raise ValueError("the cached SigLIP path expects attention_mask=None (frames attend to themselves)")
        if hidden.dim() != 3 or hidden.shape[0] != items:
            raise ValueError(f"expected encoder-layer input [{items}, tokens, dim], got {tuple(hidden.shape)}")
        return hidden, None, _FULL

    @staticmethod
    def pack(y: Tensor) -> Tensor:
        return y
