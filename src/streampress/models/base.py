"""The model-adapter protocol that :class:`streampress.session.StreamingSession` drives.

An adapter wraps one Hugging Face vision-language model and exposes what a *stream* needs,
as plain tensors, so that the session can stay model-agnostic:

1. ``preprocess(frames)`` -- uint8 frames ``[F, H, W, 3]`` (F a multiple of
   ``frames_per_item``) to a :class:`VisualBatch` of ``F // frames_per_item`` *items*.
   An item is the unit the LLM sees per time step: a temporal patch of 2 frames for Qwen,
   one frame for LLaVA-OneVision.
2. ``encode(batch, cacher_state=None, cacher=None)`` -- the vision tower (+ merger /
   projector / pooling) to :class:`EncodedItems`: ``grids [T, H', W', D]`` in the LLM's
   embedding space plus per-token ``extras`` (e.g. Qwen3-VL DeepStack features
   ``[T, H', W', n_deepstack, D]``) that the session prunes with the same keep mask.
   With a cacher state the adapter routes the vision tower through
   ``cacher.encode(visual_module, pixel_values, grid_thw, state)``.
3. Layout and positions. :meth:`ModelAdapter.begin_stream` gives the text that opens a
   stream (system prompt, chat header, ...) and :meth:`ModelAdapter.layout_items` the
   token sequence of a chunk of items: wrapper text tokens (Qwen3-VL timestamps,
   ``<|vision_start|>`` ...) interleaved with the visual tokens, with the positions of
   EVERY token of the unpruned stream. Positions are ``[P, L]`` int64 tensors: P = 3
   for Qwen's M-RoPE (t, h, w), P = 1 for 1-D RoPE. The position bookkeeping lives in an
   immutable :class:`PositionState` that the session owns (one per stream) and replaces
   only after a chunk succeeded.
4. Text: ``tokenize`` / ``detokenize`` / ``embed_text`` and the prompt pieces
   (:meth:`ModelAdapter.question_ids`). Text after video starts at
   ``state.max_position + 1`` on every axis (the official Qwen / vLLM rule), and each
   generated token advances it by one.
5. ``forward(embeds, positions, cache, ...)`` -- one language-model forward with explicit
   positions into a KV cache (``new_cache()``), returning last-token logits on request.

The session never looks inside the HF model and never relies on model-level state such
as ``rope_deltas``; an adapter keeps no per-stream state either, so one adapter serves any
number of interleaved sessions.

A new family subclasses :class:`ModelAdapter` and registers with one line in
``streampress/models/__init__.py`` (see ``register_family``).
"""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

TEXT = 0
"""Token kind of a text (wrapper / prompt) token in a :class:`TokenLayout`."""
VISUAL = 1
"""Token kind of a visual token in a :class:`TokenLayout`."""


@dataclass
class VisualBatch:
    """Preprocessed pixels of ``num_items`` consecutive items of one stream.

    ``pixel_values`` and ``grid_thw`` are in the layout the family's vision tower takes
    (Qwen: ``pixel_values_videos [sum t*h*w, C*tp*p*p]`` and ``video_grid_thw [1, 3]`` with
    t = ``num_items``; LLaVA-OV: ``[num_items, 3, S, S]`` and ``grid_thw`` None).
    ``frame_hw`` is the (height, width) the frames were resized to.
    """

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor | None
    num_items: int
    frame_hw: tuple[int, int]
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class EncodedItems:
    """Vision-tower output for a chunk of items.

    ``grids``: ``[T, H', W', D]`` post-merger/projector embeddings (what the LLM reads and
    what pruners score). ``extras``: name -> tensor ``[T, H', W', ...]``, one entry per
    visual token, pruned with the same mask as ``grids`` and handed back to
    :meth:`ModelAdapter.forward` (kept tokens only, flattened to ``[N_kept, ...]``).
    """

    grids: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class PositionState:
    """Position bookkeeping of one stream (immutable; owned by the session).

    - ``next_position``: where the next sequentially laid out token goes (the cursor).
    - ``max_position``: maximum position on any axis of all tokens so far, pruned ones
      included (the unpruned stream); -1 before anything. Text after video starts at
      ``max_position + 1``.
    - ``num_items``: items laid out so far (the index of the next item).
    - ``start_time``: timestamp (seconds) of the stream's first frame, None before it.
    - ``video_start``: position where the stream's video began (Qwen2/2.5-VL lay the
      whole stream out as one video starting there), None before the first item (and
      after a position re-indexing: the next item starts the video anew).
    - ``video_time`` / ``video_item``: the stream time (seconds since the first frame)
      and item index of the first item laid out from ``video_start`` (0 and 0 for the
      stream's own start; Qwen2/2.5-VL measure temporal positions from them).
    """

    next_position: int = 0
    max_position: int = -1
    num_items: int = 0
    start_time: float | None = None
    video_start: int | None = None
    video_time: float = 0.0
    video_item: int = 0

    def advanced(self, **changes) -> PositionState:
        return replace(self, **changes)


