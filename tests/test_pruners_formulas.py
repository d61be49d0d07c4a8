"""Hand-computed cases for DTD, MSSAVT and StreamingAssistant (ALGORITHMS.md sections 1-3).

Tokens are 2-D unit vectors at given angles (cosines are then cos(angle difference)) or
orthogonal basis vectors, so every expected mask can be checked by hand. Several cases are
built so that a plausible bug (diagonal neighbours, wrapped neighbours at the border, the
other checkerboard colour, DTD against the last *kept* token, MSSAVT only on DTD's
survivors) gives a different mask.
"""

import math

import pytest
import torch

import streampress
from streampress.pruners.base import unit_tokens
from streampress.pruners.dtd import temporal_similarity
from streampress.pruners.mssavt import neighbour_similarity


def angles(*grids):
    """``[T, H, W, 2]`` unit vectors from nested lists of angles in degrees."""
    a = torch.tensor(grids, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=-1).float()


def basis(rows, D=4):
    """``[1, H, W, D]`` one-hot vectors from a nested list of basis indices."""
    idx = torch.tensor(rows)
    return torch.nn.functional.one_hot(idx, D).float()[None]


def mask(rows):
    return torch.tensor(rows, dtype=torch.bool)


# ------------------------------------------------------------------------- DTD
def test_dtd_threshold_per_position():
    x = angles([[0, 0, 0]], [[10, 60, 120]])  # similarities to grid 0: .985, .5, -.5
    for tau, expected in ((0.4, [[False, False, True]]), (0.6, [[False, True, True]]), (0.99, [[True, True, True]])):
        keep = streampress.create_pruner("dtd", tau=tau)(x)
        assert keep[0].all()  # first grid of the stream: kept whole
        assert torch.equal(keep[1], mask(expected)), tau


def test_dtd_compares_with_the_previous_grid_not_the_last_kept_token():
    # One position drifting 0 -> 25 -> 50 degrees: grid 1 is dropped (cos 25 = .906 > .7),
    # grid 2 is compared with grid 1 (cos 25 again, dropped), not with grid 0 (cos 50 = .643).
    x = angles([[0]], [[25]], [[50]])
    whole = streampress.create_pruner("dtd", tau=0.7)(x)
    assert whole.flatten().tolist() == [True, False, False]
    pruner = streampress.create_pruner("dtd", tau=0.7)
    per_call = [pruner(x[t : t + 1]).item() for t in range(3)]  # the previous grid is carried
    assert per_call == [True, False, False]


def test_dtd_keep_ratio_keeps_the_least_similar():
    x = angles([[0, 0, 0, 0]], [[10, 60, 120, 5]])  # similarities .985, .5, -.5, .996
    keep = streampress.create_pruner("dtd", keep_ratio=0.25)(x)
    assert keep[0].all()
    assert keep[1].tolist() == [[False, False, True, False]]
    keep = streampress.create_pruner("evs", keep_ratio=0.5)(x)
    assert keep[1].tolist() == [[False, True, True, False]]


