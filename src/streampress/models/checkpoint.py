"""Checkpoint folders and hub ids: what a folder must hold, the hub without network, cuts
and random weights from a checkpoint's own configuration.

Imports no torch at module level (``streampress list`` and argument parsing use it).

- :func:`check_folder` names the first file a checkpoint folder lacks (config, weights,
  every shard its index lists, tokenizer), in one line, before transformers is asked.
- :func:`resolve` turns a hub id into something loadable without a minute of retries: the id
  when the hub answers within seconds, else its snapshot in the local cache, else one line
  ("no network; download it elsewhere and pass the folder").
- :func:`cut_config` cuts a configuration to ``num_layers`` LLM layers and ``vision_depth``
  vision blocks (real widths), keeping the lists that index layers consistent.
- :func:`load_weights` loads the checkpoint (its weights for the layers kept) or builds
  the same architecture with random weights (``random_weights=True``: e.g. a folder that
  holds only a published ``config.json`` and a tokenizer).
- :func:`stop_ids` reads the end-of-answer ids from ``generation_config.json``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import urllib.parse
import urllib.request

__all__ = ["HUB_ID", "HUB_TIMEOUT", "hub_reachable", "resolve", "check_folder", "read_config", "cut_config",
           "load_weights", "stop_ids", "require_token"]

# OWNER/NAME as the hub allows them: letters, digits, '-', '_', '.'; no '--' or '..'.
HUB_ID = re.compile(r"(?!.*(?:--|\.\.))[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
HUB_TIMEOUT = 3.0  # seconds for the connection test

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is (one line says why)."""


