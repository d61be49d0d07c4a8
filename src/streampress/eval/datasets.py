"""Benchmark annotation readers: the published files, read as they are.

Every reader turns one annotation file into a flat list of :class:`Question` records, one per
model call. OVO-Bench's forward-active items (REC, SSR, CRR) probe the model several times
along the video, so each probe in ``test_info`` becomes its own record with its own time.

Question ids (``qid``) are stable functions of the file's content and order, so predictions
written by an interrupted run can be matched on restart.

Every field a question needs is checked before anything runs, because a bad value does not
fail loudly later: a NaN time compares false with every frame time, so the stream never
reaches that question, nor any question after it; an index past the options scores every
answer wrong; ``../`` in a video path reads files outside the dataset. A reader goes through
the whole file and notes one line per problem, naming the file, the entry (its position in
the file from 0, its id and video; for StreamingBench the video and the question), the
field and what was expected. :func:`read_annotations` returns the valid questions with those
lines; :func:`load_benchmark` raises :class:`AnnotationError` with all of them.

Offline multiple-choice format (VideoMME, MLVU, EgoSchema and any other set), JSON list or
JSONL, one object per question::

    {"video": "relative/path.mp4", "question": "...", "options": ["...", ...],
     "answer": "B" | 1, "id": "optional", "task": "optional"}

``answer`` is a letter or a 0-based option index. The published field names are also
accepted: VideoMME ``videoID``/``question_id``/``task_type``, options written ``"A. ..."``
and a letter answer; EgoSchema ``q_uid``/``option 0``..``option 4`` with ``answer`` an index
(EgoSchema's public file keeps its answers elsewhere: questions without one are scored as
unknown); MLVU ``candidates``/``question_type`` with the answer given as option text.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

OVO_CATEGORIES = {
    "backward": ("EPM", "ASI", "HLD"),
    "realtime": ("STU", "OJR", "ATR", "ACR", "OCR", "FPD"),
    "forward": ("REC", "SSR", "CRR"),
}
OVO_TASK_CATEGORY = {t: c for c, tasks in OVO_CATEGORIES.items() for t in tasks}
OFFLINE_BENCHMARKS = ("videomme", "mlvu", "egoschema", "mcq")
BENCHMARKS = ("ovobench", "streamingbench") + OFFLINE_BENCHMARKS


@dataclass(frozen=True)
class Question:
    """One model call of a benchmark.

    ``time`` is when the question is asked, in seconds from the start of the video; ``None``
    means after the whole video (offline sets). ``answer`` is the ground truth in the
    benchmark's own terms: an option letter (multiple choice), a count (OVO REC) or
    ``"Yes"``/``"No"`` (OVO SSR, CRR). ``inputs`` holds what the prompt template needs.
    ``category`` is the benchmark's scoring category (OVO: backward, realtime, forward);
    ``group`` an extra breakdown (StreamingBench: required ability; VideoMME: duration).
    """

    qid: str
    benchmark: str
    task: str
    category: str
    video: str
    time: float | None
    options: tuple[str, ...]
    answer: str | int | None
    inputs: dict = field(default_factory=dict, compare=False)
    item_id: str = ""
    group: str = ""


def _relative_video(path: str) -> str:
    """Video path relative to the dataset's video folder.

    OVO-Bench writes some paths absolute on its authors' machine (``/mnt/.../videos/
    chunked_videos/x.mp4``): keep what follows the last ``/videos/``. StreamingBench writes
    ``./videos/x.mp4``: drop the ``./``.
    """
    p = path.replace("\\", "/")
    if p.startswith("/") and "/videos/" in p:
        p = p.rsplit("/videos/", 1)[1]
    while p.startswith("./"):
        p = p[2:]
    return p.lstrip("/")


def _inside(video: str) -> bool:
    """Whether a relative video path stays inside the videos folder. Checked on the text, so
    that symbolic links inside ``--videos`` may point anywhere, as dataset folders often do."""
    path = PurePosixPath(video)
    return bool(video) and not path.is_absolute() and ".." not in path.parts


def _load_json_or_jsonl(path: str | os.PathLike) -> list:
    """The entries of a JSON list or of JSONL (one object a line). Python's json reads the
    ``NaN`` and ``Infinity`` literals too: the field checks refuse them where a number is due."""
    text = Path(path).read_text(encoding="utf-8")
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            data = json.loads(text)
        elif stripped.startswith("{"):
            try:
                data = json.loads(text)
                data = data if isinstance(data, list) else [data]
            except json.JSONDecodeError:
                data = []
                for n, line in enumerate(text.splitlines(), 1):
                    if line.strip():
                        try:
                            data.append(json.loads(line))
                        except json.JSONDecodeError as exc:
                            raise ValueError(f"annotations: {path}: line {n}: not valid JSON ({exc.msg})") from None
        else:
            raise ValueError(f"annotations: {path} is neither a JSON list nor JSONL")
    except json.JSONDecodeError as exc:
        raise ValueError(f"annotations: {path}: not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise ValueError(f"annotations: {path} must hold a list of objects")
    return data


# ---- field checks: each returns the value as the harness needs it or raises ValueError
# ("expected ..., got ..."), which the reader turns into one line naming the entry and field.

def _show(value) -> str:
    """A value as the JSON file writes it (NaN, Infinity, null, true), cut to 60 characters."""
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= 60 else text[:57] + "..."


def _expected(what: str, value) -> ValueError:
    return ValueError(f"expected {what}, got {_show(value)}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _seconds(value) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value) if abs(value) < 1e300 else math.inf
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+(:\d+(\.\d+)?){0,2}\s*", value):
        seconds = 0.0
        for part in value.strip().split(":"):
            seconds = seconds * 60 + float(part)
        return seconds
    raise _expected("a finite number of seconds >= 0 or 'HH:MM:SS'", value)


def parse_timestamp(value) -> float:
    """Seconds from a number or from ``"HH:MM:SS"``, ``"H:MM:SS"``, ``"MM:SS"`` (any field width).
    NaN, infinite and negative times are refused: a question must have a place in the stream."""
    try:
        return _seconds(value)
    except ValueError as exc:
        raise ValueError(f"timestamp: {exc}") from None


def _text(value) -> str:
    if isinstance(value, str) and value.strip():
        return value
    raise _expected("a non-empty string", value)


def _ident(value) -> str:
    if _is_int(value) or isinstance(value, str) and value.strip():
        return str(value)
    raise _expected("an integer or a string", value)


def _video(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _expected("a video path (a string)", value)
    video = _relative_video(value)
    if not _inside(video):
        raise _expected("a path inside the --videos folder", value)
    return video


def _options(value) -> tuple[str, ...]:
    if isinstance(value, list) and value and all(isinstance(o, str) for o in value):
        return tuple(value)
    raise _expected("a list of option texts (strings)", value)


def _index(count: int | None):
    """Check of a 0-based option index below ``count`` (None: the options are bad themselves)."""
    def check(value) -> int:
        if _is_int(value) and 0 <= value < (count or value + 1):
            return value
        raise _expected(f"an option index 0..{count - 1}" if count else "an option index", value)
    return check


def _letter(count: int | None):
    """Check of an option letter among the first ``count`` letters."""
    def check(value) -> str:
        letter = value.strip() if isinstance(value, str) else None
        if letter and re.fullmatch(r"[A-Z]", letter) and (count is None or ord(letter) - 65 < count):
            return letter
        raise _expected(f"an option letter A..{chr(64 + count)}" if count else "an option letter", value)
    return check


def _count(value) -> int:
    if _is_int(value) and value >= 0:
        return value
    raise _expected("a count (an integer >= 0)", value)


def _yes_no(value) -> str:
    if _is_int(value) and value in (0, 1):
        return "Yes" if value == 1 else "No"
    raise _expected("0 (No) or 1 (Yes)", value)


def _ovo_task(value) -> str:
    if isinstance(value, str) and value in OVO_TASK_CATEGORY:
        return value
    raise _expected(f"an OVO-Bench task ({', '.join(OVO_TASK_CATEGORY)})", value)


def _nonempty_list(what: str):
    def check(value) -> list:
        if isinstance(value, list) and value:
            return value
        raise _expected(f"a non-empty list of {what}", value)
    return check


class _Fields:
    """Reads the fields of one annotation object, noting every problem instead of stopping at
    the first, so that one pass over a file reports all that is wrong with it."""

    def __init__(self, obj, prefix: str = ""):
        self.is_object = isinstance(obj, dict)
        self.obj = obj if self.is_object else {}
        self.prefix = prefix
        self.problems: list[str] = [] if self.is_object else [
            (f"field {prefix[:-1]!r}: " if prefix else "") + f"expected an object {{...}}, got {_show(obj)}"]

    def get(self, key: str, check):
        """``check(value)``; None, with a problem noted, when the field is missing or wrong."""
        if key not in self.obj:
            if self.is_object:
                self.problems.append(f"field '{self.prefix}{key}': missing")
            return None
        try:
            return check(self.obj[key])
        except ValueError as exc:
            self.problems.append(f"field '{self.prefix}{key}': {exc}")
            return None


class AnnotationError(ValueError):
    """Problems in an annotation file, one line each: ``FILE: ENTRY: field 'F': expected ..., got ...``."""


@dataclass
class Annotations:
    """What an annotation file holds: the valid questions, one line per problem, and the task
    (None when unreadable) of each question left out because its entry is invalid."""

    questions: list[Question] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: list[str | None] = field(default_factory=list)


def _where(kind: str, n: int, *labels) -> str:
    shown = ", ".join(label for label in labels if label)
    return f"{kind} {n}" + (f" ({shown})" if shown else "")


def _ovo_probes(f: _Fields, task: str, common: dict) -> tuple[list[Question], int]:
    """The probe records of a forward item, and how many probes are left out."""
    inputs = ({"activity": f.get("activity", _text)} if task == "REC" else
              {"question": f.get("question", _text)} if task == "CRR" else {})
    probes = f.get("test_info", _nonempty_list("probes")) or []
    item_ok = not f.problems
    found: list[Question] = []
    bad = 0
    for j, probe in enumerate(probes):
        p = _Fields(probe, f"test_info[{j}].")
        t = p.get("realtime", _seconds)
        if task == "REC":
            answer, extra = p.get("count", _count), {}
        else:
            answer = p.get("type", _yes_no)
            extra = {"step": p.get("step", _text)} if task == "SSR" else {}
        f.problems += p.problems
        bad += bool(p.problems)
        if item_ok and not p.problems:
            found.append(Question(qid=f"ovo-{common['item_id']}-p{j}", time=t, options=(), answer=answer,
                                  inputs={**inputs, **extra}, **common))
    return found, (bad if item_ok else len(probes) or 1)


def _ovobench(data: list, file: str) -> Annotations:
    """OVO-Bench ``ovo_bench_new.json``: multiple choice, plus one record per forward probe."""
    out = Annotations()
    seen: dict[str, int] = {}
    for n, item in enumerate(data):
        f = _Fields(item)
        item_id, task, video = f.get("id", _ident), f.get("task", _ovo_task), f.get("video", _video)
        if item_id is not None and seen.setdefault(item_id, n) != n:
            f.problems.append(f"field 'id': expected a unique id, got {_show(item['id'])} "
                              f"(entry {seen[item_id]} has it too)")
        common = dict(benchmark="ovobench", task=task, category=OVO_TASK_CATEGORY.get(task, ""), video=video,
                      item_id=item_id)
        if task in ("REC", "SSR", "CRR"):
            found, skipped = _ovo_probes(f, task, common)
        elif task is None:
            found, skipped = [], 1
        else:
            t, question = f.get("realtime", _seconds), f.get("question", _text)
            options = f.get("options", _options)
            gt = f.get("gt", _index(len(options) if options else None))
            found = [] if f.problems else [Question(qid=f"ovo-{item_id}", time=t, options=options,
                                                    answer=chr(65 + gt), inputs={"question": question}, **common)]
            skipped = 1 - len(found)
        where = _where("entry", n, item_id and f"id {item_id}", video and f"video {video}")
        out.problems += [f"{file}: {where}: {p}" for p in f.problems]
        out.questions += found
        out.skipped += [task] * skipped
    return out


def _streamingbench(data: list, file: str) -> Annotations:
    """StreamingBench real-time file: videos, each with questions at ``time_stamp``."""
    out = Annotations()
    seen: dict[str, int] = {}
    for n, entry in enumerate(data):
        f = _Fields(entry)
        video, questions = f.get("video_path", _video), f.get("questions", _nonempty_list("questions"))
        stem = video and Path(video).stem
        if stem and seen.setdefault(stem, n) != n:  # question ids are made of the file name
            f.problems.append(f"field 'video_path': expected a unique file name, got "
                              f"{_show(entry['video_path'])} (video {seen[stem]} has it too)")
        where = _where("video", n, video)
        out.problems += [f"{file}: {where}: {p}" for p in f.problems]
        if questions is None:
            out.skipped.append(None)
        for j, q in enumerate(questions or []):
            g = _Fields(q)
            task, text = g.get("task_type", _text), g.get("question", _text)
            t, options = g.get("time_stamp", _seconds), g.get("options", _options)
            answer = g.get("answer", _letter(len(options) if options else None))
            out.problems += [f"{file}: {where} question {j}: {p}" for p in g.problems]
            if f.problems or g.problems:
                out.skipped.append(task)
                continue
            out.questions.append(Question(
                qid=f"sb-{stem}-q{j}", benchmark="streamingbench", task=task, category="realtime",
                group=str(q.get("required_ability") or "unspecified"), video=video, time=t,
                options=tuple(re.sub(r"^[A-Z]\.\s*", "", o) for o in options), answer=answer,
                inputs={"question": text}, item_id=f"{stem}#{j}"))
    return out


def _offline_options(entry: dict) -> tuple[str, ...]:
    for key in ("options", "candidates", "choices"):
        if key in entry:
            opts = entry[key]
            if isinstance(opts, dict):  # {"A": "...", "B": "..."}
                opts = [opts[k] for k in sorted(opts)]
            return tuple(re.sub(r"^[A-Z][.)]\s*", "", o) for o in _options(opts))
    numbered = sorted((int(k.split()[-1]), k) for k in entry if re.fullmatch(r"option \d+", k))
    if numbered:
        return _options([entry[k] for _, k in numbered])
    raise ValueError("missing (looked for options, candidates, choices, 'option 0'..)")


def _offline_answer(entry: dict, options: tuple[str, ...]) -> str | None:
    ans = entry.get("answer", entry.get("gt"))
    if ans is None:
        return None
    text = ans.strip() if isinstance(ans, str) else None
    if _is_int(ans) or text and text.isdigit():
        index = int(ans)
    elif text and re.fullmatch(r"[A-Z]", text):
        index = ord(text) - 65
    elif text in options:  # MLVU gives the option text
        index = options.index(text)
    elif text and re.match(r"[A-Z][.)]", text):
        index = ord(text[0]) - 65
    else:
        index = -1
    if 0 <= index < len(options):
        return chr(65 + index)
    n = len(options)
    raise _expected(f"an option letter A..{chr(64 + n)}, an index 0..{n - 1} or an option's text", ans)


def _offline(data: list, file: str, benchmark: str) -> Annotations:
    """Offline multiple choice (VideoMME, MLVU, EgoSchema, generic); asked after the whole video."""
    out = Annotations()
    seen: Counter = Counter()
    for n, entry in enumerate(data):
        f = _Fields(entry)
        question = f.get("question", _text)
        video = f.get(next((k for k in ("video", "video_path", "videoID", "q_uid") if k in f.obj), "video"), _video)
        if video and not Path(video).suffix:
            video += ".mp4"
        options = answer = None
        if f.is_object:
            try:
                options = _offline_options(entry)
                answer = _offline_answer(entry, options)
            except ValueError as exc:
                f.problems.append(f"field '{'answer' if options else 'options'}': {exc}")
        explicit = next((f.obj[k] for k in ("id", "question_id", "q_uid") if k in f.obj), None)
        base = str(explicit if explicit is not None else Path(video or f"entry{n}").stem)
        task = str(f.obj.get("task") or f.obj.get("task_type") or f.obj.get("question_type") or "all")
        where = _where("entry", n, f"id {base}" if explicit is not None else video and f"video {video}")
        out.problems += [f"{file}: {where}: {p}" for p in f.problems]
        if f.problems:
            out.skipped.append(task)
            continue
        seen[base] += 1
        qid = f"{benchmark}-{base}" + ("" if seen[base] == 1 else f"-{seen[base] - 1}")
        out.questions.append(Question(qid=qid, benchmark=benchmark, task=task, category="offline",
                                      group=str(entry.get("duration") or ""), video=video, time=None,
                                      options=options, answer=answer, inputs={"question": question}, item_id=base))
    return out


def read_annotations(benchmark: str, path: str | os.PathLike) -> Annotations:
    """Read ``path`` as ``benchmark`` (one of :data:`BENCHMARKS`), keeping the valid questions
    and one line per problem; only a file that cannot be read at all raises."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark: expected one of {BENCHMARKS}, got {benchmark!r}")
    if not Path(path).is_file():
        raise ValueError(f"annotations: no such file {str(path)!r}")
    data = _load_json_or_jsonl(path)
    if benchmark == "ovobench":
        ann = _ovobench(data, str(path))
    elif benchmark == "streamingbench":
        ann = _streamingbench(data, str(path))
    else:
        ann = _offline(data, str(path), benchmark)
    dup = [q for q, c in Counter(q.qid for q in ann.questions).items() if c > 1]
    if dup:  # the readers refuse repeated ids entry by entry; this is a last guard
        raise ValueError(f"annotations: {path}: duplicate question ids {dup[:5]}")
    return ann


