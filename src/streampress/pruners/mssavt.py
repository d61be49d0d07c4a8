"""MSSAVT: Maximum Similarity to Spatially Adjacent Video Tokens (StreamingAssistant).

Redundancy of token (h, w) of a grid::

    R[h, w] = max over the existing 4-neighbours (h±1, w), (h, w±1) of cos(x[h, w], x[nb])

No diagonals; border tokens use the neighbours that exist; a 1x1 grid has none
(R = -inf, nothing dropped). **Masked pruning**: only tokens of one checkerboard colour,
``(h + w) % 2 == 1``, may be dropped: ``drop = (R > tau) & checkerboard``. No two
4-adjacent tokens are ever both dropped, so the neighbour that justified a drop survives;
MSSAVT alone drops at most half a grid.

``keep_ratio`` mode drops the eligible tokens with the highest R, down to the budget or
until no eligible token is left (then it keeps more than the budget).

As a ``ScorePruner``: the score is R on the checkerboard and ``NEVER_DROP`` off it, so the
eligibility rule holds in both modes without any code of its own.

The computation is one vectorised pass: unit-normalise once, dot products with the right
and the lower neighbour (the left/upper ones are the same numbers shifted), pad with -inf
where a neighbour does not exist, and take the maximum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import NEVER_DROP, ThresholdPruner, rowdot, unit_tokens

#: StreamingAssistant's spatial operating point (tau_s = 0.2, with tau_t = 0.2).
DEFAULT_TAU = 0.2

_NEG_INF = float("-inf")


def neighbour_similarity(xn: torch.Tensor, work: torch.Tensor | None = None) -> torch.Tensor:
    """``R [T, H, W]``: the maximum cosine similarity of each token to its 4-neighbours.

    ``xn`` holds unit tokens ``[T, H, W, D]``. Tokens without any neighbour get -inf.
    ``work``: optional scratch buffer (see ``rowdot``).
    """
    right = rowdot(xn[:, :, :-1], xn[:, :, 1:], work)  # pair (h, w)-(h, w+1): [T, H, W-1]
    down = rowdot(xn[:, :-1], xn[:, 1:], work)  # pair (h, w)-(h+1, w): [T, H-1, W]
    right = F.pad(right, (1, 1), value=_NEG_INF)  # [T, H, W+1]; column w+1 holds pair (w, w+1)
    down = F.pad(down, (0, 0, 1, 1), value=_NEG_INF)  # [T, H+1, W]
    horizontal = torch.maximum(right[:, :, 1:], right[:, :, :-1])  # right neighbour, left neighbour
    vertical = torch.maximum(down[:, 1:], down[:, :-1])  # lower neighbour, upper neighbour
    return torch.maximum(horizontal, vertical)


def checkerboard(H: int, W: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool ``[H, W]``: True on the colour that may be dropped, ``(h + w) % 2 == 1``."""
    h = torch.arange(H, device=device)[:, None]
    w = torch.arange(W, device=device)[None, :]
    return (h + w) % 2 == 1


class MSSAVTPruner(ThresholdPruner):
    """Drop tokens nearly identical to a spatial neighbour, never two adjacent ones.

    Args:
        tau: a checkerboard token is dropped when its maximum cosine similarity to a
            4-neighbour is above ``tau`` (default 0.2).
        keep_ratio: instead of ``tau``, keep ``ceil(keep_ratio * H * W)`` tokens per grid
            (or more when fewer than that can be dropped: at most the checkerboard colour).

    ``exact_mask(grids, total)``: exactly ``total`` tokens of the clip: every off-checkerboard
    token (forced), then the checkerboard tokens with the lowest R across all grids; when
    ``total`` is below the off-checkerboard count, ``total`` of those evenly spaced in
    time-then-raster order (two adjacent tokens may then both be dropped).
    """

    name = "mssavt"
    default_tau = DEFAULT_TAU

    def score(self, x: torch.Tensor, state: None):
        _, H, W, _ = x.shape
        xn = unit_tokens(x, out=self._work(x, slot=1)[: x.numel()].view(x.shape))
        r = neighbour_similarity(xn, self._work(x))
        board = self._cached(("checkerboard", H, W, x.device), lambda: checkerboard(H, W, x.device))
        return r.masked_fill(~board, NEVER_DROP), None  # off the board: never dropped
