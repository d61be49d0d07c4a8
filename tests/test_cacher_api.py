"""STC-Cacher API: parameters, per-stream state, attaching to whole Hugging Face models."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionModel
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

import streampress
from _cacher_helpers import reinit
from streampress.cacher import CacherState, StcCacher


@pytest.mark.parametrize("kw", [{"rho": 0}, {"rho": 1.5}, {"rho": -0.2}, {"rho": "0.5"}, {"rho": True},
                                {"rho": float("nan")}, {"interval": 0}, {"interval": 2.0}, {"interval": True},
                                {"refresh_threshold": 1.5}, {"refresh_threshold": "x"},
                                {"refresh_threshold": float("nan")}])
def test_bad_parameters_rejected(kw):
    name = next(iter(kw))
    with pytest.raises(ValueError, match=name):
        streampress.create_cacher(**kw)


def test_defaults_and_params():
    c = streampress.create_cacher()
    assert isinstance(c, StcCacher) and c.params == {"rho": 0.25, "interval": 2, "refresh_threshold": None}
    c = streampress.create_cacher(rho=1, interval=5, refresh_threshold=-1)
    assert c.params == {"rho": 1.0, "interval": 5, "refresh_threshold": -1.0}
    state = c.new_state()
    assert isinstance(state, CacherState) and not state.has_reference and state.stats.items == 0
    with pytest.raises(TypeError, match="nn.Module"):
        c.encode("not a model", torch.zeros(1), None, state)
    with pytest.raises(ValueError, match="vision tower"):
        c.encode(torch.nn.Linear(2, 2), torch.zeros(1), None, state)
    with pytest.raises(TypeError, match="state"):
        c.attach(torch.nn.Linear(2, 2), state="s")


@pytest.fixture(scope="module")
def qwen_model():
    text = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]}}
    vision = {"depth": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 48, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56, "fullatt_block_indexes": [1],
              "out_hidden_size": 64}
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=120, video_token_id=121,
                           vision_start_token_id=122)
    return reinit(Qwen2_5_VLModel(cfg))


def _snapshot(module):
    return [(m, dict(m.__dict__)) for m in module.modules()]


def _assert_restored(snapshot, module):
    now = list(module.modules())
    assert [m for m, _ in snapshot] == now  # the very same module objects, in the same places
    for m, d in snapshot:
        assert "forward" not in m.__dict__
        assert m.forward.__func__ is type(m).forward
        assert set(m.__dict__) == set(d)


def test_attach_routes_qwen_video_features_and_restores(qwen_model):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 1176, generator=g)
    px = torch.cat([base, base + 0.3 * torch.randn(64, 1176, generator=g), base, base * 0.5])
    grid = torch.tensor([[4, 8, 8]])
    with torch.no_grad():
        dense = qwen_model.get_video_features(px, grid).pooler_output
    cacher = streampress.create_cacher(rho=0.25, interval=2)
    expect = cacher.encode(qwen_model.visual, px, grid, cacher.new_state()).pooler_output
    snap = _snapshot(qwen_model)
    with cacher.attach(qwen_model) as handle:
        assert handle.module is qwen_model.visual
        got = qwen_model.get_video_features(px, grid).pooler_output
        assert handle.state.stats.items == 4 and handle.state.stats.references == 2
        # the same tower through encode() with another stream while attached
        other = cacher.encode(qwen_model.visual, px, grid, cacher.new_state()).pooler_output
        with pytest.raises(RuntimeError, match="already attached"):
            cacher.attach(qwen_model)
    _assert_restored(snap, qwen_model)
    torch.testing.assert_close(torch.cat(got), expect, atol=0, rtol=0)
    torch.testing.assert_close(other, expect, atol=0, rtol=0)
    assert (torch.cat(got) - torch.cat(dense)).abs().max() > 1e-4
    with torch.no_grad():  # and the model is dense again
        torch.testing.assert_close(torch.cat(qwen_model.get_video_features(px, grid).pooler_output), torch.cat(dense))


def test_detach_on_error_and_explicit_detach(qwen_model):
    snap = _snapshot(qwen_model)
    with pytest.raises(KeyError), streampress.create_cacher().attach(qwen_model):
        raise KeyError("boom")
    _assert_restored(snap, qwen_model)
    handle = streampress.create_cacher().attach(qwen_model.visual, state=None)
    assert all("forward" in b.__dict__ for b in qwen_model.visual.blocks)
    handle.detach()
    handle.detach()
    _assert_restored(snap, qwen_model)


def test_attach_to_llava_onevision_uses_its_feature_layer():
    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
                  "num_attention_heads": 4, "image_size": 28, "patch_size": 7, "vision_use_head": False}
    text = {"model_type": "qwen2", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
                "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                               vision_feature_select_strategy="full", image_token_index=120, video_token_index=121)
    model = reinit(LlavaOnevisionModel(cfg))
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 28, 28, generator=g)
    video = torch.stack([base, base + 0.5 * torch.randn(3, 28, 28, generator=g), base * 0.8])[None]
    cacher = streampress.create_cacher(rho=0.25, interval=3)
    out = cacher.encode_siglip(model.vision_tower, video[0], cacher.new_state(), output_hidden_states=True)
    with torch.no_grad():
        feats = model.apply_pooling(model.multi_modal_projector(out.hidden_states[-2]))
        dense = model.get_video_features(video).pooler_output
    snap = _snapshot(model)
    with cacher.attach(model) as handle, torch.no_grad():
        got = model.get_video_features(video).pooler_output
    _assert_restored(snap, model)
    assert handle.state.stats.items == 3
    torch.testing.assert_close(got[0, :-1], feats.reshape(-1, feats.shape[-1]), atol=1e-6, rtol=1e-6)
    assert (got - dense).abs().max() > 1e-4
