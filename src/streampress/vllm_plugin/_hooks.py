"""What the model subclasses share: reading the ``streampress`` entry at load time, checking
the hook points, and swapping vLLM's retention-mask function for one video post-processing."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from . import SUPPORTED_VLLM, PluginError, PruningSpec, exact_retention_mask, logger, parse_spec

_SWAP_LOCK = threading.RLock()


def check_hooks(module: Any, cls: type, mask_names: tuple[str, ...]) -> None:
    """One clear error if vLLM lacks what the plugin replaces."""
    from vllm.multimodal.video_prune import evs

    missing = [f"{module.__name__}.{n}" for n in mask_names if not callable(getattr(module, n, None))]
    if not callable(getattr(evs, "compute_retained_tokens_count", None)):
        missing.append("vllm.multimodal.video_prune.evs.compute_retained_tokens_count")
    if not callable(getattr(cls, "_postprocess_video_embeds_evs", None)):
        missing.append(f"{cls.__name__}._postprocess_video_embeds_evs")
    if missing:
        import vllm

        raise PluginError(
            f"streampress: vLLM {getattr(vllm, '__version__', '?')} lacks the hook point(s) "
            f"{', '.join(missing)}; supported: {SUPPORTED_VLLM}"
        )


def spec_for(model: Any, module: Any, cls: type, mask_names: tuple[str, ...]) -> PruningSpec | None:
    """The validated ``streampress`` entry of the model's configuration, or None (stock
    behaviour). Raises :class:`PluginError` for a bad entry or missing hook points."""
    entry = getattr(model.config, "streampress", None)
    if entry is None:
        return None
    spec = parse_spec(entry)
    check_hooks(module, cls, mask_names)
    mm_config = model.multimodal_config
    if not (mm_config is not None and mm_config.is_multimodal_pruning_enabled()):
        logger.warning(
            "streampress: method %r configured but video_pruning_rate is not > 0: vLLM does not prune "
            "videos and the plugin does nothing (set --video-pruning-rate)", spec.method)
        return None
    logger.info("streampress: video pruning with %r %s at rate %s (exact-count mode)",
                spec.method, spec.params, mm_config.video_pruning_rate)
    return spec


def text_after_video_at_max_plus_one(compute_mrope_for_media):
    """``compute_mrope_for_media`` whose 4th column (where vLLM 0.32 resumes the text after a
    pruned Qwen2.5-VL video: ``base + column``) is ``max(unpruned t, h, w) + 1`` instead of the
    grid width: the text then sits where the dense model (Hugging Face's rule, vLLM without
    pruning, streampress's session) puts it. With the width alone, a video whose temporal
    extent exceeds its width moved the question, and every pruned answer differed."""

    def positions(*args, **kwargs):
        pos = compute_mrope_for_media(*args, **kwargs)
        pos[:, 3] = pos[:, :3].max() + 1
        return pos

    return positions


@contextlib.contextmanager
def masks_replaced(module: Any, mask_names: tuple[str, ...], spec: PruningSpec, count_fn,
                   also: dict[str, Any] | None = None, channels: int | None = None):
    """Within the block, ``module``'s retention-mask functions give streampress's exact-count
    mask with ``count_fn``'s count (the count vLLM sized the prompt with); ``also``: other
    module attributes replaced for the block. ``channels``: score only the first channels of
    the embeddings vLLM hands over (Qwen3-VL appends its DeepStack levels to the main
    embedding; streampress scores the main embedding, as its own session does)."""

    def mask(video_embeds, video_size_thw, spatial_merge_size, q):
        if channels is not None:
            video_embeds = video_embeds[..., :channels]
        T, H, W = map(int, video_size_thw)
        per_frame = (H // spatial_merge_size) * (W // spatial_merge_size)
        total = count_fn(tokens_per_frame=per_frame, num_frames=T, q=q)
        return exact_retention_mask(spec, video_embeds, video_size_thw, spatial_merge_size, total)

    with _SWAP_LOCK:
        replaced = {n: mask for n in mask_names}
        replaced.update(also or {})
        saved = {n: getattr(module, n) for n in replaced}
        try:
            for n, f in replaced.items():
                setattr(module, n, f)
            yield
        finally:
            for n, f in saved.items():
                setattr(module, n, f)