# ---- the hub ------------------------------------------------------------------------------
def hub_reachable(timeout: float = HUB_TIMEOUT) -> bool:
    """Whether a TCP connection to the hub (or the HTTPS proxy) opens within ``timeout`` seconds;
    False at once under ``HF_HUB_OFFLINE``. Name resolution runs in a helper thread, so a
    resolver that hangs costs ``timeout`` too."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname or host, proxy_url.port or 80
    result: list[bool] = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


def offline_message(name: str, how_to_pass: str) -> str:
    return (f"{name}: no network; download it elsewhere and pass the folder (the Hugging Face hub cannot be reached "
            f"and the model is not in the local cache): hf download {name} --local-dir DIR, then {how_to_pass}")


def resolve(name: str, reachable=hub_reachable, how_to_pass: str = "load_model(DIR)") -> str:
    """A folder as it is; a hub id as it is when the hub answers, else its snapshot folder in
    the local cache, else :class:`RuntimeError` (one line). Anything else: ValueError."""
    if os.path.isdir(name):
        return name
    if not HUB_ID.fullmatch(name):
        raise CheckpointError(f"{name}: no such checkpoint folder (nor a hub id OWNER/NAME)")
    if reachable():
        return name
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)  # reads the cache only
    except Exception:
        raise RuntimeError(offline_message(name, how_to_pass)) from None


# ---- what a folder must hold ----------------------------------------------------------------
def check_folder(folder: str, weights: bool = True) -> None:
    """Raise :class:`CheckpointError` naming the first file ``folder`` lacks: ``config.json``,
    the weights (``model.safetensors``, or an index and every shard it lists) unless
    ``weights`` is False, and the tokenizer (``tokenizer.json``, or ``vocab.json`` with
    ``merges.txt``)."""
    def missing(name: str, why: str):
        raise CheckpointError(f"checkpoint folder {folder} has no {name} ({why})")

    def has(name: str) -> bool:
        return os.path.isfile(os.path.join(folder, name))

    if not has("config.json"):
        missing("config.json", "a folder without config.json is no Hugging Face checkpoint")
    if weights:
        found = [f for f in WEIGHT_FILES if has(f)]
        if not found:
            missing("model.safetensors", "nor model.safetensors.index.json: the weights; pass random_weights=True "
                                         "to build the architecture with random weights")
        index = next((f for f in found if f.endswith(".index.json")), None)
        if index and not any(has(f) for f in WEIGHT_FILES if not f.endswith(".index.json")):
            try:
                with open(os.path.join(folder, index), encoding="utf-8") as fh:
                    shards = sorted(set(json.load(fh)["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as exc:
                raise CheckpointError(f"checkpoint folder {folder}: {index} is not a weight index ({exc})") from None
            for shard in shards:
                if not has(shard):
                    missing(shard, f"a weight shard listed in {index}")
    if not has("tokenizer.json") and not (has("vocab.json") and has("merges.txt")):
        missing("tokenizer.json", "nor vocab.json with merges.txt: the tokenizer")


def read_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as fh:
        try:
            config = json.load(fh)
        except ValueError as exc:
            raise CheckpointError(f"checkpoint folder {folder}: config.json is not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint folder {folder}: config.json is not a JSON object")
    return config


# ---- cuts and weights -----------------------------------------------------------------------
def cut_config(config, num_layers: int | None = None, vision_depth: int | None = None):
    """``config`` (a transformers config, changed in place and returned) cut to ``num_layers``
    LLM layers and ``vision_depth`` vision blocks; per-layer lists (``layer_types``,
    Qwen2.5-VL ``fullatt_block_indexes``, Qwen3-VL ``deepstack_visual_indexes``) follow. When
    a cut removes every full-attention vision block, the last kept block becomes one."""
    from .base import positive_int

    text, vision = config.text_config, config.vision_config
    if num_layers is not None:
        n = positive_int("num_layers", num_layers)
        text.num_hidden_layers = n
        if isinstance(getattr(text, "layer_types", None), list):
            text.layer_types = text.layer_types[:n]
        if getattr(text, "max_window_layers", None) is not None:
            text.max_window_layers = min(text.max_window_layers, n)
    if vision_depth is not None:
        d = positive_int("vision_depth", vision_depth)
        key = "depth" if hasattr(vision, "depth") else "num_hidden_layers"
        setattr(vision, key, d)
        if getattr(vision, "fullatt_block_indexes", None) is not None:
            vision.fullatt_block_indexes = [i for i in vision.fullatt_block_indexes if i < d] or [d - 1]
        if getattr(vision, "deepstack_visual_indexes", None) is not None:
            vision.deepstack_visual_indexes = [i for i in vision.deepstack_visual_indexes if i < d]
    return config


def load_weights(folder: str, model_cls, builder, dtype, device, attn_implementation: str = "sdpa",
                 num_layers: int | None = None, vision_depth: int | None = None, random_weights: bool = False,
                 seed: int = 0, **kwargs):
    """The model of checkpoint ``folder``: its weights (of the layers kept by a cut), or, with
    ``random_weights``, the same (cut) architecture with random weights drawn by ``builder``
    (a ``build_model(config, dtype, device, seed)`` of :mod:`streampress.models.random`)."""
    from transformers import AutoConfig

    cut = num_layers is not None or vision_depth is not None
    config = AutoConfig.from_pretrained(folder) if (cut or random_weights) else None
    if config is not None:
        cut_config(config, num_layers, vision_depth)
        config._attn_implementation = attn_implementation
    if random_weights:
        model = builder(config, dtype, device, seed=seed)
        model.generation_config = _generation_config(folder) or model.generation_config
        return model
    if config is not None:
        kwargs["config"] = config
    model = model_cls.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation, **kwargs)
    return model.to(device).eval()


def _generation_config(folder: str):
    if not os.path.isfile(os.path.join(folder, "generation_config.json")):
        return None
    from transformers import GenerationConfig

    return GenerationConfig.from_pretrained(folder)


# ---- tokens ------------------------------------------------------------------------------------
def stop_ids(model, fallback) -> frozenset[int]:
    """End-of-answer ids: ``eos_token_id`` of the model's generation config (read from the
    checkpoint's ``generation_config.json``), else ``fallback`` (ids or None entries)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    ids = [int(i) for i in ids if i is not None]
    return frozenset(ids) if ids else frozenset(int(i) for i in fallback if i is not None and i >= 0)


def require_token(tokenizer, token: str, expected: int | None, name: str, what: str) -> int:
    """The id of ``token`` in ``tokenizer``; :class:`CheckpointError` (one line) when the
    tokenizer lacks it or gives it another id than the config's ``expected``."""
    tid = tokenizer.convert_tokens_to_ids(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    if tid is None or (unk is not None and tid == unk) or not isinstance(tid, int) or tid < 0:
        raise CheckpointError(f"{name}: the tokenizer has no {token} token ({what}); is this a video checkpoint "
                              f"of this family with its own tokenizer files?")
    if expected is not None and tid != int(expected):
        raise CheckpointError(f"{name}: the tokenizer gives {token} id {tid} but config.json says {expected}")
    return tid
