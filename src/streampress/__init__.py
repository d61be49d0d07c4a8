"""streampress: fast streaming video LLMs.

Public API (imported lazily so that ``import streampress`` and ``streampress list`` stay fast):

- :func:`create_pruner`, :func:`list_pruners`: visual-token pruners (one object per stream).
- :func:`create_cacher`: STC-Cacher, vision-encoder reuse across similar frames.
- :func:`load_model`: Hugging Face checkpoints or built-in ``random:`` architectures.
- :class:`StreamingSession`: frames in, answers out, with a memory policy.
- :class:`FullMemory`, :class:`SlidingWindow`, :class:`RetrievalMemory`, :class:`BudgetMemory`:
  memory policies (``BudgetMemory``: InfiniPot-V / HERMES token-level KV budgets).
- :mod:`streampress.video`: video sources (files, image folders, cameras and streams).
- :mod:`streampress.protocols`: the typed contracts of pruners, memory policies and encoder reuse.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "create_pruner": "streampress.pruners.registry",
    "list_pruners": "streampress.pruners.registry",
    "create_cacher": "streampress.cacher",
    "load_model": "streampress.models",
    "StreamingSession": "streampress.session",
    "FullMemory": "streampress.memory",
    "SlidingWindow": "streampress.memory",
    "RetrievalMemory": "streampress.memory",
    "BudgetMemory": "streampress.memory",
}

__all__ = sorted(_LAZY) + ["video", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in ("video", "pruners", "models", "cacher", "bench", "eval", "session", "memory", "protocols"):
        return importlib.import_module(f"streampress.{name}")
    raise AttributeError(f"module 'streampress' has no attribute {name!r}")


def __dir__():
    return __all__
