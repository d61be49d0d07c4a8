"""STC-Pruner (STC: Accelerating Streaming Video LLMs via Hierarchical Token Compression).

Per grid with tokens ``Z [N, D]``:

1. Channels: the ``D/2`` channels with the smallest population variance over the grid's
   tokens (ties: the lower channel index), used for scoring only.
2. Memory: the grid's mean over tokens, in **all** D channels, joins the stream's memory;
   ``m`` = mean of the memory entries (this grid included), restricted to this grid's
   channels and L2-normalised. Keeping full-D means and selecting afterwards keeps the
   coordinates consistent (the public code averages means taken over different channel
   subsets), and the memory is emptied by ``reset()`` (the public code never resets it).
   Optional ``window``: only the last ``window`` grid means count.
3. ``x`` = L2-normalised selected-channel tokens; frame anchor ``a`` = mean of ``x``
   (not re-normalised).
4. Kernel ``K(u, v) = sum over alpha in {1/8, 1/4, 1/2, 1, 2} of exp(-||u - v||^2 / (2 alpha))``.
5. Score ``s = K(x, a) + K(x, m)`` (high = redundant); keep the ``k`` lowest scores
   (``ScorePruner``'s ``tokens_per_grid`` or ``keep_ratio`` budget, ties in raster order).

VidCom2 (``vidcom2.py``) is the same score without the memory term.

Implementation notes (speed): the selected channels are a 0/1 channel mask rather than a
gather, and ``x`` is never materialised: ``||x_i - v||^2 = |x_i|^2 + |v|^2 - 2 (z_i . v) / n_i``
for an anchor ``v`` that is zero outside the selected channels, so two matrix-vector
products over the raw grid give every distance. The memory sum is kept in float64.

Numerics (scale-free): the score depends on the grids only through directions (unit
tokens, the normalised memory mean), so a stream multiplied by a constant must give the
same masks. Tiny grids would hit an absolute epsilon in the norm clamps and huge but finite
ones (x 1e20, or bfloat16 near its range) overflow float32 in the squares, turning every
score into NaN and the selection into raster order. So: a grid whose RMS token norm is
outside ``SAFE_SCALE`` (or whose variance or squared mean overflows) is scored as its copy
multiplied by a power of two (exact), the memory receives the grid's mean in the original
units (the copy's mean divided back, exact, in float64), the memory mean is divided by its
largest component before it is normalised, and the norm clamps are relative to the grid.
Grids of ordinary scale take the fast path, with no extra pass.
"""

from __future__ import annotations

import torch

from .base import NORM_EPS, TINY, ScorePruner, check_count, check_exclusive, range_factors

KERNEL_ALPHAS = (1 / 8, 1 / 4, 1 / 2, 1.0, 2.0)
#: Public STC default: 60 of LLaVA-OneVision's 196 tokens per frame, 64 later; 64 of a
#: 16x16 Qwen grid is a quarter.
DEFAULT_TOKENS_PER_GRID = 64