def test_temporal_similarity_values():
    x = angles([[0, 90]], [[30, 90]], [[30, 0]])
    sim = temporal_similarity(unit_tokens(x), None)
    assert torch.isneginf(sim[0]).all()
    torch.testing.assert_close(sim[1:], torch.tensor([[[math.cos(math.pi / 6), 1.0]], [[1.0, 0.0]]]), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------- MSSAVT
GRID_2x3 = [[0, 10, 40], [90, 30, 45]]  # angles in degrees
# R by hand: (0,0) max(cos10, cos90) = .985; (0,1) max(cos10, cos30, cos20) = .985;
# (0,2) max(cos30, cos5) = .996; (1,0) max(cos90, cos60) = .5;
# (1,1) max(cos20, cos60, cos15) = .966; (1,2) max(cos5, cos15) = .996.
R_2x3 = [[10, 10, 5], [60, 15, 5]]  # the angle whose cosine is R


def test_neighbour_similarity_values():
    r = neighbour_similarity(unit_tokens(angles(GRID_2x3)))
    expected = torch.tensor(R_2x3, dtype=torch.float64).mul(math.pi / 180).cos().float()[None]
    torch.testing.assert_close(r, expected, atol=1e-6, rtol=0)


def test_mssavt_threshold_drops_only_the_odd_colour():
    x = angles(GRID_2x3)  # eligible: (0,1) R=.985, (1,0) R=.5, (1,2) R=.996
    assert streampress.create_pruner("mssavt", tau=0.6)(x)[0].tolist() == [[True, False, True], [True, True, False]]
    assert streampress.create_pruner("mssavt", tau=0.99)(x)[0].tolist() == [[True, True, True], [True, True, False]]
    assert streampress.create_pruner("mssavt", tau=0.4)(x)[0].tolist() == [[True, False, True], [False, True, False]]


@pytest.mark.parametrize(
    "ratio, expected",
    [
        (0.7, [[True, True, True], [True, True, False]]),  # k = 5: drop the highest R, (1,2)
        (0.6, [[True, False, True], [True, True, False]]),  # k = 4: then (0,1)
        (0.5, [[True, False, True], [False, True, False]]),  # k = 3: every eligible token
        (0.1, [[True, False, True], [False, True, False]]),  # k = 1: cannot drop more than those
    ],
)
def test_mssavt_keep_ratio(ratio, expected):
    assert streampress.create_pruner("mssavt", keep_ratio=ratio)(angles(GRID_2x3))[0].tolist() == expected


def test_mssavt_ignores_diagonal_neighbours():
    # Every odd-colour token is e0; its diagonal neighbours are e0 too, its 4-neighbours
    # are e1/e2 (orthogonal): R = 0 for all of them, so nothing is dropped.
    x = basis([[1, 0, 2], [0, 1, 0], [2, 0, 1]])
    torch.testing.assert_close(neighbour_similarity(x)[0][checker(3, 3)], torch.zeros(4))
    assert streampress.create_pruner("mssavt", tau=0.5)(x).all()


def test_mssavt_does_not_wrap_at_the_border():
    # Row: e0 e1 e2 e0. Token 3's only neighbour is token 2 (orthogonal); token 0 would be
    # its neighbour only if the grid wrapped around.
    assert streampress.create_pruner("mssavt", tau=0.5)(basis([[0, 1, 2, 0]])).all()
    assert streampress.create_pruner("mssavt", tau=0.5)(basis([[0], [1], [2], [0]])).all()
    # In raster order (1,0) follows (0,2); they are not neighbours.
    x = basis([[1, 2, 0], [0, 3, 2]])
    assert streampress.create_pruner("mssavt", tau=0.5)(x).all()
    assert neighbour_similarity(x)[0, 1, 0] == 0


def test_mssavt_checkerboard_colour():
    same = torch.ones(1, 2, 2, 3)
    assert streampress.create_pruner("mssavt", tau=0.5)(same)[0].tolist() == [[True, False], [False, True]]
    assert streampress.create_pruner("mssavt", tau=0.5)(torch.ones(1, 1, 2, 3))[0].tolist() == [[True, False]]
    assert streampress.create_pruner("mssavt", tau=0.5)(torch.ones(1, 2, 1, 3))[0].tolist() == [[True], [False]]


def test_mssavt_single_token_grid():
    assert torch.isneginf(neighbour_similarity(torch.ones(2, 1, 1, 3))).all()
    assert streampress.create_pruner("mssavt", tau=-1.0)(torch.ones(2, 1, 1, 3)).all()
    assert streampress.create_pruner("mssavt", keep_ratio=0.01)(torch.ones(2, 1, 1, 3)).all()


def checker(H, W):
    return (torch.arange(H)[:, None] + torch.arange(W)[None, :]) % 2 == 1


# ------------------------------------------------------------ StreamingAssistant
def test_streaming_assistant_union_on_the_full_grid():
    # Grid 1: token 0 did not move (DTD drops it); token 1 turned towards token 0's
    # direction: MSSAVT drops it, justified by token 0 although DTD dropped token 0.
    x = angles([[0, 90]], [[0, 3]])
    keep = streampress.create_pruner("streaming_assistant", tau_t=0.5, tau_s=0.5)(x)
    assert keep[0].tolist() == [[True, True]]  # first grid: spatial only, cos 90 = 0
    assert keep[1].tolist() == [[False, False]]


def test_streaming_assistant_is_dtd_and_mssavt_combined():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, 6, generator=g)
    x = torch.stack([base + 0.8 * torch.randn(6, 5, 6, generator=g) for _ in range(5)])
    for tau_t, tau_s in ((0.5, 0.5), (0.3, 0.7), (0.8, 0.2)):
        sa = streampress.create_pruner("streaming_assistant", tau_t=tau_t, tau_s=tau_s)
        dtd = streampress.create_pruner("dtd", tau=tau_t)
        mssavt = streampress.create_pruner("mssavt", tau=tau_s)
        expected = torch.cat([dtd(x[:2]) & mssavt(x[:2]), dtd(x[2:]) & mssavt(x[2:])])
        got = torch.cat([sa(x[:3]), sa(x[3:])])
        assert torch.equal(got, expected)
        assert 0 < (~got).sum() < got.numel()


def test_streaming_assistant_keep_ratio():
    # Grid 1 vs grid 0: temporal sims cos5 = .996, cos10 = .985, cos70 = .342.
    # Spatial R of the odd token (0,1) at grid 1: max(cos55, cos110) = .574.
    # Redundancy r = [.996, max(.985, .574), .342].
    x = angles([[0, 50, 100]], [[5, 60, 170]])
    keep = streampress.create_pruner("streaming_assistant", keep_ratio=1 / 3)(x)
    assert keep[0].tolist() == [[True, False, True]]  # first grid: only (0,1) may go, k = 1
    assert keep[1].tolist() == [[False, False, True]]
    keep = streampress.create_pruner("streaming_assistant", keep_ratio=0.5)(x)  # k = 2
    assert keep[1].tolist() == [[False, True, True]]
