"""Qwen adapters: random architectures, tokenizer, preprocessing vs Hugging Face, positions."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from _model_helpers import tiny
from _qwen_oracle import ARCHS, frames_for, one_shot_inputs
from streampress.models import list_families, list_random_architectures, load_model
from streampress.models.base import VISUAL, PositionState
from streampress.models.qwen import prompt_pieces
from streampress.models.qwen_preprocess import QwenVisionParams, preprocess_frames, smart_resize
from streampress.models.random.qwen import build_config
from streampress.models.tokenizer import ByteTokenizer


# ---- registry, configs, tokenizer ------------------------------------------------------------
def test_registry_lists_families_and_random_archs():
    names = {f["name"] for f in list_families()}
    assert {"qwen", "llava_onevision"} <= names
    assert {"random:qwen2.5-vl-tiny", "random:qwen3-vl-tiny", "random:qwen2.5-vl-7b",
            "random:qwen2.5-vl-3b"} <= set(list_random_architectures())
    # the registry's names (listed without torch) are exactly what the random builders build
    from streampress.models.random import llava_onevision, qwen
    assert set(list_random_architectures()) == {f"random:{a}" for a in qwen.ARCHS + llava_onevision.ARCHS}
    with pytest.raises(ValueError, match="unknown random architecture"):
        load_model("random:qwen9-vl")
    with pytest.raises(ValueError, match="without config.json"):
        load_model(".")
    with pytest.raises(TypeError, match="unknown keyword"):
        load_model("random:qwen2.5-vl-tiny", not_a_field=1)


@pytest.mark.parametrize("arch,hidden,heads,kv,mlp,out", [
    ("qwen2.5-vl-7b", 3584, 28, 4, 18944, 3584), ("qwen2.5-vl-3b", 2048, 16, 2, 11008, 2048)])
def test_real_size_configs_have_the_checkpoint_shapes(arch, hidden, heads, kv, mlp, out):
    cfg = build_config(arch)
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size) == (
        hidden, heads, kv, mlp)
    assert (v.hidden_size, v.num_heads, v.intermediate_size, v.window_size, v.out_hidden_size) == (
        1280, 16, 3420, 112, out)
    assert list(v.fullatt_block_indexes) == [7, 15, 23, 31] and v.depth == 32 and v.tokens_per_second == 2
    assert sum(t.rope_parameters["mrope_section"]) == hidden // heads // 2
    cut = build_config(arch, num_layers=3, vision_depth=9)
    assert cut.text_config.num_hidden_layers == 3 and list(cut.vision_config.fullatt_block_indexes) == [7]
    assert list(build_config(arch, vision_depth=2).vision_config.fullatt_block_indexes) == [1]
    m = load_model(f"random:{arch}", device="meta", num_layers=1, vision_depth=1)
    tied = m.hf_model.lm_head.weight is m.hf_model.model.language_model.embed_tokens.weight
    assert tied == (arch == "qwen2.5-vl-3b")  # the 3B checkpoint ties its embeddings


def test_cut_7b_builds_with_real_layer_shapes():
    m = load_model("random:qwen2.5-vl-7b", dtype="bfloat16", device="meta", num_layers=1, vision_depth=1)
    lm = m.hf_model.model.language_model.layers[0]
    assert tuple(lm.self_attn.q_proj.weight.shape) == (3584, 3584)
    assert tuple(lm.self_attn.k_proj.weight.shape) == (512, 3584)
    assert tuple(lm.mlp.gate_proj.weight.shape) == (18944, 3584)
    blk = m.hf_model.model.visual.blocks[0]
    assert tuple(blk.attn.qkv.weight.shape) == (3840, 1280) and tuple(blk.mlp.up_proj.weight.shape) == (3420, 1280)
    assert tuple(m.hf_model.lm_head.weight.shape) == (152064, 3584) and lm.mlp.gate_proj.weight.dtype == torch.bfloat16
    assert m.hf_model.model.language_model.rotary_emb.inv_freq.dtype == torch.float32


def test_random_weights_are_filled_cheaply_with_the_init_std():
    m = load_model("random:qwen2.5-vl-tiny", dtype="float32", device="cpu", seed=3)
    w = torch.cat([p.detach().reshape(-1) for n, p in m.hf_model.named_parameters() if n.endswith("proj.weight")])
    assert 0.019 < w.std().item() < 0.021 and w.abs().max().item() <= 0.02 * 3 ** 0.5  # uniform, std 0.02
    norms = [p for n, p in m.hf_model.named_parameters() if "norm" in n]
    assert norms and all(bool((p == 1).all()) for p in norms)
    again = load_model("random:qwen2.5-vl-tiny", dtype="float32", device="cpu", seed=3)
    assert torch.equal(again.hf_model.lm_head.weight, m.hf_model.lm_head.weight)  # seeded


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    ids = tok.encode("<|im_start|>héllo<|vision_start|>")
    assert ids[0] == tok.token_id("<|im_start|>") and ids[-1] == tok.token_id("<|vision_start|>")
    assert ids[1:-1] == list("héllo".encode())
    assert tok.decode(ids) == "héllo"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>héllo<|vision_start|>"
    assert tok.decode([104, 400, 105]) == "hi"  # ids beyond the vocabulary are skipped
    cfg = build_config("qwen3-vl-tiny")
    special = [cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id]
    assert len(set(special)) == 4 and max(special) < cfg.text_config.vocab_size
    assert cfg.text_config.pad_token_id not in special


# ---- preprocessing -----------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("hw", [(448, 448), (360, 640), (1080, 1920), (20, 30), (100, 2000), (57, 57)])
def test_smart_resize_matches_hf(model_type, hw):
    params = QwenVisionParams.defaults(model_type)
    if model_type == "qwen3_vl":
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf

        expected = hf(2, *hw, temporal_factor=2, factor=32, min_pixels=params.min_pixels,
                      max_pixels=params.max_pixels)
    else:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf

        expected = hf(*hw, factor=28, min_pixels=params.min_pixels, max_pixels=params.max_pixels)
    assert smart_resize(*hw, params) == tuple(expected)


def test_448_frames_give_16x16_grids():
    assert smart_resize(448, 448, QwenVisionParams.defaults("qwen2_5_vl")) == (448, 448)
    pv, grid, _ = preprocess_frames(torch.zeros(4, 448, 448, 3, dtype=torch.uint8),
                                    QwenVisionParams.defaults("qwen2_5_vl"))
    assert grid.tolist() == [[2, 32, 32]] and tuple(pv.shape) == (2 * 32 * 32, 3 * 2 * 14 * 14)


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_patchify_and_normalisation_match_hf_image_processor(model_type):
    """An image patchified with its temporal repeat == a video of two identical frames."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    params = QwenVisionParams.defaults(model_type)
    f = params.factor
    img = np.random.default_rng(1).integers(0, 256, size=(2 * f, 3 * f, 3), dtype=np.uint8)
    proc = Qwen2VLImageProcessorPil(do_resize=False, image_mean=list(params.mean), image_std=list(params.std),
                                    patch_size=params.patch_size, merge_size=params.merge_size,
                                    temporal_patch_size=params.temporal_patch_size)
    ref = proc(images=[img], return_tensors="np")
    pv, grid, _ = preprocess_frames(torch.from_numpy(np.stack([img, img])), params, size=(2 * f, 3 * f))
    assert grid.tolist() == ref["image_grid_thw"].tolist()
    np.testing.assert_allclose(pv.numpy(), ref["pixel_values"], rtol=0, atol=1e-6)


