"""Pruner numerics do not depend on the scale of the embeddings.

Every method scores directions (cosines, or STC's kernel on L2-normalised tokens and on the
normalised memory mean), so multiplying a whole stream by a constant must not change any
mask: not for tiny grids (an absolute epsilon in a norm clamp breaks that), not for huge
but finite ones (squares overflow float32), and not in bfloat16.
"""

import pytest
import torch

import streampress
from _pruner_helpers import PRUNER_MATRIX, config_ids, stream

#: Per registered method: a mild and an aggressive setting, both pruning a 4x5 grid (the
#: shared matrix; a newly registered method must be added there, see the coverage test).
MODES = PRUNER_MATRIX
CONFIGS = [(name, params) for name, modes in MODES.items() for params in modes]
IDS = config_ids(CONFIGS)
CONTENT_FREE = {"random", "uniform"}


def test_every_registered_pruner_is_covered():
    assert sorted(MODES) == sorted(streampress.list_pruners())


def masks(name, params, x):
    return streampress.create_pruner(name, **params)(x)


@pytest.mark.parametrize("name, params", CONFIGS, ids=IDS)
@pytest.mark.parametrize("scale", [1e-15, 1e20])
def test_masks_do_not_depend_on_the_scale(name, params, scale):
    x = stream(5, seed=3)
    want = masks(name, params, x)
    if name not in CONTENT_FREE:  # power check: the masks depend on the content
        assert not want.all() and not torch.equal(want, masks(name, params, stream(5, seed=4)))
    assert torch.equal(masks(name, params, x * scale), want)


@pytest.mark.parametrize("name, params", CONFIGS, ids=IDS)
@pytest.mark.parametrize("exponent", [-100, 100])
def test_bfloat16_scaled_by_a_power_of_two(name, params, exponent):
    # Multiplying by 2**exponent is exact in bfloat16 (same exponent range as float32), so
    # these are the same directions, only at the edge of the float32 range.
    x = stream(5, seed=5).to(torch.bfloat16)
    assert torch.equal(masks(name, params, x * 2.0**exponent), masks(name, params, x))


@pytest.mark.parametrize("name", ["stc", "vidcom2"])
def test_huge_values_near_the_float32_limit(name):
    # |values| up to ~1e37: grid means and the memory's mean must not overflow either.
    x = stream(4, seed=6)
    x = x / x.abs().max()
    p = {"keep_ratio": 0.3}
    assert torch.equal(masks(name, p, x * 3e38), masks(name, p, x))


@pytest.mark.parametrize("name, params", CONFIGS, ids=IDS)
def test_all_zero_grid(name, params):
    x = stream(3, seed=7)
    x[1] = 0
    keep = masks(name, params, x)
    assert keep.shape == (3, 4, 5)
    assert torch.equal(keep, masks(name, params, x * 1e-15))
