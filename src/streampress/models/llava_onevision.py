"""LLaVA-OneVision: SigLIP encoder, projector, 2x2 bilinear pooling and a Qwen2 LLM with 1-D RoPE.

Per frame (an *item*; ``frames_per_item = 1``): the frame is resized to the vision tower's
square input (384x384), SigLIP encodes it alone (27x27 patch tokens), the hidden state of
``vision_feature_layer`` goes through the two-layer projector into the LLM's space, and a
bilinear 2x2 pooling gives the ``[14, 14, D]`` grid the pruners score -- exactly
``LlavaOnevisionModel.get_video_features`` of transformers 5.x, frame by frame.

Sequence layout, as Hugging Face lays out a video: the frames' grids one after another in
raster order, then ONE learned ``image_newline`` embedding after the whole video (not one
per frame), then the text. In a stream the video "ends" whenever a question is asked, so the
newline belongs to the question turn: :meth:`LlavaOneVisionAdapter.question_ids` starts with
the ``<video>`` placeholder id, which :meth:`LlavaOneVisionAdapter.embed_text` turns into
``image_newline``. It is a text-kind token, never pruned, and leaves the cache with the
question. Positions are 1-D (``[1, L]``): every visual token keeps its index in the unpruned
sequence, and text after the video resumes at the maximum position so far plus one, which
for an unpruned stream reproduces Hugging Face's consecutive positions exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from .base import (
    VISUAL,
    EncodedItems,
    ModelAdapter,
    PositionState,
    TokenLayout,
    VisualBatch,
    cacher_of,
    positive_int,
    resolve_dtype_device,
    text_positions,
)
from .llava_onevision_preprocess import (
    DEFAULT_PREFIX,
    DEFAULT_QUESTION,
    FramePreprocessor,
    as_frame_tensor,
    pooled_side,
    read_chat_template,
    split_chat_template,
)
from .tokenizer import ByteTokenizer


def _feature_layers(vision_feature_layer, num_layers: int) -> list[int]:
    """Hidden-state indices (0 = embeddings, i = output of block i) a config selects."""
    layers = [vision_feature_layer] if isinstance(vision_feature_layer, int) else list(vision_feature_layer)
    out = [k if k >= 0 else num_layers + 1 + k for k in layers]
    if not out or min(out) < 0 or max(out) > num_layers:
        raise ValueError(f"vision_feature_layer {vision_feature_layer!r} is outside 0..{num_layers}")
    return out


def _gather(taken: dict[int, torch.Tensor], wanted: list[int]) -> torch.Tensor:
    """The hidden state of the one wanted layer, or the wanted layers' concatenated."""
    return taken[wanted[0]] if len(wanted) == 1 else torch.cat([taken[k] for k in wanted], dim=-1)


def siglip_features(vision_tower, pixel_values: torch.Tensor, vision_feature_layer) -> torch.Tensor:
    """SigLIP hidden state(s) at ``vision_feature_layer`` (``[T, N, Dv]``, concatenated over
    layers for a list), running only the blocks needed; equals
    ``vision_tower(px, output_hidden_states=True).hidden_states[layer]``."""
    blocks = vision_tower.encoder.layers
    wanted = _feature_layers(vision_feature_layer, len(blocks))
    hidden = vision_tower.embeddings(pixel_values.to(vision_tower.embeddings.patch_embedding.weight.dtype))
    taken = {0: hidden} if 0 in wanted else {}
    for i, block in enumerate(blocks[: max(wanted)], start=1):
        hidden = block(hidden, None)
        if i in wanted:
            taken[i] = hidden
    return _gather(taken, wanted)


@contextmanager
def feature_capture(vision_tower, vision_feature_layer):
    """Keeps the SigLIP hidden state(s) at ``vision_feature_layer`` of a tower call made inside
    the ``with`` block, and only those (forward hooks on the embeddings / the layers that
    produce them); yields a function returning them like :func:`siglip_features`.

    The same tensors as ``vision_tower(px, output_hidden_states=True).hidden_states[layer]``,
    without that flag's holding every layer's output until the tower returns."""
    blocks = vision_tower.encoder.layers
    wanted = _feature_layers(vision_feature_layer, len(blocks))
    taken: dict[int, torch.Tensor] = {}

    def keep(k: int):
        def hook(module, args, out):
            taken[k] = out[0] if isinstance(out, tuple) else out
        return hook

    handles = [(vision_tower.embeddings if k == 0 else blocks[k - 1]).register_forward_hook(keep(k))
               for k in sorted(set(wanted))]
    try:
        yield lambda: _gather(taken, wanted)
    finally:
        for h in handles:
            h.remove()


def pool_2x2(features: torch.Tensor, side: int) -> torch.Tensor:
    """``[T, side*side, D]`` -> ``[T, ceil(side/2), ceil(side/2), D]`` by bilinear
    interpolation (``LlavaOnevisionModel.apply_pooling``)."""
    t, n, d = features.shape
    if n != side * side:
        raise ValueError(f"expected {side}x{side} = {side * side} patch tokens per frame, got {n}")
    x = features.view(t, side, side, d).permute(0, 3, 1, 2)
    out = side - side // 2
    x = F.interpolate(x, size=(out, out), mode="bilinear")
    return x.permute(0, 2, 3, 1)


