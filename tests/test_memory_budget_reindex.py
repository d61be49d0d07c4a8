"""BudgetMemory(reindex=...): position re-indexing (KV_MEMORY.md 3.4 step 10, App. E.2).

Oracles: an independent per-axis rank map (sorted distinct values, built in Python) for the
compacted positions; a twin store with ``reindex="off"`` fed the same tokens, against which
values, the slot table's token identities and the keys *before RoPE* (each turned back at
its own position with the model's rotary module) must agree; the lazy trigger's boundary
(``max position = limit - 1024`` does not fire, one more does); the positions the stream
continues at (1-D: right after the new top; Qwen2.5-VL: a new video anchored there, its
temporal axis measured from that item's time).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import streampress
from _budget_helpers import ARCHS, LLAVA, QWEN3, QWEN25, Q, budget_session, drive, feed, model, store_fingerprint, video
from _session_helpers import assert_same, fingerprint
from streampress.memory import BudgetMemory
from streampress.memory import budget as budget_module
from streampress.memory.retrieval import unrotate
from streampress.memory.slots import compact_positions


def rank_map(values: list[int], base: int) -> list[int]:
    distinct = sorted(set(values))
    return [base + distinct.index(v) for v in values]


def pre_rope(m, keys: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Keys ``[H, V, D]`` at positions ``pos [H, P, V]`` turned back to before RoPE, per head."""
    out = []
    for h in range(keys.shape[0]):
        cos, sin = m.rotary(pos[h].to(torch.int64))
        out.append(unrotate(keys[h], cos, sin))
    return torch.stack(out)


def live_top(store) -> int:
    return max(store.prefix - 1, int(store.table.pos.max()))


def test_compact_positions_against_an_independent_rank_map():
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 40, (2, 3, 3, 25), generator=g, dtype=torch.int32)  # repeats on every axis
    new = compact_positions(pos, 7)
    assert new.dtype == torch.int64 and new.shape == pos.shape
    for idx in np.ndindex(*pos.shape[:3]):
        row = pos[idx].tolist()
        assert new[idx].tolist() == rank_map(row, 7)
    one = torch.tensor([[5, 9, 10, 30, 31]])
    assert compact_positions(one, 3).tolist() == [[3, 4, 5, 6, 7]]  # 1-D: base, base + 1, ... in order
    assert compact_positions(torch.zeros(2, 0, dtype=torch.int64), 3).shape == (2, 0)


@pytest.mark.parametrize("method", ["hermes", "infinipot_v"])
def test_lazy_trigger_fires_one_past_the_limit_and_keeps_every_key_before_rope(method, monkeypatch):
    """1-D (LLaVA-OV): nothing moves while the largest position is max_context - 1024; one
    item later every (layer, head) row holds positions P, P + 1, ... and every key is the
    same key before RoPE as in a store that never re-indexes."""
    m = model(LLAVA)
    kw = dict(omega=1.0) if method == "hermes" else {}
    p, prefix = 4, 3
    off = BudgetMemory(method, budget=16, reindex="off", **kw).open(m)
    tops = [live_top(off) for _ in drive(off, m, 14, p, prefix=prefix, seed=3)]
    k0 = next(k for k in range(len(tops) - 1) if off.compressions and tops[k + 1] > tops[k]
              and k >= 6)  # a step after compressions began, whose successor is larger
    monkeypatch.setattr(m, "max_context", tops[k0] + 1024)
    lazy = BudgetMemory(method, budget=16, reindex="lazy", **kw).open(m)
    twin = BudgetMemory(method, budget=16, reindex="off", **kw).open(m)
    lazy_steps = drive(lazy, m, k0 + 3, p, prefix=prefix, seed=3)
    for k, _ in enumerate(drive(twin, m, k0 + 2, p, prefix=prefix, seed=3)):
        next(lazy_steps)
        if k < k0 + 1:
            assert lazy.relocations == 0
            assert_same(store_fingerprint_of(lazy), store_fingerprint_of(twin))
    assert lazy.relocations == 1 and lazy.stats()["reindexes"] == 1
    S = lazy.table.slots
    want = prefix + torch.arange(S)
    assert bool((lazy.table.pos[:, :, 0] == want).all())  # every row: P .. P + S - 1, in slot order
    assert lazy.position_top == prefix + S - 1
    assert torch.equal(lazy.table.item, twin.table.item) and torch.equal(lazy.table.raster, twin.table.raster)
    for a, b in zip(lazy.cache.layers, twin.cache.layers):
        assert torch.equal(a.values, b.values)
        assert torch.equal(a.keys[..., :prefix, :], b.keys[..., :prefix, :])  # the prefix is untouched
    for l, (a, b) in enumerate(zip(lazy.cache.layers, twin.cache.layers)):
        ka = pre_rope(m, a.keys[0, :, prefix:], lazy.table.pos[l])
        kb = pre_rope(m, b.keys[0, :, prefix:], twin.table.pos[l])
        assert torch.allclose(ka, kb, atol=1e-5)
        moved = lazy.table.pos[l] != twin.table.pos[l]
        assert bool(moved.any())  # gaps existed, so the keys really turned
    next(lazy_steps)  # the next item goes right after the new top
    assert lazy.relocations == 1
    newest = lazy.table.item[0, 0] == k0 + 2
    assert lazy.table.pos[0, 0, 0][newest].tolist() == list(range(prefix + S, prefix + S + p))


