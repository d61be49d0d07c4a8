"""Hand-computed cases and literal reference implementations for STC, VidCom2, DivPrune,
random and uniform (ALGORITHMS.md sections 4 and 6)."""

import math

import pytest
import torch
import torch.nn.functional as F

import streampress
from streampress.pruners.random_pruner import grid_seed
from streampress.pruners.stc import KERNEL_ALPHAS, kernel, redundancy_scores, token_statistics
from streampress.pruners.uniform import lattice_mask

ALPHAS = (1 / 8, 1 / 4, 1 / 2, 1, 2)


def K(d2):
    return sum(math.exp(-d2 / (2 * a)) for a in ALPHAS)


def literal_stc(grids, k, window=None, memory=True, buggy_subset_memory=False):
    """ALGORITHMS.md section 4 written out literally, one grid at a time, in float64."""
    _, H, W, D = grids.shape
    entries, masks = [], []
    for g in grids.double():
        Z = g.reshape(H * W, D)
        var = Z.var(dim=0, correction=0)
        ch = torch.sort(var, stable=True).indices[: D // 2]
        x = F.normalize(Z[:, ch], dim=-1)
        a = x.mean(dim=0)
        score = sum(torch.exp(-((x - a) ** 2).sum(-1) / (2 * al)) for al in ALPHAS)
        if memory:
            # The public code's bug stores means already restricted to each grid's channels.
            entries.append(Z.mean(dim=0)[ch] if buggy_subset_memory else Z.mean(dim=0))
            kept_entries = entries[-window:] if window else entries
            m = torch.stack(kept_entries).mean(dim=0)
            m = F.normalize(m if buggy_subset_memory else m[ch], dim=0)
            score = score + sum(torch.exp(-((x - m) ** 2).sum(-1) / (2 * al)) for al in ALPHAS)
        keep = torch.zeros(H * W, dtype=torch.bool)
        keep[torch.sort(score, stable=True).indices[:k]] = True
        masks.append(keep.view(H, W))
    return torch.stack(masks)


def varied_stream(T, H=4, W=5, D=12, seed=0):
    """Grids whose low-variance channels change from grid to grid and whose means drift."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(T):
        spread = torch.rand(D, generator=g) * 3 + 0.1  # per-channel spread, new every grid
        offset = torch.randn(D, generator=g) * 2 + t * 0.3
        out.append(offset + spread * torch.randn(H, W, D, generator=g))
    return torch.stack(out)


# ----------------------------------------------------------------------- STC
def test_kernel_values():
    d2 = torch.tensor([0.0, 0.25, 1.0, 2.25, 4.0])
    assert KERNEL_ALPHAS == (0.125, 0.25, 0.5, 1.0, 2.0)
    torch.testing.assert_close(kernel(d2), torch.tensor([K(v) for v in d2.tolist()]), atol=1e-6, rtol=0)
    assert kernel(torch.tensor(0.0)).item() == 5.0


def test_token_statistics_population_variance():
    z = torch.tensor([[[1.0, 0.5], [-2.0, 0.5], [3.0, 0.5], [4.0, -0.5]]])
    mean, var = token_statistics(z)
    torch.testing.assert_close(mean, torch.tensor([[1.5, 0.25]]))
    torch.testing.assert_close(var, torch.tensor([[5.25, 0.1875]]))  # divided by N = 4, not N - 1
    x = torch.randn(3, 7, 5)
    torch.testing.assert_close(token_statistics(x)[1], x.var(dim=1, correction=0))


def test_stc_hand_case():
    # Channel 1 has the lower variance (0.1875 vs 5.25): x = sign of channel 1 = [1, 1, 1, -1].
    # Frame anchor a = mean(x) = 0.5; memory (first grid) = full-D mean [1.5, 0.25], on
    # channel 1 normalised to m = 1. Distances: x = 1: d2(a) = .25, d2(m) = 0;
    # x = -1: d2(a) = 2.25, d2(m) = 4.
    x = torch.tensor([[[[1.0, 0.5], [-2.0, 0.5], [3.0, 0.5], [4.0, -0.5]]]])
    z = x.view(1, 4, 2)
    var = token_statistics(z)[1]
    scores = redundancy_scores(z, var, memory=z.mean(dim=1))
    s_same, s_odd = K(0.25) + K(0.0), K(2.25) + K(4.0)
    torch.testing.assert_close(scores, torch.tensor([[s_same, s_same, s_same, s_odd]]), atol=1e-5, rtol=0)
    frame_only = redundancy_scores(z, var)
    torch.testing.assert_close(frame_only, torch.tensor([[K(0.25)] * 3 + [K(2.25)]]), atol=1e-5, rtol=0)
    # Keep the odd one out (token 3). Scoring on the high-variance channel 0 instead
    # would single out token 1 (the only negative value there).
    assert streampress.create_pruner("stc", tokens_per_grid=1)(x).flatten().tolist() == [False, False, False, True]
    assert streampress.create_pruner("vidcom2", tokens_per_grid=1)(x).flatten().tolist() == [False, False, False, True]


@pytest.mark.parametrize("window", [None, 1, 2, 5])
def test_stc_matches_literal_reference(window):
    x = varied_stream(8)
    expected = literal_stc(x, k=6, window=window)
    pruner = streampress.create_pruner("stc", tokens_per_grid=6, window=window)
    got = torch.cat([pruner(x[:3]), pruner(x[3:4]), pruner(x[4:])])
    assert torch.equal(got, expected)


def test_stc_memory_keeps_full_d_means():
    """The fix: memory entries are full-D means, restricted afterwards. The public code's
    average of means over different channel subsets gives different masks on this stream."""
    x = varied_stream(8, seed=3)
    ours = streampress.create_pruner("stc", tokens_per_grid=6)(x)
    assert torch.equal(ours, literal_stc(x, k=6))
    assert not torch.equal(ours, literal_stc(x, k=6, buggy_subset_memory=True))


def test_stc_memory_is_reset():
    a, b = varied_stream(5, seed=1) * 3 + 4, varied_stream(5, seed=2)
    pruner = streampress.create_pruner("stc", tokens_per_grid=6)
    pruner(a)
    pruner.reset()
    assert torch.equal(pruner(b), literal_stc(b, k=6))
    # Power check: a memory that survived the first stream changes the masks.
    stale = streampress.create_pruner("stc", tokens_per_grid=6)
    stale(a)
    assert not torch.equal(stale(b), literal_stc(b, k=6))


def test_stc_memory_term_matters():
    x = varied_stream(6, seed=5)
    assert not torch.equal(streampress.create_pruner("stc", tokens_per_grid=6)(x), literal_stc(x, k=6, memory=False))


# ------------------------------------------------------------------- VidCom2
def test_vidcom2_matches_literal_reference_and_is_stateless():
    x = varied_stream(6, seed=7)
    pruner = streampress.create_pruner("vidcom2", keep_ratio=0.3)
    got = pruner(x)
    assert torch.equal(got, literal_stc(x, k=6, memory=False))
    # No memory: a grid's mask does not depend on what came before it.
    assert torch.equal(streampress.create_pruner("vidcom2", keep_ratio=0.3)(x[4:5]), got[4:5])


# ------------------------------------------------------------------ DivPrune
def literal_divprune(grids, k):
    _, H, W, D = grids.shape
    masks = []
    for g in grids.double():
        Z = g.reshape(H * W, D)
        x = F.normalize(Z, dim=-1)
        dist = 1 - x @ x.T
        # First: the token whose nearest *other* token is farthest (first in raster order on ties).
        nearest_other = [min(float(dist[i, j]) for j in range(H * W) if j != i) if H * W > 1 else 0.0
                         for i in range(H * W)]
        chosen = [max(range(H * W), key=lambda i: (nearest_other[i], -i))]
        while len(chosen) < k:
            best, best_i = -1.0, None
            for i in range(H * W):
                if i in chosen:
                    continue
                d = min(float(dist[i, j]) for j in chosen)
                if d > best:
                    best, best_i = d, i
            chosen.append(best_i)
        keep = torch.zeros(H * W, dtype=torch.bool)
        keep[chosen] = True
        masks.append(keep.view(H, W))
    return torch.stack(masks)


def test_divprune_hand_case():
    # Angles 0, 10, 90, 180 degrees. Nearest other token: 10, 10, 80 and 90 degrees away;
    # start at 180. Then the largest minimum distance: 0 (distance 2), then 90 (min
    # distance 1, whereas 10 is only 1 - cos 10 from 0).
    a = torch.tensor([0.0, 10.0, 90.0, 180.0]) * math.pi / 180
    x = torch.stack([a.cos(), a.sin()], dim=-1).view(1, 1, 4, 2)
    for k, expected in ((1, [0, 0, 0, 1]), (2, [1, 0, 0, 1]), (3, [1, 0, 1, 1]), (4, [1, 1, 1, 1])):
        got = streampress.create_pruner("divprune", tokens_per_grid=k)(x)
        assert got.flatten().int().tolist() == expected, k


def test_divprune_starts_from_the_most_isolated_token():
    # Angles 0, 1, 2, 3 (a cluster), 90 (alone), 180, 181 (a pair). The grid mean points
    # ~28 degrees, so 181 is the token farthest from the mean; but its nearest other token
    # is 1 degree away, while 90's nearest (3) is 87 degrees away: DivPrune starts at 90.
    # Then 181 (91 degrees from 90), then 0 (90 degrees from 90, 179 from 181).
    a = torch.tensor([0.0, 1.0, 2.0, 3.0, 90.0, 180.0, 181.0]) * math.pi / 180
    x = torch.stack([a.cos(), a.sin()], dim=-1).view(1, 1, 7, 2)
    for k, expected in ((1, [4]), (2, [4, 6]), (3, [0, 4, 6])):
        got = streampress.create_pruner("divprune", tokens_per_grid=k)(x)
        assert got.flatten().nonzero().flatten().tolist() == expected, k


def test_divprune_first_pick_ties_go_to_raster_order():
    # Two identical pairs: every token's nearest other is at distance 0; token 0 starts,
    # then the other pair's first token.
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]).view(1, 2, 2, 2)
    assert streampress.create_pruner("divprune", tokens_per_grid=2)(x).flatten().tolist() == [True, False, True, False]


@pytest.mark.parametrize("seed", range(4))
def test_divprune_matches_literal_reference(seed):
    x = varied_stream(3, H=4, W=4, D=10, seed=11 + seed)
    assert torch.equal(streampress.create_pruner("divprune", keep_ratio=0.4)(x), literal_divprune(x, k=7))
    assert torch.equal(streampress.create_pruner("divprune", tokens_per_grid=1)(x), literal_divprune(x, k=1))


# --------------------------------------------------------------------- random
def test_random_is_seeded_per_stream_and_grid():
    x = torch.randn(6, 4, 5, 3)
    p = streampress.create_pruner("random", keep_ratio=0.3, seed=5)
    first = p(x)
    assert first.sum(dim=(1, 2)).tolist() == [6] * 6
    assert len({tuple(m.flatten().tolist()) for m in first}) == 6  # a new draw every grid
    p.reset()
    assert torch.equal(p(x), first)  # reset replays the same stream of draws
    assert torch.equal(streampress.create_pruner("random", keep_ratio=0.3, seed=5)(torch.randn(6, 4, 5, 3)), first)
    assert not torch.equal(streampress.create_pruner("random", keep_ratio=0.3, seed=6)(x), first)
    assert len({grid_seed(s, i) for s in range(20) for i in range(50)}) == 1000


def test_random_is_uniform():
    p = streampress.create_pruner("random", keep_ratio=0.25, seed=1)
    freq = p(torch.zeros(2000, 4, 4, 2)).float().mean(dim=0)  # each position kept w.p. 1/4
    assert (freq - 0.25).abs().max() < 0.04


# -------------------------------------------------------------------- uniform
def test_uniform_lattices():
    even = (torch.arange(16)[:, None] % 2 == 0) & (torch.arange(16)[None, :] % 2 == 0)
    assert torch.equal(lattice_mask(16, 16, 64), even)  # 1/4: every second row and column
    assert torch.equal(lattice_mask(14, 14, 49), even[:14, :14])
    checker = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2 == 0
    assert torch.equal(lattice_mask(4, 4, 8), checker)  # 1/2: a checkerboard
    stride4 = (torch.arange(16)[:, None] % 4 == 0) & (torch.arange(16)[None, :] % 4 == 0)
    assert torch.equal(lattice_mask(16, 16, 16), stride4)  # 1/16: stride 4
    assert lattice_mask(1, 8, 2).flatten().tolist() == [True, False, False, False, True, False, False, False]


def test_uniform_ignores_content():
    p = streampress.create_pruner("uniform", keep_ratio=0.25)
    a, b = p(torch.randn(2, 16, 16, 4)), p(torch.randn(3, 16, 16, 4) * 9)
    assert torch.equal(a[0], b[2]) and a.sum() == 128
    assert torch.equal(a[0], lattice_mask(16, 16, 64))
