"""Shared helpers of the STC-Cacher tests: model initialisation and a literal oracle block."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reinit(model, seed: int | None = 1):
    """Default PyTorch init (larger than HF's 0.02) so blocks are far from linear; ``seed``
    None keeps the current random state."""
    if seed is not None:
        torch.manual_seed(seed)
    for mod in model.modules():
        if hasattr(mod, "reset_parameters") and mod is not model:
            mod.reset_parameters()
    return model.eval()


def literal_block(x, k, v, probs, proj, mlp, ref=None, count=0):
    """One encoder block of one item, ALGORITHMS.md section 5 literally, everything dense.

    ``x [T, D]``; ``k``, ``v`` ``[T, H, d]``; ``probs [H, T, T]`` the attention weights;
    ``mlp(h)`` the MLP branch including its norm. ``ref=None``: a reference, computed in
    full; returns ``(y, stored)`` with what a reference stores. Otherwise the ``count``
    tokens whose keys moved most from ``ref`` get fresh values / branches, all other rows
    are the reference's; returns ``(y, ref)``.
    """
    t = x.shape[0]
    if ref is not None:
        sel = F.cosine_similarity(k.reshape(t, -1), ref["k"].reshape(t, -1), dim=-1).argsort()[:count]

    def mixed(fresh, name):
        if ref is None:
            return fresh
        out = ref[name].clone()
        out[sel] = fresh[sel]
        return out

    v_t = mixed(v, "v")
    a = mixed(proj(torch.einsum("hqk,khd->qhd", probs, v_t).reshape(t, -1)), "a")
    h = x + a
    m = mixed(mlp(h), "m")
    return h + m, ({"k": k, "v": v, "a": a, "m": m} if ref is None else ref)
