"""Formatting helpers shared by the command line, the bench report and the server: byte counts
for people, JSON for numpy/torch values."""

from __future__ import annotations

from typing import Any

__all__ = ["format_bytes", "json_default"]


def format_bytes(n: float | None) -> str:
    """``1536`` -> ``"1.5 KiB"``; None -> ``"-"``."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def json_default(value: Any):
    """``json.dumps(default=...)``: numpy / torch values (scalars and arrays) as lists or
    numbers, anything else as its text."""
    return value.tolist() if hasattr(value, "tolist") else str(value)
