"""Streaming sessions on LLaVA-OneVision: the five equivalence oracles (tiny random model, CPU).

The reference is always the Hugging Face model's own forward, run one-shot on the same
preprocessed frames and question (its own video placeholder expansion, SigLIP, projector,
pooling and trailing ``image_newline``) with explicit 1-D position ids.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import _model_helpers
from _model_helpers import StandInPruner as TemporalPruner
from streampress.memory import SlidingWindow
from streampress.models.base import VISUAL, PositionState, TokenLayout, text_positions
from streampress.session import StreamingSession

ARCH = "random:llava-onevision-tiny"
QUESTION = "What moves?"


def tiny(dtype: str = "float64"):
    """One tiny model per dtype and test process (adapters hold no stream state)."""
    return _model_helpers.tiny(ARCH, dtype)


def frames(count: int, side: int = 56, seed: int = 0) -> np.ndarray:
    """Random frames with a slowly moving structure, so that pruners see redundancy."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(side, side * 2, 3), dtype=np.uint8)
    return np.stack([np.roll(base, 3 * k, axis=1)[:, :side] for k in range(count)])


@contextlib.contextmanager
def recorded_logits(adapter):
    """Records the logits every ``adapter.forward`` call returns (the session's answers)."""
    seen = []
    original = adapter.forward

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        if out is not None:
            seen.append(out.detach().clone())
        return out

    adapter.forward = forward
    try:
        yield seen
    finally:
        del adapter.forward


def question_logits(session, question=QUESTION) -> torch.Tensor:
    """Last-token logits of ``question`` asked now (the first forward of ``ask``)."""
    with recorded_logits(session.model) as seen:
        session.ask(question, max_new_tokens=1)
    return seen[0]


def one_shot(adapter, video: np.ndarray, question=QUESTION):
    """The whole stream + question in the HF model's own input format, and its layout."""
    prefix, state = adapter.begin_stream(PositionState())
    batch = adapter.preprocess(torch.from_numpy(video))
    items, state = adapter.layout_items(state.advanced(start_time=0.0),
                                        torch.zeros(len(video), 1, dtype=torch.float64), adapter.grid_hw)
    qids = adapter.question_ids(question, has_video=True)
    layout = TokenLayout.cat([prefix, items, TokenLayout.text(qids, text_positions(state.max_position + 1,
                                                                                    len(qids), 1))])
    inputs = dict(input_ids=layout.input_ids[None], position_ids=layout.positions,
                  pixel_values_videos=batch.pixel_values[None].to(adapter.dtype))
    return inputs, layout


@torch.no_grad()
def hf_logits(adapter, inputs, key_mask: torch.Tensor | None = None,
              queries: torch.Tensor | None = None) -> torch.Tensor:
    """HF last-token logits; ``key_mask [L]`` False = that token is masked out of attention
    (for the queries flagged in ``queries [L]``, default all of them)."""
    mask = None
    if key_mask is not None:
        n = key_mask.numel()
        queries = torch.ones(n, dtype=torch.bool) if queries is None else queries
        allowed = key_mask[None, :] | ~queries[:, None] | torch.eye(n, dtype=torch.bool)
        mask = (torch.ones(n, n, dtype=torch.bool).tril() & allowed)[None, None]
    out = adapter.hf_model(**inputs, attention_mask=mask, use_cache=False)
    return out.logits[0, -1].float()


def stream(session, video, chunks, t0=0.0, fps=1.0):
    """Feed ``video`` in chunks of the given sizes at ``fps`` starting at ``t0`` seconds."""
    start = 0
    for size in chunks:
        part = video[start:start + size]
        session.add_frames(part, t0 + (np.arange(start, start + size)) / fps)
        start += size
    assert start == len(video)


# ---- oracle 1: keep-all session == HF one-shot ---------------------------------------