def load_benchmark(benchmark: str, path: str | os.PathLike) -> list[Question]:
    """The questions of ``path``; :class:`AnnotationError` (every problem, one line each) when
    any entry is invalid."""
    ann = read_annotations(benchmark, path)
    if ann.problems:
        raise AnnotationError("\n".join(ann.problems))
    return ann.questions


def read_ovobench(path: str | os.PathLike) -> list[Question]:
    """OVO-Bench ``ovo_bench_new.json``: multiple choice, plus one record per forward probe."""
    return load_benchmark("ovobench", path)


def read_streamingbench(path: str | os.PathLike) -> list[Question]:
    """StreamingBench real-time file: videos, each with questions at ``time_stamp``."""
    return load_benchmark("streamingbench", path)


def read_offline_mcq(path: str | os.PathLike, benchmark: str = "mcq") -> list[Question]:
    """Offline multiple choice (VideoMME, MLVU, EgoSchema, generic); asked after the whole video."""
    return load_benchmark(benchmark, path)


def video_candidates(root: str | os.PathLike, video: str) -> list[Path]:
    """Where ``video`` may lie under ``root``: the relative path, then with leading folders
    dropped one by one (so ``--videos`` may point at the dataset root or at its video folder)."""
    parts = Path(video).parts
    return [Path(root, *parts[i:]) for i in range(len(parts))]


