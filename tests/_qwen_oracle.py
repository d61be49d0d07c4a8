"""Shared helpers of the Qwen model/session tests: tiny models, frames, a stand-in pruner,
and the Hugging Face one-shot reference forward."""

from __future__ import annotations

import functools

import numpy as np
import torch

from streampress.models import load_model
from streampress.models.base import VISUAL, PositionState, TokenLayout, text_positions

ARCHS = ["random:qwen2.5-vl-tiny", "random:qwen3-vl-tiny"]


@functools.lru_cache(maxsize=None)
def tiny(arch: str, dtype: str = "float64"):
    """A tiny random model, cached per test process (models hold no stream state)."""
    return load_model(arch, dtype=dtype, device="cpu")


def frames_for(adapter, count: int, cells: int = 2, seed: int = 0) -> np.ndarray:
    """``count`` random uint8 frames whose sides give a ``cells x cells`` merged grid."""
    side = cells * adapter.params.factor
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(count, side, side, 3), dtype=np.uint8)


class StandInPruner:
    """A stateful pruner following the contract (slice-invariant): per grid keep the
    ``keep`` tokens least similar (cosine) to the same position in the previous grid of
    the stream; the first grid keeps the ``keep`` tokens of largest norm."""

    name = "stand-in"

    def __init__(self, keep: int = 2):
        self.keep = keep
        self.params = {"keep": keep}
        self.reset()

    def reset(self):
        self._prev = None

    def __call__(self, grids: torch.Tensor) -> torch.Tensor:
        t, h, w, d = grids.shape
        x = grids.reshape(t, h * w, d).double()
        prev = torch.cat([x[:1] if self._prev is None else self._prev[None], x[:-1]])
        score = torch.nn.functional.cosine_similarity(x, prev, dim=-1)  # high = redundant
        if self._prev is None:
            score[0] = -x[0].norm(dim=-1)
        keep = torch.zeros(t, h * w, dtype=torch.bool)
        keep.scatter_(1, score.argsort(dim=1)[:, : self.keep], True)
        self._prev = x[-1]
        return keep.reshape(t, h, w)


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


def single_thread():
    """Tiny models run fastest on one thread; several threads on a busy 2-core machine
    spend their time waiting on each other (x1000 slower per small matmul)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