def store_fingerprint_of(store) -> dict:
    return {"table": (store.table.item, store.table.raster, store.table.pos) if store.table is not None else None,
            "cache": [(layer.keys, layer.values) for layer in store.cache.layers if layer.keys is not None]}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["hermes", "infinipot_v"])
def test_eager_compaction_per_axis_keeps_shared_coordinates_and_keys(arch, method):
    """Eager re-indexing at the first compression, against the per-axis rank map (App. E.2:
    tokens that shared a coordinate still share it; each axis keeps its order) and the
    keys before RoPE of a twin that never re-indexes; InfiniPot-V's heads differ."""
    m = model(arch)
    text = 2 if arch == QWEN3 else 0
    grid = (2, 3)
    eager = BudgetMemory(method, budget=24, reindex="eager").open(m)
    twin = BudgetMemory(method, budget=24, reindex="off").open(m)
    prefix = 5
    for _ in zip(drive(eager, m, 8, 6, prefix=prefix, seed=1, grid=grid, text=text),
                 drive(twin, m, 8, 6, prefix=prefix, seed=1, grid=grid, text=text)):
        if eager.compressions:
            break
    assert eager.compressions == 1 and eager.relocations == 1
    old, new = twin.table.pos, eager.table.pos
    for l in range(old.shape[0]):
        for h in range(old.shape[1]):
            for axis in range(old.shape[2]):
                assert new[l, h, axis].tolist() == rank_map(old[l, h, axis].tolist(), prefix)
        a, b = eager.cache.layers[l], twin.cache.layers[l]
        assert torch.equal(a.values, b.values)
        assert torch.allclose(pre_rope(m, a.keys[0, :, prefix:], new[l]), pre_rope(m, b.keys[0, :, prefix:], old[l]),
                              atol=1e-5)
    assert eager.position_top == int(new.max())
    if method == "infinipot_v":  # per-head kept sets: the rows really differ
        assert not torch.equal(eager.table.item[:, :1].expand_as(eager.table.item), eager.table.item)


def test_session_stays_within_the_limit_with_lazy_reindexing_and_answers_without_warning(monkeypatch):
    s = budget_session(LLAVA, BudgetMemory("hermes", budget=12))
    m = s.model
    monkeypatch.setattr(m, "max_context", 1024 + 90)
    frames = video(m, 40, seed=2)
    fired = 0
    for k in range(40):
        state = s.position_state
        moved = s.memory.relocations
        s.add_frames(frames[k:k + 1], [k / 2.0])
        store = s.memory
        if store.relocations != moved:
            fired += 1
            top = live_top(store)
            assert s.position_state.max_position == top and s.position_state.next_position == top + 1
            assert top == store.prefix + store.table.slots - 1  # 1-D: no gaps left
        else:
            block = store.blocks[-1]
            laid = list(range(state.next_position, state.next_position + block.length))
            assert block.item == k and block.positions[0].tolist() == laid  # right after the previous top
            newest = store.table.item[0, 0] == k
            assert set(store.table.pos[0, 0, 0][newest].tolist()) <= set(laid)
        assert s.position_state.max_position <= max(m.max_context - 1024, store.prefix + store.table.slots - 1)
    assert fired >= 2
    before = store_fingerprint(s)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "positions exceed the trained context" warning
        s.ask(Q, max_new_tokens=2)
    after = store_fingerprint(s)
    after["stats"].pop("questions"), before["stats"].pop("questions")
    assert_same(after, before)


