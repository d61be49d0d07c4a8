"""Evaluation input is checked before anything runs: annotation entries, options, the output folder.

Every bad entry gives one error line naming the file, the entry and the field; ``--skip-invalid``
runs the valid rest and counts the skipped ones; options are checked before a model loads or
``run_config.json`` is written; a lock file keeps two runs out of one ``--out``.
"""

import json
import math
import subprocess
import sys

import pytest

import streampress
from streampress.cli import main
from streampress.eval import runner
from streampress.eval.datasets import Question, load_benchmark, parse_timestamp, resolve_videos
from streampress.eval.protocol import run_stream
from streampress.eval.runner import EvalConfig, evaluate
from streampress.eval.scoring import markdown_table, score_questions
from streampress.eval.store import load_predictions
from test_eval_runner import FakeSession, frames, make_video, q

MODEL = "random:qwen2.5-vl-tiny"
PREFIX = "streampress eval: error: "


def eval_main(argv):
    return main(["eval", *argv])


def mcq(i, video="COIN/aaa.mp4", **kw):
    entry = {"id": i, "task": "EPM", "video": video, "realtime": 1.0 + 0.25 * i, "question": f"q{i}?",
             "options": ["w", "x", "y", "z"], "gt": i % 4}
    entry.update(kw)
    return entry


def write(path, data):
    path.write_text(json.dumps(data))  # json.dumps writes NaN / Infinity literals, as json.load reads them
    return path


def errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


@pytest.fixture
def videos(tmp_path):
    root = tmp_path / "videos"
    make_video(root / "COIN" / "aaa.mp4", 3, seed=1)
    return root


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model is a failure: bad input must be refused before."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(streampress, "load_model", boom)


@pytest.fixture
def fake_model(monkeypatch):
    monkeypatch.setattr(runner, "default_session_factory", lambda cfg, device: FakeSession)


# ---- annotation entries -------------------------------------------------------------------

