"""Helpers shared by the pruner test files."""

import torch


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
