"""The ``streampress`` command end to end, on small generated videos and tiny random models
(as subprocesses where the process boundary matters: exit status, stderr, no network)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streampress.cli import main
from test_video import make_video  # the same synthetic clips as the video tests

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = "random:qwen2.5-vl-tiny"


def cli(*args: str, module: str = "streampress.cli", env: dict | None = None, timeout: float = 120):
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # tiny models: threads only add overhead on a shared 2-core machine
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess, prefix: str = "streampress: error: ") -> str:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(prefix) and "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return make_video(tmp_path_factory.mktemp("cli") / "clip.mp4", n=60, rate=10)  # 6 s, 64x48


# ---------------------------------------------------------------------------- list
def test_list_is_fast_and_imports_no_torch():
    code = ("import io, sys, contextlib; from streampress.cli import main\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf): rc = main(['list', '--json'])\n"
            "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
            "print(buf.getvalue())")
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    first, _, payload = proc.stdout.partition("\n")
    assert first == "0 False False", proc.stderr
    data = json.loads(payload)
    methods = {m["name"]: m["params"] for m in data["methods"]}
    assert methods["streaming_assistant"]["tau_t"] == 0.2 and "keep_ratio" in methods["stc"]
    assert data["cacher"] == {"rho": 0.25, "interval": 2, "refresh_threshold": None}
    qwen = next(f for f in data["families"] if f["name"] == "qwen")
    assert "qwen2.5-vl-tiny" in qwen["random_archs"] and "qwen2_5_vl" in qwen["model_types"]

    text = cli("list")
    assert text.returncode == 0
    for needle in ("streaming_assistant", "tau_t=0.2", "STC-Cacher", "random:qwen2.5-vl-7b"):
        assert needle in text.stdout


# ---------------------------------------------------------------------------- run
def test_run_json_answers_each_question_at_its_time(video):
    proc = cli("run", str(video), "--model", TINY, "--method", "random", "--keep-ratio", "0.5",
               "--ask", "3: Which colour?", "--options", "red;green;blue",
               "--ask", "1.5: What moves?", "--ask", "end: Anything else?", "--max-new-tokens", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    answers = out["answers"]
    assert [a["time"] for a in answers] == [1.5, 3.0, None]  # sorted by time; "end" last
    assert [a["frames_seen"] for a in answers] == [2, 4, 6]  # frames at 0,1 | 0..3 | 0..5 (1 fps)
    assert answers[1]["options"] == ["red", "green", "blue"] and answers[1]["choice"] in ("A", "B", "C")
    assert answers[0]["choice"] is None and all(isinstance(a["answer"], str) for a in answers)
    stats = out["stats"]
    assert stats["frames"] == 6 and stats["items"] == 3 and stats["questions"] == 3
    per_item = stats["visual_tokens_seen"] // 3
    assert stats["visual_tokens_kept"] == 3 * math.ceil(per_item / 2)
    assert out["method"] == {"name": "random", "params": {"keep_ratio": 0.5, "seed": 0}}
    assert out["video"]["frame_count"] == 60 and out["video"]["kind"] == "file" and out["memory"] == "full"
    # stderr is no terminal here: one progress line per stage, no bar
    assert proc.stderr.splitlines() == [f"streampress run: loading {TINY}", "streampress run: streaming 6 frames"]


def test_run_text_with_window_memory_cacher_and_size_note(video, capsys):
    # In process (the same main() the entry point calls): one model build serves the next tests.
    rc = main(["run", str(video), "--model", TINY, "--fps", "2", "--memory", "window:1.5", "--cacher",
               "--size", "56x56", "--ask", "2: What moves?", "--ask", "5.5: And now?", "--max-new-tokens", "2", "-q"])
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0
    assert "[2.0 s] Q: What moves?" in out and "[5.5 s] Q: And now?" in out and "56x56" in out
    assert out.count("    A: ") == 2 and "statistics:" in out
    assert "frames: 12" in out and "memory: window" in out and "memory window:1.5" in out
    evicted = int(out.split("evicted_items: ")[1].split()[0])
    assert evicted >= 3  # 6 items of 1 s each; only the last 1.5 s of video stay in the cache
    assert captured.err.strip() == ("streampress run: note: --size 56x56 changes the aspect ratio of the 64x48 "
                                    "video; give one number (the longer side) to keep it")


def test_run_retrieval_memory_end_to_end(video):
    proc = cli("run", str(video), "--model", TINY, "--memory", "retrieval:window=4,top_k=2",
               "--ask", "end: What happened first?", "--max-new-tokens", "2", "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    stats = out["stats"]
    assert out["memory"] == "retrieval:window=4,top_k=2,block_items=1" and stats["memory"] == "retrieval"
    assert stats["offloaded_items"] >= 1 and stats["retrieved_blocks_last"] >= 1
    assert out["answers"][0]["frames_seen"] == 6 and proc.stderr == ""


def test_run_builtin_synthetic_clip_and_questions_file(tmp_path, capsys):
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps([{"time": "0:02", "question": "What moves?"},
                                     {"time": "end", "question": "Which shape?", "options": ["disc", "box"]}]))
    rc = main(["run", "synthetic:4", "--model", TINY, "--size", "56", "--questions", str(questions),
               "--max-new-tokens", "1", "--json", "-q"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["video"]["kind"] == "synthetic" and out["stats"]["frames"] == 4
    assert [a["time"] for a in out["answers"]] == [2.0, None] and out["answers"][1]["choice"] in ("A", "B")


def test_run_out_is_written_as_answers_come_and_a_cut_video_keeps_them(tmp_path, capsys):
    good = make_video(tmp_path / "long.mp4", n=40, faststart=True).read_bytes()  # 4 s at 10 fps
    (tmp_path / "cut.mp4").write_bytes(good[: len(good) // 2])
    answers = tmp_path / "answers.jsonl"
    rc = main(["run", str(tmp_path / "cut.mp4"), "--model", TINY, "--fps", "2", "--max-new-tokens", "1",
               "--ask", "0: First?", "--ask", "0.2: Second?", "--ask", "3.5: After the break?",
               "--out", str(answers), "-q"])  # decoding breaks after 0.7 s: frames at 0 and 0.5 s
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 1 and "\n" not in err and err.startswith("streampress: error: ")
    assert "cut.mp4" in err and "at frame" in err
    lines = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["question"] for r in lines] == ["First?", "Second?"]  # given before the break, kept
    assert captured.out.count("    A: ") == 2
    # --json prints what was answered, with the error
    rc = main(["run", str(tmp_path / "cut.mp4"), "--model", TINY, "--fps", "2", "--max-new-tokens", "1",
               "--ask", "0.2: First?", "--ask", "3.5: After the break?", "--json", "-q"])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert rc == 1 and [a["question"] for a in out["answers"]] == ["First?"] and "at frame" in out["error"]


def test_run_errors_are_one_line(video, tmp_path):
    missing = one_error_line(cli("run", str(tmp_path / "nope.mp4"), "--model", TINY, "--ask", "1: Q?"))
    assert "nope.mp4: no such file" in missing
    (tmp_path / "noise.mp4").write_bytes(os.urandom(4000))
    corrupt = one_error_line(cli("run", str(tmp_path / "noise.mp4"), "--model", TINY, "--ask", "1: Q?"))
    assert "noise.mp4" in corrupt and "not a readable video" in corrupt
    debug = cli("run", str(tmp_path / "nope.mp4"), "--model", TINY, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    bad = cli("run", str(video), "--model", TINY, "--ask", "1:75: Q?")
    line = one_error_line(bad, "streampress run: error: ")
    assert bad.returncode == 2 and "'1:75' is no time" in line and "see 'streampress run --help'" in line


def test_a_hub_id_without_network_fails_fast_with_one_line(video, tmp_path):
    started = time.perf_counter()
    proc = cli("run", str(video), "--model", "Qwen/Qwen2.5-VL-7B-Instruct", "--ask", "1: Q?",
               env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")})
    line = one_error_line(proc)
    assert proc.returncode == 1 and time.perf_counter() - started < 10
    assert "not in the local cache" in line and "--model DIR" in line


# ---------------------------------------------------------------------------- bench
@pytest.mark.slow  # ~10 s: run by .ci/run's slow step
def test_bench_tiny_writes_table_json_and_png_with_progress_lines(tmp_path):
    out = tmp_path / "report"
    proc = cli("bench", "--model", TINY, "--frames", "4", "--size", "56", "--method", "random,stc",
               "--keep-ratio", "0.5", "--no-cacher", "--max-new-tokens", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in out.iterdir()} == {"bench.json", "bench.md", "bench.png"}
    result = json.loads((out / "bench.json").read_text())
    assert [r["name"] for r in result["runs"]] == ["dense", "random", "stc"]
    dense, rnd, stc = result["runs"]
    assert rnd["tokens_kept"] == stc["tokens_kept"] < dense["tokens_kept"] == dense["tokens_seen"]
    assert result["config"]["frames"] == 4 and result["config"]["keep_ratio"] == 0.5
    assert result["config"]["max_new_tokens"] == 2
    for needle in ("streampress bench", "dense", "random", "stc", "bench.png"):
        assert needle in proc.stdout
    # stderr is no terminal: one line per stage, no progress bar
    lines = proc.stderr.splitlines()
    assert lines[:2] == ["streampress bench: preparing frames", f"streampress bench: loading {TINY}"]
    assert len(lines) <= 6 and all(line.startswith("streampress bench: ") for line in lines)


def test_bench_rejects_unknown_method_before_loading(tmp_path):
    proc = cli("bench", "--method", "random,bogus", "--out", str(tmp_path))
    line = one_error_line(proc, "streampress bench: error: ")
    assert proc.returncode == 2 and "bogus" in line
    assert not (tmp_path / "bench.json").exists()


# ---------------------------------------------------------------------------- eval
def test_eval_is_one_command_with_two_entry_points(tmp_path):
    for module in ("streampress.cli", "streampress.eval"):
        args = ("eval", "--help") if module == "streampress.cli" else ("--help",)
        proc = cli(*args, module=module)
        assert proc.returncode == 0 and "--annotations" in proc.stdout and "streampress eval" in proc.stdout
        assert "--memory SPEC" in proc.stdout and "--cacher-rho RHO" in proc.stdout
    proc = cli("ovobench", "--annotations", "a.json", "--window", "3", module="streampress.eval")
    assert proc.returncode == 2 and "--memory window:SECONDS" in one_error_line(proc, "streampress eval: error: ")


def test_eval_without_any_video_exits_non_zero(tmp_path, capsys):
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps([{"id": 0, "task": "EPM", "video": "COIN/aaa.mp4", "realtime": 1.0,
                                "question": "q?", "options": ["w", "x", "y", "z"], "gt": 1}]))
    (tmp_path / "videos").mkdir()
    rc = main(["eval", "ovobench", "--annotations", str(ann), "--videos", str(tmp_path / "videos"),
               "--model", TINY, "--memory", "window:4", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err == (f"streampress eval: error: --videos: none of the 1 videos of these questions is "
                               f"under {tmp_path / 'videos'} (e.g. COIN/aaa.mp4)")
    assert not (tmp_path / "out").exists()


def test_eval_passes_memory_and_size_to_its_sessions(tmp_path):
    from streampress.cli import parse_args
    from streampress.cli.eval import config_from_args
    from streampress.eval.runner import default_session_factory

    (tmp_path / "a.json").write_text("[]")
    args = parse_args(["eval", "ovobench", "--annotations", str(tmp_path / "a.json"), "--model", TINY,
                       "--memory", "retrieval:window=4,top_k=2", "--size", "56"])
    cfg = config_from_args(args)
    assert cfg.memory == {"name": "retrieval", "window_seconds": 4.0, "top_k": 2, "block_items": 1}
    assert cfg.size == 56 and cfg.result_key()["memory"] == cfg.memory
    session = default_session_factory(cfg, "cpu")()
    assert session.stats()["memory"] == "retrieval"
