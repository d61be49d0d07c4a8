"""STC-Cacher: reuse of vision-encoder work across similar items of a stream.

The cacher never re-implements an encoder. It swaps the ``forward`` of every transformer
block of the tower for a cached one while a call is running, so the model's own code does
everything around the blocks and returns exactly its own output type (Qwen2.5-VL
``BaseModelOutputWithPooling``, Qwen3-VL with DeepStack features, SigLIP with
``hidden_states`` on request). Inside a call, block ``l`` runs the reference items in full
first and then all dependent items in one selective batch (ALGORITHMS.md section 5).

Which tower a module is and how its blocks are called is model knowledge: each model
family provides an :class:`~.core.EncoderGlue` next to its adapter and registers it under
its towers' class names (``register_family(..., vision_glue=...)`` in
:mod:`streampress.models`). :func:`find_vision_module` looks the glue up by class, so
``attach`` and ``encode`` accept an adapter's tower, a whole Hugging Face model or a bare
tower, and this package names no model type. (The glue imports :mod:`.core`; this module
imports only the registry, which names the glue by string: no import circle.)
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from numbers import Real

import torch
from torch import nn
from typing_extensions import Self

from ..models import vision_glue_for, vision_tower_names
from .core import BlockRef, EncoderGlue, dense_block, key_similarity, project_keys, selective_block
from .state import CacherState, CacherStats

_MARK = "_streampress_stc_installation"
_MISSING = object()


def find_vision_module(model: nn.Module) -> tuple[nn.Module, EncoderGlue]:
    """``(tower, glue)`` for a vision tower or any model that contains one (first found, in
    ``model.modules()`` order): a module whose class a model family registered glue for."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"expected a torch.nn.Module (a vision tower or a model holding one), got {type(model).__name__}"
        )
    for module in model.modules():
        glue = vision_glue_for(module)
        if glue is not None:
            return module, glue(module)
    raise ValueError(f"no supported vision tower ({', '.join(vision_tower_names())}) found in "
                     f"{type(model).__name__}")


def _rows(t, index: torch.Tensor | None):
    """Items ``index`` of a tensor or of a tuple of tensors (all of them when ``index`` is None)."""
    if t is None or index is None:
        return t
    if isinstance(t, tuple):
        return tuple(p.index_select(0, index) for p in t)
    return t.index_select(0, index)


