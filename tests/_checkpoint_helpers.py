"""Checkpoint folders in the exact Hugging Face layout, written from the tiny random models
(or from a published ``config.json``), for tests that must not download anything.

API::

    write_checkpoint(folder, family, *, sharded=False, config=None, weights=True,
                     video_token=True, processor=None, video_processor=None) -> Path

``family`` is one of :data:`FAMILIES` (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``,
``llava_onevision``). A folder holds what the family's official checkpoints ship:

- ``config.json`` and ``model.safetensors`` (``sharded``: ``model-0000k-of-0000n.safetensors``
  and ``model.safetensors.index.json``), by ``save_pretrained`` of the tiny random model;
  with ``config`` (a published config dict) and ``weights=False`` only the config is
  written (the architecture is then built with ``random_weights=True``);
- ``generation_config.json`` with the family's released sampling values and eos/stop ids;
- a real ``tokenizers`` byte-level BPE (``tokenizer.json``, ``vocab.json``, ``merges.txt``)
  with Qwen2's pre-tokenizer regex, merges trained on a small corpus, and the family's
  special tokens as added tokens: after the trained vocabulary for tiny models, at the
  released ids (151643 ...) when ``config`` is given (the vocabulary is padded with unused
  filler entries up to there); ``tokenizer_config.json`` with the released fields;
  ``video_token=False`` leaves the video token out;
- the chat template in the format the official repos ship: Qwen2-VL and Qwen2.5-VL
  ``chat_template.json`` plus the same template inside ``tokenizer_config.json`` (the older
  layout), Qwen3-VL ``chat_template.json``, LLaVA-OneVision ``chat_template.jinja`` (as
  transformers >= 4.5x re-saves the llava-hf repos; they first shipped ``chat_template.json``)
  plus its ``processor_config.json``;
- ``preprocessor_config.json`` and ``video_preprocessor_config.json`` with the family's
  fields; tiny folders use small pixel limits so that tiny frames stay tiny; ``processor`` /
  ``video_processor`` dicts update them.

The templates are the official texts: Qwen2-VL / Qwen2.5-VL as in their ``chat_template.json``,
LLaVA-OneVision as in transformers' conversion script (``convert_llava_onevision_weights_to_hf.py``),
Qwen3-VL-Instruct's system/user/generation parts as released (its assistant and tool branches
are reproduced from memory of the release; the tests render only system/user turns).
"""

# ruff: noqa: E501 (the official template texts keep their long lines)
from __future__ import annotations

import json
from pathlib import Path

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision")
RANDOM_ARCH = {"qwen2_vl": "qwen2-vl-tiny", "qwen2_5_vl": "qwen2.5-vl-tiny", "qwen3_vl": "qwen3-vl-tiny",
               "llava_onevision": "llava-onevision-tiny"}

QWEN_BASE_ID = 151643  # <|endoftext|> in every released Qwen2 / Qwen2.5 / Qwen3 tokenizer
_QWEN2 = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
          "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
          "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
_QWEN25 = _QWEN2 + ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
_QWEN3 = _QWEN25 + ["<tool_response>", "</tool_response>", "<think>", "</think>"]
# Added tokens that are not "special" (the released tokenizers mark them special: false).
_NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"}
SPECIAL_TOKENS = {"qwen2_vl": _QWEN2, "qwen2_5_vl": _QWEN25, "qwen3_vl": _QWEN3,
                  "llava_onevision": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]}
VIDEO_TOKEN = {"qwen2_vl": "<|video_pad|>", "qwen2_5_vl": "<|video_pad|>", "qwen3_vl": "<|video_pad|>",
               "llava_onevision": "<video>"}

QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")

QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")