def resolve_videos(questions, root: str | os.PathLike | None) -> tuple[dict[str, Path], list[str]]:
    """Map each distinct video of ``questions`` to a file under ``root``; also list the missing.
    A path that would leave ``root`` (``..``, absolute) is an error, never looked up."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for video in dict.fromkeys(q.video for q in questions):
        if not _inside(video):
            raise ValueError(f"videos: {video!r}: expected a path inside the --videos folder")
        hit = None
        if root is not None:
            hit = next((p for p in video_candidates(root, video) if p.is_file()), None)
        if hit is None:
            missing.append(video)
        else:
            found[video] = hit
    return found, missing


def summarize(questions) -> dict:
    """Counts per task: records (model calls), source items, videos; used by ``--dry-run``."""
    tasks: dict[str, dict] = {}
    for q in questions:
        t = tasks.setdefault(q.task, {"category": q.category, "questions": 0, "items": set(),
                                      "videos": set()})
        t["questions"] += 1
        t["items"].add(q.item_id)
        t["videos"].add(q.video)
    rows = {k: {"category": v["category"], "items": len(v["items"]), "questions": v["questions"],
                "videos": len(v["videos"])} for k, v in tasks.items()}
    cats: dict[str, dict] = {}
    for q in questions:
        c = cats.setdefault(q.category, {"questions": 0, "items": set(), "videos": set()})
        c["questions"] += 1
        c["items"].add(q.item_id)
        c["videos"].add(q.video)
    cats = {k: {"items": len(v["items"]), "questions": v["questions"], "videos": len(v["videos"])}
            for k, v in cats.items()}
    return {"tasks": rows, "categories": cats, "items": sum(r["items"] for r in rows.values()),
            "questions": len(questions), "videos": len({q.video for q in questions})}
