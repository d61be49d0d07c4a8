"""Helpers shared by the pruner test files, and the one pruner matrix every test uses.

``PRUNER_MATRIX`` is the only place in the tests that lists pruning methods by hand: the
pruner tests parametrize over it (``PRUNER_CONFIGS``) or over the registry, so a newly
registered method is tested everywhere once it has an entry here, and
``tests/test_pruners_matrix.py`` fails, naming it, until it has one.
"""

import torch

from streampress.pruners.registry import METHODS, list_pruners

#: ``{method: [mild_params, aggressive_params]}`` for every registered method. Sized for the
#: small grids of the tests (4x5, 3x4): "mild" prunes some tokens (usually the native rule:
#: a threshold or a count), "aggressive" most of them (a ``keep_ratio`` budget, so it prunes
#: the same share at any grid size: other test matrices use ``PRUNER_MATRIX[m][-1]``). Both
#: must prune something on ``stream()`` and depend on its content (``test_pruners_numerics``).
PRUNER_MATRIX = {
    "dtd": [{"tau": 0.8}, {"keep_ratio": 0.3}],
    "mssavt": [{"tau": 0.8}, {"keep_ratio": 0.6}],  # MSSAVT alone drops at most half a grid
    "streaming_assistant": [{"tau_t": 0.9, "tau_s": 0.7}, {"keep_ratio": 0.3}],
    "stc": [{"tokens_per_grid": 10}, {"keep_ratio": 0.3, "window": 2}],
    "evs": [{"keep_ratio": 0.6}, {"keep_ratio": 0.3}],
    "vidcom2": [{"tokens_per_grid": 10}, {"keep_ratio": 0.3}],
    "divprune": [{"tokens_per_grid": 10}, {"keep_ratio": 0.3}],
    "random": [{"keep_ratio": 0.6, "seed": 7}, {"keep_ratio": 0.3, "seed": 3}],
    "uniform": [{"keep_ratio": 0.6}, {"keep_ratio": 0.3}],
}
#: ``(name, params)`` for every entry of the matrix, mild first.
PRUNER_CONFIGS = [(name, params) for name, modes in PRUNER_MATRIX.items() for params in modes]


def matrix_problems(matrix=PRUNER_MATRIX):
    """What is wrong with ``matrix`` against the registry, as messages (empty: nothing)."""
    registered = list_pruners()
    problems = [
        f"pruning method {name!r} is registered but has no entry in PRUNER_MATRIX "
        f"(tests/_pruner_helpers.py): add {name!r}: [mild_params, aggressive_params]"
        for name in registered
        if name not in matrix
    ]
    problems += [
        f"PRUNER_MATRIX has an entry for {name!r}, which is not a registered pruning method"
        for name in matrix
        if name not in registered
    ]
    problems += [
        f"PRUNER_MATRIX[{name!r}] must be [mild_params, aggressive_params] (two dicts), got {modes!r}"
        for name, modes in matrix.items()
        if not (isinstance(modes, list) and len(modes) == 2 and all(isinstance(p, dict) for p in modes))
    ]
    return problems


def stream(T, H=4, W=5, D=8, seed=0):
    """Grids that share a direction (spatial similarity, varying with each token's scale) and
    change over time at a per-token rate (temporal similarity from ~0.3 to ~1)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(D, generator=g)
    scale = 0.5 + 2.5 * torch.rand(H, W, 1, generator=g)
    rho = torch.rand(H, W, 1, generator=g)
    u = torch.randn(H, W, D, generator=g)
    out = []
    for _ in range(T):
        u = rho * u + (1 - rho**2).sqrt() * torch.randn(H, W, D, generator=g)
        out.append(common + scale * u)
    return torch.stack(out)


def config_ids(configs):
    """pytest ids for a list of ``(name, params)`` pruner configurations."""
    return [f"{n}-{'-'.join(f'{k}={v}' for k, v in p.items())}" for n, p in configs]


def pruners_with_param(param):
    """Registered methods that accept ``param`` (from the registry's metadata)."""
    return [name for name in list_pruners() if param in METHODS[name].defaults]