def encode_pixels(hf_model, pixel_values: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel values ``[T, 3, S, S]`` -> pooled grids ``[T, s, s, D]`` in the LLM's space.

    ``hidden``: SigLIP features already computed (e.g. by the STC cacher); else the tower runs.
    """
    config = hf_model.config
    model = hf_model.model
    if hidden is None:
        hidden = siglip_features(model.vision_tower, pixel_values, config.vision_feature_layer)
    if config.vision_feature_select_strategy == "default":
        hidden = hidden[:, 1:]
    projected = model.multi_modal_projector(hidden)
    return pool_2x2(projected, config.vision_config.image_size // config.vision_config.patch_size)


class LlavaOneVisionAdapter(ModelAdapter):
    """Adapter of LLaVA-OneVision (``model_type`` ``llava_onevision``) for streaming sessions.

    Keeps no per-stream state: one adapter serves any number of interleaved sessions.
    ``prefix`` / ``question_template`` are the chat-template pieces before the video and
    after it (``{question}`` marks the question).
    """

    family = "llava_onevision"
    frames_per_item = 1
    position_axes = 1

    def __init__(self, hf_model, tokenizer, preprocessor: FramePreprocessor, prefix: str = DEFAULT_PREFIX,
                 question_template: str = DEFAULT_QUESTION, name: str = "llava-onevision", stop_token_ids=None):
        config = hf_model.config
        self.hf_model = hf_model.eval()
        self.tokenizer = tokenizer
        self.preprocessor = preprocessor
        self.name = name
        self.hidden_size = config.text_config.hidden_size
        self.max_context = int(config.text_config.max_position_embeddings)
        self.video_token_id = int(config.video_token_id)
        side = pooled_side(config.vision_config.image_size, config.vision_config.patch_size)
        self.grid_hw = (side, side)
        self.prefix_ids = self.tokenize(prefix)
        if "{question}" not in question_template:
            raise ValueError(f"question_template must contain '{{question}}', got {question_template!r}")
        self.question_template = question_template
        stops = {self._special_id(t) for t in ("<|im_end|>", "<|endoftext|>")}
        eos = config.text_config.eos_token_id
        stops.update(eos if isinstance(eos, (list, tuple)) else [eos])
        self._stop_ids = frozenset(stop_token_ids) if stop_token_ids else frozenset(
            int(i) for i in stops if i is not None)

    # ---- construction ---------------------------------------------------------------
    @classmethod
    def from_random(cls, arch: str, dtype=None, device=None, num_layers: int | None = None,
                    vision_depth: int | None = None, vocab_size: int | None = None, seed: int = 0,
                    max_context: int | None = None, attn_implementation: str = "sdpa") -> LlavaOneVisionAdapter:
        """A built-in random-weight architecture (:mod:`.random.llava_onevision`:
        ``llava-onevision-tiny`` / ``-7b``) with the byte-level tokenizer and the original
        LLaVA-OneVision chat template."""
        from .random import llava_onevision as spec

        dtype, device = resolve_dtype_device(dtype, device)
        tokenizer = spec.tokenizer()
        config = spec.build_config(arch, num_layers=num_layers, vision_depth=vision_depth, vocab_size=vocab_size,
                                   tokenizer=tokenizer)
        if max_context is not None:
            config.text_config.max_position_embeddings = positive_int("max_context", max_context)
        config._attn_implementation = attn_implementation
        model = spec.build_model(config, dtype=dtype, device=device, seed=seed)
        size = config.vision_config.image_size
        return cls(model, tokenizer, FramePreprocessor(size=(size, size)), name=f"random:{arch}")

    @classmethod
    def from_pretrained(cls, name_or_path: str, model_type: str = "llava_onevision", dtype=None, device=None,
                        attn_implementation: str = "sdpa", num_layers: int | None = None,
                        vision_depth: int | None = None, random_weights: bool = False, seed: int = 0,
                        **kw) -> LlavaOneVisionAdapter:
        """A checkpoint (hub id or folder) with its own tokenizer, chat template, stop ids
        (``generation_config.json``) and video processor settings. ``num_layers`` /
        ``vision_depth`` cut the model (the kept layers' weights are loaded);
        ``random_weights`` builds the folder's architecture with random weights instead.
        Extra keywords go to the model's ``from_pretrained``."""
        import os

        from transformers import AutoConfig, AutoTokenizer, LlavaOnevisionForConditionalGeneration

        from .checkpoint import check_folder, load_weights, require_token, stop_ids
        from .random import llava_onevision as spec

        if model_type != "llava_onevision":
            raise ValueError(f"model_type must be 'llava_onevision', got {model_type!r}")
        dtype, device = resolve_dtype_device(dtype, device)
        if os.path.isdir(name_or_path):
            check_folder(name_or_path, weights=not random_weights)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        require_token(tokenizer, "<video>", AutoConfig.from_pretrained(name_or_path).video_token_id, name_or_path,
                      "config.json video_token_id")
        model = load_weights(name_or_path, LlavaOnevisionForConditionalGeneration, spec.build_model, dtype, device,
                             attn_implementation, num_layers, vision_depth, random_weights, seed, **kw)
        size = model.config.vision_config.image_size
        preprocessor = FramePreprocessor.from_pretrained(name_or_path, image_size=size)
        prefix, question = DEFAULT_PREFIX, DEFAULT_QUESTION
        template = read_chat_template(name_or_path, tokenizer)
        if template:
            prefix, question = split_chat_template(template)
        fallback = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        return cls(model, tokenizer, preprocessor, prefix, question, name=name_or_path,
                   stop_token_ids=stop_ids(model, fallback))

    def _special_id(self, token: str) -> int | None:
        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer.token_id(token) if token in self.tokenizer.special_tokens else None
        tid = self.tokenizer.convert_tokens_to_ids(token)
        return None if tid is None or tid == getattr(self.tokenizer, "unk_token_id", -1) else tid

    # ---- frames -> grids ------------------------------------------------------------
    def preprocess(self, frames) -> VisualBatch:
        pixels = self.preprocessor(as_frame_tensor(frames), device=self.device)
        return VisualBatch(pixel_values=pixels, grid_thw=None, num_items=int(pixels.shape[0]),
                           frame_hw=tuple(self.preprocessor.size))

    @torch.no_grad()
    def encode(self, batch: VisualBatch, cacher_state: Any = None, cacher: Any = None) -> EncodedItems:
        """Pooled grids ``[T, s, s, D]``; with a cacher state the SigLIP tower runs through
        ``cacher.encode(tower, pixels, None, state)`` (every frame is one cacher item),
        keeping only the hidden state(s) of ``vision_feature_layer`` (:func:`feature_capture`)."""
        pixels = batch.pixel_values.to(self.device, self.dtype)
        hidden = None
        if cacher_state is not None:
            tower = self.hf_model.model.vision_tower
            with feature_capture(tower, self.hf_model.config.vision_feature_layer) as features:
                cacher_of(cacher_state, cacher).encode(tower, pixels, None, cacher_state, output_hidden_states=False)
            hidden = features()
        return EncodedItems(grids=encode_pixels(self.hf_model, pixels, hidden=hidden))

    # ---- layout ---------------------------------------------------------------------
    def begin_stream(self, state: PositionState) -> tuple[TokenLayout, PositionState]:
        return self._text_run(state, self.prefix_ids)

    def layout_items(self, state: PositionState, frame_times: torch.Tensor,
                     grid_hw: tuple[int, int]) -> tuple[TokenLayout, PositionState]:
        t = int(frame_times.shape[0])
        per_item = int(grid_hw[0]) * int(grid_hw[1])
        n = t * per_item
        start = state.next_position
        layout = TokenLayout(
            kinds=torch.full((n,), VISUAL, dtype=torch.long),
            input_ids=torch.full((n,), self.video_token_id, dtype=torch.long),
            positions=text_positions(start, n, 1),  # 1-D RoPE: consecutive positions, as text
            visual_index=torch.arange(n, dtype=torch.long),
            item=torch.arange(state.num_items, state.num_items + t, dtype=torch.long).repeat_interleave(per_item),
        )
        new_state = state.advanced(
            next_position=start + n, max_position=max(state.max_position, start + n - 1),
            num_items=state.num_items + t,
            video_start=start if state.video_start is None else state.video_start)
        return layout, new_state

    def question_ids(self, question: str, has_video: bool) -> list[int]:
        """The question turn; with video it starts with the ``<video>`` id, embedded as the
        model's ``image_newline`` (Hugging Face's end-of-video token)."""
        ids = self.tokenize(self.question_template.format(question=question))
        return ([self.video_token_id] + ids) if has_video else ids

    # ---- text -----------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return self._stop_ids

    @torch.no_grad()
    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings; the ``<video>`` id becomes ``image_newline``."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(-1)
        embeds = self.hf_model.get_input_embeddings()(ids)
        is_newline = (ids == self.video_token_id).unsqueeze(-1)
        return torch.where(is_newline, self.hf_model.model.image_newline.to(embeds.dtype), embeds)

    # ---- language model -------------------------------------------------------------
    @torch.no_grad()
    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, cache: Any,
                visual_mask: torch.Tensor | None = None, extras: Mapping[str, torch.Tensor] | None = None,
                logits: str = "last") -> torch.Tensor | None:
        if embeds.ndim != 2 or positions.shape != (1, embeds.shape[0]):
            raise ValueError(f"expected embeds [L, D] and positions [1, L], got {tuple(embeds.shape)} "
                             f"and {tuple(positions.shape)}")
        return self._run_language_model(embeds, positions, cache, logits)


LlavaOnevisionAdapter = LlavaOneVisionAdapter
"""Alias with transformers' capitalisation (``LlavaOnevision...``)."""
