"""Model-agnostic block math of STC-Cacher (ALGORITHMS.md section 5).

A vision-transformer block is ``h = x + Attn(LN1(x)); y = h + MLP(LN2(h))``. The encoder
glue (an :class:`EncoderGlue` each model family provides: ``streampress.models.qwen_cacher``,
``streampress.models.llava_onevision_cacher``) hands this module the block's pieces as a
:class:`BlockParts` object and the items of one call as ``x [I, T, D]`` (I items of T
tokens; attention never crosses an item). Two paths:

* :func:`dense_block` -- a *reference* item, computed in full. It also returns the
  :class:`BlockRef` the dependent items reuse: keys (after RoPE), values, the attention
  branch (after the output projection, before the residual) and the MLP branch.
* :func:`selective_block` -- the *dependent* items, all in one batch. Keys are projected
  for every token; the ``count`` tokens whose keys moved most from the reference
  (lowest cosine similarity over all heads) get fresh queries, values, attention, output
  projection and MLP; every other row reuses the reference's value / branch outputs.
  The residual stream itself is always fresh (``h = x + A~``, ``y = h + M~``).

Everything is batched over items and heads: one index set per block selects the rows
(gathered once per tensor that needs them, scattered back with ``index_copy_``), no
Python loop runs over tokens or heads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

Rope = tuple[Tensor, Tensor]  # (cos, sin), each [T, head_dim] for one item


class BlockParts(Protocol):
    """What the block math needs from one encoder block (implemented by the glue)."""

    num_heads: int
    head_dim: int
    scale: float

    def norm1(self, x: Tensor) -> Tensor: ...
    def norm2(self, h: Tensor) -> Tensor: ...
    def qkv(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]: ...  # each [..., H, d]
    def k(self, u: Tensor) -> Tensor: ...
    def qv(self, u: Tensor) -> tuple[Tensor, Tensor]: ...
    def out_proj(self, a: Tensor) -> Tensor: ...
    def mlp(self, h: Tensor) -> Tensor: ...


class EncoderGlue(Protocol):
    """What the cacher needs from one kind of vision tower (``glue_class(tower)``).

    Each model family provides its glue next to its adapter (e.g.
    ``streampress.models.qwen_cacher.QwenGlue``) and names it in its registration
    (``register_family(..., vision_glue={tower class name: "module:Class"})``); the cacher
    looks it up by the tower's class (:func:`streampress.models.vision_glue_for`)."""

    def blocks(self) -> list: ...  # the tower's transformer blocks, in order
    def parts(self, block) -> BlockParts: ...
    def call_kwargs(self, grid_thw: Tensor | None, kwargs: dict) -> dict: ...  # keywords of a tower call
    def call_layout(self, args: tuple, kwargs: dict) -> tuple[int, tuple]: ...  # (items, layout) of a call
    def unpack(self, args: tuple, kwargs: dict, items: int, state, memo: dict
               ) -> tuple[Tensor, Rope | None, AttentionPattern]: ...  # block call -> (x [I, T, D], rope, pattern)
    def pack(self, y: Tensor) -> Tensor: ...  # [I, T, D] -> the block's output layout


@dataclass(frozen=True)
class AttentionPattern:
    """Which keys of its item a query may attend to.

    ``kind``: ``"full"`` (the whole item), ``"windows"`` (equal contiguous windows of
    ``window`` tokens; Qwen2.5-VL at window-aligned sizes) or ``"segments"`` (contiguous
    windows of any lengths: ``lengths`` and per-token ``seg_ids [T]``).
    """

    kind: str
    window: int = 0
    lengths: tuple[int, ...] = ()
    seg_ids: Tensor | None = None

    @staticmethod
    def from_lengths(lengths: list[int], device: torch.device) -> AttentionPattern:
        total = sum(lengths)
        if len(lengths) == 1:
            return AttentionPattern("full")
        if len(set(lengths)) == 1:
            return AttentionPattern("windows", window=lengths[0])
        ids = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                      torch.tensor(lengths, device=device), output_size=total)
        return AttentionPattern("segments", lengths=tuple(lengths), seg_ids=ids)


@dataclass
class BlockRef:
    """Stored outputs of one block for reference item(s): leading dim = items (or 1)."""

    k: Tensor  # [R, T, H, d], after RoPE
    v: Tensor  # [R, T, H, d]
    a: Tensor  # [R, T, D] attention branch (after output projection)
    m: Tensor  # [R, T, D] MLP branch

    def take(self, index: Tensor | int) -> BlockRef:
        """Items ``index`` (an int keeps a leading dim of 1; a tensor gathers)."""
        if isinstance(index, int):
            sl = slice(index, index + 1)
            return BlockRef(self.k[sl], self.v[sl], self.a[sl], self.m[sl])
        return BlockRef(self.k[index], self.v[index], self.a[index], self.m[index])

    @staticmethod
    def cat(refs: list[BlockRef]) -> BlockRef:
        return BlockRef(*(torch.cat([getattr(r, f) for r in refs]) for f in "kvam"))


