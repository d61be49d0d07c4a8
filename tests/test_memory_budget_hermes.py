"""BudgetMemory(method="hermes"): KV_MEMORY.md section 3 properties.

Oracles (tiny random models, float64, CPU): golden layer tables, the closed form of the
cross-layer smoothing, byte-exact prompts, the cache captured right before each compression
(summary value = mean of the evicted values; summary key = RoPE(p*) applied to the mean of
the evicted keys before RoPE, for 1-D RoPE and M-RoPE contiguous / interleaved), the
sliding-window limit (lambda = 0, omega = 1), and an independent eager-attention reference
(the attention weights the Hugging Face eager kernel returns) for the attention-only limit.
"""

from __future__ import annotations

import pytest
import torch

from _budget_helpers import (
    ARCHS,
    LLAVA,
    QWEN3,
    QWEN25,
    Q,
    budget_session,
    capture,
    feed,
    model,
    store_fingerprint,
    video,
)
from _session_helpers import assert_same
from streampress.memory import BudgetMemory
from streampress.memory.hermes import GLOBAL_PROMPT, LOCAL_PROMPT, PROMPT_OF, guidance_prompts, layer_schedule, smooth
from streampress.memory.retrieval import unrotate
from streampress.memory.slots import minmax, stable_topk


def hermes(budget=10, **kw):
    return BudgetMemory("hermes", budget=budget, **kw)


@pytest.mark.parametrize("L, l_s, l_d", [(24, 2, 16), (28, 2, 19), (36, 3, 25)])
@pytest.mark.parametrize("schedule", ["paper", "code"])
def test_layer_groups_and_weights_golden(L, l_s, l_d, schedule):
    rules = layer_schedule(L, schedule)
    assert [r.kind for r in rules] == ["shallow"] * l_s + ["middle"] * (l_d - l_s) + ["deep"] * (L - l_d)
    a, b = (0.75, 0.6) if schedule == "paper" else (1.0, 0.9)
    for l, r in enumerate(rules):
        if r.kind == "shallow":
            assert (r.omega, r.k, r.lam) == (1.0, 20.0, 0.1)
        elif r.kind == "deep":
            assert (r.omega, r.k, r.lam) == (0.0, 0.0, 0.4)
        else:
            pi = (l - l_s) / (l_d - l_s)
            assert r.omega == pytest.approx(a - b * pi) and r.k == pytest.approx(20 - 19.5 * pi) and r.lam == 0.3
    assert rules[l_s].omega == a  # pi = 0 at the first middle layer


def test_smoothing_recursion_equals_its_closed_form():
    g = torch.Generator().manual_seed(0)
    L, T = 7, 11
    s = [torch.rand(T, generator=g, dtype=torch.float64) for _ in range(L)]
    lam = torch.rand(L, generator=g, dtype=torch.float64).tolist()
    got = smooth(s, lam)
    for l in range(L):
        want = torch.zeros(T, dtype=torch.float64)
        for m in range(l, L):
            prod = 1.0
            for j in range(l, m):
                prod *= lam[j]
            want += prod * (1.0 if m == L - 1 else 1 - lam[m]) * s[m]
        assert torch.allclose(got[l], want, atol=1e-12)


def test_guidance_prompts_byte_exact():
    p = guidance_prompts()
    assert p["local"] == ("Describe the current scene in detail, focusing on specific objects, fine-grained actions, "
                          "and spatial relationships.") == LOCAL_PROMPT
    assert p["global"] == ("Summarize the video narrative, identifying main characters, key events, timeline "
                           "changes, and the overall theme.") == GLOBAL_PROMPT
    assert p["mixed"] == p["local"] + "; " + p["global"]
    h = guidance_prompts(("What is on the table?", "(B)", ["A) a cup", "B) a red apple", "C) nothing"]))
    assert h["local"] == ("Find recent details related to: Question: What is on the table? Answer: a red apple. "
                          + LOCAL_PROMPT)
    assert h["global"] == "Context summary: Question: What is on the table? Answer: a red apple. " + GLOBAL_PROMPT
    assert h["mixed"] == h["local"] + "; " + h["global"]


def ids(table, l):
    return list(zip(table.item[l, 0].tolist(), table.raster[l, 0].tolist()))


