"""RetrievalMemory: offload old items to CPU, fetch the top-k blocks per layer at a question.

Oracles (tiny random models, CPU):
- everything prefilled at once, then offloaded: k >= #blocks answers exactly as the full cache;
- frames streamed in chunks: each chunk's prefill sees [prefix + window] (as in ReKV), so
  k >= #blocks equals a cache assembled from a SlidingWindow session's evicted blocks, and
  k = 0 equals the SlidingWindow session itself;
- k small: each layer's cache is [prefix + its chosen blocks + window], the chosen blocks are
  those an independent scoring of the full cache picks, and their keys are the original ones.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import streampress
from _model_helpers import StandInPruner, tiny
from _qwen_oracle import frames_for
from streampress.memory import QuestionInput, RetrievalMemory, SlidingWindow
from streampress.memory.retrieval import block_scores
from streampress.models.base import text_positions
from streampress.session import StreamingSession

Q = "What happens in the video?"
QWEN25, QWEN3, LLAVA = "random:qwen2.5-vl-tiny", "random:qwen3-vl-tiny", "random:llava-onevision-tiny"


@functools.cache
def model(arch: str, dtype: str = "float64", attn: str = "sdpa"):
    if arch == LLAVA or attn != "sdpa":
        return streampress.load_model(arch, dtype=dtype, device="cpu", attn_implementation=attn)
    return tiny(arch, dtype)


def video(m, count: int, seed: int = 0, cells: int = 2) -> np.ndarray:
    if hasattr(m, "params"):  # Qwen: sides that give a cells x cells merged grid
        return frames_for(m, count, cells=cells, seed=seed)
    return np.random.default_rng(seed).integers(0, 256, size=(count, 28, 28, 3), dtype=np.uint8)


def feed(session, frames, chunks, fps=2.0):
    start = 0
    for size in chunks:
        session.add_frames(frames[start:start + size], np.arange(start, start + size) / fps)
        start += size


def question_input(session, question=Q):
    m = session.model
    ids = m.question_ids(question, has_video=True)
    start = session.position_state.max_position + 1
    return QuestionInput(m.embed_text(torch.tensor(ids)), text_positions(start, len(ids), m.position_axes))


def windowed_reference_logits(m, frames, chunks, window, question=Q):
    """Logits over [prefix + every item's KV as prefilled in a SlidingWindow stream + window]:
    the evicted blocks are captured just before they leave the window session's cache."""
    session = StreamingSession(m, memory=SlidingWindow(seconds=window))
    store, gone = session.memory, []
    real_evict = store.evict

    def evict(blocks):
        for b in blocks:
            gone.append([(l.keys[..., b.start:b.start + b.length, :], l.values[..., b.start:b.start + b.length, :])
                         for l in store.cache.layers])
        real_evict(blocks)

    store.evict = evict
    feed(session, frames, chunks)
    prefix = store.length() - sum(b.length for b in store.blocks)
    cache = m.new_cache()
    for i, layer in enumerate(store.cache.layers):
        keys = [layer.keys[..., :prefix, :]] + [g[i][0] for g in gone] + [layer.keys[..., prefix:, :]]
        values = [layer.values[..., :prefix, :]] + [g[i][1] for g in gone] + [layer.values[..., prefix:, :]]
        cache.update(torch.cat(keys, -2), torch.cat(values, -2), i)
    q = question_input(session, question)
    return m.forward(q.embeds, q.positions, cache), len(gone), session


# ---- policy object -------------------------------------------------------------------------------
def test_policy_validation_and_public_name():
    assert streampress.RetrievalMemory is RetrievalMemory
    for bad in (0, -1.0, float("inf"), float("nan"), "5", True, None):
        with pytest.raises(ValueError, match="window_seconds"):
            RetrievalMemory(window_seconds=bad, top_k=2)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="top_k"):
            RetrievalMemory(window_seconds=2, top_k=bad)
    for bad in (0, 2.0, False):
        with pytest.raises(ValueError, match="block_items"):
            RetrievalMemory(window_seconds=2, top_k=1, block_items=bad)
    with pytest.raises(TypeError, match="pin_memory"):
        RetrievalMemory(window_seconds=2, top_k=1, pin_memory="yes")

    class NoLayers:
        hf_model = torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match="decoder layers"):
        RetrievalMemory(window_seconds=2, top_k=1).open(NoLayers())
    policy = RetrievalMemory(window_seconds=2, top_k=0)
    assert policy.name == "retrieval" and not policy.open(model(QWEN25)).pinned  # CPU: no pinning


