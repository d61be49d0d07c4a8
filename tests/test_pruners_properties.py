"""Properties every pruner must have: budgets, slice invariance, reset isolation,
determinism, dtypes, degenerate grid shapes, and the checkerboard invariant."""

import math

import pytest
import torch

import streampress
from _pruner_helpers import PRUNER_CONFIGS, config_ids, pruners_with_param, stream
from streampress.pruners.mssavt import checkerboard

CONFIGS = PRUNER_CONFIGS
IDS = config_ids(CONFIGS)


def run_in_chunks(pruner, x, sizes):
    assert sum(sizes) == x.shape[0]
    out, start = [], 0
    for size in sizes:
        out.append(pruner(x[start : start + size]))
        start += size
    return torch.cat(out)


def adjacent_pair_dropped(dropped):
    """True if any two 4-adjacent tokens of any grid ``[T, H, W]`` are both dropped."""
    horizontal = (dropped[:, :, 1:] & dropped[:, :, :-1]).any()
    vertical = (dropped[:, 1:] & dropped[:, :-1]).any()
    return bool(horizontal or vertical)


# ------------------------------------------------------------------ slicing, reset
@pytest.mark.parametrize("name, params", CONFIGS, ids=IDS)
def test_slice_invariance(name, params):
    x = stream(7)
    whole = streampress.create_pruner(name, **params)(x)
    for sizes in ([1] * 7, [2, 3, 2], [3, 4], [6, 1]):
        got = run_in_chunks(streampress.create_pruner(name, **params), x, sizes)
        assert torch.equal(got, whole), sizes


@pytest.mark.parametrize("name, params", CONFIGS, ids=IDS)
def test_interleaved_streams_and_reset_are_isolated(name, params):
    a, b = stream(6, seed=1), stream(6, seed=2) * 3 + 1
    alone_a = streampress.create_pruner(name, **params)(a)
    alone_b = streampress.create_pruner(name, **params)(b)

    pa, pb = streampress.create_pruner(name, **params), streampress.create_pruner(name, **params)
    got_a, got_b = [], []
    for lo, hi in ((0, 2), (2, 3), (3, 6)):
        got_a.append(pa(a[lo:hi]))
        got_b.append(pb(b[lo:hi]))
    assert torch.equal(torch.cat(got_a), alone_a)
    assert torch.equal(torch.cat(got_b), alone_b)

    one = streampress.create_pruner(name, **params)
    one(a[:4])
    one.reset()
    assert one.grids_seen == 0
    assert torch.equal(one(b), alone_b)
    one.reset()
    assert torch.equal(one(a), alone_a)


@pytest.mark.parametrize("name", ["dtd", "streaming_assistant", "stc", "evs"])
def test_stateful_methods_do_depend_on_the_stream(name):
    """Power check for the isolation test: without reset, what came before changes the masks."""
    a, b = stream(4, seed=1) * 5 - 2, stream(4, seed=2)
    params = {"tokens_per_grid": 5} if name == "stc" else {}
    fresh = streampress.create_pruner(name, **params)(b)
    continued = streampress.create_pruner(name, **params)
    continued(torch.cat([a, b[:1]]))  # b's first grid then follows itself: DTD drops all of it
    assert not torch.equal(continued(b), fresh)


@pytest.mark.parametrize("name, params", CONFIGS, ids=IDS)
def test_deterministic(name, params):
    x = stream(5, seed=4)
    assert torch.equal(streampress.create_pruner(name, **params)(x), streampress.create_pruner(name, **params)(x))


# ----------------------------------------------------------------------- budgets
SHAPES = [(16, 16), (14, 14), (3, 5), (1, 7), (6, 1), (2, 2)]
RATIOS = [0.01, 0.1, 0.25, 0.3, 0.5, 0.77, 1.0]


# MSSAVT cannot always drop that many: test_mssavt_keeps_more_when_it_cannot_drop_enough.
@pytest.mark.parametrize("name", [n for n in pruners_with_param("keep_ratio") if n != "mssavt"])
@pytest.mark.parametrize("H, W", SHAPES)
def test_exact_counts_in_keep_ratio_mode(name, H, W):
    x = stream(3, H=H, W=W, D=6, seed=H * 31 + W)
    N = H * W
    for r in RATIOS:
        counts = streampress.create_pruner(name, keep_ratio=r)(x).sum(dim=(1, 2))
        k = math.ceil(r * N - 1e-9)
        if name in ("dtd", "evs"):
            assert counts.tolist() == [N, k, k], r  # the first grid of a stream is kept whole
        elif name == "streaming_assistant":
            # First grid: only the spatial step applies, only checkerboard tokens can go.
            movable = int(checkerboard(H, W).sum()) if N > 1 else 0
            assert counts.tolist() == [max(k, N - movable), k, k], r
        else:
            assert counts.tolist() == [k, k, k], r


