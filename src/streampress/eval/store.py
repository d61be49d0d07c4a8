"""Prediction files: JSONL appended as questions finish, read back to resume and to merge.

Layout of an output folder:

- ``run_config.json``: the settings that determine the answers; a restart with different
  settings is refused rather than mixing results;
- ``predictions.jsonl`` (one process) or ``predictions.rank{R}.jsonl`` (one per rank): one
  JSON object per answered question, flushed line by line;
- ``all_predictions.jsonl``, ``scores.json``, ``scores.md``: written at the end from every
  prediction file, in question order; ``missing_videos.txt`` when videos were missing.

A line cut short by a crash is ignored on reading, and the next append starts a fresh line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CONFIG_FILE = "run_config.json"


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
    """Refuse to continue a folder whose results came from other settings; record ours."""
    path = Path(out) / CONFIG_FILE
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = {k: (old.get(k), key.get(k)) for k in sorted(set(old) | set(key)) if old.get(k) != key.get(k)}
        if diff:
            lines = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in diff.items()))
            raise ValueError(f"out: {str(out)!r} holds results of other settings ({lines}); "
                             "use another --out folder or remove it")
    elif write:
        Path(out).mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(key, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | os.PathLike, records) -> None:
    """Write ``records`` as JSONL (atomically)."""
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
