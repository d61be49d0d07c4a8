"""LLaVA-OneVision model pieces: preprocessing, vision encoding, layout, prompts (tiny random model, CPU)."""

import json

import numpy as np
import pytest
import torch

import streampress
from streampress.models.base import TEXT, VISUAL, PositionState
from streampress.models.llava_onevision import LlavaOneVisionAdapter, LlavaOnevisionAdapter, pool_2x2, siglip_features
from streampress.models.llava_onevision_preprocess import (
    DEFAULT_PREFIX,
    FramePreprocessor,
    as_frame_tensor,
    pooled_side,
    split_chat_template,
)
from streampress.models.random.llava_onevision import build_config

SIZE = 70  # tiny vision tower: 70x70 input, 5x5 patches of 14, pooled to 3x3


@pytest.fixture(scope="module")
def adapter():
    return streampress.load_model("random:llava-onevision-tiny", dtype=torch.float32, device="cpu")


def _smooth_frames(n, h, w, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    frames = []
    for _ in range(n):
        a, b, c = rng.uniform(3, 12, size=3)
        chans = [127 + 120 * np.sin(xx / a + k) * np.cos(yy / b + c) for k in range(3)]
        frames.append(np.stack(chans, -1).round().astype(np.uint8))
    return np.stack(frames)


# ---- preprocessing ----------------------------------------------------------------------

def test_normalisation_equals_hf_numpy_processor_exactly():
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    frames = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    frames[0, 0, :3, 0] = [0, 255, 128]  # extremes and the mid value
    ours = FramePreprocessor(size=(SIZE, SIZE))(frames)
    proc = LlavaOnevisionImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    # a nested list = one multi-image sample: square frames are neither padded nor patched
    ref = proc([list(frames)], do_resize=False, return_tensors="pt")["pixel_values"][:, 0]
    assert ours.dtype == torch.float32 and ours.shape == (3, 3, SIZE, SIZE)
    assert torch.equal(ours, ref)
    assert ours[0, 0, 0, 0] == -1.0 and ours[0, 0, 0, 1] == 1.0


@pytest.mark.parametrize("content", ["smooth", "noise"])
def test_resize_matches_pil_bicubic_within_one_level(content):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    if content == "smooth":
        frames = _smooth_frames(2, 150, 150)
    else:
        frames = np.random.default_rng(1).integers(0, 256, (2, 150, 150, 3), dtype=np.uint8)
    pre = FramePreprocessor(size=(SIZE, SIZE))
    ours = pre(frames)
    proc = LlavaOnevisionImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    ref = proc([list(frames)], size={"height": SIZE, "width": SIZE}, return_tensors="pt")["pixel_values"][:, 0]
    levels = (ours - ref).abs() * 127.5  # one uint8 level = 1/127.5 after normalisation
    assert ours.shape == ref.shape == (2, 3, SIZE, SIZE)
    assert levels.max() <= 1.0 + 1e-4
    assert (levels > 0.5).float().mean() < 0.05


def test_resize_is_torchvision_kernel_and_identity_at_size():
    frames = torch.from_numpy(_smooth_frames(2, 90, 120))
    pre = FramePreprocessor(size=(SIZE, SIZE))
    resized = pre.resize(frames.permute(0, 3, 1, 2).contiguous())
    expected = torch.nn.functional.interpolate(frames.permute(0, 3, 1, 2).contiguous(), size=(SIZE, SIZE),
                                               mode="bicubic", antialias=True, align_corners=False)
    assert resized.dtype == torch.uint8 and torch.equal(resized, expected)
    at_size = torch.from_numpy(_smooth_frames(1, SIZE, SIZE)).permute(0, 3, 1, 2).contiguous()
    assert pre.resize(at_size) is at_size


def test_matches_hf_video_processor_where_torchvision_exists():
    pytest.importorskip("torchvision")
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    frames = _smooth_frames(4, 120, 160)
    proc = LlavaOnevisionVideoProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3, size={"height": 384, "width": 384})
    ref = proc(videos=[frames], return_tensors="pt")["pixel_values_videos"][0]
    ours = FramePreprocessor()(frames)
    assert ours.shape == ref.shape == (4, 3, 384, 384)
    assert (ours - ref).abs().max() < 1e-6  # the fused normalisation differs by at most one ulp


