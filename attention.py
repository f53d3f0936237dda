"""Attention building blocks shared by the VQ-VAE and the GPT prior.

VideoGPT (Yan et al., 2021) uses attention in two places:

* Section 3.1: the VQ-VAE's residual blocks end in *axial* attention, three
  independent self-attentions along the time, height and width axes of a
  feature video, summed (Ho et al., 2019, "Axial Attention in Multidimensional
  Transformers").
* Section 3.2: the prior is a GPT whose blocks use causal self-attention over the
  flattened (t, h, w) grid of codes, and cross-attention to conditioning frames.

Everything here runs on `F.scaled_dot_product_attention`, which dispatches to
flash / memory-efficient kernels on CUDA and to a fused math kernel on CPU.

Parameter names (`w_qs`, `w_ks`, `w_vs`, `fc`, `attn_t`, `attn_h`, `attn_w`)
are the original implementation's, so its published state dicts load into
these modules without a translation table.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# Multi-head attention


class MultiHeadAttention(nn.Module):
    """Multi-head attention from `dim_q` queries to `dim_kv` keys/values.

    Queries and keys are projected to `n_head * (dim_q // n_head)` channels and
    values to `n_head * (dim_kv // n_head)`, then concatenated heads go through
    an output projection back to `dim_q`. Keys and values keep their own width
    because the prior's cross-attention reads 240-wide frame features into a
    576-wide stream.
    """

    def __init__(self, dim_q, dim_kv, n_head, n_layer=1, attn_dropout=0.0):
        super().__init__()
        assert dim_q % n_head == 0, f"dim_q={dim_q} is not divisible by n_head={n_head}"
        assert dim_kv % n_head == 0, f"dim_kv={dim_kv} is not divisible by n_head={n_head}"
        self.n_head = n_head
        self.d_k = dim_q // n_head    # per-head width of queries and keys
        self.d_v = dim_kv // n_head   # per-head width of values
        self.attn_dropout = attn_dropout

        # q, k, v projections carry no bias; the output projection does (as the original).
        self.w_qs = nn.Linear(dim_q, n_head * self.d_k, bias=False)
        self.w_ks = nn.Linear(dim_kv, n_head * self.d_k, bias=False)
        self.w_vs = nn.Linear(dim_kv, n_head * self.d_v, bias=False)
        self.fc = nn.Linear(n_head * self.d_v, dim_q, bias=True)
        self.init_weights(dim_q, dim_kv, n_layer)

    @torch.no_grad()
    def init_weights(self, dim_q, dim_kv, n_layer):
        """The original's scheme, all normal with zero mean:

        | parameter  | std                      | why                                  |
        | ---------- | ------------------------ | ------------------------------------ |
        | w_qs       | 1 / sqrt(dim_q)          | unit-variance logits at init         |
        | w_ks, w_vs | 1 / sqrt(dim_kv)         | same, from the key/value side        |
        | fc.weight  | 1 / sqrt(dim_q * n_layer)| residual branch shrinks with depth   |
        | fc.bias    | PyTorch's default uniform| left as nn.Linear makes it           |
        """
        self.w_qs.weight.normal_(std=1.0 / math.sqrt(dim_q))
        self.w_ks.weight.normal_(std=1.0 / math.sqrt(dim_kv))
        self.w_vs.weight.normal_(std=1.0 / math.sqrt(dim_kv))
        self.fc.weight.normal_(std=1.0 / math.sqrt(dim_q * n_layer))

    def split_heads(self, x, d):
        """(B, L, n_head * d) -> (B, n_head, L, d)"""
        B, L, _ = x.shape
        return x.view(B, L, self.n_head, d).transpose(1, 2)  # (B, nh, L, d)

    def merge_heads(self, x):
        """(B, n_head, L, d) -> (B, L, n_head * d)"""
        B, _, L, _ = x.shape
        return x.transpose(1, 2).reshape(B, L, -1)  # (B, L, nh*d)

    def forward(self, x, context=None, mask=None, is_causal=False):
        """Attend from `x` (B, Lq, dim_q) to `context` (B, Lk, dim_kv), or to `x` itself.

        `mask` is a boolean (Lq, Lk) or broadcastable tensor, True where a query
        may look; `is_causal` is the lower-triangular special case that SDPA
        can run without materialising a mask.
        """
        context = x if context is None else context
        # Project and split into heads.
        q = self.split_heads(self.w_qs(x), self.d_k)        # (B, nh, Lq, hs)
        k = self.split_heads(self.w_ks(context), self.d_k)  # (B, nh, Lk, hs)
        v = self.split_heads(self.w_vs(context), self.d_v)  # (B, nh, Lk, hv)
        # Softmax(q k^T / sqrt(hs)) v, dropout on the attention weights while training.
        dropout_p = self.attn_dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                           is_causal=is_causal)  # (B, nh, Lq, hv)
        # Concatenate heads and mix them back to dim_q.
        return self.fc(self.merge_heads(a))  # (B, Lq, dim_q)


# -----------------------------------------------------------------------------
# Axial attention (VQ-VAE residual blocks)


class AxialAttention(nn.Module):
    """Three independent self-attentions along T, H and W of a (B, T, H, W, C) tensor, summed.

    Attending along one axis treats every position of the other two axes as a
    separate sequence, so the cost is O(THW * (T + H + W)) instead of the
    O((THW)^2) of full attention over the video.
    """

    def __init__(self, n_hiddens, n_head):
        super().__init__()
        # One attention per axis; the names (and so the state-dict keys) are the original's.
        self.attn_w = MultiHeadAttention(n_hiddens, n_hiddens, n_head)
        self.attn_h = MultiHeadAttention(n_hiddens, n_hiddens, n_head)
        self.attn_t = MultiHeadAttention(n_hiddens, n_hiddens, n_head)

    @staticmethod
    def along(attn, x, axis):
        """Self-attention of `attn` along `axis` (1=T, 2=H, 3=W) of x (B, T, H, W, C)."""
        # Move the attended axis next to the channels and fold the rest into the batch.
        xa = x.movedim(axis, 3)                   # (B, *other two axes, L, C)
        shape = xa.shape
        xa = xa.reshape(-1, shape[3], shape[4])   # (B*other, L, C)
        out = attn(xa).view(shape)                # (B, *other two axes, L, C)
        return out.movedim(3, axis)               # (B, T, H, W, C)

    def forward(self, x):
        assert x.dim() == 5, f"AxialAttention expects (B, T, H, W, C), got shape {tuple(x.shape)}"
        # The original sums in the order w, h, t; float addition is not associative,
        # so keep that order to match it bit for bit.
        return (self.along(self.attn_w, x, 3)
                + self.along(self.attn_h, x, 2)
                + self.along(self.attn_t, x, 1))  # (B, T, H, W, C)