@dataclass
class TokenLayout:
    """A run of tokens in sequence order: text tokens and visual tokens, with positions.

    - ``kinds``: ``[L]`` int64, :data:`TEXT` or :data:`VISUAL`.
    - ``input_ids``: ``[L]`` int64 token ids of text tokens (visual entries: any id, unused).
    - ``positions``: ``[P, L]`` int64 positions of every token (unpruned stream).
    - ``visual_index``: ``[L]`` int64: for visual tokens, the index into
      ``grids.reshape(-1, D)`` of the chunk (T*H'*W' raster order); -1 for text.
    - ``item``: ``[L]`` int64: the stream-wide item index a token belongs to (wrapper text
      of an item included), -1 for tokens that belong to no item (prompt text).
    """

    kinds: torch.Tensor
    input_ids: torch.Tensor
    positions: torch.Tensor
    visual_index: torch.Tensor
    item: torch.Tensor

    def __len__(self) -> int:
        return int(self.kinds.numel())

    @staticmethod
    def text(ids: Sequence[int], positions: torch.Tensor, item: int = -1) -> TokenLayout:
        """A text-only layout of ``ids`` at ``positions [P, len(ids)]``."""
        n = len(ids)
        return TokenLayout(
            kinds=torch.full((n,), TEXT, dtype=torch.long),
            input_ids=torch.as_tensor(list(ids), dtype=torch.long).reshape(n),
            positions=positions.to(torch.long),
            visual_index=torch.full((n,), -1, dtype=torch.long),
            item=torch.full((n,), item, dtype=torch.long),
        )

    def select(self, mask: torch.Tensor) -> TokenLayout:
        """The tokens where ``mask [L]`` (bool) is set, in sequence order."""
        return TokenLayout(self.kinds[mask], self.input_ids[mask], self.positions[:, mask],
                           self.visual_index[mask], self.item[mask])

    @staticmethod
    def cat(parts: Sequence[TokenLayout]) -> TokenLayout:
        return TokenLayout(
            kinds=torch.cat([p.kinds for p in parts]),
            input_ids=torch.cat([p.input_ids for p in parts]),
            positions=torch.cat([p.positions for p in parts], dim=1),
            visual_index=torch.cat([p.visual_index for p in parts]),
            item=torch.cat([p.item for p in parts]),
        )


def text_positions(start: int, n: int, num_axes: int) -> torch.Tensor:
    """Positions ``[num_axes, n]`` of ``n`` consecutive text tokens from ``start`` (all axes equal)."""
    return (torch.arange(n, dtype=torch.long) + start).unsqueeze(0).expand(num_axes, n).clone()


def resolve_dtype_device(dtype, device) -> tuple[torch.dtype, torch.device]:
    """Defaults: CUDA when available; bfloat16 on CUDA, float32 elsewhere. ``dtype`` may be a
    floating torch dtype or its name ("bfloat16", "torch.float32")."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise RuntimeError(f"device {str(device)!r} asked for, but CUDA is not available ({why}); use device 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(f"device {str(device)!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) "
                           "are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device {str(device)!r} asked for, but MPS is not available; use device 'cpu'")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype or its name (e.g. 'bfloat16'), got {dtype!r}")
    return dtype, device


def positive_int(name: str, value) -> int:
    """``value`` if it is a positive int (bools excluded), else ValueError naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def cacher_of(cacher_state: Any, cacher: Any) -> Any:
    """The cacher that serves ``cacher_state`` (given, or the state's own ``cacher``)."""
    cacher = cacher if cacher is not None else getattr(cacher_state, "cacher", None)
    if cacher is None:
        raise ValueError("cacher_state was given without its cacher")
    return cacher


