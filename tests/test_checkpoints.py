"""The real-checkpoint path, proven without the hub (issue 15).

Checkpoint folders in the exact Hugging Face layout (``_checkpoint_helpers.write_checkpoint``)
are written once per test session to a temporary directory: the tiny random model of every
family with a real ``tokenizers`` BPE, the official chat template, generation and processor
configs; and the published ``config.json`` of released checkpoints (tests/fixtures/configs)
with a tokenizer whose special tokens sit at the released ids. Everything but the weight
values is proven here: layout, tokenizer, template, stop ids, processor limits, positions.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import streampress
from _checkpoint_helpers import FAMILIES, VIDEO_TOKEN, published_configs, write_checkpoint
from streampress.cli import main
from streampress.models.base import VISUAL
from streampress.session import StreamingSession

SRC = Path(__file__).resolve().parents[1] / "src"
Q = "What happens in the video?"
FPS = 2.0
PUBLISHED = published_configs()
FAMILY_OF = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl",
             "llava_onevision": "llava_onevision"}


@pytest.fixture(scope="session")
def folders(tmp_path_factory) -> dict[str, Path]:
    """family -> tiny checkpoint folder; family + ':sharded' -> the same model in shards."""
    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for family in FAMILIES:
        out[family] = write_checkpoint(root / family, family)
        out[family + ":sharded"] = write_checkpoint(root / (family + "-sharded"), family, sharded=True)
    return out


@pytest.fixture(scope="session")
def published(tmp_path_factory) -> dict[str, Path]:
    """fixture name -> folder with the published config.json (no weights) and a tokenizer at the released ids."""
    root = tmp_path_factory.mktemp("published")
    return {name: write_checkpoint(root / name, fx["config"]["model_type"], config=fx["config"], weights=False)
            for name, fx in PUBLISHED.items()}


@pytest.fixture(scope="session")
def loaded(folders):
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = streampress.load_model(str(folders[family]), dtype="float32", device="cpu")
        return cache[family]
    return get


def frames(n: int, h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------- layout
@pytest.mark.parametrize("family", FAMILIES)
def test_folder_has_the_official_layout_with_consistent_ids(folders, family):
    from transformers import AutoConfig, AutoTokenizer

    folder = folders[family]
    names = set(os.listdir(folder))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "vocab.json", "merges.txt", "preprocessor_config.json", "video_preprocessor_config.json"} <= names
    assert ("chat_template.jinja" if family == "llava_onevision" else "chat_template.json") in names
    sharded = set(os.listdir(folders[family + ":sharded"]))
    assert "model.safetensors.index.json" in sharded and "model.safetensors" not in sharded
    assert len([n for n in sharded if n.startswith("model-0000")]) > 1
    config = AutoConfig.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.convert_tokens_to_ids(VIDEO_TOKEN[family]) == config.video_token_id
    if family != "llava_onevision":
        assert tok.convert_tokens_to_ids("<|vision_start|>") == config.vision_start_token_id
        assert tok.convert_tokens_to_ids("<|image_pad|>") == config.image_token_id
    assert config.text_config.vocab_size > max(tok.get_vocab().values())
    gen = json.loads((folder / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos
    assert len(tok.encode("What happens", add_special_tokens=False)) < len("What happens")  # real merges


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_folder_loads_the_same_weights(folders, loaded, family):
    flat = loaded(family)
    sharded = streampress.load_model(str(folders[family + ":sharded"]), dtype="float32", device="cpu")
    a, b = dict(flat.hf_model.named_parameters()), dict(sharded.hf_model.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", FAMILIES)
def test_stop_ids_come_from_generation_config(folders, loaded, family, tmp_path):
    gen = json.loads((folders[family] / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert loaded(family).stop_token_ids == frozenset(eos)
    folder = shutil.copytree(folders[family], tmp_path / "custom")
    (folder / "generation_config.json").write_text(json.dumps(dict(gen, eos_token_id=[7, eos[0]])))
    assert streampress.load_model(str(folder), dtype="float32", device="cpu").stop_token_ids == {7, eos[0]}


# ---------------------------------------------------------------------------- the prompt
def _session_ids(model, video: np.ndarray, times: np.ndarray) -> list[int]:
    """The token ids a StreamingSession lays out for [prefix + video + question]: every layout
    the adapter hands the session is recorded (visual tokens as the video placeholder id)."""
    video_id = model.hf_model.config.video_token_id
    parts: list[list[int]] = []

    def record(method):
        def wrapped(*args, **kwargs):
            out = method(*args, **kwargs)
            layout = out[0] if isinstance(out, tuple) else None
            if layout is None:
                parts.append(list(out))
            else:
                ids = torch.where(layout.kinds == VISUAL, video_id, layout.input_ids)
                parts.append(ids.tolist())
            return out
        return wrapped

    for name in ("begin_stream", "layout_items", "question_ids"):
        setattr(model, name, record(getattr(type(model), name).__get__(model)))
    try:
        session = StreamingSession(model)
        session.add_frames(video, times)
        session.question_logits(Q)
    finally:
        for name in ("begin_stream", "layout_items", "question_ids"):
            delattr(model, name)
    return [i for part in parts for i in part]


def _processor_expansion(family: str, folder: Path, model, video: np.ndarray, times: np.ndarray) -> str:
    """The text the family's transformers processor puts in place of the video placeholder,
    computed by the processor class's own ``replace_video_token`` (its video processor needs
    torchvision, absent here, so the processed video is described by its grid / frame count:
    ``video_grid_thw`` from streampress's preprocessing, whose equality with the HF video
    processor is tested where torchvision exists)."""
    import transformers

    batch = model.preprocess(torch.from_numpy(video))
    if family == "llava_onevision":
        proc = json.loads((folder / "processor_config.json").read_text())
        stand_in = SimpleNamespace(num_image_tokens=proc["num_image_tokens"], video_token="<video>")
        return transformers.LlavaOnevisionProcessor.replace_video_token(
            stand_in, {"pixel_values_videos": [np.zeros((len(video), 1))]}, 0)
    video_proc = json.loads((folder / "video_preprocessor_config.json").read_text())
    cls = {"qwen2_vl": transformers.Qwen2VLProcessor, "qwen2_5_vl": transformers.Qwen2_5_VLProcessor,
           "qwen3_vl": transformers.Qwen3VLProcessor}[family]
    stand_in = SimpleNamespace(
        video_processor=SimpleNamespace(merge_size=video_proc["merge_size"],
                                        temporal_patch_size=video_proc["temporal_patch_size"]),
        video_token="<|video_pad|>", vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>")
    stand_in._calculate_timestamps = lambda *a: cls._calculate_timestamps(stand_in, *a)
    metadata = SimpleNamespace(fps=FPS, frames_indices=[int(round(t * FPS)) for t in times])
    return cls.replace_video_token(stand_in, {"video_grid_thw": batch.grid_thw, "video_metadata": [metadata]}, 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_session_prompt_equals_the_chat_template_with_the_video_expanded(folders, loaded, family):
    """Token for token: the session's [prefix + video of N items + question] against the
    tokenizer's ``apply_chat_template`` of the same conversation (the folder's template file,
    as the processor renders it), the video placeholder expanded by the processor's own rule.
    Qwen3-VL: as released (transformers 4.57, the trained format) the per-item
    ``<t seconds><|vision_start|>...<|vision_end|>`` runs replace the template's whole
    ``<|vision_start|><|video_pad|><|vision_end|>`` (transformers 5.x replaces only the pad
    token and nests them; see streampress.models.qwen.prompt_pieces)."""
    from transformers import AutoTokenizer

    folder, model = folders[family], loaded(family)
    n = 6 if model.frames_per_item == 2 else 3  # 3 items
    video, times = frames(n), np.arange(n) / FPS
    got = _session_ids(model, video, times)

    tok = AutoTokenizer.from_pretrained(folder)
    template_file = folder / ("chat_template.jinja" if family == "llava_onevision" else "chat_template.json")
    template = (template_file.read_text() if template_file.suffix == ".jinja"
                else json.loads(template_file.read_text())["chat_template"])
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": Q}]}]
    text = tok.apply_chat_template(conversation, chat_template=template, tokenize=False, add_generation_prompt=True)
    placeholder = VIDEO_TOKEN[family]
    if family == "qwen3_vl":
        placeholder = "<|vision_start|>" + placeholder + "<|vision_end|>"
    assert text.count(placeholder) == 1
    text = text.replace(placeholder, _processor_expansion(family, folder, model, video, times))
    want = tok(text)["input_ids"]
    assert got == want, (tok.decode(got)[:300], tok.decode(want)[:300])
    if family == "qwen3_vl":
        assert "<0.2 seconds><|vision_start|>" in text and "<2.2 seconds>" in text
        assert "<|vision_start|><0.2 seconds>" not in text  # not nested
    if family in ("qwen2_vl", "qwen2_5_vl"):  # the template of the older layout gives the same prompt
        legacy = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert legacy == tok.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_resolution_limits_of_the_folder_are_honoured(folders, loaded, family, tmp_path):
    big = loaded(family)
    clip = torch.from_numpy(frames(2, 112, 112))
    small_limits = ({"size": {"shortest_edge": 2 * 32 * 32, "longest_edge": 2 * 32 * 32}} if family == "qwen3_vl"
                    else {"min_pixels": 28 * 28, "max_pixels": 28 * 28})
    folder = write_checkpoint(tmp_path / "small", family, video_processor=small_limits)
    small = streampress.load_model(str(folder), dtype="float32", device="cpu")
    g_big, g_small = big.preprocess(clip).grid_thw[0], small.preprocess(clip).grid_thw[0]
    assert g_small.tolist() == [1, 2, 2] and g_big[1] * g_big[2] > g_small[1] * g_small[2]
    (folder / "video_preprocessor_config.json").unlink()  # the image processor's file is the fallback
    (folder / "preprocessor_config.json").write_text(json.dumps(dict(small_limits, patch_size=big.params.patch_size)))
    again = streampress.load_model(str(folder), dtype="float32", device="cpu")
    assert again.preprocess(clip).grid_thw[0].tolist() == [1, 2, 2]


# ---------------------------------------------------------------------------- the command
@pytest.mark.parametrize("family", FAMILIES)
def test_streampress_run_on_each_folder(folders, family, capsys):
    rc = main(["run", "synthetic:2", "--model", str(folders[family]), "--size", "64", "--method",
               "streaming_assistant", "--ask", "1: What moves?", "--max-new-tokens", "2", "--json", "-q"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["model"]["family"] == family and len(out["answers"]) == 1
    assert out["stats"]["frames"] >= 2


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_on_cpu_runs(folders, dtype, capsys):
    for family in ("qwen2_5_vl", "qwen3_vl", "llava_onevision"):
        rc = main(["run", "synthetic:2", "--model", str(folders[family]), "--size", "64", "--dtype", dtype,
                   "--ask", "1: What moves?", "--max-new-tokens", "2", "--json", "-q"])
        captured = capsys.readouterr()
        assert rc == 0, captured.err
        assert json.loads(captured.out)["model"]["dtype"] == dtype


def _one_line(capsys, argv) -> str:
    capsys.readouterr()  # drop what came before (e.g. progress bars of writing a folder)
    rc = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc != 0 and len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_cuda_is_one_line(folders, capsys):
    line = _one_line(capsys, ["run", "synthetic:2", "--model", str(folders["qwen2_5_vl"]), "--device", "cuda",
                              "--ask", "1: Q?", "-q"])
    assert "CUDA is not available" in line and "'cpu'" in line
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        streampress.load_model(str(folders["qwen2_5_vl"]), device="cuda")


# ---------------------------------------------------------------------------- failures, one line each
def test_a_folder_missing_a_file_names_it(folders, tmp_path, capsys):
    cases = {"config.json": "config.json", "tokenizer.json": "tokenizer.json",
             "model.safetensors": "model.safetensors"}
    for removed, named in cases.items():
        folder = shutil.copytree(folders["qwen2_5_vl"], tmp_path / removed)
        (folder / removed).unlink()
        if removed == "tokenizer.json":
            (folder / "vocab.json").unlink()
        line = _one_line(capsys, ["run", "synthetic:2", "--model", str(folder), "--ask", "1: Q?", "-q"])
        assert f"has no {named}" in line and str(folder) in line
    folder = shutil.copytree(folders["llava_onevision:sharded"], tmp_path / "shard")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (folder / shard).unlink()
    with pytest.raises(ValueError, match=f"has no {shard}"):
        streampress.load_model(str(folder), device="cpu")


def test_an_unsupported_architecture_lists_the_supported_ones(folders, tmp_path, capsys):
    folder = shutil.copytree(folders["qwen2_5_vl"], tmp_path / "llama")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    line = _one_line(capsys, ["run", "synthetic:2", "--model", str(folder), "--ask", "1: Q?", "-q"])
    assert "'llama' (LlamaForCausalLM) is not supported" in line
    assert "qwen2_5_vl" in line and "qwen3_vl" in line and "llava_onevision" in line


def test_a_tokenizer_without_the_video_token_is_one_line(tmp_path, capsys):
    for family in ("qwen2_5_vl", "llava_onevision"):
        folder = write_checkpoint(tmp_path / family, family, video_token=False)
        line = _one_line(capsys, ["run", "synthetic:2", "--model", str(folder), "--ask", "1: Q?", "-q"])
        assert f"the tokenizer has no {VIDEO_TOKEN[family]} token" in line


def test_a_hub_id_offline_is_one_line_within_seconds_in_python_and_the_command(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty"),
           "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = ("import streampress\ntry:\n    streampress.load_model('Qwen/Qwen2.5-VL-7B-Instruct')\n"
            "except RuntimeError as e:\n    print(e)\n")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert time.perf_counter() - started < 20
    line = proc.stdout.strip()
    assert proc.returncode == 0 and "\n" not in line, (proc.stdout, proc.stderr)
    assert "no network; download it elsewhere and pass the folder" in line
    assert "load_model(DIR)" in line
    from streampress.cli.model import resolve_model

    with pytest.raises(RuntimeError, match="no network; download it elsewhere and pass the folder.*--model DIR"):
        resolve_model("streampress-tests/never-cached", reachable=lambda: False)


# ---------------------------------------------------------------------------- published configs
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_config_builds_the_released_architecture(published, name):
    """The whole released architecture on the meta device (shapes only): the parameter count
    is the published one, and the tokenizer's special ids are the released ones."""
    fx = PUBLISHED[name]
    m = streampress.load_model(str(published[name]), device="meta", random_weights=True)
    count = sum(p.numel() for p in m.hf_model.parameters())
    assert abs(count / fx["parameters"] - 1) < 0.005, count
    assert m.family == fx["config"]["model_type"] and m.hidden_size == (
        fx["config"].get("text_config", fx["config"]).get("hidden_size"))
    assert m.tokenizer.convert_tokens_to_ids(VIDEO_TOKEN[m.family]) == m.hf_model.config.video_token_id


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_config_cut_streams_with_streaming_assistant_and_the_cacher(published, name):
    """Real widths, 2 LLM layers and 2 vision blocks, random weights: a short stream with the
    streaming_assistant pruner and STC-Cacher, then a 2-token answer (bfloat16 to halve memory)."""
    m = streampress.load_model(str(published[name]), dtype="bfloat16", device="cpu", num_layers=2, vision_depth=2,
                               random_weights=True)
    assert len(m.language_model_layers()) == 2
    s = StreamingSession(m, pruner=streampress.create_pruner("streaming_assistant"),
                         cacher=streampress.create_cacher())
    n = 4 if m.frames_per_item == 2 else 2
    s.add_frames(frames(n, 32, 32), np.arange(n) / FPS)
    answer = s.ask(Q, max_new_tokens=2)
    stats = s.stats()
    assert stats["items"] == n // m.frames_per_item and 0 < stats["visual_tokens_kept"] <= stats["visual_tokens_seen"]
    assert len(answer.token_ids) <= 2
