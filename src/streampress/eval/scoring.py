"""Scores as each benchmark defines them, and the final score table (JSON + Markdown).

- OVO-Bench: accuracy per task -> mean of the task accuracies per category (backward,
  real-time, forward) -> ``overall`` = mean of the category means, the figure the papers
  report. Beside it ``task_mean``, the mean of all task accuracies, which the official
  scorer prints as "Total Avg.". The two differ (the categories hold 3, 6 and 3 tasks),
  so both are reported, each with its label (``labels``), never a bare "overall".
- StreamingBench: accuracy per task type; overall = accuracy over all questions; also per
  required ability.
- Offline multiple choice: accuracy per task and per duration group; overall over all.
Accuracies are fractions in [0, 1]; the Markdown table shows percentages.
"""

from __future__ import annotations

from collections import defaultdict

from .datasets import OVO_CATEGORIES, Question
from .prompts import is_correct


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def score_questions(questions: list[Question], responses: dict[str, str | None],
                    strict: bool = False) -> dict:
    """Score the ``questions`` that have a response (``responses`` maps qid -> text)."""
    per_task: dict[str, list[int]] = defaultdict(list)
    per_group: dict[str, list[int]] = defaultdict(list)
    benchmark = questions[0].benchmark if questions else "unknown"
    for q in questions:
        if q.qid not in responses:
            continue
        ok = int(is_correct(q, responses[q.qid], strict))
        per_task[q.task].append(ok)
        if q.group:
            per_group[q.group].append(ok)
    tasks = {t: {"correct": sum(v), "total": len(v), "accuracy": sum(v) / len(v)}
             for t, v in sorted(per_task.items())}
    all_ok = [x for v in per_task.values() for x in v]
    out = {"benchmark": benchmark, "answered": len(all_ok), "expected": len(questions),
           "tasks": tasks, "strict_parse": strict}
    if benchmark == "ovobench":
        cats = {}
        for cat, names in OVO_CATEGORIES.items():
            accs = [tasks[t]["accuracy"] for t in names if t in tasks]
            if accs:
                cats[cat] = {"tasks": [t for t in names if t in tasks], "accuracy": _mean(accs)}
        out["categories"] = cats
        out["overall"] = _mean(c["accuracy"] for c in cats.values())
        out["task_mean"] = _mean(t["accuracy"] for t in tasks.values())
        names = ", ".join(cats) or "none answered"
        out["labels"] = {
            "overall": f"overall: mean of the category means ({names}), the papers' figure",
            "task_mean": "Total Avg.: mean of the task accuracies, the official scorer's figure"}
    else:
        out["groups"] = {g: {"correct": sum(v), "total": len(v), "accuracy": sum(v) / len(v)}
                         for g, v in sorted(per_group.items())}
        out["overall"] = _mean(all_ok)
    return out


_ADDITIVE = ("frames", "items", "questions", "visual_tokens_seen", "visual_tokens_kept", "evicted_items",
             "evicted_tokens", "watch_probes")
_PEAK = ("kv_cache_tokens", "kv_cache_bytes")


def aggregate_usage(records: list[dict]) -> dict:
    """Tokens and time over prediction records.

    Session counters are cumulative per session, so each session (one video in stream
    mode, one question in clip mode) counts once with its largest value; counts and
    seconds add up over sessions, KV-cache sizes are reported as the peak.
    """
    by_session: dict[str, dict] = {}
    elapsed = ask = 0.0
    for r in records:
        elapsed += float(r.get("elapsed_s") or 0.0)
        ask += float(r.get("ask_s") or 0.0)
        cur = by_session.setdefault(r.get("session", r["qid"]), {})
        for k, v in (r.get("stats") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                cur[k] = max(cur.get(k, v), v)
    totals: dict[str, float] = {}
    for s in by_session.values():
        for k, v in s.items():
            if k in _ADDITIVE or k.endswith("_seconds"):
                totals[k] = totals.get(k, 0) + v
            elif k in _PEAK:
                totals[f"peak_{k}"] = max(totals.get(f"peak_{k}", v), v)
    usage = {"sessions": len(by_session), "time_s": elapsed, "ask_time_s": ask,
             "stats": dict(sorted(totals.items()))}
    seen = totals.get("visual_tokens_seen")
    kept = totals.get("visual_tokens_kept")
    if seen:
        usage["visual_tokens_seen"] = int(seen)
        usage["visual_tokens_kept"] = int(kept or 0)
        usage["keep_fraction"] = (kept or 0) / seen
    return usage


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def markdown_table(report: dict) -> str:
    """The score report as Markdown: configuration, usage, then the scores."""
    s, cfg, usage = report["scores"], report.get("config", {}), report.get("usage", {})
    lines = [f"# {s['benchmark']} results", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in cfg.items()]
    invalid = report.get("invalid_questions", 0)
    skipped = [f"{report.get('missing_questions', 0)} skipped: video missing"]
    if invalid:
        skipped.append(f"{invalid} skipped: invalid annotation, see invalid_annotations.txt")
    lines += ["", f"Answered {s['answered']} of {s['expected'] + invalid} questions ({'; '.join(skipped)}).", ""]
    if usage:
        lines.append(f"Time: {usage.get('time_s', 0):.1f} s in {usage.get('sessions', 0)} sessions "
                     f"({usage.get('ask_time_s', 0):.1f} s answering); this run's wall clock "
                     f"{report.get('wall_s', 0):.1f} s.")
        if "visual_tokens_seen" in usage:
            lines.append(f"Visual tokens kept: {usage['visual_tokens_kept']} of {usage['visual_tokens_seen']}"
                         f" ({_pct(usage['keep_fraction'])}%).")
        lines.append("")
    lines += ["| task | correct | total | accuracy (%) |", "|---|---|---|---|"]
    lines += [f"| {t} | {v['correct']} | {v['total']} | {_pct(v['accuracy'])} |" for t, v in s["tasks"].items()]
    lines.append("")
    if "categories" in s:
        lines += ["| category | tasks | accuracy (%) |", "|---|---|---|"]
        lines += [f"| {c} | {', '.join(v['tasks'])} | {_pct(v['accuracy'])} |" for c, v in s["categories"].items()]
        lines += [f"| **{s['labels']['overall']}** | | **{_pct(s['overall'])}** |",
                  f"| {s['labels']['task_mean']} | | {_pct(s['task_mean'])} |"]
    else:
        lines += ["| group | correct | total | accuracy (%) |", "|---|---|---|---|"]
        lines += [f"| {g} | {v['correct']} | {v['total']} | {_pct(v['accuracy'])} |" for g, v in s["groups"].items()]
        correct = sum(v["correct"] for v in s["tasks"].values())
        lines.append(f"| **overall** | {correct} | {s['answered']} | **{_pct(s['overall'])}** |")
    return "\n".join(lines) + "\n"
