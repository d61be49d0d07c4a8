"""Random baseline: a uniformly random subset of exactly ``ceil(keep_ratio * H * W)`` tokens per grid.

The draws are seeded per stream and per grid: grid ``i`` of a stream (counted from the
last ``reset()``) uses a generator seeded from ``(seed, i)``. Cutting the stream into
calls differently therefore gives the same masks, two pruners with the same seed give
the same masks, and a ``reset()`` replays the same draws. The generator runs on the CPU,
so the masks do not depend on the device either. (Module named ``random_pruner`` so as not
to shadow the standard library's ``random``.)
"""

from __future__ import annotations

import torch

from .base import Pruner, check_int, check_keep_ratio, grid_peak, ratio_budget, require_finite

DEFAULT_KEEP_RATIO = 0.25
_MASK64 = (1 << 64) - 1


def _splitmix64(v: int) -> int:
    v = (v + 0x9E3779B97F4A7C15) & _MASK64
    v = ((v ^ (v >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    v = ((v ^ (v >> 27)) * 0x94D049BB133111EB) & _MASK64
    return v ^ (v >> 31)


def grid_seed(seed: int, index: int) -> int:
    """Seed of grid ``index`` of a stream: a well-mixed, collision-resistant hash of the pair."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ index) >> 1  # 63 bits for manual_seed


class RandomPruner(Pruner):
    """Keep a uniformly random subset of every grid (no content used).

    Args:
        keep_ratio: fraction of each grid kept, ``ceil(keep_ratio * H * W)`` tokens (default 0.25).
        seed: seed of the stream's draws (default 0).
    """

    name = "random"

    def __init__(self, *, keep_ratio: float = DEFAULT_KEEP_RATIO, seed: int = 0) -> None:
        self.keep_ratio = check_keep_ratio(keep_ratio)
        self.seed = check_int(seed, "seed")
        super().__init__(keep_ratio=self.keep_ratio, seed=self.seed)

    def _prune(self, x: torch.Tensor, state: None):
        T, H, W, _ = x.shape
        require_finite(grid_peak(x), x)  # no sum: huge finite values are fine
        N = H * W
        k = ratio_budget(self.keep_ratio, N)
        keep = torch.zeros((T, N), dtype=torch.bool)
        generator = torch.Generator()
        for t in range(T):  # one draw per grid (not per token): each grid has its own seed
            generator.manual_seed(grid_seed(self.seed, self.grids_seen + t))
            keep[t, torch.randperm(N, generator=generator)[:k]] = True
        return keep.view(T, H, W).to(x.device), None
