"""VidCom2-style frame-distinctiveness pruning: STC-Pruner's score without the memory term.

Per grid: select the ``D/2`` lowest-variance channels, L2-normalise the tokens on them,
take the frame anchor ``a`` = mean of those unit tokens, and score each token by the
multi-bandwidth kernel ``K(x, a)``; the tokens least like their own frame are kept. No
state is carried across grids (the method has no memory), so a stream's grids are
independent.
"""

from __future__ import annotations

from .stc import STCPruner


class VidCom2Pruner(STCPruner):
    """Keep the tokens least similar to their own frame (STC's score, frame anchor only).

    Args:
        tokens_per_grid: tokens kept per grid (default 64; all when the grid is smaller).
        keep_ratio: instead, keep ``ceil(keep_ratio * H * W)`` tokens per grid.
    """

    name = "vidcom2"
    uses_memory = False
    param_names = ("tokens_per_grid", "keep_ratio")

    def __init__(self, *, tokens_per_grid: int | None = None, keep_ratio: float | None = None) -> None:
        super().__init__(tokens_per_grid=tokens_per_grid, keep_ratio=keep_ratio)
