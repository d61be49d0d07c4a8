"""StreamingSession on tiny Qwen2.5-VL / Qwen3-VL: the five equivalence oracles and more.

Oracles compare against the Hugging Face model's OWN forward (its vision tower, its
embedding scatter, its DeepStack injection) on the same preprocessed frames, run one-shot
with the same explicit position ids, in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _model_helpers import StandInPruner, tiny
from _qwen_oracle import ARCHS, frames_for, hf_last_logits, one_shot_inputs
from streampress.memory import SlidingWindow
from streampress.models.base import VISUAL
from streampress.session import StreamingSession

TIMES = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5]
Q = "What happens in the video?"


def _times(n, start=0.0, step=0.5):
    return [start + step * i for i in range(n)]


# ---- oracle 1: keep-all session == HF one-shot forward -----------------------------------
@pytest.mark.parametrize("arch", ARCHS + ["random:qwen2-vl-tiny"])
def test_keep_all_session_equals_hf_one_shot(arch):
    m = tiny(arch)
    frames = frames_for(m, 8, cells=3)
    session = StreamingSession(m)
    session.add_frames(frames[:3], TIMES[:3])
    session.add_frames(frames[3:], TIMES[3:8])
    ours = session.question_logits(Q)
    inputs, _ = one_shot_inputs(m, frames, TIMES[:8], Q)
    torch.testing.assert_close(ours, hf_last_logits(m, inputs), rtol=0, atol=1e-9)


# ---- oracle 2: pruned session == unpruned sequence with dropped tokens masked out -----------
@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_session_equals_masked_attention(arch):
    m = tiny(arch)
    frames = frames_for(m, 8, cells=3)
    session = StreamingSession(m, pruner=StandInPruner(keep=3))
    session.add_frames(frames, TIMES[:8])
    ours = session.question_logits(Q)
    inputs, layout = one_shot_inputs(m, frames, TIMES[:8], Q)
    keep = StandInPruner(keep=3)(m.encode(m.preprocess(torch.from_numpy(frames))).grids).reshape(-1)
    visual = layout.kinds == VISUAL
    mask = torch.ones(len(layout), dtype=torch.long)
    mask[visual] = keep[layout.visual_index[visual]].long()
    assert 0 < int(mask[visual].sum()) < int(visual.sum())
    torch.testing.assert_close(ours, hf_last_logits(m, inputs, mask[None]), rtol=0, atol=1e-9)
    assert (ours - hf_last_logits(m, inputs)).abs().max() > 1e-4  # the pruning mattered
    stats = session.stats()
    assert stats["visual_tokens_seen"] == 4 * 9 and stats["visual_tokens_kept"] == 4 * 3
    assert stats["kv_cache_tokens"] == int(mask.sum()) - len(m.question_ids(Q))


@pytest.mark.parametrize("arch", ARCHS)
def test_pruning_everything_leaves_only_wrappers_and_keeps_positions(arch):
    m = tiny(arch)
    frames = frames_for(m, 4)
    session = StreamingSession(m, pruner=lambda g: torch.zeros(g.shape[:3], dtype=torch.bool))
    empty = session.stats()["kv_cache_tokens"]
    session.add_frames(frames, TIMES[:4])
    wrappers = 0 if "2.5" in arch else 2 * (len(m.tokenize("<0.2 seconds>")) + 2)
    assert session.stats()["kv_cache_tokens"] == empty + wrappers
    dense = StreamingSession(m)
    dense.add_frames(frames, TIMES[:4])
    assert session.stats()["next_text_position"] == dense.stats()["next_text_position"]
    assert session.ask(Q, max_new_tokens=2).text is not None


# ---- oracle 3: chunked == at once ------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_add_frames_equals_all_at_once(arch):
    m = tiny(arch)
    frames = frames_for(m, 10)
    whole = StreamingSession(m, pruner=StandInPruner(keep=2))
    whole.add_frames(frames, TIMES)
    chunked = StreamingSession(m, pruner=StandInPruner(keep=2))
    start = 0
    for size in (1, 2, 3, 1, 3):  # odd sizes: incomplete temporal patches carry over
        chunked.add_frames(frames[start:start + size], TIMES[start:start + size])
        start += size
    assert chunked.stats()["pending_frames"] == 0
    torch.testing.assert_close(chunked.question_logits(Q), whole.question_logits(Q), rtol=0, atol=1e-10)
    for a, b in zip(chunked.memory.cache.layers, whole.memory.cache.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=1e-10)
    assert chunked.ask(Q, max_new_tokens=4).token_ids == whole.ask(Q, max_new_tokens=4).token_ids


# ---- oracle 4: ask mid-stream, then continue == never asked ------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_ask_mid_stream_leaves_no_trace(arch):
    m = tiny(arch)
    frames = frames_for(m, 8)
    asked = StreamingSession(m, pruner=StandInPruner(keep=2))
    never = StreamingSession(m, pruner=StandInPruner(keep=2))
    asked.add_frames(frames[:4], TIMES[:4])
    never.add_frames(frames[:4], TIMES[:4])
    asked.ask("First question?", max_new_tokens=5)
    asked.ask("Pick one", options=["red", "blue", "green"], max_new_tokens=2)
    asked.add_frames(frames[4:], TIMES[4:8])
    never.add_frames(frames[4:], TIMES[4:8])
    for a, b in zip(asked.memory.cache.layers, never.memory.cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert torch.equal(asked.question_logits(Q), never.question_logits(Q))
    assert asked.position_state == never.position_state


def test_greedy_answer_equals_hf_step_by_step():
    """Each generated token is the argmax of the HF model's own one-shot forward over the
    stream + question + the answer so far, at positions max + 1, max + 2, ..."""
    m = tiny("random:qwen2.5-vl-tiny")
    frames = frames_for(m, 4)
    session = StreamingSession(m)
    session.add_frames(frames, TIMES[:4])
    answer = session.ask(Q, max_new_tokens=4)
    assert len(answer.token_ids) >= 2
    inputs, _ = one_shot_inputs(m, frames, TIMES[:4], Q)
    for step, token in enumerate(answer.token_ids):
        assert int(hf_last_logits(m, inputs).argmax()) == token, step
        nxt = int(inputs["position_ids"][0, 0, -1]) + 1
        inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[token]])], 1)
        inputs["position_ids"] = torch.cat([inputs["position_ids"], torch.full((3, 1, 1), nxt)], 2)
    assert answer.text == m.detokenize(answer.token_ids)


# ---- oracle 5: sliding window stays bounded; positions do not move -----------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_sliding_window_bounded_over_long_stream(arch):
    m = tiny(arch, "float32")
    items, per_call, fps, window = 2000, 400, 4.0, 5.0
    frames = frames_for(m, per_call, cells=1)  # one merged token per temporal patch
    calls = [_times(per_call, start=c * per_call / fps, step=1 / fps) for c in range(2 * items // per_call)]
    windowed = StreamingSession(m, memory=SlidingWindow(seconds=window))
    prefix = windowed.stats()["kv_cache_tokens"]
    wrapper = 0 if "2.5" in arch else len(m.tokenize("<9999.9 seconds>")) + 2
    newest = calls[-1][-1]
    window_items = sum(1 for k in range(items)
                       if newest - calls[0][2 * k % per_call] - (2 * k // per_call) * per_call / fps <= window)
    lengths = []
    for times in calls:
        windowed.add_frames(frames, times)
        lengths.append(windowed.stats()["kv_cache_tokens"])
    stats = windowed.stats()
    assert stats["items"] == items and stats["evicted_items"] == items - window_items
    assert max(lengths) <= prefix + window_items * (1 + wrapper)  # bounded over 2,000 temporal patches
    blocks = windowed.memory.blocks
    assert len(blocks) == window_items and blocks[-1].item == items - 1
    assert all(newest - b.start_time <= window for b in blocks)
    assert sum(b.length for b in blocks) + prefix == lengths[-1]
    # Positions of kept items do not move: first-layer keys (a function of the token and its
    # position only) equal those of the same items in a full-memory stream of the same frames.
    full = StreamingSession(m)
    short = StreamingSession(m, memory=SlidingWindow(seconds=window))
    for times in calls[:2]:
        full.add_frames(frames, times)
        short.add_frames(frames, times)
    full_blocks = {b.item: b for b in full.memory.blocks}
    keys_full, keys_short = full.memory.cache.layers[0].keys, short.memory.cache.layers[0].keys
    for b in short.memory.blocks:
        fb = full_blocks[b.item]
        assert b.length == fb.length
        torch.testing.assert_close(keys_short[..., b.start:b.start + b.length, :],
                                   keys_full[..., fb.start:fb.start + fb.length, :], rtol=0, atol=1e-6)
    torch.testing.assert_close(keys_short[..., :prefix, :], keys_full[..., :prefix, :], rtol=0, atol=0)
    assert short.stats()["next_text_position"] == full.stats()["next_text_position"]
    windowed.ask(Q, max_new_tokens=2)
    assert windowed.stats()["kv_cache_tokens"] == lengths[-1]


# ---- per-session state -----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_two_sessions_interleaved_equal_each_alone(arch):
    m = tiny(arch)
    fa, fb = frames_for(m, 6, seed=1), frames_for(m, 6, seed=2)
    alone_a = StreamingSession(m, pruner=StandInPruner())
    alone_a.add_frames(fa, TIMES[:6])
    ref_a = alone_a.question_logits(Q)
    alone_b = StreamingSession(m, pruner=StandInPruner())
    alone_b.add_frames(fb, _times(6, start=10.0))
    ref_b = alone_b.question_logits(Q)
    a, b = StreamingSession(m, pruner=StandInPruner()), StreamingSession(m, pruner=StandInPruner())
    for i in range(0, 6, 3):
        a.add_frames(fa[i:i + 3], TIMES[i:i + 3])
        b.add_frames(fb[i:i + 3], _times(6, start=10.0)[i:i + 3])
        b.ask("Anything?", max_new_tokens=2)
    assert torch.equal(a.question_logits(Q), ref_a) and torch.equal(b.question_logits(Q), ref_b)
    a.reset()
    a.add_frames(fb, _times(6, start=10.0))
    assert torch.equal(a.question_logits(Q), ref_b)  # reset starts a fresh stream


# ---- multiple choice ----------------------------------------------------------------------------
def test_multiple_choice_picks_the_best_letter():
    m = tiny("random:qwen3-vl-tiny")
    session = StreamingSession(m)
    session.add_frames(frames_for(m, 4), TIMES[:4])
    answer = session.ask("Which?", options=["a cat", "a dog", "a bird"], max_new_tokens=0)
    assert answer.text == "" and set(answer.option_logits) == {"A", "B", "C"}
    prompt = "Which?\nA. a cat\nB. a dog\nC. a bird\nAnswer with the option's letter from the given choices directly."
    logits = session.question_logits(prompt)
    letters = {l: float(logits[m.tokenize(l)[0]]) for l in "ABC"}
    assert answer.option_logits == pytest.approx(letters) and answer.choice == max(letters, key=letters.get)
    lettered = session.ask("Which?", options=["A. a cat", "B. a dog", "C. a bird"], max_new_tokens=0)
    assert lettered.option_logits == answer.option_logits  # already-lettered options are not re-lettered


# ---- bad input -----------------------------------------------------------------------------------
def _snapshot(session):
    return (session.stats(), session.position_state,
            [l.keys.clone() for l in session.memory.cache.layers])


@pytest.mark.parametrize("arch", ARCHS)
def test_bad_input_gives_clear_errors_and_keeps_state(arch, monkeypatch):
    m = tiny(arch)
    frames = frames_for(m, 5)
    session = StreamingSession(m, pruner=StandInPruner())
    session.add_frames(frames[:3], TIMES[:3])  # one frame pending
    before = _snapshot(session)
    bad = [
        (lambda: session.add_frames(frames[:2, ..., :2], [2.0, 2.5]), ValueError, "3 channels"),
        (lambda: session.add_frames(frames[0, 0], [2.0]), ValueError, "shape"),
        (lambda: session.add_frames(frames[:2].astype(np.float32), [2.0, 2.5]), TypeError, "uint8"),
        (lambda: session.add_frames(frames[:2], [2.0]), ValueError, "one time per frame"),
        (lambda: session.add_frames(frames[:2], [2.0, 1.9]), ValueError, "backwards"),
        (lambda: session.add_frames(frames[:2], [0.5, 3.0]), ValueError, "backwards"),
        (lambda: session.add_frames(frames[:2], [2.0, float("nan")]), ValueError, "finite"),
        (lambda: session.add_frames(frames_for(m, 2, cells=3), [2.0, 2.5]), ValueError, "size"),
        (lambda: session.add_frames(frames[:2], None), ValueError, "timestamps"),
        (lambda: session.ask("   "), ValueError, "empty"),
        (lambda: session.ask(3), TypeError, "str"),
        (lambda: session.ask(Q, max_new_tokens=-1), ValueError, "max_new_tokens"),
        (lambda: session.ask(Q, options=["only one"]), ValueError, "2 to 26"),
        (lambda: session.ask(Q, options="AB"), TypeError, "list"),
        (lambda: session.ask("x" * (m.max_context + 10)), ValueError, "too long"),
    ]
    for call, exc, text in bad:
        with pytest.raises(exc, match=text):
            call()
    # A stream longer than the trained context still answers (positions are kept), with one warning.
    monkeypatch.setattr(m, "max_context", session.position_state.max_position + 60)
    with pytest.warns(RuntimeWarning, match="trained context"):
        session.ask("a question of more than twenty tokens for sure", max_new_tokens=2)
    monkeypatch.undo()
    answered = _snapshot(session)  # a successful question leaves the stream as it was
    assert answered[1] == before[1] and all(torch.equal(a, b) for a, b in zip(answered[2], before[2]))
    before = answered

    real_forward = m.forward

    def failing_forward(*args, **kwargs):  # runs into the cache, then fails
        real_forward(*args, **kwargs)
        raise RuntimeError("device lost")

    monkeypatch.setattr(m, "forward", failing_forward)
    with pytest.raises(RuntimeError, match="device lost"):
        session.ask(Q)
    monkeypatch.undo()
    after = _snapshot(session)
    assert after[0] == before[0] and after[1] == before[1]
    assert all(torch.equal(a, b) for a, b in zip(after[2], before[2]))
    # and the session still works and matches a clean one
    session.add_frames(frames[3:], TIMES[3:5])
    clean = StreamingSession(m, pruner=StandInPruner())
    clean.add_frames(frames, TIMES[:5])
    assert torch.equal(session.question_logits(Q), clean.question_logits(Q))


def test_failed_prefill_restores_the_cache(monkeypatch):
    m = tiny("random:qwen2.5-vl-tiny")
    session = StreamingSession(m)
    frames = frames_for(m, 4)
    session.add_frames(frames[:2], TIMES[:2])
    length, state = session.stats()["kv_cache_tokens"], session.position_state
    real_forward = m.forward

    def failing_forward(*args, **kwargs):
        real_forward(*args, **kwargs)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(m, "forward", failing_forward)
    with pytest.raises(RuntimeError):
        session.add_frames(frames[2:], TIMES[2:4])
    monkeypatch.undo()
    assert session.stats()["kv_cache_tokens"] == length and session.position_state == state
    assert session.stats()["items"] == 1


def test_constructor_validation_and_model_by_name():
    with pytest.raises(TypeError, match="model adapter"):
        StreamingSession(object())
    with pytest.raises(TypeError, match="callable"):
        StreamingSession(tiny("random:qwen2.5-vl-tiny"), pruner=3)
    with pytest.raises(ValueError, match="memory"):
        StreamingSession(tiny("random:qwen2.5-vl-tiny"), memory="everything")
    with pytest.raises(ValueError, match="positive"):
        SlidingWindow(seconds=0)
    s = StreamingSession("random:qwen2.5-vl-tiny")
    assert s.stats()["kv_cache_tokens"] > 0 and s.stats()["items"] == 0


# ---- the real pruners and cacher through the session (when present) ---------------------------
def test_registered_pruner_runs_in_the_session():
    registry = pytest.importorskip("streampress.pruners.registry")
    m = tiny("random:qwen2.5-vl-tiny", "float32")
    frames = frames_for(m, 6, cells=4)
    session = StreamingSession(m, pruner=registry.create_pruner("streaming_assistant", keep_ratio=0.25))
    session.add_frames(frames, TIMES[:6])
    stats = session.stats()
    assert stats["visual_tokens_seen"] == 3 * 16 and stats["visual_tokens_kept"] < 3 * 16
    assert session.ask(Q, max_new_tokens=2).token_ids


@pytest.mark.parametrize("arch", ARCHS)
def test_cacher_recomputing_everything_equals_no_cacher(arch):
    cacher_mod = pytest.importorskip("streampress.cacher")
    m = tiny(arch)
    frames = frames_for(m, 6)
    plain = StreamingSession(m)
    plain.add_frames(frames, TIMES[:6])
    cached = StreamingSession(m, cacher=cacher_mod.create_cacher(rho=1.0, interval=2))
    cached.add_frames(frames[:3], TIMES[:3])
    cached.add_frames(frames[3:], TIMES[3:6])
    torch.testing.assert_close(cached.question_logits(Q), plain.question_logits(Q), rtol=0, atol=1e-8)
    stats = cached.stats()
    assert stats["cacher_items"] == 3 and stats["cacher_references"] == 2  # items 0 and 2 of 3
    assert stats["cacher_recompute_fraction"] == 1.0  # rho = 1 recomputes every token
    assert "cacher_items" not in plain.stats()


def test_cacher_stats_report_the_reused_work():
    cacher_mod = pytest.importorskip("streampress.cacher")
    m = tiny(ARCHS[0])
    session = StreamingSession(m, cacher=cacher_mod.create_cacher(rho=0.25, interval=2))
    session.add_frames(frames_for(m, 8), TIMES[:8])
    stats = session.stats()
    assert stats["cacher_items"] == 4 and stats["cacher_references"] == 2
    assert 0.5 < stats["cacher_recompute_fraction"] < 1.0  # 2 full items + 2 partial of 4
    session.reset()
    assert session.stats()["cacher_items"] == 0