def test_block_scores_hand_computed():
    # 4 query heads, 2 KV heads (heads 0,1 -> kv 0; heads 2,3 -> kv 1), 2 tokens, d = 2.
    q = torch.tensor([[[[1., 0.], [3., 0.]], [[0., 2.], [0., 2.]], [[1., 1.], [1., 1.]], [[0., 0.], [4., 0.]]]])
    s = torch.tensor([[[1., 0.], [0., 0.]],    # block 0: only kv head 0, along x
                      [[0., 0.], [0., 1.]],    # block 1: only kv head 1, along y
                      [[0., 1.], [1., 0.]]])   # block 2
    # mean over tokens: h0 (2,0), h1 (0,2), h2 (1,1), h3 (2,0); sum per group / 4 heads
    expected = torch.tensor([(2 + 0) / 4, (1 + 0) / 4, (0 + 2 + 1 + 2) / 4])
    torch.testing.assert_close(block_scores(q, s), expected)
    with pytest.raises(ValueError, match="do not match"):
        block_scores(q[:, :3], s)


# ---- k >= #blocks == full cache ----------------------------------------------------------------------
@pytest.mark.parametrize("arch,dtype,pruned", [(QWEN25, "float64", False), (QWEN25, "float32", True),
                                               (QWEN3, "float64", True), (LLAVA, "float64", False),
                                               (LLAVA, "float32", False)])
def test_retrieving_everything_equals_full_cache(arch, dtype, pruned):
    m = model(arch, dtype)
    frames = video(m, 12)
    pr = (lambda: StandInPruner(keep=2)) if pruned else (lambda: None)
    full = StreamingSession(m, pruner=pr())
    ret = StreamingSession(m, pruner=pr(), memory=RetrievalMemory(window_seconds=1.0, top_k=100))
    for s in (full, ret):
        feed(s, frames, [12])  # one prefill with full attention, then offloading
    stats = ret.stats()
    assert stats["offloaded_blocks"] >= 3 and stats["kv_cache_tokens"] < full.stats()["kv_cache_tokens"]
    a, b = full.question_logits(Q), ret.question_logits(Q)
    if dtype == "float64":
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert ret.stats()["retrieved_blocks_last"] == stats["offloaded_blocks"]
    fa, fb = full.ask(Q, max_new_tokens=6), ret.ask(Q, max_new_tokens=6)
    assert fa.token_ids == fb.token_ids and fa.text == fb.text and len(fa.token_ids) >= 2
    assert ret.stats()["kv_cache_tokens"] == stats["kv_cache_tokens"]


def test_eager_attention_masks_are_widened():
    """Eager attention builds a float mask for every step (generated tokens too)."""
    m = model(QWEN25, "float64", "eager")
    frames = video(m, 10)
    full, ret = StreamingSession(m), StreamingSession(m, memory=RetrievalMemory(window_seconds=1.0, top_k=50))
    for s in (full, ret):
        feed(s, frames, [10])
    assert torch.equal(full.question_logits(Q), ret.question_logits(Q))
    assert full.ask(Q, max_new_tokens=5).token_ids == ret.ask(Q, max_new_tokens=5).token_ids


@pytest.mark.parametrize("arch,block_items", [(QWEN25, 1), (LLAVA, 1), (QWEN3, 2)])
def test_streamed_chunks_equal_windowed_prefill_oracle(arch, block_items):
    m = model(arch)
    fpi = m.frames_per_item
    frames, chunks, window = video(m, 14 * fpi), [3 * fpi, fpi, 4 * fpi + 1, 6 * fpi - 1], 2.0
    ref, evicted, windowed = windowed_reference_logits(m, frames, chunks, window)
    ret = StreamingSession(m, memory=RetrievalMemory(window_seconds=window, top_k=1000, block_items=block_items))
    feed(ret, frames, chunks)
    stats = ret.stats()
    assert stats["offloaded_items"] == evicted - evicted % block_items and evicted >= 6
    assert stats["offloaded_blocks"] == stats["offloaded_items"] // block_items
    if block_items == 1:
        assert torch.equal(ret.question_logits(Q), ref)
        assert stats["kv_cache_tokens"] == windowed.stats()["kv_cache_tokens"]
        # k = 0: prefix + window only, exactly the SlidingWindow session
        none = StreamingSession(m, memory=RetrievalMemory(window_seconds=window, top_k=0))
        feed(none, frames, chunks)
        assert torch.equal(none.question_logits(Q), windowed.question_logits(Q))
        assert none.stats()["retrieved_blocks_last"] == 0
    else:  # one more item may wait in the live cache for its block partner
        assert ret.stats()["live_items"] in (windowed.stats()["items_in_memory"],
                                             windowed.stats()["items_in_memory"] + 1)


