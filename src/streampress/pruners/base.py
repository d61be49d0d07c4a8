"""The pruner base class and the helpers every method shares.

A pruner belongs to one stream. ``keep = pruner(grids)`` takes the next ``T`` grids of
the stream as a float tensor ``[T, H, W, D]`` and returns a bool tensor ``[T, H, W]``
(True = keep) on the same device. ``pruner.reset()`` starts a new stream.

Two base classes:

- ``Pruner`` does the bookkeeping (below); a method implements ``_prune(x, state) ->
  (keep, new_state)``. Only methods whose mask is not a per-token ranking use it directly
  (DivPrune: a greedy selection where each pick depends on the previous ones).
- ``ScorePruner(Pruner)`` is for everything else (in the spirit of kvpress's
  ``ScorerPress``): a method implements ``score(x, state) -> (scores, new_state)`` only,
  and the base owns the budget, the ties and the commit, so that every method gets the
  same budget semantics from the same ten lines instead of re-implementing them.

``Pruner`` bookkeeping:

- input validation (rank 4, floating dtype, D fixed within a stream, finite values);
- conversion to float32 (the scores are always computed in float32, whatever the input
  dtype, so fp16/bf16 grids give the same masks as their float32 copies);
- scale-free numerics (``unit_tokens``, ``grid_scale``): every method scores directions,
  so multiplying a stream by a constant must not change a mask. A fixed epsilon in a norm
  clamp breaks that for tiny grids (tokens of norm 1e-15 would be divided by 1e-12), and
  squares overflow float32 for huge but finite ones (bfloat16 has float32's range). So
  the epsilon is relative to the longest token of the grid, and a grid whose scale is far
  from 1 is first multiplied by a power of two (exact, so the masks are bit-identical to
  the unscaled grid's). Grids of ordinary scale take a fast path that adds no pass.
- the per-stream state: a method's ``_prune(x, state)`` is pure, it returns the mask and
  the new state, and the base class stores the new state only after ``_prune`` returned.
  A call that raises therefore leaves the pruner exactly as it was.

Budget (``ScorePruner.select``), one of, fixed at construction:

- ``threshold``: drop the tokens with ``score > threshold`` (DTD's and MSSAVT's ``tau``);
- ``keep_ratio``: keep exactly ``ceil(keep_ratio * H * W)`` tokens per grid;
- ``tokens_per_grid``: keep ``min(tokens_per_grid, H * W)`` tokens per grid.

Scores: higher = more redundant = dropped first. Ties go by raster order (the earlier
token is kept), whatever the sort algorithm or device. Structural rules that are not
scores are scores too: ``NEVER_DROP`` (-inf) marks a token that may not be dropped in any
mode (DTD's first grid of a stream, the tokens off MSSAVT's checkerboard), so a budget
mode keeps more than its count where too few tokens may go. The real number kept per grid
is ``keep.sum(dim=(1, 2))``.

Exact-count mode (``pruner.exact_mask(grids, total)``), whatever the budget the pruner was
built with: a bool mask ``[T, H, W]`` with exactly ``total`` True over the whole clip (what
a serving engine that sized its placeholders in advance needs, e.g. vLLM). Defined by
``exact_keep(scores, total)`` on the method's own scores:

1. the forced set ``F`` (``NEVER_DROP`` tokens: a stream's first grid for DTD/EVS, the
   tokens off the checkerboard for MSSAVT, both for StreamingAssistant) is kept first;
2. the remaining ``total - |F|`` places go to the lowest-scored (least redundant) other
   tokens across all grids of the clip; ties by time, then raster order (the earlier kept);
3. when ``total < |F|`` the structural rule cannot hold: the mask keeps ``total`` forced
   tokens evenly spaced in their time-then-raster order (forced token number
   ``floor(i * |F| / total)``, ``i = 0 .. total-1``), so every grid keeps about its share,
   and no other token. ``total`` must lie in ``[0, T*H*W]``.

Equivalently (for ``total >= |F|``) the kept set minimises the sum of kept scores over all
sets of size ``total`` that contain ``F``. Consequences: with one grid and ``total`` equal to
the per-grid mask's count the two masks are identical; with ``total`` equal to a threshold
mask's count the exact mask is that threshold mask (any ``T``); content-independent scores
(``uniform``, ``random``) give the per-grid mask at ``total = T * k``. Like ``__call__``, the
call continues the stream (state, ``grids_seen``); ``reset()`` first for an independent clip.
DivPrune (not a score) runs its greedy max-min selection over the clip's tokens jointly.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

#: Smallest norm used when dividing by a token's norm, relative to the longest token of its
#: grid (as ``torch.nn.functional.normalize``'s eps, but scale-free): an all-zero token gets
#: cosine 0 with everything instead of NaN.
NORM_EPS = 1e-12
#: Grids whose scale (largest token norm) lies in this range are scored as they are; the
#: others are first rescaled by a power of two (see ``grid_scale``). Inside it, squares and
#: their sums stay far from float32's overflow and underflow.
SAFE_SCALE = (2.0**-32, 2.0**32)
#: Floor of every norm clamp: the smallest normal float32 (an all-zero grid divides by it).
TINY = torch.finfo(torch.float32).tiny
#: The score of a token that may not be dropped in any budget mode (a structural rule).
NEVER_DROP = float("-inf")


class Pruner:
    """Base class of all pruners: validation, per-stream state and its commit.

    Methods that rank tokens by a score subclass :class:`ScorePruner` instead. Direct
    subclasses set ``name``, pass their effective parameters to ``__init__`` and
    implement ``_prune(x, state) -> (keep, new_state)`` where ``x`` is a validated
    float32 tensor ``[T, H, W, D]`` with ``T >= 1``. ``_prune`` must not modify ``self``'s
    stream state (caches derived only from shapes are fine) and must check finiteness
    with :func:`require_finite` before it returns.
    """

    #: Registered method name (an instance may carry a preset's name instead).
    name: str = "pruner"
    #: True for methods that compare grid t with grid t-1 position by position: then H
    #: and W, not only D, must stay the same within a stream.
    fixed_grid_size: bool = False

    def __init__(self, **params: Any) -> None:
        self._params = dict(params)
        self._shape_cache: dict[tuple, torch.Tensor] = {}
        self._scratch: dict[int, torch.Tensor] = {}
        self.reset()

    # ----------------------------------------------------------------- public API
    @property
    def params(self) -> dict[str, Any]:
        """The effective parameters of this pruner (a copy)."""
        return dict(self._params)

    @property
    def grids_seen(self) -> int:
        """How many grids of the current stream this pruner has processed."""
        return self._grids_seen

    def reset(self) -> None:
        """Start a new stream: forget every grid seen so far."""
        self._stream_shape: tuple[int, int, int] | None = None
        self._grids_seen = 0
        self._state: Any = None

    def snapshot(self) -> tuple:
        """The stream state as an opaque value for :meth:`restore` (no copy: ``_prune`` is
        pure, so the state objects are never modified in place)."""
        return self._stream_shape, self._grids_seen, self._state

    def restore(self, snapshot: tuple) -> None:
        """Return to the stream state ``snapshot`` (from :meth:`snapshot`) was taken in:
        a session undoing a failed chunk, or a question's temporary item."""
        self._stream_shape, self._grids_seen, self._state = snapshot

    def __call__(self, grids: torch.Tensor) -> torch.Tensor:
        """Keep mask ``[T, H, W]`` (bool, True = keep) for the next ``T`` grids of the stream."""
        x = self._validated(grids)
        T, H, W, _ = x.shape
        if T == 0:
            return torch.zeros((0, H, W), dtype=torch.bool, device=x.device)
        return self._commit(x, *self._prune(x, self._state))

    def exact_mask(self, grids: torch.Tensor, total: int) -> torch.Tensor:
        """Keep mask ``[T, H, W]`` with exactly ``total`` True over the next ``T`` grids of the
        stream (exact-count mode, see the module docstring); the pruner's own per-grid
        budget is not used. Continues the stream like ``__call__`` (and commits its state
        only when it returns). ``total`` in ``[0, T * H * W]``."""
        x = self._validated(grids)
        T, H, W, _ = x.shape
        total = check_total(total, T * H * W)
        if T == 0:
            return torch.zeros((0, H, W), dtype=torch.bool, device=x.device)
        return self._commit(x, *self._prune_exact(x, self._state, total))

    def _commit(self, x: torch.Tensor, keep: torch.Tensor, state: Any) -> torch.Tensor:
        """The end of ``__call__`` / ``exact_mask``: the finiteness check a sync-free scoring
        deferred (see ``sync_free``), then the new stream state, stored only now that the
        method returned (a failing call changes nothing). Returns ``keep``."""
        if sync_free(x):
            check_finite_after(x)
        T, H, W, D = x.shape
        self._state = state
        self._stream_shape = (H, W, D)
        self._grids_seen += T
        return keep

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params.items())
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------ for subclasses
    def _prune(self, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def _prune_exact(self, x: torch.Tensor, state: Any, total: int) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError(f"{type(self).__name__} has no exact-count mode")

    def _cached(self, key: tuple, build) -> torch.Tensor:
        """A tensor derived only from shapes/devices (never from stream content), built once."""
        value = self._shape_cache.get(key)
        if value is None:
            value = build()
            self._shape_cache[key] = value
        return value

    def _work(self, like: torch.Tensor, slot: int = 0) -> torch.Tensor:
        """A flat float32 scratch buffer with room for ``like.numel()`` values.

        Reused from call to call for the grid-sized temporaries of the scoring (a product
        before a reduction, the unit tokens): a fresh multi-MiB buffer per call can cost
        hundreds of page faults when the allocator hands the memory back to the OS in
        between. Different ``slot`` numbers are different buffers. The content is never
        state: a failed call may leave anything in it.
        """
        buf = self._scratch.get(slot)
        if buf is None or buf.numel() < like.numel() or buf.device != like.device:
            buf = torch.empty(like.numel(), dtype=torch.float32, device=like.device)
            self._scratch[slot] = buf
        return buf

    def _validated(self, grids: Any) -> torch.Tensor:
        if not isinstance(grids, torch.Tensor):
            raise TypeError(
                f"grids must be a torch.Tensor of shape [T, H, W, D], got {type(grids).__name__}"
            )
        if grids.dim() != 4:
            hint = " (a single grid [H, W, D] needs a leading time axis: grids[None])" if grids.dim() == 3 else ""
            raise ValueError(
                f"grids must have rank 4, shape [T, H, W, D]; got rank {grids.dim()} "
                f"with shape {tuple(grids.shape)}{hint}"
            )
        if not grids.is_floating_point():
            raise TypeError(
                f"grids must have a floating dtype (float32, float16, bfloat16, ...), got {grids.dtype}"
            )
        _, H, W, D = grids.shape
        if H == 0 or W == 0 or D == 0:
            raise ValueError(f"grids must have H, W and D >= 1, got shape {tuple(grids.shape)}")
        if self._stream_shape is not None:
            H0, W0, D0 = self._stream_shape
            if D != D0:
                raise ValueError(
                    f"grids have D={D} but this stream started with D={D0}; D must stay the same "
                    f"within a stream (call reset() to start a new stream)"
                )
            if self.fixed_grid_size and (H, W) != (H0, W0):
                raise ValueError(
                    f"grids are {H}x{W} but this stream started with {H0}x{W0}; {self.name} compares "
                    f"each grid with the previous one position by position, so H and W must stay "
                    f"the same within a stream (call reset() to start a new stream)"
                )
        x = grids.detach()
        return x if x.dtype == torch.float32 else x.float()


class ScorePruner(Pruner):
    """A pruner defined by a per-token redundancy score; the base owns the budget.

    Subclasses set ``name`` (and ``param_names`` when they have parameters besides
    ``keep_ratio``), set their own parameters as attributes, call
    ``super().__init__(threshold=... | keep_ratio=... | tokens_per_grid=...)`` with exactly
    one budget, and implement :meth:`score`. ``params`` is ``{n: getattr(self, n) for n in
    param_names}``, read once here (so set the attributes first).
    """

    #: The public parameters, as ``create_pruner`` takes them (attribute names, in order).
    param_names: tuple[str, ...] = ("keep_ratio",)

    def __init__(
        self,
        *,
        threshold: float | None = None,
        keep_ratio: float | None = None,
        tokens_per_grid: int | None = None,
    ) -> None:
        if sum(v is not None for v in (threshold, keep_ratio, tokens_per_grid)) != 1:
            raise TypeError(f"{type(self).__name__}: give exactly one of threshold, keep_ratio, tokens_per_grid")
        self.threshold = None if threshold is None else check_threshold(threshold, "threshold")
        self.keep_ratio = None if keep_ratio is None else check_keep_ratio(keep_ratio)
        self.tokens_per_grid = None if tokens_per_grid is None else check_count(tokens_per_grid, "tokens_per_grid")
        super().__init__(**{n: getattr(self, n) for n in self.param_names})

    def score(self, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """Redundancy ``scores [T, H, W]`` (float, high = dropped first) of the validated
        float32 grids ``x [T, H, W, D]``, and the new stream state.

        Pure, like ``_prune``: ``state`` is what the previous call returned (None at the
        start of a stream) and must not be modified in place. Must check that ``x`` is
        finite (``unit_tokens``, ``range_factors``, ``require_finite``,
        ``require_finite_grids`` or ``safe_grids`` do). ``NEVER_DROP`` marks tokens that
        may not be dropped.
        """
        raise NotImplementedError

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Keep mask ``[T, H, W]`` (bool) from ``scores [T, H, W]`` under this pruner's budget."""
        if self.threshold is not None:
            return scores <= self.threshold
        T, H, W = scores.shape
        k = token_budget(H * W, self.keep_ratio, self.tokens_per_grid)
        return keep_lowest(scores.reshape(T, H * W), k).view(T, H, W)

    def _prune(self, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        scores, state = self._checked_score(x, state)
        return self.select(scores), state  # Pruner.__call__ commits the state

    def _prune_exact(self, x: torch.Tensor, state: Any, total: int) -> tuple[torch.Tensor, Any]:
        scores, state = self._checked_score(x, state)
        return exact_keep(scores, total), state

    def _checked_score(self, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """:meth:`score`, with one score per token checked."""
        scores, state = self.score(x, state)
        if scores.shape != x.shape[:3]:
            raise RuntimeError(
                f"{type(self).__name__}.score returned scores of shape {tuple(scores.shape)}, "
                f"expected {tuple(x.shape[:3])} (one per token)"
            )
        return scores, state


class ThresholdPruner(ScorePruner):
    """A method with one cosine-similarity threshold ``tau`` or, instead, a ``keep_ratio``.

    Subclasses set ``default_tau`` and implement ``score``: ``score > tau`` is dropped, or
    all but the ``ceil(keep_ratio*H*W)`` lowest per grid.
    """

    default_tau: float
    param_names = ("tau", "keep_ratio")

    def __init__(self, *, tau: float | None = None, keep_ratio: float | None = None) -> None:
        check_exclusive(keep_ratio, tau=tau)
        if keep_ratio is None:
            tau = check_threshold(self.default_tau if tau is None else tau, "tau")
        self.tau = tau
        super().__init__(threshold=tau, keep_ratio=keep_ratio)


# --------------------------------------------------------------------- helpers
def sync_free(x: torch.Tensor) -> bool:
    """Whether scoring ``x`` must not read a value back from its device: True off the CPU.

    On an accelerator, ``bool(tensor)`` in the per-frame path waits for every queued kernel,
    and it makes the call impossible to capture as a CUDA graph or to compile as one graph
    (``torch.compile``): the fast paths of a per-frame call. There the scoring takes no
    data-dependent branch: the rare power-of-two rescale of out-of-range grids is applied
    through ``torch.where`` (a factor of exactly 1 otherwise, so the masks are bit for bit
    those of the branching CPU path), ``require_finite`` defers, and ``Pruner.__call__``
    checks finiteness once after the method returned (``check_finite_after``), before the
    state is committed. On the CPU a read-back costs nothing, so the branches stay (they
    skip the rescale pass).
    """
    return x.device.type != "cpu"


def check_finite_after(x: torch.Tensor) -> None:
    """The deferred finiteness check of a sync-free call: one reduction, one read-back."""
    if not bool(torch.isfinite(grid_peak(x)).all()):
        check_finite(x)


def require_finite(reduction: torch.Tensor, grids: torch.Tensor) -> None:
    """Raise ValueError unless ``grids`` is all finite.

    ``reduction`` is a reduction of ``grids`` the method computes anyway (per-token norms,
    per-channel means, ``grid_peak``): NaN and inf propagate through it, so it is all finite
    only if ``grids`` is. Checking it costs two small ops, whereas ``isfinite(grids)`` is a
    full pass over the grids (milliseconds at 16x16x3584). Only when it is not finite does
    the full check run, to say what is wrong. Off the CPU the check is deferred to
    ``Pruner.__call__`` (see ``sync_free``).
    """
    if sync_free(grids) or bool(torch.isfinite(reduction).all()):
        return
    check_finite(grids)
    raise ValueError(
        "grids contain values too large to score in float32 (a sum of squares or of values "
        "overflows); rescale the embeddings"
    )


def require_finite_grids(x: torch.Tensor) -> None:
    """``require_finite(grid_peak(x), x)`` for a method that computes no reduction of its
    own, with the reduction skipped too where the check is deferred (``sync_free``)."""
    if not sync_free(x):
        require_finite(grid_peak(x), x)


def check_finite(grids: torch.Tensor) -> None:
    """Raise ValueError naming the first grid of ``grids [T, ...]`` that holds NaN or inf."""
    bad = ~torch.isfinite(grids).flatten(1).all(dim=1)
    if bool(bad.any()):
        t = int(bad.nonzero()[0, 0])
        raise ValueError(f"grids must be finite: grid {t} of this call contains NaN or inf values")


def all_in_safe_range(scale: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor: every grid's ``scale [T]`` (finite, nonzero) lies in ``SAFE_SCALE``."""
    return ((scale >= SAFE_SCALE[0]) & (scale <= SAFE_SCALE[1])).all()


def in_safe_range(scale: torch.Tensor) -> bool:
    """True if every grid's ``scale [T]`` (finite, nonzero) lies in ``SAFE_SCALE``."""
    return bool(all_in_safe_range(scale))


def rescale_factors(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Branch-free form of "if not in_safe_range(scale): rescale every grid of ``x``": per
    grid ``[T]`` float32, ``grid_scale(x)`` when some grid's ``scale`` is out of range, else
    exactly 1 (``sync_free`` devices)."""
    return torch.where(all_in_safe_range(scale), 1.0, grid_scale(x))


def range_factors(x: torch.Tensor, scale: torch.Tensor, finite: torch.Tensor | None = None) -> torch.Tensor | None:
    """The power-of-two rescale of ``x [T, ...]`` that its per-grid ``scale [T]`` calls for
    (``scale``: the magnitude a method squares, NaN or inf when ``x`` is not finite or its
    squares overflow): per grid factors ``[T]`` float32 to multiply ``x`` by, or None when
    ``x`` is scored as it is.

    Off the CPU (``sync_free``) always the branch-free ``rescale_factors`` (exactly 1 when
    every grid is in range). On the CPU None when every grid is in range (no extra pass),
    else ``grid_scale(x)`` after checking that ``x`` is finite: ``require_finite(finite, x)``
    when the caller has a cheap reduction of ``x`` that cannot overflow, else
    ``check_finite(x)`` (``scale`` itself may be inf for finite ``x``).
    """
    if sync_free(x):
        return rescale_factors(x, scale)
    if in_safe_range(scale):
        return None
    if finite is None:
        check_finite(x)
    else:
        require_finite(finite, x)
    return grid_scale(x)


def grid_peak(x: torch.Tensor) -> torch.Tensor:
    """The largest absolute value of every grid of ``x [T, ...]``: ``[T]`` (NaN or inf if the
    grid is not finite). One pass, no temporary, and it cannot overflow."""
    low, high = torch.aminmax(x.flatten(1), dim=1)
    return torch.maximum(-low, high)


def grid_scale(x: torch.Tensor) -> torch.Tensor:
    """Per grid of ``x [T, ...]`` (finite), the power of two ``2**-e`` that brings its
    largest absolute value into [0.5, 1): ``[T]`` float32 (1 for an all-zero grid).

    Multiplying by a power of two is exact, so the rescaled grid has the same directions
    and, scored with a relative epsilon, gives exactly the masks of the original.
    """
    _, e = torch.frexp(grid_peak(x))
    return torch.ldexp(torch.ones(e.shape, device=x.device), (-e).clamp_max(127))  # 2**148 overflows


def safe_grids(x: torch.Tensor) -> torch.Tensor:
    """``x [T, ...]`` after checking that it is finite, with every grid whose largest value is
    outside ``SAFE_SCALE`` multiplied by a power of two (exact) that brings it into [0.5, 1).

    For scores of magnitudes (norms, sums of squares): they then cannot overflow float32,
    and a stream multiplied by a constant ranks its tokens the same. Grids of ordinary scale
    are returned as they are (no copy)."""
    if in_safe_range(grid_peak(x)):
        return x
    check_finite(x)
    return x * grid_scale(x).view((-1,) + (1,) * (x.dim() - 1))


def unit_tokens(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """L2-normalise every token of ``x [T, ..., D]`` (after checking that ``x`` is finite).

    Scale-free: a token shorter than ``NORM_EPS`` times the longest token of its grid is
    divided by that floor instead (an all-zero token stays zero), and a grid whose longest
    token is outside ``SAFE_SCALE`` (or whose squares overflow) is rescaled by a power of
    two first. ``out``: an optional buffer of ``x``'s shape to write into.
    """
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    peak = norms.flatten(1).amax(dim=1)  # [T]; NaN or inf if x is not finite or overflows
    factors = range_factors(x, peak)  # None on the CPU for grids of ordinary scale
    if factors is not None:
        x = torch.mul(x, factors.view((-1,) + (1,) * (x.dim() - 1)), out=out)
        norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        peak = norms.flatten(1).amax(dim=1)
    floor = (peak * NORM_EPS).clamp_min_(TINY).view((-1,) + (1,) * (x.dim() - 1))
    return torch.div(x, torch.maximum(norms, floor), out=out)


def rowdot(a: torch.Tensor, b: torch.Tensor, work: torch.Tensor | None = None) -> torch.Tensor:
    """``(a * b).sum(-1)``: a batch of dot products over the last axis (``b`` broadcasts to ``a``).

    ``work``: a flat float32 buffer with room for ``a.numel()`` values, used for the product
    instead of allocating one (see ``Pruner._work``).
    """
    if work is None:
        return torch.linalg.vecdot(a, b)
    return torch.mul(a, b, out=work[: a.numel()].view(a.shape)).sum(dim=-1)


def keep_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of ``scores [T, N]``, keep the ``k`` lowest-scored tokens.

    Ties are broken by raster order (the earlier token is kept), so the result does not
    depend on the sorting algorithm. A score of ``-inf`` marks a token the method cannot
    drop: such tokens are always kept, even beyond ``k``.
    """
    T, N = scores.shape
    if k >= N:
        return torch.ones((T, N), dtype=torch.bool, device=scores.device)
    order = torch.sort(scores, dim=-1, stable=True).indices[:, :k]
    keep = torch.zeros((T, N), dtype=torch.bool, device=scores.device)
    keep.scatter_(1, order, True)
    return keep | torch.isneginf(scores)


def exact_keep(scores: torch.Tensor, total: int) -> torch.Tensor:
    """Keep mask of ``scores [T, H, W]`` with exactly ``total`` True over the whole clip.

    ``NEVER_DROP`` (-inf) tokens first, then the lowest scores across all grids, ties by time
    then raster order (a stable sort of the time-major flattening); when ``total`` is below
    the number of ``NEVER_DROP`` tokens, ``total`` of them evenly spaced in that order. See
    the module docstring ("Exact-count mode").
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    total = check_total(total, n)
    keep = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if total == n:
        keep.fill_(True)
        return keep.view(scores.shape)
    forced = torch.isneginf(flat)
    n_forced = int(forced.sum())
    if total >= n_forced:
        keep[torch.sort(flat, stable=True).indices[:total]] = True
    elif total > 0:
        idx = forced.nonzero().squeeze(1)  # increasing: time, then raster order
        pick = torch.arange(total, device=scores.device) * n_forced // total
        keep[idx[pick]] = True
    return keep.view(scores.shape)


def check_total(value: Any, n: int) -> int:
    """An exact token count in ``[0, n]`` (``n`` = tokens of the clip)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"total must be an integer in [0, {n}], got {type(value).__name__} {value!r}")
    if not 0 <= value <= n:
        raise ValueError(f"total must be in [0, {n}] (the clip's T*H*W tokens), got {value!r}")
    return int(value)


def token_budget(n: int, keep_ratio: float | None, tokens_per_grid: int | None) -> int:
    """Tokens kept of an ``n``-token grid: ``min(tokens_per_grid, n)`` when a count is set,
    else ``ratio_budget(keep_ratio, n)``."""
    return ratio_budget(keep_ratio, n) if tokens_per_grid is None else min(tokens_per_grid, n)


def ratio_budget(keep_ratio: float, n: int) -> int:
    """``ceil(keep_ratio * n)``, at least 1.

    The product is rounded to 9 decimals before the ceiling so that the binary
    representation of a decimal ratio never adds a token (in floating point
    ``0.3 * 10 == 3.0000000000000004`` and ``0.05 * 20 == 1.0000000000000002``).
    """
    return max(1, math.ceil(round(keep_ratio * n, 9)))


# ------------------------------------------------------------ parameter checks
def check_keep_ratio(value: Any, name: str = "keep_ratio") -> float:
    """A number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in (0, 1], got {type(value).__name__} {value!r}")
    v = float(value)
    if not 0.0 < v <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return v


def check_threshold(value: Any, name: str) -> float:
    """A finite real number (a cosine-similarity threshold; any value is allowed)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def check_count(value: Any, name: str) -> int:
    """A positive integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_int(value: Any, name: str) -> int:
    """Any integer (e.g. a seed)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


def check_exclusive(keep_ratio: Any, **native: Any) -> None:
    """``keep_ratio`` replaces a method's native rule: giving both is an error."""
    given = [k for k, v in native.items() if v is not None]
    if keep_ratio is not None and given:
        raise ValueError(
            f"give either keep_ratio or {' / '.join(given)}, not both "
            f"(keep_ratio replaces the method's native rule)"
        )
