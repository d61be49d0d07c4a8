"""STC-Cacher on tiny Qwen2.5-VL and Qwen3-VL vision towers (CPU, seconds).

Oracles: the dense tower itself (rho = 1, N = 1, static video), a slow per-item
re-statement of ALGORITHMS.md section 5 (rho < 1), and the same stream fed in other
chunkings / interleaved with another stream.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
    Qwen2_5_VLVisionConfig,
)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    apply_rotary_pos_emb_vision,
)
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VisionTransformerPretrainedModel,
)
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

import streampress
from _cacher_helpers import literal_block, reinit

PATCH_DIM = 3 * 2 * 14 * 14


def qwen25(window=56):
    cfg = Qwen2_5_VLVisionConfig(depth=3, hidden_size=32, num_heads=4, intermediate_size=48, patch_size=14,
                                 spatial_merge_size=2, temporal_patch_size=2, window_size=window,
                                 fullatt_block_indexes=[1], out_hidden_size=64)
    return reinit(Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg))


def qwen3():
    cfg = Qwen3VLVisionConfig(depth=3, hidden_size=32, num_heads=4, intermediate_size=48, patch_size=14,
                              spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                              num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
    return reinit(Qwen3VLVisionModel._from_config(cfg))


def qwen2():
    cfg = Qwen2VLVisionConfig(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2, patch_size=14,
                              spatial_merge_size=2, temporal_patch_size=2, hidden_size=64)
    return reinit(Qwen2VisionTransformerPretrainedModel._from_config(cfg))


def moving_items(n, h, w, seed=0, change=0.25, amount=0.6):
    """n temporal patches: a base item whose patches drift a little, a few change a lot."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(h * w, PATCH_DIM, generator=g)
    items, cur = [], base
    for _ in range(n):
        items.append(cur)
        noise = 0.05 * torch.randn(h * w, PATCH_DIM, generator=g)
        hit = torch.rand(h * w, 1, generator=g) < change
        cur = cur + noise + hit * amount * torch.randn(h * w, PATCH_DIM, generator=g)
    return items


def run_dense(model, items, h, w):
    with torch.no_grad():
        return model(torch.cat(items), grid_thw=torch.tensor([[len(items), h, w]]))


def run_cached(cacher, model, items, h, w, state=None, chunks=None):
    state = state if state is not None else cacher.new_state()
    chunks = chunks or [len(items)]
    outs, i = [], 0
    for c in chunks:
        outs.append(cacher.encode(model, torch.cat(items[i:i + c]), torch.tensor([[c, h, w]]), state))
        i += c
    return outs, state


def cat_field(outs, name):
    return torch.cat([getattr(o, name) for o in outs])


MODELS = {"qwen2.5-aligned": (lambda: qwen25(56), 8, 8),        # equal windows of 16 tokens
          "qwen2.5-ragged": (lambda: qwen25(56), 6, 10),        # windows of 16, 8 and 4 tokens
          "qwen3": (qwen3, 8, 8),
          "qwen2": (qwen2, 8, 8)}


@pytest.fixture(scope="module", params=list(MODELS))
def tower(request):
    build, h, w = MODELS[request.param]
    return build(), h, w


def _assert_same(out, ref, atol=1e-5):
    assert type(out) is type(ref)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=atol, rtol=1e-5)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=atol, rtol=1e-5)
    if hasattr(ref, "deepstack_features"):
        assert len(out.deepstack_features) == len(ref.deepstack_features) == 2
        for a, b in zip(out.deepstack_features, ref.deepstack_features):
            torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("rho,interval", [(1.0, 2), (1.0, 3), (0.25, 1), (0.5, 1)])
