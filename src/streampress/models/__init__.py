"""Model adapters: one per family, found through a small registry.

``load_model(name_or_path, dtype=None, device=None, **kw)`` returns a
:class:`~streampress.models.base.ModelAdapter`:

- ``random:<arch>`` builds a built-in random-weight architecture (no downloads), e.g.
  ``random:qwen2.5-vl-tiny``, ``random:qwen3-vl-tiny``, ``random:qwen2.5-vl-7b``
  (``num_layers=``, ``vision_depth=`` cut the real-size ones).
- anything else is a Hugging Face hub id or a local checkpoint folder; the family is
  read from ``config.model_type``.

A family registers with one line (``register_family``); its adapter class is imported
only when a model of that family is loaded, so listing families needs no torch. The
adapter class provides two class methods::

    from_pretrained(name_or_path, model_type, dtype, device, **kw) -> adapter
    from_random(arch, dtype, device, **kw) -> adapter
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass

__all__ = ["load_model", "register_family", "list_families", "list_random_architectures", "family_for"]


@dataclass(frozen=True)
class FamilySpec:
    """A registered model family: adapter class location, HF model types, random archs."""

    name: str
    adapter: str  # "package.module:ClassName"
    model_types: tuple[str, ...]
    random_archs: tuple[str, ...]

    def adapter_class(self):
        module, _, cls = self.adapter.partition(":")
        try:
            return getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"model family {self.name!r} is registered but its adapter {self.adapter} "
                             f"cannot be imported: {exc}") from exc


_FAMILIES: dict[str, FamilySpec] = {}


def register_family(name: str, adapter: str, model_types=(), random_archs=()) -> None:
    """Register a model family: ``adapter`` is ``"module:Class"``; ``model_types`` the HF
    ``config.model_type`` values it serves; ``random_archs`` the ``random:`` names it builds."""
    _FAMILIES[name] = FamilySpec(name, adapter, tuple(model_types), tuple(random_archs))


# ---- the registry: one line per family ------------------------------------------------
register_family("qwen", "streampress.models.qwen:QwenAdapter",
                model_types=("qwen2_vl", "qwen2_5_vl", "qwen3_vl"),
                random_archs=("qwen2-vl-tiny", "qwen2.5-vl-tiny", "qwen3-vl-tiny",
                              "qwen2.5-vl-3b", "qwen2.5-vl-7b"))
register_family("llava_onevision", "streampress.models.llava_onevision:LlavaOneVisionAdapter",
                model_types=("llava_onevision",),
                random_archs=("llava-onevision-tiny", "llava-onevision-7b"))


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


def _read_model_type(name_or_path: str) -> str:
    config_file = os.path.join(name_or_path, "config.json")
    if os.path.isdir(name_or_path):
        if not os.path.isfile(config_file):
            raise ValueError(f"name_or_path {name_or_path!r} is a folder without config.json")
        with open(config_file) as f:
            model_type = json.load(f).get("model_type")
    else:
        from transformers import AutoConfig

        try:
            model_type = AutoConfig.from_pretrained(name_or_path).model_type
        except Exception as exc:  # hub errors come in many classes; say what was asked
            raise ValueError(f"cannot load a model config from {name_or_path!r}: {exc}") from exc
    if not model_type:
        raise ValueError(f"config of {name_or_path!r} has no model_type")
    return model_type


def load_model(name_or_path: str, dtype=None, device=None, **kw):
    """Load a model adapter.

    ``name_or_path``: ``random:<arch>`` (see :func:`list_random_architectures`), a hub id,
    or a local checkpoint folder. ``dtype``: a torch dtype or its name ("bfloat16", ...);
    default float32 on CPU, bfloat16 on CUDA. ``device``: "cpu", "cuda", ... (default: CUDA
    when available). Extra keywords go to the family's adapter (e.g. ``num_layers``,
    ``vision_depth`` for random architectures, ``hidden_size`` to narrow a random Qwen LLM,
    ``min_pixels`` / ``max_pixels``).
    """
    if not isinstance(name_or_path, str) or not name_or_path:
        raise TypeError(f"name_or_path must be a non-empty string, got {name_or_path!r}")
    if name_or_path.startswith("random:"):
        arch = name_or_path[len("random:"):]
        return family_for(random_arch=arch).adapter_class().from_random(arch, dtype=dtype, device=device, **kw)
    model_type = _read_model_type(name_or_path)
    return family_for(model_type=model_type).adapter_class().from_pretrained(
        name_or_path, model_type=model_type, dtype=dtype, device=device, **kw)


def __getattr__(name: str):
    if name in ("ModelAdapter", "VisualBatch", "EncodedItems", "PositionState", "TokenLayout"):
        return getattr(importlib.import_module("streampress.models.base"), name)
    raise AttributeError(f"module 'streampress.models' has no attribute {name!r}")
