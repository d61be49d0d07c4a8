"""Benchmark annotation readers: the published files, read as they are.

Every reader turns one annotation file into a flat list of :class:`Question` records, one per
model call. OVO-Bench's forward-active items (REC, SSR, CRR) probe the model several times
along the video, so each probe in ``test_info`` becomes its own record with its own time.

Question ids (``qid``) are stable functions of the file's content and order, so predictions
written by an interrupted run can be matched on restart.

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
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

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


def parse_timestamp(value) -> float:
    """Seconds from a number or from ``"HH:MM:SS"``, ``"H:MM:SS"``, ``"MM:SS"`` (any field width)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str) or not re.fullmatch(r"\s*\d+(:\d+(\.\d+)?){0,2}\s*", value):
        raise ValueError(f"timestamp: expected seconds or 'HH:MM:SS', got {value!r}")
    seconds = 0.0
    for part in value.strip().split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def _load_json_or_jsonl(path: str | os.PathLike) -> list:
    text = Path(path).read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        data = json.loads(text)
    elif stripped.startswith("{"):
        try:
            data = json.loads(text)
            data = data if isinstance(data, list) else [data]
        except json.JSONDecodeError:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        raise ValueError(f"annotations: {path} is neither a JSON list nor JSONL")
    if not isinstance(data, list):
        raise ValueError(f"annotations: {path} must hold a list of objects")
    return data


def _require(entry: dict, keys, where: str) -> None:
    missing = [k for k in keys if k not in entry]
    if missing:
        raise ValueError(f"annotations: {where} lacks field(s) {missing}; has {sorted(entry)}")


def read_ovobench(path: str | os.PathLike) -> list[Question]:
    """OVO-Bench ``ovo_bench_new.json``: multiple choice, plus one record per forward probe."""
    out: list[Question] = []
    for n, item in enumerate(_load_json_or_jsonl(path)):
        where = f"OVO-Bench entry {n}"
        _require(item, ("id", "task", "video"), where)
        task = item["task"]
        if task not in OVO_TASK_CATEGORY:
            raise ValueError(f"annotations: {where} has unknown task {task!r}")
        video, item_id = _relative_video(item["video"]), str(item["id"])
        common = dict(benchmark="ovobench", task=task, category=OVO_TASK_CATEGORY[task],
                      video=video, item_id=item_id)
        if task in ("REC", "SSR", "CRR"):
            _require(item, ("test_info",), where)
            for j, probe in enumerate(item["test_info"]):
                _require(probe, ("realtime",), f"{where} probe {j}")
                if task == "REC":
                    inputs, answer = {"activity": item["activity"]}, int(probe["count"])
                elif task == "SSR":
                    inputs = {"step": probe["step"]}
                    answer = "Yes" if int(probe["type"]) == 1 else "No"
                else:
                    inputs = {"question": item["question"]}
                    answer = "Yes" if int(probe["type"]) == 1 else "No"
                out.append(Question(qid=f"ovo-{item_id}-p{j}", time=parse_timestamp(probe["realtime"]),
                                    options=(), answer=answer, inputs=inputs, **common))
        else:
            _require(item, ("realtime", "question", "options", "gt"), where)
            out.append(Question(qid=f"ovo-{item_id}", time=parse_timestamp(item["realtime"]),
                                options=tuple(item["options"]), answer=chr(65 + int(item["gt"])),
                                inputs={"question": item["question"]}, **common))
    return out


def read_streamingbench(path: str | os.PathLike) -> list[Question]:
    """StreamingBench real-time file: videos, each with questions at ``time_stamp``."""
    out: list[Question] = []
    for n, entry in enumerate(_load_json_or_jsonl(path)):
        _require(entry, ("video_path", "questions"), f"StreamingBench entry {n}")
        video = _relative_video(entry["video_path"])
        stem = Path(video).stem
        for j, q in enumerate(entry["questions"]):
            where = f"StreamingBench entry {n} question {j}"
            _require(q, ("task_type", "question", "time_stamp", "answer", "options"), where)
            options = tuple(re.sub(r"^[A-Z]\.\s*", "", o) for o in q["options"])
            out.append(Question(
                qid=f"sb-{stem}-q{j}", benchmark="streamingbench", task=q["task_type"],
                category="realtime", group=q.get("required_ability") or "unspecified", video=video,
                time=parse_timestamp(q["time_stamp"]), options=options,
                answer=str(q["answer"]).strip(), inputs={"question": q["question"]},
                item_id=f"{stem}#{j}"))
    return out


