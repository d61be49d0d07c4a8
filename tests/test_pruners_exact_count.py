"""Exact-count mode: ``pruner.exact_mask(grids, total)`` keeps exactly ``total`` tokens of a clip.

Definition (``streampress.pruners.base``, "Exact-count mode"): NEVER_DROP tokens first, then
the lowest scores across all grids, ties by time then raster order; below the forced set,
``total`` forced tokens evenly spaced in time-then-raster order.

Relations to the per-grid modes tested here:
- one grid, ``total`` = the per-grid mask's count -> the same mask (every score method);
- any T, ``total`` = a threshold mask's count -> that threshold mask (threshold modes);
- any T, ``total`` = the per-grid mask's count -> a mask with that count that contains the
  forced set and whose kept-score sum is <= the per-grid mask's (it is the minimum);
- content-independent scores (uniform, random): identical to the per-grid mask at T*k;
- DivPrune: one grid, ``total = k`` -> the per-grid greedy selection.
"""

import pytest
import torch

from _pruner_helpers import PRUNER_CONFIGS, PRUNER_MATRIX, stream
from streampress.pruners import create_pruner
from streampress.pruners.base import NEVER_DROP, ScorePruner, exact_keep
from streampress.pruners.mssavt import checkerboard

METHODS = list(PRUNER_MATRIX)
SCORE_CONFIGS = [(m, p) for m, p in PRUNER_CONFIGS if m != "divprune"]


def _scores(name, params, grids):
    p = create_pruner(name, **params)
    return p.score(grids.float(), None)[0]


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("T", [1, 2, 3])
def test_exact_count_every_total(name, T):
    grids = stream(T, 3, 4)
    n = T * 12
    for total in range(n + 1):  # includes 0, below the forced set, and K = T*H*W
        p = create_pruner(name, **PRUNER_MATRIX[name][0])
        keep = p.exact_mask(grids, total)
        assert keep.shape == (T, 3, 4) and keep.dtype == torch.bool
        assert int(keep.sum()) == total, (name, T, total)
    assert bool(create_pruner(name).exact_mask(grids, n).all())


@pytest.mark.parametrize("name", METHODS)
def test_bad_total(name):
    p = create_pruner(name)
    g = stream(2, 3, 4)
    for bad in (-1, 25):
        with pytest.raises(ValueError, match="total must be in"):
            p.exact_mask(g, bad)
    for bad in (2.0, True, "3"):
        with pytest.raises(TypeError):
            p.exact_mask(g, bad)
    assert p.grids_seen == 0  # a failing call changes nothing


def test_forced_set_kept_first():
    """DTD: the stream's first grid (forced) is kept whole while total >= H*W, then the lowest
    temporal similarities across grids 1..T-1."""
    g = stream(4, 3, 4)
    for total in (12, 13, 20, 30):
        keep = create_pruner("dtd").exact_mask(g, total)
        assert bool(keep[0].all())
        scores = _scores("dtd", {}, g)[1:].reshape(-1)
        kept_rest = keep[1:].reshape(-1)
        if 0 < kept_rest.sum() < kept_rest.numel():
            assert scores[kept_rest].max() <= scores[~kept_rest].min()