def test_broken_file_gives_one_line_per_problem_and_runs_nothing(tmp_path, videos, no_model, capsys):
    ann = write(tmp_path / "broken.json", [
        mcq(0),
        mcq(1, realtime=math.nan),
        mcq(2, options="w, x, y, z"),
        {k: v for k, v in mcq(3).items() if k != "question"},
        mcq(4),
    ])
    out = tmp_path / "out"
    rc = eval_main(["ovobench", "--annotations", str(ann), "--videos", str(videos), "--model", MODEL,
                    "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    lines = errors(err)
    assert all(line.startswith(PREFIX) for line in lines)
    assert lines[:3] == [
        f"{PREFIX}{ann}: entry 1 (id 1, video COIN/aaa.mp4): field 'realtime': "
        "expected a finite number of seconds >= 0 or 'HH:MM:SS', got NaN",
        f"{PREFIX}{ann}: entry 2 (id 2, video COIN/aaa.mp4): field 'options': "
        "expected a list of option texts (strings), got \"w, x, y, z\"",
        f"{PREFIX}{ann}: entry 3 (id 3, video COIN/aaa.mp4): field 'question': missing",
    ]
    assert len(lines) == 4 and "--skip-invalid" in lines[3] and "2 valid questions" in lines[3]
    assert not out.exists()  # nothing written, nothing run


@pytest.mark.parametrize("change,field,expected", [
    (dict(realtime=math.inf), "realtime", "expected a finite number of seconds >= 0 or 'HH:MM:SS', got Infinity"),
    (dict(realtime=-2), "realtime", "got -2"),
    (dict(realtime=True), "realtime", "got true"),
    (dict(realtime="soon"), "realtime", "got \"soon\""),
    (dict(options=["w", None]), "options", "expected a list of option texts (strings), got [\"w\", null]"),
    (dict(options=[]), "options", "expected a list of option texts"),
    (dict(video=None), "video", "expected a video path (a string), got null"),
    (dict(video="../../etc/x.mp4"), "video", "expected a path inside the --videos folder, got"),
    (dict(gt=4), "gt", "expected an option index 0..3, got 4"),
    (dict(gt="B"), "gt", "expected an option index 0..3, got \"B\""),
    (dict(task="XYZ"), "task", "expected an OVO-Bench task (EPM, ASI, HLD"),
    (dict(id=None), "id", "expected an integer or a string, got null"),
])
def test_each_ovo_problem_names_entry_and_field(tmp_path, change, field, expected):
    ann = write(tmp_path / "a.json", [mcq(0), mcq(1, **change)])
    with pytest.raises(ValueError) as exc:
        load_benchmark("ovobench", ann)
    first = str(exc.value).splitlines()[0]
    assert first.startswith(f"{ann}: entry 1 (")
    assert f"field '{field}': " in first and expected in first


def test_forward_items_and_probes(tmp_path):
    rec = {"id": 7, "task": "REC", "video": "p/v.mp4", "start_times": [1], "end_times": [2],
           "test_info": [{"realtime": 1, "count": 0}, {"realtime": math.nan, "count": 1},
                         {"realtime": 3, "count": "x"}]}
    ssr = {"id": 8, "task": "SSR", "video": "c/v.mp4", "test_info": [{"realtime": 1, "step": "s", "type": 2}]}
    crr = {"id": 9, "task": "CRR", "video": "m/v.mp4", "question": "q?", "test_info": "soon"}
    with pytest.raises(ValueError) as exc:
        load_benchmark("ovobench", write(tmp_path / "f.json", [rec, ssr, crr, mcq(10)]))
    lines = str(exc.value).splitlines()
    where = f"{tmp_path / 'f.json'}: entry"
    assert lines[:5] == [
        f"{where} 0 (id 7, video p/v.mp4): field 'activity': missing",  # today: a KeyError traceback
        f"{where} 0 (id 7, video p/v.mp4): field 'test_info[1].realtime': "
        "expected a finite number of seconds >= 0 or 'HH:MM:SS', got NaN",
        f"{where} 0 (id 7, video p/v.mp4): field 'test_info[2].count': expected a count (an integer >= 0), got \"x\"",
        f"{where} 1 (id 8, video c/v.mp4): field 'test_info[0].type': expected 0 (No) or 1 (Yes), got 2",
        f"{where} 2 (id 9, video m/v.mp4): field 'test_info': expected a non-empty list of probes, got \"soon\"",
    ]


def test_streamingbench_problems_name_video_and_question(tmp_path):
    good = {"task_type": "Counting", "question": "How many?", "time_stamp": "00:00:01", "answer": "A",
            "options": ["A. 1.", "B. 2.", "C. 3.", "D. 4."], "required_ability": "episodic memory"}
    entries = [{"video_path": "./videos/a.mp4", "questions": [good, {**good, "time_stamp": math.nan},
                                                               {**good, "answer": "E"}, {**good, "options": "A. 1."}]},
               {"video_path": None, "questions": [good]}]
    with pytest.raises(ValueError) as exc:
        load_benchmark("streamingbench", write(tmp_path / "sb.json", entries))
    lines = str(exc.value).splitlines()
    f = tmp_path / "sb.json"
    assert lines[:4] == [
        f"{f}: video 0 (videos/a.mp4) question 1: field 'time_stamp': "
        "expected a finite number of seconds >= 0 or 'HH:MM:SS', got NaN",
        f"{f}: video 0 (videos/a.mp4) question 2: field 'answer': expected an option letter A..D, got \"E\"",
        f"{f}: video 0 (videos/a.mp4) question 3: field 'options': "
        "expected a list of option texts (strings), got \"A. 1.\"",
        f"{f}: video 1: field 'video_path': expected a video path (a string), got null",
    ]


def test_ground_truth_outside_the_options_is_reported(tmp_path):
    with pytest.raises(ValueError, match=r"entry 0 \(id 0, video v.mp4\): field 'gt': expected an option index 0..1"):
        load_benchmark("ovobench", write(tmp_path / "o.json", [mcq(0, video="v.mp4", options=["a", "b"], gt=2)]))
    with pytest.raises(ValueError, match=r"entry 0 \(id x\): field 'answer': expected .*A..D"):
        load_benchmark("mcq", write(tmp_path / "m.json", [
            {"id": "x", "video": "v.mp4", "question": "?", "options": ["a", "b", "c", "d"], "answer": 7}]))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_timestamps_must_be_finite_and_not_negative(bad):
    with pytest.raises(ValueError, match="timestamp"):
        parse_timestamp(bad)


def test_video_paths_stay_inside_the_videos_folder(tmp_path):
    root = tmp_path / "videos"
    root.mkdir()
    (tmp_path / "secret.mp4").write_bytes(b"x")  # exists, but outside --videos
    escaping = Question(qid="x", benchmark="mcq", task="t", category="offline", video="../secret.mp4", time=None,
                        options=("a", "b"), answer="A")
    with pytest.raises(ValueError, match="inside the --videos folder"):
        resolve_videos([escaping], root)
    with pytest.raises(ValueError, match=r"entry 0 \(id 1\): field 'video': .*inside the --videos folder"):
        load_benchmark("mcq", write(tmp_path / "m.json", [
            {"id": 1, "video": "../secret.mp4", "question": "?", "options": ["a", "b"], "answer": 0}]))


def test_stream_refuses_a_nan_time_instead_of_dropping_later_questions():
    got = []
    with pytest.raises(ValueError, match="time"):
        run_stream(frames(10), [q("bad", math.nan), q("good", 2.0)], [], FakeSession(),
                   lambda qq, text, info: got.append(qq.qid))


def test_skip_invalid_answers_every_valid_question(tmp_path, videos, fake_model, capsys):
    entries = [mcq(0), mcq(1, realtime=math.nan), mcq(2), mcq(3, options=7), mcq(4), mcq(5, gt=9), mcq(6)]
    ann = write(tmp_path / "partly.json", entries)
    out = tmp_path / "out"
    rc = eval_main(["ovobench", "--annotations", str(ann), "--videos", str(videos), "--model", MODEL,
                    "--out", str(out), "--skip-invalid"])
    err = capsys.readouterr().err
    assert rc == 0, err
    recs, _ = load_predictions(out)
    assert sorted(recs) == ["ovo-0", "ovo-2", "ovo-4", "ovo-6"]  # every valid one, also those after a NaN
    report = json.loads((out / "scores.json").read_text())
    assert report["scores"]["answered"] == 4 and report["invalid_questions"] == 3
    assert report["scores"]["answered"] + report["invalid_questions"] + report["missing_questions"] == len(entries)
    listed = (out / "invalid_annotations.txt").read_text().splitlines()
    assert len(listed) == 3 and "entry 1 (id 1" in listed[0] and "field 'realtime'" in listed[0]
    assert "3 skipped: invalid annotation" in (out / "scores.md").read_text()
    assert "field 'gt'" in err  # the skipped problems are still shown


def test_dry_run_lists_the_problems_too(tmp_path, capsys):
    ann = write(tmp_path / "d.json", [mcq(0), mcq(1, realtime=math.nan)])
    assert eval_main(["ovobench", "--annotations", str(ann), "--dry-run"]) == 1
    assert "field 'realtime'" in capsys.readouterr().err
    assert eval_main(["ovobench", "--annotations", str(ann), "--dry-run", "--skip-invalid"]) == 0
    assert "1 invalid question skipped" in capsys.readouterr().out


# ---- options, run_config.json, the lock ---------------------------------------------------

@pytest.mark.parametrize("option,value,name", [
    ("--max-new-tokens", "0", "--max-new-tokens"), ("--fps", "inf", "--fps"), ("--cacher-rho", "0", "--cacher-rho"),
    ("--keep-ratio", "5", "--keep-ratio"), ("--memory", "window:inf", "--memory"),
    ("--cacher-interval", "0", "--cacher-interval"),
])
def test_options_are_checked_before_anything_runs(tmp_path, videos, no_model, capsys, option, value, name):
    ann = write(tmp_path / "a.json", [mcq(0)])
    out = tmp_path / "out"
    extra = ["--cacher"] if option.startswith("--cacher") else []
    rc = eval_main(["ovobench", "--annotations", str(ann), "--videos", str(videos), "--model", MODEL,
                    "--method", "streaming_assistant", "--out", str(out), option, value, *extra])
    lines = errors(capsys.readouterr().err)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(PREFIX) and name in lines[0], lines
    assert repr(value) in lines[0]  # the bad value is named
    assert not (out / "run_config.json").exists()


def test_a_corrected_rerun_on_the_same_out_works(tmp_path, videos, monkeypatch, capsys):
    ann = write(tmp_path / "a.json", [mcq(0), mcq(1)])

    def run(keep_ratio, model=MODEL):
        return eval_main(["ovobench", "--annotations", str(ann), "--videos", str(videos), "--model", model,
                          "--method", "streaming_assistant", "--keep-ratio", keep_ratio, "--out", str(tmp_path / "o")])

    assert run("5") == 2  # refused by the option check, before run_config.json
    assert run("0.5", model="random:no-such-model") == 2  # so is an unknown architecture
    capsys.readouterr()
    monkeypatch.setattr(runner, "default_session_factory", lambda cfg, device: FakeSession)
    assert run("0.5") == 0, capsys.readouterr().err
    # once answers exist, the folder is bound to their settings
    assert run("0.25") == 1
    assert "other settings" in capsys.readouterr().err


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_live_lock_stops_a_second_run(tmp_path, videos, fake_model, capsys):
    ann = write(tmp_path / "a.json", [mcq(0)])
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval.lock").write_text(f"{__import__('os').getpid()}\n")  # this very process: alive
    args = ["ovobench", "--annotations", str(ann), "--videos", str(videos), "--model", MODEL, "--out", str(out)]
    assert eval_main(args) == 1
    lines = errors(capsys.readouterr().err)
    assert len(lines) == 1 and "eval.lock" in lines[0] and "in use" in lines[0]
    assert not (out / "predictions.jsonl").exists() and (out / "eval.lock").exists()
    # a lock left by a dead process is taken over, and removed at the end
    (out / "eval.lock").write_text(f"{dead_pid()}\n")
    assert eval_main(args) == 0
    assert not (out / "eval.lock").exists()


def test_the_lock_is_held_during_the_run_and_released_on_interrupt(tmp_path, videos):
    import os

    ann = write(tmp_path / "a.json", [mcq(0)])
    out = tmp_path / "out"
    seen = []

    def interrupted():
        seen.append((out / "eval.lock").read_text().split()[0])
        raise KeyboardInterrupt

    cfg = EvalConfig(benchmark="ovobench", annotations=str(ann), videos=str(videos), out=str(out))
    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg, session_factory=interrupted, log=lambda s: None)
    assert seen == [str(os.getpid())] and not (out / "eval.lock").exists()


# ---- the OVO-Bench overall figures --------------------------------------------------------

def test_ovo_report_labels_both_overall_figures():
    def qq(qid, task, cat):
        return Question(qid=qid, benchmark="ovobench", task=task, category=cat, video="v.mp4", time=1.0,
                        options=("a", "b"), answer="A", inputs={"question": "?"})

    qs = [qq("1", "EPM", "backward"), qq("2", "ASI", "backward"), qq("3", "STU", "realtime")]
    s = score_questions(qs, {"1": "A", "2": "B", "3": "A"})
    assert s["overall"] == pytest.approx((0.5 + 1.0) / 2) and s["task_mean"] == pytest.approx(2 / 3)
    assert "papers" in s["labels"]["overall"] and "Total Avg." in s["labels"]["task_mean"]
    md = markdown_table({"scores": s})
    assert "| **overall: mean of the category means (backward, realtime), the papers' figure** | | **75.00** |" in md
    assert "| Total Avg.: mean of the task accuracies, the official scorer's figure | | 66.67 |" in md