class ModelAdapter(ABC):
    """Protocol between a streaming session and one model family (see the module docstring).

    Attributes every adapter sets:
      ``family`` (str), ``hf_model`` (the Hugging Face model), ``frames_per_item`` (int),
      ``position_axes`` (P: 3 for M-RoPE, 1 for 1-D RoPE), ``hidden_size`` (D),
      ``max_context`` (largest position + 1 the LLM supports), ``device``, ``dtype``.
    """

    family: str
    hf_model: Any
    frames_per_item: int
    position_axes: int
    hidden_size: int
    max_context: int

    # ---- frames -> grids -------------------------------------------------------------
    @abstractmethod
    def preprocess(self, frames: torch.Tensor) -> VisualBatch:
        """uint8 ``[F, H, W, 3]`` (F a multiple of ``frames_per_item``) -> :class:`VisualBatch`."""

    @abstractmethod
    def encode(self, batch: VisualBatch, cacher_state: Any = None, cacher: Any = None) -> EncodedItems:
        """Vision tower on a batch -> :class:`EncodedItems` (grids ``[T, H', W', D]``)."""

    # ---- layout ---------------------------------------------------------------------
    @abstractmethod
    def begin_stream(self, state: PositionState) -> tuple[TokenLayout, PositionState]:
        """The text that opens a stream (system prompt, chat header, ...), laid out at
        ``state.next_position``, and the state after it."""

    @abstractmethod
    def layout_items(
        self, state: PositionState, frame_times: torch.Tensor, grid_hw: tuple[int, int]
    ) -> tuple[TokenLayout, PositionState]:
        """Layout of a chunk of T items. ``frame_times``: float64 ``[T, frames_per_item]``,
        seconds since the stream's first frame. Returns every token of the chunk (wrapper
        text and all H'*W' visual tokens per item, in sequence order) with positions of
        the unpruned stream, and the state after the chunk (pure: ``state`` is unchanged).
        Every token carries the index of its item (``item``), items in increasing order, so
        that memory policies can evict an item with its wrapper text."""

    @abstractmethod
    def question_ids(self, question: str, has_video: bool) -> list[int]:
        """Token ids of the user's question turn that follows the stream (closing
        wrappers, the question, end of turn, the assistant header)."""

    # ---- text -----------------------------------------------------------------------
    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Text -> token ids (no special tokens added)."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Token ids -> text (special tokens skipped)."""

    @property
    @abstractmethod
    def stop_token_ids(self) -> frozenset[int]:
        """Ids that end an answer (end of turn / end of text)."""

    @abstractmethod
    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """``[L]`` int64 ids -> ``[L, D]`` embeddings (model dtype and device)."""

    # ---- language model -------------------------------------------------------------
    def new_cache(self) -> Any:
        """An empty KV cache (transformers ``DynamicCache``) for one stream."""
        from transformers import DynamicCache

        return DynamicCache(config=self.hf_model.config.text_config)

    @abstractmethod
    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: Any,
        visual_mask: torch.Tensor | None = None,
        extras: Mapping[str, torch.Tensor] | None = None,
        logits: str = "last",
    ) -> torch.Tensor | None:
        """One LLM forward of ``embeds [L, D]`` at ``positions [P, L]`` appended to ``cache``.

        ``visual_mask [L]`` marks visual tokens; ``extras`` holds the kept visual tokens'
        extras in sequence order (``[N_visual, ...]``). ``logits``: "none" (prefill only),
        "last" (``[V]`` float32 logits of the last token) or "all" (``[L, V]``).
        """

    def relocate(self, state: PositionState, top: int) -> PositionState:
        """The state after a memory store moved every cached token's position (position
        re-indexing): the largest live position is now ``top``; the next token goes right
        after it. Families whose items' positions hang on an anchor other than the cursor
        (Qwen2/2.5-VL's video start) override this to start a new anchor there."""
        return state.advanced(next_position=top + 1, max_position=top)

    # ---- conveniences shared by all families -----------------------------------------
    def _text_run(self, state: PositionState, ids: Sequence[int]) -> tuple[TokenLayout, PositionState]:
        """``ids`` laid out as text at ``state.next_position``, and the state after them."""
        start, end = state.next_position, state.next_position + len(ids)
        layout = TokenLayout.text(ids, text_positions(start, len(ids), self.position_axes))
        return layout, state.advanced(next_position=end, max_position=max(state.max_position, end - 1))

    def _run_language_model(self, embeds: torch.Tensor, position_ids: torch.Tensor, cache: Any, logits: str,
                            **kwargs) -> torch.Tensor | None:
        """The HF language model on ``embeds [L, D]`` at ``position_ids`` (the model's own
        layout) appended to ``cache``, then ``lm_head`` as :meth:`forward` documents."""
        if logits not in ("none", "last", "all"):
            raise ValueError(f"logits must be 'none', 'last' or 'all', got {logits!r}")
        kwargs[self._cache_keyword] = cache
        out = self.hf_model.model.language_model(
            inputs_embeds=embeds.to(self.device, self.dtype)[None], position_ids=position_ids.to(self.device),
            use_cache=True, **kwargs)
        if logits == "none":
            return None
        hidden = out.last_hidden_state[0]
        return self.hf_model.lm_head(hidden[-1] if logits == "last" else hidden).float()

    @functools.cached_property
    def _cache_keyword(self) -> str:
        """The language model's name for its KV-cache argument: ``cache`` from transformers
        5.24 (where ``past_key_values`` is deprecated), ``past_key_values`` before."""
        params = inspect.signature(self.hf_model.model.language_model.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    def language_model_layers(self) -> list:
        """The decoder layers of the language model, in order."""
        return list(self.hf_model.model.language_model.layers)

    # ---- attention internals (for memory policies that score cached keys) -------------
    # The model knowledge a retrieval memory needs lives here, not in the memory: a family
    # whose attention differs overrides these three methods.
    def attention_modules(self) -> list:
        """The self-attention module of every decoder layer, in layer order (module i runs
        on cache layer i and is called with ``hidden_states`` and the KV cache). The default
        expects Hugging Face's Qwen2-style attention (``q_proj``, ``k_proj``, ``head_dim``)."""
        try:
            mods = [layer.self_attn for layer in self.language_model_layers()]
        except AttributeError as exc:
            raise TypeError(f"expected decoder layers with self_attn (model.language_model.layers), got "
                            f"{type(self.hf_model).__name__}") from exc
        for m in mods:
            if not all(hasattr(m, a) for a in ("q_proj", "k_proj", "head_dim")):
                raise TypeError(f"expected decoder layers whose self_attn has q_proj, k_proj and head_dim, got "
                                f"{type(m).__name__}")
        return mods

    def query_states(self, attn: Any, hidden: torch.Tensor) -> torch.Tensor:
        """Query states ``[B, heads, L, head_dim]`` that attention module ``attn`` computes
        from ``hidden [B, L, D]`` before RoPE: the projection (a family whose attention also
        normalises each head, such as Qwen3, overrides this and :meth:`key_states`)."""
        return self._head_states(attn.q_proj, None, attn.head_dim, hidden)

    def key_states(self, attn: Any, hidden: torch.Tensor) -> torch.Tensor:
        """Key states ``[B, kv_heads, L, head_dim]`` before RoPE, as :meth:`query_states`
        (the cached keys are these, rotated at their positions)."""
        return self._head_states(attn.k_proj, None, attn.head_dim, hidden)

    @staticmethod
    def _head_states(proj: Any, norm: Any, head_dim: int, hidden: torch.Tensor) -> torch.Tensor:
        b, n, _ = hidden.shape
        x = proj(hidden).view(b, n, -1, head_dim)
        if norm is not None:
            x = norm(x)
        return x.transpose(1, 2)

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, float32 ``[L, head_dim]``: the rotation the language model's
        attention applies to keys and queries at ``positions [P, L]`` (M-RoPE sections
        folded in), from the model's own rotary module."""
        lm = self.hf_model.model.language_model
        pos = positions.to(self.device, torch.long)
        probe = torch.empty(0, device=self.device, dtype=torch.float32)
        cos, sin = lm.rotary_emb(probe, pos[:, None] if self.position_axes > 1 else pos)
        n = positions.shape[-1]
        if cos.dim() != 3 or cos.shape[:2] != (1, n):
            raise RuntimeError(f"{type(lm.rotary_emb).__name__} returned rotations of shape {tuple(cos.shape)}, "
                               f"expected [1, {n}, head_dim] (an unsupported transformers version?)")
        return cos[0].float(), sin[0].float()

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    def describe(self) -> dict:
        """A small JSON-able description (family, sizes, dtype, device) for reports."""
        return {
            "family": self.family,
            "hidden_size": self.hidden_size,
            "frames_per_item": self.frames_per_item,
            "position_axes": self.position_axes,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
        }