def _offline_options(entry: dict) -> list[str]:
    for key in ("options", "candidates", "choices"):
        if key in entry:
            opts = entry[key]
            if isinstance(opts, dict):  # {"A": "...", "B": "..."}
                opts = [opts[k] for k in sorted(opts)]
            return [re.sub(r"^[A-Z][.)]\s*", "", str(o)) for o in opts]
    numbered = sorted((int(k.split()[-1]), k) for k in entry if re.fullmatch(r"option \d+", k))
    if numbered:
        return [str(entry[k]) for _, k in numbered]
    raise ValueError(f"annotations: offline entry lacks options (options/candidates/'option 0'..); "
                     f"has {sorted(entry)}")


def _offline_answer(entry: dict, options: list[str]) -> str | None:
    ans = entry.get("answer", entry.get("gt"))
    if ans is None:
        return None
    if isinstance(ans, int) and not isinstance(ans, bool) or (isinstance(ans, str) and ans.isdigit()):
        return chr(65 + int(ans))
    ans = str(ans).strip()
    if re.fullmatch(r"[A-Z]", ans):
        return ans
    if ans in options:  # MLVU gives the option text
        return chr(65 + options.index(ans))
    m = re.match(r"^([A-Z])[.)]", ans)
    if m:
        return m.group(1)
    raise ValueError(f"annotations: answer {ans!r} is neither a letter, an index nor an option")


def read_offline_mcq(path: str | os.PathLike, benchmark: str = "mcq") -> list[Question]:
    """Offline multiple choice (VideoMME, MLVU, EgoSchema, generic); asked after the whole video."""
    out: list[Question] = []
    seen: Counter = Counter()
    for n, entry in enumerate(_load_json_or_jsonl(path)):
        _require(entry, ("question",), f"{benchmark} entry {n}")
        video = entry.get("video") or entry.get("video_path") or entry.get("videoID") or entry.get("q_uid")
        if not video:
            raise ValueError(f"annotations: {benchmark} entry {n} lacks video/videoID/q_uid")
        video = _relative_video(str(video))
        if not Path(video).suffix:
            video += ".mp4"
        options = _offline_options(entry)
        base = str(entry.get("id", entry.get("question_id", entry.get("q_uid", f"{Path(video).stem}"))))
        seen[base] += 1
        qid = f"{benchmark}-{base}" + ("" if seen[base] == 1 else f"-{seen[base] - 1}")
        task = str(entry.get("task") or entry.get("task_type") or entry.get("question_type") or "all")
        out.append(Question(qid=qid, benchmark=benchmark, task=task, category="offline",
                            group=str(entry.get("duration") or ""), video=video, time=None,
                            options=tuple(options), answer=_offline_answer(entry, options),
                            inputs={"question": entry["question"]}, item_id=base))
    return out


def load_benchmark(benchmark: str, path: str | os.PathLike) -> list[Question]:
    """Read ``path`` as ``benchmark`` (one of :data:`BENCHMARKS`)."""
    if not Path(path).is_file():
        raise ValueError(f"annotations: no such file {str(path)!r}")
    if benchmark == "ovobench":
        qs = read_ovobench(path)
    elif benchmark == "streamingbench":
        qs = read_streamingbench(path)
    elif benchmark in OFFLINE_BENCHMARKS:
        qs = read_offline_mcq(path, benchmark)
    else:
        raise ValueError(f"benchmark: expected one of {BENCHMARKS}, got {benchmark!r}")
    dup = [q for q, c in Counter(q.qid for q in qs).items() if c > 1]
    if dup:
        raise ValueError(f"annotations: duplicate question ids {dup[:5]}")
    return qs


def video_candidates(root: str | os.PathLike, video: str) -> list[Path]:
    """Where ``video`` may lie under ``root``: the relative path, then with leading folders
    dropped one by one (so ``--videos`` may point at the dataset root or at its video folder)."""
    parts = Path(video).parts
    return [Path(root, *parts[i:]) for i in range(len(parts))]


def resolve_videos(questions, root: str | os.PathLike | None) -> tuple[dict[str, Path], list[str]]:
    """Map each distinct video of ``questions`` to a file under ``root``; also list the missing."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for video in dict.fromkeys(q.video for q in questions):
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
