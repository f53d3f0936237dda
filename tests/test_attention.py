"""Attention blocks: python -m pytest tests/test_attention.py"""

import math

import torch

from attention import (AxialAttention, KVCache, MultiHeadAttention, attention, causal_mask,
                       rotary_tables, rotate)


def naive_attention(mha, x):
    """Multi-head self-attention written out with matmul and softmax, over x (N, L, C)."""
    N, L, C = x.shape
    nh, d = mha.n_head, mha.d_k
    q = (x @ mha.w_qs.weight.t()).view(N, L, nh, d).transpose(1, 2)
    k = (x @ mha.w_ks.weight.t()).view(N, L, nh, d).transpose(1, 2)
    v = (x @ mha.w_vs.weight.t()).view(N, L, nh, d).transpose(1, 2)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    a = (w @ v).transpose(1, 2).reshape(N, L, nh * d)
    return a @ mha.fc.weight.t() + mha.fc.bias


def test_multihead_matches_naive_and_mask():
    torch.manual_seed(0)
    mha = MultiHeadAttention(12, 12, n_head=3)
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(mha(x), naive_attention(mha, x), atol=1e-5, rtol=1e-5)
    # A causal mask: the first output only sees the first input, so changing later inputs leaves it.
    y = x.clone()
    y[:, 1:] += 1.0
    first = lambda v: mha(v, mask=causal_mask(5))[:, 0]
    assert torch.allclose(first(x), first(y), atol=1e-6)
    assert not torch.allclose(mha(x)[:, 0], mha(y)[:, 0], atol=1e-3)


def test_the_formula_masks_and_drops_what_it_should():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 4, generator=g) for _ in range(3))
    # Query i under the causal mask is the softmax over keys 0..i alone.
    out = attention(q, k, v, causal_mask(6))
    for i in (0, 3, 5):
        w = (q[:, :, i:i + 1] @ k[:, :, :i + 1].transpose(-1, -2) / 2.0).softmax(-1)   # sqrt(4) = 2
        torch.testing.assert_close(out[:, :, i:i + 1], w @ v[:, :, :i + 1])
    # Dropout zeroes attention weights and rescales the rest: outputs change, the expectation stays.
    torch.manual_seed(0)
    dropped = torch.stack([attention(q, k, v, dropout_p=0.5) for _ in range(2000)]).mean(0)
    torch.testing.assert_close(dropped, attention(q, k, v), atol=0.1, rtol=0)
    assert not torch.equal(attention(q, k, v, dropout_p=0.5), attention(q, k, v))


def test_the_kv_cache_writes_at_positions_and_attention_over_it_sees_the_written_prefix():
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 8, n_head=2)
    x = torch.randn(2, 5, 8)
    full = mha(x, mask=causal_mask(5))
    cache = KVCache(2, 2, 5, 4, 4, torch.float32, "cpu")
    steps = [mha(x[:, i:i + 1], mask=causal_mask(5)[i:i + 1], cache=cache, pos=torch.tensor([i]))
             for i in range(5)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-6, rtol=1e-5)
    k, _ = mha.keys_values(x)
    torch.testing.assert_close(cache.k, k)              # every position written where it belongs


def test_axial_attention_is_sum_of_three_axis_attentions():
    torch.manual_seed(0)
    B, T, H, W, C = 2, 3, 4, 5, 8
    axial = AxialAttention(C, n_head=2)
    x = torch.randn(B, T, H, W, C)
    out = axial(x)
    assert out.shape == (B, T, H, W, C)
    # Along W: every (b, t, h) row is its own sequence.
    ref_w = naive_attention(axial.attn_w, x.reshape(B * T * H, W, C)).view(B, T, H, W, C)
    ref_h = naive_attention(axial.attn_h, x.permute(0, 1, 3, 2, 4).reshape(B * T * W, H, C))
    ref_h = ref_h.view(B, T, W, H, C).permute(0, 1, 3, 2, 4)
    ref_t = naive_attention(axial.attn_t, x.permute(0, 2, 3, 1, 4).reshape(B * H * W, T, C))
    ref_t = ref_t.view(B, H, W, T, C).permute(0, 3, 1, 2, 4)
    torch.testing.assert_close(out, ref_w + ref_h + ref_t, atol=1e-5, rtol=1e-5)


def test_axial_attention_does_not_mix_across_other_axes():
    """Changing one position only changes outputs sharing a row, column or time line with it."""
    torch.manual_seed(0)
    axial = AxialAttention(8, n_head=2)
    x = torch.randn(1, 3, 4, 5, 8)
    y = x.clone()
    y[0, 1, 2, 3] += 1.0
    changed = (axial(x) - axial(y)).abs().amax(-1)[0] > 1e-6     # (T, H, W)
    t, h, w = torch.meshgrid(torch.arange(3), torch.arange(4), torch.arange(5), indexing="ij")
    shares_a_line = ((h == 2) & (w == 3)) | ((t == 1) & (w == 3)) | ((t == 1) & (h == 2))
    assert torch.equal(changed, shares_a_line)


def test_rotary_scores_depend_on_the_offset_only_and_keep_lengths():
    # 14 // 2 // 3 = 2 pairs per axis, and 2 channels left unrotated.
    shape, hs = (3, 4, 5), 14
    cos, sin = rotary_tables(shape, hs)
    assert cos.shape == sin.shape == (60, 12)                  # one column per rotated channel
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(hs, generator=g), torch.randn(hs, generator=g)
    flat = lambda t, h, w: (t * 4 + h) * 5 + w
    at = lambda x, p: rotate(x.view(1, hs), cos[p:p + 1], sin[p:p + 1])[0]
    score = lambda a, b: float(at(q, flat(*a)) @ at(k, flat(*b)))
    # The same offset (1, 2, -1) at two places of the grid: the same score; another offset: another.
    assert abs(score((1, 3, 2), (0, 1, 3)) - score((2, 2, 1), (1, 0, 2))) < 1e-5
    assert abs(score((1, 3, 2), (0, 1, 3)) - score((1, 3, 2), (0, 1, 2))) > 1e-3
    # A rotation: lengths are kept, and the channels past the rotated pairs are untouched.
    r = at(q, 37)
    torch.testing.assert_close(r.norm(), q.norm())
    assert torch.equal(r[12:], q[12:])
    # Pair j, channels (2j, 2j + 1) = (a, b), turns by angle j: (a cos - b sin, b cos + a sin), the
    # angle of 37's coordinates (1, 3, 2): pairs 0-1 along t, 2-3 along h, 4-5 along w, with
    # frequencies 10^(-j/2).
    angles = torch.tensor([1.0, 10 ** -0.5, 3.0, 3 * 10 ** -0.5, 2.0, 2 * 10 ** -0.5])
    c, s = angles.cos(), angles.sin()                          # (6,) each
    assert torch.equal(cos[37, 0::2], cos[37, 1::2]) and torch.equal(sin[37, 0::2], -sin[37, 1::2])
    torch.testing.assert_close(r[0:12:2], q[0:12:2] * c - q[1:12:2] * s)
    torch.testing.assert_close(r[1:12:2], q[1:12:2] * c + q[0:12:2] * s)
    # Position 0 is not rotated at all.
    assert torch.equal(at(q, 0), q)
