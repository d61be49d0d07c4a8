"""Pruning methods by name: ``create_pruner(name, **params)``, ``list_pruners()``.

The metadata (``METHODS``: names, parameters with defaults, what each method does, the
paper it comes from) is plain data and importing this module does not import torch, so
``streampress list`` can print it instantly; a method's module (and torch) is imported
only when a pruner is created.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Param:
    """One parameter of a method: its name, default (None: not used by default) and meaning."""

    name: str
    default: Any
    help: str


@dataclass(frozen=True)
class MethodInfo:
    """A registered pruning method."""

    name: str
    module: str  # module under streampress.pruners
    cls: str  # class name in that module
    params: tuple[Param, ...]
    summary: str
    paper: str

    @property
    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}


_KEEP_RATIO_ALT = "instead of the native rule: keep ceil(keep_ratio*H*W) tokens per grid"
#: keep_ratio as the native budget of the baselines and DivPrune.
_KEEP_RATIO = Param("keep_ratio", 0.25, "tokens kept per grid: ceil(keep_ratio*H*W)")
#: The token budget of STC and VidCom2.
_TOKENS_PER_GRID = (
    Param("tokens_per_grid", 64, "tokens kept per grid"),
    Param("keep_ratio", None, "instead of tokens_per_grid: keep ceil(keep_ratio*H*W) tokens per grid"),
)

METHODS: dict[str, MethodInfo] = {
    m.name: m
    for m in (
        MethodInfo(
            "dtd", "dtd", "DTDPruner",
            (Param("tau", 0.5,
                   "drop a token whose cosine similarity to the same position of the previous grid is > tau"),
             Param("keep_ratio", None, _KEEP_RATIO_ALT + " (first grid kept whole)")),
            "Temporal differential token drop: drops tokens that barely changed since the previous grid; "
            "the first grid of a stream is kept whole.",
            "TimeChat-Online (Yao et al., 2025, arXiv:2504.17343)",
        ),
        MethodInfo(
            "mssavt", "mssavt", "MSSAVTPruner",
            (Param("tau", 0.2, "drop a checkerboard token whose max cosine similarity to a 4-neighbour is > tau"),
             Param("keep_ratio", None, _KEEP_RATIO_ALT + " (at most the checkerboard half can go)")),
            "Spatial redundancy: max cosine similarity to the 4 adjacent tokens; only one checkerboard colour "
            "may be dropped, so no two adjacent tokens are both dropped.",
            "StreamingAssistant (Jin et al., 2025, arXiv:2512.12560)",
        ),
        MethodInfo(
            "streaming_assistant", "streaming_assistant", "StreamingAssistantPruner",
            (Param("tau_t", 0.2, "temporal threshold (DTD)"),
             Param("tau_s", 0.2, "spatial threshold (MSSAVT, checkerboard only)"),
             Param("keep_ratio", None, _KEEP_RATIO_ALT + "; redundancy = max(temporal, spatial)")),
            "DTD united with masked MSSAVT, both on the full grid; the paper's operating point drops "
            "about 92-95% of video tokens.",
            "StreamingAssistant (Jin et al., 2025, arXiv:2512.12560)",
        ),
        MethodInfo(
            "stc", "stc", "STCPruner",
            _TOKENS_PER_GRID
            + (Param("window", None, "memory holds the last `window` grid means (None: the whole stream)"),),
            "STC-Pruner: keeps the tokens least similar (multi-bandwidth Gaussian kernel on the D/2 "
            "lowest-variance channels) to their frame's mean and to the stream's memory of grid means.",
            "STC (Wang et al., 2025, arXiv:2512.00891)",
        ),
        MethodInfo(
            "evs", "dtd", "EVSPruner",
            (Param("keep_ratio", 0.25, "tokens kept per grid after the first: ceil(keep_ratio*H*W)"),),
            "Per-grid EVS: drops the tokens most similar to the previous grid, down to the budget "
            "(DTD's keep_ratio mode); the first grid is kept whole.",
            "EVS (Bagrov et al., 2025, arXiv:2510.14624)",
        ),
        MethodInfo(
            "vidcom2", "vidcom2", "VidCom2Pruner",
            _TOKENS_PER_GRID,
            "Frame distinctiveness: STC's kernel score against the frame's own mean only (no memory).",
            "VidCom2 (Liu et al., EMNLP 2025, arXiv:2505.14454)",
        ),
        MethodInfo(
            "divprune", "divprune", "DivPrunePruner",
            (_KEEP_RATIO,
             Param("tokens_per_grid", None, "instead of keep_ratio: tokens kept per grid")),
            "Greedy max-min diversity on cosine distance, per grid, starting from the token whose "
            "nearest other token is farthest.",
            "DivPrune (Alvar et al., CVPR 2025, arXiv:2503.02175)",
        ),
        MethodInfo(
            "random", "random_pruner", "RandomPruner",
            (_KEEP_RATIO,
             Param("seed", 0, "seed of the stream's draws (grid i uses a seed derived from (seed, i))")),
            "Uniformly random subset of exact size per grid (baseline).",
            "baseline",
        ),
        MethodInfo(
            "uniform", "uniform", "UniformPruner",
            (_KEEP_RATIO,),
            "Regular spatial sub-lattice (ordered-dither order; 1/4 = every second row and column), "
            "content-independent (baseline).",
            "baseline",
        ),
    )
}

#: Other spellings accepted by create_pruner (looked up after lower-casing and '-' -> '_').
ALIASES: dict[str, str] = {
    "streamingassistant": "streaming_assistant",
    "stc_pruner": "stc",
}


def list_pruners() -> list[str]:
    """Names of the registered pruning methods."""
    return list(METHODS)


def describe_methods() -> list[dict[str, Any]]:
    """Metadata of every method (no torch import): name, params (name -> default),
    param_help (name -> meaning), summary, paper."""
    return [
        {
            "name": m.name,
            "params": m.defaults,
            "param_help": {p.name: p.help for p in m.params},
            "summary": m.summary,
            "paper": m.paper,
        }
        for m in METHODS.values()
    ]


def resolve_name(name: str) -> MethodInfo:
    """The method registered under ``name`` (or one of its aliases)."""
    if not isinstance(name, str):
        raise TypeError(f"pruner name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in METHODS:
        raise ValueError(f"unknown pruning method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[key]


def create_pruner(name: str, **params: Any):
    """A new pruner (one per stream) for the method ``name`` with the given parameters.

    Every method accepts the parameters listed in ``METHODS[name].params``; an unknown
    parameter raises TypeError naming the accepted ones, a bad value ValueError/TypeError.
    """
    info = resolve_name(name)
    accepted = [p.name for p in info.params]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise TypeError(
            f"pruner {info.name!r} got unknown parameter(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted)}"
        )
    cls = getattr(importlib.import_module(f"streampress.pruners.{info.module}"), info.cls)
    return cls(**params)
