"""STC-Cacher block math on hand-made tensors: selection, similarity, attention patterns."""

from __future__ import annotations

import pytest
import torch

from streampress.cacher.core import (
    AttentionPattern,
    apply_rope,
    dense_attention,
    key_similarity,
    select_tokens,
    selective_attention,
)
from streampress.cacher.state import CacherState


def test_key_similarity_over_all_heads():
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]]])  # [1, T=2, H=2, d=2]
    ref = torch.tensor([[[[1.0, 0.0], [0.0, -1.0]], [[2.0, 2.0], [2.0, 2.0]]]])
    sim = key_similarity(k, ref)
    torch.testing.assert_close(sim, torch.tensor([[0.0, 1.0]]))  # (1 - 1) / 2 and parallel


def test_select_tokens_lowest_ascending():
    sim = torch.tensor([[0.9, 0.1, 0.5, -0.3, 0.8], [0.0, 0.2, 0.4, 0.6, 0.8]])
    assert select_tokens(sim, 2).tolist() == [[1, 3], [0, 1]]
    assert select_tokens(sim, 3).tolist() == [[1, 2, 3], [0, 1, 2]]
    assert select_tokens(sim, 9).tolist() == [[0, 1, 2, 3, 4]] * 2


def test_pattern_kinds():
    assert AttentionPattern.from_lengths([12], torch.device("cpu")).kind == "full"
    p = AttentionPattern.from_lengths([4, 4, 4], torch.device("cpu"))
    assert (p.kind, p.window) == ("windows", 4)
    p = AttentionPattern.from_lengths([4, 2, 3], torch.device("cpu"))
    assert p.kind == "segments" and p.seg_ids.tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 2]


def _literal(q, k, v, allowed, scale):
    """softmax(q k^T * scale) v with a [T, T] allowed mask, per item and head, by einsum."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    p = s.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v).flatten(-2)


@pytest.mark.parametrize("lengths", [[12], [4, 4, 4], [5, 4, 3]])
def test_dense_and_selective_attention_match_literal(lengths):
    g = torch.Generator().manual_seed(0)
    b, t, h, d = 3, sum(lengths), 2, 4
    q, k, v = (torch.randn(b, t, h, d, generator=g) for _ in range(3))
    pat = AttentionPattern.from_lengths(lengths, torch.device("cpu"))
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = seg[:, None] == seg[None, :]
    full = _literal(q, k, v, allowed, 0.3)
    torch.testing.assert_close(dense_attention(q, k, v, pat, 0.3), full)
    idx = torch.tensor([[0, 1, 2, 3], [2, 5, 7, 11], [0, 4, 8, 9]])  # window 0 fullest in item 0
    q_sel = torch.stack([q[i, idx[i]] for i in range(b)])
    expect = torch.stack([full[i, idx[i]] for i in range(b)])
    for pad in (False, True):
        torch.testing.assert_close(selective_attention(q_sel, k, v, idx, pat, 0.3, pad_to_window=pad), expect)


def test_state_buffer_is_reused():
    s = CacherState()
    a = s.buffer("x", (4, 5), torch.float32, torch.device("cpu"))
    b = s.buffer("x", (2, 3), torch.float32, torch.device("cpu"))
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and b.shape == (2, 3)
    c = s.buffer("x", (10, 10), torch.float32, torch.device("cpu"))
    assert c.shape == (10, 10)
    s.reset()
    assert not s.has_reference and s.stats.items == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_the_qwen_encoders_rope(dtype):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 12, 4, 16, generator=g).to(dtype) for _ in range(2))
    freqs = torch.randn(12, 8, generator=g)
    emb = torch.cat([freqs, 0.5 * freqs], dim=-1)  # halves differ: checks each half's table is used
    cos, sin = emb.cos(), emb.sin()
    q_hf, k_hf = apply_rotary_pos_emb_vision(q, k, cos, sin)
    atol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(apply_rope(q, cos, sin), q_hf, atol=atol, rtol=0)
    torch.testing.assert_close(apply_rope(k, cos, sin), k_hf, atol=atol, rtol=0)
    assert apply_rope(q, cos, sin).dtype == dtype
