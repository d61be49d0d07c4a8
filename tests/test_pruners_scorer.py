"""The ScorePruner contract, on toy methods: the base owns budget, ties, never-drop tokens,
parameters and the state commit; a method only scores."""

import pytest
import torch

from streampress.pruners.base import NEVER_DROP, ScorePruner, safe_grids


class Fixed(ScorePruner):
    """Scores are the first channel of each token; counts its calls in the state."""

    name = "fixed"
    param_names = ("keep_ratio", "tokens_per_grid", "threshold")

    def score(self, x, state):
        if bool((x[..., 1] < 0).any()):
            raise ValueError("negative second channel")
        return x[..., 0], (state or 0) + 1


def grids(*rows):
    """``[T, 1, N, 2]`` grids whose first channel is the given scores."""
    s = torch.tensor(rows, dtype=torch.float32)[:, None, :]
    return torch.stack([s, torch.zeros_like(s)], dim=-1)


def kept(pruner, *rows):
    return pruner(grids(*rows))[:, 0].int().tolist()


def test_budgets():
    row = [0.5, 0.1, 0.9, 0.3, 0.7]
    assert kept(Fixed(keep_ratio=0.4), row) == [[0, 1, 0, 1, 0]]  # ceil(0.4 * 5) = 2 lowest
    assert kept(Fixed(tokens_per_grid=3), row) == [[1, 1, 0, 1, 0]]
    assert kept(Fixed(tokens_per_grid=9), row) == [[1, 1, 1, 1, 1]]  # more than the grid
    assert kept(Fixed(threshold=0.5), row) == [[1, 1, 0, 1, 0]]  # score > threshold dropped


def test_ties_go_to_raster_order_and_never_drop_is_kept_in_every_mode():
    assert kept(Fixed(keep_ratio=0.4), [1, 1, 1, 1, 1], [2, 0, 2, 0, 0]) == [[1, 1, 0, 0, 0], [0, 1, 0, 1, 0]]
    inf = NEVER_DROP
    assert kept(Fixed(tokens_per_grid=1), [inf, 0.1, inf, 0.2]) == [[1, 0, 1, 0]]  # keeps more
    assert kept(Fixed(threshold=-5.0), [inf, 0.1, inf, 0.2]) == [[1, 0, 1, 0]]


def test_params_and_budget_checks():
    assert Fixed(keep_ratio=0.5).params == {"keep_ratio": 0.5, "tokens_per_grid": None, "threshold": None}
    with pytest.raises(TypeError, match="exactly one of threshold, keep_ratio, tokens_per_grid"):
        Fixed()
    with pytest.raises(TypeError, match="exactly one"):
        Fixed(keep_ratio=0.5, tokens_per_grid=2)
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
        Fixed(keep_ratio=0)
    with pytest.raises(ValueError, match="tokens_per_grid must be a positive integer"):
        Fixed(tokens_per_grid=0)


def test_state_is_committed_only_after_success():
    p = Fixed(keep_ratio=0.5)
    p(grids([1, 2]))
    snap = p.snapshot()
    bad = grids([1, 2])
    bad[0, 0, 0, 1] = -1
    with pytest.raises(ValueError, match="negative"):
        p(bad)
    assert p.snapshot() == snap and p._state == 1 and p.grids_seen == 1
    p(grids([1, 2], [3, 4]))
    assert p._state == 2 and p.grids_seen == 3
    p.restore(snap)
    assert p._state == 1 and p.grids_seen == 1


def test_scores_must_be_one_per_token():
    class Wrong(ScorePruner):
        def score(self, x, state):
            return x[..., 0].flatten(1), None

    p = Wrong(keep_ratio=0.5)
    with pytest.raises(RuntimeError, match=r"Wrong.score returned scores of shape \(1, 3\), expected \(1, 1, 3\)"):
        p(grids([1, 2, 3]))
    assert p.grids_seen == 0


def test_safe_grids():
    x = torch.randn(2, 3, 4, 5)
    assert safe_grids(x) is x  # ordinary scale: no pass, no copy
    norms = torch.linalg.vector_norm(x, dim=-1)
    for scale in (2.0**-100, 2.0**100):
        big = torch.linalg.vector_norm(safe_grids(x * scale), dim=-1)
        assert torch.isfinite(big).all() and (big > 0).all()
        assert torch.equal(big.flatten(1).argsort(dim=1), norms.flatten(1).argsort(dim=1))
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="grid 1 of this call contains NaN"):
        safe_grids(x * 2.0**100)
