"""Typed protocols of what a :class:`~streampress.session.StreamingSession` accepts.

Why: the session is duck-typed (any pruner, memory policy or encoder-reuse object with
the right methods works, the built-in ones are just implementations), so these
``typing.Protocol`` classes state the contracts in one place for readers and type
checkers. They change no behaviour: the session still checks its arguments as before.

- :class:`Pruner`: ``keep = pruner(grids)`` and ``reset()``; optionally
  :class:`Undoable` (``snapshot()`` / ``restore()``) for an exact undo of a failed chunk.
- :class:`MemoryPolicy`: ``policy.open(adapter)`` -> the per-stream :class:`StreamMemory`
  the session drives (see :mod:`streampress.memory.base` for the meaning of each call).
- :class:`EncoderReuse`: ``new_state()`` -> an :class:`EncoderState` per stream, and
  ``encode(tower, pixel_values, grid_thw, state, **kw)``, which the model adapters call
  (STC-Cacher, :mod:`streampress.cacher`).

This module imports only type definitions (and those only for type checkers), so any
module may import it without an import circle.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from .memory.base import Block, QuestionInput
    from .models.base import ModelAdapter

__all__ = ["Pruner", "Undoable", "MemoryPolicy", "StreamMemory", "EncoderReuse", "EncoderState"]


@runtime_checkable
class Undoable(Protocol):
    """State that can be saved and put back (pruners, encoder states): the session takes a
    ``snapshot()`` before a chunk and ``restore()`` s it when the chunk fails."""

    def snapshot(self) -> Any: ...

    def restore(self, snapshot: Any) -> None: ...


@runtime_checkable
class Pruner(Protocol):
    """One stream's pruner: grids ``[T, H, W, D]`` -> bool keep mask ``[T, H, W]``;
    ``reset()`` starts a new stream. Without :class:`Undoable` the session saves and
    restores the pruner's attributes instead."""

    def __call__(self, grids: torch.Tensor) -> torch.Tensor: ...

    def reset(self) -> None: ...


class StreamMemory(Protocol):
    """The per-stream KV memory a policy opens (``streampress.memory.MemoryStore`` and its
    subclasses): the cache the session appends to and the item blocks it holds."""

    cache: Any

    def length(self) -> int: ...

    def truncate(self, length: int) -> None: ...

    def mark(self) -> Any: ...

    def rollback(self, mark: Any) -> None: ...

    def add_blocks(self, blocks: Sequence[Block]) -> None: ...

    def after_add(self, now: float) -> None: ...

    def answering(self, question: QuestionInput | None = None) -> AbstractContextManager[Any]: ...

    def stats(self) -> dict: ...


@runtime_checkable
class MemoryPolicy(Protocol):
    """Configuration of a memory (no stream state): ``open(adapter)`` once per stream."""

    def open(self, adapter: ModelAdapter) -> StreamMemory: ...


@runtime_checkable
class EncoderState(Undoable, Protocol):
    """What one stream's encoder reuse remembers; ``reset()`` starts a new stream."""

    def reset(self) -> None: ...


@runtime_checkable
class EncoderReuse(Protocol):
    """Vision-encoder reuse across a stream's items (``streampress.create_cacher()``)."""

    def new_state(self) -> EncoderState: ...

    def encode(self, visual_module: Any, pixel_values: torch.Tensor, grid_thw: torch.Tensor | None = None,
               state: EncoderState | None = None, **kwargs: Any) -> Any: ...