@pytest.mark.parametrize("dtype,tol", [("float64", 1e-6), ("float32", 1e-5)])
def test_keep_all_session_equals_hf_one_shot(dtype, tol):
    adapter = tiny(dtype)
    video = frames(5)
    session = StreamingSession(adapter)
    stream(session, video, [5])
    ours = question_logits(session)
    inputs, layout = one_shot(adapter, video)
    # HF expands T * 9 + 1 video placeholders: the grids and the trailing image_newline
    assert int((inputs["input_ids"] == adapter.video_token_id).sum()) == 5 * 9 + 1
    assert torch.equal(inputs["position_ids"][0], torch.arange(len(layout)))  # consecutive
    ref = hf_logits(adapter, inputs)
    assert (ours - ref).abs().max() < tol
    assert ours.std() > 0.1  # logits are far from flat, so the comparison has teeth
    stats = session.stats()
    assert stats["visual_tokens_seen"] == stats["visual_tokens_kept"] == 45 and stats["items"] == 5


def test_question_before_any_frame_equals_hf_text_only():
    adapter = tiny()
    session = StreamingSession(adapter)
    ours = question_logits(session, "Hello?")
    ids = adapter.prefix_ids + adapter.question_ids("Hello?", has_video=False)
    assert adapter.video_token_id not in ids  # no video, no end-of-video newline
    ref = hf_logits(adapter, dict(input_ids=torch.tensor([ids]), position_ids=torch.arange(len(ids))[None]))
    assert (ours - ref).abs().max() < 1e-6


def test_positions_matter_so_the_oracle_can_fail():
    adapter = tiny()
    video = frames(3)
    inputs, _ = one_shot(adapter, video)
    ref = hf_logits(adapter, inputs)
    shifted = dict(inputs, position_ids=inputs["position_ids"] + (inputs["position_ids"] > 40).long())
    assert (hf_logits(adapter, shifted) - ref).abs().max() > 1e-3
    session = StreamingSession(adapter, pruner=TemporalPruner(keep=9))  # keeps all 9, via a pruner
    stream(session, video, [3])
    assert (question_logits(session) - ref).abs().max() < 1e-6


# ---- oracle 2: pruned == unpruned with dropped tokens masked out -------------------------

def test_pruned_session_equals_masked_unpruned_sequence():
    adapter = tiny()
    video = frames(6)
    session = StreamingSession(adapter, pruner=TemporalPruner(keep=4))
    stream(session, video, [2, 4])
    ours = question_logits(session)
    stats = session.stats()
    assert stats["visual_tokens_kept"] == 6 * 4 and stats["visual_tokens_seen"] == 6 * 9

    inputs, layout = one_shot(adapter, video)
    pruner = TemporalPruner(keep=4)
    grids = adapter.encode(adapter.preprocess(torch.from_numpy(video))).grids
    keep = torch.cat([pruner(grids[:2]), pruner(grids[2:])]).reshape(-1)
    is_visual = layout.kinds == VISUAL
    key_mask = ~is_visual
    key_mask[is_visual] = keep[layout.visual_index[is_visual]]
    ref = hf_logits(adapter, inputs, key_mask)
    assert (ours - ref).abs().max() < 1e-6
    # compacting the kept tokens to consecutive positions instead gives other logits
    assert (hf_logits(adapter, inputs) - ref).abs().max() > 1e-3


def test_pruning_everything_keeps_positions_and_the_newline():
    adapter = tiny()
    video = frames(3)
    session = StreamingSession(adapter, pruner=lambda g: torch.zeros(g.shape[:3], dtype=torch.bool))
    empty = session.stats()["kv_cache_tokens"]
    stream(session, video, [3])
    assert session.stats()["kv_cache_tokens"] == empty  # LLaVA-OV has no per-frame wrapper text
    assert session.stats()["next_text_position"] == empty + 27
    ours = question_logits(session)
    inputs, layout = one_shot(adapter, video)
    ref = hf_logits(adapter, inputs, layout.kinds != VISUAL)  # the newline (a text token) stays
    assert (ours - ref).abs().max() < 1e-6


def test_greedy_answer_equals_hf_step_by_step():
    """Each generated token is the argmax of HF's one-shot forward over stream + question +
    the answer so far, at positions max + 1, max + 2, ..."""
    adapter = tiny()
    video = frames(3)
    session = StreamingSession(adapter)
    stream(session, video, [3])
    answer = session.ask(QUESTION, max_new_tokens=4)
    assert len(answer.token_ids) >= 2
    inputs, _ = one_shot(adapter, video)
    for step, token in enumerate(answer.token_ids):
        assert int(hf_logits(adapter, inputs).argmax()) == token, step
        nxt = int(inputs["position_ids"][0, -1]) + 1
        inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[token]])], 1)
        inputs["position_ids"] = torch.cat([inputs["position_ids"], torch.tensor([[nxt]])], 1)
    assert answer.text == adapter.detokenize(answer.token_ids)


