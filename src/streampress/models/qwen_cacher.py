"""Glue between STC-Cacher and the Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision towers (transformers 5.x).

It lives with the Qwen family because it is knowledge of Qwen's encoder; the cacher
finds it through the family registry (``register_family(..., vision_glue=...)`` in
:mod:`streampress.models`), keyed by the tower's class, and drives it through the
:class:`~streampress.cacher.core.EncoderGlue` protocol.

The towers run ``blk(hidden_states [L, D], cu_seqlens=..., position_embeddings=(cos, sin))``
for every block on the packed tokens of all temporal patches. An *item* is one temporal
patch (``h * w`` patch tokens): Qwen2.5-VL's window attention and full attention, and
Qwen2-VL's and Qwen3-VL's full attention, never cross a temporal patch (``cu_seqlens`` has a boundary at
every item), and after Qwen2.5-VL's window reordering each item's tokens stay contiguous,
in the same order for every item of the same grid. So a block sees ``x.view(I, T, D)``,
the RoPE tables of one item (``cos[:T]``) and the item's window lengths from
``cu_seqlens``. Everything around the blocks (patch embedding, learned position
embeddings, merger, DeepStack mergers) is the model's own code, untouched.
"""

from __future__ import annotations

import itertools

import torch.nn.functional as F
from torch import Tensor, nn

from ..cacher.core import AttentionPattern


class QwenBlockParts:
    """:class:`~streampress.cacher.core.BlockParts` of one Qwen vision block."""

    def __init__(self, block: nn.Module) -> None:
        attn = block.attn
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.scale = attn.scaling
        self.dim = attn.dim
        self._qkv = attn.qkv
        self.norm1 = block.norm1
        self.norm2 = block.norm2
        self.out_proj = attn.proj
        self.mlp = block.mlp

    def _slice(self, which: int) -> tuple[Tensor, Tensor | None]:
        d = self.dim
        w, b = self._qkv.weight, self._qkv.bias
        return w[which * d:(which + 1) * d], None if b is None else b[which * d:(which + 1) * d]

    def qkv(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self._qkv(u).unflatten(-1, (3, self.num_heads, self.head_dim))
        return out.unbind(-3)

    def k(self, u: Tensor) -> Tensor:
        return F.linear(u, *self._slice(1)).unflatten(-1, (self.num_heads, self.head_dim))

    def qv(self, u: Tensor) -> tuple[Tensor, Tensor]:
        shape = (self.num_heads, self.head_dim)
        return (F.linear(u, *self._slice(0)).unflatten(-1, shape),
                F.linear(u, *self._slice(2)).unflatten(-1, shape))


class QwenGlue:
    """Adapts a Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision tower to the cacher (one item = one
    temporal patch)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @staticmethod
    def call_kwargs(grid_thw: Tensor | None, kwargs: dict) -> dict:
        """The tower's keywords for ``cacher.encode(tower, pixel_values, grid_thw, ...)``."""
        if grid_thw is None:
            raise ValueError("grid_thw is required for a Qwen vision tower")
        kwargs["grid_thw"] = grid_thw
        return kwargs

    def blocks(self) -> list[nn.Module]:
        return list(self.module.blocks)

    def parts(self, block: nn.Module) -> QwenBlockParts:
        return QwenBlockParts(block)

    @staticmethod
    def call_layout(args: tuple, kwargs: dict) -> tuple[int, tuple]:
        """``(items, layout)`` of a tower call ``(pixel_values, grid_thw)``."""
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if not isinstance(grid, Tensor) or grid.dim() != 2 or grid.shape[-1] != 3:
            raise ValueError(f"grid_thw must be an int tensor [n, 3] of (t, h, w) rows, got {grid!r}")
        rows = grid.tolist()
        hw = {(int(h), int(w)) for _, h, w in rows}
        if len(hw) != 1:
            raise ValueError(f"all rows of grid_thw must share one (h, w) in a cached call (one stream), got {rows}")
        items = sum(int(t) for t, _, _ in rows)
        if items < 1:
            raise ValueError(f"grid_thw has no temporal patches: {rows}")
        (h, w), = hw
        px = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(px, Tensor) or px.dim() != 2 or px.shape[0] != items * h * w:
            raise ValueError(f"pixel_values must be [{items * h * w}, patch_dim] for grid_thw {rows}, "
                             f"got {tuple(getattr(px, 'shape', ()))}")
        return items, (h, w)

    @staticmethod
    def unpack(args: tuple, kwargs: dict, items: int, state, memo: dict) -> tuple[Tensor, tuple, AttentionPattern]:
        """Block call -> ``(x [I, T, D], rope (cos, sin) of one item, pattern)``.

        ``memo`` lives for one tower call: the tower passes the same ``cu_seqlens`` tensor
        to all its window blocks (and another to its full blocks), so each is read once."""
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cu = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
        rope = kwargs.get("position_embeddings", args[2] if len(args) > 2 else None)
        total, dim = hidden.shape
        if total % items:
            raise ValueError(f"block input of {total} tokens does not split into {items} items")
        t = total // items
        seen = memo.get(id(cu))
        if seen is None or seen[0] is not cu:
            seen = memo[id(cu)] = (cu, QwenGlue._pattern(cu, items, t, state, hidden.device))
        cos, sin = rope
        return hidden.view(items, t, dim), (cos[:t], sin[:t]), seen[1]

    @staticmethod
    def _pattern(cu: Tensor, items: int, t: int, state, device) -> AttentionPattern:
        bounds = [int(c) for c in cu.tolist()]
        per_item = [c for c in bounds if c <= t]
        expect = [c + j * t for j in range(items) for c in per_item[1:]]
        if per_item[0] != 0 or per_item[-1] != t or bounds[1:] != expect:
            raise ValueError("cu_seqlens must repeat the same windows inside every item; "
                             "attention crossing an item cannot be cached")
        return state.pattern(tuple(b - a for a, b in itertools.pairwise(per_item)), device)

    @staticmethod
    def pack(y: Tensor) -> Tensor:
        return y.reshape(-1, y.shape[-1])
