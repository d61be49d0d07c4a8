"""DTD: temporal differential token drop (TimeChat-Online), and EVS as its ratio preset.

For every grid t > 0 of a stream and every position (h, w)::

    sim_t[h, w] = cos(x_t[h, w], x_{t-1}[h, w])        drop when sim_t[h, w] > tau

Grid t is compared with the immediately previous grid of the stream (not with the last
*kept* token at that position), also across calls: the pruner carries the previous grid
(L2-normalised) as its stream state. The first grid of a stream is always kept whole.

``keep_ratio`` mode drops the ``N - k`` tokens with the highest ``sim_t`` per grid
(``k = ceil(keep_ratio * H * W)``); the first grid still keeps all its tokens. This is the
streaming, per-grid form of EVS, registered as ``evs``.

Both are ``ScorePruner``s (via ``ThresholdPruner``): the score is ``sim_t``, and the first
grid of a stream scores ``NEVER_DROP``, which is how "kept whole" holds in both modes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .base import NEVER_DROP, ThresholdPruner, rowdot, unit_tokens

#: TimeChat-Online's conservative published operating point (drops ~45% of video tokens;
#: tau = 0.25 drops ~85%).
DEFAULT_TAU = 0.5
DEFAULT_EVS_KEEP_RATIO = 0.25


def temporal_similarity(
    xn: torch.Tensor, prev: torch.Tensor | None, work: torch.Tensor | None = None
) -> torch.Tensor:
    """``cos(x_t, x_{t-1})`` per position, ``[T, H, W]``, from unit tokens ``xn [T, H, W, D]``.

    ``prev`` is the unit-normalised grid before ``xn[0]`` (``[H, W, D]``), or None at the
    start of a stream: the first grid then scores ``NEVER_DROP`` (-inf: nothing to compare
    with). ``work``: optional scratch buffer (see ``rowdot``).
    """
    if prev is None:
        first = torch.full((1,) + xn.shape[1:3], NEVER_DROP, device=xn.device)
    else:
        first = rowdot(xn[:1], prev, work)  # prev broadcasts: [1, H, W]
    if xn.shape[0] == 1:
        return first
    return torch.cat([first, rowdot(xn[1:], xn[:-1], work)])


class PreviousGrid(NamedTuple):
    """Stream state of the temporal methods.

    ``grid``: the stream's last grid as unit tokens ``[H, W, D]``. ``spare``: a buffer of the
    same shape (the grid before it, no longer needed) that the next single-grid call
    normalises into: streaming one grid per call then allocates nothing, which matters at
    this size (a fresh 3.5 MiB buffer per call costs ~900 page faults).
    """

    grid: torch.Tensor
    spare: torch.Tensor | None


def normalise_chunk(
    x: torch.Tensor, state: PreviousGrid | None
) -> tuple[torch.Tensor, torch.Tensor | None, PreviousGrid]:
    """Unit tokens of the chunk ``x [T, H, W, D]``, the grid before it (or None), new state."""
    prev = spare = None
    if state is not None:
        prev, spare = state
        if prev.device != x.device:  # the stream moved to another device
            prev, spare = prev.to(x.device), None
    fits = x.shape[0] == 1 and spare is not None and spare.shape == x.shape[1:] and spare.device == x.device
    xn = unit_tokens(x, out=spare.unsqueeze(0) if fits else None)
    last = xn[0] if x.shape[0] == 1 else xn[-1].clone()  # never keep the whole chunk alive
    return xn, prev, PreviousGrid(last, prev)


class DTDPruner(ThresholdPruner):
    """Drop tokens that barely changed since the previous grid of the stream.

    Args:
        tau: cosine-similarity threshold; a token is dropped when its similarity to the
            same position in the previous grid is above ``tau`` (default 0.5).
        keep_ratio: instead of ``tau``, keep exactly ``ceil(keep_ratio * H * W)`` tokens of
            every grid after the first (the least similar to the previous grid).

    ``exact_mask(grids, total)``: exactly ``total`` tokens of the clip: a stream's first grid
    whole (forced), then the tokens least similar to their previous grid across all grids
    (EVS's global top-k); below one grid's worth, ``total`` first-grid tokens evenly spaced.
    """

    name = "dtd"
    fixed_grid_size = True
    default_tau = DEFAULT_TAU

    def score(self, x: torch.Tensor, state: PreviousGrid | None):
        xn, prev, state = normalise_chunk(x, state)
        # The first grid of a stream scores NEVER_DROP: kept whole in every mode.
        return temporal_similarity(xn, prev, self._work(x)), state


class EVSPruner(DTDPruner):
    """EVS in its streaming form: DTD's ``keep_ratio`` mode (default keeps 25% per grid).

    EVS (Efficient Video Sampling) drops the temporally most static tokens against a
    global top-k over the whole video; a stream has no "whole video", so the budget is
    applied per grid. The first grid of a stream is kept whole.
    """

    name = "evs"
    param_names = ("keep_ratio",)

    def __init__(self, *, keep_ratio: float = DEFAULT_EVS_KEEP_RATIO) -> None:
        super().__init__(keep_ratio=keep_ratio)