# ---- oracle 3: chunked == at once ----------------------------------------------------------

@pytest.mark.parametrize("pruned", [False, True])
def test_chunked_add_frames_equals_at_once(pruned):
    adapter = tiny()
    video = frames(7)
    a = StreamingSession(adapter, pruner=TemporalPruner(3) if pruned else None)
    b = StreamingSession(adapter, pruner=TemporalPruner(3) if pruned else None)
    stream(a, video, [7])
    stream(b, video, [1, 2, 1, 3])
    assert a.stats()["kv_cache_tokens"] == b.stats()["kv_cache_tokens"]
    assert a.position_state == b.position_state
    for la, lb in zip(a.memory.cache.layers, b.memory.cache.layers):
        assert torch.allclose(la.keys, lb.keys, atol=1e-12) and torch.allclose(la.values, lb.values, atol=1e-12)
    assert (question_logits(a) - question_logits(b)).abs().max() < 1e-10


# ---- oracle 4: asking mid-stream leaves no trace --------------------------------------------

def test_ask_mid_stream_then_continue_equals_never_asked():
    adapter = tiny()
    video = frames(6)
    asked = StreamingSession(adapter, pruner=TemporalPruner(5))
    quiet = StreamingSession(adapter, pruner=TemporalPruner(5))
    stream(asked, video[:3], [3])
    before = asked.stats()["kv_cache_tokens"]
    answer = asked.ask("What happened first?", max_new_tokens=4)
    assert isinstance(answer.text, str) and len(answer.token_ids) <= 4
    asked.ask("Pick one.", max_new_tokens=0, options=["red", "blue"])
    assert asked.stats()["kv_cache_tokens"] == before
    asked.add_frames(video[3:], [3.0, 4.0, 5.0])
    stream(quiet, video, [3, 3])
    assert asked.position_state == quiet.position_state
    assert (question_logits(asked) - question_logits(quiet)).abs().max() < 1e-12
    # the later frames sit where they would without the question
    inputs, layout = one_shot(adapter, video)
    pruner = TemporalPruner(5)
    grids = adapter.encode(adapter.preprocess(torch.from_numpy(video))).grids
    keep = torch.cat([pruner(grids[:3]), pruner(grids[3:])]).reshape(-1)
    key_mask = layout.kinds != VISUAL
    key_mask[~key_mask] = keep[layout.visual_index[~key_mask]]
    assert (question_logits(quiet) - hf_logits(adapter, inputs, key_mask)).abs().max() < 1e-6


# ---- oracle 5: a sliding window keeps memory bounded --------------------------------------------

def test_sliding_window_memory_is_bounded_over_a_long_stream():
    adapter = tiny("float32")
    window = 20.0
    session = StreamingSession(adapter, pruner=TemporalPruner(keep=5), memory=SlidingWindow(seconds=window))
    prefix = session.stats()["kv_cache_tokens"]
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    lengths, nbytes = [], []
    chunk, total = 50, 2000
    for start in range(0, total, chunk):
        part = np.stack([np.roll(base, k, axis=0) for k in range(start, start + chunk)])
        session.add_frames(part, np.arange(start, start + chunk, dtype=np.float64))
        s = session.stats()
        lengths.append(s["kv_cache_tokens"])
        nbytes.append(s["kv_cache_bytes"])
    s = session.stats()
    assert s["items"] == total and s["evicted_items"] == total - s["items_in_memory"]
    bound = prefix + (int(window) + 1) * 5  # items whose first frame is within the window
    assert max(lengths[1:]) <= bound and lengths[-1] == bound
    assert len(set(nbytes[1:])) == 1  # flat after the window filled
    # positions keep growing with the stream (nothing moved), the question follows the max
    assert s["next_text_position"] == prefix + total * 9
    answer = session.ask(QUESTION, max_new_tokens=2)
    assert session.stats()["kv_cache_tokens"] == lengths[-1] and len(answer.token_ids) <= 2


