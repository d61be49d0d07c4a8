"""OVO-Bench forward tasks in proactive mode: scores and model calls against hand-computed values.

Oracle: a synthetic video with cuts at known times (solid colour, texture, solid colour) and
answers forced through a hook on the tiny model's LM head, as a function of the stream time
the model has seen: "N"/"1" (and the letter B, "No", for yes/no watches) before 6.5 s,
"Y"/"2" (letter A, "Yes") from 6.5 s on. The trigger fires at the two cuts, so each watch
probes twice, and every score follows from the rule by hand (see ``test_forced_answers``).
"""

from __future__ import annotations

import json

import av
import numpy as np
import pytest

from _model_helpers import tiny
from streampress.cli import main
from streampress.eval.proactive import is_forward
from streampress.eval.runner import EvalConfig, dry_run, evaluate
from streampress.eval.store import load_predictions
from streampress.session import StreamingSession

MODEL = "random:qwen2.5-vl-tiny"
QUIET = lambda s: None  # noqa: E731
LATE = 6.5  # forced answers turn from No/1 to Yes/2 at this stream time


def cut_video(path, fps=2, size=112, seed=0):
    """12 s: solid colour [0, 4), a fixed texture [4, 8), another solid colour [8, 12)."""
    rng = np.random.default_rng(seed)
    looks = [np.full((size, size, 3), rng.integers(0, 256, 3), dtype=np.uint8),
             rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
             np.full((size, size, 3), rng.integers(0, 256, 3), dtype=np.uint8)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps, options={"crf": "10"})
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for look in looks:
            for _ in range(4 * fps):
                for p in s.encode(av.VideoFrame.from_ndarray(look, format="rgb24")):
                    c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def fixture_files(tmp_path):
    """The video and an annotation file in the published format: SSR (two steps), CRR, REC, EPM."""
    root = tmp_path / "videos"
    cut_video(root / "COIN" / "cuts.mp4")
    video = "COIN/cuts.mp4"
    entries = [
        {"id": 10, "task": "SSR", "video": video, "tutorial": "t", "all_steps": ["s1", "s2"],
         "start_time": [4, 8], "end_time": [8, 12],
         "test_info": [{"realtime": 2, "step": "open the lid", "type": 0},
                       {"realtime": 7, "step": "open the lid", "type": 1},
                       {"realtime": 11, "step": "open the lid", "type": 1},
                       {"realtime": 7, "step": "pour the water", "type": 0},
                       {"realtime": 11, "step": "pour the water", "type": 1}]},
        {"id": 11, "task": "CRR", "video": video, "question": "What does she pour?", "answer": "water",
         "ask_time": 2, "clue_time": 9,
         "test_info": [{"realtime": 2, "type": 0}, {"realtime": 7, "type": 0}, {"realtime": 11, "type": 1}]},
        {"id": 12, "task": "REC", "video": video, "activity": "jump", "start_times": [1, 9],
         "end_times": [2, 10],
         "test_info": [{"realtime": 2, "count": 1}, {"realtime": 7, "count": 1}, {"realtime": 11, "count": 2}]},
        {"id": 13, "task": "EPM", "video": "/mnt/x/videos/COIN/cuts.mp4", "realtime": 3, "question": "who?",
         "answer": "x", "options": ["w", "x"], "gt": 1},
    ]
    ann = tmp_path / "ovo.json"
    ann.write_text(json.dumps(entries))
    return ann, root


@pytest.fixture
def forced():
    """A session factory whose answers follow the schedule of the module docstring."""
    m = tiny(MODEL, "float32")
    target = {}

    class Forced(StreamingSession):
        def _answer(self, question, max_new_tokens, options):
            late = self._last_time >= LATE
            if options is not None:  # a yes/no watch: "A. Yes" / "B. No"
                text = "A" if late else "B"
            elif "How many times" in question:  # REC
                text = "2" if late else "1"
            else:  # SSR, CRR, EPM asked in probe mode; "Y"/"N" is what the official scorer reads
                text = "Y" if late else "N"
            target["id"] = m.tokenize(text)[0]
            return super()._answer(question, max_new_tokens, options)

    def bias(module, args, output):
        out = output.clone()
        out[..., target["id"]] += 1e4
        return out

    handle = m.hf_model.lm_head.register_forward_hook(bias)
    try:
        yield lambda: Forced(m)
    finally:
        handle.remove()


