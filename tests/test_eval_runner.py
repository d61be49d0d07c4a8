"""The streaming protocol, JSONL/resume and sharding logic, driven by a recording fake session.

The fake answers from what it has seen (frame count and pixel sum) and the prompt, so an
answer changes whenever the frames before a question change; the real-model runs are in
test_eval_pipeline.py.
"""

import json
import zlib

import av
import numpy as np
import pytest

from streampress.eval.datasets import Question
from streampress.eval.protocol import run_clips, run_stream
from streampress.eval.runner import EvalConfig, evaluate
from streampress.eval.sharding import DistContext, assign_videos, init_distributed, rank_device
from streampress.eval.store import PredictionWriter, load_predictions

WORDS = ["A", "B", "C", "D", "Yes", "No", "1", "2", "3"]


class FakeSession:
    """Records every call; answers deterministically from the frames so far and the prompt."""

    log: list = []  # shared record of calls across sessions of one test (reset per test)

    def __init__(self):
        self.frames, self.times, self.asks = 0, [], 0
        self.pixels = 0
        FakeSession.log.append(("new",))

    def add_frames(self, frames, timestamps):
        frames = np.asarray(frames)
        assert frames.ndim == 4 and frames.shape[-1] == 3 and frames.dtype == np.uint8
        assert len(frames) == len(timestamps)
        assert not self.times or timestamps[0] > self.times[-1]
        self.frames += len(frames)
        self.times += list(timestamps)
        self.pixels += int(frames.astype(np.int64).sum())
        FakeSession.log.append(("add", tuple(round(t, 3) for t in timestamps)))

    def ask(self, text, max_new_tokens=16):
        self.asks += 1
        FakeSession.log.append(("ask", self.times[-1] if self.times else None, text[:20]))
        h = zlib.crc32(f"{self.frames}|{self.pixels}|{text}".encode())
        return f"{WORDS[h % len(WORDS)]} ({self.frames} frames)"

    def stats(self):
        return {"frames": self.frames, "visual_tokens_seen": 4 * self.frames, "visual_tokens_kept": 2 * self.frames}


@pytest.fixture(autouse=True)
def _clear_log():
    FakeSession.log = []


def make_video(path, seconds, fps=4, size=56, seed=0):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for _ in range(int(seconds * fps)):
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def q(qid, t, task="EPM"):
    return Question(qid=qid, benchmark="ovobench", task=task, category="backward", video="v.mp4",
                    time=t, options=("a", "b", "c", "d"), answer="A", inputs={"question": qid})


def frames(n, step=0.5):
    return [(np.full((4, 4, 3), i, np.uint8), i * step) for i in range(n)]


def test_stream_asks_each_question_at_its_time():
    got = []
    todo = [q("late", 2.0), q("early", 0.6), q("exact", 1.5), q("end", None)]
    run_stream(frames(10), todo, [], FakeSession(), lambda qq, text, info: got.append((qq.qid, info)), chunk_frames=3)
    assert [g[0] for g in got] == ["early", "exact", "late", "end"]
    # frames at 0, .5 before "early" (0.6); up to 1.5 inclusive before "exact"; all 10 before "end"
    assert [g[1]["frames"] for g in got] == [2, 4, 5, 10]
    assert [g[1]["stream_time"] for g in got] == [0.5, 1.5, 2.0, 4.5]
    adds = [e[1] for e in FakeSession.log if e[0] == "add"]
    # chunks of 3, restarting after each question's flush
    assert adds == [(0.0, 0.5), (1.0, 1.5), (2.0,), (2.5, 3.0, 3.5), (4.0, 4.5)]
    assert got[0][1]["stats"]["visual_tokens_seen"] == 8


def test_stream_chunks_do_not_depend_on_which_questions_remain():
    stops = [0.6, 1.5, 2.0, 3.2]
    every = [q("a", 0.6), q("b", 1.5), q("c", 2.0), q("d", 3.2)]
    full, part = [], []
    run_stream(frames(10), every, stops, FakeSession(), lambda qq, t, i: full.append((qq.qid, t)), chunk_frames=3)
    log_full = list(FakeSession.log)
    FakeSession.log = []
    run_stream(frames(10), [every[1], every[3]], stops, FakeSession(), lambda qq, t, i: part.append((qq.qid, t)),
               chunk_frames=3)
    assert part == [full[1], full[3]]
    adds = lambda log: [e for e in log if e[0] == "add"]  # noqa: E731
    assert adds(FakeSession.log) == adds(log_full)[: len(adds(FakeSession.log))]


def test_stream_stops_decoding_after_the_last_question():
    pulled = []

    def gen():
        for f in frames(100):
            pulled.append(f[1])
            yield f

    run_stream(gen(), [q("a", 1.0)], [1.0, 40.0], FakeSession(), lambda *a: None, chunk_frames=4)
    assert max(pulled) == 1.5  # the first frame after 1.0 ends the stream


