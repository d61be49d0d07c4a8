"""BudgetMemory: the token-level slot table and InfiniPot-V (KV_MEMORY.md sections 1-2).

Oracles (tiny random models, float64, CPU): a full-memory session (below the budget the
cache is bit-identical), the cache captured right before each compression (kept rows are
the same rows, bit for bit, looked up by token id), brute-force double loops for TaR,
hand-built caches (duplicate keys, one large value norm, static video), and a run that
never failed (a failed chunk is undone whole).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import streampress
import streampress.memory.budget as budget_module
import streampress.memory.hermes as hermes_module
import streampress.memory.infinipot as infinipot_module
from _budget_helpers import (
    ARCHS,
    LLAVA,
    QWEN3,
    QWEN25,
    Q,
    budget_session,
    capture,
    drive,
    feed,
    model,
    store_fingerprint,
    video,
)
from _session_helpers import assert_same
from streampress.memory import BudgetMemory, BudgetStore
from streampress.memory.infinipot import infinipot_config, infinipot_keep, tar_scores
from streampress.memory.slots import rotary_delta, rotate, stable_topk
from streampress.session import StreamingSession


def ipv(budget=32, **kw):
    return BudgetMemory("infinipot_v", budget=budget, **kw)


def per_item(m):
    return m.frames_per_item


# ---- policy object ---------------------------------------------------------------------------
def test_policy_validation_and_public_names():
    assert streampress.BudgetMemory is BudgetMemory
    assert ipv().name == "infinipot_v" and BudgetMemory("hermes", budget=8).name == "hermes"
    for bad in [dict(method="h2o", budget=8), dict(method="hermes", budget=1), dict(method="hermes", budget=True),
                dict(method="infinipot_v", budget=8, alpha=1.5), dict(method="infinipot_v", budget=8, compress_ratio=1),
                dict(method="infinipot_v", budget=8, tar_alignment="x"), dict(method="hermes", budget=8, schedule="x"),
                dict(method="hermes", budget=8, smoothing=(0.1, 0.2))]:
        with pytest.raises(ValueError):
            BudgetMemory(**bad)


def test_budget_split_and_rejected_configs():
    cfg = infinipot_config(4096, 128)  # Qwen2.5-VL-7B streaming: f = 32
    assert (cfg.f, cfg.c, cfg.r, cfg.M, cfg.C) == (32, 24, 4, 4096, 3072)
    assert cfg.b_van == round(0.5 * 3072) and cfg.b_tar - cfg.r * cfg.p == 3072 - 1536 - 512
    assert infinipot_config(4100, 128).M == 4096  # floor: the budget is a cap
    assert infinipot_config(48, 4, alpha=1.0).b_van == 0  # alpha = 1: no VaN fill
    c = infinipot_config(40, 4, alpha=0.3)  # |C| = 28: round(0.7 * 28) = round(19.6) = 20
    assert (c.b_van, c.b_tar) == (20, 8)
    with pytest.raises(ValueError, match="recent"):
        infinipot_config(32, 4, alpha=0.1, recent_ratio=0.5)  # r p = 16 > B_tar = 24 - round(0.9 * 24) = 2
    with pytest.raises(ValueError, match="at least 2 items"):
        infinipot_config(7, 4)


# ---- rotary delta (the model's own rotary module) ---------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_rotary_delta_equals_recomputing_rope_at_the_new_position(arch):
    m = model(arch)
    g = torch.Generator().manual_seed(0)
    n, d = 40, m.hf_model.config.text_config.hidden_size // m.hf_model.config.text_config.num_attention_heads
    d = getattr(m.hf_model.config.text_config, "head_dim", None) or d
    a = torch.randn(2, n, d, generator=g, dtype=torch.float64)
    old = torch.randint(0, 300, (m.position_axes, n), generator=g)
    new = torch.randint(0, 300, (m.position_axes, n), generator=g)  # deltas of both signs
    cos_o, sin_o = m.rotary(old)
    cos_n, sin_n = m.rotary(new)
    at_old, at_new = rotate(a, cos_o, sin_o), rotate(a, cos_n, sin_n)
    cos_d, sin_d = rotary_delta(m, new - old)
    assert torch.allclose(rotate(at_old, cos_d, sin_d), at_new, atol=1e-4)
    if m.position_axes == 3:  # each frequency takes its own axis' delta: moving one axis only is not 1-D
        only_t = new.clone()
        only_t[1:] = old[1:]
        assert not torch.allclose(rotate(at_old, *rotary_delta(m, only_t - old)), at_new, atol=1e-2)
    zero = rotary_delta(m, torch.zeros(m.position_axes, 3, dtype=torch.long))
    assert torch.equal(zero[0], torch.ones_like(zero[0])) and torch.equal(zero[1], torch.zeros_like(zero[1]))


def test_stable_topk_ties_go_to_the_later_slot():
    s = torch.tensor([[1.0, 3.0, 1.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    assert stable_topk(s, 3).tolist() == [[1, 2, 3], [2, 3, 4]]


# ---- InfiniPot-V selection on hand-built caches ------------------------------------------------
def brute_tar(keys, coords, recent_items, items, eps=1e-9):
    h, n, _ = keys.shape
    out = torch.zeros(h, n, dtype=torch.float64)
    for hh in range(h):
        for x in range(n):
            sims = []
            for t in recent_items:
                for y in range(n):
                    if items[hh, y] == t and coords[hh, y] == coords[hh, x]:
                        a, b = keys[hh, x], keys[hh, y]
                        sims.append(float((a / (a.norm() + eps)) @ (b / (b.norm() + eps))))
            out[hh, x] = -sum(sims) / len(sims) if sims else 0.0
    return out


def test_tar_sign_and_formula_against_a_double_loop():
    g = torch.Generator().manual_seed(1)
    p, h, d = 4, 2, 8
    keys = torch.randn(h, 3 * p, d, generator=g, dtype=torch.float64)  # items 0, 1 past, item 2 recent
    keys[:, 1] = 3 * keys[:, 2 * p + 1]  # past patch 1 duplicates the recent key: score -1
    keys[:, 2] = keys[:, 2 * p + 2] - 0  # placeholder, made orthogonal below
    r2 = keys[:, 2 * p + 2]
    v = torch.randn(h, d, generator=g, dtype=torch.float64)
    keys[:, 2] = v - (v * r2).sum(-1, keepdim=True) / (r2 * r2).sum(-1, keepdim=True) * r2  # orthogonal: 0
    items = torch.arange(3).repeat_interleave(p).expand(h, -1)
    coords = torch.arange(p).repeat(3).expand(h, -1)
    recent = items == 2
    s = tar_scores(keys, coords, recent, p)
    assert torch.allclose(s[:, 1], torch.full((h,), -1.0, dtype=torch.float64))
    assert torch.allclose(s[:, 2], torch.zeros(h, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(s[~recent].view(h, -1), brute_tar(keys, coords, [2], items)[~recent].view(h, -1), atol=1e-6)
    # the orthogonal token is kept before the duplicate (TaR only: alpha = 1, one past slot)
    keep = infinipot_keep(keys, torch.ones(h, 3 * p, d, dtype=torch.float64), coords, recent, p, p + 1, p + 1, 1.0)
    past = keep[:, 0]
    assert bool((s.gather(1, past[:, None]) >= s[:, :2 * p].max(1, keepdim=True).values).all())
    assert not bool((keep == 1).any())


def test_tar_coordinate_alignment_after_survivors_leave_their_patch_slots():
    g = torch.Generator().manual_seed(2)
    p, h, d, r = 4, 2, 6, 2
    # survivors of earlier rounds: 5 past tokens at shuffled coordinates, then 2 whole recent items
    coords = torch.tensor([[3, 0, 2, 2, 1] + list(range(p)) * r, [1, 1, 0, 3, 2] + list(range(p)) * r])
    items = torch.tensor([[0, 1, 1, 2, 3] + [8] * p + [9] * p, [0, 0, 2, 3, 3] + [8] * p + [9] * p])
    keys = torch.randn(h, coords.shape[1], d, generator=g, dtype=torch.float64)
    recent = items >= 8
    s = tar_scores(keys, coords, recent, p)
    assert torch.allclose(s[~recent], brute_tar(keys, coords, [8, 9], items)[~recent], atol=1e-6)
    # slot mode (C-IPV): pseudo-frames of p consecutive slots: coordinate = slot % p
    slot = (torch.arange(coords.shape[1]) % p).expand(h, -1)
    s_slot = tar_scores(keys, slot, recent, p)
    assert torch.allclose(s_slot[~recent], brute_tar(keys, slot, [8, 9], items)[~recent], atol=1e-6)
    assert not torch.allclose(s_slot[~recent], s[~recent])


def test_van_keeps_the_largest_value_norm_per_head():
    g = torch.Generator().manual_seed(3)
    p, h, d = 4, 3, 8
    keys = torch.randn(h, 4 * p, d, generator=g, dtype=torch.float64)
    values = torch.randn(h, 4 * p, d, generator=g, dtype=torch.float64)
    coords = torch.arange(p).repeat(4).expand(h, -1)
    recent = (torch.arange(4 * p) >= 3 * p).expand(h, -1)
    args = (coords, recent, p, 3 * p, 3 * p - round(0.5 * 3 * p), 0.5)
    base = infinipot_keep(keys, values, *args)
    cand = [x for x in range(3 * p) if x not in base[0].tolist()][0]  # not kept in head 0
    values2 = values.clone()
    values2[0, cand] *= 10 * values.norm(dim=-1).max() / values[0, cand].norm()
    got = infinipot_keep(keys, values2, *args)
    assert cand in got[0].tolist()
    assert torch.equal(got[1:], base[1:])


def test_static_video_ties_keep_the_later_slots_every_run():
    p, h, d = 4, 2, 8
    keys = torch.ones(h, 6 * p, d, dtype=torch.float64)
    values = torch.ones(h, 6 * p, d, dtype=torch.float64)
    coords = torch.arange(p).repeat(6).expand(h, -1)
    recent = (torch.arange(6 * p) >= 5 * p).expand(h, -1)
    runs = {tuple(infinipot_keep(keys, values, coords, recent, p, 3 * p, 2 * p, 0.5).reshape(-1).tolist())
            for _ in range(10)}
    assert len(runs) == 1
    assert infinipot_keep(keys, values, coords, recent, p, 3 * p, 2 * p, 0.5)[0].tolist() == list(range(3 * p, 6 * p))


# ---- InfiniPot-V in a session ------------------------------------------------------------------
@pytest.mark.parametrize("method", ["infinipot_v", "hermes"])
@pytest.mark.parametrize("arch", [QWEN25, QWEN3, LLAVA])
def test_budget_larger_than_the_stream_is_bit_identical_to_full(arch, method):
    m = model(arch)
    frames = video(m, 6 * per_item(m), seed=1)
    budget = 1000
    full, ours = StreamingSession(m), budget_session(arch, BudgetMemory(method, budget=budget))
    for s in (full, ours):
        feed(s, frames, per_item(m))
    assert ours.memory.compressions == 0
    for a, b in zip(full.memory.cache.layers, ours.memory.cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert torch.equal(full.question_logits(Q), ours.question_logits(Q))
    assert full.ask(Q, max_new_tokens=3).token_ids == ours.ask(Q, max_new_tokens=3).token_ids


@pytest.mark.parametrize("arch", [QWEN25, LLAVA])
def test_trigger_schedule_shapes_prefix_recent_and_gather_purity(arch):
    m = model(arch)
    s = budget_session(arch, ipv(budget=32))
    store = s.memory
    frames = video(m, 22 * per_item(m), seed=2)
    captured = capture(store)
    counts = []
    for k in range(22):
        feed(s, frames[k * per_item(m):(k + 1) * per_item(m)], per_item(m), start=k * per_item(m))
        counts.append(store.visual_count())
        cfg = store.method.config(store)
        if not captured or captured[-1] is None:
            continue
        before, table, prefix = captured[-1]
        captured[-1] = None
        layers = store.cache.layers
        # shapes: [1, H, P + |C|, D] everywhere, prefix bit-identical
        for (k0, v0), layer in zip(before, layers):
            assert layer.keys.shape[-2] == prefix + cfg.C and layer.values.shape == layer.keys.shape
            assert torch.equal(layer.keys[..., :prefix, :], k0[..., :prefix, :])
            assert torch.equal(layer.values[..., :prefix, :], v0[..., :prefix, :])
        new = store.table
        newest = sorted(set(table.item[0, 0].tolist()))[-cfg.r:]
        for l, ((k0, v0), layer) in enumerate(zip(before, layers)):
            for h in range(k0.shape[1]):
                ids = list(zip(new.item[l, h].tolist(), new.raster[l, h].tolist()))
                assert ids == sorted(ids) and len(set(ids)) == len(ids)  # (t, rho) order, strictly
                old = {key: i for i, key in enumerate(zip(table.item[l, h].tolist(), table.raster[l, h].tolist()))}
                rows = torch.tensor([old[key] for key in ids])
                assert torch.equal(layer.keys[0, h, prefix:], k0[0, h, prefix:][rows])  # gather purity
                assert torch.equal(layer.values[0, h, prefix:], v0[0, h, prefix:][rows])
                assert torch.equal(new.pos[l, h], table.pos[l, h][:, rows])  # positions unchanged
                for t in newest:  # the r most recent items whole in every (layer, head)
                    assert sum(1 for i, _ in ids if i == t) == cfg.p
    cfg = store.method.config(store)
    p, f, c = cfg.p, cfg.f, cfg.c
    expected, n, fired = [], 0, []
    for k in range(22):
        n += p
        if n >= f * p:
            n = c * p
            fired.append(k + 1)
        expected.append(n)
    assert counts == expected  # p, 2p, ..., f p -> c p, ..., first at item f, then every f - c items
    assert fired[0] == f and all(b - a == f - c for a, b in zip(fired, fired[1:]))
    assert store.compressions == len(fired)
    # blocks: one per item still holding a token somewhere, released only when empty everywhere
    present = set(store.table.item.unique().tolist())
    assert [b.item for b in store.blocks] == sorted(present)
    assert store.stats()["evicted_items"] == 22 - len(present)
    # the question runs at g = max position + 1, and nothing moved
    assert s.position_state.max_position + 1 == s.stats()["next_text_position"]


@pytest.mark.parametrize("method", ["infinipot_v", pytest.param("hermes", marks=pytest.mark.slow)])  # ~4 s each
@pytest.mark.parametrize("arch", ARCHS)
def test_budget_never_exceeded_over_a_thousand_items(arch, method):
    m = model(arch)
    p = 4
    store = BudgetStore(m, BudgetMemory(method, budget=40))
    per_call = 1 if method == "infinipot_v" else 8
    lengths = set()
    for _ in drive(store, m, 1200, p, per_call=per_call, grid=(2, 2), text=2 if arch == QWEN3 else 0):
        visual = store.table.visual()
        counts = visual.sum(-1)
        assert bool((counts == counts[0, 0]).all())  # rectangular: every (layer, head) alike
        assert store.visual_count() <= (40 if method == "infinipot_v" else 40 + per_call * p)
        if store.compressions and store.fresh == []:
            lengths.add(store.visual_count())
        assert len({l.keys.shape[-2] for l in store.cache.layers}) == 1
        present = set(store.table.item.unique().tolist()) - {-1}
        assert {b.item for b in store.blocks} == present
    assert store.compressions > 100
    if method == "hermes":
        assert store.visual_count() == 40  # exactly |M| after each compression


@pytest.mark.parametrize("arch", [QWEN25, QWEN3])
def test_questions_leave_no_trace_and_compression_is_query_independent(arch):
    m = model(arch)
    frames = video(m, 20 * per_item(m), seed=3)
    asked, never = budget_session(arch, ipv(budget=24)), budget_session(arch, ipv(budget=24))
    for k in range(20):
        part = frames[k * per_item(m):(k + 1) * per_item(m)]
        for s in (asked, never):
            feed(s, part, per_item(m), start=k * per_item(m))
        if k % 3 == 0:
            before = store_fingerprint(asked)
            asked.ask(Q, max_new_tokens=2)
            after = store_fingerprint(asked)
            after["stats"].pop("questions"), before["stats"].pop("questions")
            assert_same(after, before)
    assert asked.memory.compressions >= 3
    a, b = store_fingerprint(asked), store_fingerprint(never)
    a["stats"].pop("questions"), b["stats"].pop("questions")
    assert_same(a, b)


# ---- undo: a failed chunk is undone whole ---------------------------------------------------------
class Injected(RuntimeError):
    pass


@pytest.mark.parametrize("where", ["select", "gather", "prefill"])
@pytest.mark.parametrize("method", ["infinipot_v", "hermes"])
def test_failed_chunk_is_undone_whole_and_a_retry_equals_a_clean_run(method, where, monkeypatch):
    arch = QWEN25
    m = model(arch)
    frames = video(m, 24, seed=4)
    policy = BudgetMemory(method, budget=16)
    clean = budget_session(arch, policy)
    feed(clean, frames, 4)
    s = budget_session(arch, policy)
    feed(s, frames[:12], 4)  # 6 items: 24 visual tokens; the next chunk compresses again
    assert s.memory.compressions >= 1
    before = store_fingerprint(s)
    layer1 = m.hf_model.model.language_model.layers[1].self_attn

    def raising(module, args, kwargs):
        raise Injected(where)

    handles = []
    if where == "select" and method == "infinipot_v":
        monkeypatch.setattr(infinipot_module, "infinipot_keep", lambda *a, **k: raising(None, a, k))
    elif where == "select":  # the guidance forward fails at layer 1, after layer 0 appended the prompt
        original = hermes_module.Hermes.guidance_attention

        def guidance(self, *a, **k):
            h = layer1.register_forward_pre_hook(raising, with_kwargs=True)
            try:
                return original(self, *a, **k)
            finally:
                h.remove()

        monkeypatch.setattr(hermes_module.Hermes, "guidance_attention", guidance)
    elif where == "gather":
        built = budget_module.BudgetStore._gathered

        def gathered(self, *a):
            built(self, *a)  # everything built, then out of memory before installing
            raise Injected("gather")

        monkeypatch.setattr(budget_module.BudgetStore, "_gathered", gathered)
    else:  # the chunk's own prefill: layer 0 appended, layer 1 raises
        handles.append(layer1.register_forward_pre_hook(raising, with_kwargs=True))
    try:
        with pytest.raises(Injected):
            s.add_frames(frames[12:16], np.arange(12, 16) / 2.0)
    finally:
        monkeypatch.undo()
        for h in handles:
            h.remove()
    assert_same(store_fingerprint(s), before)
    feed(s, frames[12:], 4, start=12)
    assert_same(store_fingerprint(s), store_fingerprint(clean))
    assert torch.equal(s.question_logits(Q), clean.question_logits(Q))


# ---- the text form (--memory) and the CLI -----------------------------------------------------------
def test_memory_text_forms_round_trip_and_build_policies():
    from streampress.spec import memory_policy, memory_text, parse_memory

    assert parse_memory("infinipot:budget=4096") == {"name": "budget", "method": "infinipot_v", "budget": 4096}
    assert parse_memory("infinipot_v:budget=64") == parse_memory("infinipot:budget=64")
    assert parse_memory("hermes:budget=4000") == {"name": "budget", "method": "hermes", "budget": 4000}
    for text in ("infinipot:budget=4096", "hermes:budget=4000"):
        assert memory_text(parse_memory(text)) == text
    assert memory_policy(parse_memory("hermes:budget=40")) == BudgetMemory("hermes", budget=40)
    for bad, why in [("hermes", "budget= is required"), ("hermes:budget=1", "budget must be"),
                     ("infinipot:budget=8,top_k=2", "unknown key 'top_k'"), ("hermes:budget=x", "budget must be")]:
        with pytest.raises(ValueError, match=why):
            parse_memory(bad)


@pytest.mark.parametrize("text", ["infinipot:budget=16", "hermes:budget=16"])
def test_cli_run_with_a_budget_memory(text, capsys):
    import json

    from streampress.cli import main

    rc = main(["run", "synthetic:12", "--model", QWEN25, "--size", "56", "--memory", text, "--ask",
               "end: What moves?", "--max-new-tokens", "1", "--json", "-q"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["memory"] == text
    stats = out["stats"]
    assert stats["memory"] == ("infinipot_v" if text.startswith("infinipot") else "hermes")
    assert stats["visual_slots"] <= 16 + 8 and stats["budget"] == 16
