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
(:func:`.slots.stable_topk`). VaN pooling is off (the released scripts' setting).
``alpha = 0`` is pure VaN without recent protection (code parity).

Session adaptations (decisions, also in the README): ``f = budget // p`` (floor: the
budget is a cap); compression runs after each ``add_frames`` call whose items bring the
count to ``|M|`` (one item per call gives the paper's schedule exactly; a bigger chunk
compresses once, after the chunk); with a pruner, items hold fewer than ``p`` tokens, the
trigger stays ``n >= |M|`` and a coordinate missing from some recent items is averaged
over the recent items that have it (score 0 when none has it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .slots import Plan, SlotTable, stable_topk, visual_slots

__all__ = ["InfiniPotV", "InfiniPotConfig", "infinipot_config", "tar_scores", "infinipot_keep"]


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


def infinipot_keep(keys: torch.Tensor, values: torch.Tensor, coords: torch.Tensor, recent: torch.Tensor,
                   groups: int, C: int, b_tar: int, alpha: float) -> torch.Tensor:
    """Indices ``[H, C]`` (increasing) of the visual slots one layer keeps, per KV head:
    ``F = R + TopK_past(TaR, b_tar - |R|)``, then ``TopK_rest(VaN, C - |F|)``.
    ``keys, values [H, n, D]``; ``coords [H, n]``; ``recent [H, n]`` bool."""
    n = keys.shape[1]
    C = min(C, n)
    van = values.to(torch.promote_types(values.dtype, torch.float32)).norm(dim=-1)  # [H, n]
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

    def plan(self, store, table: SlotTable, prefix: int, max_position: int) -> Plan | None:
        cfg = self.config(store)
        visual = table.visual()
        n = int(visual[0, 0].sum())
        if n < cfg.M:
            return None
        items_all = table.item[0, 0][visual[0, 0]]
        recent_items = torch.unique(items_all)[-cfg.r:]
        keep = []
        layers = [layer for layer in store.cache.layers if getattr(layer, "keys", None) is not None
                  and layer.keys.numel() > 0]
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
            chosen = infinipot_keep(k, v, coords.to(k.device), recent.to(k.device), groups, cfg.C, cfg.b_tar,
                                    self.policy.alpha)
            keep.append(idx.gather(1, chosen.to(idx.device)))
        protected = recent_items.tolist() if self.policy.alpha > 0 else []
        return Plan(keep, protected=protected)
