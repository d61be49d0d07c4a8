"""The evaluation run: questions -> videos -> sessions -> JSONL -> scores, resumable and sharded.

:func:`evaluate` is the whole job. It checks the settings (:meth:`EvalConfig.validate`) and
every annotation entry before it writes anything or loads a model, because a bad value found
later costs a model load, fails once per video, or leaves a ``run_config.json`` that refuses
the corrected rerun. Invalid entries stop the run unless ``skip_invalid`` (then they are
listed in ``invalid_annotations.txt`` and counted as skipped). It then takes the output
folder's lock, skips (and reports) questions whose video is missing, splits videos over the
ranks, streams each of this rank's videos through a fresh session (skipping questions already
in the output folder), appends one JSON line per answer, then, on rank 0 after a barrier,
merges every prediction file and writes the score table. :func:`dry_run` needs neither videos nor a model.
``forward_mode="proactive"`` (OVO-Bench, stream mode) also answers the forward-active tasks
proactively on the same streams and reports both modes side by side (:mod:`.proactive`).
"""

from __future__ import annotations

import json
import math
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..spec import memory_policy  # the session's ``memory`` for EvalConfig.memory (a --memory spec)
from . import proactive, scoring, sharding, store
from .datasets import AnnotationError, Annotations, Question, read_annotations, resolve_videos, summarize
from .frames import iter_frames
from .prompts import is_correct, parse_response
from .protocol import ask_time, run_clips, run_stream

SessionFactory = Callable[[], object]
MODES = ("stream", "clip")


@dataclass
class EvalConfig:
    """Everything a run depends on. ``params`` are the pruner's parameters (``keep_ratio``,
    ``tau``...); ``memory`` selects the session's memory policy: None (the full cache),
    ``{"name": "window", "seconds": S}`` or ``{"name": "retrieval", "window_seconds": S,
    "top_k": K, "block_items": N}`` (the policy's own arguments); ``size`` resizes frames
    (the longer side, or ``(width, height)``); ``cacher`` holds STC-Cacher settings (``rho``,
    ``interval``, ``refresh_threshold``) or None. ``top_logits`` > 0 records the k
    largest first-token logits of every question (one extra question forward each).
    ``forward_mode``: ``"probe"`` asks OVO-Bench's forward tasks at every annotated time;
    ``"proactive"`` also answers them with watches and reports both (:mod:`.proactive`)."""

    benchmark: str
    annotations: str
    videos: str | None = None
    out: str = "eval_results"
    model: str | None = None
    method: str = "none"
    params: dict = field(default_factory=dict)
    fps: float = 1.0
    size: int | tuple[int, int] | None = None
    mode: str = "stream"
    chunk_frames: int = 16
    max_new_tokens: int = 16
    limit: int | None = None
    tasks: list[str] | None = None
    strict: bool = False
    memory: dict | None = None
    cacher: dict | None = None
    dtype: str | None = None
    device: str | None = None
    seed: int = 0
    top_logits: int = 0
    raise_errors: bool = False
    skip_invalid: bool = False
    forward_mode: str = "probe"

    def validate(self) -> None:
        """Refuse settings that cannot run, with one line naming the option, before any work."""
        from streampress import create_cacher, create_pruner

        def need(ok: bool, option: str, expected: str, got) -> None:
            if not ok:
                raise ValueError(f"{option}: expected {expected}, got {got!r}")

        def number(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        def count(x, least: int) -> bool:
            return isinstance(x, int) and not isinstance(x, bool) and x >= least

        need(self.mode in MODES, "--mode", f"one of {MODES}", self.mode)
        need(self.forward_mode in proactive.FORWARD_MODES, "--forward-mode", f"one of {proactive.FORWARD_MODES}",
             self.forward_mode)
        if self.forward_mode == "proactive":
            need(self.benchmark == "ovobench", "--forward-mode proactive", "benchmark ovobench (its forward "
                 "tasks)", self.benchmark)
            need(self.mode == "stream", "--forward-mode proactive", "--mode stream (watches live on one "
                 "stream)", self.mode)
        need(number(self.fps) and self.fps > 0, "--fps", "a finite number > 0", self.fps)
        need(count(self.chunk_frames, 1), "--chunk-frames", "an integer >= 1", self.chunk_frames)
        need(count(self.max_new_tokens, 1), "--max-new-tokens", "an integer >= 1", self.max_new_tokens)
        need(self.limit is None or count(self.limit, 1), "--limit", "a positive count", self.limit)
        need(count(self.top_logits, 0), "--top-logits", "an integer >= 0", self.top_logits)
        try:
            memory_policy(self.memory)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"--memory: expected None or a policy spec, got {self.memory!r} ({exc})") from None
        sizes = [self.size] if isinstance(self.size, int) else list(self.size or [])
        need(len(sizes) in (0, 1, 2) and all(count(v, 1) for v in sizes), "--size", "W or (W, H)", self.size)
        if self.method in ("none", "full"):
            need(not self.params, "--keep-ratio/--param", "no pruner parameters without a --method", self.params)
        else:
            try:  # the pruner and cacher check their own parameters; building them is cheap
                create_pruner(self.method, **self.params)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"--method/--keep-ratio/--param: {exc}") from None
        if self.cacher is not None:
            try:
                create_cacher(**self.cacher)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"--cacher-rho/--cacher-interval: {exc}") from None

    def result_key(self) -> dict:
        """The settings that determine answers: a resumed run must match them."""
        keys = ("benchmark", "model", "method", "params", "fps", "mode", "chunk_frames",
                "max_new_tokens", "memory", "size", "cacher", "dtype", "seed")
        d = {k: getattr(self, k) for k in keys}
        d["annotations"] = Path(self.annotations).name
        if self.forward_mode != "probe":  # absent by default: folders of earlier runs still resume
            d["forward_mode"] = self.forward_mode
        return json.loads(json.dumps(d))