def test_qwen25_video_restarts_after_the_new_top_with_time_from_its_first_item(monkeypatch):
    m = model(QWEN25)
    s = budget_session(QWEN25, BudgetMemory("hermes", budget=8, reindex="eager"))
    frames = video(m, 16, seed=5)
    feed(s, frames[:8], 2)  # 4 items: the budget is passed, compressed and re-indexed
    assert s.memory.relocations >= 1
    top = s.position_state.max_position
    assert s.position_state.video_start is None and top == live_top(s.memory)
    relocations = s.memory.relocations
    times = [5.25, 5.75, 7.0, 7.5]  # later frames, uneven times: t measured from 5.25
    # the next item: after a re-indexing (eager) the table shows compacted positions, so read
    # the layout the session makes from the state it keeps
    layout, after = m.layout_items(s.position_state, torch.tensor([[5.25, 5.75], [7.0, 7.5]], dtype=torch.float64),
                                   s._grid_hw)
    hh, ww = s._grid_hw
    start = top + 1
    rows, cols = torch.arange(hh).repeat_interleave(ww), torch.arange(ww).repeat(hh)
    dt1 = int((7.0 - 5.25) * m.tokens_per_second)
    want_t = torch.cat([torch.full((hh * ww,), start), torch.full((hh * ww,), start + dt1)])
    assert layout.positions[0].tolist() == want_t.tolist()
    assert layout.positions[1].tolist() == (rows + start).repeat(2).tolist()
    assert layout.positions[2].tolist() == (cols + start).repeat(2).tolist()
    assert after.video_start == start
    s.add_frames(frames[8:12], np.array(times) + s.position_state.start_time)
    blocks = [b for b in s.memory.blocks if b.item >= 4]
    assert blocks and blocks[-1].item == 5  # (item 4 may be evicted already)
    for b in blocks:  # the session laid the items out exactly so
        n = hh * ww
        assert torch.equal(b.positions, layout.positions[:, (b.item - 4) * n:(b.item - 3) * n])
    assert s.memory.relocations > relocations


@pytest.mark.parametrize("kind", ["budget", "window"])
def test_failed_reindexing_is_undone_whole_and_a_retry_equals_a_clean_run(kind, monkeypatch):
    """The chunk whose re-indexing fails (its rotation raising) leaves the stream as it was,
    and the same frames fed again give what a run that never failed gives."""
    from streampress.memory import SlidingWindow
    from streampress.memory import window as window_module

    m = model(QWEN25)
    if kind == "budget":
        policy, module, fp, least = BudgetMemory("infinipot_v", budget=16, reindex="eager"), budget_module, \
            store_fingerprint, 1
        frames, step, failing_chunk = video(m, 16, seed=4), 4, 12
    else:
        policy, module, fp, least = SlidingWindow(seconds=1.5, reindex="eager"), window_module, fingerprint, 2
        frames, step, failing_chunk = video(m, 12, seed=9), 2, 4  # evicts, then fails while re-indexing
    clean = budget_session(QWEN25, policy)
    feed(clean, frames, step)
    s = budget_session(QWEN25, policy)
    feed(s, frames[:4], step)
    if kind == "budget":
        assert s.memory.relocations == 0
    before = fp(s)

    def failing(*a, **k):
        raise MemoryError("injected")

    monkeypatch.setattr(module, "rotary_delta", failing)
    with pytest.raises(MemoryError):
        feed(s, frames[4:4 + failing_chunk], failing_chunk, start=4)
    monkeypatch.undo()
    assert_same(fp(s), before)
    feed(s, frames[4:], step, start=4)
    assert s.memory.relocations == clean.memory.relocations >= least
    assert_same(fp(s), fp(clean))
    assert torch.equal(s.question_logits(Q), clean.question_logits(Q))


def test_reindex_and_pooling_settings():
    from streampress.spec import memory_policy, memory_text, parse_memory

    assert BudgetMemory("hermes", budget=8).reindex == "lazy"
    for bad in [dict(reindex="soon"), dict(pooling="code"), dict(pooling="max")]:
        with pytest.raises(ValueError, match="reindex|pooling"):
            BudgetMemory("hermes", budget=8, **bad)
    text = "infinipot:budget=64,reindex=off,pooling=code"
    spec = parse_memory(text)
    assert spec == {"name": "budget", "method": "infinipot_v", "budget": 64, "reindex": "off", "pooling": "code"}
    assert memory_text(spec) == text
    assert memory_policy(spec) == BudgetMemory("infinipot_v", budget=64, reindex="off", pooling="code")
    assert memory_text(parse_memory("hermes:budget=40,reindex=eager")) == "hermes:budget=40,reindex=eager"
    for bad, why in [("hermes:budget=8,pooling=code", "unknown key 'pooling'"),
                     ("hermes:budget=8,reindex=soon", "reindex must be one of lazy|eager|off")]:
        with pytest.raises(ValueError, match=why):
            parse_memory(bad)


