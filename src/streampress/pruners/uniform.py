"""Uniform baseline: a regular spatial sub-lattice of every grid (no content used).

Positions are ranked by an ordered-dither (Bayer) matrix cropped to ``H x W`` and the
``k = ceil(keep_ratio * H * W)`` lowest ranks are kept. The Bayer order fills the grid as a
hierarchy of lattices: ``keep_ratio = 1/4`` keeps every second row and every second column
(the stride-2 lattice), ``1/2`` a checkerboard, ``1/16`` the stride-4 lattice, and any other
ratio the next coarser lattice plus an evenly spread part of the next finer one, so the
count is always exact.

As a ``ScorePruner``: the score of a position is its Bayer rank (built once per shape),
the same for every grid, so the base's ``keep_ratio`` budget keeps the ``k`` lowest ranks.
"""

from __future__ import annotations

import torch

from .base import ScorePruner, keep_lowest, require_finite_grids

DEFAULT_KEEP_RATIO = 0.25


def bayer_matrix(n: int) -> torch.Tensor:
    """The ``n x n`` Bayer (ordered-dither) index matrix, ``n`` a power of two, values 0..n*n-1."""
    m = torch.zeros((1, 1), dtype=torch.long)
    while m.shape[0] < n:
        m = torch.cat([torch.cat([4 * m, 4 * m + 2], 1), torch.cat([4 * m + 3, 4 * m + 1], 1)], 0)
    return m


def bayer_ranks(H: int, W: int) -> torch.Tensor:
    """Float ``[H, W]``: the Bayer rank of every position (the Bayer matrix of the next power
    of two at least ``max(H, W)``, cropped), all distinct."""
    n = 1
    while n < max(H, W):
        n *= 2
    return bayer_matrix(n)[:H, :W].float()


def lattice_mask(H: int, W: int, k: int) -> torch.Tensor:
    """Bool ``[H, W]`` with exactly ``k`` True: the ``k`` lowest Bayer ranks of the grid."""
    return keep_lowest(bayer_ranks(H, W).view(1, H * W), k).view(H, W)


class UniformPruner(ScorePruner):
    """Keep an evenly spread, content-independent sub-lattice of every grid.

    Args:
        keep_ratio: fraction of each grid kept, ``ceil(keep_ratio * H * W)`` tokens (default 0.25).
    """

    name = "uniform"

    def __init__(self, *, keep_ratio: float = DEFAULT_KEEP_RATIO) -> None:
        super().__init__(keep_ratio=keep_ratio)

    def score(self, x: torch.Tensor, state: None):
        T, H, W, _ = x.shape
        require_finite_grids(x)  # no sum: huge finite values are fine
        ranks = self._cached(("bayer", H, W, x.device), lambda: bayer_ranks(H, W).to(x.device))
        return ranks.expand(T, H, W), None
