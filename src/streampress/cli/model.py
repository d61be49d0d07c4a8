"""The ``--model`` argument: what a name means, and loading it without long network waits.

A name is a checkpoint folder, a built-in ``random:ARCH`` architecture or a Hugging Face hub
id ``OWNER/NAME``; anything else is refused while the arguments are parsed. Before a hub id
is loaded, a short connection test (a few seconds at most) decides: with the hub reachable
the id goes to transformers as it is; without it, the id is replaced by its snapshot in the
local Hugging Face cache, or the command stops with one line saying how to use a local
folder (instead of transformers' minute of retries).
"""

from __future__ import annotations

import argparse
import os

from streampress.models.checkpoint import HUB_ID, HUB_TIMEOUT, hub_reachable, offline_message  # no torch

__all__ = ["HUB_ID", "HUB_TIMEOUT", "model_name", "resolve_model", "hub_reachable", "load"]


def _is_random(name: str) -> bool:
    return name.startswith("random:")


def model_name(text: str) -> str:
    """argparse type of ``--model``: a folder, ``random:ARCH`` or a plausible hub id."""
    if _is_random(text):
        from streampress.models import list_random_architectures  # no torch

        known = list_random_architectures()
        if text not in known:
            raise argparse.ArgumentTypeError(f"unknown random architecture {text!r}; expected one of "
                                             f"{', '.join(known)}")
        return text
    if os.path.isdir(text):
        return text
    if os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a file; expected a checkpoint folder, "
                                         "random:ARCH or a hub id OWNER/NAME")
    if HUB_ID.fullmatch(text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is no checkpoint folder, random:ARCH (streampress list) "
                                     "or hub id OWNER/NAME")


def resolve_model(name: str, reachable=hub_reachable) -> str:
    """What to hand to ``load_model`` for ``name``: folders and ``random:`` as they are; a hub
    id as it is when the hub answers, else its snapshot folder in the local cache.

    Raises RuntimeError (one line: how to use a local folder) when neither is available.
    """
    if _is_random(name) or os.path.isdir(name) or reachable():
        return name
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)  # reads the cache only
    except Exception:
        raise RuntimeError("--model " + offline_message(name, "--model DIR")) from None


def load(args, name_or_path: str, **defaults):
    """``streampress.load_model`` (of a name :func:`resolve_model` gave) with the command's
    ``--device``, ``--dtype`` (and ``--num-layers`` / ``--vision-depth`` where it has them)."""
    from transformers.utils import logging as hf_logging

    from streampress import load_model

    hf_logging.disable_progress_bar()  # the command shows its own progress ("loading ...")
    cuts = {k: getattr(args, k, None) for k in ("num_layers", "vision_depth")}
    cuts = {k: v for k, v in cuts.items() if v is not None}
    return load_model(name_or_path, dtype=args.dtype, device=args.device, **{**defaults, **cuts})