def config(ann, root, out, **kw):
    return EvalConfig(**{**dict(benchmark="ovobench", annotations=str(ann), videos=str(root), out=str(out),
                                fps=2, chunk_frames=2, max_new_tokens=1, forward_mode="proactive",
                                raise_errors=True), **kw})


def test_forced_answers(tmp_path, forced):
    ann, root = fixture_files(tmp_path)
    report = evaluate(config(ann, root, tmp_path / "out"), session_factory=forced, log=QUIET)
    recs, _ = load_predictions(tmp_path / "out")
    # Items are frame pairs; the cuts at 4 s and 8 s open items (4, 4.5) and (8, 8.5), which fire.
    # With chunks of 2 frames cut also at the annotated times 2, 3, 7 and 11 s, those items
    # complete in the chunks ending at 5.0 and 9.0 s: every watch probes there, twice in all.
    fwd = {k: r for k, r in recs.items() if "proactive_response" in r}
    assert len(fwd) == 11 and all(r["task"] != "EPM" for r in fwd.values())
    assert "proactive_response" not in recs["ovo-13"]
    for r in fwd.values():
        expected = {2: (None, 0), 7: (5.0, 1), 11: (9.0, 2)}[r["time"]]
        assert (r["proactive_time"], r["watch_probes"]) == expected, r
    # answers: probe mode by the ask's stream time (2 s: early; 7, 11 s: late); proactive by
    # the standing probe answer (2 s: none yet, ""; 7 s: the 5.0 s probe, early; 11 s: late)
    ssr = [recs[f"ovo-10-p{j}"] for j in range(5)]
    assert [r["response"] for r in ssr] == ["N", "Y", "Y", "Y", "Y"]
    assert [r["proactive_response"] for r in ssr] == ["", "No", "Yes", "No", "Yes"]
    assert [recs[f"ovo-12-p{j}"]["proactive_response"] for j in range(3)] == ["", "1", "2"]
    assert [recs[f"ovo-12-p{j}"]["response"] for j in range(3)] == ["1", "2", "2"]

    fm = report["forward_modes"]
    # SSR  types 0,1,1 | 0,1: probe N Y Y | Y Y -> 4/5; proactive "" No Yes | No Yes -> 3/5
    # CRR  types 0,0,1:       probe N Y Y -> 2/3;       proactive "" No Yes -> 2/3
    # REC  counts 1,1,2:      probe 1 2 2 -> 2/3;       proactive "" 1 2 -> 2/3
    acc = {m: {t: (v["correct"], v["total"]) for t, v in fm[m]["tasks"].items()} for m in ("probe", "proactive")}
    assert acc == {"probe": {"REC": (2, 3), "SSR": (4, 5), "CRR": (2, 3)},
                   "proactive": {"REC": (2, 3), "SSR": (3, 5), "CRR": (2, 3)}}
    assert fm["probe"]["forward"] == pytest.approx((4 / 5 + 2 / 3 + 2 / 3) / 3)
    assert fm["proactive"]["forward"] == pytest.approx((3 / 5 + 2 / 3 + 2 / 3) / 3)
    # calls: probe mode one per annotated time; proactive 4 watches (2 SSR steps, CRR, REC) x 2 probes
    assert fm["probe"]["model_calls"] == 11 and fm["proactive"]["model_calls"] == 8
    assert fm["proactive"]["watches"] == 4
    # probe mode is also the main table, unchanged by the watches
    assert report["scores"]["tasks"]["SSR"]["correct"] == 4
    assert report["usage"]["stats"]["watch_probes"] == 8
    md = (tmp_path / "out" / "scores.md").read_text()
    calls = {t: (fm["probe"]["tasks"][t]["model_calls"], fm["proactive"]["tasks"][t]["model_calls"])
             for t in ("REC", "SSR", "CRR")}
    assert calls == {"REC": (3, 2), "SSR": (5, 4), "CRR": (3, 2)}
    assert "probe mode vs proactive" in md
    assert "| SSR | 5 | 80.00 | 60.00 | 5 | 4 (2) |" in md and "| 11 | 8 (4) |" in md
    assert json.loads((tmp_path / "out" / "scores.json").read_text())["forward_modes"] == fm


