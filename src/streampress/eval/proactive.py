"""OVO-Bench's forward-active tasks (REC, SSR, CRR) answered proactively, beside probe mode.

Why: the forward tasks ask "when" as much as "what". Probe mode (the published protocol)
asks the model at every annotated time (``test_info[].realtime``); a live assistant would
rather hold the question and speak when its scene changes (:mod:`streampress.watch`). This
module runs both on one stream and scores both with the official forward rules, so the
accuracy lost or kept and the model calls saved are measured on the same frames.

**Watches.** Before the first frame, each distinct forward prompt of a video becomes one
``session.watch``: the question is the probe-mode prompt of its task, unchanged
(:func:`~streampress.eval.prompts.build_prompt`); SSR and CRR watches are yes/no watches (the
session lists "A. Yes / B. No" after the prompt and reads the letter logits), REC watches
answer in free text (``max_new_tokens`` as probe mode). SSR items hold one watch per step
(each step is its own prompt). Default :class:`~streampress.watch.Trigger`, no
``min_interval``. A watch is cancelled once its last annotated time of the run has passed.

**The scoring rule.** Each annotated time ``t`` is scored with the watch's most recent
answer at or before ``t``: the answer of its newest probe (probes run after the chunk whose
items fired, so every probe already counted at ``t`` saw only frames up to ``t``). For a
free-text watch that is the last answer it emitted; a yes/no watch also turns back to "No"
silently (it announces only "Yes"), and that "No" stands too. Before the watch's first
probe the response is the empty string, which the official scorer marks wrong for every
forward task (REC: no digits, so never equal to the count; SSR/CRR: neither "Yes" nor
"No" in it).

**Model calls.** Probe mode: one per annotated time. Proactive: ``watch.probes`` of each
watch up to its last annotated time, summed.

Timing note: the stream is cut into chunks at every annotated time (probe mode needs it) and
every ``chunk_frames`` frames; a watch decides after each chunk, so a probe runs at most
``chunk_frames`` frames after the item that fired it. ``--chunk-frames 2`` (one Qwen
temporal patch) gives live latency.
"""

from __future__ import annotations

import hashlib
from collections import Counter

from .datasets import OVO_CATEGORIES, Question
from .prompts import build_prompt, is_correct, parse_response

FORWARD_MODES = ("probe", "proactive")
FORWARD_TASKS = OVO_CATEGORIES["forward"]
RULE = ("each annotated time is scored with the watch's most recent probe answer at or before it; "
        "before its first probe the response is empty, which the official scorer marks wrong")


def is_forward(q: Question) -> bool:
    return q.benchmark == "ovobench" and q.task in FORWARD_TASKS


def watch_key(q: Question) -> str:
    """Which watch answers ``q``: its video and its prompt (one watch per distinct prompt)."""
    return f"{q.video}#{hashlib.sha1(build_prompt(q).encode()).hexdigest()[:12]}"


class Watches:
    """The watches of one video's forward questions on one session (register before any frame)."""

    def __init__(self, session, questions: list[Question], max_new_tokens: int):
        self._watch: dict[str, object] = {}
        self._left: Counter = Counter()  # questions of each watch not yet answered
        for q in questions:
            if not is_forward(q):
                continue
            key = watch_key(q)
            if key not in self._watch:
                self._watch[key] = session.watch(build_prompt(q), yes_no=q.task != "REC",
                                                 max_new_tokens=max_new_tokens)
            self._left[key] += 1

    def answer(self, q: Question) -> dict:
        """The proactive answer standing now for ``q`` (call at ``q``'s time); cancels the
        watch after its last question."""
        key = watch_key(q)
        w = self._watch[key]
        text = w.last_text if w.probes and w.last_text is not None else ""
        self._left[key] -= 1
        if not self._left[key]:
            w.cancel()
        return {"proactive_response": text, "proactive_time": w.probe_times[-1][0] if w.probes else None,
                "watch": key, "watch_probes": w.probes}

    def covers(self, q: Question) -> bool:
        return is_forward(q) and watch_key(q) in self._watch


def annotate(record: dict, q: Question, strict: bool) -> dict:
    """Add the proactive answer's parse and correctness to a prediction record."""
    if "proactive_response" in record:
        text = record["proactive_response"]
        record["proactive_parsed"] = parse_response(q, text, strict)
        record["proactive_correct"] = is_correct(q, text, strict)
    return record


def compare(questions: list[Question], records: dict[str, dict], strict: bool = False) -> dict:
    """Forward accuracy per task, category mean and model calls, probe mode vs proactive,
    over the forward questions answered in both modes."""
    fwd = [q for q in questions if is_forward(q) and "proactive_response" in records.get(q.qid, {})]
    modes: dict[str, dict] = {}
    for mode, field in (("probe", "response"), ("proactive", "proactive_response")):
        tasks = {}
        for task in FORWARD_TASKS:
            ok = [is_correct(q, records[q.qid][field], strict) for q in fwd if q.task == task]
            if ok:
                tasks[task] = {"correct": sum(ok), "total": len(ok), "accuracy": sum(ok) / len(ok)}
        accs = [t["accuracy"] for t in tasks.values()]
        modes[mode] = {"tasks": tasks, "forward": sum(accs) / len(accs) if accs else None}
    probes: dict[str, tuple[str, int]] = {}  # watch -> (task, its probes up to its last question)
    for q in fwd:
        r = records[q.qid]
        probes[r["watch"]] = (q.task, max(probes.get(r["watch"], ("", 0))[1], int(r["watch_probes"])))
    for task in modes["probe"]["tasks"]:
        modes["probe"]["tasks"][task]["model_calls"] = modes["probe"]["tasks"][task]["total"]
        modes["proactive"]["tasks"][task]["model_calls"] = sum(n for t, n in probes.values() if t == task)
        modes["proactive"]["tasks"][task]["watches"] = sum(t == task for t, _ in probes.values())
    modes["probe"]["model_calls"] = len(fwd)
    modes["proactive"]["model_calls"] = sum(n for _, n in probes.values())
    modes["proactive"]["watches"] = len(probes)
    return {"questions": len(fwd), **modes, "rule": RULE,
            "labels": {"probe": "probe: the model asked at every annotated time (official protocol)",
                       "proactive": "proactive: one watch per prompt, answers only when its trigger fires"}}


def markdown(cmp: dict) -> str:
    """The side-by-side table of :func:`compare`."""
    def pct(x):
        return "-" if x is None else f"{100 * x:.2f}"

    p, a = cmp["probe"], cmp["proactive"]
    lines = ["## Forward-active tasks: probe mode vs proactive", "",
             f"- {cmp['labels']['probe']}", f"- {cmp['labels']['proactive']}",
             f"- scoring: official forward rules; {cmp['rule']}",
             "- the score tables above are probe mode for every task", "",
             "| task | questions | probe acc (%) | proactive acc (%) | probe calls | proactive calls (watches) |",
             "|---|---:|---:|---:|---:|---:|"]
    for task, pt in p["tasks"].items():
        at = a["tasks"][task]
        lines.append(f"| {task} | {pt['total']} | {pct(pt['accuracy'])} | {pct(at['accuracy'])} | "
                     f"{pt['model_calls']} | {at['model_calls']} ({at['watches']}) |")
    lines += [f"| **forward (mean of tasks)** | {cmp['questions']} | **{pct(p['forward'])}** | "
              f"**{pct(a['forward'])}** | {p['model_calls']} | {a['model_calls']} ({a['watches']}) |", ""]
    return "\n".join(lines) + "\n"
