"""The K/V head expansion torch_model.attention uses where varlen_attn has no enable_gqa (torch 2.11): checked on
the CPU against SDPA's own GQA, since the varlen kernel itself needs CUDA (scripts/cuda_smoke.sh runs it)."""
import pytest
import torch
import torch.nn.functional as F

import torch_model


def _qkv(heads=8, kv=2, seq=16, dim=8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, h, seq, dim, generator=g) for h in (heads, kv, kv)]


def _expanded(q, k, v, expand):
    return F.scaled_dot_product_attention(q, expand(k, q.size(1), 1), expand(v, q.size(1), 1), is_causal=True)


def test_expanded_heads_give_sdpa_gqa():
    q, k, v = _qkv()
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(_expanded(q, k, v, torch_model.expand_kv_heads), want)


def test_tiling_instead_of_repeating_is_caught():
    """A plausible porting mistake: repeat (head h reads h % Hkv) instead of repeat_interleave (h // G)."""
    q, k, v = _qkv()
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def tiled(t, heads, head_dim):
        return t.repeat(*[heads // t.size(head_dim) if d == head_dim else 1 for d in range(t.dim())])
    with pytest.raises(AssertionError):
        torch.testing.assert_close(_expanded(q, k, v, tiled), want)