def test_clip_mode_new_session_per_question():
    got = []
    run_clips(lambda: iter(frames(8)), [q("b", 2.0), q("a", 1.0)], FakeSession,
              lambda qq, t, i: got.append((qq.qid, i["frames"], i["session"])), chunk_frames=2, session_key="v")
    assert got == [("a", 3, "v@a"), ("b", 5, "v@b")]
    assert sum(1 for e in FakeSession.log if e[0] == "new") == 2


def test_assign_videos_balanced_and_deterministic():
    counts = {"v1": 10, "v2": 7, "v3": 5, "v4": 5, "v5": 2, "v6": 1}
    shards = assign_videos(counts, 2)
    assert shards == assign_videos(dict(reversed(list(counts.items()))), 2)
    loads = [sum(counts[v] for v in s) for s in shards]
    assert sorted(loads) == [15, 15] and sorted(v for s in shards for v in s) == sorted(counts)
    assert assign_videos(counts, 1) == [["v1", "v2", "v3", "v4", "v5", "v6"]]
    assert assign_videos({"a": 1}, 3) == [["a"], [], []]
    with pytest.raises(ValueError, match="world_size"):
        assign_videos(counts, 0)


def test_one_process_context_and_devices(monkeypatch):
    import torch

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed() == DistContext(rank=0, world_size=1, local_rank=0, active=False)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        init_distributed()
    assert rank_device(DistContext(), "cpu") == "cpu"
    if not torch.cuda.is_available():
        assert rank_device(DistContext(), None) == "cpu"
        with pytest.raises(ValueError, match="CUDA"):
            rank_device(DistContext(rank=1, world_size=2, local_rank=1), "cuda")


def test_writer_survives_a_cut_line(tmp_path):
    p = tmp_path / "predictions.jsonl"
    p.write_text(json.dumps({"qid": "a", "response": "A"}) + "\n" + '{"qid": "b", "resp')
    with PredictionWriter(p) as w:
        w.write({"qid": "c", "response": "C"})
    recs, bad = load_predictions(tmp_path)
    assert sorted(recs) == ["a", "c"] and bad == 1


# ---- the whole run with a fake session --------------------------------------------------

def ovo_fixture(tmp_path):
    """Three videos in OVO-Bench layout, one more referenced but missing."""
    root = tmp_path / "videos"
    make_video(root / "COIN" / "aaa.mp4", 4, seed=1)
    make_video(root / "chunked_videos" / "bbb.mp4", 3, seed=2)
    make_video(root / "perception_test" / "video_1.mp4", 5, seed=3)
    entries = [
        {"id": 0, "task": "EPM", "video": "/mnt/x/videos/chunked_videos/bbb.mp4", "realtime": 1.5,
         "question": "who?", "answer": "x", "options": ["w", "x", "y", "z"], "gt": 1},
        {"id": 1, "task": "ASI", "video": "COIN/aaa.mp4", "realtime": 2, "question": "what next?",
         "answer": "y", "options": ["x", "y", "z", "w"], "gt": 1},
        {"id": 2, "task": "STU", "video": "COIN/aaa.mp4", "realtime": 0.75, "question": "where?",
         "answer": "z", "options": ["x", "y", "z", "w"], "gt": 2},
        {"id": 3, "task": "OCR", "video": "Missing/ccc.mp4", "realtime": 1, "question": "read?",
         "answer": "x", "options": ["x", "y"], "gt": 0},
        {"id": 4, "task": "REC", "video": "perception_test/video_1.mp4", "activity": "jumping",
         "start_times": [1], "end_times": [2],
         "test_info": [{"realtime": 1, "count": 0}, {"realtime": 2.5, "count": 1}, {"realtime": 4.0, "count": 1}]},
        {"id": 5, "task": "SSR", "video": "COIN/aaa.mp4", "tutorial": "t", "all_steps": ["s1"], "start_time": [1],
         "end_time": [3],
         "test_info": [{"realtime": 1, "step": "s1", "type": 0}, {"realtime": 3, "step": "s1", "type": 1}]},
        {"id": 6, "task": "CRR", "video": "chunked_videos/bbb.mp4", "question": "does she?", "answer": "y",
         "ask_time": 1, "clue_time": 2, "test_info": [{"realtime": 1, "type": 0}, {"realtime": 2.5, "type": 1}]},
    ]
    ann = tmp_path / "ovo.json"
    ann.write_text(json.dumps(entries))
    return ann, root


def responses(out):
    recs, _ = load_predictions(out)
    return {k: r["response"] for k, r in recs.items()}