@pytest.mark.parametrize("H, W", SHAPES + [(1, 1)])
def test_mssavt_keeps_more_when_it_cannot_drop_enough(H, W):
    x = stream(2, H=H, W=W, D=6, seed=5)
    N = H * W
    movable = int(checkerboard(H, W).sum()) if N > 1 else 0
    for r in RATIOS:
        counts = streampress.create_pruner("mssavt", keep_ratio=r)(x).sum(dim=(1, 2))
        assert counts.tolist() == [max(math.ceil(r * N - 1e-9), N - movable)] * 2, r


@pytest.mark.parametrize("name", pruners_with_param("tokens_per_grid"))
def test_tokens_per_grid_counts(name):
    x = stream(2, H=3, W=3, D=6)
    assert streampress.create_pruner(name, tokens_per_grid=4)(x).sum(dim=(1, 2)).tolist() == [4, 4]
    assert streampress.create_pruner(name, tokens_per_grid=100)(x).all()  # more than the grid: keep all


# ------------------------------------------------------------- checkerboard rule
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("H, W", [(1, 1), (1, 6), (5, 1), (2, 2), (3, 4), (7, 6)])
def test_spatial_step_never_drops_two_adjacent_tokens(seed, H, W):
    x = stream(3, H=H, W=W, D=5, seed=seed)
    board = checkerboard(H, W)
    pruners = [streampress.create_pruner("mssavt", tau=t) for t in (-1.0, -0.3, 0.0, 0.3, 0.6, 0.9)]
    pruners += [streampress.create_pruner("mssavt", keep_ratio=r) for r in (0.01, 0.3, 0.5, 0.8)]
    # tau_t = 2 disables the temporal step: whatever streaming_assistant drops is spatial.
    pruners += [streampress.create_pruner("streaming_assistant", tau_t=2.0, tau_s=t) for t in (-1.0, 0.2, 0.7)]
    for pruner in pruners:
        dropped = ~pruner(x)
        assert not adjacent_pair_dropped(dropped), pruner
        assert not (dropped & ~board).any(), pruner  # only the (h + w) % 2 == 1 colour


@pytest.mark.parametrize("H, W", [(1, 2), (2, 1), (1, 6), (3, 4), (7, 6), (16, 16)])
def test_tau_minus_one_drops_exactly_the_checkerboard(H, W):
    x = stream(2, H=H, W=W, D=5, seed=H + W)
    expected_keep = ~checkerboard(H, W).expand(2, H, W)
    assert torch.equal(streampress.create_pruner("mssavt", tau=-1.0)(x), expected_keep)
    sa = streampress.create_pruner("streaming_assistant", tau_t=2.0, tau_s=-1.0)
    assert torch.equal(sa(x), expected_keep)


def test_first_grid_never_temporally_dropped():
    x = stream(4, seed=3)
    for pruner in (
        streampress.create_pruner("dtd", tau=-1.0),
        streampress.create_pruner("streaming_assistant", tau_t=-1.0, tau_s=2.0),
    ):
        keep = pruner(x)
        assert keep[0].all() and not keep[1:].any()
        pruner.reset()
        assert pruner(x[2:3]).all()  # a new stream starts whole again
        assert not pruner(x[3:4]).any()
    evs = streampress.create_pruner("evs", keep_ratio=0.05)
    assert evs(x[:1]).all() and evs(x[1:2]).sum() == 1


# ------------------------------------------------------------ dtypes and shapes
@pytest.mark.parametrize("name, params", CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_inputs(name, params, dtype):
    x = stream(4, seed=6).to(dtype)
    keep = streampress.create_pruner(name, **params)(x)
    assert keep.dtype == torch.bool and keep.shape == (4, 4, 5) and keep.device == x.device
    # Scores are computed in float32 from the given values.
    assert torch.equal(keep, streampress.create_pruner(name, **params)(x.float()))


@pytest.mark.parametrize("name, params", CONFIGS, ids=IDS)
@pytest.mark.parametrize("H, W", [(1, 6), (6, 1), (1, 1)])
def test_degenerate_grids(name, params, H, W):
    x = stream(3, H=H, W=W, D=4, seed=8)
    keep = streampress.create_pruner(name, **params)(x)
    assert keep.shape == (3, H, W)
    if "tau" not in params and "tau_t" not in params:  # budget modes never empty a grid
        assert keep.sum(dim=(1, 2)).min() >= 1
    if (H, W) == (1, 1) and name in ("mssavt",):
        assert keep.all()  # a 1x1 grid has no neighbour: nothing to drop


def test_non_contiguous_input():
    x = stream(3, H=5, W=4, D=8).transpose(1, 2)  # [3, 4, 5, 8], non-contiguous
    for name, params in CONFIGS:
        got = streampress.create_pruner(name, **params)(x)
        assert torch.equal(got, streampress.create_pruner(name, **params)(x.contiguous())), name


def test_mask_is_not_aliased_between_calls():
    pruner = streampress.create_pruner("uniform", keep_ratio=0.5)
    first = pruner(stream(2))
    first[:] = False
    assert pruner(stream(2)).sum() == 2 * 10
