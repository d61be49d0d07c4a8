"""The load test of ``streampress serve`` (left out of the default run: ``pytest -m slow``):
8 concurrent streams at 2 fps for 60 s on the default random model, each asking a question
every 5 s over the Realtime WebSocket, through ``benchmarks/serve_load.py`` (a server in a
subprocess on a free loopback port). No answer is lost, memory is flat after warm-up, and
every frame is accounted for (ingested, dropped by the backlog policy, skipped or waiting)."""

from __future__ import annotations

import importlib.util
import signal
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("websockets")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"
SECONDS = 60
DEADLINE = 240


def load_bench():
    spec = importlib.util.spec_from_file_location("serve_load", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_eight_streams_at_2_fps_for_60_s():
    def expired(*_):
        raise TimeoutError(f"the load test took longer than {DEADLINE} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(DEADLINE)
    try:
        bench = load_bench()
        args = bench.parse_args(["--seconds", str(SECONDS), "--ask-every", "5", "--fps", "2"])
        r = bench.run_config(8, "dense", args, bench.clip_data_urls())
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    print(bench.table([r]))

    # every question got its answer
    assert r["questions"] >= 8 * (SECONDS // 5 - 1)
    assert r["lost"] == 0 and r["answered"] == r["questions"], (r["answers"], r["errors"][:3])
    assert not r["errors"], r["errors"][:3]
    # every frame sent is accounted for: ingested, dropped (counted), skipped or still waiting
    assert r["frames_sent"] == 8 * SECONDS * 2 == r["frames_received"]
    assert r["frames_rejected"] == 0
    assert (r["frames_ingested"] + r["frames_dropped"] + r["frames_skipped"] + r["frames_waiting_end"]
            == r["frames_received"])
    assert r["frames_ingested"] > 0.5 * r["frames_sent"], "the server ingested under half the frames"
    # memory flat after warm-up (each stream keeps a 10 s window): within 10 % of the RSS then
    assert r["rss_growth_after_warmup_mib"] is not None
    assert r["rss_growth_after_warmup_mib"] < max(32.0, 0.1 * r["rss_warm_mib"]), r["samples"]
    assert r["server_exit_code"] == 0  # SIGTERM: a clean exit