def test_processor_settings_from_checkpoint_folder(tmp_path):
    cfg = {"size": {"height": SIZE, "width": SIZE}, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.5, 0.25, 0.5],
           "resample": 3, "rescale_factor": 1 / 255}
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(cfg))
    pre = FramePreprocessor.from_pretrained(str(tmp_path), image_size=SIZE)
    assert pre.size == (SIZE, SIZE) and pre.mean == (0.1, 0.2, 0.3) and pre.std == (0.5, 0.25, 0.5)
    out = pre(np.full((1, SIZE, SIZE, 3), 51, dtype=np.uint8))  # 51 / 255 = 0.2
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([0.2, 0.0, -0.2]), atol=1e-6)
    with pytest.raises(ValueError, match="image_size"):
        FramePreprocessor.from_pretrained(str(tmp_path), image_size=384)
    empty = tmp_path / "empty"
    empty.mkdir()
    default = FramePreprocessor.from_pretrained(str(empty), image_size=384)
    assert default.size == (384, 384) and default.mean == (0.5, 0.5, 0.5)


def test_bad_frames_are_rejected():
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        as_frame_tensor(np.zeros((2, 8, 8, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        as_frame_tensor(np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        as_frame_tensor(np.zeros((1, 8, 8, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="numpy array"):
        as_frame_tensor("frames")
    with pytest.raises(ValueError, match="same"):
        as_frame_tensor([np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)])
    assert as_frame_tensor([np.zeros((8, 8, 3), np.uint8)] * 2).shape == (2, 8, 8, 3)


# ---- vision encoding --------------------------------------------------------------------

def test_encode_equals_hf_get_video_features(adapter):
    frames = torch.from_numpy(_smooth_frames(3, 90, 120))
    batch = adapter.preprocess(frames)
    assert batch.num_items == 3 and batch.pixel_values.shape == (3, 3, SIZE, SIZE) and batch.grid_thw is None
    grids = adapter.encode(batch).grids
    assert grids.shape == (3, 3, 3, 64) and adapter.grid_hw == (3, 3)
    with torch.no_grad():
        ref = adapter.hf_model.model.get_video_features(batch.pixel_values[None], return_dict=True).pooler_output
    # HF: [1, T*9 + 1, D], the frames' grids in raster order and one image_newline at the end
    assert ref.shape == (1, 3 * 9 + 1, 64)
    assert torch.equal(grids.reshape(-1, 64), ref[0, :-1])
    assert torch.equal(ref[0, -1], adapter.hf_model.model.image_newline)


@pytest.mark.parametrize("layer", [-1, -2, 0, 1, [-2, -1]])
def test_siglip_features_select_the_hf_hidden_state(adapter, layer):
    tower = adapter.hf_model.model.vision_tower
    px = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ours = siglip_features(tower, px, layer)
        hs = tower(px, output_hidden_states=True).hidden_states
    ref = torch.cat([hs[k] for k in layer], -1) if isinstance(layer, list) else hs[layer]
    assert torch.equal(ours, ref)
    with pytest.raises(ValueError, match="vision_feature_layer"):
        siglip_features(tower, px, 5)


def test_pool_2x2_hand_computed():
    # bilinear 3 -> 2 (align_corners=False): sources at 0.25 and 1.75 -> weights (.75, .25) and (.25, .75)
    x = torch.arange(9, dtype=torch.float64).view(1, 9, 1)  # value = 3 * row + col
    out = pool_2x2(x, 3)[0, :, :, 0]
    rows = torch.tensor([0.25, 1.75], dtype=torch.float64)
    assert torch.allclose(out, 3 * rows[:, None] + rows[None, :])
    assert pool_2x2(torch.zeros(2, 27 * 27, 5), 27).shape == (2, 14, 14, 5)
    assert pool_2x2(torch.zeros(1, 16, 5), 4).shape == (1, 2, 2, 5)
    with pytest.raises(ValueError, match="patch tokens"):
        pool_2x2(torch.zeros(1, 10, 5), 3)


def test_random_7b_config_has_real_shapes():
    config = build_config("llava-onevision-7b")
    v, t = config.vision_config, config.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (1152, 26, 16, 4304)
    assert (v.image_size, v.patch_size) == (384, 14) and pooled_side(v.image_size, v.patch_size) == 14
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (3584, 28, 28, 4)
    assert (t.intermediate_size, t.vocab_size) == (18944, 152064)
    assert config.vision_feature_layer == -1 and config.vision_feature_select_strategy == "full"
    cut = build_config("llava-onevision-7b", num_layers=3, vision_depth=2)
    assert cut.text_config.num_hidden_layers == 3 and cut.vision_config.num_hidden_layers == 2
    with pytest.raises(ValueError, match="num_layers"):
        build_config("llava-onevision-7b", num_layers=0)
    with pytest.raises(ValueError, match="unknown random architecture"):
        build_config("llava-onevision-1b")
    with pytest.raises(ValueError, match="vocab_size"):
        build_config("llava-onevision-7b", vocab_size=100)


@pytest.mark.slow  # a real-size encoder: run by .ci/run's slow step
def test_random_7b_builds_and_encodes_a_384_frame():
    # real layer shapes, cut to one block each and a small vocabulary (the 152064 x 3584
    # embedding and head would dominate the build time of this test)
    adapter = streampress.load_model("random:llava-onevision-7b", dtype=torch.bfloat16, device="cpu",
                                     num_layers=1, vision_depth=1, vocab_size=1024)
    assert adapter.hidden_size == 3584 and adapter.grid_hw == (14, 14)
    assert adapter.hf_model.model.language_model.layers[0].mlp.up_proj.weight.shape == (18944, 3584)
    frame = torch.from_numpy(_smooth_frames(1, 240, 320))
    grids = adapter.encode(adapter.preprocess(frame)).grids
    assert grids.shape == (1, 14, 14, 3584) and grids.dtype == torch.bfloat16 and torch.isfinite(grids).all()


# ---- layout, prompts, text --------------------------------------------------------------

def test_layout_keeps_1d_positions_of_the_unpruned_stream(adapter):
    state = PositionState()
    prefix, state = adapter.begin_stream(state)
    p = len(prefix)
    assert adapter.detokenize(prefix.input_ids.tolist()) == "system\nYou are a helpful assistant.\nuser\n"
    assert prefix.positions.tolist() == [list(range(p))] and (prefix.kinds == TEXT).all()
    assert (state.next_position, state.max_position) == (p, p - 1)
    times = torch.zeros(2, 1, dtype=torch.float64)
    chunk, state2 = adapter.layout_items(state, times, (3, 3))
    assert len(chunk) == 18 and (chunk.kinds == VISUAL).all()
    assert chunk.positions.tolist() == [list(range(p, p + 18))]
    assert chunk.visual_index.tolist() == list(range(18))
    assert chunk.item.tolist() == [0] * 9 + [1] * 9
    assert (state2.next_position, state2.max_position, state2.num_items, state2.video_start) == (p + 18, p + 17, 2, p)
    chunk3, state3 = adapter.layout_items(state2, times[:1], (3, 3))
    assert chunk3.positions.tolist() == [list(range(p + 18, p + 27))] and chunk3.item.tolist() == [2] * 9
    assert state3.video_start == p and state2.num_items == 2  # states are immutable


def test_question_turn_starts_with_the_video_newline(adapter):
    ids = adapter.question_ids("What {is} it?", has_video=True)
    assert ids[0] == adapter.video_token_id
    assert adapter.detokenize(ids) == "\nWhat {is} it?\nassistant\n"
    assert adapter.question_ids("Hi", has_video=False) == (
        ids[:0] + adapter.tokenize("\nHi<|im_end|>\n<|im_start|>assistant\n"))
    emb = adapter.embed_text(torch.tensor(ids[:2]))
    assert torch.equal(emb[0], adapter.hf_model.model.image_newline.detach())
    assert torch.equal(emb[1], adapter.hf_model.get_input_embeddings().weight[ids[1]])
    assert adapter.tokenizer.token_id("<|im_end|>") in adapter.stop_token_ids


def test_chat_template_split():
    template = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
                "{% for c in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
                "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + c['text'] }}"
                "{% endfor %}{{'<|im_end|>\n'}}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    prefix, question = split_chat_template(template)
    assert prefix == "<|im_start|>user "
    assert question.format(question="Why?") == "\nWhy?<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="placeholder"):
        split_chat_template("{% for m in messages %}{{ m['role'] }}{% endfor %}")
    assert DEFAULT_PREFIX.endswith("<|im_start|>user\n")


def test_registry_and_alias(adapter):
    assert LlavaOnevisionAdapter is LlavaOneVisionAdapter and isinstance(adapter, LlavaOneVisionAdapter)
    assert adapter.family == "llava_onevision" and adapter.frames_per_item == 1 and adapter.position_axes == 1
    config = adapter.hf_model.config
    vocab = config.text_config.vocab_size
    assert max(config.image_token_id, config.video_token_id) < vocab
    assert adapter.tokenizer.vocab_size <= vocab
    with pytest.raises(ValueError, match="unknown random architecture"):
        streampress.load_model("random:llava-onevision-huge")


# ---- a checkpoint folder: from_pretrained with its own tokenizer, template and processor -------

LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _save_checkpoint(adapter, folder):
    """The tiny random model saved as a checkpoint, with a byte-level BPE tokenizer whose
    special-token ids match the model's, a chat template and a video processor config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # byte b -> id b, as in the built-in byte tokenizer
    bpe = Tokenizer(models.BPE(vocab={c: b for b, c in bytes_to_unicode().items()}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(list(adapter.tokenizer.special_tokens))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    adapter.hf_model.save_pretrained(folder)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA_HF_TEMPLATE}))
    (folder / "video_preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": SIZE, "width": SIZE}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 3,
         "rescale_factor": 1 / 255, "image_processor_type": "LlavaOnevisionVideoProcessor"}))


def test_checkpoint_folder_loads_with_its_own_tokenizer_and_template(adapter, tmp_path):
    from streampress.session import StreamingSession

    _save_checkpoint(adapter, tmp_path)
    loaded = streampress.load_model(str(tmp_path), dtype=torch.float32, device="cpu")
    assert isinstance(loaded, LlavaOneVisionAdapter) and loaded.name == str(tmp_path)
    assert loaded.tokenize("hé<video>") == adapter.tokenize("hé<video>")
    assert loaded.detokenize(loaded.tokenize("hé<|im_end|>")) == "hé"
    assert loaded.prefix_ids == loaded.tokenize("<|im_start|>user ")
    assert loaded.question_ids("Q?", True) == [loaded.video_token_id] + loaded.tokenize(
        "\nQ?<|im_end|>\n<|im_start|>assistant\n")
    assert loaded.tokenize("<|im_end|>")[0] in loaded.stop_token_ids
    assert loaded.preprocessor == FramePreprocessor(size=(SIZE, SIZE))
    for (name, p), q in zip(adapter.hf_model.named_parameters(), loaded.hf_model.parameters()):
        assert torch.equal(p, q), name
    session = StreamingSession(loaded)
    session.add_frames(_smooth_frames(2, 40, 40), [0.0, 1.0])
    answer = session.ask("What is shown?", max_new_tokens=3)
    assert isinstance(answer.text, str) and session.stats()["visual_tokens_kept"] == 18
