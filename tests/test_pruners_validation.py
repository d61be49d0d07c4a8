"""Bad grids raise a clear error and leave the pruner's stream state exactly as it was."""

from functools import partial

import pytest
import torch

import _pruner_helpers
import streampress
from _pruner_helpers import PRUNER_CONFIGS, config_ids

CONFIGS = PRUNER_CONFIGS
IDS = config_ids(CONFIGS)
stream = partial(_pruner_helpers.stream, H=3, W=4, D=6)  # smaller grids than the shared default


def bad_inputs(name):
    good = stream(2, seed=9)
    nan = good.clone()
    nan[1, 2, 1, 3] = float("nan")
    inf = good.clone()
    inf[0, 0, 0, 0] = float("inf")
    neg_inf = good.clone()
    neg_inf[1, 1, 3, 5] = float("-inf")
    cases = [
        (good[0], ValueError, r"rank 4, shape \[T, H, W, D\]; got rank 3 .*grids\[None\]"),
        (good[None], ValueError, "got rank 5"),
        (good.tolist(), TypeError, "grids must be a torch.Tensor"),
        (good.to(torch.int64), TypeError, "floating dtype"),
        (good.to(torch.bool), TypeError, "floating dtype"),
        (stream(2, D=7), ValueError, "grids have D=7 but this stream started with D=6"),
        (torch.zeros(1, 0, 4, 6), ValueError, "H, W and D >= 1"),
        (nan, ValueError, "grids must be finite: grid 1 of this call contains NaN or inf"),
        (inf, ValueError, "grids must be finite: grid 0 of this call"),
        (neg_inf, ValueError, "grids must be finite: grid 1 of this call"),
    ]
    if streampress.create_pruner(name).fixed_grid_size:  # compares positions with the previous grid
        cases.append((stream(1, H=4, W=3), ValueError, "grids are 4x3 but this stream started with 3x4"))
    return cases


@pytest.mark.parametrize("name, params", CONFIGS, ids=IDS)
def test_bad_grids_raise_and_leave_state_unchanged(name, params):
    before, after = stream(3, seed=1), stream(3, seed=2)
    expected = streampress.create_pruner(name, **params)
    expected(before)
    want = expected(after)

    pruner = streampress.create_pruner(name, **params)
    pruner(before)
    for bad, exc, message in bad_inputs(name):
        with pytest.raises(exc, match=message):
            pruner(bad)
        assert pruner.grids_seen == 3
    assert torch.equal(pruner(after), want)


@pytest.mark.parametrize("name, params", CONFIGS, ids=IDS)
def test_bad_first_call_does_not_start_the_stream(name, params):
    pruner = streampress.create_pruner(name, **params)
    bad = stream(2, D=7)
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        pruner(bad)
    # The failed call fixed neither D nor any state: a D=6 stream starts normally.
    fresh = streampress.create_pruner(name, **params)
    x = stream(3)
    assert torch.equal(pruner(x), fresh(x))


@pytest.mark.parametrize("name, params", CONFIGS, ids=IDS)
def test_empty_chunk(name, params):
    pruner = streampress.create_pruner(name, **params)
    x = stream(3)
    first = pruner(x[:1])
    empty = pruner(x[:0])
    assert empty.shape == (0, 3, 4) and empty.dtype == torch.bool
    assert pruner.grids_seen == 1
    rest = pruner(x[1:])
    assert torch.equal(torch.cat([first, rest]), streampress.create_pruner(name, **params)(x))


def test_huge_finite_values_are_scored():
    x = torch.full((1, 2, 2, 4), 1e30)  # finite, but the squared norm overflows float32
    keep = streampress.create_pruner("mssavt")(x)  # identical tokens: the checkerboard goes
    assert torch.equal(keep, streampress.create_pruner("mssavt")(torch.ones(1, 2, 2, 4)))
    assert keep.tolist() == [[[True, False], [False, True]]]


def test_d_change_after_reset_is_fine():
    pruner = streampress.create_pruner("streaming_assistant")
    pruner(stream(2))
    pruner.reset()
    assert pruner(stream(2, H=2, W=5, D=7)).shape == (2, 2, 5)
