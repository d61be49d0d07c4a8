"""The built-in pruners, memory policies and STC-Cacher satisfy the session's protocols."""

from __future__ import annotations

import streampress
from _model_helpers import StandInPruner, tiny
from streampress.protocols import EncoderReuse, EncoderState, MemoryPolicy, Pruner, Undoable


def test_builtins_satisfy_the_protocols():
    pruner = streampress.create_pruner("uniform", keep_ratio=0.5)
    assert isinstance(pruner, Pruner) and isinstance(pruner, Undoable)
    assert isinstance(StandInPruner(), Pruner) and not isinstance(StandInPruner(), Undoable)
    cacher = streampress.create_cacher()
    assert isinstance(cacher, EncoderReuse) and isinstance(cacher.new_state(), EncoderState)
    for policy in (streampress.FullMemory(), streampress.SlidingWindow(seconds=2),
                   streampress.RetrievalMemory(window_seconds=2, top_k=1)):
        assert isinstance(policy, MemoryPolicy)
    store = streampress.RetrievalMemory(window_seconds=2, top_k=1).open(tiny("random:qwen2.5-vl-tiny"))
    for name in ("cache", "length", "truncate", "mark", "rollback", "add_blocks", "after_add", "answering", "stats"):
        assert hasattr(store, name)
    assert not isinstance("full", MemoryPolicy) and not isinstance(object(), Pruner)
