"""Visual-token pruners: one method per module, one pruner object per stream.

``create_pruner(name, **params)`` and ``list_pruners()`` come from :mod:`.registry`, whose
metadata imports without torch; the classes are imported lazily on first use.

Usage::

    pruner = streampress.create_pruner("streaming_assistant", tau_t=0.2, tau_s=0.2)
    keep = pruner(grids)          # grids [T, H, W, D] float -> keep [T, H, W] bool
    kept_per_grid = keep.sum(dim=(1, 2))
    pruner.reset()                # next stream
"""

from __future__ import annotations

import importlib

_LAZY = {
    "create_pruner": "registry",
    "list_pruners": "registry",
    "describe_methods": "registry",
    "METHODS": "registry",
    "Pruner": "base",
    "ScorePruner": "base",
    "DTDPruner": "dtd",
    "EVSPruner": "dtd",
    "MSSAVTPruner": "mssavt",
    "StreamingAssistantPruner": "streaming_assistant",
    "STCPruner": "stc",
    "VidCom2Pruner": "vidcom2",
    "DivPrunePruner": "divprune",
    "RandomPruner": "random_pruner",
    "UniformPruner": "uniform",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