# ---- k small: prefix + chosen blocks (original keys) + window ---------------------------------------------
@pytest.mark.parametrize("arch", [QWEN25, QWEN3, LLAVA])
def test_small_k_cache_holds_prefix_chosen_blocks_and_window(arch):
    m, k = model(arch), 2
    frames = video(m, 10 * m.frames_per_item, seed=3)
    full = StreamingSession(m)
    ret = StreamingSession(m, memory=RetrievalMemory(window_seconds=1.0, top_k=k))
    modules = m.attention_modules()
    chunk_hidden = {}  # per layer: the hidden states the full session's video chunk enters with

    def capture_chunk(module, args, kwargs):
        chunk_hidden.setdefault(module.layer_idx, kwargs["hidden_states"])

    handles = [mod.register_forward_pre_hook(capture_chunk, with_kwargs=True) for mod in modules]
    chunk_start = full.memory.length()  # prompt prefix
    try:
        feed(full, frames, [len(frames)])
    finally:
        for h in handles:
            h.remove()
    feed(ret, frames, [len(frames)])
    store = ret.memory
    span = {b.item: (b.start, b.length) for b in full.memory.blocks}
    prefix = full.memory.blocks[0].start
    live_len, n_off = store.length(), len(store.offloaded)
    assert n_off >= 5 and live_len == prefix + sum(b.length for b in store.blocks)
    captured = {}

    def capture(module, args, kwargs):  # registered before the store's hooks: sees the question input
        captured.setdefault(module.layer_idx, kwargs["hidden_states"])

    handles = [mod.register_forward_pre_hook(capture, with_kwargs=True) for mod in modules]
    q = question_input(ret)
    try:
        with store.answering(q) as cache:
            m.forward(q.embeds, q.positions, cache, logits="none")
            inside = [(l.keys.clone(), l.values.clone()) for l in cache.layers]
    finally:
        for h in handles:
            h.remove()
    picks = store.last_retrieved
    full_layers = full.memory.cache.layers
    n_q = q.embeds.shape[0]
    for i, (keys, values) in enumerate(inside):
        items = [store.offloaded[j].first_item for j in picks[i]]
        assert len(items) == k and items == sorted(items)
        chosen = sum(span[it][1] for it in items)
        assert keys.shape[-2] == live_len + chosen + n_q
        fk, fv = full_layers[i].keys, full_layers[i].values
        parts_k = [fk[..., :prefix, :]] + [fk[..., s:s + n, :] for s, n in (span[it] for it in items)]
        parts_v = [fv[..., :prefix, :]] + [fv[..., s:s + n, :] for s, n in (span[it] for it in items)]
        torch.testing.assert_close(keys[..., :prefix + chosen, :], torch.cat(parts_k, -2), rtol=0, atol=0)
        torch.testing.assert_close(values[..., :prefix + chosen, :], torch.cat(parts_v, -2), rtol=0, atol=0)
        window = fk[..., fk.shape[-2] - (live_len - prefix):, :]
        assert torch.equal(keys[..., prefix + chosen:prefix + chosen + window.shape[-2], :], window)
        # Independent choice (ReKV: no rotary embedding on either side): queries from the
        # question's hidden states, block summaries = mean pre-RoPE keys recomputed from the
        # hidden states the full session's prefill fed this layer; GQA by repeat.
        attn = modules[i]

        def heads(proj, norm, hidden, attn=attn):  # called only in this iteration; bind `attn`
            x = proj(hidden).view(1, hidden.shape[1], -1, attn.head_dim)
            return (norm(x) if norm is not None else x).transpose(1, 2)

        x = heads(attn.q_proj, getattr(attn, "q_norm", None), captured[i])
        raw_keys = heads(attn.k_proj, getattr(attn, "k_norm", None), chunk_hidden[i])[0]  # [KVH, chunk, d]
        blocks = [b for b in full.memory.blocks if b.item < store.offloaded[-1].first_item + 1]
        summ = torch.stack([raw_keys[:, b.start - chunk_start:b.start - chunk_start + b.length].mean(1)
                            for b in blocks])  # [N, KVH, d]
        rep = summ.repeat_interleave(x.shape[1] // summ.shape[1], dim=1)
        score = torch.einsum("hld,nhd->n", x[0], rep) / (x.shape[1] * n_q)
        assert sorted(score.topk(k).indices.tolist()) == picks[i]
        torch.testing.assert_close(store.summaries(i), summ.float(), rtol=1e-5, atol=1e-6)
        # the adapter's pre-RoPE query and key paths are the attention's own
        torch.testing.assert_close(m.query_states(attn, captured[i]), x, rtol=0, atol=0)
        torch.testing.assert_close(m.key_states(attn, chunk_hidden[i])[0], raw_keys, rtol=0, atol=0)
    assert any(p != list(range(k)) for p in picks) or n_off == k  # not just the first blocks
    # after answering: [prefix + window] again, offloaded blocks intact
    assert store.length() == live_len and len(store.offloaded) == n_off
    fk = full_layers[-1].keys
    assert torch.equal(store.cache.layers[-1].keys,
                       torch.cat([fk[..., :prefix, :], fk[..., fk.shape[-2] - (live_len - prefix):, :]], -2))
    assert ret.stats()["retrieved_blocks_last"] == k
    small = ret.question_logits(Q)
    assert (small - full.question_logits(Q)).abs().max() > 1e-6  # a different cache, a different answer


# ---- bounded memory over a long stream ----------------------------------------------------------------
@pytest.mark.parametrize("arch,calls", [(QWEN25, 8), (LLAVA, 3)])
def test_device_bytes_flat_cpu_bytes_linear_over_thousands_of_frames(arch, calls):
    m = model(arch, "float32")
    per_call, fps, window = 250, 4.0, 5.0
    frames = video(m, per_call, cells=1)  # Qwen: 1 token per temporal patch; LLaVA: 9 per frame
    ret = StreamingSession(m, memory=RetrievalMemory(window_seconds=window, top_k=3))
    live, off_bytes, off_tokens, cpu = [], [], [], []
    for c in range(calls):  # Qwen: 2,000 frames
        ret.add_frames(frames, c * per_call / fps + np.arange(per_call) / fps)
        s = ret.stats()
        live.append(s["kv_cache_bytes"])
        off_bytes.append(s["offloaded_bytes"])
        off_tokens.append(s["offloaded_tokens"])
        cpu.append(s["cpu_bytes"])
    s = ret.stats()
    item_starts = np.arange(s["items"]) * m.frames_per_item / fps
    window_items = int(np.sum((calls * per_call - 1) / fps - item_starts <= window))
    assert s["frames"] == calls * per_call and s["live_items"] == window_items
    assert s["offloaded_items"] == s["items"] - window_items
    assert len(set(live)) == 1  # the live (device) cache is flat once the window is full
    per_token = off_bytes[-1] / off_tokens[-1]
    assert all(b == t * per_token for b, t in zip(off_bytes, off_tokens))  # linear in offloaded tokens
    steps = np.diff(off_tokens)
    assert len(set(steps.tolist())) == 1 and steps[0] > 0  # the same amount each call
    assert np.all(np.diff(cpu) > 0) and s["device_bytes"] == 0 and s["cpu_bytes"] >= live[-1] + off_bytes[-1]
    ret.ask(Q, max_new_tokens=2)
    assert ret.stats()["retrieved_blocks_last"] == 3 and ret.stats()["kv_cache_bytes"] == live[-1]


# ---- the stream continues; failures leave no trace -------------------------------------------------------
@pytest.mark.parametrize("arch", [QWEN25, LLAVA])
def test_ask_then_continue_equals_never_asked(arch):
    m = model(arch)
    fpi = m.frames_per_item
    frames = video(m, 16 * fpi, seed=5)
    policy = RetrievalMemory(window_seconds=1.5, top_k=2)
    asked, never = StreamingSession(m, memory=policy), StreamingSession(m, memory=policy)
    for s in (asked, never):
        feed(s, frames[:8 * fpi], [8 * fpi])
    asked.ask("First question?", max_new_tokens=4)
    asked.ask("Pick one", options=["red", "blue"], max_new_tokens=1)
    for s in (asked, never):
        s.add_frames(frames[8 * fpi:], (8 * fpi + np.arange(8 * fpi)) / 2.0)
    for a, b in zip(asked.memory.cache.layers, never.memory.cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert len(asked.memory.offloaded) == len(never.memory.offloaded) > 4
    assert all(torch.equal(x.data, y.data) for x, y in zip(asked.memory.offloaded, never.memory.offloaded))
    assert torch.equal(asked.question_logits(Q), never.question_logits(Q))
    assert asked.ask(Q, max_new_tokens=4).token_ids == never.ask(Q, max_new_tokens=4).token_ids


def test_hooks_removed_and_cache_restored_when_forward_raises(monkeypatch):
    m = model(QWEN25)
    frames = video(m, 12)
    session = StreamingSession(m, memory=RetrievalMemory(window_seconds=1.0, top_k=2))
    feed(session, frames, [12])
    modules = m.attention_modules()
    hooks_before = [len(mod._forward_pre_hooks) for mod in modules]
    before = [(l.keys, l.values) for l in session.memory.cache.layers]
    reference = session.question_logits(Q)
    real_forward = m.forward
    calls = []

    def failing_forward(*args, **kwargs):  # runs into the retrieved cache, then fails
        real_forward(*args, **kwargs)
        calls.append([len(mod._forward_pre_hooks) for mod in modules])
        raise RuntimeError("device lost")

    monkeypatch.setattr(m, "forward", failing_forward)
    with pytest.raises(RuntimeError, match="device lost"):
        session.ask(Q)
    monkeypatch.undo()
    assert calls and all(n == b + 1 for n, b in zip(calls[0], hooks_before))  # hooks were live
    assert [len(mod._forward_pre_hooks) for mod in modules] == hooks_before  # and are gone
    for layer, (k, v) in zip(session.memory.cache.layers, before):
        assert layer.keys is k and layer.values is v
    assert torch.equal(session.question_logits(Q), reference)
    assert [len(mod._forward_pre_hooks) for mod in modules] == hooks_before


def test_host_arena_slabs_hold_blocks_without_overlap():
    from streampress.memory.retrieval import _HostArena

    arena = _HostArena(pinned=False, slabs=True)  # the pinned layout, without CUDA
    arena.SLAB = 1024
    shapes = [(3, 5), (7, 9), (100, 3), (2, 2), (300, 2)]  # float32: 60, 252, 1200, 16, 2400 bytes
    blocks = [arena.empty(s, torch.float32) for s in shapes]
    for i, b in enumerate(blocks):
        b.copy_(torch.full(b.shape, float(i)))
    assert all(bool((b == i).all()) and tuple(b.shape) == s for i, (b, s) in enumerate(zip(blocks, shapes)))
    # 60 -> slab 0 (used 256 after alignment), 252 -> slab 0 (512), 1200 -> new 2048 slab,
    # 16 -> same slab, 2400 -> new 4096 slab: slabs are powers of two, at least SLAB
    assert [s.numel() for s in arena.slabs] == [1024, 2048, 4096]
    assert arena.reserved == 1024 + 2048 + 4096
    assert blocks[1].data_ptr() - blocks[0].data_ptr() == 256 and blocks[3].data_ptr() - blocks[2].data_ptr() == 1280
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pin_memory=True needs CUDA"):
            RetrievalMemory(window_seconds=1, top_k=1, pin_memory=True).open(model(QWEN25))


# ---- ReKV scoring: no rotary embedding on either side ------------------------------------------------
@pytest.mark.parametrize("arch", [QWEN25, LLAVA])
def test_identical_items_at_different_times_score_equally(arch):
    """Items 1 and 4 show the same frames; at the first layer their tokens enter with the
    same hidden states, so their summary keys and scores must be equal (before RoPE), and
    only the position differs."""
    m = model(arch)
    frames = video(m, 8 * m.frames_per_item, seed=7)
    fpi = m.frames_per_item
    frames[4 * fpi:5 * fpi] = frames[1 * fpi:2 * fpi]
    ret = StreamingSession(m, memory=RetrievalMemory(window_seconds=0.5, top_k=1))
    feed(ret, frames, [len(frames)])
    store = ret.memory
    firsts = [b.first_item for b in store.offloaded]
    a, b = firsts.index(1), firsts.index(4)
    summ = store.summaries(0)
    # the model's rotary tables are float32: turning back is exact to ~1e-7 relative
    torch.testing.assert_close(summ[a], summ[b], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(summ[a], summ[firsts.index(2)])  # other content, other summary
    queries = torch.randn(1, modules_heads(m), 3, summ.shape[-1], dtype=torch.float64)
    scores = block_scores(queries, summ)
    assert abs(float(scores[a] - scores[b])) < 1e-6 * float(scores.abs().max())


def modules_heads(m) -> int:
    attn = m.attention_modules()[0]
    return attn.q_proj.out_features // attn.head_dim


def test_our_forwards_use_the_models_current_cache_keyword():
    """transformers 5.24 renamed the cache argument (``cache``) and warns on
    ``past_key_values``: no forward of ours may trigger that deprecation."""
    import warnings

    m = model(QWEN25)
    frames = video(m, 8, seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = StreamingSession(m, memory=RetrievalMemory(window_seconds=1.0, top_k=1))
        feed(s, frames, [8])
        s.ask(Q, max_new_tokens=2)
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    assert s.stats()["retrieved_blocks_last"] == 1  # the retrieval hook fired
