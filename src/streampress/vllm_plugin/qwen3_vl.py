"""Qwen3-VL with streampress's video pruning (registered under the stock name)."""

from __future__ import annotations

from vllm.model_executor.models import qwen3_vl as _stock
from vllm.multimodal.video_prune import evs as _evs

from ._hooks import masks_replaced, spec_for

_MASKS = ("compute_retention_mask", "vidcom2_compute_retention_mask")


def _count_fn(method):
    if method == "vidcom2":  # the prompt was sized with VidCom2's count: keep exactly that
        from vllm.multimodal.video_prune import vidcom2

        return vidcom2.compute_retained_tokens_count
    return _evs.compute_retained_tokens_count


class Qwen3VLForConditionalGeneration(_stock.Qwen3VLForConditionalGeneration):
    """The stock model; with a ``streampress`` config entry its video retention mask is
    streampress's exact-count mask (see :mod:`streampress.vllm_plugin`). Only the total per
    video must match vLLM's count (Qwen3-VL sizes the prompt per video, not per frame)."""

    def __init__(self, *, vllm_config, prefix: str = "model"):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._streampress = spec_for(self, _stock, _stock.Qwen3VLForConditionalGeneration, _MASKS)

    def _postprocess_video_embeds_evs(self, video_embeds_split, video_input):
        if self._streampress is None:
            return super()._postprocess_video_embeds_evs(video_embeds_split, video_input)
        count = _count_fn(getattr(self, "video_pruning_method", "evs"))
        # the embeddings carry the DeepStack levels after the main ones: score the main ones
        main = self.config.text_config.hidden_size
        with masks_replaced(_stock, _MASKS, self._streampress, count, channels=main):
            return super()._postprocess_video_embeds_evs(video_embeds_split, video_input)