def test_patchify_order_hand_written_reference():
    """Two different frames: token (t, h, w) in merge-block order holds the right pixels."""
    params = QwenVisionParams(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), rescale_factor=1.0)
    p, m = params.patch_size, params.merge_size
    frames = torch.randint(0, 256, (2, 2 * p * m, 2 * p * m, 3), dtype=torch.uint8)
    pv, grid, _ = preprocess_frames(frames, params, size=(2 * p * m, 2 * p * m))
    gh = gw = 2 * m
    order = [(bh * m + i, bw * m + j) for bh in range(gh // m) for bw in range(gw // m)
             for i in range(m) for j in range(m)]
    for row, (ph, pw) in enumerate(order):
        patch = frames[:, ph * p:(ph + 1) * p, pw * p:(pw + 1) * p, :].permute(3, 0, 1, 2)  # C, T, p, p
        assert torch.equal(pv[row], patch.reshape(-1).float()), row


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision not installed")
def test_preprocessing_matches_hf_video_processor():
    from transformers import Qwen2VLVideoProcessor

    params = QwenVisionParams.defaults("qwen2_5_vl")
    frames = np.random.default_rng(2).integers(0, 256, size=(4, 300, 500, 3), dtype=np.uint8)
    proc = Qwen2VLVideoProcessor(cap_pixels_per_frame=False)
    ref = proc(videos=[frames], return_tensors="pt", do_sample_frames=False)
    pv, grid, _ = preprocess_frames(torch.from_numpy(frames), params)
    assert grid.tolist() == ref["video_grid_thw"].tolist()
    torch.testing.assert_close(pv, ref["pixel_values_videos"], rtol=0, atol=1e-5)


def test_resize_keeps_target_sized_frames_and_resizes_others():
    params = QwenVisionParams.defaults("qwen2_5_vl")
    frames = torch.randint(0, 256, (2, 500, 300, 3), dtype=torch.uint8)
    _, grid, hw = preprocess_frames(frames, params)
    assert hw == smart_resize(500, 300, params) and grid[0, 1] * 14 == hw[0]
    const = torch.full((2, 500, 300, 3), 77, dtype=torch.uint8)  # bicubic keeps a constant image
    pv, _, _ = preprocess_frames(const, QwenVisionParams(mean=(0, 0, 0), std=(1, 1, 1), rescale_factor=1.0))
    assert torch.all(pv == 77)


def test_preprocessor_config_is_read(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}))
    p = QwenVisionParams.from_checkpoint(str(tmp_path), "qwen2_5_vl")
    assert (p.min_pixels, p.max_pixels, p.mean, p.std) == (3136, 12845056, (0.5,) * 3, (0.25,) * 3)
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 4096, "longest_edge": 25165824}, "patch_size": 16}))
    p = QwenVisionParams.from_checkpoint(str(tmp_path), "qwen3_vl")
    assert (p.min_pixels, p.max_pixels, p.patch_size, p.pixels_per_item) == (4096, 25165824, 16, True)


