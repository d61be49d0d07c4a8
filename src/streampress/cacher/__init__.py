"""STC-Cacher: vision-encoder reuse across similar items of a stream (ALGORITHMS.md section 5).

Example::

    cacher = create_cacher(rho=0.25, interval=2)
    state = cacher.new_state()                                                # one per stream
    out = cacher.encode(model.visual, pixel_values_videos, video_grid_thw, state)  # Qwen
    out = cacher.encode_siglip(vision_tower, pixel_values, state,                  # SigLIP
                               output_hidden_states=True)
    with cacher.attach(hf_model) as handle:           # the model's own tower, cached
        hf_model.get_video_features(pixel_values_videos, video_grid_thw)

Supported towers: those a model family registers glue for in :mod:`streampress.models`
(``register_family(..., vision_glue=...)``): Qwen2-VL, Qwen2.5-VL and Qwen3-VL (an item
is a temporal patch) and SigLIP as used by LLaVA-OneVision (an item is a frame).
"""

from __future__ import annotations

from .cacher import AttachHandle, StcCacher, find_vision_module
from .state import CacherState, CacherStats

__all__ = ["AttachHandle", "CacherState", "CacherStats", "StcCacher", "create_cacher", "find_vision_module"]


def create_cacher(rho: float = 0.25, interval: int = 2, refresh_threshold: float | None = None) -> StcCacher:
    """STC-Cacher with update ratio ``rho`` in (0, 1] (share of tokens recomputed per block
    in a dependent item), reference ``interval`` N >= 1 (every N-th item of a stream is
    computed in full) and an optional ``refresh_threshold`` in [-1, 1]: a dependent item
    whose mean key similarity at the first block falls below it becomes a new reference."""
    return StcCacher(rho=rho, interval=interval, refresh_threshold=refresh_threshold)