@pytest.mark.parametrize("arch", ARCHS)
def test_counts_summary_value_and_key_positions_and_question_path(arch):
    m = model(arch)
    M = 10
    s = budget_session(arch, hermes(M))
    store = s.memory
    seen = capture(store)
    per = 4 * m.frames_per_item
    frames = video(m, 6 * per, seed=1)
    for k in range(6):
        feed(s, frames[k * per:(k + 1) * per], per, start=k * per)
        if not seen or seen[-1] is None:
            continue
        before, table, prefix = seen[-1]
        seen[-1] = None
        new = store.table
        rules = store.method.rules(len(before))
        visual = new.visual()
        assert bool((visual.sum(-1) == M).all())  # every layer: exactly |M| visual slots
        assert len({l.keys.shape[-2] for l in store.cache.layers}) == 1
        for l, ((k0, v0), layer) in enumerate(zip(before, store.cache.layers)):
            assert torch.equal(layer.keys[..., :prefix, :], k0[..., :prefix, :])  # prefix untouched
            assert bool((new.item[l] == new.item[l, :1]).all())  # all heads of a layer keep the same slots
            summaries = (new.item[l, 0] == -1).nonzero().squeeze(1).tolist()
            if rules[l].kind != "deep":
                assert summaries == []
                continue
            assert summaries == [new.slots - 1]  # one summary, at the end
            old, kept = ids(table, l), set(ids(new, l)[:-1])
            vis_old = table.visual()[l, 0]
            evicted = [i for i, key in enumerate(old) if bool(vis_old[i]) and key not in kept]
            assert len(evicted) == int(vis_old.sum()) - (M - 1)
            e = torch.tensor(evicted)
            v_sum = v0[0, :, prefix:][:, e].mean(1)
            assert torch.allclose(layer.values[0, :, -1], v_sum, atol=1e-12)  # summary value
            pos = table.pos[l, 0].to(torch.int64)
            star = new.pos[l, 0, :, -1].to(torch.int64)
            kept_rows = [i for i, key in enumerate(old) if key in kept]
            assert bool((star == pos[:, kept_rows].max() + 1).all())  # p*: right after the kept slots
            cos, sin = m.rotary(pos[:, e])
            a = unrotate(k0[0, :, prefix:][:, e], cos, sin).mean(1)  # keys before RoPE, averaged
            c2, s2 = m.rotary(star[:, None])
            want = a * c2 + torch.cat((-a[..., a.shape[-1] // 2:], a[..., :a.shape[-1] // 2]), -1) * s2
            assert torch.allclose(layer.keys[0, :, -1].float(), want.float(), atol=1e-4)  # RoPE(p*) mean(a)
        # positions: no two live tokens of a layer share one; the next token goes after all of them
        for l in range(len(before)):
            live = [tuple(x) for x in new.pos[l, 0].T.tolist()]
            assert len(set(live)) == len(live)
            assert s.position_state.max_position >= int(new.pos[l].max())
    assert store.compressions >= 3
    # the question path: no guidance forward, and no trace
    forwards, before = store.method.forwards, store_fingerprint(s)
    s.ask(Q, max_new_tokens=2)
    assert store.method.forwards == forwards
    after = store_fingerprint(s)
    after["stats"].pop("questions"), before["stats"].pop("questions")
    assert_same(after, before)


@pytest.mark.parametrize("arch", [QWEN25, LLAVA])
def test_recency_only_is_a_sliding_window_of_the_newest_slots(arch):
    m = model(arch, num_layers=10)
    M = 9
    s = budget_session(arch, hermes(M, omega=1.0, smoothing=(0.0, 0.0, 0.0), summary=False), num_layers=10)
    seen = capture(s.memory)
    per = 3 * m.frames_per_item
    frames = video(m, 5 * per, seed=2)
    for k in range(5):
        feed(s, frames[k * per:(k + 1) * per], per, start=k * per)
        if seen and seen[-1] is not None:
            _, table, _ = seen[-1]
            seen[-1] = None
            for l in range(10):
                old = [key for key, v in zip(ids(table, l), table.visual()[l, 0].tolist()) if v]
                assert ids(s.memory.table, l) == old[-M:]
    assert s.memory.compressions >= 2


@pytest.mark.parametrize("arch", [QWEN25, QWEN3])
def test_attention_only_keeps_the_top_eager_attention(arch):
    m = model(arch, attn="eager")
    M = 7
    s = budget_session(arch, hermes(M, omega=0.0, smoothing=(0.0, 0.0, 0.0), summary=False), attn="eager")
    store = s.memory
    got = {}
    real = store.method.guidance_attention

    def guidance(st, prefix, vis, ids_, g):
        # independent reference on a copy of the cache: the eager kernel's own weights
        cache = m.new_cache()
        for i, layer in enumerate(st.cache.layers):
            cache.update(layer.keys.clone(), layer.values.clone(), i)
        weights = {}
        hooks = [mod.register_forward_hook(lambda mod, a, out, i=i: weights.__setitem__(i, out[1]))
                 for i, mod in enumerate(m.attention_modules())]
        try:
            from streampress.models.base import text_positions
            m.forward(m.embed_text(torch.tensor(ids_)), text_positions(g, len(ids_), m.position_axes), cache,
                      logits="none")
        finally:
            for h in hooks:
                h.remove()
        ours = real(st, prefix, vis, ids_, g)
        got[tuple(ids_)] = (ours, [weights[l][0].double().mean(dim=(0, 1))[prefix + vis[l]]
                                   for l in range(len(ours))])
        return ours

    store.method.guidance_attention = guidance
    seen = capture(store)
    per = m.frames_per_item
    frames = video(m, 3 * per, seed=3)
    feed(s, frames[:per], per)  # one item of 4 tokens: below the budget
    assert store.compressions == 0
    feed(s, frames[per:], 2 * per, start=per)  # 12 visual slots > 7
    assert store.compressions == 1
    assert len(got) == 2  # the mixed (middle) and global (deep) prompts
    for ours, ref in got.values():
        for a, b in zip(ours, ref):
            assert torch.allclose(a, b, atol=1e-10)
    # each layer keeps TopK of the reference attention of its prompt (ties to the later slot)
    _, table, _ = seen[0]
    prompts = store.method.prompt_ids
    for l, rule in enumerate(store.method.rules(len(store.cache.layers))):
        ref = got[tuple(prompts[PROMPT_OF[rule.kind]])][1][l]
        vis = table.visual()[l, 0].nonzero().squeeze(1)
        chosen = stable_topk(minmax(ref, 1e-6), M)
        want = [ids(table, l)[int(vis[i])] for i in chosen]
        assert [key for key, v in zip(ids(store.table, l), store.table.visual()[l, 0].tolist()) if v] == want


def test_budget_reached_exactly_does_not_compress():
    arch = QWEN25
    m = model(arch)
    s = budget_session(arch, hermes(8))
    feed(s, video(m, 4, seed=5), 4)  # 2 items of 4 tokens: T = |M|
    assert s.memory.compressions == 0 and s.memory.visual_count() == 8
    feed(s, video(m, 2, seed=6), 2, start=4)
    assert s.memory.compressions == 1 and s.memory.visual_count() == 8


def test_chunk_frames_checks_once_per_chunk_and_equals_feeding_the_chunk_at_once():
    """``chunk_frames=8`` with one temporal patch per call (Qwen: 2 frames) checks the budget
    after every 4th call only, and then keeps what a session fed the same 8 frames in one
    call keeps (the same slots in every layer; caches equal to rounding)."""
    arch = QWEN25
    m = model(arch)
    frames = video(m, 24, seed=11)
    chunked, whole = budget_session(arch, hermes(12, chunk_frames=8)), budget_session(arch, hermes(12))
    for k in range(0, 24, 8):
        for j in range(k, k + 8, 2):
            before = chunked.memory.compressions
            feed(chunked, frames[j:j + 2], 2, start=j)
            if j + 2 < k + 8:
                assert chunked.memory.compressions == before and chunked.memory.unchecked_frames == j + 2 - k
        feed(whole, frames[k:k + 8], 8, start=k)
        a, b = chunked.memory, whole.memory
        assert a.compressions == b.compressions and a.unchecked_frames == 0
        for name in ("item", "raster", "pos"):
            assert torch.equal(getattr(a.table, name), getattr(b.table, name)), (k, name)
        for la, lb in zip(a.cache.layers, b.cache.layers):
            assert torch.allclose(la.keys, lb.keys, atol=1e-9) and torch.allclose(la.values, lb.values, atol=1e-9)
    assert whole.memory.compressions >= 2
    assert torch.allclose(chunked.question_logits(Q), whole.question_logits(Q), atol=1e-9)


def test_chunk_frames_settings():
    from streampress.spec import memory_policy, memory_text, parse_memory

    for bad in [dict(chunk_frames=0), dict(chunk_frames=2.5), dict(chunk_frames=True)]:
        with pytest.raises(ValueError, match="chunk_frames must be None or an int >= 1"):
            hermes(8, **bad)
    with pytest.raises(ValueError, match="chunk_frames is HERMES's"):
        BudgetMemory("infinipot_v", budget=64, chunk_frames=16)
    spec = parse_memory("hermes:budget=4000,chunk_frames=16")
    assert spec == {"name": "budget", "method": "hermes", "budget": 4000, "chunk_frames": 16}
    assert memory_text(spec) == "hermes:budget=4000,chunk_frames=16"
    assert memory_policy(spec) == BudgetMemory("hermes", budget=4000, chunk_frames=16)
    for bad, why in [("hermes:budget=40,chunk_frames=0", "chunk_frames must be an integer >= 1"),
                     ("infinipot:budget=40,chunk_frames=16", "unknown key 'chunk_frames'")]:
        with pytest.raises(ValueError, match=why):
            parse_memory(bad)
