"""The GPU suite (``benchmarks/gpu_suite.py``) rehearsed on the CPU, so that no device minute
is lost to a typo: every step runs at tiny sizes with the GPU run's argument wiring, the GPU
run's own commands are parsed by their scripts' parsers, and the report is written and parses.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402


def _tiny_mp4(path: Path, frames: int = 8, side: int = 112, fps: int = 2) -> None:
    av = pytest.importorskip("av")
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        base = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 4 * i, axis=1), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.mark.slow  # ~30 s: run by .ci/run's slow step; the device commands' flags are checked by default
@pytest.mark.skipif(not hasattr(os, "fork"), reason="the rehearsal forks its steps")
def test_rehearsal_runs_every_step(tmp_path):
    clips, out, work = tmp_path / "clips", tmp_path / "out", tmp_path / "work"
    clips.mkdir()
    _tiny_mp4(clips / "clip.mp4")
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--rehearse", "--fork",
                           "--clips", str(clips), "--out", str(out), "--work", str(work)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    seconds = time.perf_counter() - t0
    report = json.loads((out / "suite.json").read_text())
    steps = report["steps"]
    failed = {k: (v["status"], v.get("reason"), v.get("log_tail", "")[-1500:]) for k, v in steps.items()
              if v["status"] != "ok"}
    assert not failed, failed
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(steps) == gpu_suite.STEP_NAMES
    assert report["clips"] == ["clip.mp4"] and not report["synthetic_clips"]
    for name, step in steps.items():
        assert step["result"], name
        assert step["rc"] == 0 and not step["timed_out"] and step["seconds"] > 0, name
    # The GPU run's commands parse with their scripts' own parsers (nothing run).
    assert set(report["gpu_args_check"]) == set(gpu_suite.STEP_NAMES)
    assert all(v["ok"] for v in report["gpu_args_check"].values()), report["gpu_args_check"]
    # Each step did what the GPU run will do, at tiny size.
    assert steps["pytest"]["result"]["passed"] > 0 and steps["pytest"]["result"]["failed"] == 0
    fast = {(x["method"], x["path"]): x for x in steps["pruning"]["result"]["fast_paths"]}
    assert "CUDA" in fast[("streaming_assistant", "cudagraph")]["skipped"]  # skipped with its reason
    assert fast[("streaming_assistant", "compile")]["masks_match_eager"]
    assert steps["vit_cache"]["result"]["clips"][0]["clip"] == "clip.mp4"
    prefill = steps["prefill"]["result"]["sessions"]
    assert [s["session"] for s in prefill][0] == "dense" and len(prefill) == 4
    assert all(s["ttft_ms_median"] > 0 for s in prefill)
    assert {s["policy"] for s in steps["long_stream"]["result"]["summary"]} == {"full", "window", "retrieval",
                                                                                 "infinipot", "hermes"}
    assert steps["bench"]["result"]["runs"] and "| dense |" in steps["bench"]["result"]["markdown"]
    # The output folder is what the device tool brings back: at most 8 files, plain names, flat.
    files = sorted(p.name for p in out.iterdir())
    assert {"suite.json", "suite.md", "suite.log"} <= set(files) and len(files) <= 8, files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) and (out / f).is_file() for f in files)
    md = (out / "suite.md").read_text()
    assert all(f"## {name}:" in md for name in gpu_suite.STEP_NAMES)
    print(f"rehearsal: {seconds:.1f} s")


def test_launcher_records_exit_codes_and_timeouts(tmp_path):
    ok = gpu_suite.Step("ok", "ok", [sys.executable, "-c", "print('hello')"], 10)
    rc, timed_out, _ = gpu_suite.run_step(ok, dict(os.environ), 30, tmp_path / "ok.log")
    assert (rc, timed_out) == (0, False) and "hello" in (tmp_path / "ok.log").read_text()
    bad = gpu_suite.Step("bad", "bad", [sys.executable, "-c", "raise SystemExit(3)"], 10)
    assert gpu_suite.run_step(bad, dict(os.environ), 30, tmp_path / "bad.log")[:2] == (3, False)
    slow = gpu_suite.Step("slow", "slow", [sys.executable, "-c", "import time; time.sleep(60)"], 10)
    t0 = time.perf_counter()
    rc, timed_out, _ = gpu_suite.run_step(slow, dict(os.environ), 1, tmp_path / "slow.log")
    assert rc is None and timed_out and time.perf_counter() - t0 < 30


def test_argument_check_catches_a_bad_flag(tmp_path):
    script = tmp_path / "tool.py"
    script.write_text("import argparse\np = argparse.ArgumentParser()\np.add_argument('--reps', type=int)\n"
                      "p.parse_args()\nraise SystemExit(7)  # never reached when checking\n")
    code = ("import sys, os; sys.path.insert(0, {b!r}); import gpu_suite\n"
            "from pathlib import Path\n"
            "for i, argv in enumerate([['--reps', '3'], ['--no-such-flag'], ['--reps', 'x']]):\n"
            "    pid = os.fork()\n"
            "    if pid == 0:\n"
            "        log = Path({t!r}) / f'{{i}}.log'\n"
            "        gpu_suite._check_child([sys.executable, {s!r}] + argv, dict(os.environ), log)\n"
            "    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n"
            ).format(b=str(ROOT / "benchmarks"), s=str(script), t=str(tmp_path))
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["0", "2", "2"], out.stderr


def test_synthetic_clips_are_image_folders(tmp_path):
    (folder,) = gpu_suite.synthetic_clips(tmp_path, 1, 4, 56)
    assert sorted(p.name for p in folder.iterdir()) == [f"frame_{i:04d}.png" for i in range(4)]
    from streampress.video import open_video

    with open_video(folder, fps=2) as source:
        assert len([f.image for f in source]) == 4


def test_acceptance_checks_read_the_results():
    row = {"method": "streaming_assistant", "params": {}, "shape": [16, 16, 3584], "dtype": "bfloat16",
           "device": "cuda", "median_ms": 0.2}
    steps = {
        "pruning": {"result": {"results": [row, {**row, "method": "stc", "median_ms": 0.05}],
                               "fast_paths": [{**row, "path": "compile", "median_ms": 0.08,
                                               "masks_match_eager": True}]}},
        "vit_cache": {"result": {"meta": {"ratio_total": 0.8}}},
        "prefill": {"result": {"sessions": [{"session": "dense", "kept_fraction": 1, "ratio": 1},
                                            {"session": "sa(keep_ratio=0.1)", "kept_fraction": 0.1, "ratio": 0.15}]}},
    }
    checks = gpu_suite.acceptance(steps)
    assert [c["pass"] for c in checks] == [True, True, False, True]
    assert "compile" in checks[0]["value"] and "eager" in checks[1]["value"]
    assert all(c["pass"] is None for c in gpu_suite.acceptance({})[:3])


def test_tie_check_of_the_cuda_pruner_test(monkeypatch):
    import streampress
    import test_gpu

    pruner = streampress.create_pruner("streaming_assistant", keep_ratio=0.5)
    x = torch.randn(2, 4, 4, 16)
    pruner(x[:1])
    snap = pruner.snapshot()
    keep = pruner(x[1:])
    scores, _ = pruner.score(pruner._validated(x[1:]), snap[2])
    s = scores.flatten()
    order = s.argsort()
    k = int(keep.sum())
    last_kept, first_dropped = int(order[k - 1]), int(order[k])
    gap = float(s[first_dropped] - s[last_kept])
    diff = torch.zeros(16, dtype=torch.bool)
    diff[[last_kept, first_dropped]] = True  # the device swapped the two tokens at the boundary
    diff = diff.view(1, 4, 4)
    monkeypatch.setattr(test_gpu, "SCORE_TIE", gap * 1.01)
    assert test_gpu.explained_by_ties(pruner, snap, x[1:], keep, diff)[0]
    monkeypatch.setattr(test_gpu, "SCORE_TIE", gap * 0.5)
    assert not test_gpu.explained_by_ties(pruner, snap, x[1:], keep, diff)[0]
    far = torch.zeros(16, dtype=torch.bool)
    far[int(order[0])] = True  # the most clearly kept token
    monkeypatch.setattr(test_gpu, "SCORE_TIE", 1e-4)
    assert not test_gpu.explained_by_ties(pruner, snap, x[1:], keep, far.view(1, 4, 4))[0]
