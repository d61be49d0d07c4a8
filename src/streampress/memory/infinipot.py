"""InfiniPot-V (KV_MEMORY.md section 2): continual, query-agnostic KV compression with TaR + VaN.

Visual tokens are appended until every (layer, KV head) holds ``|M| = f p`` of them
(``f`` items of ``p`` grid tokens); then each (layer, KV head) independently keeps
``|C| = c p``:

- the ``r`` most recent items, whole (R);
- TaR: the ``B_tar - |R|`` past tokens least redundant with the recent items, score
  ``-(1/r) sum_t' cos(K[x], K[(t', i_x, j_x)])`` on the cached post-RoPE keys, compared at
  the same patch coordinate (``tar_alignment="coordinate"``, the paper) or the same slot
  of a pseudo-frame of ``p`` slots (``"slot"``, the official code);
- VaN: the remaining ``B_van = round((1 - alpha) |C|)`` slots by largest value L2 norm.

Kept rows are copied bit for bit in slot order (time, raster), positions unchanged; the
prefix is never touched. Scores in (at least) float32, ties to the later slot
(:func:`.slots.stable_topk`). ``alpha = 0`` is pure VaN without recent protection (code parity).

VaN pooling (step 5) is off by default (the released scripts' setting); ``pooling="code"``
averages the VaN scores by the official code's depth schedule (:func:`pool_van`). The
paper's CV-thresholded mode is not offered: its thresholds are unpublished.

Session adaptations (decisions, also in the README): ``f = budget // p`` (floor: the
budget is a cap); compression runs after each ``add_frames`` call whose items bring the
count to ``|M|`` (one item per call gives the paper's schedule exactly; a bigger chunk
compresses once, after the chunk); with a pruner, items hold fewer than ``p`` tokens, the
trigger stays ``n >= |M|`` and a coordinate missing from some recent items is averaged
over the recent items that have it (score 0 when none has it).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import _layers
from .slots import Plan, SlotTable, stable_topk, visual_slots

__all__ = ["InfiniPotV", "InfiniPotConfig", "infinipot_config", "tar_scores", "infinipot_keep", "pool_group",
           "pool_slots", "pool_van", "POOL_SCHEDULE"]

# C-IPV's layer groups (KV_MEMORY.md 2.4 step 5): (pooled dims, kernel) for q = 0, 1, 2, 3
POOL_SCHEDULE = ((3, 7), (2, 5), (1, 3), (0, 1))


@dataclass(frozen=True)
class InfiniPotConfig:
    """Resolved sizes: items per budget ``f``, after compression ``c``, recent ``r``, tokens
    per item ``p``, ``M = f p``, ``C = c p``, ``b_van``, ``b_tar`` (recent included)."""

    f: int
    c: int
    r: int
    p: int
    M: int
    C: int
    b_van: int
    b_tar: int


def infinipot_config(budget: int, p: int, compress_ratio: float = 0.75, recent_ratio: float = 0.125,
                     alpha: float = 0.5) -> InfiniPotConfig:
    """The sizes for ``budget`` tokens and items of ``p`` tokens (ValueError when invalid)."""
    f = budget // p
    c = math.floor(compress_ratio * f)
    r = max(1, math.floor(recent_ratio * f))
    C = c * p
    b_van = round((1 - alpha) * C)  # Python round: half to even (C-IPV)
    b_tar = C - b_van
    cfg = InfiniPotConfig(f, c, r, p, f * p, C, b_van, b_tar)
    if f < 2 or not 1 <= c < f:
        raise ValueError(f"infinipot_v: budget={budget} holds {f} item(s) of {p} tokens; it needs at least 2 items "
                         f"and compress_ratio*items >= 1 (got {c} after compression)")
    if alpha > 0 and r * p > b_tar:
        raise ValueError(f"infinipot_v: the {r} recent item(s) ({r * p} tokens) exceed TaR's budget "
                         f"{b_tar} = |C| - round((1 - alpha)|C|); raise alpha, budget or compress_ratio")
    return cfg


def tar_scores(keys: torch.Tensor, coords: torch.Tensor, recent: torch.Tensor, groups: int,
               eps: float = 1e-9) -> torch.Tensor:
    """TaR score of every slot: ``-(mean over recent items having the slot's coordinate) of
    cos(K[x], K[recent item, same coordinate])`` (0 where none has it).

    ``keys [H, n, D]``; ``coords [H, n]`` (int64 in ``[0, groups)``); ``recent [H, n]`` bool
    (the recent items' slots; each recent item holds each coordinate at most once).
    Returns float ``[H, n]`` (float32, float64 for float64 keys); recent slots get a
    score too (callers mask them)."""
    k = keys.to(torch.promote_types(keys.dtype, torch.float32))
    kn = k / (k.norm(dim=-1, keepdim=True) + eps)
    h, n, d = kn.shape
    sums = kn.new_zeros(h, groups, d)
    counts = kn.new_zeros(h, groups)
    rc = torch.where(recent, coords, 0)
    sums.scatter_add_(1, rc[..., None].expand(h, n, d), kn * recent[..., None])
    counts.scatter_add_(1, rc, recent.to(kn.dtype))
    dot = (kn * sums.gather(1, coords[..., None].expand(h, n, d))).sum(-1)
    cnt = counts.gather(1, coords)
    return torch.where(cnt > 0, -dot / cnt.clamp(min=1), torch.zeros_like(dot))


def pool_group(layer: int, num_layers: int) -> int:
    """C-IPV's layer group ``q = min(3, floor(l / max(1, floor(L / 4))))`` (the code has no
    ``min(3, .)`` and fails when ``L`` is not a multiple of 4; clamped here)."""
    return min(3, layer // max(1, num_layers // 4))


def pool_slots(van: torch.Tensor, dims: int, kernel: int, grid: tuple[int, int]) -> torch.Tensor:
    """Average-pool the VaN scores ``van [H, n]`` of one layer (every KV head at once) on the
    slot grid, as C-IPV does (``kvcache_utils.py``, adaptive pooling):

    - ``dims = 1``: along the slot sequence (no clamp);
    - ``dims = 2``: per pseudo-item over (row, col); ``dims = 3``: over (item, row, col);
      the slots, in slot order, are reshaped into consecutive pseudo-items of
      ``p = h' w'`` slots on the ``grid = (h', w')`` (misaligned once items are partial,
      like TaR's ``slot`` alignment). The kernel is clamped to ``min(kernel, items, h', w')``
      (C-IPV uses the item count for 2-D too), lowered by 1 if even; below 2 nothing is pooled;
    - ``dims = 0`` or ``kernel = 1``: ``van`` itself, unchanged.

    Stride 1, zero padding ``k // 2``, divisor always ``k ** dims`` (``count_include_pad``:
    border scores shrink). Remainder: when ``n`` is not a multiple of ``p`` (items smaller
    than their grid, e.g. under a pruner; C-IPV would fail on its reshape) the last
    pseudo-item is completed with zeros, counted like the border padding (0, divisor
    unchanged; the paper's own pooling also counts missing tokens as 0), and it counts as an
    item in the clamp. Returns ``[H, n]`` in ``van``'s dtype."""
    if dims == 0 or kernel <= 1:
        return van
    h, n = van.shape
    x = van[:, None, :]  # [H, 1, n]
    if dims == 1:
        return F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2)[:, 0]
    rows, cols = grid
    p = rows * cols
    items = -(-n // p)
    k = min(kernel, items, rows, cols)
    if k % 2 == 0:
        k -= 1
    if k < 2:
        return van
    x = F.pad(van, (0, items * p - n)).reshape(h, items, rows, cols)
    if dims == 2:
        y = F.avg_pool2d(x.reshape(h * items, 1, rows, cols), k, stride=1, padding=k // 2)
    elif dims == 3:
        y = F.avg_pool3d(x[:, None], k, stride=1, padding=k // 2)
    else:
        raise ValueError(f"pool_slots: dims must be 0-3, got {dims}")
    return y.reshape(h, items * p)[:, :n]


def pool_van(van: torch.Tensor, layer: int, num_layers: int, grid: tuple[int, int]) -> torch.Tensor:
    """``pooling="code"``: the VaN scores ``van [H, n]`` of cache layer ``layer`` (of
    ``num_layers``) pooled by C-IPV's depth schedule (:data:`POOL_SCHEDULE`): group
    (:func:`pool_group`) 0 = 3-D kernel 7, 1 = 2-D kernel 5, 2 = 1-D kernel 3, 3 = none
    (``van`` itself). See :func:`pool_slots` for the grid, the clamp and the remainder."""
    dims, kernel = POOL_SCHEDULE[pool_group(layer, num_layers)]
    return pool_slots(van, dims, kernel, grid)


def infinipot_keep(keys: torch.Tensor, values: torch.Tensor, coords: torch.Tensor, recent: torch.Tensor,
                   groups: int, C: int, b_tar: int, alpha: float,
                   pool: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Indices ``[H, C]`` (increasing) of the visual slots one layer keeps, per KV head:
    ``F = R + TopK_past(TaR, b_tar - |R|)``, then ``TopK_rest(VaN, C - |F|)``.
    ``keys, values [H, n, D]``; ``coords [H, n]``; ``recent [H, n]`` bool; ``pool``: applied
    to the VaN scores ``[H, n]`` (all visual slots) before selection (step 5; e.g.
    :func:`pool_van`), None = off."""
    n = keys.shape[1]
    C = min(C, n)
    van = values.to(torch.promote_types(values.dtype, torch.float32)).norm(dim=-1)  # [H, n]
    if pool is not None:
        van = pool(van)
    if alpha == 0:
        return stable_topk(van, C)
    n_recent = int(recent[0].sum())
    if not bool((recent.sum(1) == n_recent).all()):
        raise RuntimeError("infinipot_v: the recent items are not whole in every head")
    forced = recent.clone()
    take = min(max(0, b_tar - n_recent), n - n_recent)
    if take:
        tar = tar_scores(keys, coords, recent, groups).masked_fill(recent, -math.inf)
        forced.scatter_(1, stable_topk(tar, take), True)
    return stable_topk(van.masked_fill(forced, math.inf), C)


class InfiniPotV:
    """The InfiniPot-V method of a :class:`~.budget.BudgetStore` (per-stream use only)."""

    def __init__(self, policy):
        self.policy = policy

    def config(self, store) -> InfiniPotConfig:
        p = next((b.grid[0] * b.grid[1] for b in store.blocks if b.grid is not None), None)
        if p is None:  # blocks without grids: an item's visual token count
            p = max(store._visual_in(b) for b in store.blocks)
        pol = self.policy
        return infinipot_config(pol.budget, p, pol.compress_ratio, pol.recent_ratio, pol.alpha)

    @staticmethod
    def grid(store, cfg: InfiniPotConfig) -> tuple[int, int]:
        """The pseudo-item grid ``(h', w')`` of code-mode pooling: the grid of the block that
        sets ``p`` (:meth:`config`); ``(1, p)`` when no block has a grid (then only the 1-D
        layers pool: the 2-D/3-D kernels clamp to 1)."""
        return next(((int(b.grid[0]), int(b.grid[1])) for b in store.blocks if b.grid is not None), (1, cfg.p))

    def plan(self, store, table: SlotTable, prefix: int, max_position: int) -> Plan | None:
        cfg = self.config(store)
        visual = table.visual()
        n = int(visual[0, 0].sum())
        if n < cfg.M:
            return None
        items_all = table.item[0, 0][visual[0, 0]]
        recent_items = torch.unique(items_all)[-cfg.r:]
        keep = []
        layers = _layers(store.cache)
        grid = self.grid(store, cfg)
        for l, layer in enumerate(layers):
            idx = visual_slots(table, l)  # [H, n]
            h, d = idx.shape[0], layer.keys.shape[-1]
            gi = idx.to(layer.keys.device)[None, :, :, None].expand(1, h, idx.shape[1], d)
            k = layer.keys[..., prefix:, :].gather(2, gi)[0]
            v = layer.values[..., prefix:, :].gather(2, gi)[0]
            items = table.item[l].gather(1, idx)
            recent = torch.isin(items, recent_items)
            if self.policy.tar_alignment == "coordinate":
                coords = table.raster[l].gather(1, idx).to(torch.int64)
                groups = max(cfg.p, int(coords.max()) + 1)
            else:  # C-IPV: consecutive pseudo-frames of p slots
                coords = (torch.arange(idx.shape[1], device=idx.device) % cfg.p).expand_as(idx)
                groups = cfg.p
            pool = None
            if self.policy.pooling == "code":
                pool = functools.partial(pool_van, layer=l, num_layers=len(layers), grid=grid)
            chosen = infinipot_keep(k, v, coords.to(k.device), recent.to(k.device), groups, cfg.C, cfg.b_tar,
                                    self.policy.alpha, pool)
            keep.append(idx.gather(1, chosen.to(idx.device)))
        protected = recent_items.tolist() if self.policy.alpha > 0 else []
        return Plan(keep, protected=protected)
