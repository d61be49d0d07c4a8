"""The speed report: ratios to dense, Markdown, terminal table, JSON and plot from a result
dict (no model), plus the synthetic video, peak-memory probe and one tiny in-process run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from streampress.bench.report import add_ratios, render_markdown, render_table, write_report
from streampress.bench.runner import PeakMemory, RunSpec, default_runs, run_bench
from streampress.bench.synthetic import synthetic_video
from streampress.formatting import format_bytes


def _run(name, encode, prune, prefill, ttft, kept, kv, peak, method=None, params=None, cacher=None):
    return {"name": name, "method": method, "params": params or {}, "cacher": cacher, "frames": 8,
            "encode_ms": encode, "prune_ms": prune, "prefill_ms": prefill, "total_ms": encode + prune + prefill,
            "ttft_ms": ttft, "tokens_seen": 1024, "tokens_kept": kept, "kv_bytes": kv, "peak_bytes": peak,
            "answer": "a red disc"}


@pytest.fixture
def result():
    return {
        "config": {"model": "random:test", "device": "cpu (test)", "dtype": "float32", "frames": 8,
                   "frame_size": [336, 336], "fps": 1.0, "question": "What moves?", "keep_ratio": 0.25,
                   "peak_memory": "process RSS", "peak_memory_short": "peak = RSS"},
        "runs": [
            _run("dense", 100.0, 0.01, 300.0, 200.0, 1024, 4 * 2**20, 2**30),
            _run("stc", 100.0, 2.0, 98.0, 50.0, 256, 2**20, 2**30 - 2**20, "stc", {"keep_ratio": 0.25}),
            _run("dense+cacher", 60.0, 0.01, 300.0, 210.0, 1024, 4 * 2**20, 2**30, cacher={"rho": 0.25}),
        ],
    }


def test_ratios_by_hand(result):
    add_ratios(result)
    dense, stc, cached = result["runs"]
    assert dense["ratios"]["total_ms"] == 1.0 and dense["speedup"] == 1.0
    assert stc["ratios"]["prefill_ms"] == pytest.approx(98 / 300)
    assert stc["ratios"]["tokens_kept"] == 0.25 and stc["ratios"]["kv_bytes"] == 0.25
    assert stc["ratios"]["ttft_ms"] == 0.25
    assert stc["speedup"] == pytest.approx(400.01 / 200.0)
    assert cached["ratios"]["encode_ms"] == pytest.approx(0.6)
    assert cached["speedup"] == pytest.approx(400.01 / 360.01)
    assert all(r["ratios"]["prune_ms"] is None for r in result["runs"])  # dense does no pruning


def test_ratios_need_exactly_one_dense(result):
    result["runs"][0]["name"] = "baseline"
    with pytest.raises(ValueError, match="exactly one run named 'dense'"):
        add_ratios(result)
    result["runs"][0]["name"] = result["runs"][1]["name"] = "dense"
    with pytest.raises(ValueError, match="found 2"):
        add_ratios(result)
    with pytest.raises(ValueError, match="non-empty list"):
        add_ratios({"runs": []})


def test_markdown_rows_carry_ratios(result):
    text = render_markdown(result)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| run"))
    assert "prefill (ms/frame)" in header and "speedup" in header
    stc_row = next(line for line in lines if line.startswith("| stc "))
    assert "keep_ratio=0.25" in stc_row
    assert "98.0 (0.33x)" in stc_row and "256 (0.25x)" in stc_row and "1.0 MiB (0.25x)" in stc_row
    assert stc_row.rstrip().endswith("| 2.00x |")
    cacher_row = next(line for line in lines if line.startswith("| dense+cacher "))
    assert "cacher(rho=0.25)" in cacher_row and "60.0 (0.60x)" in cacher_row
    assert "- device: cpu (test), dtype float32" in text and "peak memory: process RSS" in text
    assert sum(line.startswith("| ") for line in lines) == 1 + 3  # header + one row per run


def test_terminal_table_fits_80_columns(result):
    from rich.console import Console

    console = Console(record=True, width=80)
    console.print(render_table(result))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text  # nothing truncated
    for needle in ("dense", "stc", "0.33x", "2.00x", "256", "0.25x", "1024.0"):
        assert needle in text


def test_write_report_files(result, tmp_path):
    paths = write_report(result, tmp_path / "out")
    assert sorted(p.name for p in paths.values()) == ["bench.json", "bench.md", "bench.png"]
    saved = json.loads(paths["json"].read_text())
    assert [r["name"] for r in saved["runs"]] == ["dense", "stc", "dense+cacher"]
    assert saved["runs"][1]["ratios"]["tokens_kept"] == 0.25
    assert paths["md"].read_text() == render_markdown(saved)
    with Image.open(paths["png"]) as png:
        assert png.format == "PNG" and png.size[0] >= 1200 and png.size[1] >= 800
        pixels = np.asarray(png.convert("L"))
    assert pixels.std() > 20  # something is drawn


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 2**30) == "3.0 GiB"
    assert format_bytes(None) == "-"


def test_synthetic_video_has_motion_and_a_static_stretch():
    frames, times = synthetic_video(16, size=(64, 48), fps=2.0)
    assert frames.shape == (16, 48, 64, 3) and frames.dtype == np.uint8
    assert times == [i / 2 for i in range(16)]
    changed = [bool((frames[i] != frames[i + 1]).any()) for i in range(15)]
    # 4 identical frames in the middle (6..9): 3 unchanged transitions, motion elsewhere
    assert changed == [True] * 6 + [False] * 3 + [True] * 6
    again, _ = synthetic_video(16, size=(64, 48), fps=2.0)
    assert np.array_equal(frames, again)
    with pytest.raises(ValueError, match="num_frames"):
        synthetic_video(0)


def test_peak_memory_sees_a_large_allocation():
    memory = PeakMemory("cpu")
    memory.reset()
    before = memory.peak()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    after = memory.peak()
    del block
    assert after - before >= 60 * 2**20
    assert "RSS" in memory.kind


def test_default_runs_match_the_budget():
    runs = default_runs(["stc", "dtd", "streaming-assistant"], 0.3, {"rho": 0.5, "interval": 2})
    assert [r.name for r in runs] == ["dense", "stc", "dtd", "streaming_assistant", "dense+cacher"]
    assert all(r.params == {"keep_ratio": 0.3} for r in runs[1:4])
    assert runs[-1].method is None and runs[-1].cacher == {"rho": 0.5, "interval": 2}
    with pytest.raises(ValueError, match="unknown pruning method"):
        default_runs(["nope"], 0.3, None)


def test_run_bench_tiny_model_in_process():
    import streampress

    model = streampress.load_model("random:qwen2.5-vl-tiny")
    frames, times = synthetic_video(5, size=(56, 56))  # 5 frames -> 2 items of 2 frames
    runs = [RunSpec("dense"), RunSpec("random", "random", {"keep_ratio": 0.5})]
    result = run_bench(model, frames, times, runs, max_new_tokens=2)
    dense, rnd = result["runs"]
    assert result["config"]["frames"] == 4 and result["config"]["frame_size"] == [56, 56]
    # Qwen2.5-VL-tiny smart-resizes 56x56 up to at least min_pixels; tokens follow the grid
    per_item = dense["tokens_seen"] // 2
    assert dense["tokens_kept"] == dense["tokens_seen"] and dense["frames"] == 4
    assert rnd["tokens_kept"] == 2 * math.ceil(0.5 * per_item)
    assert rnd["kv_bytes"] < dense["kv_bytes"] and rnd["kv_tokens"] < dense["kv_tokens"]
    for row in result["runs"]:
        assert row["encode_ms"] > 0 and row["prefill_ms"] > 0 and row["ttft_ms"] > 0 and row["peak_bytes"] > 0
        assert row["stats"]["encode_ms"]["n"] == 2 and len(row["samples"]["ttft_ms"]) == 3  # 2 items, 3 asks
        assert row["stats"]["encode_ms"]["min"] <= row["encode_ms"] <= row["stats"]["encode_ms"]["max"]
    assert set(result["noise"]) == {"controls", "noisy", "threshold", "message"}
    assert list(result["noise"]["controls"]) == ["random"]  # a pruner without the cacher: same encoder work
    with pytest.raises(ValueError, match="dense baseline"):
        run_bench(model, frames, times, runs[1:])
