"""Model adapters: one per family, found through a small registry.

Everything that knows a model family's internals lives in this package: the adapter
(``qwen.py``, ``llava_onevision.py``: preprocessing, layout, forward, and the attention
internals a retrieval memory needs), its STC-Cacher glue (``qwen_cacher.py``,
``llava_onevision_cacher.py``) and its random-weight builders (``random/``). Other
packages reach them only through the adapter or this registry, never by probing a
Hugging Face model.

``load_model(name_or_path, dtype=None, device=None, **kw)`` returns a
:class:`~streampress.models.base.ModelAdapter`:

- ``random:<arch>`` builds a built-in random-weight architecture (no downloads), e.g.
  ``random:qwen2.5-vl-tiny``, ``random:qwen3-vl-tiny``, ``random:qwen2.5-vl-7b``
  (``num_layers=``, ``vision_depth=`` cut the real-size ones); see
  :mod:`streampress.models.random`.
- anything else is a Hugging Face hub id or a local checkpoint folder; the family is
  read from ``config.model_type``.

A family registers with one call (``register_family``); its adapter class is imported
only when a model of that family is loaded, so listing families needs no torch. The
adapter class provides two class methods::

    from_pretrained(name_or_path, model_type, dtype, device, **kw) -> adapter
    from_random(arch, dtype, device, **kw) -> adapter

The registration also names the family's vision-tower classes and the STC-Cacher glue
for each (``vision_glue``). The cacher looks the glue up by the class of the module it is
given (:func:`vision_glue_for`), so it serves an adapter's tower, a whole Hugging Face
model and a bare tower alike, with no list of model types of its own; and since the
glue is named by a string, the registry imports nothing of the cacher (no import circle).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

__all__ = ["load_model", "register_family", "list_families", "list_random_architectures", "family_for",
           "vision_glue_for", "vision_tower_names"]


@dataclass(frozen=True)
class FamilySpec:
    """A registered model family: adapter class location, HF model types, random archs."""

    name: str
    adapter: str  # "package.module:ClassName"
    model_types: tuple[str, ...]
    random_archs: tuple[str, ...]

    def adapter_class(self):
        return _import(self.adapter, f"model family {self.name!r} is registered but its adapter")


def _import(location: str, what: str):
    module, _, cls = location.partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{what} {location} cannot be imported: {exc}") from exc


_FAMILIES: dict[str, FamilySpec] = {}
_VISION_GLUE: dict[str, str] = {}  # vision-tower class name -> "module:Class" of its cacher glue


def register_family(name: str, adapter: str, model_types=(), random_archs=(), vision_glue=None) -> None:
    """Register a model family: ``adapter`` is ``"module:Class"``; ``model_types`` the HF
    ``config.model_type`` values it serves; ``random_archs`` the ``random:`` names it builds;
    ``vision_glue`` maps the class names of its vision towers to the ``"module:Class"`` of
    their STC-Cacher glue (:class:`streampress.cacher.core.EncoderGlue`)."""
    _FAMILIES[name] = FamilySpec(name, adapter, tuple(model_types), tuple(random_archs))
    _VISION_GLUE.update(vision_glue or {})


# ---- the registry: one call per family -----------------------------------------------
register_family("qwen", "streampress.models.qwen:QwenAdapter",
                model_types=("qwen2_vl", "qwen2_5_vl", "qwen3_vl"),
                random_archs=("qwen2-vl-tiny", "qwen2.5-vl-tiny", "qwen3-vl-tiny",
                              "qwen2.5-vl-3b", "qwen2.5-vl-7b"),
                vision_glue={tower: "streampress.models.qwen_cacher:QwenGlue" for tower in (
                    "Qwen2VisionTransformerPretrainedModel", "Qwen2_5_VisionTransformerPretrainedModel",
                    "Qwen3VLVisionModel")})
register_family("llava_onevision", "streampress.models.llava_onevision:LlavaOneVisionAdapter",
                model_types=("llava_onevision",),
                random_archs=("llava-onevision-tiny", "llava-onevision-7b"),
                vision_glue={"SiglipVisionModel": "streampress.models.llava_onevision_cacher:SiglipGlue"})


def list_families() -> list[dict]:
    """Registered families (name, HF model types, random architectures); imports no torch."""
    return [{"name": f.name, "model_types": list(f.model_types), "random_archs": list(f.random_archs)}
            for f in _FAMILIES.values()]


def list_random_architectures() -> list[str]:
    return [f"random:{a}" for f in _FAMILIES.values() for a in f.random_archs]


def family_for(model_type: str | None = None, random_arch: str | None = None) -> FamilySpec:
    """The family serving an HF ``model_type`` or a ``random:`` architecture name."""
    for spec in _FAMILIES.values():
        if (model_type is not None and model_type in spec.model_types) or (
                random_arch is not None and random_arch in spec.random_archs):
            return spec
    if random_arch is not None:
        raise ValueError(f"unknown random architecture 'random:{random_arch}'; expected one of "
                         f"{list_random_architectures()}")
    known = sorted(t for f in _FAMILIES.values() for t in f.model_types)
    raise ValueError(f"unsupported model_type {model_type!r}; supported: {known}")


def vision_tower_names() -> list[str]:
    """Class names of the vision towers some family provides cacher glue for."""
    return list(_VISION_GLUE)


def vision_glue_for(module):
    """The cacher glue class registered for ``module``'s class (or a base class of it, by
    name), or None when no family registered one."""
    for cls in type(module).__mro__:
        if cls.__name__ in _VISION_GLUE:
            return _import(_VISION_GLUE[cls.__name__], f"the cacher glue of {cls.__name__}")
    return None


def _read_model_type(folder: str) -> str:
    """``model_type`` of a checkpoint folder's config.json; one line when the folder lacks a
    file (:func:`.checkpoint.check_folder`) or its architecture is not supported."""
    from .checkpoint import CheckpointError, check_folder, read_config

    check_folder(folder, weights=False)  # weights are checked by the adapter (random_weights may skip them)
    config = read_config(folder)
    model_type = config.get("model_type")
    known = sorted(t for f in _FAMILIES.values() for t in f.model_types)
    if model_type not in known:
        archs = ", ".join(config.get("architectures") or []) or "no architectures listed"
        raise CheckpointError(f"checkpoint folder {folder}: model_type {model_type!r} ({archs}) is not supported; "
                              f"supported model types: {', '.join(known)}")
    return model_type


def load_model(name_or_path: str, dtype=None, device=None, **kw):
    """Load a model adapter.

    ``name_or_path``: ``random:<arch>`` (see :func:`list_random_architectures`), a hub id,
    or a local checkpoint folder. ``dtype``: a torch dtype or its name ("bfloat16", ...);
    default float32 on CPU, bfloat16 on CUDA. ``device``: "cpu", "cuda", ... (default: CUDA
    when available). Extra keywords go to the family's adapter: ``num_layers`` /
    ``vision_depth`` cut the LLM / vision tower (random architectures and checkpoints alike;
    a cut checkpoint loads the weights of the layers kept), ``random_weights=True`` builds a
    checkpoint's architecture with random weights (its folder then needs no weight files),
    ``hidden_size`` narrows a random Qwen LLM, ``min_pixels`` / ``max_pixels`` override Qwen
    preprocessing.

    A hub id is tried only when the hub answers within seconds; otherwise its snapshot in the
    local cache is used, or one line says to download it elsewhere and pass the folder.
    """
    if not isinstance(name_or_path, str) or not name_or_path:
        raise TypeError(f"name_or_path must be a non-empty string, got {name_or_path!r}")
    if name_or_path.startswith("random:"):
        arch = name_or_path[len("random:"):]
        return family_for(random_arch=arch).adapter_class().from_random(arch, dtype=dtype, device=device, **kw)
    from .checkpoint import resolve

    folder = resolve(name_or_path)
    if not os.path.isdir(folder):  # a reachable hub: transformers downloads it
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(folder).model_type
        family_for(model_type=model_type)
    else:
        model_type = _read_model_type(folder)
    return family_for(model_type=model_type).adapter_class().from_pretrained(
        folder, model_type=model_type, dtype=dtype, device=device, **kw)


def __getattr__(name: str):
    if name in ("ModelAdapter", "VisualBatch", "EncodedItems", "PositionState", "TokenLayout"):
        return getattr(importlib.import_module("streampress.models.base"), name)
    raise AttributeError(f"module 'streampress.models' has no attribute {name!r}")
