"""InfiniPot-V's optional VaN pooling, code mode (KV_MEMORY.md 2.4 step 5, 2.10 item 12).

Oracles: a hand-written golden table of the depth schedule, a 3x3 grid averaged by hand
(border divisor 9), a naive loop (explicit window sums / k^d, out-of-grid cells 0) for the
1-D, 2-D and 3-D pools, the kernel-1 identity (bit for bit), and stores driven directly with
synthetic items (8-layer tiny LLaVA-OV, float64): pooling="code" equals "off" in the
last-quarter layers, changes an early layer, keeps |C| per (layer, head) and the recent
items whole, and its kept sets equal a recomputation with the naive pools, layer by layer.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

from _budget_helpers import LLAVA, drive, model
from streampress.memory import BudgetMemory, BudgetStore
from streampress.memory.infinipot import infinipot_keep, pool_group, pool_slots, pool_van


def naive_pool(van: torch.Tensor, dims: int, k: int, grid: tuple[int, int]) -> torch.Tensor:
    """Explicit loops: every output is the sum of the ``k^dims`` window around it (cells off
    the grid, or past the last slot, count 0) divided by ``k^dims``. 2-D/3-D on consecutive
    pseudo-items of ``h' w'`` slots (the last one completed with zeros)."""
    h, n = van.shape
    out = torch.zeros_like(van)
    r = k // 2
    if dims == 1:
        for a, x in itertools.product(range(h), range(n)):
            out[a, x] = sum(van[a, y] for y in range(x - r, x + r + 1) if 0 <= y < n) / k
        return out
    rows, cols = grid
    p = rows * cols
    items = -(-n // p)

    def at(a, t, i, j):
        if 0 <= t < items and 0 <= i < rows and 0 <= j < cols and t * p + i * cols + j < n:
            return van[a, t * p + i * cols + j]
        return 0.0

    for a, x in itertools.product(range(h), range(n)):
        t, i, j = x // p, (x % p) // cols, x % cols
        dts = range(-r, r + 1) if dims == 3 else [0]
        total = sum(at(a, t + dt, i + di, j + dj) for dt in dts for di in range(-r, r + 1) for dj in range(-r, r + 1))
        out[a, x] = total / k**dims
    return out


def scores(h: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(h, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5


# ---- the schedule ------------------------------------------------------------------------------
def test_depth_schedule_golden_table():
    expected = {
        24: [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3],
        28: [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3],
        36: [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2,
             3, 3, 3, 3, 3, 3, 3, 3, 3],
        10: [0, 0, 1, 1, 2, 2, 3, 3, 3, 3],  # floor(10/4) = 2: the clamp to 3 takes the tail
        7: [0, 1, 2, 3, 3, 3, 3],  # floor(7/4) = 1
        3: [0, 1, 2],  # max(1, floor(3/4)) = 1: no "none" layer
        2: [0, 1],
        1: [0],
    }
    for L, groups in expected.items():
        assert [pool_group(l, L) for l in range(L)] == groups, L


def test_kernel_one_and_the_last_quarter_leave_van_bit_identical():
    v = scores(3, 5 * 12)
    for dims in (1, 2, 3):
        assert torch.equal(pool_slots(v, dims, 1, (3, 4)), v)
    for l in (6, 7):  # L = 8: group 3
        assert torch.equal(pool_van(v, l, 8, (3, 4)), v)
    for l in range(6):  # the other groups do pool here
        assert not torch.equal(pool_van(v, l, 8, (3, 4)), v)


# ---- the pools against hand computations and naive loops ---------------------------------------
def test_2d_kernel_3_on_a_3x3_grid_has_border_divisor_9():
    item0 = torch.arange(1, 10, dtype=torch.float64)  # rows 1 2 3 / 4 5 6 / 7 8 9
    v = torch.cat([item0, torch.full((9,), 9.0, dtype=torch.float64), torch.zeros(9, dtype=torch.float64)])
    v = torch.stack([v, 2 * v])  # two heads
    got = pool_slots(v, 2, 3, (3, 3))  # 3 items: the clamp min(3, 3, 3, 3) keeps 3
    # hand sums of each 3x3 window (zero outside), always divided by 9
    want0 = torch.tensor([1 + 2 + 4 + 5, 1 + 2 + 3 + 4 + 5 + 6, 2 + 3 + 5 + 6,
                          1 + 2 + 4 + 5 + 7 + 8, 45, 2 + 3 + 5 + 6 + 8 + 9,
                          4 + 5 + 7 + 8, 4 + 5 + 6 + 7 + 8 + 9, 5 + 6 + 8 + 9], dtype=torch.float64) / 9
    want1 = torch.tensor([4, 6, 4, 6, 9, 6, 4, 6, 4], dtype=torch.float64)  # 9 * (4, 6 or 9 cells) / 9
    want = torch.cat([want0, want1, torch.zeros(9, dtype=torch.float64)])
    assert torch.allclose(got[0], want, rtol=0, atol=1e-12)
    assert torch.allclose(got[1], 2 * want, rtol=0, atol=1e-12)
    assert abs(float(got[0, 0]) - 12 / 9) < 1e-12  # corner: 4 cells, divisor still 9 (not 4)


@pytest.mark.parametrize("dims, kernel, grid, n, k_eff", [
    (1, 3, None, 17, 3),
    (1, 5, None, 9, 5),
    (1, 3, None, 1, 3),  # one slot: v / 3
    (2, 3, (3, 4), 5 * 12, 3),
    (2, 5, (5, 6), 6 * 30, 5),
    (2, 5, (5, 6), 4 * 30, 3),  # 4 items: min(5, 4, 5, 6) = 4, even -> 3 (C-IPV counts items in 2-D too)
    (3, 3, (3, 4), 5 * 12, 3),
    (3, 5, (5, 6), 6 * 30, 5),
    (3, 7, (4, 4), 6 * 16, 3),  # min(7, 6, 4, 4) = 4 -> 3
    (3, 7, (3, 4), 8 * 12, 3),  # the schedule's group 0 on the e2e grid below
    (3, 3, (3, 4), 2 * 12 + 5, 3),  # remainder: the last pseudo-item completed with zeros
    (2, 3, (3, 4), 3 * 12 + 7, 3),
])
def test_pools_match_a_naive_loop(dims, kernel, grid, n, k_eff):
    v = scores(2, n, seed=n)
    got = pool_slots(v, dims, kernel, grid)
    assert got.shape == v.shape and got.dtype == v.dtype
    assert torch.allclose(got, naive_pool(v, dims, k_eff, grid), rtol=0, atol=1e-12)


def test_float32_scores_stay_float32():
    v = scores(2, 5 * 12).float()
    got = pool_slots(v, 3, 7, (3, 4))
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), naive_pool(v.double(), 3, 3, (3, 4)), atol=1e-6)


@pytest.mark.parametrize("dims, kernel, grid, n", [
    (3, 7, (2, 2), 5 * 4),  # min(7, 5, 2, 2) = 2 -> 1: skipped
    (2, 5, (2, 2), 5 * 4),
    (3, 7, (3, 3), 9),  # one item: min = 1
    (2, 5, (3, 3), 9),  # one item: 2-D skipped too (C-IPV clamps 2-D by the item count as well)
    (2, 5, (3, 3), 18),  # two items: 2 -> 1
    (3, 3, (1, 12), 5 * 12),  # a 1-row grid (or no grid at all: (1, p))
])
def test_kernels_clamped_below_2_skip_pooling(dims, kernel, grid, n):
    v = scores(2, n)
    assert torch.equal(pool_slots(v, dims, kernel, grid), v)


def test_schedule_uses_the_clamped_kernels():
    v = scores(2, 8 * 12)
    grid = (3, 4)  # 8 items: group 0 -> 3-D k 3, group 1 -> 2-D k 3, group 2 -> 1-D k 3
    for l, (dims, k) in enumerate([(3, 3), (3, 3), (2, 3), (2, 3), (1, 3), (1, 3)]):
        assert torch.allclose(pool_van(v, l, 8, grid), naive_pool(v, dims, k, grid), rtol=0, atol=1e-12), l


# ---- in a store ----------------------------------------------------------------------------------
P, GRID, BUDGET, ITEMS = 12, (3, 4), 96, 16  # f = 8, c = 6, r = 1, |C| = 72


@functools.cache
def run(pooling: str):
    """Drive an 8-layer store; the kept (item, raster) sets per (layer, head) after every
    compression, the |C| / recent checks, and the first compression's input."""
    m = model(LLAVA, num_layers=8)
    store = BudgetStore(m, BudgetMemory("infinipot_v", budget=BUDGET, pooling=pooling))
    captured = []
    real_plan = store.method.plan

    def plan(st, table, prefix, max_position):
        layers = [(l.keys.clone(), l.values.clone()) for l in st.cache.layers]
        out = real_plan(st, table, prefix, max_position)
        if out is not None and not captured:
            captured.append((layers, table, prefix))
        return out

    store.method.plan = plan
    kept, seen = [], 0
    for t in drive(store, m, ITEMS, P, grid=GRID):
        if store.compressions == seen:
            continue
        seen = store.compressions
        table, visual = store.table, store.table.visual()
        cfg = store.method.config(store)
        sets = []
        for l in range(visual.shape[0]):
            row = []
            for h in range(visual.shape[1]):
                ids = list(zip(table.item[l, h][visual[l, h]].tolist(), table.raster[l, h][visual[l, h]].tolist()))
                assert len(ids) == cfg.C  # exactly |C| per (layer, head)
                for item in range(t - cfg.r, t):  # the r most recent items whole
                    assert sum(1 for i, _ in ids if i == item) == cfg.p
                row.append(frozenset(ids))
            sets.append(row)
        kept.append(sets)
    return kept, captured[0], store.method.config(store)