# ---- positions and layout ------------------------------------------------------------------
def test_qwen25_positions_hand_computed():
    m = tiny("random:qwen2.5-vl-tiny")
    prefix, state = m.begin_stream(PositionState())
    s = len(prefix)
    assert m.detokenize(prefix.input_ids.tolist()).startswith("system") and state.next_position == s
    times = torch.tensor([[0.0, 0.5], [1.0, 1.5], [2.25, 2.75]], dtype=torch.float64)
    layout, st = m.layout_items(state.advanced(start_time=0.0), times, (2, 3))
    assert torch.equal(layout.positions[0].view(3, 6)[:, 0], torch.tensor([s, s + 2, s + 4]))  # int(t * 2)
    assert torch.equal(layout.positions[1, :6], torch.tensor([s, s, s, s + 1, s + 1, s + 1]))
    assert torch.equal(layout.positions[2, :6], torch.tensor([s, s + 1, s + 2] * 2))
    assert st.max_position == s + 4 and st.video_start == s
    more, st2 = m.layout_items(st, torch.tensor([[7.9, 8.4]], dtype=torch.float64), (2, 3))
    assert int(more.positions[0, 0]) == s + 15 and st2.max_position == s + 15  # int(7.9 * 2) = 15
    assert st.num_items == 3 and st2.num_items == 4  # layout_items is pure: st is unchanged