QWEN3_VL_TEMPLATE = """{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- macro render_content(content, do_vision_count) %}
    {%- if content is string %}
        {{- content }}
    {%- else %}
        {%- for item in content %}
            {%- if 'image' in item or 'image_url' in item or item.type == 'image' %}
                {%- if do_vision_count %}
                    {%- set image_count.value = image_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                <|vision_start|><|image_pad|><|vision_end|>
            {%- elif 'video' in item or item.type == 'video' %}
                {%- if do_vision_count %}
                    {%- set video_count.value = video_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                <|vision_start|><|video_pad|><|vision_end|>
            {%- elif 'text' in item %}
                {{- item.text }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
{%- endmacro %}
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- render_content(messages[0].content, false) + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + render_content(messages[0].content, false) + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- set content = render_content(message.content, True) %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAVA_ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

TEMPLATES = {"qwen2_vl": QWEN2_VL_TEMPLATE, "qwen2_5_vl": QWEN2_VL_TEMPLATE, "qwen3_vl": QWEN3_VL_TEMPLATE,
             "llava_onevision": LLAVA_ONEVISION_TEMPLATE}

_CORPUS = ["You are a helpful assistant.", "What happens in the video? What moves? Describe the scene.",
           "user assistant system seconds", "<0.5 seconds> <1.5 seconds> <2.0 seconds> <12.3 seconds>",
           "The video shows a person walking a dog in the park.", "Answer with the option's letter."]

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_tokenizer(family: str, special_base: int | None = None, video_token: bool = True):
    """A ``tokenizers.Tokenizer``: Qwen2's byte-level BPE (NFC, the Qwen2 split regex, byte
    level, merges trained on a small corpus) and the family's added tokens from
    ``special_base`` (default: right after the trained vocabulary)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=360, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    if special_base is not None:
        data = json.loads(tok.to_str())
        vocab = data["model"]["vocab"]
        for i in range(len(vocab), special_base):
            vocab[f"<|filler_{i}|>"] = i  # unused entries so that the added tokens get the released ids
        tok = Tokenizer.from_str(json.dumps(data))
    from tokenizers import AddedToken

    for t in SPECIAL_TOKENS[family]:
        if t == VIDEO_TOKEN[family] and not video_token:
            t = "<|unused_video_slot|>"  # keep later ids where they were
        tok.add_tokens([AddedToken(t, special=t not in _NOT_SPECIAL, normalized=False)])
    return tok


def token_ids(tok, family: str) -> dict[str, int]:
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS[family] if tok.token_to_id(t) is not None}


def _tokenizer_config(tok, family: str, with_template: bool) -> dict:
    added = {}
    for t in SPECIAL_TOKENS[family]:
        tid = tok.token_to_id(t)
        if tid is not None:
            added[str(tid)] = {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                               "single_word": False, "special": t not in _NOT_SPECIAL}
    extra = [t for t in SPECIAL_TOKENS[family] if t not in _NOT_SPECIAL and t not in ("<|endoftext|>",)
             and tok.token_to_id(t) is not None]
    cfg = {"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
           "additional_special_tokens": extra, "bos_token": None, "clean_up_tokenization_spaces": False,
           "eos_token": "<|im_end|>", "errors": "replace",
           "model_max_length": 32768 if family == "llava_onevision" else 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
           "unk_token": None}
    if family == "llava_onevision":
        cfg["processor_class"] = "LlavaOnevisionProcessor"
    if with_template:
        cfg["chat_template"] = TEMPLATES[family]
    return cfg


def generation_config(family: str, ids: dict[str, int]) -> dict:
    """The released generation_config.json values with this tokenizer's ids."""
    end, eot = ids["<|im_end|>"], ids["<|endoftext|>"]
    if family == "llava_onevision":
        return {"bos_token_id": eot, "eos_token_id": end, "pad_token_id": eot}
    if family == "qwen3_vl":
        return {"bos_token_id": eot, "pad_token_id": eot, "do_sample": True, "eos_token_id": [end, eot],
                "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.0, "temperature": 0.7}
    return {"bos_token_id": eot, "pad_token_id": eot, "do_sample": True, "eos_token_id": [end, eot],
            "repetition_penalty": 1.05, "temperature": 0.1 if family == "qwen2_5_vl" else 0.01, "top_p": 0.001,
            "top_k": 1}


def processor_configs(family: str, tiny: bool, image_size: int = 384) -> tuple[dict, dict]:
    """(preprocessor_config.json, video_preprocessor_config.json): the released fields; tiny
    folders get small pixel limits (frames of a few merged tokens)."""
    if family in ("qwen2_vl", "qwen2_5_vl"):
        proc = "Qwen2VLProcessor" if family == "qwen2_vl" else "Qwen2_5_VLProcessor"
        common = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "image_mean": OPENAI_CLIP_MEAN,
                  "image_std": OPENAI_CLIP_STD, "processor_class": proc, "do_rescale": True,
                  "rescale_factor": 1 / 255, "do_normalize": True, "do_resize": True, "do_convert_rgb": True}
        lo, hi = (4 * 28 * 28, 16 * 28 * 28) if tiny else (3136, 12845056)
        vlo, vhi = (4 * 28 * 28, 16 * 28 * 28) if tiny else (128 * 28 * 28, 768 * 28 * 28)
        image = dict(common, min_pixels=lo, max_pixels=hi, image_processor_type="Qwen2VLImageProcessor")
        video = dict(common, min_pixels=vlo, max_pixels=vhi, size={"shortest_edge": vlo, "longest_edge": vhi},
                     video_processor_type="Qwen2VLVideoProcessor")
        return image, video
    if family == "qwen3_vl":
        common = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3,
                  "image_std": [0.5] * 3, "processor_class": "Qwen3VLProcessor"}
        size = {"longest_edge": 16 * 32 * 32, "shortest_edge": 4 * 32 * 32} if tiny else \
            {"longest_edge": 16777216, "shortest_edge": 65536}
        vsize = {"longest_edge": 2 * 16 * 32 * 32, "shortest_edge": 2 * 4 * 32 * 32} if tiny else \
            {"longest_edge": 25165824, "shortest_edge": 4096}
        image = dict(common, size=size, image_processor_type="Qwen2VLImageProcessorFast")
        video = dict(common, size=vsize, video_processor_type="Qwen3VLVideoProcessor", fps=2, min_frames=4,
                     max_frames=768, do_sample_frames=True)
        return image, video
    common = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
              "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 3, "rescale_factor": 1 / 255,
              "size": {"height": image_size, "width": image_size}, "processor_class": "LlavaOnevisionProcessor"}
    pinpoints = [[h, w] for h in range(image_size, 6 * image_size + 1, image_size)
                 for w in range(image_size, 6 * image_size + 1, image_size)]
    image = dict(common, do_pad=True, image_grid_pinpoints=pinpoints,
                 image_processor_type="LlavaOnevisionImageProcessor")
    video = dict(common, video_processor_type="LlavaOnevisionVideoProcessor")
    return image, video


