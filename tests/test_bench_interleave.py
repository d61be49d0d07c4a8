"""The honest bench: dense and methods interleaved per item, medians with their spread, paired
ratios, and the same-work control that flags a noisy machine (times injected through a fake
session clock, so the checks do not depend on this machine's speed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import streampress
from streampress.bench.report import noise_check, render_markdown, render_table, write_report
from streampress.bench.runner import RunSpec, run_bench, step_order, summarize, summarize_runs
from streampress.bench.synthetic import synthetic_video
from streampress.session import StreamingSession


@pytest.fixture(scope="module")
def tiny():
    return streampress.load_model("random:qwen2.5-vl-tiny")


def test_step_order_rotates_and_reverses():
    orders = [step_order(4, k) for k in range(8)]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    assert orders[:4] == [[0, 1, 2, 3], [3, 2, 1, 0], [1, 2, 3, 0], [0, 3, 2, 1]]
    assert {o[0] for o in orders} == {0, 1, 2, 3}  # every run goes first at some step
    # dense (0) runs both right before and right after run 1
    assert any(o.index(1) == o.index(0) + 1 for o in orders) and any(o.index(1) == o.index(0) - 1 for o in orders)


def test_summarize_known_samples():
    s = summarize([5.0, 10.0, 15.0, 20.0])
    assert s == {"median": 12.5, "q1": 8.75, "q3": 16.25, "min": 5.0, "max": 20.0, "n": 4}
    assert summarize([3.0, 1.0, 2.0])["median"] == 2.0
    # cacher-like: reference items ~105, dependent ~31; the plain median (68 here by luck,
    # 100 with one more reference) is replaced by the size-weighted mean of the two medians
    g = summarize([100.0, 30.0, 110.0, 32.0], [True, False, True, False])
    assert g["median"] == pytest.approx((105 + 31) / 2)
    assert (g["q1"], g["q3"]) == (pytest.approx(68 - 2), pytest.approx(68 + 2))  # deviations -5,-1,1,5
    g = summarize([100.0, 30.0, 110.0, 32.0, 105.0], [True, False, True, False, True])
    assert g["median"] == pytest.approx((3 * 105 + 2 * 31) / 5)
    with pytest.raises(ValueError):
        summarize([])


def test_summarize_runs_paired_ratios():
    # 2 runs, 4 samples, stages (encode, prune, prefill) in ms per frame
    dense = np.array([[10, 0, 20], [20, 0, 20], [10, 0, 40], [40, 0, 20]], float)
    method = dense * [1.0, 1, 0.5] + [0, 1, 0]
    method[3, 0] = 80.0  # one slow spell hits only the method: the median pair ignores it
    rows = summarize_runs(["dense", "m"], np.stack([dense, method]), np.zeros((2, 4), bool),
                          np.array([[100.0, 110, 90], [50.0, 60, 45]]))
    d, m = rows
    assert d["encode_ms"] == 15.0 and d["paired_ratios"]["encode_ms"]["median"] == 1.0
    assert m["paired_ratios"]["encode_ms"]["median"] == 1.0 and m["paired_ratios"]["prefill_ms"]["median"] == 0.5
    assert m["encode_ms"] == 15.0 and m["stats"]["encode_ms"]["max"] == 80.0
    assert m["paired_ratios"]["ttft_ms"]["median"] == pytest.approx(0.5)
    assert "prune_ms" not in m["paired_ratios"] and m["samples"]["total_ms"][0] == 10 + 1 + 10
    assert d["ttft_ms"] == 100.0 and d["stats"]["ttft_ms"]["n"] == 3


# Per item (seconds): encoder, pruning, prefill, as the fake session clock reports them.
ENCODE = [0.010, 0.020, 0.030, 0.040]


@pytest.fixture
def fake_clock(monkeypatch):
    """Replace the session's stage clock: item k of run R takes ENCODE[k] * factor[R] in the
    encoder, 1 ms pruning and 5 ms prefill; add_frames calls are logged in order."""
    factors, log = {}, []

    def clock(self):
        calls = self.__dict__.setdefault("_fake_calls", 0)
        self._fake_calls += 1
        item, phase = divmod(calls, 4)  # _add_items reads the clock 4 times per item
        name = self.pruner.name if self.pruner is not None else "dense"
        encode = [e * factors.get(name, 1.0) for e in ENCODE]
        start = sum(encode[:item]) + 0.006 * item
        return start + [0.0, encode[item], encode[item] + 0.001, encode[item] + 0.006][phase]

    original = StreamingSession.add_frames

    def add_frames(self, frames, timestamps):
        log.append(self.pruner.name if self.pruner is not None else "dense")
        return original(self, frames, timestamps)

    monkeypatch.setattr(StreamingSession, "_clock", clock)
    monkeypatch.setattr(StreamingSession, "add_frames", add_frames)
    return factors, log


@pytest.mark.parametrize("factor, noisy", [(1.2, True), (1.05, False)])
def test_run_bench_interleaves_and_flags_noise(tiny, fake_clock, factor, noisy, tmp_path):
    factors, log = fake_clock
    factors["random"] = factor
    frames, times = synthetic_video(8, size=(56, 56))  # 4 items of 2 frames
    runs = [RunSpec("dense"), RunSpec("random", "random", {"keep_ratio": 0.5}),
            RunSpec("uniform", "uniform", {"keep_ratio": 0.5})]
    steps = []
    result = run_bench(tiny, frames, times, runs, max_new_tokens=1, asks=2,
                       on_step=lambda i, kind: steps.append((i, kind)))
    # warm-up (2 items) then 4 items: every item goes to all runs back to back, rotated order
    measured = log[6:]
    assert len(measured) == 12
    for k in range(4):
        block = measured[3 * k:3 * k + 3]
        assert block == [["dense", "random", "uniform"][i] for i in step_order(3, k)]
    assert measured[:3] != ["dense"] * 3 and measured[0] != measured[3]  # not one run after another
    assert [i for i, kind in steps if kind == "ask"] == step_order(3, 4) + step_order(3, 5)

    dense, rnd, uni = result["runs"]
    per_frame = [1000 * e / 2 for e in ENCODE]  # 5, 10, 15, 20 ms per frame
    assert dense["samples"]["encode_ms"] == pytest.approx(per_frame)
    assert dense["encode_ms"] == pytest.approx(12.5)
    assert dense["stats"]["encode_ms"]["q1"] == pytest.approx(8.75)
    assert dense["stats"]["encode_ms"]["q3"] == pytest.approx(16.25)
    assert dense["prefill_ms"] == pytest.approx(2.5) and dense["prune_ms"] == pytest.approx(0.5)
    assert rnd["encode_ms"] == pytest.approx(12.5 * factor)
    assert rnd["paired_ratios"]["encode_ms"]["median"] == pytest.approx(factor)
    assert len(dense["samples"]["ttft_ms"]) == 2 and result["config"]["samples_per_run"] == 4

    noise = result["noise"]
    assert noise["threshold"] == 0.1 and noise["noisy"] is noisy
    assert noise["controls"] == {"random": pytest.approx(factor), "uniform": pytest.approx(1.0)}
    paths = write_report(result, tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert saved["noise"]["noisy"] is noisy and saved["runs"][1]["stats"]["encode_ms"]["n"] == 4
    assert ("machine too noisy" in paths["md"].read_text()) is noisy
    assert ("machine too noisy" in _table_text(saved)) is noisy


def _table_text(result) -> str:
    from rich.console import Console

    console = Console(record=True, width=80)
    console.print(render_table(result))
    return console.export_text()


def _row(name, encode, method=None, cacher=None, paired=None):
    stats = {key: {"median": v, "q1": 0.9 * v, "q3": 1.1 * v, "min": 0.8 * v, "max": 1.3 * v, "n": 4}
             for key, v in (("encode_ms", encode), ("prune_ms", 0.5), ("prefill_ms", 100.0),
                            ("total_ms", encode + 100.5), ("ttft_ms", 120.0))}
    run = {"name": name, "method": method, "params": {}, "cacher": cacher, "frames": 8, "stats": stats,
           **{k: s["median"] for k, s in stats.items()}, "tokens_seen": 576, "tokens_kept": 576,
           "kv_bytes": 2**20, "peak_bytes": 2**30, "answer": "x"}
    if paired is not None:
        run["paired_ratios"] = {"encode_ms": {"median": paired}, "total_ms": {"median": 0.8}}
    return run


def _result(*runs):
    return {"config": {"model": "random:test", "device": "cpu (test)", "frames": 8}, "runs": list(runs)}


def test_noise_check_threshold_and_messages():
    # paired ratio wins over the ratio of medians (which would say 1.0 here)
    noisy = _result(_row("dense", 200.0), _row("stc", 200.0, "stc", paired=0.85))
    check = noise_check(noisy)
    assert check["noisy"] is True and check["controls"] == {"stc": 0.85}
    assert check["message"].startswith("machine too noisy") and "stc 0.85x" in check["message"]
    quiet = _result(_row("dense", 200.0), _row("stc", 212.0, "stc"), _row("dtd", 190.0, "dtd"))
    check = noise_check(quiet)
    assert check["noisy"] is False and check["controls"] == {"stc": 1.06, "dtd": 0.95}
    assert "within" in check["message"]
    # the cacher changes the encoder work: not a control
    none = _result(_row("dense", 200.0), _row("dense+cacher", 60.0, cacher={"rho": 0.25}))
    check = noise_check(none)
    assert check["noisy"] is None and check["controls"] == {}
    assert "no same-work control available" in check["message"]
    assert "no same-work control available" in render_markdown(none)


def test_table_shows_spread_warning_and_control_row_in_80_columns():
    names = ["streaming_assistant", "stc", "dtd", "random"]
    result = _result(_row("dense", 528.0), *[_row(n, 185.0, n, paired=0.35) for n in names],
                     _row("dense+cacher", 150.0, cacher={"rho": 0.25}))
    text = _table_text(result)
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    assert "machine too noisy" in text and "same-work control" in text
    assert "+-10%" in text  # half the interquartile range (0.9..1.1 of the median)
    md = render_markdown(result)
    assert "**machine too noisy" in md and "528.0 +-10% (1.00x)" in md
    assert result["runs"][1]["ratios"]["encode_ms"] == 0.35 and result["runs"][1]["speedup"] == 1 / 0.8
