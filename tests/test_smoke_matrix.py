"""Every model family x every registered pruner x every memory policy, through StreamingSession.

Short streams on tiny random models. Each case checks what must hold whatever the method:
the kept count is the pruner's own mask summed, a question leaves no trace (asked twice, the
same logits; the stream goes on to the same state), and the memory policy bounds what stays
live. Names come from the registries, so a new pruner or family joins the matrix by itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import streampress
from _model_helpers import tiny
from _pruner_helpers import PRUNER_MATRIX
from streampress.memory import RetrievalMemory, SlidingWindow
from streampress.session import StreamingSession

FAMILIES = ["random:qwen2-vl-tiny", "random:qwen2.5-vl-tiny", "random:qwen3-vl-tiny", "random:llava-onevision-tiny"]
MEMORIES = {"full": lambda: "full", "window": lambda: SlidingWindow(seconds=1.0),
            "retrieval": lambda: RetrievalMemory(window_seconds=1.0, top_k=1)}
Q = "What happens?"
FPS = 2.0


def frames_for(model, count: int, seed: int) -> np.ndarray:
    side = 2 * model.params.factor if hasattr(model, "params") else 28
    return np.random.default_rng(seed).integers(0, 256, size=(count, side, side, 3), dtype=np.uint8)


class Recording:
    """Wraps a pruner and sums the masks it returns (the independent kept count)."""

    def __init__(self, pruner):
        self.pruner, self.kept, self.name = pruner, 0, pruner.name

    def __call__(self, grids):
        keep = self.pruner(grids)
        self.kept += int(keep.sum())
        return keep

    def reset(self):
        self.pruner.reset()

    def snapshot(self):
        return self.pruner.snapshot(), self.kept

    def restore(self, snapshot):
        inner, self.kept = snapshot
        self.pruner.restore(inner)


@pytest.mark.parametrize("memory", sorted(MEMORIES))
@pytest.mark.parametrize("method", sorted(PRUNER_MATRIX))
@pytest.mark.parametrize("family", FAMILIES)
def test_family_method_memory(family, method, memory):
    model = tiny(family, "float32")
    params = PRUNER_MATRIX[method][-1]  # the aggressive setting
    pruner = Recording(streampress.create_pruner(method, **params))
    s = StreamingSession(model, pruner=pruner, memory=MEMORIES[memory]())
    frames = frames_for(model, 9, seed=len(method))
    s.add_frames(frames[:5], np.arange(5) / FPS)  # Qwen: one frame waits for its partner
    first = s.question_logits(Q)
    assert torch.isfinite(first).all()
    assert torch.equal(s.question_logits(Q), first)  # the question left no trace
    s.add_frames(frames[5:], np.arange(5, 9) / FPS)
    stats = s.stats()
    assert stats["frames"] == 9 and stats["items"] == 9 // model.frames_per_item
    hh, ww = stats["grid"]
    assert stats["visual_tokens_seen"] == stats["items"] * hh * ww
    assert stats["visual_tokens_kept"] == pruner.kept <= stats["visual_tokens_seen"]
    newest = 8 / FPS
    if memory != "full":  # only items that started within the last second stay live
        live = s.memory.blocks
        assert live and all(newest - b.start_time <= 1.0 for b in live)
    answer = s.ask(Q, max_new_tokens=2)
    assert answer.items == -(-9 // model.frames_per_item) and len(answer.token_ids) <= 2  # the pending frame too
