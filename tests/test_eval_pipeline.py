"""End to end with a tiny random model: generated videos named as in the real annotations,
streaming sessions, scores, resume after an interruption, and a 2-process torchrun run.

Random weights give arbitrary answers, so exactness comes from comparing runs: answers and
the recorded first-token logits (``top_logits``) must match between runs.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from streampress.cli import main
from streampress.eval.runner import EvalConfig, evaluate, memory_policy
from streampress.eval.store import load_predictions
from test_eval_runner import make_video, ovo_fixture

REPO = Path(__file__).resolve().parents[1]
MODEL = "random:qwen2.5-vl-tiny"
QUIET = lambda s: None  # noqa: E731


def eval_main(argv):
    return main(["eval", *argv])


def run_cfg(ann, root, out, **kw):
    base = dict(benchmark="ovobench", annotations=str(ann), videos=str(root), out=str(out), model=MODEL,
                method="streaming_assistant", params={"keep_ratio": 0.5}, fps=2, chunk_frames=4,
                max_new_tokens=3, top_logits=5, raise_errors=True)
    base.update(kw)
    return EvalConfig(**base)


def answers(out):
    recs, bad = load_predictions(out)
    assert bad == 0
    return {k: (r["response"], r["first_token_top"]) for k, r in recs.items()}


def close_logits(a, b, atol=1e-4):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][0] == b[k][0], k
        ids_a, ids_b = [i for i, _ in a[k][1]], [i for i, _ in b[k][1]]
        assert ids_a[:1] == ids_b[:1], k
        va, vb = dict(a[k][1]), dict(b[k][1])
        for i in set(va) & set(vb):
            assert abs(va[i] - vb[i]) <= atol, (k, i, va[i], vb[i])


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and a shared 2-core machine makes them slow."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ovo(tmp_path_factory, _one_thread):
    tmp = tmp_path_factory.mktemp("ovo")
    ann, root = ovo_fixture(tmp)
    full = evaluate(run_cfg(ann, root, tmp / "full"), log=QUIET)
    return tmp, ann, root, full


def test_stream_run_scores_and_token_counts(ovo):
    tmp, _, _, full = ovo
    s = full["scores"]
    assert s["answered"] == 10 and s["expected"] == 11 and full["missing_questions"] == 1
    assert set(s["categories"]) == {"backward", "realtime", "forward"}
    recs, _ = load_predictions(tmp / "full")
    # recompute the published scores from the stored responses, by hand
    assert all(r["correct"] == (r["parsed"] == r["answer"] if r["task"] != "REC" else r["parsed"] == str(r["answer"]))
               or r["parsed"] == "Yes/No" for r in recs.values())
    # keep_ratio 0.5 of 2x2 grids: exactly half the visual tokens reach the LLM
    assert full["usage"]["visual_tokens_seen"] > 0
    assert full["usage"]["visual_tokens_kept"] * 2 == full["usage"]["visual_tokens_seen"]
    # questions of one video see more frames the later they come, and the logits show it
    rec = [recs[f"ovo-4-p{j}"] for j in range(3)]
    assert [r["frames"] for r in rec] == [3, 6, 9]  # frames at <= 1, 2.5, 4 s (2 fps)
    # every frame is seen: an odd trailing frame is shown as a padded temporal patch
    assert [r["items_seen"] for r in rec] == [2, 3, 5]
    assert [r["stats"]["items"] for r in rec] == [1, 3, 4]  # the stream itself: complete patches only
    assert rec[0]["first_token_top"] != rec[1]["first_token_top"] != rec[2]["first_token_top"]
    md = (tmp / "full" / "scores.md").read_text()
    assert "mean of the category means" in md and "Total Avg." in md and "Visual tokens kept" in md


def test_resume_after_interruption_equals_uninterrupted(ovo):
    tmp, ann, root, full = ovo
    out = tmp / "resumed"
    evaluate(run_cfg(ann, root, out, limit=5), log=QUIET)
    first = answers(out)
    assert len(first) == 4
    resumed = evaluate(run_cfg(ann, root, out), log=QUIET)
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 10  # nothing asked twice
    assert answers(out) == answers(tmp / "full")  # bit-identical, logits included
    assert resumed["scores"] == full["scores"]


def test_clip_mode_matches_stream_mode_without_pruning(ovo):
    tmp, ann, root, _ = ovo
    stream = evaluate(run_cfg(ann, root, tmp / "s_none", method="none", params={}, tasks=["REC", "SSR"]), log=QUIET)
    clip = evaluate(run_cfg(ann, root, tmp / "c_none", method="none", params={}, tasks=["REC", "SSR"], mode="clip"),
                    log=QUIET)
    assert stream["scores"] == clip["scores"]
    close_logits(answers(tmp / "s_none"), answers(tmp / "c_none"))


@pytest.mark.slow  # two processes with a model each: run by .ci/run's slow step
def test_torchrun_two_processes_equal_one(ovo):
    tmp, ann, root, full = ovo
    out = tmp / "torchrun"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "streampress.eval", "ovobench", "--annotations", str(ann),
           "--videos", str(root), "--out", str(out), "--model", MODEL, "--method", "streaming_assistant",
           "--keep-ratio", "0.5", "--fps", "2", "--chunk-frames", "4", "--max-new-tokens", "3", "--top-logits", "5"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    shards = sorted(p.name for p in out.glob("predictions*.jsonl"))
    assert shards == ["predictions.rank000.jsonl", "predictions.rank001.jsonl"]
    assert all((out / p).read_text().strip() for p in shards)  # both ranks worked
    report = json.loads((out / "scores.json").read_text())
    assert report["scores"] == full["scores"]
    close_logits(answers(out), answers(tmp / "full"))


def test_streamingbench_through_the_command_line(tmp_path, capsys):
    make_video(tmp_path / "sb" / "videos" / "sample_416_real.mp4", 3, seed=4)
    entries = [{"questions": [
        {"task_type": "Object Recognition", "question": "What is seen?", "time_stamp": "00:00:01", "answer": "B",
         "options": ["A. a.", "B. b.", "C. c.", "D. d."], "required_ability": "working memory",
         "audio_path": "./audio/real/sample_416_00_00_01.wav", "time": "[0:00:00 - 0:00:20]"},
        {"task_type": "Counting", "question": "How many?", "time_stamp": "00:02", "answer": "A",
         "options": ["A. 1.", "B. 2.", "C. 3.", "D. 4."], "required_ability": "episodic memory",
         "audio_path": "./audio/real/x.wav", "time": "[0:00:00 - 0:00:20]"}],
        "video_path": "./videos/sample_416_real.mp4"},
        {"questions": [{"task_type": "Counting", "question": "?", "time_stamp": "00:00:01", "answer": "C",
                        "options": ["A. 1.", "B. 2.", "C. 3.", "D. 4."], "required_ability": "episodic memory",
                        "audio_path": "./audio/real/y.wav", "time": "[0:00:00 - 0:00:20]"}],
         "video_path": "./videos/sample_9_real.mp4"}]
    ann = tmp_path / "sb.json"
    ann.write_text(json.dumps(entries))
    args = ["streamingbench", "--annotations", str(ann), "--videos", str(tmp_path / "sb"), "--model", MODEL,
            "--method", "dtd", "--param", "tau=0.9", "--fps", "2", "--max-new-tokens", "2",
            "--out", str(tmp_path / "o")]
    assert eval_main(args) == 0
    report = json.loads((tmp_path / "o" / "scores.json").read_text())
    assert report["scores"]["answered"] == 2 and report["missing_questions"] == 1
    assert set(report["scores"]["tasks"]) == {"Object Recognition", "Counting"}
    assert report["config"]["params"] == {"tau": 0.9}
    recs, _ = load_predictions(tmp_path / "o")
    assert all(r["correct"] == (r["response"].strip()[:1] == r["answer"]) for r in recs.values())
    assert "missing under" in capsys.readouterr().err


def test_every_memory_form_the_command_line_accepts_builds_its_policy(tmp_path):
    """``eval --memory`` takes every ``--memory`` form (the budget policies were refused by
    the config check, which had its own copy of the spec-to-policy mapping)."""
    from streampress.memory import BudgetMemory, SlidingWindow
    from streampress.spec import parse_memory

    ann, root = ovo_fixture(tmp_path)
    for text, want in [("hermes:budget=40,chunk_frames=8", BudgetMemory("hermes", budget=40, chunk_frames=8)),
                       ("infinipot:budget=64", BudgetMemory("infinipot_v", budget=64)),
                       ("window:30,reindex=off", SlidingWindow(seconds=30.0, reindex="off"))]:
        cfg = run_cfg(ann, root, root / "out", memory=parse_memory(text))
        cfg.validate()
        assert memory_policy(cfg.memory) == want
