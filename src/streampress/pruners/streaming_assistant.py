"""StreamingAssistant: DTD (temporal) united with MSSAVT (spatial, masked).

``keep = ~(drop_t | drop_s)`` with ``drop_t = sim_t > tau_t`` (DTD, against the previous
grid of the stream) and ``drop_s = (R > tau_s) & checkerboard`` (MSSAVT). Both are computed
on the full grid: MSSAVT also sees the tokens DTD drops, following the paper's union
formula. The first grid of a stream gets the spatial step only.

``keep_ratio`` mode: the redundancy ``r = max(sim_t, R masked to the checkerboard)``
(-inf where neither applies, i.e. off-checkerboard tokens of a stream's first grid); the
highest ``r`` are dropped down to ``ceil(keep_ratio * H * W)`` per grid, or until nothing
droppable is left. With ``tau_t == tau_s`` this is the top-k form of the threshold rule.

Everything is computed from one unit-normalised copy of the chunk, in one vectorised pass.
"""

from __future__ import annotations

import torch

from .base import Pruner, check_exclusive, check_keep_ratio, check_threshold, keep_lowest_per_grid
from .dtd import PreviousGrid, normalise_chunk, temporal_similarity
from .mssavt import checkerboard, neighbour_similarity

#: The paper's operating point: tau_t = 0.2 with tau_s in {0.2, 0.5}; about 92-95% of
#: video tokens dropped. We default to the more aggressive spatial setting.
DEFAULT_TAU_T = 0.2
DEFAULT_TAU_S = 0.2

_NEG_INF = float("-inf")


class StreamingAssistantPruner(Pruner):
    """Temporal (DTD) plus masked spatial (MSSAVT) redundancy pruning.

    Args:
        tau_t: temporal threshold: drop a token whose cosine similarity to the same
            position of the previous grid is above ``tau_t`` (default 0.2).
        tau_s: spatial threshold: drop a checkerboard token whose maximum cosine
            similarity to a 4-neighbour is above ``tau_s`` (default 0.2).
        keep_ratio: instead of the thresholds, keep ``ceil(keep_ratio * H * W)`` tokens
            per grid (more on a stream's first grid when fewer can be dropped).
    """

    name = "streaming_assistant"
    fixed_grid_size = True

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
        else:
            keep_ratio = check_keep_ratio(keep_ratio)
        self.tau_t = tau_t
        self.tau_s = tau_s
        self.keep_ratio = keep_ratio
        super().__init__(tau_t=tau_t, tau_s=tau_s, keep_ratio=keep_ratio)

    def _prune(self, x: torch.Tensor, state: PreviousGrid | None):
        _, H, W, _ = x.shape
        xn, prev, state = normalise_chunk(x, state)
        work = self._work(x)
        sim = temporal_similarity(xn, prev, work)
        r = neighbour_similarity(xn, work)
        board = self._cached(("checkerboard", H, W, x.device), lambda: checkerboard(H, W, x.device))
        if self.keep_ratio is None:
            keep = ~((sim > self.tau_t) | ((r > self.tau_s) & board))
        else:
            keep = keep_lowest_per_grid(torch.maximum(sim, r.masked_fill(~board, _NEG_INF)), self.keep_ratio)
        return keep, state
