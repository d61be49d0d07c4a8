"""Random baseline: a uniformly random subset of exactly ``ceil(keep_ratio * H * W)`` tokens per grid.

The draws are seeded per stream and per grid: grid ``i`` of a stream (counted from the
last ``reset()``) uses a generator seeded from ``(seed, i)``. Cutting the stream into
calls differently therefore gives the same masks, two pruners with the same seed give
the same masks, and a ``reset()`` replays the same draws. The generator runs on the CPU,
so the masks do not depend on the device either. (Module named ``random_pruner`` so as not
to shadow the standard library's ``random``.)

As a ``ScorePruner``: the score of a token is its rank in the grid's random permutation,
so the ``k`` kept are the permutation's first ``k``. The loop is over grids (one seed
each), never over tokens.
"""

from __future__ import annotations

import torch

from .base import ScorePruner, check_int, require_finite_grids

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


class RandomPruner(ScorePruner):
    """Keep a uniformly random subset of every grid (no content used).

    Args:
        keep_ratio: fraction of each grid kept, ``ceil(keep_ratio * H * W)`` tokens (default 0.25).
        seed: seed of the stream's draws (default 0).
    """

    name = "random"
    param_names = ("keep_ratio", "seed")

    def __init__(self, *, keep_ratio: float = DEFAULT_KEEP_RATIO, seed: int = 0) -> None:
        self.seed = check_int(seed, "seed")
        super().__init__(keep_ratio=keep_ratio)

    def score(self, x: torch.Tensor, state: None):
        T, H, W, _ = x.shape
        require_finite_grids(x)  # no sum: huge finite values are fine
        N = H * W
        ranks = torch.empty((T, N))
        order = torch.arange(N, dtype=torch.float32)
        generator = torch.Generator()
        for t in range(T):  # one draw per grid (not per token): each grid has its own seed
            generator.manual_seed(grid_seed(self.seed, self.grids_seen + t))
            ranks[t, torch.randperm(N, generator=generator)] = order
        return ranks.view(T, H, W).to(x.device), None