def apply_rope(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """2-D vision RoPE as the Qwen encoders apply it (in float32, cast back).

    ``t [..., n, H, d]``, ``cos``/``sin`` ``[n, d]`` broadcast over heads. The encoders compute
    ``t * cos + rotate_half(t) * sin`` with ``rotate_half(t) = [-t2, t1]``; here that is one
    product and two in-place multiply-adds on the halves (one new tensor instead of five).
    """
    dtype = t.dtype
    tf = t.float()
    cos = cos.unsqueeze(-2).float()
    sin = sin.unsqueeze(-2).float()
    half = tf.shape[-1] // 2
    out = tf * cos
    out[..., :half].addcmul_(tf[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(tf[..., :half], sin[..., half:])
    return out.to(dtype)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None = None) -> Tensor:
    """``[..., n, H, d]`` layout in and out (heads moved for SDPA and back)."""
    out = F.scaled_dot_product_attention(q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2),
                                         attn_mask=mask, scale=scale)
    return out.transpose(-3, -2)


def dense_attention(q: Tensor, k: Tensor, v: Tensor, pattern: AttentionPattern, scale: float) -> Tensor:
    """Attention of every token of R items: ``[R, T, H, d]`` -> ``[R, T, H*d]``."""
    r, t, h, d = q.shape
    if pattern.kind == "full":
        out = _sdpa(q, k, v, scale)
    elif pattern.kind == "windows":
        n = t // pattern.window
        shape = (r * n, pattern.window, h, d)
        out = _sdpa(q.reshape(shape), k.reshape(shape), v.reshape(shape), scale)
    else:  # unequal windows: one batched call per window, like the encoder itself
        outs = [_sdpa(qs, ks, vs, scale) for qs, ks, vs in
                zip(*(x.split(list(pattern.lengths), dim=1) for x in (q, k, v)))]
        out = torch.cat(outs, dim=1)
    return out.reshape(r, t, h * d)


def selective_attention(q_sel: Tensor, k: Tensor, v: Tensor, idx: Tensor, pattern: AttentionPattern,
                        scale: float, pad_to_window: bool | None = None) -> Tensor:
    """Attention of the selected queries of B items over all keys/values of their item.

    ``q_sel [B, r, H, d]`` are the queries of tokens ``idx [B, r]`` (ascending per item);
    ``k``, ``v`` ``[B, T, H, d]``. Returns ``[B, r, H*d]``. Window patterns: a query sees
    only its own window. Equal windows use per-window padding (each window's selected
    queries packed into ``c_max`` slots, attention over that window's keys only), so the
    cost is about that of the dense window attention; other windowings use a boolean mask
    built by one vectorised comparison of window ids. ``pad_to_window``: pad every window
    to ``min(window, r)`` slots instead of reading the fullest window's count (which needs
    a host sync); default: pad on accelerators, read the count on a CPU.
    """
    b, r, h, d = q_sel.shape
    t = k.shape[1]
    if pattern.kind == "full":
        return _sdpa(q_sel, k, v, scale).reshape(b, r, h * d)
    if pattern.kind == "segments":
        seg = pattern.seg_ids
        mask = (seg[idx].unsqueeze(-1) == seg.view(1, 1, t)).unsqueeze(1)  # [B, 1, r, T]
        return _sdpa(q_sel, k, v, scale, mask).reshape(b, r, h * d)
    w = pattern.window
    n = t // w
    win = idx // w  # [B, r], non-decreasing per item
    counts = torch.zeros(b, n, dtype=torch.long, device=idx.device)
    counts.scatter_add_(1, win, torch.ones_like(win))
    if pad_to_window is None:
        pad_to_window = idx.device.type != "cpu"
    c_max = min(w, r) if pad_to_window else int(counts.max())
    starts = counts.cumsum(1) - counts
    pos = torch.arange(r, device=idx.device).unsqueeze(0) - starts.gather(1, win)
    base = (torch.arange(b, device=idx.device) * n).unsqueeze(1)
    slots = ((base + win) * c_max + pos).reshape(-1)  # [B*r] into [B*n*c_max]
    q_pad = q_sel.new_zeros(b * n * c_max, h, d)
    q_pad.index_copy_(0, slots, q_sel.reshape(b * r, h, d))
    out = _sdpa(q_pad.view(b * n, c_max, h, d), k.reshape(b * n, w, h, d), v.reshape(b * n, w, h, d), scale)
    return out.reshape(b * n * c_max, h * d).index_select(0, slots).view(b, r, h * d)


def dense_block(parts: BlockParts, x: Tensor, rope: Rope | None, pattern: AttentionPattern,
                prepared: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, BlockRef]:
    """Full computation of R reference items ``x [R, T, D]`` -> ``(y, BlockRef)``.

    ``prepared``: ``(LN1(x), keys)`` of these items if already computed (the refresh test at
    the first block); then only the queries and values are projected."""
    if prepared is None:
        u = parts.norm1(x)
        q, k, v = parts.qkv(u)
        if rope is not None:
            k = apply_rope(k, *rope)
    else:
        u, k = prepared
        q, v = parts.qv(u)
    if rope is not None:
        q = apply_rope(q, *rope)
    a = parts.out_proj(dense_attention(q, k, v, pattern, parts.scale))
    h = x + a
    m = parts.mlp(parts.norm2(h))
    return h + m, BlockRef(k, v, a, m)


def project_keys(parts: BlockParts, u: Tensor, rope: Rope | None) -> Tensor:
    """Keys (after RoPE) of every token from ``u = LN1(x)``: ``[I, T, D]`` -> ``[I, T, H, d]``."""
    k = parts.k(u)
    return apply_rope(k, *rope) if rope is not None else k


def key_similarity(k: Tensor, k_ref: Tensor) -> Tensor:
    """Cosine similarity per token over all heads: ``[B, T, H, d]`` x ``[B|1, T, H, d]`` -> ``[B, T]`` (float32)."""
    kf = k.flatten(-2).float()
    rf = k_ref.flatten(-2).float()
    dot = torch.linalg.vecdot(kf, rf.expand_as(kf))
    norms = torch.linalg.vector_norm(kf, dim=-1) * torch.linalg.vector_norm(rf, dim=-1)
    return dot / norms.clamp_min(1e-12)


def select_tokens(sim: Tensor, count: int) -> Tensor:
    """Indices ``[B, count]`` (ascending) of the ``count`` lowest similarities per item."""
    b, t = sim.shape
    if count >= t:
        return torch.arange(t, device=sim.device).expand(b, t)
    idx = torch.topk(sim, count, dim=1, largest=False, sorted=False).indices
    return idx.sort(dim=1).values


def selective_block(parts: BlockParts, x: Tensor, ref: BlockRef, rope: Rope | None,
                    pattern: AttentionPattern, count: int, prepared: tuple[Tensor, Tensor] | None = None,
                    buffer: Callable[[str, tuple, torch.dtype, torch.device], Tensor] | None = None,
                    ) -> tuple[Tensor, Tensor]:
    """STC update of B dependent items ``x [B, T, D]`` (contiguous) against ``ref`` (leading dim B or 1).

    ``prepared``: ``(LN1(x), keys)`` of these items if already computed (the refresh test
    at the first block). ``buffer(name, shape, dtype, device)``: optional reusable scratch
    tensor provider. Returns ``(y [B, T, D], idx [B, count])``.
    """
    b, t, dim = x.shape
    hd, nh = parts.head_dim, parts.num_heads
    if prepared is not None:
        u, k = prepared
    else:
        u = parts.norm1(x)
        k = project_keys(parts, u, rope)
    idx = select_tokens(key_similarity(k, ref.k), count)
    r = idx.shape[1]
    flat = (idx + (torch.arange(b, device=x.device) * t).unsqueeze(1)).reshape(-1)  # [B*r]

    u_sel = u.reshape(b * t, dim).index_select(0, flat)
    q_sel, v_sel = parts.qv(u_sel)  # [B*r, H, d]
    if rope is not None:
        cos, sin = rope
        q_sel = apply_rope(q_sel, cos.index_select(0, idx.reshape(-1)), sin.index_select(0, idx.reshape(-1)))

    # V~ = Vref with the selected rows replaced (scratch buffer reused across blocks/frames).
    shape = (b, t, nh, hd)
    v_mix = buffer("v_mix", shape, v_sel.dtype, x.device) if buffer is not None else x.new_empty(shape)
    v_mix.copy_(ref.v.expand(shape))
    v_mix.view(b * t, nh, hd).index_copy_(0, flat, v_sel)

    attn = selective_attention(q_sel.view(b, r, nh, hd), k, v_mix, idx, pattern, parts.scale)
    a_sel = parts.out_proj(attn.reshape(b * r, nh * hd))

    # Outside the selection y = (x + Aref) + Mref (residual always fresh); the selected rows
    # are h_sel + M(h_sel) with h_sel = x + A_sel, written over them.
    h_sel = x.reshape(b * t, dim).index_select(0, flat) + a_sel
    m_sel = parts.mlp(parts.norm2(h_sel))
    y = x + ref.a
    y.add_(ref.m)
    y.view(b * t, dim).index_copy_(0, flat, h_sel + m_sel)
    return y, idx
