"""Shared helpers of the Qwen model/session tests: frames and the Hugging Face one-shot
reference forward (tiny models and the stand-in pruner: :mod:`_model_helpers`)."""

from __future__ import annotations

import numpy as np
import torch

from streampress.models.base import VISUAL, PositionState, TokenLayout, text_positions

ARCHS = ["random:qwen2.5-vl-tiny", "random:qwen3-vl-tiny"]


def frames_for(adapter, count: int, cells: int = 2, seed: int = 0) -> np.ndarray:
    """``count`` random uint8 frames whose sides give a ``cells x cells`` merged grid."""
    side = cells * adapter.params.factor
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(count, side, side, 3), dtype=np.uint8)


def one_shot_inputs(adapter, frames: np.ndarray, times, question: str):
    """input_ids [1, L], position_ids [3, 1, L], pixel inputs and the visual-token flags of
    the whole stream + question laid out at once (the HF model's own input format)."""
    frames_t = torch.from_numpy(frames)
    times = torch.as_tensor(times, dtype=torch.float64)
    n = frames.shape[0] // adapter.frames_per_item
    prefix, state = adapter.begin_stream(PositionState())
    batch = adapter.preprocess(frames_t[: n * adapter.frames_per_item])
    hh, ww = (int(v) // adapter.params.merge_size for v in batch.grid_thw[0, 1:])
    state = state.advanced(start_time=float(times[0]))
    rel = (times[: n * adapter.frames_per_item] - times[0]).view(n, adapter.frames_per_item)
    items, state = adapter.layout_items(state, rel, (hh, ww))
    qids = adapter.question_ids(question)
    qpos = text_positions(state.max_position + 1, len(qids), 3)
    layout = TokenLayout.cat([prefix, items, TokenLayout.text(qids, qpos)])
    video_token = adapter.hf_model.config.video_token_id
    is_visual = layout.kinds == VISUAL
    input_ids = torch.where(is_visual, torch.full_like(layout.input_ids, video_token), layout.input_ids)
    return dict(input_ids=input_ids[None], position_ids=layout.positions[:, None],
                pixel_values_videos=batch.pixel_values.to(adapter.dtype), video_grid_thw=batch.grid_thw), layout


@torch.no_grad()
def hf_last_logits(adapter, inputs: dict, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    out = adapter.hf_model(**inputs, attention_mask=attention_mask, use_cache=False)
    return out.logits[0, -1].float()
