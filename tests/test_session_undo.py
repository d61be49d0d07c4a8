"""A session never loses or half-keeps anything: failures are undone whole, and a question
sees the frame still waiting for its partner without leaving a trace of it.

Oracles: a run that never failed (or was never asked) fed the same frames, compared bit
for bit (float64 tiny models, CPU); for the pending frame, a session fed the padded item
itself (the last frame repeated into a full temporal patch, as the Hugging Face Qwen
processors pad an odd frame count).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import streampress
import streampress.cacher.cacher as cacher_module
import streampress.memory.base as memory_module
from _model_helpers import StandInPruner, tiny
from _qwen_oracle import frames_for
from _session_helpers import assert_same, fingerprint
from streampress.memory import RetrievalMemory, RetrievalStore, SlidingWindow
from streampress.session import StreamingSession

Q = "What happens in the video?"
QWEN25, QWEN3 = "random:qwen2.5-vl-tiny", "random:qwen3-vl-tiny"
MEMORIES = {"full": lambda: "full", "window": lambda: SlidingWindow(seconds=1.0),
            "retrieval": lambda: RetrievalMemory(window_seconds=1.0, top_k=2)}
CHUNKS = (3, 4, 5)  # odd sizes: a frame waits for its partner between calls
FPS = 2.0


def session(arch, pruner="dtd", memory="full", cacher=True):
    m = tiny(arch)
    return StreamingSession(m, pruner=streampress.create_pruner(pruner, keep_ratio=0.5) if pruner else None,
                            cacher=streampress.create_cacher(rho=0.5, interval=2) if cacher else None,
                            memory=MEMORIES[memory]())


def chunks(frames):
    start = 0
    for size in CHUNKS:
        yield frames[start:start + size], np.arange(start, start + size) / FPS
        start += size


class Injected(RuntimeError):
    pass


# ---- failure injection at each stage of add_frames -------------------------------------------
@contextlib.contextmanager
def failing(stage: str, s: StreamingSession, monkeypatch):
    """Make the next add_frames fail at ``stage``, after earlier stages changed state."""
    m = s.model
    handles = []
    if stage == "encode":  # the vision tower raises before anything is returned
        monkeypatch.setattr(m, "encode", lambda *a, **k: (_ for _ in ()).throw(Injected("encode")))
    elif stage == "cacher":  # inside the tower, after block 0 ran (and began to replace the reference)
        original = cacher_module._CallContext.run_block

        def run_block(ctx, index, args, kwargs):
            if index == 1:
                raise Injected("cacher")
            return original(ctx, index, args, kwargs)

        monkeypatch.setattr(cacher_module._CallContext, "run_block", run_block)
    elif stage == "prune":  # after the pruner committed its state
        pruner = s.pruner
        original_call = type(pruner).__call__

        class Failing(type(pruner)):
            def __call__(self, grids):
                original_call(self, grids)
                raise Injected("prune")

        monkeypatch.setattr(pruner, "__class__", Failing)
    elif stage == "prefill":  # layer 1 raises: layer 0 already appended to the cache
        attn = m.hf_model.model.language_model.layers[1].self_attn

        def boom(module, args, kwargs):
            raise Injected("prefill")

        handles.append(attn.register_forward_pre_hook(boom, with_kwargs=True))
    elif stage == "memory":  # eviction / offloading fails (e.g. out of memory)
        def fail(*args, **kwargs):
            raise Injected("memory")

        monkeypatch.setattr(memory_module, "cache_select", fail)
        monkeypatch.setattr(RetrievalStore, "_grow_summaries", fail)
        monkeypatch.setattr(memory_module.MemoryStore, "after_add", fail)
    else:
        raise AssertionError(stage)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        monkeypatch.undo()


@pytest.mark.parametrize("memory", sorted(MEMORIES))
@pytest.mark.parametrize("pruner", ["dtd", "stc"])
@pytest.mark.parametrize("stage", ["encode", "cacher", "prune", "prefill", "memory"])
def test_failed_add_frames_leaves_no_trace_and_a_retry_equals_a_clean_run(stage, pruner, memory, monkeypatch):
    frames = frames_for(tiny(QWEN25), sum(CHUNKS), seed=4)
    clean = session(QWEN25, pruner, memory)
    for f, t in chunks(frames):
        clean.add_frames(f, t)
    s = session(QWEN25, pruner, memory)
    parts = list(chunks(frames))
    s.add_frames(*parts[0])
    before = fingerprint(s)
    with failing(stage, s, monkeypatch), pytest.raises(Injected):
        s.add_frames(*parts[1])
    assert_same(fingerprint(s), before)
    for f, t in parts[1:]:  # the retry, then the rest of the stream
        s.add_frames(f, t)
    assert_same(fingerprint(s), fingerprint(clean))
    assert torch.equal(s.question_logits(Q), clean.question_logits(Q))


def test_bad_frames_in_a_call_leave_no_trace():
    s = session(QWEN25)
    frames = frames_for(s.model, 3, seed=1)
    s.add_frames(frames, np.arange(3) / FPS)
    before = fingerprint(s)
    side = frames.shape[1]
    mixed = [frames[0], np.zeros((side, side + 28, 3), dtype=np.uint8)]
    with pytest.raises(ValueError, match="same shape"):
        s.add_frames(mixed, [2.0, 2.5])
    assert_same(fingerprint(s), before)


def test_cacher_must_be_a_cacher():
    with pytest.raises(TypeError, match="cacher must be"):
        StreamingSession(tiny(QWEN25), cacher="yes")


# ---- a question sees the pending frame -------------------------------------------------------
@pytest.mark.parametrize("arch", [QWEN25, QWEN3])
def test_one_frame_video_is_answered_from_the_padded_item(arch):
    m = tiny(arch)
    frame = frames_for(m, 1, seed=2)
    one = StreamingSession(m)
    one.add_frames(frame, [0.0])
    padded = StreamingSession(m)
    padded.add_frames(np.concatenate([frame, frame]), [0.0, 0.0])
    assert torch.equal(one.question_logits(Q), padded.question_logits(Q))
    answer = one.ask(Q, max_new_tokens=3)
    assert answer.token_ids == padded.ask(Q, max_new_tokens=3).token_ids
    assert (answer.frames, answer.items) == (1, 1) and answer.visual_tokens == padded.stats()["visual_tokens_kept"] > 0
    assert one.stats()["pending_frames"] == 1 and one.stats()["visual_tokens_seen"] == 0


@pytest.mark.parametrize("memory", sorted(MEMORIES))
@pytest.mark.parametrize("arch", [QWEN25, QWEN3])
def test_question_on_a_pending_frame_leaves_no_trace(arch, memory):
    m = tiny(arch)
    frames = frames_for(m, sum(CHUNKS), seed=5)
    asked, never = session(arch, "dtd", memory), session(arch, "dtd", memory)
    parts = list(chunks(frames))
    for f, t in parts[:2]:  # 7 frames: one waits for its partner
        asked.add_frames(f, t)
        never.add_frames(f, t)
    assert asked.stats()["pending_frames"] == 1
    before = fingerprint(asked)
    # the question sees the pending frame exactly as the padded item would show it
    padded = session(arch, "dtd", memory)
    padded.add_frames(frames[:7], np.arange(7) / FPS)
    padded.add_frames(frames[6:7], [6 / FPS])
    assert torch.equal(asked.question_logits(Q), padded.question_logits(Q))
    asked.ask(Q, max_new_tokens=2)
    assert_same({k: v for k, v in fingerprint(asked).items() if k != "stats"},
                {k: v for k, v in before.items() if k != "stats"})
    stats = fingerprint(asked)["stats"]
    assert stats.pop("questions") == 1 and before["stats"].pop("questions") == 0
    for key in ("retrieved_blocks_last", "retrieved_tokens_last"):  # about the last question, by design
        stats.pop(key, None), before["stats"].pop(key, None)
    assert_same(stats, before["stats"])
    asked.add_frames(*parts[2])
    never.add_frames(*parts[2])
    assert torch.equal(asked.question_logits(Q), never.question_logits(Q))


def test_custom_pruner_without_snapshot_is_restored_by_its_attributes():
    m = tiny(QWEN25)
    frames = frames_for(m, 5, seed=6)
    asked, never = StreamingSession(m, pruner=StandInPruner()), StreamingSession(m, pruner=StandInPruner())
    for s in (asked, never):
        s.add_frames(frames[:3], np.arange(3) / FPS)
    asked.ask(Q, max_new_tokens=1)
    for s in (asked, never):
        s.add_frames(frames[3:], np.arange(3, 5) / FPS)
    assert torch.equal(asked.question_logits(Q), never.question_logits(Q))