MAX_SHOWN = 50  # problem lines printed; all of them go to invalid_annotations.txt


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _shown(lines: list[str]) -> list[str]:
    extra = len(lines) - MAX_SHOWN
    return lines if extra <= 0 else lines[:MAX_SHOWN] + [f"... and {_plural(extra, 'more problem')}"]


def select_questions(cfg: EvalConfig) -> tuple[list[Question], list[Question], Annotations]:
    """All valid questions of the file, those this run covers (``tasks`` filter, then ``limit``),
    and the file's reading. Invalid entries raise :class:`AnnotationError` unless ``skip_invalid``."""
    ann = read_annotations(cfg.benchmark, cfg.annotations)
    every = chosen = ann.questions
    if ann.problems and not cfg.skip_invalid:
        raise AnnotationError("\n".join(_shown(ann.problems) + [
            f"{cfg.annotations}: {_plural(len(ann.problems), 'problem')} ({_plural(len(ann.skipped), 'question')}); "
            f"fix them, or pass --skip-invalid to run the {_plural(len(every), 'valid question')}"]))
    if cfg.tasks:
        known = {q.task for q in every} | {t for t in ann.skipped if t}
        unknown = sorted(set(cfg.tasks) - known)
        if unknown:
            raise ValueError(f"--tasks: {unknown} not in this file; it has {sorted(known)}")
        chosen = [q for q in chosen if q.task in cfg.tasks]
    if cfg.limit is not None:
        chosen = chosen[: cfg.limit]
    return every, chosen, ann


def invalid_count(cfg: EvalConfig, ann: Annotations) -> int:
    """Questions of the run's tasks left out as invalid (all of them without ``tasks``)."""
    return sum(1 for t in ann.skipped if not cfg.tasks or t is None or t in cfg.tasks)


