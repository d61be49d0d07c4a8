"""STC-Cacher on a tiny SigLIP tower (LLaVA-OneVision's encoder; one item = one frame)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import SiglipVisionConfig, SiglipVisionModel

import streampress
from _cacher_helpers import literal_block, reinit


@pytest.fixture(scope="module")
def tower():
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                             image_size=28, patch_size=7, vision_use_head=False)
    torch.manual_seed(1)
    return reinit(SiglipVisionModel._from_config(cfg), seed=None)


def frames(n, seed=0, change=0.3, amount=1.0):
    """n frames [3, 28, 28]: a drifting base image with a few 7x7 patches that change a lot."""
    g = torch.Generator().manual_seed(seed)
    cur = torch.randn(3, 28, 28, generator=g)
    out = []
    for _ in range(n):
        out.append(cur)
        hit = (torch.rand(1, 4, 4, generator=g) < change).repeat_interleave(7, 1).repeat_interleave(7, 2)
        cur = cur + 0.05 * torch.randn(3, 28, 28, generator=g) + hit * amount * torch.randn(3, 28, 28, generator=g)
    return torch.stack(out)


def dense(model, px):
    with torch.no_grad():
        return model(px, output_hidden_states=True)


def _same(a, b, atol=1e-5):
    assert type(a) is type(b)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, atol=atol, rtol=1e-5)
    assert len(a.hidden_states) == len(b.hidden_states)
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("rho,interval", [(1.0, 2), (1.0, 4), (0.1, 1)])
def test_full_recompute_equals_dense(tower, rho, interval):
    px = frames(5)
    cacher = streampress.create_cacher(rho=rho, interval=interval)
    state = cacher.new_state()
    _same(cacher.encode_siglip(tower, px, state, output_hidden_states=True), dense(tower, px))
    assert state.stats.recompute_fraction == 1.0


def test_static_video_is_exact(tower):
    px = frames(1, seed=2).repeat(5, 1, 1, 1)
    cacher = streampress.create_cacher(rho=0.1, interval=5)
    state = cacher.new_state()
    _same(cacher.encode(tower, px, None, state, output_hidden_states=True), dense(tower, px))
    assert state.stats.references == 1


def _oracle(model, px, rho, interval):
    """ALGORITHMS.md section 5, literally: dense per frame, then mixed with the reference."""
    x_all = model.embeddings(px)
    n, t, _ = x_all.shape
    count = max(1, int(rho * t))
    refs, outs = [None] * len(model.encoder.layers), []
    for i in range(n):
        x = x_all[i]
        for b, layer in enumerate(model.encoder.layers):
            at = layer.self_attn
            u = layer.layer_norm1(x)
            q, k, v = (p(u).view(t, at.num_heads, -1) for p in (at.q_proj, at.k_proj, at.v_proj))
            probs = (torch.einsum("qhd,khd->hqk", q, k) * at.scale).softmax(-1)
            x, refs[b] = literal_block(x, k, v, probs, at.out_proj,
                                       lambda h, layer=layer: layer.mlp(layer.layer_norm2(h)),
                                       None if i % interval == 0 else refs[b], count)
        outs.append(x)
    return torch.stack(outs)


@pytest.mark.parametrize("rho,interval", [(0.25, 2), (0.5, 3)])
def test_matches_literal_algorithm(tower, rho, interval):
    px = frames(6, seed=4)
    with torch.no_grad():
        expect = _oracle(tower, px, rho, interval)
    cacher = streampress.create_cacher(rho=rho, interval=interval)
    out = cacher.encode_siglip(tower, px, cacher.new_state(), output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[-1], expect, atol=1e-4, rtol=1e-4)
    d = dense(tower, px).last_hidden_state
    cos = F.cosine_similarity(out.last_hidden_state.flatten(1), d.flatten(1), dim=-1)
    assert (out.last_hidden_state - d).abs().max() > 1e-3 and cos.min() > 0.8


def test_chunks_and_interleaved_streams(tower):
    a, b = frames(5, seed=8), frames(5, seed=9)
    cacher = streampress.create_cacher(rho=0.25, interval=2)
    one_a = cacher.encode_siglip(tower, a, cacher.new_state()).last_hidden_state
    one_b = cacher.encode_siglip(tower, b, cacher.new_state()).last_hidden_state
    sa, sb = cacher.new_state(), cacher.new_state()
    got_a, got_b = [], []
    for lo, hi in ((0, 1), (1, 3), (3, 5)):
        got_a.append(cacher.encode_siglip(tower, a[lo:hi], sa).last_hidden_state)
        got_b.append(cacher.encode_siglip(tower, b[lo:hi], sb).last_hidden_state)
    torch.testing.assert_close(torch.cat(got_a), one_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(got_b), one_b, atol=1e-5, rtol=1e-5)
    assert sa.stats.references == sb.stats.references == 3


def test_scene_cut_triggers_refresh(tower):
    px = torch.cat([frames(3, seed=11, change=0.05, amount=0.2), frames(2, seed=12, change=0.05, amount=0.2)])
    cacher = streampress.create_cacher(rho=0.2, interval=50, refresh_threshold=0.8)
    state = cacher.new_state()
    out = cacher.encode_siglip(tower, px, state).last_hidden_state
    sims = state.stats.first_block_similarity
    assert min(sims[0], sims[1], sims[3]) > 0.8 > sims[2]
    assert state.stats.refreshes == 1 and state.stats.references == 2
    torch.testing.assert_close(out[3], dense(tower, px).last_hidden_state[3], atol=1e-5, rtol=1e-5)


def test_bad_input_keeps_state(tower):
    cacher = streampress.create_cacher()
    state = cacher.new_state()
    cacher.encode_siglip(tower, frames(1), state)
    with pytest.raises(ValueError, match="pixel_values"):
        cacher.encode_siglip(tower, torch.zeros(3, 28, 28), state)
    assert state.stats.items == 1 and state.items_since_reference == 1
    assert all("forward" not in layer.__dict__ for layer in tower.encoder.layers)


def test_one_frame_per_call(tower):
    """A call of dependent frames only (SigLIP hands the blocks a transposed, non-contiguous view)."""
    px = frames(4, seed=13)
    cacher = streampress.create_cacher(rho=0.25, interval=2)
    whole = cacher.encode_siglip(tower, px, cacher.new_state()).last_hidden_state
    state = cacher.new_state()
    got = torch.cat([cacher.encode_siglip(tower, px[i:i + 1], state).last_hidden_state for i in range(4)])
    torch.testing.assert_close(got, whole, atol=1e-5, rtol=1e-5)
    assert state.stats.references == 2
