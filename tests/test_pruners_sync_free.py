"""The per-frame path off the CPU reads nothing back from the device (``pruners.base.sync_free``).

On a GPU a read-back (``bool(tensor)``, ``.item()``, ``nonzero``) inside a pruner call stalls
the queue and makes the call impossible to capture as a CUDA graph or to compile as one
graph, the two fast paths of a per-frame call. These tests force the accelerator's code path
on the CPU (``sync_free`` patched to True) and check the independent facts:

- no operator that needs a read-back is dispatched inside ``_prune``, for every method;
- the masks are bit for bit those of the CPU's branching path, on grids of ordinary,
  tiny, huge and mixed scales, all-zero grids and bfloat16-rounded grids;
- non-finite grids still fail with the same one-line error, and the failed call leaves
  the stream as it was;
- the stream state holds tensors only (a CUDA graph replay carries it), and a temporal
  method's call compiles as one graph (``torch.compile(fullgraph=True)``) without
  recompiling from grid to grid.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import streampress
from _pruner_helpers import PRUNER_CONFIGS, config_ids
from streampress.pruners import base

READ_BACK = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal", "masked_select", "unique",
             "_unique2", "unique_consecutive", "unique_dim"}


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def device_path(monkeypatch):
    monkeypatch.setattr(base, "sync_free", lambda x: True)


def grids(seed: int, T: int = 4, H: int = 4, W: int = 5, D: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base_grid = torch.randn(H, W, D, generator=g)
    out = []
    for _ in range(T):  # slowly changing, so the temporal methods have something to drop
        base_grid = base_grid + 0.4 * torch.randn(H, W, D, generator=g)
        out.append(base_grid.clone()[None])
    return out


def scaled_streams():
    one = grids(1)
    mixed = [torch.cat([one[0], one[1] * 1e20])] + [torch.cat([one[2] * 1e-15, one[3]])]
    zero = [one[0], torch.zeros_like(one[1]), one[2]]
    bf16 = [g.to(torch.bfloat16) for g in one]
    return {"ordinary": one, "tiny": [g * 1e-15 for g in one], "huge": [g * 1e20 for g in one],
            "mixed": mixed, "zero": zero, "bf16": bf16}


@pytest.mark.parametrize("name, params", PRUNER_CONFIGS, ids=config_ids(PRUNER_CONFIGS))
def test_no_read_back_inside_a_call(name, params, device_path):
    p = streampress.create_pruner(name, **params)
    stream = grids(0)
    for g in stream[:2]:
        p(g)
    ops = Ops()
    with ops:
        p._prune(p._validated(stream[2]), p._state)
    found = {k: v for k, v in ops.count.items() if k in READ_BACK}
    assert found == {}, f"{name}: read-backs inside the call: {found}"


def test_the_cpu_path_does_read_back_so_the_check_above_can_fail():
    p = streampress.create_pruner("streaming_assistant")
    stream = grids(0)
    p(stream[0])
    ops = Ops()
    with ops:
        p._prune(p._validated(stream[1]), p._state)
    assert ops.count["_local_scalar_dense"] >= 1


@pytest.mark.parametrize("name, params", PRUNER_CONFIGS, ids=config_ids(PRUNER_CONFIGS))
def test_masks_equal_the_branching_path_at_every_scale(name, params, monkeypatch):
    for kind, stream in scaled_streams().items():
        cpu = streampress.create_pruner(name, **params)
        want = [cpu(g) for g in stream]
        monkeypatch.setattr(base, "sync_free", lambda x: True)
        dev = streampress.create_pruner(name, **params)
        got = [dev(g) for g in stream]
        monkeypatch.undo()
        for t, (a, b) in enumerate(zip(want, got)):
            assert torch.equal(a, b), f"{name} {params}: {kind} stream, call {t}"


@pytest.mark.parametrize("name, params", PRUNER_CONFIGS[::2], ids=config_ids(PRUNER_CONFIGS[::2]))
def test_non_finite_grids_fail_the_same_way_and_leave_no_trace(name, params, device_path):
    stream = grids(2)
    bad = torch.cat([stream[1], stream[2]])
    bad[1, 2, 3, 4] = float("nan")
    p, clean = streampress.create_pruner(name, **params), streampress.create_pruner(name, **params)
    p(stream[0]), clean(stream[0])
    with pytest.raises(ValueError, match=r"^grids must be finite: grid 1 of this call contains NaN or inf values$"):
        p(bad)
    assert p.grids_seen == 1
    assert torch.equal(p(stream[3]), clean(stream[3]))
    huge = stream[1].clone()
    huge[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="grid 0 of this call"):
        p.exact_mask(huge, 3)


@pytest.mark.parametrize("name", ["streaming_assistant", "stc", "dtd"])
def test_state_is_tensors_only_and_the_call_compiles_as_one_graph(name, device_path):
    import torch._dynamo

    p = streampress.create_pruner(name)
    stream = grids(3, T=6)
    for g in stream[:2]:
        p(g)
    leaves = []

    def walk(v):
        if isinstance(v, (tuple, list)):
            for x in v:
                walk(x)
        else:
            leaves.append(v)

    walk(p._state)
    assert leaves and all(isinstance(v, torch.Tensor) or v is None for v in leaves), leaves
    torch._dynamo.reset()
    fn = torch.compile(lambda x, s: p._prune(x, s), backend="eager", fullgraph=True)
    want = streampress.create_pruner(name)
    for g in stream[:2]:
        want(g)
    state = p._state
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):  # one graph for every grid
            for g in stream[2:]:
                keep, state = fn(p._validated(g), state)
                assert torch.equal(keep, want(g))
    finally:
        torch._dynamo.reset()
