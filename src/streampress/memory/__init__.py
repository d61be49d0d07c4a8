"""KV memory policies of a streaming session: what stays in the cache as a stream grows.

One module per concern, importing only downwards (no circles):

- :mod:`.base`: cache surgery helpers, :class:`Block`, :class:`QuestionInput`, the store
  that keeps everything (:class:`MemoryStore`, :class:`FullMemory`) and
  :func:`resolve_memory`; what the session and every policy build on.
- :mod:`.window`: :class:`SlidingWindow` (evicts items older than a time window).
- :mod:`.retrieval`: :class:`RetrievalMemory` (ReKV-style: offloads old items to CPU
  memory, each question fetches its most relevant blocks back).
- :mod:`.budget`: :class:`BudgetMemory` (token-level, per-layer / per-KV-head eviction
  within a fixed budget: a slot table per layer and head, gathered with the keys and
  values), with its methods in :mod:`.infinipot` (InfiniPot-V) and :mod:`.hermes` (HERMES).

See :mod:`.base` for the store protocol the session drives and
:mod:`streampress.protocols` for its typed form.
"""

from __future__ import annotations

from .base import (
    Block,
    FullMemory,
    MemoryStore,
    QuestionInput,
    cache_length,
    cache_nbytes,
    cache_select,
    cache_truncate,
    resolve_memory,
)
from .budget import BudgetMemory, BudgetStore, SlotTable
from .retrieval import OffloadedBlock, RetrievalMemory, RetrievalStore
from .window import SlidingWindow

__all__ = ["Block", "QuestionInput", "MemoryStore", "FullMemory", "SlidingWindow", "RetrievalMemory",
           "RetrievalStore", "OffloadedBlock",
           "BudgetMemory", "BudgetStore", "SlotTable", "resolve_memory", "cache_length", "cache_truncate",
           "cache_select", "cache_nbytes"]