def test_code_pooling_equals_off_in_the_last_quarter_and_changes_early_layers():
    off, _, _ = run("off")
    code, _, _ = run("code")
    assert len(off) == len(code) >= 2
    for a, b in zip(off, code):
        assert a[6] == b[6] and a[7] == b[7]  # group 3 (L = 8): no pooling
    first_off, first_code = off[0], code[0]
    changed = [l for l in range(6) if first_off[l] != first_code[l]]
    assert 0 in changed and len(changed) >= 3, changed


@pytest.mark.parametrize("layer, dims", [(0, 3), (1, 3), (2, 2), (3, 2), (4, 1), (5, 1), (6, 0), (7, 0)])
def test_code_pooling_kept_sets_equal_a_recomputation_with_the_naive_pools(layer, dims):
    code, (before, table, prefix), cfg = run("code")
    keys, values = before[layer][0][0, :, prefix:], before[layer][1][0, :, prefix:]  # first compression
    h, n = keys.shape[0], keys.shape[1]
    assert n == cfg.M  # items whole: slot x is item x // p, raster x % p
    coords = (torch.arange(n) % cfg.p).expand(h, n)
    recent = (torch.arange(n) >= n - cfg.r * cfg.p).expand(h, n)
    pool = None if dims == 0 else (lambda v: naive_pool(v, dims, 3, GRID))  # 8 items of 3x4: every kernel -> 3
    chosen = infinipot_keep(keys, values, coords, recent, cfg.p, cfg.C, cfg.b_tar, 0.5, pool=pool)
    for head in range(h):
        assert code[0][layer][head] == {(int(x) // P, int(x) % P) for x in chosen[head]}
