"""Qwen2.5-VL with streampress's video pruning (registered under the stock name)."""

from __future__ import annotations

from vllm.model_executor.models import qwen2_5_vl as _stock
from vllm.multimodal.video_prune import evs as _evs

from ._hooks import masks_replaced, spec_for, text_after_video_at_max_plus_one

_MASKS = ("compute_retention_mask",)
_POSITIONS = "compute_mrope_for_media"


class Qwen2_5_VLForConditionalGeneration(_stock.Qwen2_5_VLForConditionalGeneration):
    """The stock model; with a ``streampress`` config entry its video retention mask is
    streampress's exact-count mask (see :mod:`streampress.vllm_plugin`), and the text after
    a pruned video resumes at the dense model's position (max of the unpruned positions + 1;
    vLLM 0.32's pruning path uses the grid width, which differs when the video is longer
    than it is wide: see ``_hooks.text_after_video_at_max_plus_one``)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._streampress = spec_for(self, _stock, _stock.Qwen2_5_VLForConditionalGeneration, _MASKS + (_POSITIONS,))

    def _postprocess_video_embeds_evs(self, video_embeds_split, video_input):
        if self._streampress is None:
            return super()._postprocess_video_embeds_evs(video_embeds_split, video_input)
        fixed = {_POSITIONS: text_after_video_at_max_plus_one(getattr(_stock, _POSITIONS))}
        with masks_replaced(_stock, _MASKS, self._streampress, _evs.compute_retained_tokens_count, also=fixed):
            return super()._postprocess_video_embeds_evs(video_embeds_split, video_input)