def test_qwen3_layout_has_timestamps_and_positions():
    m = tiny("random:qwen3-vl-tiny")
    prefix, state = m.begin_stream(PositionState())
    times = torch.tensor([[0.0, 0.5], [1.0, 1.5]], dtype=torch.float64)
    layout, st = m.layout_items(state.advanced(start_time=0.0), times, (2, 2))
    text = m.tokenizer.decode(layout.input_ids[layout.kinds != VISUAL].tolist(), skip_special_tokens=False)
    assert text == "<0.2 seconds><|vision_start|><|vision_end|><1.2 seconds><|vision_start|><|vision_end|>"
    s = len(prefix) + len(m.tokenize("<0.2 seconds>")) + 1
    vis = layout.positions[:, layout.kinds == VISUAL][:, :4]
    assert vis.tolist() == [[s] * 4, [s, s, s + 1, s + 1], [s, s + 1, s, s + 1]]
    end = len(m.tokenize("<0.2 seconds>")) + 1 + 4  # index of the first <|vision_end|>
    assert layout.positions[:, end].tolist() == [s + 2] * 3 and layout.positions[0, end + 1] == s + 3
    assert st.max_position == int(layout.positions.max()) and st.next_position == st.max_position + 1


@pytest.mark.parametrize("arch", ARCHS)
def test_positions_match_hf_get_rope_index(arch):
    """Our layout vs the HF model's own rope index for the same one-shot sequence (Qwen2.5:
    prefix + video, since transformers 5.x resumes text differently; Qwen3: everything)."""
    m = tiny(arch)
    frames = frames_for(m, 6)
    times = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    inputs, layout = one_shot_inputs(m, frames, times, "Hi?")
    ids = inputs["input_ids"]
    mm = (layout.kinds == VISUAL).long()[None] * 2
    kw = dict(second_per_grid_ts=torch.tensor([1.0])) if "2.5" in arch else {}
    ref, _ = m.hf_model.model.get_rope_index(ids, mm_token_type_ids=mm, video_grid_thw=inputs["video_grid_thw"],
                                             **kw)
    ours = inputs["position_ids"]
    upto = ours.shape[-1] if "qwen3" in arch else int(torch.nonzero(layout.kinds == VISUAL).max()) + 1
    assert torch.equal(ours[..., :upto], ref[..., :upto])
    if "2.5" in arch:  # text after the video: official rule max + 1
        assert int(ours[0, 0, upto]) == int(ours[..., :upto].max()) + 1


def test_prompt_pieces_from_a_chat_template():
    class Tok:
        chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% for c in m.content %}"
                         "{% if c.type == 'video' %}<|vision_start|><|video_pad|><|vision_end|>{% else %}"
                         "{{ c.text }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")

        def apply_chat_template(self, messages, chat_template, tokenize, add_generation_prompt):
            import jinja2

            return jinja2.Environment(keep_trailing_newline=True).from_string(chat_template).render(messages=messages)

    prefix, question = prompt_pieces(Tok(), "qwen2_5_vl")
    assert prefix == "<|im_start|>user\n<|vision_start|>"
    assert question.format(question="Q{x}") == "<|vision_end|>Q{x}<|im_end|>\n<|im_start|>assistant\n"
    prefix, question = prompt_pieces(Tok(), "qwen3_vl")
    assert prefix == "<|im_start|>user\n" and question.startswith("{question}<|im_end|>")


def test_local_checkpoint_loads_through_from_pretrained(tmp_path):
    """A saved tiny model + a tokenizer file + a preprocessor config: family, tokenizer and
    preprocessing come from the folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    src = tiny("random:qwen2.5-vl-tiny", "float32")
    src.hf_model.save_pretrained(tmp_path)
    vocab = {chr(i): i for i in range(32, 127)}
    vocab.update({t: 256 + i for i, t in enumerate(ByteTokenizer().special_tokens)})
    vocab["[UNK]"] = 0
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]",
                                  additional_special_tokens=list(ByteTokenizer().special_tokens))
    tok.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 784, "max_pixels": 50176}))
    m = load_model(str(tmp_path), dtype="float32", device="cpu")
    assert m.family == "qwen2_5_vl" and m.params.min_pixels == 784 and m.params.max_pixels == 50176
    assert m.tokenize("<|im_end|>") == [258]
    assert torch.equal(m.hf_model.lm_head.weight, src.hf_model.lm_head.weight)