def test_sliding_window_answer_equals_masked_full_sequence():
    adapter = tiny()
    video = frames(8)
    session = StreamingSession(adapter, memory=SlidingWindow(seconds=3))
    # after the second chunk (t = 7 s) items 0..3 (first frames at 0..3 s) leave the cache;
    # the second chunk was prefilled while they were still there, so only the question
    # turn loses sight of them
    stream(session, video, [4, 4])
    assert session.stats()["evicted_items"] == 4
    ours = question_logits(session)
    inputs, layout = one_shot(adapter, video)
    key_mask = (layout.item < 0) | (layout.item >= 4)
    question = torch.arange(len(layout)) > int(torch.nonzero(layout.kinds == VISUAL).max())
    assert (ours - hf_logits(adapter, inputs, key_mask, question)).abs().max() < 1e-6
    assert (ours - hf_logits(adapter, inputs, key_mask)).abs().max() > 1e-4


# ---- per-session state, cacher, bad input ------------------------------------------------------

def test_interleaved_sessions_on_one_model_equal_each_alone():
    adapter = tiny()
    v1, v2 = frames(4, seed=1), frames(4, seed=2)
    alone1, alone2 = StreamingSession(adapter, TemporalPruner(4)), StreamingSession(adapter, TemporalPruner(4))
    stream(alone1, v1, [4])
    ref1 = question_logits(alone1)
    stream(alone2, v2, [4])
    ref2 = question_logits(alone2)
    s1, s2 = StreamingSession(adapter, TemporalPruner(4)), StreamingSession(adapter, TemporalPruner(4))
    for k in range(0, 4, 2):
        s1.add_frames(v1[k:k + 2], [k, k + 1])
        s2.add_frames(v2[k:k + 2], [k, k + 1])
    assert (question_logits(s1) - ref1).abs().max() < 1e-12
    assert (question_logits(s2) - ref2).abs().max() < 1e-12


def test_cacher_in_the_session():
    cacher_mod = pytest.importorskip("streampress.cacher")
    adapter = tiny()
    video = frames(4)
    dense = StreamingSession(adapter)
    stream(dense, video, [2, 2])
    ref = question_logits(dense)
    full = StreamingSession(adapter, cacher=cacher_mod.create_cacher(rho=1.0, interval=2))
    stream(full, video, [2, 2])
    assert (question_logits(full) - ref).abs().max() < 1e-9  # rho = 1 recomputes everything
    reused = StreamingSession(adapter, cacher=cacher_mod.create_cacher(rho=0.25, interval=4))
    stream(reused, video, [4])
    assert (question_logits(reused) - ref).abs().max() > 1e-6  # reuse did happen
    assert reused._cacher_state.stats.recompute_fraction < 1.0
    static = np.repeat(video[:1], 4, axis=0)
    a, b = StreamingSession(adapter), StreamingSession(adapter, cacher=cacher_mod.create_cacher(0.25, 4))
    stream(a, static, [4])
    stream(b, static, [4])
    assert (question_logits(a) - question_logits(b)).abs().max() < 1e-9  # identical frames: exact


def test_cacher_state_spans_chunks():
    cacher_mod = pytest.importorskip("streampress.cacher")
    adapter = tiny()
    video = frames(4)
    whole = StreamingSession(adapter, cacher=cacher_mod.create_cacher(rho=0.25, interval=4))
    stream(whole, video, [4])
    chunked = StreamingSession(adapter, cacher=cacher_mod.create_cacher(rho=0.25, interval=4))
    stream(chunked, video, [2, 2])
    assert (question_logits(whole) - question_logits(chunked)).abs().max() < 1e-9


def test_bad_frames_leave_the_session_unchanged():
    adapter = tiny()
    session = StreamingSession(adapter)
    session.add_frames(frames(2), [0.0, 1.0])
    before = (session.stats()["kv_cache_tokens"], session.position_state)
    with pytest.raises(ValueError, match="3 channels"):
        session.add_frames(np.zeros((1, 56, 56, 4), dtype=np.uint8), [2.0])
    with pytest.raises(ValueError, match="timestamps"):
        session.add_frames(frames(2), [2.0])
    with pytest.raises(ValueError, match="backwards"):
        session.add_frames(frames(1), [0.5])
    with pytest.raises(ValueError, match="empty"):
        session.ask("  ")
    assert (session.stats()["kv_cache_tokens"], session.position_state) == before
