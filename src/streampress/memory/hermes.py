"""HERMES (KV_MEMORY.md section 3): the KV cache as a hierarchical memory, per layer.

After a chunk brings a layer's visual slots ``T`` above the budget ``|M|``, every layer
scores its visual slots (all KV heads share one kept set):

- layers are split by depth (``l_s = int(0.1 L)``, ``l_d = int(0.7 L)``): shallow
  (recency only), middle (a blend, ``omega = 0.75 - 0.6 pi``, or ``1 - 0.9 pi`` with
  ``schedule="code"``), deep (guidance attention only); forgetting rate ``k`` 20 /
  ``20 - 19.5 pi`` / 0 on the normalized cache distance ``(T-1-i)/(T-1)``;
- attention: a fixed guidance prompt (local / mixed / global for shallow / middle / deep)
  runs on the cache as a pseudo-query; per layer its real post-RoPE queries (captured
  with a pre-hook: the layer's own projection, q-norm included) attend over the cache
  (causal among the prompt tokens, softmax in float32 or wider); the score of a slot is
  the mean over query heads and prompt tokens; the prompt's keys and values are removed
  again (the cache is truncated in a ``finally``);
- min-max normalization (eps 1e-6), ``S = (1 - omega) A + omega R``, smoothing from the
  last layer down ``S~_l = (1 - lambda_l) S_l + lambda_l S~_{l+1}`` (slots matched by
  index), then ``TopK(S~, |M|)`` (``|M| - 1`` in deep layers) with ties to the later slot;
- deep layers fold the evicted slots into one summary token: the fp32 mean of their
  values per head, and the mean of their keys each turned to the summary position ``p*``
  (:func:`.slots.rotate` by ``p* - pos``, the model's own rotary module).

Session adaptations (decisions): one global position counter; ``p*`` is the layer's
largest kept position + 1 (1-D) or the text-style triple ``(m, m, m)`` with ``m`` the
largest coordinate of any kept slot + 1 (M-RoPE); the store's ``position_floor`` then
moves the session's next position past it, so no two live tokens share a position. The
trigger counts visual slots (not the prefix). Guidance prompts use no conversation
history: a question leaves no trace (the session's contract), so compressions never
depend on questions. Position re-indexing (``reindex``: ``"lazy"``, the streaming default,
compacts once positions pass the model's limit - 1024; ``"eager"`` at every compression;
``"off"``) is the store's (:meth:`.budget.BudgetStore.after_add`).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .base import _layers
from .slots import Plan, SlotTable, kept_text, minmax, rotary_delta, rotate, stable_topk, visual_slots

__all__ = ["Hermes", "LayerRule", "layer_schedule", "guidance_prompts", "hermes_scores", "smooth",
           "LOCAL_PROMPT", "GLOBAL_PROMPT"]

LOCAL_PROMPT = ("Describe the current scene in detail, focusing on specific objects, fine-grained actions, "
                "and spatial relationships.")
GLOBAL_PROMPT = ("Summarize the video narrative, identifying main characters, key events, timeline changes, "
                 "and the overall theme.")
EPS = 1e-6
PROMPT_OF = {"shallow": "local", "middle": "mixed", "deep": "global"}


@dataclass(frozen=True)
class LayerRule:
    """One layer's group and weights: ``kind`` shallow / middle / deep, recency weight
    ``omega``, forgetting rate ``k``, smoothing ``lam``."""

    kind: str
    omega: float
    k: float
    lam: float


def layer_schedule(num_layers: int, schedule: str = "paper", smoothing: Sequence[float] = (0.1, 0.3, 0.4),
                   omega: float | None = None) -> list[LayerRule]:
    """The rule of every layer (KV_MEMORY.md 3.2): shallow ``l < int(0.1 L)``, middle up to
    ``int(0.7 L)``, deep after; ``omega`` forces one recency weight everywhere."""
    l_s, l_d = int(0.1 * num_layers), int(0.7 * num_layers)
    a, b = (0.75, 0.6) if schedule == "paper" else (1.0, 0.9)
    rules = []
    for l in range(num_layers):
        if l < l_s:
            rule = LayerRule("shallow", 1.0, 20.0, smoothing[0])
        elif l < l_d:
            pi = (l - l_s) / (l_d - l_s)
            rule = LayerRule("middle", a - b * pi, 20.0 - 19.5 * pi, smoothing[1])
        else:
            rule = LayerRule("deep", 0.0, 0.0, smoothing[2])
        rules.append(rule if omega is None else LayerRule(rule.kind, float(omega), rule.k, rule.lam))
    return rules


def guidance_prompts(history: tuple[str, str, Sequence[str] | None] | None = None) -> dict[str, str]:
    """The local / global / mixed guidance prompts (P-HER App. B), optionally with the last
    answered turn ``(question, answer, options)`` (a bare option letter becomes that
    option's text, without its ``X) `` prefix)."""
    local, glob = LOCAL_PROMPT, GLOBAL_PROMPT
    if history is not None:
        q, a, options = history
        m = re.fullmatch(r"\s*\(?([A-Z])[).]?\s*", a)
        if m and options:
            i = ord(m.group(1)) - ord("A")
            if 0 <= i < len(options):
                a = options[i]
        a = re.sub(r"^\s*[A-Z]\)\s+", "", a)
        last = f"Question: {q} Answer: {a}"
        local = f"Find recent details related to: {last}. " + LOCAL_PROMPT
        glob = f"Context summary: {last}. " + GLOBAL_PROMPT
    return {"local": local, "global": glob, "mixed": local + "; " + glob}


def smooth(scores: Sequence[torch.Tensor], lams: Sequence[float]) -> list[torch.Tensor]:
    """Cross-layer smoothing from the last layer down: ``S~_{L-1} = S_{L-1}``,
    ``S~_l = (1 - lam_l) S_l + lam_l S~_{l+1}``."""
    out = [None] * len(scores)
    out[-1] = scores[-1]
    for l in range(len(scores) - 2, -1, -1):
        out[l] = (1 - lams[l]) * scores[l] + lams[l] * out[l + 1]
    return out


def hermes_scores(attention: Sequence[torch.Tensor | None], rules: Sequence[LayerRule], T: int) -> list[torch.Tensor]:
    """Smoothed scores ``S~_l [T]`` from each layer's mean guidance attention ``[T]`` (None
    where ``omega = 1`` ignores it)."""
    device = next((a.device for a in attention if a is not None), torch.device("cpu"))
    i = torch.arange(T, dtype=torch.float64, device=device)
    d = (T - 1 - i) / max(T - 1, 1)
    raw = []
    for a, rule in zip(attention, rules):
        rec = minmax(torch.exp(-rule.k * d), EPS) if rule.k else torch.zeros_like(d)
        s = rule.omega * rec
        if rule.omega < 1:
            s = s + (1 - rule.omega) * minmax(a.to(torch.float64), EPS)
        raw.append(s)
    return smooth(raw, [r.lam for r in rules])


class Hermes:
    """The HERMES method of a :class:`~.budget.BudgetStore`."""

    def __init__(self, policy, adapter):
        self.policy = policy
        self.adapter = adapter
        self.forwards = 0  # guidance forwards run (tests: none at question time)

    @functools.cached_property
    def prompt_ids(self) -> dict[str, list[int]]:
        return {name: self.adapter.tokenize(text) for name, text in guidance_prompts().items()}

    def rules(self, num_layers: int) -> list[LayerRule]:
        p = self.policy
        return layer_schedule(num_layers, p.schedule, p.smoothing, p.omega)

    def plan(self, store, table: SlotTable, prefix: int, max_position: int) -> Plan | None:
        visual = table.visual()
        T = int(visual[0, 0].sum())
        M = self.policy.budget
        if T <= M:
            return None
        layers = _layers(store.cache)
        rules = self.rules(len(layers))
        vis = [visual_slots(table, l)[0] for l in range(len(layers))]  # heads share a layer's slots
        g = max(max_position, (store.position_floor or 0) - 1) + 1
        attention: list[torch.Tensor | None] = [None] * len(layers)
        for name in sorted({PROMPT_OF[r.kind] for r in rules if r.omega < 1}):
            got = self.guidance_attention(store, prefix, vis, self.prompt_ids[name], g)
            for l, r in enumerate(rules):
                if r.omega < 1 and PROMPT_OF[r.kind] == name:
                    attention[l] = got[l]
        scores = hermes_scores(attention, rules, T)
        keep, chosen_of = [], []
        h = table.item.shape[1]
        for l, (rule, s) in enumerate(zip(rules, scores)):
            deep = rule.kind == "deep" and self.policy.summary
            chosen = stable_topk(s, min(M - 1 if deep else M, T)).to(vis[l].device)
            chosen_of.append(chosen)
            keep.append(vis[l][chosen].expand(h, -1))
        text = kept_text(table, keep, ())  # [L, H, V]: wrapper text that stays
        summaries, floor = [], None
        for l, (layer, rule, chosen) in enumerate(zip(layers, rules, chosen_of)):
            if not (rule.kind == "deep" and self.policy.summary):
                summaries.append(None)
                continue
            evicted = torch.ones(T, dtype=torch.bool, device=vis[l].device)
            evicted[chosen] = False
            e_idx = vis[l][evicted]
            pos = table.pos[l, 0].to(torch.int64)  # [P, V]
            kept = torch.cat([keep[l][0], text[l, 0].nonzero().squeeze(1).to(keep[l].device)])
            kept_pos = pos[:, kept]  # the layer's kept slots (text of live items included)
            if pos.shape[0] == 1:
                star = kept_pos.max(dim=1).values + 1  # [1]
            else:  # M-RoPE: the text-style triple (m, m, m) right after the kept slots
                star = (kept_pos.max() + 1).expand(pos.shape[0])
            floor = max(floor or 0, int(star.max()) + 1)
            region = slice(prefix, prefix + table.slots)
            ek = layer.keys[0, :, region][:, e_idx.to(layer.keys.device)]  # [H, E, D]
            ev = layer.values[0, :, region][:, e_idx.to(layer.values.device)]
            cos, sin = rotary_delta(self.adapter, star[:, None] - pos[:, e_idx])
            k_sum = rotate(ek, cos.to(ek.device), sin.to(ek.device)).mean(1)
            v_sum = ev.to(torch.promote_types(ev.dtype, torch.float32)).mean(1)
            summaries.append((k_sum, v_sum, star))
        return Plan(keep, summaries=summaries, position_floor=floor)

    @torch.no_grad()
    def guidance_attention(self, store, prefix: int, vis: Sequence[torch.Tensor], ids: list[int],
                           g: int) -> list[torch.Tensor]:
        """Per layer, the mean over query heads and prompt tokens of the attention the
        prompt ``ids`` at positions from ``g`` pays to each visual slot ``vis[l]``; the
        cache is back to its length afterwards, whatever happens."""
        from ..models.base import text_positions

        adapter, cache = self.adapter, store.cache
        modules = adapter.attention_modules()
        length = store.length()
        queries: dict[int, torch.Tensor] = {}

        def hook(idx, module, args, kwargs):
            if not any(v is cache for v in (*args, *kwargs.values())):
                return None
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            queries[idx] = adapter.query_states(module, hidden)
            return None

        positions = text_positions(g, len(ids), adapter.position_axes)
        handles = []
        try:
            for i, mod in enumerate(modules):
                handles.append(mod.register_forward_pre_hook(functools.partial(hook, i), with_kwargs=True))
            embeds = adapter.embed_text(torch.tensor(ids, dtype=torch.long))
            self.forwards += 1
            adapter.forward(embeds, positions, cache, logits="none")
            for h in handles:
                h.remove()
            handles = []
            cos, sin = adapter.rotary(positions)
            out = []
            layers = _layers(cache)
            for l, (layer, mod) in enumerate(zip(layers, modules)):
                keys = layer.keys[0]  # [H, S + q, D]
                work = torch.promote_types(keys.dtype, torch.float32)
                q = queries[l][0].to(work)  # [Hq, q, D]
                q = rotate(q, cos, sin)
                kv_heads, hq, n, d = keys.shape[0], q.shape[0], q.shape[1], q.shape[2]
                scale = float(getattr(mod, "scaling", d ** -0.5))
                logits = torch.einsum("hgqd,hsd->hgqs", q.view(kv_heads, hq // kv_heads, n, d),
                                      keys.to(work)) * scale
                s = keys.shape[1]
                j = torch.arange(s, device=keys.device)
                visible = j[None, :] <= (s - n + torch.arange(n, device=keys.device))[:, None]  # causal
                probs = torch.softmax(logits.masked_fill(~visible, -math.inf), dim=-1)
                mean = probs.mean(dim=(0, 1, 2))  # [S + q]
                out.append(mean[prefix + vis[l].to(mean.device)])
            return out
        finally:
            for h in handles:
                h.remove()
            store.truncate(length)

