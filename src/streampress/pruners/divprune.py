"""DivPrune: per-grid greedy max-min diversity selection on cosine distance.

Per grid, with cosine distance ``d(u, v) = 1 - cos(u, v)``: start from the token whose
nearest *other* token is farthest (the largest minimum distance to every other token),
then repeatedly add the token whose minimum distance to the selected set is largest, until
``k`` tokens are selected. Ties go to the earlier token in raster order.

The first pick is DivPrune's reference code's (it takes, per token, the second-smallest
entry of its distance column: the smallest is the distance 0 to itself). Here the diagonal
is excluded explicitly, so a duplicate token (distance 0, or a rounding error below the
self-distance) cannot be mistaken for the token itself.

Why DivPrune subclasses the plain ``Pruner`` and not ``ScorePruner``: a token's worth
depends on the tokens already picked, so there is no per-token score to rank once. (The
greedy pick order could serve as one, but computing it costs N - 1 sequential steps
instead of k - 1, four times as many at keep_ratio 0.25, and a threshold mode would mean
nothing.) It shares the budget rule through ``token_budget``.

The greedy loop is sequential in ``k`` by nature; every step is vectorised over the
tokens and over all the grids of the call, from one batched Gram matrix. No state is
carried across grids. The tokens are normalised with ``unit_tokens`` (relative epsilon,
range-safe), so the selection does not depend on the scale of the embeddings.
"""

from __future__ import annotations

import torch

from .base import Pruner, check_count, check_exclusive, check_keep_ratio, token_budget, unit_tokens

DEFAULT_KEEP_RATIO = 0.25


def max_min_diverse(xn: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min selection of ``k`` tokens per grid from unit tokens ``xn [T, N, D]``.
    Returns a bool mask ``[T, N]``."""
    T, N, _ = xn.shape
    rows = torch.arange(T, device=xn.device)
    dist = 1.0 - torch.bmm(xn, xn.mT)  # [T, N, N]
    # Distance to the nearest other token: the diagonal (self) excluded. N = 1: all inf, pick 0.
    eye = torch.eye(N, dtype=torch.bool, device=xn.device)
    first = dist.masked_fill(eye, float("inf")).amin(dim=2).argmax(dim=1)  # first max wins
    selected = torch.zeros((T, N), dtype=torch.bool, device=xn.device)
    selected[rows, first] = True
    min_dist = dist[rows, first]  # [T, N]
    for _ in range(k - 1):
        nxt = min_dist.masked_fill(selected, float("-inf")).argmax(dim=1)
        selected[rows, nxt] = True
        min_dist = torch.minimum(min_dist, dist[rows, nxt])
    return selected


class DivPrunePruner(Pruner):
    """Keep a maximally diverse subset of every grid (greedy max-min cosine distance).

    Args:
        keep_ratio: keep ``ceil(keep_ratio * H * W)`` tokens per grid (default 0.25).
        tokens_per_grid: instead, keep this many tokens per grid (all when the grid is smaller).

    ``exact_mask(grids, total)``: exactly ``total`` tokens of the clip, by the same greedy
    max-min selection run over the clip's tokens jointly (no forced set).
    """

    name = "divprune"

    def __init__(self, *, keep_ratio: float | None = None, tokens_per_grid: int | None = None) -> None:
        check_exclusive(keep_ratio, tokens_per_grid=tokens_per_grid)
        if tokens_per_grid is None:
            keep_ratio = check_keep_ratio(DEFAULT_KEEP_RATIO if keep_ratio is None else keep_ratio)
        else:
            tokens_per_grid = check_count(tokens_per_grid, "tokens_per_grid")
        self.keep_ratio = keep_ratio
        self.tokens_per_grid = tokens_per_grid
        super().__init__(keep_ratio=keep_ratio, tokens_per_grid=tokens_per_grid)

    def _prune(self, x: torch.Tensor, state: None):
        T, H, W, D = x.shape
        N = H * W
        z = x.reshape(T, N, D)
        k = token_budget(N, self.keep_ratio, self.tokens_per_grid)
        return max_min_diverse(unit_tokens(z), k).view(T, H, W), None

    def _prune_exact(self, x: torch.Tensor, state: None, total: int):
        """Exact-count mode: the greedy max-min selection over all ``T * H * W`` tokens of the
        clip jointly (one Gram matrix of the clip), ``total`` picks; ties to the earlier token
        in time-then-raster order. No forced set."""
        T, H, W, D = x.shape
        if total == 0:
            return torch.zeros((T, H, W), dtype=torch.bool, device=x.device), None
        z = unit_tokens(x.reshape(T, H * W, D)).reshape(1, T * H * W, D)
        return max_min_diverse(z, total).view(T, H, W), None