def dry_run(cfg: EvalConfig, log: Callable[[str], None] | None = None) -> tuple[dict, str]:
    """Tasks and question counts of the file (and videos present under ``cfg.videos``)."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    every, chosen, ann = select_questions(cfg)
    for line in _shown(ann.problems):
        log(f"warning: skipped: {line}")
    info = summarize(chosen)
    lines = [f"{cfg.benchmark}: {cfg.annotations}",
             f"{'category':<18} {'task':<24} {'items':>6} {'questions':>10} {'videos':>7}"]
    order = {"backward": 0, "realtime": 1, "forward": 2}
    rows = sorted(info["tasks"].items(), key=lambda kv: (order.get(kv[1]["category"], 3), kv[1]["category"], kv[0]))
    for n, (task, row) in enumerate(rows):
        note = " (one question per probe)" if row["questions"] != row["items"] else ""
        lines.append(f"{row['category']:<18} {task:<24} {row['items']:>6} {row['questions']:>10} "
                     f"{row['videos']:>7}{note}")
        cat = row["category"]
        if len(info["categories"]) > 1 and (n + 1 == len(rows) or rows[n + 1][1]["category"] != cat):
            c = info["categories"][cat]
            lines.append(f"{'':<18} {'(' + cat + ' total)':<24} {c['items']:>6} {c['questions']:>10} {c['videos']:>7}")
    lines.append(f"total: {info['items']} items, {info['questions']} questions (model calls), "
                 f"{info['videos']} videos")
    if cfg.forward_mode == "proactive":
        fwd = [q for q in chosen if proactive.is_forward(q)]
        info["proactive"] = {t: {"annotated_times": sum(q.task == t for q in fwd),
                                 "watches": len({proactive.watch_key(q) for q in fwd if q.task == t})}
                             for t in proactive.FORWARD_TASKS if any(q.task == t for q in fwd)}
        for t, row in info["proactive"].items():
            lines.append(f"proactive {t}: {row['watches']} watches (one per distinct prompt and video, each "
                         f"probing when its trigger fires); probe mode: {row['annotated_times']} calls "
                         f"(one per annotated time)")
    if ann.problems:
        info["questions_invalid"] = invalid_count(cfg, ann)
        lines.append(f"{_plural(info['questions_invalid'], 'invalid question')} skipped "
                     f"({_plural(len(ann.problems), 'problem')} in the file, see the warnings)")
    if cfg.videos is not None:
        found, missing = resolve_videos(chosen, cfg.videos)
        skipped = sum(1 for q in chosen if q.video not in found)
        info.update(videos_present=len(found), videos_missing=len(missing), questions_skipped=skipped)
        lines.append(f"videos present under {cfg.videos}: {len(found)} of {info['videos']} "
                     f"({skipped} questions would be skipped)")
    return info, "\n".join(lines)


def default_session_factory(cfg: EvalConfig, device: str) -> SessionFactory:
    """Load the model once; each call makes a new session with a fresh pruner and memory."""
    import torch

    import streampress

    torch.manual_seed(cfg.seed)  # the same random-weight model in every process
    model = streampress.load_model(cfg.model, dtype=cfg.dtype, device=device)

    def new_pruner():
        return None if cfg.method in ("none", "full") else streampress.create_pruner(cfg.method, **cfg.params)

    new_pruner()  # fail early on bad parameters

    def make():
        pruner = new_pruner()
        cacher = streampress.create_cacher(**cfg.cacher) if cfg.cacher else None
        return streampress.StreamingSession(model, pruner=pruner, cacher=cacher, memory=memory_policy(cfg.memory))

    return make


def _record(q: Question, text: str, info: dict, cfg: EvalConfig, rank: int) -> dict:
    return proactive.annotate({"qid": q.qid, "benchmark": q.benchmark, "task": q.task, "category": q.category,
            "video": q.video, "time": q.time, "response": text,
            "parsed": parse_response(q, text, cfg.strict), "answer": q.answer,
            "correct": is_correct(q, text, cfg.strict), "rank": rank, **info}, q, cfg.strict)


def _run_videos(cfg, videos, by_video, stop_times, paths, done, factory, writer, ctx, log) -> list[str]:
    errors: list[str] = []
    for n, video in enumerate(videos, 1):
        todo = [q for q in by_video[video] if q.qid not in done]
        if not todo:
            continue
        t0 = time.perf_counter()
        emit = lambda q, text, info: writer.write(_record(q, text, info, cfg, ctx.rank))  # noqa: E731
        try:
            if cfg.mode == "stream":
                run_stream(iter_frames(paths[video], cfg.fps, cfg.size), todo, stop_times[video], factory(), emit,
                           cfg.chunk_frames, cfg.max_new_tokens, session_key=video, top_logits=cfg.top_logits,
                           proactive=cfg.forward_mode == "proactive")
            else:
                # run_clips calls open_frames only during this call; bind `video` explicitly anyway.
                run_clips(lambda video=video: iter_frames(paths[video], cfg.fps, cfg.size), todo, factory, emit,
                          cfg.chunk_frames, cfg.max_new_tokens, session_key=video, top_logits=cfg.top_logits)
        except Exception as exc:
            if cfg.raise_errors:
                raise
            errors.append(f"{video}: {type(exc).__name__}: {exc}")
            log(f"[rank {ctx.rank}] ERROR on {video}:\n{traceback.format_exc()}")
            continue
        log(f"[rank {ctx.rank}] {n}/{len(videos)} {video}: {len(todo)} questions in "
            f"{time.perf_counter() - t0:.1f} s")
    return errors


def _finish(cfg, chosen, found, missing, invalid, errors, out: Path, log, wall_s: float) -> dict:
    records, bad = store.load_predictions(out)
    ours = [records[q.qid] for q in chosen if q.qid in records]
    store.write_jsonl(out / "all_predictions.jsonl", ours)
    scores = scoring.score_questions(chosen, {r["qid"]: r["response"] for r in ours}, cfg.strict)
    config = {k: v for k, v in asdict(cfg).items() if k not in ("raise_errors",) and v not in (None, {}, [])}
    report = {"config": config, "scores": scores, "usage": scoring.aggregate_usage(ours),
              "missing_videos": len(missing), "missing_questions": sum(1 for q in chosen if q.video not in found),
              "invalid_questions": invalid, "unreadable_lines": bad, "errors": errors, "wall_s": wall_s}
    if cfg.forward_mode == "proactive":
        report["forward_modes"] = proactive.compare(chosen, {r["qid"]: r for r in ours}, cfg.strict)
    table = scoring.markdown_table(report) + (
        "\n" + proactive.markdown(report["forward_modes"]) if "forward_modes" in report else "")
    store.write_atomic(out / "scores.json", json.dumps(report, indent=2) + "\n")
    store.write_atomic(out / "scores.md", table)
    log(table)
    return report


def evaluate(cfg: EvalConfig, session_factory: SessionFactory | None = None,
             log: Callable[[str], None] | None = None) -> dict | None:
    """Run (or resume) the evaluation; returns the report on rank 0, None on other ranks.

    ``session_factory`` makes one session per video (stream mode) or per question (clip
    mode); by default it loads ``cfg.model`` on this rank's device. Nothing is written before
    the settings and the annotations are checked; rank 0 holds the output folder's lock
    (:func:`store.folder_lock`) until the scores are written, or the run fails.
    """
    cfg.validate()
    if cfg.videos is None or not Path(cfg.videos).is_dir():
        raise ValueError(f"--videos: expected the folder of the benchmark's videos, got {cfg.videos!r}")
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    start = time.perf_counter()
    ctx = sharding.init_distributed()
    try:
        every, chosen, ann = select_questions(cfg)
        found, missing = resolve_videos(chosen, cfg.videos)
        if chosen and not found:
            raise ValueError(f"--videos: none of the {len(missing)} videos of these questions is under "
                             f"{cfg.videos} (e.g. {missing[0]})")
        out = Path(cfg.out)
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
        with store.folder_lock(out) if ctx.is_main else nullcontext():
            return _run(cfg, ctx, every, chosen, ann, found, missing, out, session_factory, log, start)
    finally:
        sharding.shutdown(ctx)


def _run(cfg, ctx, every, chosen, ann, found, missing, out: Path, session_factory, log, start) -> dict | None:
    invalid = invalid_count(cfg, ann)
    if ctx.is_main:
        store.check_config(out, cfg.result_key(), write=True)
        for stale in out.glob("errors.rank*.txt"):  # failures of an earlier attempt are retried
            stale.unlink()
        for name in ("missing_videos.txt", "invalid_annotations.txt"):
            (out / name).unlink(missing_ok=True)
        if missing:
            skipped = sum(1 for q in chosen if q.video not in found)
            (out / "missing_videos.txt").write_text("".join(v + "\n" for v in missing), encoding="utf-8")
            log(f"{len(missing)} of {len(missing) + len(found)} videos missing under {cfg.videos}: "
                f"{skipped} questions skipped (list in {out / 'missing_videos.txt'}), e.g. {missing[:3]}")
        if ann.problems:
            (out / "invalid_annotations.txt").write_text("".join(p + "\n" for p in ann.problems), encoding="utf-8")
            for line in _shown(ann.problems):
                log(f"warning: skipped: {line}")
            log(f"{_plural(invalid, 'invalid question')} skipped (list in {out / 'invalid_annotations.txt'})")
    sharding.barrier(ctx)  # nobody writes before the configuration check passed

    by_video: dict[str, list[Question]] = defaultdict(list)
    for q in chosen:
        if q.video in found:
            by_video[q.video].append(q)
    stop_times: dict[str, set] = defaultdict(set)
    for q in every:
        stop_times[q.video].add(ask_time(q))
    shards = sharding.assign_videos({v: len(qs) for v, qs in by_video.items()}, ctx.world_size)
    mine = shards[ctx.rank]
    done, _ = store.load_predictions(out)
    todo_count = sum(1 for v in mine for q in by_video[v] if q.qid not in done)
    log(f"[rank {ctx.rank}/{ctx.world_size}] {len(mine)} videos, {todo_count} questions to answer")
    errors: list[str] = []
    if todo_count:
        factory = session_factory or default_session_factory(cfg, sharding.rank_device(ctx, cfg.device))
        with store.PredictionWriter(store.prediction_path(out, ctx.rank, ctx.world_size)) as writer:
            errors = _run_videos(cfg, mine, by_video, stop_times, found, done, factory, writer, ctx, log)
    if errors:
        store.write_atomic(out / f"errors.rank{ctx.rank:03d}.txt", "\n".join(errors) + "\n")
    sharding.barrier(ctx)
    if not ctx.is_main:
        return None
    all_errors = []
    for p in sorted(out.glob("errors.rank*.txt")):
        all_errors += [line for line in p.read_text(encoding="utf-8").splitlines() if line]
    return _finish(cfg, chosen, found, missing, invalid, all_errors, out, log, time.perf_counter() - start)