class _CallContext:
    """One call of the tower: the plan (which items are references) and pending results."""

    def __init__(self, cacher: StcCacher, inst: _Installation, state: CacherState, items: int, layout: tuple):
        self.cacher, self.inst, self.state, self.items, self.layout = cacher, inst, state, items, layout
        self.next_block = 0
        self.pending: list[BlockRef | None] = [None] * len(inst.blocks)
        self.stats = CacherStats(items=items)
        self.memo: dict = {}  # per-call facts the glue derives once (attention patterns)

    # ---- plan -----------------------------------------------------------------------
    def _plan(self, x: torch.Tensor, parts, rope) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Decide per item: reference (full) or dependent of the latest reference.

        Returns the first block's ``(LN1(x), keys)`` of all items when the refresh test
        computed them; the block then reuses them for references and dependents alike, so
        LN1 and the key projection run once per call."""
        n_items, t, dim = x.shape
        self.signature = (self.layout, t, dim, x.dtype, str(x.device), len(self.inst.blocks))
        self.stored = self.state.reference_for(self.inst.module, self.signature)
        since = self.state.items_since_reference if self.stored is not None else 0
        interval, thr = self.cacher.interval, self.cacher.refresh_threshold
        u0 = keys0 = None
        if thr is not None and (self.stored is not None or n_items > 1):
            u0 = parts.norm1(x)
            keys0 = project_keys(parts, u0, rope)
        refs: list[int] = []
        current = 0 if self.stored is not None else None  # slot: 0 = stored, j = j-th reference of this call
        deps, slots = [], []
        for j in range(n_items):
            is_ref = current is None or since % interval == 0
            if not is_ref and thr is not None:
                k_ref = self.stored[0].k if current == 0 else keys0[refs[current - 1]].unsqueeze(0)
                sim = float(key_similarity(keys0[j:j + 1], k_ref).mean())
                self.stats.first_block_similarity.append(sim)
                if sim < thr:
                    is_ref = True
                    self.stats.refreshes += 1
            if is_ref:
                refs.append(j)
                current, since = len(refs), 0
            else:
                deps.append(j)
                slots.append(current)
            since += 1
        self.since_after = since
        self.refs, self.deps, self.slots = refs, deps, slots
        self.stats.references = len(refs)
        self.count = max(1, math.floor(self.cacher.rho * t))
        # Index tensors, made once per call: items of each kind (only needed when a call
        # mixes both) and, when dependents use different references, each one's row in the
        # bank [stored (if used), this call's references].
        dev = x.device
        mixed = bool(refs and deps)
        self.ref_index = torch.tensor(refs, device=dev) if mixed else None
        self.dep_index = torch.tensor(deps, device=dev) if mixed else None
        self.bank_uses_stored = 0 in slots
        self.bank_index = None
        if any(s != slots[0] for s in slots):
            shift = 0 if self.bank_uses_stored else 1
            self.bank_index = torch.tensor([s - shift for s in slots], device=dev)
        return None if keys0 is None else (u0, keys0)

    def _dependent_refs(self, index: int, new: BlockRef | None) -> BlockRef:
        """Reference data for every dependent item at block ``index`` (leading dim 1 or B)."""
        stored = self.stored[index] if self.stored is not None else None
        if self.bank_index is None:  # one reference for all
            first = self.slots[0]
            return stored if first == 0 else new.take(first - 1)
        bank = BlockRef.cat(([stored] if self.bank_uses_stored else []) + [new])
        return bank.take(self.bank_index)

    @staticmethod
    def _keep(new: BlockRef) -> BlockRef:
        """The call's last reference as compact tensors for the state: a tensor that is
        exactly that item is kept as is, a view into something larger (the values inside
        the fused projection's output, one item of several) is copied so the rest is freed."""
        def compact(t: torch.Tensor) -> torch.Tensor:
            if t.is_contiguous() and t.untyped_storage().nbytes() == t.nbytes:
                return t
            return t.clone(memory_format=torch.contiguous_format)

        last = new.take(new.k.shape[0] - 1)
        return BlockRef(compact(last.k), compact(last.v), compact(last.a), compact(last.m))

    # ---- one block ------------------------------------------------------------------
    def run_block(self, index: int, args: tuple, kwargs: dict) -> torch.Tensor:
        if index != self.next_block:
            raise RuntimeError(f"vision block {index} ran out of order (expected block {self.next_block})")
        glue = self.inst.glue
        x, rope, pattern = glue.unpack(args, kwargs, self.items, self.state, self.memo)
        # One copy at most, at the first block (SigLIP's embeddings are a transposed view):
        # every path below returns a contiguous output, and the selective path's in-place
        # row scatters need contiguous storage.
        x = x.contiguous()
        parts = self.inst.parts[index]
        prepared = self._plan(x, parts, rope) if index == 0 else None
        n_items, t, _ = x.shape
        new = None
        if self.refs:  # ref_index / dep_index are None unless the call mixes both kinds
            y_ref, new = dense_block(parts, _rows(x, self.ref_index), rope, pattern,
                                     prepared=_rows(prepared, self.ref_index))
            self.pending[index] = self._keep(new)
            if not self.deps:
                y = y_ref
        if self.deps:
            y_dep, _ = selective_block(parts, _rows(x, self.dep_index), self._dependent_refs(index, new), rope,
                                       pattern, self.count, prepared=_rows(prepared, self.dep_index),
                                       buffer=self.state.buffer)
            if not self.refs:
                y = y_dep
            else:
                y = torch.empty_like(x)
                y.index_copy_(0, self.ref_index, y_ref)
                y.index_copy_(0, self.dep_index, y_dep)
        if self.refs:  # this call replaces the reference: its old block is no longer needed
            self.state._release_block(index)
        self.stats.token_blocks += n_items * t
        self.stats.recomputed_token_blocks += len(self.refs) * t + len(self.deps) * min(self.count, t)
        self.next_block += 1
        return glue.pack(y)

    def commit(self) -> None:
        n = len(self.inst.blocks)
        if self.next_block == 0:
            return
        if self.next_block != n:
            self.state._abort()
            raise RuntimeError(f"the vision tower ran {self.next_block} of its {n} blocks; "
                               "cacher state not updated (a reference it had begun to replace is dropped)")
        blocks = list(self.pending) if self.refs else None
        self.state._commit(self.inst.module, self.signature, blocks, self.since_after, self.stats)


class _Installation:
    """Cached block forwards installed on one vision tower (restored exactly by ``uninstall``)."""

    def __init__(self, module: nn.Module, glue) -> None:
        self.module, self.glue = module, glue
        self.blocks = glue.blocks()
        self.parts = [glue.parts(b) for b in self.blocks]
        self.ctx: _CallContext | None = None
        self._saved: list[tuple[nn.Module, object]] = []

    def _hook(self, index: int, original):
        def forward(*args, **kwargs):
            ctx = self.ctx
            if ctx is None:  # the block was called outside a cached tower call
                return original(*args, **kwargs)
            with torch.no_grad():
                return ctx.run_block(index, args, kwargs)
        return forward

    def install(self) -> None:
        if getattr(self.module, _MARK, None) is not None:
            raise RuntimeError("a cacher is already attached to this vision tower")
        for i, blk in enumerate(self.blocks):
            self._saved.append((blk, blk.__dict__.get("forward", _MISSING)))
            blk.forward = self._hook(i, blk.forward)
        object.__setattr__(self.module, _MARK, self)

    def uninstall(self) -> None:
        for blk, prev in reversed(self._saved):
            if prev is _MISSING:
                del blk.forward
            else:
                blk.forward = prev
        self._saved.clear()
        if self.module.__dict__.get(_MARK) is self:
            object.__delattr__(self.module, _MARK)

    @contextmanager
    def call(self, cacher: StcCacher, state: CacherState, items: int, layout: tuple):
        if self.ctx is not None:
            raise RuntimeError("nested cached call on the same vision tower")
        ctx = _CallContext(cacher, self, state, items, layout)
        self.ctx = ctx
        try:
            yield ctx
        except BaseException:
            state._abort()
            raise
        finally:
            self.ctx = None
        ctx.commit()  # only after the tower returned normally


class AttachHandle:
    """Routes a model's own vision tower through the cacher until :meth:`detach`.

    Use as a context manager (``with cacher.attach(model) as handle``) or call
    ``detach()`` explicitly. ``handle.state`` is the stream's :class:`CacherState`.
    """

    def __init__(self, cacher: StcCacher, model: nn.Module, state: CacherState) -> None:
        self.cacher, self.state = cacher, state
        self.module, glue = find_vision_module(model)
        self._inst = _Installation(self.module, glue)
        self._inst.install()
        self._prev_forward = self.module.__dict__.get("forward", _MISSING)
        original, inst = self.module.forward, self._inst

        def forward(*args, **kwargs):
            if inst.ctx is not None:  # already inside cacher.encode(...)
                return original(*args, **kwargs)
            items, layout = glue.call_layout(args, kwargs)
            with torch.no_grad(), inst.call(cacher, self.state, items, layout):
                return original(*args, **kwargs)

        self.module.forward = forward
        self.attached = True

    def detach(self) -> None:
        """Restore the tower's original forwards (idempotent)."""
        if not self.attached:
            return
        if self._prev_forward is _MISSING:
            del self.module.forward
        else:
            self.module.forward = self._prev_forward
        self._inst.uninstall()
        self.attached = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def _check_params(rho, interval, refresh_threshold) -> None:
    if isinstance(rho, bool) or not isinstance(rho, Real) or not (0 < float(rho) <= 1):
        raise ValueError(f"rho must be a number in (0, 1] (share of tokens recomputed per block), got {rho!r}")
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"interval must be an int >= 1 (every N-th item is a reference), got {interval!r}")
    if refresh_threshold is not None and (isinstance(refresh_threshold, bool) or not isinstance(refresh_threshold, Real)
                                          or not (-1 <= float(refresh_threshold) <= 1)):
        raise ValueError(f"refresh_threshold must be None or a cosine similarity in [-1, 1], got {refresh_threshold!r}")


