"""The host machine's description, standard library only (cheap to import from any script)."""

from __future__ import annotations

import platform

__all__ = ["cpu_name"]


def cpu_name() -> str:
    """The CPU model: Linux's ``model name`` in ``/proc/cpuinfo`` (``platform.processor()`` is
    often empty there), else ``platform.processor()`` or ``platform.machine()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