def test_fake_run_resume_equals_uninterrupted(tmp_path):
    ann, root = ovo_fixture(tmp_path)
    cfg = dict(benchmark="ovobench", annotations=str(ann), videos=str(root), fps=2, chunk_frames=3,
               raise_errors=True)
    full = evaluate(EvalConfig(out=str(tmp_path / "full"), **cfg), session_factory=FakeSession, log=lambda s: None)
    asks_full = sum(1 for e in FakeSession.log if e[0] == "ask")
    assert asks_full == 10 and full["scores"]["answered"] == 10 and full["scores"]["expected"] == 11
    assert full["missing_videos"] == 1 and full["missing_questions"] == 1
    assert (tmp_path / "full" / "missing_videos.txt").read_text() == "Missing/ccc.mp4\n"
    assert set(full["scores"]["tasks"]) == {"EPM", "ASI", "STU", "REC", "SSR", "CRR"}
    assert full["usage"]["visual_tokens_seen"] > 0

    FakeSession.log = []
    part_cfg = EvalConfig(out=str(tmp_path / "resumed"), limit=4, **cfg)
    part = evaluate(part_cfg, session_factory=FakeSession, log=lambda s: None)
    assert part["scores"]["answered"] == 3  # question 4 of the first 4 has no video
    first = responses(tmp_path / "resumed")
    FakeSession.log = []
    resumed = evaluate(EvalConfig(out=str(tmp_path / "resumed"), **cfg), session_factory=FakeSession,
                       log=lambda s: None)
    assert sum(1 for e in FakeSession.log if e[0] == "ask") == 10 - 3  # nothing asked twice
    assert resumed["scores"] == full["scores"]
    assert responses(tmp_path / "resumed") == responses(tmp_path / "full")
    assert all(responses(tmp_path / "resumed")[k] == v for k, v in first.items())
    lines = (tmp_path / "resumed" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 10 and len({json.loads(x)["qid"] for x in lines}) == 10
    merged = [json.loads(x)["qid"] for x in (tmp_path / "resumed" / "all_predictions.jsonl").read_text().splitlines()]
    assert merged[:2] == ["ovo-0", "ovo-1"] and len(merged) == 10
    assert "overall" in (tmp_path / "resumed" / "scores.md").read_text()

    # a nothing-to-do restart asks nothing and scores the same
    FakeSession.log = []
    again = evaluate(EvalConfig(out=str(tmp_path / "resumed"), **cfg), session_factory=FakeSession, log=lambda s: None)
    assert FakeSession.log == [] and again["scores"] == full["scores"]


def test_clip_mode_run_and_config_guard(tmp_path):
    ann, root = ovo_fixture(tmp_path)
    base = dict(benchmark="ovobench", annotations=str(ann), videos=str(root), fps=2, chunk_frames=3,
                out=str(tmp_path / "o"), raise_errors=True)
    rep = evaluate(EvalConfig(mode="clip", **base), session_factory=FakeSession, log=lambda s: None)
    assert sum(1 for e in FakeSession.log if e[0] == "new") == 10
    assert rep["usage"]["sessions"] == 10
    with pytest.raises(ValueError, match="other settings.*mode"):
        evaluate(EvalConfig(mode="stream", **base), session_factory=FakeSession, log=lambda s: None)


def test_a_failing_video_is_reported_and_retried(tmp_path):
    ann, root = ovo_fixture(tmp_path)
    (root / "COIN" / "aaa.mp4").write_bytes(b"not a video")
    cfg = EvalConfig(benchmark="ovobench", annotations=str(ann), videos=str(root), fps=2, out=str(tmp_path / "o"))
    rep = evaluate(cfg, session_factory=FakeSession, log=lambda s: None)
    assert len(rep["errors"]) == 1 and rep["errors"][0].startswith("COIN/aaa.mp4")
    assert rep["scores"]["answered"] == 10 - 4
    make_video(root / "COIN" / "aaa.mp4", 4, seed=1)
    rep = evaluate(cfg, session_factory=FakeSession, log=lambda s: None)
    assert rep["errors"] == [] and rep["scores"]["answered"] == 10


def test_offline_questions_come_after_the_whole_video(tmp_path):
    make_video(tmp_path / "v" / "fFjv93ACGo8.mp4", 3, seed=5)
    ann = tmp_path / "videomme.json"
    ann.write_text(json.dumps([
        {"video_id": "001", "duration": "short", "videoID": "fFjv93ACGo8", "question_id": "001-1",
         "task_type": "Counting Problem", "question": "How many?", "options": ["A. 1.", "B. 2.", "C. 3.", "D. 4."],
         "answer": "C"},
        {"video_id": "001", "duration": "short", "videoID": "fFjv93ACGo8", "question_id": "001-2",
         "task_type": "OCR Problems", "question": "What?", "options": ["A. x.", "B. y.", "C. z.", "D. w."],
         "answer": "A"}]))
    rep = evaluate(EvalConfig(benchmark="videomme", annotations=str(ann), videos=str(tmp_path / "v"), fps=2,
                              out=str(tmp_path / "o"), raise_errors=True), session_factory=FakeSession,
                   log=lambda s: None)
    recs, _ = load_predictions(tmp_path / "o")
    assert [recs[k]["frames"] for k in ("videomme-001-1", "videomme-001-2")] == [6, 6]  # all 3 s at 2 fps
    assert sum(1 for e in FakeSession.log if e[0] == "new") == 1
    assert rep["scores"]["groups"]["short"]["total"] == 2 and set(rep["scores"]["tasks"]) == {
        "Counting Problem", "OCR Problems"}
    assert rep["scores"]["overall"] == sum(r["correct"] for r in recs.values()) / 2