def test_probe_answers_do_not_depend_on_the_watches(tmp_path, forced):
    ann, root = fixture_files(tmp_path)
    evaluate(config(ann, root, tmp_path / "pro"), session_factory=forced, log=QUIET)
    evaluate(config(ann, root, tmp_path / "probe", forward_mode="probe"), session_factory=forced, log=QUIET)
    pro, probe = load_predictions(tmp_path / "pro")[0], load_predictions(tmp_path / "probe")[0]
    assert {k: r["response"] for k, r in pro.items()} == {k: r["response"] for k, r in probe.items()}
    assert not any("proactive_response" in r for r in probe.values())
    assert "forward_modes" not in json.loads((tmp_path / "probe" / "scores.json").read_text())


def test_resumed_run_equals_uninterrupted(tmp_path, forced):
    ann, root = fixture_files(tmp_path)
    full = evaluate(config(ann, root, tmp_path / "full"), session_factory=forced, log=QUIET)
    evaluate(config(ann, root, tmp_path / "part", limit=4), session_factory=forced, log=QUIET)
    resumed = evaluate(config(ann, root, tmp_path / "part"), session_factory=forced, log=QUIET)
    keys = ("response", "proactive_response", "proactive_time", "watch_probes")
    a, b = load_predictions(tmp_path / "full")[0], load_predictions(tmp_path / "part")[0]
    assert {k: [r.get(x) for x in keys] for k, r in a.items()} == {k: [r.get(x) for x in keys] for k, r in b.items()}
    assert resumed["forward_modes"] == full["forward_modes"]


def test_cli_flag_dry_run_and_tiny_model_run(tmp_path, capsys):
    ann, root = fixture_files(tmp_path)
    assert main(["eval", "ovobench", "--annotations", str(ann), "--dry-run", "--proactive"]) == 0
    out = capsys.readouterr().out
    assert "proactive SSR: 2 watches" in out and "probe mode: 5 calls" in out
    assert "proactive REC: 1 watches" in out and "proactive CRR: 1 watches" in out
    info, _ = dry_run(config(ann, root, tmp_path / "x"))
    assert info["proactive"]["SSR"] == {"annotated_times": 5, "watches": 2}
    # --proactive and --forward-mode proactive are the same; proactive needs stream mode
    assert main(["eval", "ovobench", "--annotations", str(ann), "--dry-run", "--proactive",
                 "--mode", "clip"]) == 1
    assert "--mode stream" in capsys.readouterr().err
    out_dir = tmp_path / "run"
    argv = ["eval", "ovobench", "--annotations", str(ann), "--videos", str(root), "--model", MODEL,
            "--fps", "2", "--chunk-frames", "2", "--max-new-tokens", "2", "--out", str(out_dir)]
    assert main(argv + ["--forward-mode", "proactive"]) == 0
    printed = capsys.readouterr().out
    assert "forward tasks: probe" in printed and "proactive" in printed and "model calls" in printed
    report = json.loads((out_dir / "scores.json").read_text())
    fm = report["forward_modes"]
    assert fm["questions"] == 11 and fm["probe"]["model_calls"] == 11
    assert 0 < fm["proactive"]["model_calls"] <= 4 * 2 and report["config"]["forward_mode"] == "proactive"
    # a probe-mode rerun on the same folder is refused (other settings), not mixed
    assert main(argv) == 1
    assert "forward_mode" in capsys.readouterr().err


def test_forward_questions_only():
    from streampress.eval.datasets import Question

    q = Question("a", "ovobench", "REC", "forward", "v.mp4", 1.0, (), 1, {"activity": "x"})
    assert is_forward(q) and not is_forward(Question("b", "ovobench", "EPM", "backward", "v.mp4", 1.0,
                                                     ("x", "y"), "A", {"question": "q"}))