def token_statistics(z: torch.Tensor, work: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per grid and channel, the mean and the population variance over tokens: ``[T, D]`` each.

    ``work``: optional flat scratch buffer for the centred tokens (see ``Pruner._work``).
    """
    # Means over tokens as batched matrix products with a 1/N row: on the CPU this is ~1.5x
    # faster than a reduction over the (non-innermost) token axis, 3x on grids not in cache.
    weights = torch.full((z.shape[0], 1, z.shape[1]), 1.0 / z.shape[1], dtype=z.dtype, device=z.device)
    mean = torch.bmm(weights, z)  # [T, 1, D]
    centred = torch.sub(z, mean, out=None if work is None else work[: z.numel()].view(z.shape))
    return mean.squeeze(1), torch.bmm(weights, centred.square_()).squeeze(1)


def select_channels(var: torch.Tensor) -> torch.Tensor:
    """0/1 float mask ``[T, D]`` of the ``max(1, D // 2)`` lowest-variance channels per grid."""
    idx = torch.sort(var, dim=-1, stable=True).indices[:, : max(1, var.shape[1] // 2)]
    return torch.zeros_like(var).scatter_(1, idx, 1.0)


def kernel(d2: torch.Tensor, neg_gammas: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-bandwidth Gaussian kernel ``sum_alpha exp(-d2 / (2 alpha))`` of squared distances.

    ``neg_gammas``: the factors ``-1 / (2 alpha)`` as a tensor on ``d2``'s device (callers
    cache it, so that no host-to-device copy happens per call); built here when None.
    """
    if neg_gammas is None:
        neg_gammas = kernel_factors(d2.device)
    return torch.exp(d2.unsqueeze(-1) * neg_gammas).sum(dim=-1)


def kernel_factors(device: torch.device | str = "cpu") -> torch.Tensor:
    """``-1 / (2 alpha)`` for every kernel bandwidth, float32 on ``device``."""
    return torch.tensor([-0.5 / a for a in KERNEL_ALPHAS], dtype=torch.float32, device=device)


def redundancy_scores(
    z: torch.Tensor,
    var: torch.Tensor,
    memory: torch.Tensor | None = None,
    work: torch.Tensor | None = None,
    neg_gammas: torch.Tensor | None = None,
) -> torch.Tensor:
    """STC's score per token, ``[T, N]`` (high = redundant).

    ``z [T, N, D]`` raw tokens (of a scale whose squares fit float32: see ``STCPruner``),
    ``var [T, D]`` their per-channel variance over tokens, ``memory [T, D]`` the full-D
    memory mean seen by each grid, any scale and dtype (None: VidCom2's score, frame anchor
    only); ``work`` an optional flat scratch buffer for ``z ** 2`` and ``neg_gammas`` the
    cached kernel factors (see ``kernel``).
    """
    N = z.shape[1]
    channels = select_channels(var)
    squares = torch.square(z, out=None if work is None else work[: z.numel()].view(z.shape))
    norms = torch.bmm(squares, channels.unsqueeze(-1)).squeeze(-1).sqrt_()  # selected-channel norms
    # Relative clamp: tokens far shorter than the grid's longest count as zero tokens.
    floor = (norms.amax(dim=1, keepdim=True) * NORM_EPS).clamp_min_(TINY)
    inv = 1.0 / torch.maximum(norms, floor)
    anchor = torch.bmm((inv / N).unsqueeze(1), z).squeeze(1) * channels  # mean of unit tokens
    anchors = [anchor]
    if memory is not None:
        # Divided by its largest component first (in its own dtype): its squares cannot
        # overflow, and the clamp is relative to the memory mean's scale.
        memory = memory / memory.abs().amax(dim=-1, keepdim=True).clamp_min(TINY)
        m = memory.to(z.dtype) * channels
        anchors.append(m / torch.linalg.vector_norm(m, dim=-1, keepdim=True).clamp_min(NORM_EPS))
    v = torch.stack(anchors, dim=1)  # [T, J, D]
    dots = torch.bmm(v, z.mT) * inv.unsqueeze(1)  # x_i . v, [T, J, N] (this layout is the fast gemm)
    xx = (norms * inv).square_().unsqueeze(1)  # |x_i|^2: 1, or 0 for an all-zero token
    vv = v.square().sum(-1).unsqueeze(-1)  # |v|^2, [T, J, 1]
    d2 = (xx + vv - 2.0 * dots).clamp_min_(0.0)
    return kernel(d2, neg_gammas).sum(dim=1)


def _stream_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


class STCPruner(ScorePruner):
    """Keep the tokens least similar to their frame and to the stream's memory.

    Args:
        tokens_per_grid: tokens kept per grid (default 64; all when the grid is smaller).
        keep_ratio: instead, keep ``ceil(keep_ratio * H * W)`` tokens per grid.
        window: the memory holds the last ``window`` grid means (default None: every grid
            since the stream started).
    """

    name = "stc"
    uses_memory = True
    param_names = ("tokens_per_grid", "keep_ratio", "window")

    def __init__(
        self,
        *,
        tokens_per_grid: int | None = None,
        keep_ratio: float | None = None,
        window: int | None = None,
    ) -> None:
        check_exclusive(keep_ratio, tokens_per_grid=tokens_per_grid)
        if keep_ratio is None and tokens_per_grid is None:
            tokens_per_grid = DEFAULT_TOKENS_PER_GRID
        self.window = None if window is None else check_count(window, "window")
        super().__init__(tokens_per_grid=tokens_per_grid, keep_ratio=keep_ratio)

    def score(self, x: torch.Tensor, state):
        T, H, W, D = x.shape
        z = x.reshape(T, H * W, D)
        work = self._work(x)
        mean, var = token_statistics(z, work)
        raw_mean = mean
        rms = (var + mean.square()).sum(dim=-1).sqrt()  # RMS token norm; inf if squares overflow
        # A mean does not overflow: it is the finiteness witness (catches NaN and inf).
        rescale = range_factors(z, rms, finite=mean)  # None on the CPU for grids of ordinary scale
        if rescale is not None:
            z = z * rescale.view(T, 1, 1)  # exact: same directions, squares now fit float32
            mean, var = token_statistics(z, work)
            dtype = _stream_dtype(x.device)
            raw_mean = mean.to(dtype) / rescale.to(dtype).unsqueeze(1)
        memory, state = self._memory(raw_mean, state) if self.uses_memory else (None, None)
        factors = self._cached(("kernel", x.device), lambda: kernel_factors(x.device))
        return redundancy_scores(z, var, memory, work, factors).view(T, H, W), state

    def _memory(self, mean: torch.Tensor, state):
        """Memory mean seen by each grid of the chunk ``[T, D]``, and the new stream state.

        Each grid's memory mean is computed from exactly the same numbers in the same order
        however the stream is cut into calls (a cumulative sum over the carried sum, or a
        window over zero-padded history), so slicing the stream does not change the masks.
        """
        T, D = mean.shape
        dtype = _stream_dtype(mean.device)
        means = mean.to(dtype)
        # The count of grids seen is a tensor, so that a call reads nothing back and a CUDA
        # graph or a compiled graph replays it (a Python int would change every call).
        count = torch.zeros((), device=mean.device, dtype=dtype) if state is None else state[1].to(mean.device)
        counts = count + torch.arange(1, T + 1, device=mean.device, dtype=dtype)
        if self.window is None:
            carried = (
                torch.zeros((1, D), device=mean.device, dtype=dtype) if state is None else state[0].to(mean.device)
            )
            sums = torch.cat([carried, means]).cumsum(dim=0)
            memory = sums[1:] / counts.unsqueeze(1)
            new_state = (sums[-1:].clone(), count + T)
        else:
            w = self.window
            history = (
                torch.zeros((w - 1, D), device=mean.device, dtype=dtype) if state is None else state[0].to(mean.device)
            )
            seq = torch.cat([history, means])  # [w - 1 + T, D]
            memory = seq.unfold(0, w, 1).sum(dim=-1) / counts.clamp_max(w).unsqueeze(1)
            new_state = (seq[T:].clone(), count + T)
        return memory, new_state  # in the stream dtype: redundancy_scores rescales it
