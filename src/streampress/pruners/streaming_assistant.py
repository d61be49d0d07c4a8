"""StreamingAssistant: DTD (temporal) united with MSSAVT (spatial, masked).

``keep = ~(drop_t | drop_s)`` with ``drop_t = sim_t > tau_t`` (DTD, against the previous
grid of the stream) and ``drop_s = (R > tau_s) & checkerboard`` (MSSAVT). Both are computed
on the full grid: MSSAVT also sees the tokens DTD drops, following the paper's union
formula. The first grid of a stream gets the spatial step only.

As a ``ScorePruner``, one score serves both modes: the redundancy *margin*

    r = max(sim_t - tau_t, R_board - tau_s)         (R_board = R on the checkerboard, else -inf)

dropped when ``r > 0`` (the base's threshold 0): the union of the two threshold rules.
``keep_ratio`` mode takes tau_t = tau_s = 0, i.e. ``r = max(sim_t, R_board)`` (-inf where
neither applies, i.e. off-checkerboard tokens of a stream's first grid), and drops the
highest ``r`` down to ``ceil(keep_ratio * H * W)`` per grid, or until nothing droppable is
left. With ``tau_t == tau_s`` this is the top-k form of the threshold rule.

``sim - tau > 0`` is exactly ``sim > tau`` in float32 (the difference of two floats is
never rounded to 0, and tau is rounded to float32 in both): the masks are those of the
union formula. A tau beyond float32's range is clamped to it first, so that ``-inf - tau``
cannot become NaN (cosines and -inf compare with +-3.4e38 as with +-inf).

Everything is computed from one unit-normalised copy of the chunk, in one vectorised pass.
"""

from __future__ import annotations

import torch

from .base import NEVER_DROP, ScorePruner, check_exclusive, check_threshold
from .dtd import PreviousGrid, normalise_chunk, temporal_similarity
from .mssavt import checkerboard, neighbour_similarity

#: The paper's operating point: tau_t = 0.2 with tau_s in {0.2, 0.5}; about 92-95% of
#: video tokens dropped. We default to the more aggressive spatial setting.
DEFAULT_TAU_T = 0.2
DEFAULT_TAU_S = 0.2

_F32_MAX = torch.finfo(torch.float32).max


def _offset(tau: float | None) -> float:
    """What a threshold subtracts from its score: 0 in keep_ratio mode, else ``tau`` clamped to
    float32's finite range (see the module docstring)."""
    return 0.0 if tau is None else min(max(tau, -_F32_MAX), _F32_MAX)


class StreamingAssistantPruner(ScorePruner):
    """Temporal (DTD) plus masked spatial (MSSAVT) redundancy pruning.

    Args:
        tau_t: temporal threshold: drop a token whose cosine similarity to the same
            position of the previous grid is above ``tau_t`` (default 0.2).
        tau_s: spatial threshold: drop a checkerboard token whose maximum cosine
            similarity to a 4-neighbour is above ``tau_s`` (default 0.2).
        keep_ratio: instead of the thresholds, keep ``ceil(keep_ratio * H * W)`` tokens
            per grid (more on a stream's first grid when fewer can be dropped).

    ``exact_mask(grids, total)``: exactly ``total`` tokens of the clip ranked by the same margin
    ``r`` (with the thresholds, or 0 in keep_ratio mode): the off-checkerboard tokens of a
    stream's first grid are forced, the rest go to the lowest ``r`` across all grids; below
    the forced count, that many of them evenly spaced.
    """

    name = "streaming_assistant"
    fixed_grid_size = True
    param_names = ("tau_t", "tau_s", "keep_ratio")

    def __init__(
        self,
        *,
        tau_t: float | None = None,
        tau_s: float | None = None,
        keep_ratio: float | None = None,
    ) -> None:
        check_exclusive(keep_ratio, tau_t=tau_t, tau_s=tau_s)
        if keep_ratio is None:
            tau_t = check_threshold(DEFAULT_TAU_T if tau_t is None else tau_t, "tau_t")
            tau_s = check_threshold(DEFAULT_TAU_S if tau_s is None else tau_s, "tau_s")
        self.tau_t = tau_t
        self.tau_s = tau_s
        # Thresholds: drop when the margin is > 0.
        super().__init__(threshold=None if keep_ratio is not None else 0.0, keep_ratio=keep_ratio)

    def score(self, x: torch.Tensor, state: PreviousGrid | None):
        _, H, W, _ = x.shape
        xn, prev, state = normalise_chunk(x, state)
        work = self._work(x)
        sim = temporal_similarity(xn, prev, work).sub_(_offset(self.tau_t))
        r = neighbour_similarity(xn, work).sub_(_offset(self.tau_s))
        board = self._cached(("checkerboard", H, W, x.device), lambda: checkerboard(H, W, x.device))
        return torch.maximum(sim, r.masked_fill_(~board, NEVER_DROP)), state