# ---- the sliding window re-indexes too (whole items) -------------------------------------------------
@pytest.mark.parametrize("arch, pruned", [(a, False) for a in ARCHS] + [(QWEN25, True), (LLAVA, True)])
def test_window_eager_reindexing_against_a_twin_that_never_moves(arch, pruned):
    """SlidingWindow(reindex="eager"): after the first eviction the cached items sit at the
    per-axis rank map of the positions a never-re-indexing twin keeps (pruned tokens leave
    gaps that close), with the same keys before RoPE and the same values; later items keep
    time order and the positions stay dense."""
    from streampress.memory import SlidingWindow
    from streampress.session import StreamingSession

    m = model(arch)

    def make(reindex):
        pruner = streampress.create_pruner("streaming_assistant", keep_ratio=0.5) if pruned else None
        return StreamingSession(model(arch, "sdpa", None), pruner=pruner,
                                memory=SlidingWindow(seconds=2.0, reindex=reindex))

    s, twin = make("eager"), make("off")
    per = m.frames_per_item
    frames = video(m, 10 * per, seed=7)
    k = 0
    while s.memory.relocations == 0:
        feed(s, frames[k * per:(k + 1) * per], per, start=k * per)
        feed(twin, frames[k * per:(k + 1) * per], per, start=k * per)
        k += 1
    a, b = s.memory, twin.memory
    assert a.relocations == 1 and a.evicted_items == b.evicted_items > 0
    assert [x.item for x in a.blocks] == [x.item for x in b.blocks]
    prefix = a.prefix
    old = torch.cat([x.positions for x in b.blocks], 1)
    new = torch.cat([x.positions for x in a.blocks], 1)
    for axis in range(old.shape[0]):
        assert new[axis].tolist() == rank_map(old[axis].tolist(), prefix)
    assert s.position_state.max_position == a.position_top == max(prefix - 1, int(new.max()))
    cos_o, sin_o = m.rotary(old)
    cos_n, sin_n = m.rotary(new)
    for la, lb in zip(a.cache.layers, b.cache.layers):
        assert torch.equal(la.values, lb.values) and torch.equal(la.keys[..., :prefix, :], lb.keys[..., :prefix, :])
        assert torch.allclose(unrotate(la.keys[0, :, prefix:], cos_n, sin_n),
                              unrotate(lb.keys[0, :, prefix:], cos_o, sin_o), atol=1e-5)
    for j in range(k, k + 3):  # eager: every eviction compacts again; time order and density hold
        feed(s, frames[j * per:(j + 1) * per], per, start=j * per)
        blocks = s.memory.blocks
        pos = torch.cat([x.positions for x in blocks], 1)
        assert s.memory.relocations == 1 + j - k + 1 and torch.equal(compact_positions(pos, prefix), pos)
        assert int(blocks[-1].positions[0].min()) > int(blocks[-2].positions[0].max())
        if arch == LLAVA:  # 1-D: prefix, prefix + 1, ... over the cached items
            assert pos[0].tolist() == list(range(prefix, prefix + pos.shape[1]))
        assert s.position_state.max_position == int(pos.max())


def test_window_lazy_reindexing_keeps_a_long_stream_within_the_limit(monkeypatch):
    from streampress.memory import SlidingWindow

    s = budget_session(LLAVA, SlidingWindow(seconds=1.0))
    monkeypatch.setattr(s.model, "max_context", 1024 + 80)
    frames = video(s.model, 40, seed=8)
    fired = []
    for k in range(40):
        moved = s.memory.relocations
        s.add_frames(frames[k:k + 1], [k / 2.0])
        top = s.position_state.max_position
        if s.memory.relocations == moved:
            assert top <= 80  # below the limit - 1024: nothing moves
        else:
            fired.append(k)
            assert top == s.memory.length() - 1 < 80  # compacted: prefix, then the cached items, no gap
    assert len(fired) >= 3 and fired[1] - fired[0] > 1  # lazy: only when the limit is near
    assert s.stats()["reindexes"] == len(fired)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        before = fingerprint(s)
        s.ask(Q, max_new_tokens=2)
    after = fingerprint(s)
    after["stats"].pop("questions"), before["stats"].pop("questions")
    assert_same(after, before)


def test_window_text_form_and_validation():
    from streampress.memory import SlidingWindow
    from streampress.spec import memory_policy, memory_text, parse_memory

    assert SlidingWindow(seconds=5).reindex == "lazy"
    with pytest.raises(ValueError, match="reindex must be one of"):
        SlidingWindow(seconds=5, reindex="never")
    assert parse_memory("window:30") == {"name": "window", "seconds": 30.0}
    spec = parse_memory("window:30,reindex=off")
    assert spec == {"name": "window", "seconds": 30.0, "reindex": "off"}
    assert memory_text(spec) == "window:30,reindex=off"
    assert memory_policy(spec) == SlidingWindow(seconds=30.0, reindex="off")
    for bad, why in [("window:30,reindex=soon", "reindex must be one of"),
                     ("window:30,top_k=2", "unknown key 'top_k'")]:
        with pytest.raises(ValueError, match=why):
            parse_memory(bad)