def write_checkpoint(folder, family: str, *, sharded: bool = False, config: dict | None = None,
                     weights: bool = True, video_token: bool = True, processor: dict | None = None,
                     video_processor: dict | None = None) -> Path:
    """Write a checkpoint folder of ``family`` (see the module docstring) and return it."""
    import torch

    from streampress.models.random import llava_onevision as llava_spec
    from streampress.models.random import qwen as qwen_spec

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    qwen = family != "llava_onevision"
    tok = build_tokenizer(family, special_base=QWEN_BASE_ID if config is not None else None, video_token=video_token)
    ids = token_ids(tok, family)
    if config is None:
        spec = qwen_spec if qwen else llava_spec
        cfg = spec.build_config(RANDOM_ARCH[family])
        text = cfg.text_config
        text.bos_token_id, text.eos_token_id, text.pad_token_id = (
            ids["<|endoftext|>"], ids["<|im_end|>"], ids["<|endoftext|>"])
        if qwen:
            cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id = (
                ids["<|image_pad|>"], ids["<|vision_start|>"], ids["<|vision_end|>"])
            cfg.video_token_id = tok.token_to_id("<|video_pad|>") or tok.token_to_id("<|unused_video_slot|>")
        else:
            cfg.image_token_id = ids["<image>"]
            cfg.video_token_id = tok.token_to_id("<video>") or tok.token_to_id("<|unused_video_slot|>")
        model = spec.build_model(cfg, torch.float32, "cpu", seed=0)
        model.save_pretrained(folder, max_shard_size="400KB" if sharded else "5GB")
        image_size = cfg.vision_config.image_size if not qwen else 384
    else:
        if weights:
            raise ValueError("a published config is written without weights (build it with random_weights=True)")
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        image_size = config.get("vision_config", {}).get("image_size", 384)
    (folder / "generation_config.json").write_text(json.dumps(generation_config(family, ids), indent=2))
    tok.save(str(folder / "tokenizer.json"))
    tok.model.save(str(folder))  # vocab.json + merges.txt, as the released repos also ship them
    older_layout = family in ("qwen2_vl", "qwen2_5_vl")
    (folder / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(tok, family, older_layout), indent=2))
    if family == "llava_onevision":
        (folder / "chat_template.jinja").write_text(TEMPLATES[family])
        side = image_size // 14
        (folder / "processor_config.json").write_text(json.dumps(
            {"num_image_tokens": side * side, "vision_feature_select_strategy": "full",
             "processor_class": "LlavaOnevisionProcessor"}, indent=2))
    else:
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATES[family]}, indent=2))
    image, video = processor_configs(family, tiny=config is None, image_size=image_size)
    image.update(processor or {})
    video.update(video_processor or {})
    (folder / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    return folder


def published_configs() -> dict[str, dict]:
    """name -> fixture (``repo``, ``parameters``, ``notes``, ``config``) from tests/fixtures/configs."""
    here = Path(__file__).resolve().parent / "fixtures" / "configs"
    return {p.stem: json.loads(p.read_text()) for p in sorted(here.glob("*.json"))}
