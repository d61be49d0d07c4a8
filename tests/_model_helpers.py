"""Test helpers shared by the model and session tests of every family: tiny models and a
stand-in pruner. (Tests run on one thread: ``conftest.py`` sets it for the whole run.)"""

from __future__ import annotations

import functools

import torch

from streampress.models import load_model


@functools.cache
def tiny(arch: str, dtype: str = "float64"):
    """A tiny random model, cached per test process (models hold no stream state)."""
    return load_model(arch, dtype=dtype, device="cpu")


class StandInPruner:
    """A stateful pruner following the contract (slice-invariant): per grid keep the
    ``keep`` tokens least similar (cosine) to the same position in the previous grid of
    the stream; the first grid keeps the ``keep`` tokens of largest norm."""

    name = "stand-in"

    def __init__(self, keep: int = 2):
        self.keep = keep
        self.params = {"keep": keep}
        self.reset()

    def reset(self):
        self._prev = None

    def __call__(self, grids: torch.Tensor) -> torch.Tensor:
        t, h, w, d = grids.shape
        x = grids.reshape(t, h * w, d).double()
        prev = torch.cat([x[:1] if self._prev is None else self._prev[None], x[:-1]])
        score = torch.nn.functional.cosine_similarity(x, prev, dim=-1)  # high = redundant
        if self._prev is None:
            score[0] = -x[0].norm(dim=-1)
        keep = torch.zeros(t, h * w, dtype=torch.bool)
        keep.scatter_(1, score.argsort(dim=1)[:, : self.keep], True)
        self._prev = x[-1]
        return keep.reshape(t, h, w)