def test_mssavt_checkerboard_forced_then_spread():
    g = stream(3, 4, 5)
    board = checkerboard(4, 5)
    off = int((~board).sum()) * 3  # forced: every off-board token
    keep = create_pruner("mssavt").exact_mask(g, off + 4)
    assert bool(keep[:, ~board].all()) and int(keep[:, board].sum()) == 4
    # Below the forced set: only forced tokens, evenly spaced in time-then-raster order.
    total = off // 2
    keep = create_pruner("mssavt").exact_mask(g, total)
    assert not bool(keep[:, board].any())
    forced_idx = (~board).expand(3, 4, 5).reshape(-1).nonzero().squeeze(1)
    expected = forced_idx[torch.arange(total) * off // total]
    assert torch.equal(keep.reshape(-1).nonzero().squeeze(1), expected)
    per_grid = keep.sum(dim=(1, 2)).tolist()
    assert max(per_grid) - min(per_grid) <= 1  # every grid keeps its share


def test_streaming_assistant_forces_first_grid_off_board():
    g = stream(3, 4, 5)
    board = checkerboard(4, 5)
    keep = create_pruner("streaming_assistant").exact_mask(g, 10)
    assert bool(keep[0][~board].all()) and int(keep.sum()) == 10


def test_ties_by_time_then_raster():
    scores = torch.zeros(3, 2, 2)
    keep = exact_keep(scores, 5)
    assert keep.reshape(-1).tolist() == [True] * 5 + [False] * 7
    scores = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # [2, 1, 2]
    assert exact_keep(scores, 1).reshape(-1).tolist() == [False, True, False, False]
    assert exact_keep(scores, 3).reshape(-1).tolist() == [True, True, True, False]
    forced = torch.full((2, 1, 3), NEVER_DROP)
    assert exact_keep(forced, 2).reshape(-1).tolist() == [True, False, False, True, False, False]


@pytest.mark.parametrize("name,params", SCORE_CONFIGS)
def test_one_grid_equals_per_grid_mode(name, params):
    g = stream(1, 4, 5, seed=2)
    per_grid = create_pruner(name, **params)(g)
    exact = create_pruner(name, **params).exact_mask(g, int(per_grid.sum()))
    assert torch.equal(exact, per_grid)


THRESHOLD_CONFIGS = [(m, p) for m, p in SCORE_CONFIGS if create_pruner(m, **p).threshold is not None]


@pytest.mark.parametrize("name,params", THRESHOLD_CONFIGS)
def test_threshold_count_gives_threshold_mask(name, params):
    assert THRESHOLD_CONFIGS
    g = stream(4, 4, 5, seed=3)
    thr = create_pruner(name, **params)(g)
    assert torch.equal(create_pruner(name, **params).exact_mask(g, int(thr.sum())), thr)


@pytest.mark.parametrize("name,params", SCORE_CONFIGS)
def test_per_grid_total_is_a_global_minimum(name, params):
    g = stream(4, 4, 5, seed=4)
    per_grid = create_pruner(name, **params)(g)
    total = int(per_grid.sum())
    exact = create_pruner(name, **params).exact_mask(g, total)
    scores = _scores(name, params, g)
    forced = torch.isneginf(scores)
    assert int(exact.sum()) == total and bool(exact[forced].all())
    finite = torch.where(forced, torch.zeros_like(scores), scores)
    assert finite[exact].sum() <= finite[per_grid].sum() + 1e-5
    if 0 < int((exact & ~forced).sum()) and int((~exact).sum()):
        assert scores[exact & ~forced].max() <= scores[~exact].min()


@pytest.mark.parametrize("name,params", [("uniform", {"keep_ratio": 0.3}), ("random", {"keep_ratio": 0.3, "seed": 5})])
def test_content_independent_equal_per_grid(name, params):
    g = stream(3, 4, 5)
    per_grid = create_pruner(name, **params)(g)
    assert torch.equal(create_pruner(name, **params).exact_mask(g, int(per_grid.sum())), per_grid)


def test_divprune_one_grid_and_joint():
    g = stream(1, 4, 5)
    per_grid = create_pruner("divprune", tokens_per_grid=7)(g)
    assert torch.equal(create_pruner("divprune").exact_mask(g, 7), per_grid)
    g3 = stream(3, 4, 5)
    assert int(create_pruner("divprune").exact_mask(g3, 11).sum()) == 11


@pytest.mark.parametrize("name", METHODS)
def test_continues_the_stream_and_reset(name):
    g = stream(4, 3, 4)
    a = create_pruner(name)
    a.exact_mask(g[:2], 10)
    assert a.grids_seen == 2
    second = a.exact_mask(g[2:], 10)
    a.reset()
    fresh = a.exact_mask(g[2:], 10)
    b = create_pruner(name)
    assert torch.equal(b.exact_mask(g[2:], 10), fresh)
    assert a.grids_seen == 2 and int(second.sum()) == 10
    if name in ("dtd", "evs"):  # a fresh stream forces its first grid (10 < 12: evenly spaced there)
        assert int(fresh[1].sum()) == 0 and int(second[1].sum()) > 0


def test_score_pruners_are_score_pruners():
    for name in METHODS:
        p = create_pruner(name)
        assert isinstance(p, ScorePruner) == (name != "divprune")
