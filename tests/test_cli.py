"""The ``streampress`` command, run as a subprocess on small generated videos and tiny models."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streampress.cli import Question, main, parse_param, parse_question, parse_size
from test_video import make_video  # the same synthetic clips as the video tests

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = "random:qwen2.5-vl-tiny"


def cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # tiny models: threads only add overhead on a shared 2-core machine
    return subprocess.run([sys.executable, "-m", "streampress.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("streampress: error: ") and "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return make_video(tmp_path_factory.mktemp("cli") / "clip.mp4", n=60, rate=10)  # 6 s


# ---------------------------------------------------------------------------- parsing (in process)
def test_argument_parsers():
    assert parse_question("12.5: What is on the table?") == Question(12.5, "What is on the table?")
    assert parse_question("1:05: what: exactly?") == Question(65.0, "what: exactly?")
    assert parse_question("0:01:02.5 : Where?") == Question(62.5, "Where?")
    assert parse_question("end: Summary?").time == math.inf
    assert parse_param("tau=0.5") == ("tau", 0.5) and parse_param("window=null") == ("window", None)
    assert parse_param("name=abc") == ("name", "abc")
    assert parse_size("448") == 448 and parse_size("448x336") == (448, 336)
    import argparse

    for bad, fn in (("What?", parse_question), ("tau", parse_param), ("0x4", parse_size), ("big", parse_size)):
        with pytest.raises(argparse.ArgumentTypeError):
            fn(bad)


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
    assert out["video"]["frame_count"] == 60 and out["video"]["kind"] == "file"


def test_run_text_with_window_memory_and_cacher(video, capsys):
    # In process (the same main() the entry point calls): one model build serves the next tests.
    rc = main(["run", str(video), "--model", TINY, "--fps", "2", "--memory", "window:1.5", "--cacher",
               "--ask", "2: What moves?", "--ask", "5.5: And now?", "--max-new-tokens", "2", "-q"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "[2.0 s] Q: What moves?" in out and "[5.5 s] Q: And now?" in out
    assert out.count("    A: ") == 2 and "statistics:" in out
    assert "frames: 12" in out and "memory: window" in out
    evicted = int(out.split("evicted_items: ")[1].split()[0])
    assert evicted >= 3  # 6 items of 1 s each; only the last 1.5 s of video stay in the cache


def test_run_errors_are_one_line(video, tmp_path, capsys):
    missing = one_error_line(cli("run", str(tmp_path / "nope.mp4"), "--model", TINY, "--ask", "1: Q?"))
    assert "nope.mp4: no such file" in missing
    (tmp_path / "noise.mp4").write_bytes(os.urandom(4000))
    corrupt = one_error_line(cli("run", str(tmp_path / "noise.mp4"), "--model", TINY, "--ask", "1: Q?"))
    assert "noise.mp4" in corrupt and "not a readable video" in corrupt
    unknown = one_error_line(cli("run", str(video), "--model", TINY, "--method", "nope", "--ask", "1: Q?"))
    assert "unknown pruning method 'nope'" in unknown
    debug = cli("run", str(tmp_path / "nope.mp4"), "--model", TINY, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    # cut short after a valid header: fails while streaming, naming the frame (in process)
    good = make_video(tmp_path / "long.mp4", n=40, faststart=True).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(good[: len(good) // 2])
    rc = main(["run", str(tmp_path / "cut.mp4"), "--model", TINY, "--fps", "2", "--max-new-tokens", "1",
               "--ask", "0.5: Q?", "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err and err.startswith("streampress: error: ")
    assert "cut.mp4" in err and "at frame" in err


def test_run_bad_arguments_exit_2(video):
    proc = cli("run", str(video), "--model", TINY, "--ask", "no time here")
    assert proc.returncode == 2 and "expected 'SECONDS: question'" in proc.stderr
    proc = cli("run", str(video), "--model", TINY, "--options", "a;b")
    assert proc.returncode == 2 and "--options must follow" in proc.stderr
    proc = cli("run", str(video), "--model", TINY, "--keep-ratio", "0")
    assert proc.returncode == 2 and "positive" in proc.stderr
    proc = cli("run", str(video), "--model", TINY, "--memory", "window:-3")
    assert "window:SECONDS" in one_error_line(proc)


# ---------------------------------------------------------------------------- bench
def test_bench_tiny_writes_table_json_and_png(tmp_path):
    out = tmp_path / "report"
    proc = cli("bench", "--model", TINY, "--frames", "4", "--size", "56", "--methods", "random,stc",
               "--keep-ratio", "0.5", "--no-cacher", "--out", str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in out.iterdir()} == {"bench.json", "bench.md", "bench.png"}
    result = json.loads((out / "bench.json").read_text())
    assert [r["name"] for r in result["runs"]] == ["dense", "random", "stc"]
    dense, rnd, stc = result["runs"]
    assert rnd["tokens_kept"] == stc["tokens_kept"] < dense["tokens_kept"] == dense["tokens_seen"]
    assert rnd["ratios"]["tokens_kept"] == pytest.approx(rnd["tokens_kept"] / dense["tokens_kept"])
    assert result["config"]["frames"] == 4 and result["config"]["keep_ratio"] == 0.5
    assert "RSS" in result["config"]["peak_memory"]
    for needle in ("streampress bench", "dense", "random", "stc", "speedup", "bench.png"):
        assert needle in proc.stdout


def test_bench_rejects_unknown_method_before_loading(tmp_path):
    line = one_error_line(cli("bench", "--methods", "random,bogus", "--out", str(tmp_path)))
    assert "bogus" in line
    assert not (tmp_path / "bench.json").exists()


# ---------------------------------------------------------------------------- eval dispatch
def test_eval_is_dispatched():
    proc = cli("eval", "--help")
    assert proc.returncode == 0 and "--annotations" in proc.stdout and "streampress eval" in proc.stdout
    assert cli("--help").stdout.count("eval") >= 1
