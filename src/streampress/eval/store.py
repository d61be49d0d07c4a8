"""Prediction files: JSONL appended as questions finish, read back to resume and to merge.

Layout of an output folder:

- ``run_config.json``: the settings that determine the answers; a restart with different
  settings is refused rather than mixing results. It binds the folder only once answers
  exist: a run that failed before its first answer (a model that did not load) leaves
  nothing to protect, so the corrected rerun on the same folder replaces it;
- ``eval.lock``: held by the run writing the folder (rank 0 under torchrun), holding its
  pid and host. It is created atomically (``O_CREAT | O_EXCL``), so of two runs started on
  one folder the second stops with a one-line error instead of interleaving answers; it is
  removed when the run ends, also on an error or Ctrl-C. A lock whose process is gone (same
  host, pid not running) is taken over; one from another host is taken as live, as its pid
  cannot be checked from here;
- ``predictions.jsonl`` (one process) or ``predictions.rank{R}.jsonl`` (one per rank): one
  JSON object per answered question, flushed line by line;
- ``all_predictions.jsonl``, ``scores.json``, ``scores.md``: written at the end from every
  prediction file, in question order; ``missing_videos.txt`` when videos were missing,
  ``invalid_annotations.txt`` when invalid entries were skipped (``--skip-invalid``).

A line cut short by a crash is ignored on reading, and the next append starts a fresh line.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CONFIG_FILE = "run_config.json"
LOCK_FILE = "eval.lock"


def prediction_path(out: str | os.PathLike, rank: int, world_size: int) -> Path:
    """This process's prediction file."""
    name = "predictions.jsonl" if world_size == 1 else f"predictions.rank{rank:03d}.jsonl"
    return Path(out) / name


def load_predictions(out: str | os.PathLike) -> tuple[dict[str, dict], int]:
    """Every prediction in ``out`` by qid (first one wins) and the number of unreadable lines."""
    records: dict[str, dict] = {}
    bad = 0
    for path in sorted(Path(out).glob("predictions*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    bad += 1
                    continue
                if isinstance(rec, dict) and "qid" in rec:
                    records.setdefault(rec["qid"], rec)
                else:
                    bad += 1
    return records, bad


class PredictionWriter:
    """Appends one JSON line per record and flushes it, so a crash loses at most one line."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        needs_newline = False
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
        self._f = open(self.path, "a", encoding="utf-8")
        if needs_newline:
            self._f.write("\n")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so readers never see half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def check_config(out: str | os.PathLike, key: dict, write: bool) -> None:
    """Refuse to continue a folder whose answers came from other settings; record ours."""
    path = Path(out) / CONFIG_FILE
    old = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
    if old is not None and old != key and load_predictions(out)[0]:
        diff = {k: (old.get(k), key.get(k)) for k in sorted(set(old) | set(key)) if old.get(k) != key.get(k)}
        lines = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"out: {str(out)!r} holds results of other settings ({lines}); "
                         "use another --out folder or remove it")
    if write and old != key:
        Path(out).mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(key, indent=2, sort_keys=True) + "\n")


def _lock_owner(path: Path) -> tuple[int | None, str]:
    """(pid, host) written in a lock file; pid None when unreadable (maybe being written)."""
    try:
        pid, host = (path.read_text(encoding="utf-8").split() + ["", ""])[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None, ""


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextmanager
def folder_lock(out: str | os.PathLike) -> Iterator[Path]:
    """Hold ``out/eval.lock`` for the block: one run writes a folder at a time."""
    path = Path(out) / LOCK_FILE
    me = f"{os.getpid()} {socket.gethostname()}\n"
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            pid, host = _lock_owner(path)
            stale = pid is not None and pid > 0 and host in ("", socket.gethostname()) and not _running(pid)
            if attempt or not stale:
                owner = f"pid {pid}" + (f" on {host}" if host else "") if pid is not None else "unknown process"
                raise ValueError(f"out: {str(out)!r} is in use by another streampress eval ({owner}, lock file "
                                 f"{path}); wait for it to end, or remove the lock file if that run is gone") from None
            path.unlink(missing_ok=True)  # left by a run that died: take it over
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(me)
    try:
        yield path
    finally:
        if _lock_owner(path)[0] == os.getpid():
            path.unlink(missing_ok=True)


def write_jsonl(path: str | os.PathLike, records) -> None:
    """Write ``records`` as JSONL (atomically)."""
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
