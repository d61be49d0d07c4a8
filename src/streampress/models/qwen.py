"""Adapter for Qwen2-VL, Qwen2.5-VL and Qwen3-VL (see :mod:`streampress.models.base`).

Stream layout (positions are M-RoPE ``(t, h, w)``, computed here for every token):

- **Qwen2-VL / Qwen2.5-VL** lay the stream out as ONE video, as their processors lay out
  a clip: ``<prefix ... <|vision_start|>> [item 0][item 1]...`` and the question turn
  ``<|vision_end|>question<|im_end|>\\n<|im_start|>assistant\\n``. With S the position
  where the video starts, the token (row r, column c) of item k sits at
  ``(S + dt_k, S + r, S + c)``. Qwen2.5-VL: ``dt_k = int((t_k - t_0) * tokens_per_second)``
  where t_k is the item's first frame time and t_0 the stream's first frame time (the
  official ``second_per_grid_t * tokens_per_second`` rule, truncated to int like the
  official code; ``tokens_per_second`` from the vision config, default 2). Qwen2-VL:
  ``dt_k = k`` (its processor numbers temporal patches).
- **Qwen3-VL** follows its processor: each item is ``<{t:.1f} seconds><|vision_start|>``
  + tokens + ``<|vision_end|>``, where t is the mean of the item's first and last frame
  times (seconds since the stream's first frame); the item's tokens sit at
  ``(s, s + r, s + c)`` with s the position after its timestamp text, and the following
  text resumes at ``s + max(H', W')`` (= max + 1). With a checkpoint's chat template the
  items sit inside the template's own ``<|vision_start|>`` ... ``<|vision_end|>`` (the
  stream prefix ends with it, the question turn starts with its end), as transformers 5.x's
  processor lays a video out (see :func:`prompt_pieces`).

Text after the video always resumes at ``max(all positions) + 1`` on every axis.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import (
    VISUAL,
    EncodedItems,
    ModelAdapter,
    PositionState,
    TokenLayout,
    VisualBatch,
    cacher_of,
    resolve_dtype_device,
    text_positions,
)
from .qwen_preprocess import QwenVisionParams, preprocess_frames

_SENTINEL = "\x00QUESTION\x00"
_BUILTIN_PROMPTS = {
    # (stream prefix, question turn with {question})
    "qwen2": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>",
              "<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"),
    "qwen3": ("<|im_start|>user\n", "{question}<|im_end|>\n<|im_start|>assistant\n"),
}


def prompt_pieces(tokenizer: Any, model_type: str, chat_template: str | None = None) -> tuple[str, str]:
    """(stream prefix, question template) from the checkpoint's chat template, else built-in.

    The template is rendered for one user turn holding a video and a sentinel question;
    the text before the video's placeholder opens the stream, the rest is the question turn.
    Qwen2/2.5-VL: the placeholder is ``<|video_pad|>`` (the prefix ends with the template's
    ``<|vision_start|>``, the question turn starts with ``<|vision_end|>``). Qwen3-VL: the
    whole ``<|vision_start|><|video_pad|><|vision_end|>``, which its processor as released
    (transformers 4.57, the format the model was trained with) replaces by per-item
    ``<t seconds><|vision_start|>...<|vision_end|>`` runs. The transformers 5.x processor
    replaces only ``<|video_pad|>`` and so nests those runs inside the template's wrapper;
    streampress keeps the released, trained layout.
    """
    qwen3 = model_type == "qwen3_vl"
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if template:
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": _SENTINEL}]}]
        try:
            text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)
            marker = "<|vision_start|><|video_pad|><|vision_end|>" if qwen3 else "<|video_pad|>"
            if isinstance(text, str) and text.count(marker) == 1 and text.count(_SENTINEL) == 1:
                prefix, rest = text.split(marker)
                return prefix, rest.replace("{", "{{").replace("}", "}}").replace(_SENTINEL, "{question}")
        except Exception:  # an unusual template: fall back to the family's standard prompt
            pass
    return _BUILTIN_PROMPTS["qwen3" if qwen3 else "qwen2"]


def _load_chat_template(path: str) -> str | None:
    for fname in ("chat_template.jinja", "chat_template.json"):
        file = os.path.join(path, fname)
        if os.path.isfile(file):
            with open(file) as f:
                return json.load(f)["chat_template"] if fname.endswith(".json") else f.read()
    return None


class QwenAdapter(ModelAdapter):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL behind the :class:`ModelAdapter` protocol."""

    position_axes = 3

    def __init__(self, hf_model, tokenizer, params: QwenVisionParams, name: str = "",
                 chat_template: str | None = None, stop_token_ids=None):
        config = hf_model.config
        self.hf_model = hf_model
        self.family = config.model_type
        self.name = name or self.family
        self.tokenizer = tokenizer
        self.params = params
        self.frames_per_item = params.temporal_patch_size
        self.hidden_size = int(config.text_config.hidden_size)
        self.max_context = int(config.text_config.max_position_embeddings)
        self.tokens_per_second = float(getattr(config.vision_config, "tokens_per_second", None) or 2)
        self._qwen3 = self.family == "qwen3_vl"
        prefix, self._question = prompt_pieces(tokenizer, self.family, chat_template)
        self._prefix_ids = self.tokenize(prefix)
        self._ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
                     ("<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
        self._stop = frozenset(stop_token_ids) if stop_token_ids else frozenset(
            i for t, i in self._ids.items() if t in ("<|im_end|>", "<|endoftext|>") and isinstance(i, int) and i >= 0)

    # ---- loading ----------------------------------------------------------------------
    @classmethod
    def from_random(cls, arch: str, dtype=None, device=None, num_layers: int | None = None,
                    vision_depth: int | None = None, vocab_size: int | None = None, seed: int = 0,
                    max_context: int | None = None, attn_implementation: str = "sdpa",
                    hidden_size: int | None = None, **params):
        """A built-in random-weight architecture (:mod:`.random.qwen`) with the byte tokenizer.
        ``hidden_size`` narrows the LLM (see :func:`.random.qwen.build_config`);
        ``params`` override preprocessing fields (e.g. ``min_pixels``, ``max_pixels``)."""
        from .random import qwen as spec

        dtype, device = resolve_dtype_device(dtype, device)
        tokenizer = spec.tokenizer()
        config = spec.build_config(arch, num_layers=num_layers, vision_depth=vision_depth, vocab_size=vocab_size,
                                   tokenizer=tokenizer, hidden_size=hidden_size)
        if max_context is not None:
            config.text_config.max_position_embeddings = int(max_context)
        config._attn_implementation = attn_implementation
        model = spec.build_model(config, dtype, device, seed=seed)
        vision = _override(QwenVisionParams.defaults(config.model_type), config, params)
        if arch.endswith("-tiny") and "min_pixels" not in params:
            # Tiny models serve tests and demos: let tiny frames stay tiny (one merged token).
            frames = vision.temporal_patch_size if vision.pixels_per_item else 1
            vision = _override(vision, config, {"min_pixels": frames * vision.factor ** 2})
        return cls(model, tokenizer, vision, name=f"random:{arch}")

    @classmethod
    def from_pretrained(cls, name_or_path: str, model_type: str, dtype=None, device=None,
                        attn_implementation: str = "sdpa", num_layers: int | None = None,
                        vision_depth: int | None = None, random_weights: bool = False, seed: int = 0, **params):
        """A checkpoint (hub id or folder) with its own tokenizer, chat template, stop ids
        (``generation_config.json``) and preprocessing parameters (its video, else image,
        preprocessor config); ``params`` override preprocessing fields. ``num_layers`` /
        ``vision_depth`` cut the model (the kept layers' weights are loaded);
        ``random_weights`` builds the folder's architecture with random weights instead."""
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

        from .checkpoint import check_folder, load_weights, require_token, stop_ids
        from .random import qwen as spec

        dtype, device = resolve_dtype_device(dtype, device)
        local = os.path.isdir(name_or_path)
        if local:
            check_folder(name_or_path, weights=not random_weights)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        config = AutoConfig.from_pretrained(name_or_path)
        for token, key in (("<|video_pad|>", "video_token_id"), ("<|vision_start|>", "vision_start_token_id"),
                           ("<|vision_end|>", "vision_end_token_id")):
            require_token(tokenizer, token, getattr(config, key, None), name_or_path, f"config.json {key}")
        model = load_weights(name_or_path, AutoModelForImageTextToText, spec.build_model, dtype, device,
                             attn_implementation, num_layers, vision_depth, random_weights, seed)
        config = model.config
        template = _load_chat_template(name_or_path) if local else None
        vision = _override(QwenVisionParams.from_checkpoint(name_or_path, model_type), config, params)
        fallback = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        return cls(model, tokenizer, vision, name=name_or_path, chat_template=template,
                   stop_token_ids=stop_ids(model, fallback))

    # ---- frames -> grids --------------------------------------------------------------
    def preprocess(self, frames: torch.Tensor) -> VisualBatch:
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8 [F, H, W, 3], got {tuple(frames.shape)} {frames.dtype}")
        if frames.shape[0] % self.frames_per_item:
            raise ValueError(f"frame count must be a multiple of {self.frames_per_item}, got {frames.shape[0]}")
        pixel_values, grid_thw, hw = preprocess_frames(frames.to(self.device), self.params)
        return VisualBatch(pixel_values, grid_thw, int(grid_thw[0, 0]), hw)

    @torch.no_grad()
    def encode(self, batch: VisualBatch, cacher_state: Any = None, cacher: Any = None) -> EncodedItems:
        visual = self.hf_model.model.visual
        pixel_values = batch.pixel_values.to(self.device, self.dtype)
        grid_thw = batch.grid_thw.to(self.device)
        if cacher_state is not None:
            out = cacher_of(cacher_state, cacher).encode(visual, pixel_values, grid_thw, cacher_state)
        else:
            out = visual(pixel_values, grid_thw=grid_thw)
        merged = out.pooler_output if hasattr(out, "pooler_output") else out
        m = self.params.merge_size
        t, gh, gw = (int(v) for v in batch.grid_thw[0])
        shape = (t, gh // m, gw // m)
        extras = {}
        deepstack = getattr(out, "deepstack_features", None)
        if deepstack:
            extras["deepstack"] = torch.stack(list(deepstack), dim=1).reshape(*shape, len(deepstack), -1)
        return EncodedItems(merged.reshape(*shape, -1), extras)

    # ---- layout -----------------------------------------------------------------------
    def begin_stream(self, state: PositionState) -> tuple[TokenLayout, PositionState]:
        return self._text_run(state, self._prefix_ids)

    def layout_items(self, state: PositionState, frame_times: torch.Tensor,
                     grid_hw: tuple[int, int]) -> tuple[TokenLayout, PositionState]:
        n = int(frame_times.shape[0])
        hh, ww = grid_hw
        rows = torch.arange(hh).repeat_interleave(ww)
        cols = torch.arange(ww).repeat(hh)
        if not self._qwen3:
            items = torch.arange(state.num_items, state.num_items + n)
            if state.video_start is None:  # the video (re)starts here: the stream's start, or after re-indexing
                state = state.advanced(video_start=state.next_position, video_time=float(frame_times[0, 0]),
                                       video_item=state.num_items)
            start = state.video_start
            if self.family == "qwen2_5_vl":
                dt = ((frame_times[:, 0].to(torch.float64) - state.video_time) * self.tokens_per_second).long()
            else:
                dt = items - state.video_item
            pos = torch.stack([
                dt.repeat_interleave(hh * ww) + start,
                rows.repeat(n) + start,
                cols.repeat(n) + start])
            layout = TokenLayout(
                kinds=torch.full((n * hh * ww,), VISUAL, dtype=torch.long),
                input_ids=torch.zeros(n * hh * ww, dtype=torch.long),
                positions=pos,
                visual_index=torch.arange(n * hh * ww),
                item=items.repeat_interleave(hh * ww))
            top = max(state.max_position, int(pos.max()))
            return layout, state.advanced(next_position=top + 1, max_position=top, num_items=state.num_items + n)
        # Qwen3-VL: timestamp text + <|vision_start|> + tokens + <|vision_end|> per item.
        mid = (frame_times[:, 0] + frame_times[:, -1]).to(torch.float64) / 2
        vis_start, vis_end = self._ids["<|vision_start|>"], self._ids["<|vision_end|>"]
        cursor, parts = state.next_position, []
        span = max(hh, ww)
        for k, t in enumerate(mid.tolist()):
            head = self.tokenize(f"<{t:.1f} seconds>") + [vis_start]
            item = state.num_items + k
            parts.append(TokenLayout.text(head, text_positions(cursor, len(head), 3), item=item))
            s = cursor + len(head)
            parts.append(TokenLayout(
                kinds=torch.full((hh * ww,), VISUAL, dtype=torch.long),
                input_ids=torch.zeros(hh * ww, dtype=torch.long),
                positions=torch.stack([torch.full((hh * ww,), s), rows + s, cols + s]),
                visual_index=torch.arange(k * hh * ww, (k + 1) * hh * ww),
                item=torch.full((hh * ww,), item)))
            parts.append(TokenLayout.text([vis_end], text_positions(s + span, 1, 3), item=item))
            cursor = s + span + 1
        layout = TokenLayout.cat(parts)
        return layout, state.advanced(next_position=cursor, max_position=max(state.max_position, cursor - 1),
                                      num_items=state.num_items + n, video_start=state.video_start
                                      if state.video_start is not None else state.next_position)

    def relocate(self, state: PositionState, top: int) -> PositionState:
        """After position re-indexing: the next item starts the video anew right after
        ``top`` (Qwen2/2.5-VL anchor every item at the video's start; Qwen3-VL lays each
        item out at the cursor)."""
        return state.advanced(next_position=top + 1, max_position=top,
                              video_start=state.video_start if self._qwen3 else None)

    def question_ids(self, question: str, has_video: bool = True) -> list[int]:
        return self.tokenize(self._question.format(question=question))

    # ---- text ---------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return self._stop

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hf_model.get_input_embeddings()(ids.to(self.device))

    # ---- language model -------------------------------------------------------------
    @torch.no_grad()
    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, cache: Any,
                visual_mask: torch.Tensor | None = None, extras: Mapping[str, torch.Tensor] | None = None,
                logits: str = "last") -> torch.Tensor | None:
        kwargs = {}
        deepstack = (extras or {}).get("deepstack")
        if self._qwen3 and deepstack is not None and visual_mask is not None and bool(visual_mask.any()):
            kwargs["visual_pos_masks"] = visual_mask.to(self.device)[None]
            kwargs["deepstack_visual_embeds"] = list(deepstack.to(self.device, self.dtype).unbind(1))
        return self._run_language_model(embeds, positions[:, None], cache, logits, **kwargs)

    # ---- attention internals: Qwen3 normalises each head's queries and keys ----------
    def query_states(self, attn: Any, hidden: torch.Tensor) -> torch.Tensor:
        return self._head_states(attn.q_proj, attn.q_norm if self._qwen3 else None, attn.head_dim, hidden)

    def key_states(self, attn: Any, hidden: torch.Tensor) -> torch.Tensor:
        return self._head_states(attn.k_proj, attn.k_norm if self._qwen3 else None, attn.head_dim, hidden)


def _override(params: QwenVisionParams, config, overrides: dict) -> QwenVisionParams:
    """Apply user overrides and make the patch geometry agree with the vision config."""
    from dataclasses import fields, replace

    known = {f.name for f in fields(QwenVisionParams)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"unknown keyword(s) {sorted(unknown)}; preprocessing fields are {sorted(known)}")
    vc = config.vision_config
    geometry = dict(patch_size=int(vc.patch_size), merge_size=int(vc.spatial_merge_size),
                    temporal_patch_size=int(vc.temporal_patch_size))
    return replace(params, **{**geometry, **overrides})
