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
import re
import socket
import threading
import urllib.parse
import urllib.request

__all__ = ["HUB_ID", "model_name", "resolve_model", "hub_reachable", "load"]

# OWNER/NAME as the hub allows them: letters, digits, '-', '_', '.'; no '--' or '..'.
HUB_ID = re.compile(r"(?!.*(?:--|\.\.))[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
HUB_TIMEOUT = 3.0  # seconds for the connection test


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
        raise RuntimeError(
            f"--model {name}: the Hugging Face hub cannot be reached and the model is not in the local cache; "
            f"download it where there is network (hf download {name} --local-dir DIR), then pass "
            "the folder: --model DIR") from None


def load(args, name_or_path: str, **defaults):
    """``streampress.load_model`` (of a name :func:`resolve_model` gave) with the command's
    ``--device``, ``--dtype`` (and ``--num-layers`` / ``--vision-depth`` where it has them)."""
    from streampress import load_model

    cuts = {k: getattr(args, k, None) for k in ("num_layers", "vision_depth")}
    cuts = {k: v for k, v in cuts.items() if v is not None}
    return load_model(name_or_path, dtype=args.dtype, device=args.device, **{**defaults, **cuts})
