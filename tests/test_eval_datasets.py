"""Readers of the published annotation formats, video resolution and the dry run."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from streampress.cli import main
from streampress.eval.datasets import load_benchmark, parse_timestamp, read_offline_mcq, resolve_videos, summarize

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO.parent / "shared" / "data" / "benchmarks"
EPM_PATH = ("/mnt/data0/public/back/huggingface/hub/datasets--JoeLeelyf--OVO-Bench/snapshots/"
            "fec29e3385747b5642d995370143ba92d2819bd2/videos/chunked_videos/ec4a3ba3-eb00-4aa8-9b41-36043ece98f7.mp4")

# A few entries with the exact structure of the published files.
OVO_ENTRIES = [
    {"id": 0, "task": "EPM", "video": EPM_PATH, "realtime": 215, "question": "Who did I communicate to?",
     "answer": "a person with blue shirt", "options": ["brown", "green", "blue", "white"], "gt": 2},
    {"id": 631, "task": "STU", "video": "YouTube_Games/PLJ3VIGhVd3r8Int6IZT_v3S_BzG9RVfiG&index=1.mp4",
     "realtime": 17.5, "question": "Where is the giant?", "answer": "back", "options": ["front", "back"], "gt": 1},
    {"id": 1468, "task": "CRR", "video": "MovieNet/tt0048028.mp4", "question": "What does she do?",
     "answer": "walks past", "ask_time": 297, "clue_time": 308,
     "test_info": [{"realtime": 297, "type": 0}, {"realtime": 310, "type": 1}]},
    {"id": 1516, "task": "SSR", "video": "COIN/xZecGPPhbHE.mp4", "tutorial": "PutOnHairExtensions",
     "all_steps": ["pull up", "put on"], "start_time": [25, 31], "end_time": [30, 49],
     "test_info": [{"realtime": 27, "step": "pull up", "type": 1}, {"realtime": 26, "step": "put on", "type": 0}]},
    {"id": 1558, "task": "REC", "video": "perception_test/video_4017.mp4", "activity": "breaking something",
     "start_times": [6], "end_times": [17],
     "test_info": [{"realtime": 17, "count": 1}, {"realtime": 32.0, "count": 2}]},
]
SB_ENTRIES = [{"questions": [
    {"task_type": "Object Recognition", "question": "What is on the screen?", "time_stamp": "00:00:06",
     "answer": "B", "options": ["A. A compass.", "B. A map.", "C. A meter.", "D. A radar."],
     "required_ability": "working memory", "audio_path": "./audio/real/sample_416_00_00_06.wav",
     "time": "[0:00:00 - 0:00:20]"},
    {"task_type": "Causal Reasoning", "question": "Why?", "time_stamp": "02:05", "answer": "C",
     "options": ["A. a", "B. b", "C. c", "D. d"], "audio_path": "./audio/real/x.wav", "time": "0:00:00 - 0:00:30"},
], "video_path": "./videos/sample_416_real.mp4"}]


def eval_main(argv):
    return main(["eval", *argv])


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def test_ovobench_records(tmp_path):
    qs = load_benchmark("ovobench", write(tmp_path, "ovo.json", OVO_ENTRIES))
    by = {q.qid: q for q in qs}
    assert sorted(by) == sorted(["ovo-0", "ovo-631", "ovo-1468-p0", "ovo-1468-p1", "ovo-1516-p0", "ovo-1516-p1",
                                 "ovo-1558-p0", "ovo-1558-p1"])
    epm = by["ovo-0"]
    assert epm.video == "chunked_videos/ec4a3ba3-eb00-4aa8-9b41-36043ece98f7.mp4"
    assert (epm.answer, epm.time, epm.category, epm.options) == (
        "C", 215.0, "backward", ("brown", "green", "blue", "white"))
    assert by["ovo-631"].answer == "B" and by["ovo-631"].time == 17.5 and by["ovo-631"].category == "realtime"
    assert by["ovo-1468-p1"].answer == "Yes" and by["ovo-1468-p0"].answer == "No"
    assert by["ovo-1468-p1"].time == 310 and by["ovo-1468-p1"].inputs["question"] == "What does she do?"
    assert by["ovo-1516-p1"].inputs["step"] == "put on" and by["ovo-1516-p1"].time == 26
    assert by["ovo-1558-p1"].answer == 2 and by["ovo-1558-p1"].category == "forward"
    info = summarize(qs)
    assert info["tasks"]["REC"] == {"category": "forward", "items": 1, "questions": 2, "videos": 1}
    assert info["items"] == 5 and info["questions"] == 8


def test_streamingbench_records(tmp_path):
    qs = load_benchmark("streamingbench", write(tmp_path, "sb.json", SB_ENTRIES))
    assert [q.qid for q in qs] == ["sb-sample_416_real-q0", "sb-sample_416_real-q1"]
    assert qs[0].video == "videos/sample_416_real.mp4"
    assert qs[0].options == ("A compass.", "A map.", "A meter.", "A radar.")
    assert (qs[0].time, qs[1].time) == (6.0, 125.0)
    assert qs[0].answer == "B" and qs[0].group == "working memory" and qs[1].group == "unspecified"


@pytest.mark.parametrize("text,seconds", [("00:00:06", 6), ("0:02:37", 157), ("00:24", 24), ("00:00:8", 8),
                                          ("01:00:00", 3600), (88.43, 88.43), (17, 17.0)])
def test_timestamps(text, seconds):
    assert parse_timestamp(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "1:2:3:4", "ab:cd", None, "[0:00 - 0:20]"])
def test_bad_timestamps(bad):
    with pytest.raises(ValueError, match="timestamp"):
        parse_timestamp(bad)


def test_offline_formats(tmp_path):
    videomme = [{"video_id": "001", "duration": "short", "domain": "x", "videoID": "fFjv93ACGo8",
                 "question_id": "001-1", "task_type": "Counting Problem", "question": "How many?",
                 "options": ["A. 1.", "B. 2.", "C. 3.", "D. 4."], "answer": "C"}]
    qs = read_offline_mcq(write(tmp_path, "vm.json", videomme), "videomme")
    assert (qs[0].video, qs[0].qid, qs[0].answer, qs[0].time) == ("fFjv93ACGo8.mp4", "videomme-001-1", "C", None)
    assert qs[0].options == ("1.", "2.", "3.", "4.") and qs[0].task == "Counting Problem" and qs[0].group == "short"
    ego = [{"q_uid": "abc", "question": "What?", "option 0": "o0", "option 1": "o1", "option 2": "o2",
            "option 3": "o3", "option 4": "o4", "answer": 3}]
    q = read_offline_mcq(write(tmp_path, "ego.json", ego), "egoschema")[0]
    assert (q.video, q.answer, len(q.options), q.options[4]) == ("abc.mp4", "D", 5, "o4")
    (tmp_path / "g.jsonl").write_text(
        json.dumps({"video": "a/b.mp4", "question": "Q", "options": ["x", "y"], "answer": 1}) + "\n"
        + json.dumps({"video": "a/b.mp4", "question": "Q2", "candidates": ["x", "y"], "answer": "x",
                      "question_type": "plot"}) + "\n")
    g = read_offline_mcq(tmp_path / "g.jsonl", "mlvu")
    assert [x.answer for x in g] == ["B", "A"] and g[0].qid != g[1].qid and g[1].task == "plot"


def test_bad_annotations(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_benchmark("ovobench", tmp_path / "nope.json")
    with pytest.raises(ValueError, match="benchmark"):
        load_benchmark("nope", write(tmp_path, "a.json", []))
    with pytest.raises(ValueError, match=r"b.json: entry 0 \(id 1, video v.mp4\): field 'realtime': missing"):
        load_benchmark("ovobench", write(tmp_path, "b.json", [{"id": 1, "task": "EPM", "video": "v.mp4"}]))
    with pytest.raises(ValueError, match="field 'task': expected an OVO-Bench task"):
        load_benchmark("ovobench", write(tmp_path, "c.json", [{"id": 1, "task": "XYZ", "video": "v.mp4"}]))


def test_resolve_videos_and_missing(tmp_path):
    qs = load_benchmark("ovobench", write(tmp_path, "ovo.json", OVO_ENTRIES))
    root = tmp_path / "ovo_videos"
    (root / "chunked_videos").mkdir(parents=True)
    (root / "chunked_videos" / "ec4a3ba3-eb00-4aa8-9b41-36043ece98f7.mp4").write_bytes(b"x")
    (root / "COIN").mkdir()
    (root / "COIN" / "xZecGPPhbHE.mp4").write_bytes(b"x")
    (root / "video_4017.mp4").write_bytes(b"x")  # flat layout: found by dropping the folder
    found, missing = resolve_videos(qs, root)
    assert sorted(found) == ["COIN/xZecGPPhbHE.mp4", "chunked_videos/ec4a3ba3-eb00-4aa8-9b41-36043ece98f7.mp4",
                             "perception_test/video_4017.mp4"]
    assert found["perception_test/video_4017.mp4"] == root / "video_4017.mp4"
    assert sorted(missing) == ["MovieNet/tt0048028.mp4", "YouTube_Games/PLJ3VIGhVd3r8Int6IZT_v3S_BzG9RVfiG&index=1.mp4"]
    assert resolve_videos(qs, None)[0] == {}


def test_dry_run_cli(tmp_path, capsys):
    path = write(tmp_path, "ovo.json", OVO_ENTRIES)
    assert eval_main(["ovobench", "--annotations", str(path), "--dry-run", "--videos", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "total: 5 items, 8 questions (model calls), 5 videos" in out
    assert "videos present under" in out and "0 of 5 (8 questions would be skipped)" in out
    assert eval_main(["ovobench", "--annotations", str(tmp_path / "missing.json"), "--dry-run"]) == 1
    assert "no such file" in capsys.readouterr().err
    assert eval_main(["ovobench", "--annotations", str(path), "--videos", str(tmp_path)]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert eval_main(["ovobench", "--annotations", str(path), "--model", "random:qwen2.5-vl-tiny"]) == 1
    assert "videos: expected the folder" in capsys.readouterr().err
    assert eval_main(["ovobench", "--annotations", str(path), "--dry-run", "--fps", "0"]) == 2
    assert "fps" in capsys.readouterr().err


@pytest.mark.skipif(not BENCH.is_dir(), reason="../shared/data/benchmarks is not present")
def test_real_files_parse_with_published_counts():
    ovo = load_benchmark("ovobench", BENCH / "ovo_bench_new.json")
    items = {q.item_id for q in ovo}
    assert len(items) == 1640
    tasks = Counter(q.task for q in ovo)
    assert tasks["REC"] == 698 and tasks["SSR"] == 629 and tasks["CRR"] == 240 and tasks["EPM"] == 297
    assert len(ovo) == 1640 - (82 + 42 + 48) + 698 + 629 + 240
    assert all(not q.video.startswith("/") for q in ovo)
    sb = load_benchmark("streamingbench", BENCH / "streamingbench_real_stream.json")
    assert len(sb) == 2495 and len({q.video for q in sb}) == 498 and len(Counter(q.task for q in sb)) == 10
    assert all(q.answer in "ABCD" and len(q.options) == 4 for q in sb)
    # the command line, as a user runs it
    r = subprocess.run([sys.executable, "-m", "streampress.eval", "streamingbench", "--annotations",
                        str(BENCH / "streamingbench_real_stream.json"), "--dry-run"],
                       capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert r.returncode == 0, r.stderr
    assert "total: 2495 items, 2495 questions (model calls), 498 videos" in r.stdout
