"""STC-Cacher work and memory: what the cached paths must NOT do (tiny random models, CPU).

* LLaVA-OneVision through the cacher keeps only the SigLIP hidden state(s) it reads, not every
  encoder layer's output until the tower returns (and the features stay exactly the model's).
* With ``refresh_threshold`` the first block's LN1 and key projection run once per call: the
  refresh test's ``(LN1(x), keys)`` is reused by the block for references and dependents.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

import streampress
import streampress.cacher.cacher as cacher_impl
from _cacher_helpers import reinit
from streampress.cacher import core
from streampress.models.base import VisualBatch
from streampress.models.llava_onevision import LlavaOneVisionAdapter, encode_pixels, feature_capture, siglip_features
from streampress.models.qwen_cacher import QwenBlockParts

# ---- (a) LLaVA-OneVision: only the feature layer's hidden state is kept --------------------

DEPTH = 8


@pytest.fixture(scope="module")
def llava():
    return LlavaOneVisionAdapter.from_random("llava-onevision-tiny", dtype=torch.float32, device="cpu",
                                            vision_depth=DEPTH)


@contextmanager
def peak_hidden_states(tower):
    """Peak number of SigLIP hidden states (embeddings and every layer's output) alive at once,
    sampled whenever one of them is produced."""
    refs, peak = [], [0]

    def hook(module, args, out):
        refs.append(weakref.ref(out[0] if isinstance(out, tuple) else out))
        peak[0] = max(peak[0], sum(r() is not None for r in refs))

    handles = [m.register_forward_hook(hook) for m in (tower.embeddings, *tower.encoder.layers)]
    try:
        yield peak
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("layer", [-1, -3, 0])
def test_llava_cached_encode_keeps_only_the_feature_layer(llava, layer):
    config = llava.hf_model.config
    old_layer = config.vision_feature_layer
    config.vision_feature_layer = layer
    try:
        tower = llava.hf_model.model.vision_tower
        g = torch.Generator().manual_seed(0)
        base = torch.randn(3, 70, 70, generator=g)
        px = torch.stack([base + 0.3 * k * torch.randn(3, 70, 70, generator=g) for k in range(4)])
        batch = VisualBatch(pixel_values=px, grid_thw=None, num_items=4, frame_hw=(70, 70))
        for rho in (1.0, 0.25):
            cacher = streampress.create_cacher(rho=rho, interval=2)
            with peak_hidden_states(tower) as peak:
                grids = llava.encode(batch, cacher_state=cacher.new_state(), cacher=cacher).grids
            # The tower's own frame holds its embeddings; a layer's input and output; the kept ones.
            assert peak[0] <= 4 < DEPTH + 1, f"{peak[0]} of {DEPTH + 1} hidden states alive at once"
            # Exactly the features the model's own hidden_states[layer] gives through the same cacher.
            with torch.no_grad():
                hs = cacher.encode_siglip(tower, px, cacher.new_state(), output_hidden_states=True).hidden_states
                assert torch.equal(grids, encode_pixels(llava.hf_model, px, hidden=hs[layer]))
                if rho == 1.0:  # and the dense features
                    torch.testing.assert_close(grids, llava.encode(batch).grids, atol=1e-5, rtol=1e-5)
        with peak_hidden_states(tower) as peak, torch.no_grad():  # the plain path runs only the blocks it needs
            assert torch.equal(llava.encode(batch).grids,
                               encode_pixels(llava.hf_model, px, hidden=siglip_features(tower, px, layer)))
        assert peak[0] <= 3
    finally:
        config.vision_feature_layer = old_layer


@pytest.mark.parametrize("layer", [-1, -2, 0, [2, -1], [0, 3, -1]])
def test_feature_capture_equals_the_hf_hidden_states(llava, layer):
    tower = llava.hf_model.model.vision_tower
    px = torch.randn(2, 3, 70, 70)
    mods = (tower.embeddings, *tower.encoder.layers)
    with torch.no_grad():
        hs = tower(px, output_hidden_states=True).hidden_states  # (installs HF's own capture hooks)
        hooks = [len(m._forward_hooks) for m in mods]
        with feature_capture(tower, layer) as features, peak_hidden_states(tower) as peak:
            tower(px)
    assert torch.equal(features(), torch.cat([hs[k] for k in layer], -1) if isinstance(layer, list) else hs[layer])
    assert peak[0] <= 3 + (len(layer) if isinstance(layer, list) else 1)
    assert [len(m._forward_hooks) for m in mods] == hooks  # ours removed


# ---- (b) refresh_threshold: LN1 and keys of the first block once per call -------------------

def _siglip():
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                             image_size=28, patch_size=7, vision_use_head=False)
    torch.manual_seed(1)
    tower = reinit(SiglipVisionModel._from_config(cfg), seed=None)

    def scene(n, seed):
        g = torch.Generator().manual_seed(seed)
        cur, out = torch.randn(3, 28, 28, generator=g), []
        for _ in range(n):
            out.append(cur)
            hit = (torch.rand(1, 4, 4, generator=g) < 0.05).repeat_interleave(7, 1).repeat_interleave(7, 2)
            cur = cur + 0.05 * torch.randn(3, 28, 28, generator=g) + hit * 0.2 * torch.randn(3, 28, 28, generator=g)
        return out

    block = tower.encoder.layers[0]
    return dict(tower=tower, tokens=16, items=scene(5, 11) + scene(4, 12), norm1=block.layer_norm1,
                key_modules=[block.self_attn.k_proj], qwen_qkv=None,
                run=lambda c, xs, st: c.encode_siglip(tower, torch.stack(xs), st),
                dense=lambda xs: tower(torch.stack(xs)), field="last_hidden_state")


def _qwen25():
    cfg = Qwen2_5_VLVisionConfig(depth=3, hidden_size=32, num_heads=4, intermediate_size=48, patch_size=14,
                                 spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                                 fullatt_block_indexes=[1], out_hidden_size=64)
    tower = reinit(Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg))
    h = w = 8
    dim = 3 * 2 * 14 * 14

    def scene(n, seed):
        g = torch.Generator().manual_seed(seed)
        cur, out = torch.randn(h * w, dim, generator=g), []
        for _ in range(n):
            out.append(cur)
            hit = torch.rand(h * w, 1, generator=g) < 0.05
            cur = cur + 0.05 * torch.randn(h * w, dim, generator=g) + hit * 0.2 * torch.randn(h * w, dim, generator=g)
        return out

    block = tower.blocks[0]
    return dict(tower=tower, tokens=h * w, items=scene(5, 31) + scene(4, 32), norm1=block.norm1,
                key_modules=[block.attn.qkv], qwen_qkv=block.attn.qkv,
                run=lambda c, xs, st: c.encode(tower, torch.cat(xs), torch.tensor([[len(xs), h, w]]), st),
                dense=lambda xs: tower(torch.cat(xs), grid_thw=torch.tensor([[len(xs), h, w]])),
                field="pooler_output")


# Chunks of one stream (interval 4, scene cut at item 5) and what each call holds:
# [R D D] fresh state | [D] stored | [R] stored, by interval | [R(cut) D] stored | [D D] stored | [R] new state.
CHUNKS = [(0, 3), (3, 4), (4, 5), (5, 7), (7, 9), (0, 1)]


@contextmanager
def first_block_counts(model, monkeypatch):
    """Calls / rows of block 0's LN1 and rows whose keys block 0 projects (SigLIP ``k_proj``;
    Qwen: the fused ``qkv`` and the cacher's key-only slice of it)."""
    counts = {"norm1_calls": 0, "norm1_rows": 0, "key_rows": 0}

    def rows(t):
        return t.numel() // t.shape[-1]

    def on_norm1(module, args, out):
        counts["norm1_calls"] += 1
        counts["norm1_rows"] += rows(args[0])

    def on_keys(module, args, out):
        counts["key_rows"] += rows(args[0])

    handles = [model["norm1"].register_forward_hook(on_norm1)]
    handles += [m.register_forward_hook(on_keys) for m in model["key_modules"]]
    if model["qwen_qkv"] is not None:
        original = QwenBlockParts.k

        def k(self, u):
            if self._qkv is model["qwen_qkv"]:
                counts["key_rows"] += rows(u)
            return original(self, u)

        monkeypatch.setattr(QwenBlockParts, "k", k)
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def _stream(model, cacher, counts=None):
    outs, state = [], cacher.new_state()
    for lo, hi in CHUNKS:
        if lo == 0 and outs:
            state = cacher.new_state()
        before = dict(counts) if counts is not None else None
        with torch.no_grad():
            outs.append(getattr(model["run"](cacher, model["items"][lo:hi], state), model["field"]))
        if counts is not None:
            n = (hi - lo) * model["tokens"]
            got = {k: counts[k] - before[k] for k in counts}
            assert got == {"norm1_calls": 1, "norm1_rows": n, "key_rows": n}, f"call {lo}:{hi}: {got}"
    return outs, state


@pytest.mark.parametrize("rho", [1.0, 0.25])
@pytest.mark.parametrize("build", [_siglip, _qwen25], ids=["siglip", "qwen2.5"])
def test_refresh_computes_first_block_ln1_and_keys_once(build, rho, monkeypatch):
    model = build()
    cacher = streampress.create_cacher(rho=rho, interval=4, refresh_threshold=0.8)
    with first_block_counts(model, monkeypatch) as counts:
        outs, state = _stream(model, cacher, counts)
    assert state.stats.items == 1  # the last chunk starts a new stream
    if rho == 1.0:  # everything recomputed: the dense tower
        with torch.no_grad():
            dense = getattr(model["dense"](model["items"]), model["field"])
        torch.testing.assert_close(torch.cat(outs[:-1]), dense, atol=1e-5, rtol=1e-5)
    else:  # the same stream as without the pass-through (each block computes its own LN1 and keys)
        monkeypatch.setattr(cacher_impl, "dense_block",
                            lambda *a, prepared=None, **kw: core.dense_block(*a, **kw))
        monkeypatch.setattr(cacher_impl, "selective_block",
                            lambda *a, prepared=None, **kw: core.selective_block(*a, **kw))
        plain, _ = _stream(model, cacher)
        for got, want in zip(outs, plain):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    probe = cacher.new_state()
    with torch.no_grad():
        model["run"](cacher, model["items"][:9], probe)
    assert probe.stats.refreshes == 1 and probe.stats.references == 3  # items 0, 4 (interval), 5 (cut)
