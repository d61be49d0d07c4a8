"""Progress on stderr: a rich progress bar on a terminal, one line per stage elsewhere.

Both objects answer the part of :class:`rich.progress.Progress` that streampress uses
(``add_task``, ``update``, ``advance``, ``remove_task``, use as a context manager), so
:func:`streampress.bench.runner.run_bench` and the commands take either. Off a terminal
(a log file, CI) a stage prints one line when it starts, ``streampress bench: building the
model``; counts and rates stay on the terminal bar, stdout stays clean for answers and JSON.
"""

from __future__ import annotations

import sys
from typing import TextIO

__all__ = ["LineProgress", "progress"]


class LineProgress:
    """One line per stage: a task without a total prints when it is added or renamed, a
    counted task when its first step completes."""

    def __init__(self, prefix: str, stream: TextIO | None = None):
        self.prefix = prefix
        self.stream = stream
        self.tasks: dict[int, dict] = {}

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def _say(self, text: str) -> None:
        stream = self.stream or sys.stderr  # looked up late: tests and callers may redirect it
        print(f"{self.prefix}: {' '.join(text.split())}", file=stream, flush=True)

    def add_task(self, description: str, total: float | None = None, **_) -> int:
        task = len(self.tasks)
        self.tasks[task] = {"description": description, "total": total, "started": total is None}
        if total is None:
            self._say(description)
        return task

    def update(self, task: int, *, description: str | None = None, advance: float | None = None,
               **_) -> None:
        state = self.tasks[task]
        if description is not None and description != state["description"]:
            state["description"] = description
            if state["total"] is None:
                self._say(description)
        if advance:
            self.advance(task, advance)

    def advance(self, task: int, advance: float = 1) -> None:
        state = self.tasks[task]
        if not state["started"]:
            state["started"] = True
            self._say(state["description"])

    def remove_task(self, task: int) -> None:
        self.tasks.pop(task, None)


def progress(prefix: str, quiet: bool = False):
    """The progress display of a command: nothing when ``quiet``, a rich bar when stderr is a
    terminal, else :class:`LineProgress` (``prefix`` starts its lines, e.g. ``streampress bench``)."""
    if not quiet and not sys.stderr.isatty():
        return LineProgress(prefix)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=True, disable=quiet)