class StcCacher:
    """STC-Cacher with update ratio ``rho``, reference interval ``interval`` (N) and an
    optional scene-cut ``refresh_threshold`` on the first block's mean key similarity.

    The cacher holds only parameters; everything a stream remembers is in the
    :class:`CacherState` from :meth:`new_state`, so one cacher serves many streams.
    """

    name = "stc"

    def __init__(self, rho: float = 0.25, interval: int = 2, refresh_threshold: float | None = None) -> None:
        _check_params(rho, interval, refresh_threshold)
        self.rho = float(rho)
        self.interval = interval
        self.refresh_threshold = None if refresh_threshold is None else float(refresh_threshold)

    @property
    def params(self) -> dict:
        return {"rho": self.rho, "interval": self.interval, "refresh_threshold": self.refresh_threshold}

    def __repr__(self) -> str:
        return f"StcCacher(rho={self.rho}, interval={self.interval}, refresh_threshold={self.refresh_threshold})"

    def new_state(self) -> CacherState:
        """A fresh per-stream state."""
        return CacherState()

    def encode(self, visual_module: nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor | None = None,
               state: CacherState | None = None, **kwargs):
        """Run the vision tower with STC reuse; returns exactly what the tower returns.

        Qwen2.5-VL / Qwen3-VL: ``visual(pixel_values, grid_thw=grid_thw, **kwargs)`` (items
        are temporal patches, in stream order). SigLIP: ``vision_tower(pixel_values, **kwargs)``
        with ``grid_thw=None`` (items are frames); see :meth:`encode_siglip`.
        """
        if not isinstance(state, CacherState):
            raise TypeError(f"state must be a CacherState from cacher.new_state(), got {type(state).__name__}")
        module, glue = find_vision_module(visual_module)
        kwargs = glue.call_kwargs(grid_thw, kwargs)
        items, layout = glue.call_layout((pixel_values,), kwargs)
        inst = getattr(module, _MARK, None)
        temporary = inst is None
        if temporary:
            inst = _Installation(module, glue)
            inst.install()
        try:
            with torch.no_grad(), inst.call(self, state, items, layout):
                return module(pixel_values, **kwargs)
        finally:
            if temporary:
                inst.uninstall()

    def encode_siglip(self, vision_tower: nn.Module, pixel_values: torch.Tensor, state: CacherState, **kwargs):
        """SigLIP (LLaVA-OneVision): ``vision_tower(pixel_values, **kwargs)`` with reuse across
        frames. LLaVA-OneVision reads ``hidden_states[config.vision_feature_layer]``:
        ``output_hidden_states=True`` gives them but holds every layer's output until the tower
        returns; ``streampress.models.llava_onevision.feature_capture`` keeps only that layer's."""
        return self.encode(vision_tower, pixel_values, None, state, **kwargs)

    def attach(self, model: nn.Module, state: CacherState | None = None) -> AttachHandle:
        """Route ``model``'s own vision tower through the cacher (one stream: ``state``, or a
        new one at ``handle.state``) until ``handle.detach()`` / the end of a ``with`` block."""
        if state is not None and not isinstance(state, CacherState):
            raise TypeError(f"state must be a CacherState or None, got {type(state).__name__}")
        return AttachHandle(self, model, state if state is not None else self.new_state())