def test_full_recompute_equals_dense(tower, rho, interval):
    model, h, w = tower
    items = moving_items(5, h, w)
    dense = run_dense(model, items, h, w)
    cacher = streampress.create_cacher(rho=rho, interval=interval)
    (out,), state = run_cached(cacher, model, items, h, w)
    _assert_same(out, dense)
    assert state.stats.recompute_fraction == 1.0
    assert state.stats.references == (5 if interval == 1 else -(-5 // interval))


def test_static_video_is_exact_at_any_rho(tower):
    model, h, w = tower
    item = moving_items(1, h, w, seed=3)[0]
    items = [item] * 6
    dense = run_dense(model, items, h, w)
    cacher = streampress.create_cacher(rho=0.1, interval=6)
    outs, state = run_cached(cacher, model, items, h, w, chunks=[2, 4])
    _assert_same(outs[0], run_dense(model, items[:2], h, w))
    torch.testing.assert_close(cat_field(outs, "pooler_output"), dense.pooler_output, atol=1e-5, rtol=1e-5)
    assert state.stats.references == 1 and state.stats.recompute_fraction < 0.4


def test_partial_recompute_is_close_but_not_dense(tower):
    model, h, w = tower
    items = moving_items(4, h, w, seed=5)
    dense = run_dense(model, items, h, w)
    (out,), state = run_cached(streampress.create_cacher(rho=0.25, interval=4), model, items, h, w)
    t = h * w
    first = slice(0, t // 4)  # item 0 (merged tokens) is the reference: exact
    torch.testing.assert_close(out.pooler_output[first], dense.pooler_output[first], atol=1e-5, rtol=1e-5)
    diff = (out.pooler_output[t // 4:] - dense.pooler_output[t // 4:]).abs().max()
    cos = F.cosine_similarity(out.pooler_output, dense.pooler_output, dim=-1).mean()
    assert diff > 1e-3 and cos > 0.9
    # per block: the reference recomputes t tokens, each of 3 dependents floor(0.25 t)
    assert abs(state.stats.recompute_fraction - (t + 3 * (t // 4)) / (4 * t)) < 1e-12


# ---- a slow, literal statement of ALGORITHMS.md section 5 as the oracle ----------------
def _capture_block_inputs(model, items, h, w):
    """Block inputs of a dense run: x of block 0, and cu_seqlens / RoPE of every block."""
    seen = []

    def pre(mod, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"], kwargs["cu_seqlens"],
                     kwargs["position_embeddings"]))

    hooks = [b.register_forward_pre_hook(pre, with_kwargs=True) for b in model.blocks]
    try:
        out = run_dense(model, items, h, w)
    finally:
        for hk in hooks:
            hk.remove()
    return out, seen


def _oracle(model, items, h, w, rho, interval):
    """Per item, per block, everything dense, then mixed with the reference as the spec says."""
    _dense, seen = _capture_block_inputs(model, items, h, w)
    t = h * w
    x_all = seen[0][0].view(len(items), t, -1)
    count = max(1, int(rho * t))
    refs = [None] * len(model.blocks)
    outs = []
    for i in range(len(items)):
        x = x_all[i]
        is_ref = i % interval == 0
        for b, blk in enumerate(model.blocks):
            cu, (cos, sin) = seen[b][1], seen[b][2]
            seg = torch.bucketize(torch.arange(t), cu[cu <= t][1:], right=True)
            allowed = seg[:, None] == seg[None, :]
            u = blk.norm1(x)
            q, k, v = blk.attn.qkv(u).reshape(t, 3, blk.attn.num_heads, -1).unbind(1)
            q, k = apply_rotary_pos_emb_vision(q, k, cos[:t], sin[:t])
            scores = torch.einsum("qhd,khd->hqk", q, k) * blk.attn.scaling
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            x, refs[b] = literal_block(x, k, v, probs, blk.attn.proj, lambda hh, blk=blk: blk.mlp(blk.norm2(hh)),
                                       None if is_ref else refs[b], count)
        outs.append(x)
    return torch.cat(outs)


@pytest.mark.parametrize("rho,interval", [(0.25, 2), (0.4, 3)])
def test_matches_literal_algorithm(tower, rho, interval):
    model, h, w = tower
    items = moving_items(5, h, w, seed=7)
    with torch.no_grad():
        expect = _oracle(model, items, h, w, rho, interval)
    (out,), _ = run_cached(streampress.create_cacher(rho=rho, interval=interval), model, items, h, w)
    torch.testing.assert_close(out.last_hidden_state, expect, atol=1e-4, rtol=1e-4)


def test_chunking_does_not_change_the_stream(tower):
    model, h, w = tower
    items = moving_items(7, h, w, seed=11)
    cacher = streampress.create_cacher(rho=0.3, interval=3)
    (one,), s1 = run_cached(cacher, model, items, h, w)
    for chunks in ([1] * 7, [2, 4, 1], [3, 3, 1]):
        outs, s2 = run_cached(cacher, model, items, h, w, chunks=chunks)
        torch.testing.assert_close(cat_field(outs, "pooler_output"), one.pooler_output, atol=1e-5, rtol=1e-5)
        assert s2.stats.as_dict() == s1.stats.as_dict()


def test_streams_are_independent(tower):
    model, h, w = tower
    a, b = moving_items(4, h, w, seed=21), moving_items(4, h, w, seed=22)
    cacher = streampress.create_cacher(rho=0.25, interval=2)
    alone_a, _ = run_cached(cacher, model, a, h, w, chunks=[1] * 4)
    alone_b, _ = run_cached(cacher, model, b, h, w, chunks=[1] * 4)
    sa, sb = cacher.new_state(), cacher.new_state()
    for i in range(4):
        oa = cacher.encode(model, a[i], torch.tensor([[1, h, w]]), sa)
        ob = cacher.encode(model, b[i], torch.tensor([[1, h, w]]), sb)
        torch.testing.assert_close(oa.pooler_output, alone_a[i].pooler_output, atol=0, rtol=0)
        torch.testing.assert_close(ob.pooler_output, alone_b[i].pooler_output, atol=0, rtol=0)
    sa.reset()  # a reset stream starts with a reference again
    out = cacher.encode(model, b[1], torch.tensor([[1, h, w]]), sa)
    _assert_same(out, run_dense(model, [b[1]], h, w))


def test_scene_cut_triggers_refresh(tower):
    model, h, w = tower
    scene1 = moving_items(3, h, w, seed=31, change=0.05, amount=0.2)
    scene2 = moving_items(3, h, w, seed=32, change=0.05, amount=0.2)
    items = scene1 + scene2
    dense = run_dense(model, items, h, w)
    per = h * w // 4
    plain = streampress.create_cacher(rho=0.25, interval=100)
    (out_plain,), s_plain = run_cached(plain, model, items, h, w)
    cut = slice(3 * per, 4 * per)
    assert (out_plain.pooler_output[cut] - dense.pooler_output[cut]).abs().max() > 1e-3
    assert s_plain.stats.refreshes == 0
    cacher = streampress.create_cacher(rho=0.25, interval=100, refresh_threshold=0.8)
    outs, state = run_cached(cacher, model, items, h, w, chunks=[2, 4])
    sims = state.stats.first_block_similarity
    assert len(sims) == 5 and min(sims[0], sims[1], sims[3], sims[4]) > 0.8 > sims[2]
    assert state.stats.refreshes == 1 and state.stats.references == 2
    got = cat_field(outs, "pooler_output")
    torch.testing.assert_close(got[cut], dense.pooler_output[cut], atol=1e-5, rtol=1e-5)  # item 3 recomputed in full
    assert state.items_since_reference == 3


def test_bad_call_leaves_state_unchanged():
    model, h, w = qwen25(), 8, 8
    items = moving_items(3, h, w)
    cacher = streampress.create_cacher()
    _, state = run_cached(cacher, model, items[:1], h, w)
    before = (state.items_since_reference, state.stats.as_dict(), [r.k.clone() for r in state._blocks])
    with pytest.raises(ValueError, match="pixel_values"):
        cacher.encode(model, torch.cat(items[1:]), torch.tensor([[3, h, w]]), state)  # 2 items of pixels, 3 in grid
    with pytest.raises(ValueError, match="grid_thw"):
        cacher.encode(model, torch.cat(items[1:]), torch.tensor([[1, h, w], [1, h, w + 2]]), state)
    with pytest.raises(ValueError, match="grid_thw"):
        cacher.encode(model, items[1], None, state)
    with pytest.raises(TypeError, match="state"):
        cacher.encode(model, items[1], torch.tensor([[1, h, w]]), None)
    assert state.items_since_reference == before[0] and state.stats.as_dict() == before[1]
    assert all(torch.equal(a, r.k) for a, r in zip(before[2], state._blocks))
    assert all("forward" not in b.__dict__ for b in model.blocks)


def test_grid_change_starts_a_new_reference():
    model = qwen25()
    cacher = streampress.create_cacher(rho=0.25, interval=4)
    state = cacher.new_state()
    cacher.encode(model, torch.cat(moving_items(1, 8, 8)), torch.tensor([[1, 8, 8]]), state)
    small = moving_items(1, 4, 8, seed=4)
    out = cacher.encode(model, small[0], torch.tensor([[1, 4, 8]]), state)
    _assert_same(out, run_dense(model, small, 4, 8))
    assert state.stats.references == 2


def test_new_reference_frees_the_old_one_block_by_block():
    model, h, w = qwen25(), 8, 8
    items = moving_items(4, h, w, seed=5)
    cacher = streampress.create_cacher(rho=0.25, interval=2)
    _, state = run_cached(cacher, model, items[:2], h, w, chunks=[1, 1])
    old = list(state._blocks)
    seen = []
    hooks = [blk.register_forward_pre_hook(lambda m, a, b=b: seen.append((b, [r is None for r in state._blocks])))
             for b, blk in enumerate(model.blocks)]
    try:
        out = cacher.encode(model, items[2], torch.tensor([[1, h, w]]), state)  # item 2: a new reference
    finally:
        for hk in hooks:
            hk.remove()
    # entering block b, the old reference's blocks before b are already freed, the rest still held
    assert seen == [(b, [j < b for j in range(len(model.blocks))]) for b in range(len(model.blocks))]
    assert all(r is not None and r is not o for r, o in zip(state._blocks, old))
    _assert_same(out, run_dense(model, items[2:3], h, w))
    # a dependent call frees nothing and uses the new reference: same as the stream in one call
    out3 = cacher.encode(model, items[3], torch.tensor([[1, h, w]]), state)
    whole, _ = run_cached(cacher, model, items, h, w)
    torch.testing.assert_close(out3.pooler_output, whole[0].pooler_output[-16:], atol=1e-5, rtol=1e-5)


def test_failure_inside_the_tower_never_leaves_a_half_replaced_reference():
    model, h, w = qwen25(), 8, 8
    items = moving_items(4, h, w, seed=6)
    cacher = streampress.create_cacher(rho=0.25, interval=2)
    _, state = run_cached(cacher, model, items[:1], h, w)

    def boom(*_):
        raise RuntimeError("boom")

    # a failing dependent call frees nothing: the reference and counters stay as they were
    keys = [r.k.clone() for r in state._blocks]
    hook = model.blocks[2].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        cacher.encode(model, items[1], torch.tensor([[1, h, w]]), state)
    hook.remove()
    assert state.items_since_reference == 1 and state.stats.items == 1
    assert all(torch.equal(a, r.k) for a, r in zip(keys, state._blocks))

    # a failing reference call (it had freed blocks 0 and 1) drops the reference whole
    cacher.encode(model, items[1], torch.tensor([[1, h, w]]), state)
    hook = model.blocks[2].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        cacher.encode(model, items[2], torch.tensor([[1, h, w]]), state)
    hook.remove()
    assert not state.has_reference and state.items_since_reference == 0
    assert state.stats.items == 2 and state.stats.references == 1
    # the next item is computed in full, and the stream goes on as a fresh one
    out = cacher.encode(model, items[3], torch.tensor([[1, h, w]]), state)
    _assert_same(out, run_dense(model, items[3:4], h, w))
    assert state.stats.references == 2 and state.has_reference
    assert all("forward" not in b.__dict__ for b in model.blocks)
