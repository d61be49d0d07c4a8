"""Uniform baseline: a regular spatial sub-lattice of every grid (no content used).

Positions are ranked by an ordered-dither (Bayer) matrix cropped to ``H x W`` and the
``k = ceil(keep_ratio * H * W)`` lowest ranks are kept. The Bayer order fills the grid as a
hierarchy of lattices: ``keep_ratio = 1/4`` keeps every second row and every second column
(the stride-2 lattice), ``1/2`` a checkerboard, ``1/16`` the stride-4 lattice, and any other
ratio the next coarser lattice plus an evenly spread part of the next finer one, so the
count is always exact. The mask depends only on ``(H, W, k)`` and is built once per shape.
"""

from __future__ import annotations

import torch

from .base import Pruner, check_keep_ratio, grid_peak, ratio_budget, require_finite

DEFAULT_KEEP_RATIO = 0.25


def bayer_matrix(n: int) -> torch.Tensor:
    """The ``n x n`` Bayer (ordered-dither) index matrix, ``n`` a power of two, values 0..n*n-1."""
    m = torch.zeros((1, 1), dtype=torch.long)
    while m.shape[0] < n:
        m = torch.cat([torch.cat([4 * m, 4 * m + 2], 1), torch.cat([4 * m + 3, 4 * m + 1], 1)], 0)
    return m


def lattice_mask(H: int, W: int, k: int) -> torch.Tensor:
    """Bool ``[H, W]`` with exactly ``k`` True: the ``k`` lowest Bayer ranks of the grid."""
    n = 1
    while n < max(H, W):
        n *= 2
    ranks = bayer_matrix(n)[:H, :W].reshape(-1)
    keep = torch.zeros(H * W, dtype=torch.bool)
    keep[torch.sort(ranks, stable=True).indices[:k]] = True
    return keep.view(H, W)


class UniformPruner(Pruner):
    """Keep an evenly spread, content-independent sub-lattice of every grid.

    Args:
        keep_ratio: fraction of each grid kept, ``ceil(keep_ratio * H * W)`` tokens (default 0.25).
    """

    name = "uniform"

    def __init__(self, *, keep_ratio: float = DEFAULT_KEEP_RATIO) -> None:
        self.keep_ratio = check_keep_ratio(keep_ratio)
        super().__init__(keep_ratio=self.keep_ratio)

    def _prune(self, x: torch.Tensor, state: None):
        T, H, W, _ = x.shape
        require_finite(grid_peak(x), x)  # no sum: huge finite values are fine
        k = ratio_budget(self.keep_ratio, H * W)
        mask = self._cached(("lattice", H, W, k, x.device), lambda: lattice_mask(H, W, k).to(x.device))
        return mask.expand(T, H, W).clone(), None
