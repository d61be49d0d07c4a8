"""Text forms of the settings that the command line, the evaluation harness and the server share.

A KV-memory setting is written ``full``, ``window:SECONDS[,reindex=lazy|eager|off]``,
``retrieval:window=SECONDS,top_k=K[,block_items=N]``, ``infinipot:budget=N`` (also
``infinipot_v:budget=N``) or ``hermes:budget=N`` (token budgets, :class:`streampress.BudgetMemory`;
optional ``,reindex=lazy|eager|off``; for InfiniPot-V ``,pooling=off|code``, for HERMES
``,chunk_frames=F``) and read into a small spec dict
(None for ``full``) that is stored in run configurations and turned into a policy object
only where a session is built. This module imports no torch, so parsing stays instant.
"""

from __future__ import annotations

import math

__all__ = ["MEMORY_FORMS", "parse_memory", "memory_text", "memory_policy"]

MEMORY_FORMS = ("full, window:SECONDS[,reindex=lazy|eager|off], retrieval:window=SECONDS,top_k=K[,block_items=N], "
                "infinipot:budget=N[,reindex=lazy|eager|off][,pooling=off|code] "
                "or hermes:budget=N[,reindex=lazy|eager|off][,chunk_frames=F]")
_CHOICES = {"reindex": ("lazy", "eager", "off"), "pooling": ("off", "code")}
_BUDGET_METHODS = {"infinipot": "infinipot_v", "infinipot_v": "infinipot_v", "hermes": "hermes"}


def _number(text: str, kind=float):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def parse_memory(text: str) -> dict | None:
    """``full`` -> None; ``window:SECONDS`` -> ``{"name": "window", "seconds": S}`` (plus
    ``"reindex"`` when given);
    ``retrieval:window=S,top_k=K[,block_items=N]`` -> ``{"name": "retrieval",
    "window_seconds": S, "top_k": K, "block_items": N}``; ``infinipot:budget=N`` /
    ``hermes:budget=N`` -> ``{"name": "budget", "method": "infinipot_v" | "hermes",
    "budget": N}`` (plus ``"reindex"`` / ``"pooling"`` when given). ValueError (one line)
    otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"expected {MEMORY_FORMS}, got {text!r}")
    kind, colon, rest = text.strip().partition(":")

    def bad(why: str):
        raise ValueError(f"{why} in {text!r}; expected {MEMORY_FORMS}")

    if kind == "full" and not colon:
        return None
    if kind == "window":
        head, _, tail = rest.partition(",")
        seconds = _number(head)
        if not (seconds and seconds > 0):
            bad("the window must be seconds > 0")
        spec = {"name": "window", "seconds": seconds}
        if tail:
            fields = dict(part.partition("=")[::2] for part in tail.split(",") if part)
            unknown = sorted(set(fields) - {"reindex"})
            if unknown:
                bad(f"unknown key {unknown[0]!r}")
            if fields["reindex"] not in _CHOICES["reindex"]:
                bad(f"reindex must be one of {'|'.join(_CHOICES['reindex'])}")
            spec["reindex"] = fields["reindex"]
        return spec
    if kind == "retrieval":
        fields = dict(part.partition("=")[::2] for part in rest.split(",") if part)
        unknown = sorted(set(fields) - {"window", "top_k", "block_items"})
        if unknown or not {"window", "top_k"} <= set(fields):
            bad(f"unknown key {unknown[0]!r}" if unknown else "window= and top_k= are required")
        seconds, top_k = _number(fields["window"]), _number(fields["top_k"], int)
        block_items = _number(fields.get("block_items", "1"), int)
        if not (seconds and seconds > 0):
            bad("window must be seconds > 0")
        if top_k is None or top_k < 0:
            bad("top_k must be an integer >= 0")
        if block_items is None or block_items < 1:
            bad("block_items must be an integer >= 1")
        return {"name": "retrieval", "window_seconds": seconds, "top_k": top_k, "block_items": block_items}
    if kind in _BUDGET_METHODS:
        fields = dict(part.partition("=")[::2] for part in rest.split(",") if part)
        method = _BUDGET_METHODS[kind]
        allowed = {"budget", "reindex"} | ({"pooling"} if method == "infinipot_v" else {"chunk_frames"})
        unknown = sorted(set(fields) - allowed)
        if unknown or "budget" not in fields:
            bad(f"unknown key {unknown[0]!r}" if unknown else "budget= is required")
        budget = _number(fields["budget"], int)
        if budget is None or budget < 2:
            bad("budget must be an integer >= 2 (visual tokens per layer)")
        spec = {"name": "budget", "method": method, "budget": budget}
        if "chunk_frames" in fields:
            chunk = _number(fields["chunk_frames"], int)
            if chunk is None or chunk < 1:
                bad("chunk_frames must be an integer >= 1 (frames per budget check)")
            spec["chunk_frames"] = chunk
        for key in ("reindex", "pooling"):
            if key in fields:
                if fields[key] not in _CHOICES[key]:
                    bad(f"{key} must be one of {'|'.join(_CHOICES[key])}")
                spec[key] = fields[key]
        return spec
    return bad("unknown memory policy")


def memory_text(spec: dict | None) -> str:
    """The text form of a spec (``full`` for None)."""
    if not spec:
        return "full"
    if spec["name"] == "window":
        return f"window:{spec['seconds']:g}" + (f",reindex={spec['reindex']}" if "reindex" in spec else "")
    if spec["name"] == "budget":
        extra = "".join(f",{key}={spec[key]}" for key in ("reindex", "pooling", "chunk_frames") if key in spec)
        return f"{'infinipot' if spec['method'] == 'infinipot_v' else 'hermes'}:budget={spec['budget']}{extra}"
    return (f"retrieval:window={spec['window_seconds']:g},top_k={spec['top_k']},"
            f"block_items={spec['block_items']}")


def memory_policy(spec: dict | None):
    """The session's ``memory`` argument for a spec: ``"full"``, a SlidingWindow, a
    RetrievalMemory or a BudgetMemory."""
    if not spec:
        return "full"
    from .memory import BudgetMemory, RetrievalMemory, SlidingWindow

    if spec["name"] == "budget":
        return BudgetMemory(spec["method"], budget=spec["budget"],
                            **{key: spec[key] for key in ("reindex", "pooling", "chunk_frames") if key in spec})

    params = {k: v for k, v in spec.items() if k != "name"}
    return {"window": SlidingWindow, "retrieval": RetrievalMemory}[spec["name"]](**params)
