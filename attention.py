"""Attention, the mechanism both halves of VideoGPT (Yan et al., 2021) are built on: the VQ-VAE's axial
attention (Section 3.1, Ho et al., 2019) and the prior's causal self-attention over the (t, h, w) grid of
codes and cross-attention to conditioning frames (Section 3.2).

Read in this order: the formula, multi-head attention, axial attention, the prior's position embeddings,
its masks (causal, and the original's strided sparse pattern), and the key/value cache that makes sampling
one code cheap. A faster kernel with the same numbers comes in as one argument, `MultiHeadAttention.attend`
(fast.py). Parameter names are the original implementation's, so its state dicts load as they are.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# The formula, and multi-head attention


def attention(q, k, v, mask=None, dropout_p=0.0):
    """softmax(q k^T / sqrt(hs)) v for queries (B, nh, Lq, hs), keys (B, nh, Lk, hs), values (B, nh, Lk, hv);
    `mask` (Lq, Lk) is True where a query may look; `dropout_p` drops attention weights (training)."""
    # The scale goes on the queries (Lq x hs numbers) rather than on the (Lq, Lk) scores: one pass less.
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))      # (B, nh, Lq, Lk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))                     # (B, nh, Lq, Lk)
    weights = scores.softmax(dim=-1)                                          # (B, nh, Lq, Lk)
    if dropout_p:
        weights = F.dropout(weights, p=dropout_p)
    return torch.matmul(weights, v)                                           # (B, nh, Lq, hv)


class MultiHeadAttention(nn.Module):
    """Multi-head attention from `dim_q` queries to `dim_kv` keys/values; values keep the key side's width
    per head: the prior's cross-attention reads 240-wide frame features into a 576-wide stream."""

    def __init__(self, dim_q, dim_kv, n_head, n_layer=1, attn_dropout=0.0):
        super().__init__()
        assert dim_q % n_head == 0 and dim_kv % n_head == 0, f"n_head={n_head} must divide dim_q={dim_q} and dim_kv={dim_kv}"
        self.n_head = n_head
        self.d_k = dim_q // n_head    # per-head width of queries and keys
        self.d_v = dim_kv // n_head   # per-head width of values
        self.attn_dropout = attn_dropout
        self.attend = attention       # the function that applies the formula (fast.py hands in faster ones)
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

    def keys_values(self, context):
        """Keys and values of `context` (B, Lk, dim_kv), split into heads."""
        k = self.split_heads(self.w_ks(context), self.d_k)  # (B, nh, Lk, hs)
        v = self.split_heads(self.w_vs(context), self.d_v)  # (B, nh, Lk, hv)
        return k, v

    def forward(self, x, context=None, mask=None, kv=None, cache=None, pos=None, rotary=None):
        """Attend from `x` (B, Lq, dim_q) to `context` (B, Lk, dim_kv), or to `x` itself; `mask` (Lq, Lk) is
        True where a query may look. `kv`: keys and values computed earlier. With `cache` the new keys and
        values are written at positions `pos` (Lq,) and the queries attend over the whole buffer. `rotary`:
        (cos, sin) of the queries' positions (`rotary_tables`)."""
        q = self.split_heads(self.w_qs(x), self.d_k)        # (B, nh, Lq, hs)
        # Keys and values: given, or computed from the context (or from x itself).
        k, v = kv if kv is not None else self.keys_values(x if context is None else context)
        if rotary is not None:
            q, k = rotate(q, *rotary), rotate(k, *rotary)   # self-attention: keys at the queries' positions
        if cache is not None:
            k, v = cache.update(pos, k, v)                  # (B, nh, L, hs), (B, nh, L, hv)
        # Softmax(q k^T / sqrt(hs)) v, dropout on the attention weights while training.
        a = self.attend(q, k, v, mask, self.attn_dropout if self.training else 0.0)   # (B, nh, Lq, hv)
        # Concatenate heads and mix them back to dim_q.
        return self.fc(self.merge_heads(a))                 # (B, Lq, dim_q)


# -----------------------------------------------------------------------------
# Axial attention (the VQ-VAE's residual blocks)


class AxialAttention(nn.Module):
    """Three self-attentions along T, H and W of a (B, T, H, W, C) tensor, summed: each position of the other
    two axes is a separate sequence, O(THW * (T + H + W)) instead of full attention's O((THW)^2)."""

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


# -----------------------------------------------------------------------------
# Position embeddings of the prior: learned per-axis tables, and rotary embeddings


class BroadcastPosEmbed(nn.Module):
    """Learned position embeddings for a (d_0, ..., d_{n-1}) grid, one small table (d_i, dim / n) per axis:
    position (i_0, i_1, ...) is row i_0 of table 0, row i_1 of table 1, ... concatenated. A 4x32x32 grid
    needs 4 + 32 + 32 rows instead of 4096."""

    def __init__(self, shape, dim):
        super().__init__()
        self.shape, self.dim = tuple(shape), dim
        n = len(self.shape)
        assert dim % n == 0, f"dim={dim} is not divisible by the {n} axes of {self.shape}"
        # ParameterDict keys d_0, d_1, ... are the original's.
        self.emb = nn.ParameterDict({f"d_{i}": nn.Parameter(torch.randn(s, dim // n) * 0.01)
                                     for i, s in enumerate(self.shape)})

    def table(self):
        """All positions' embeddings in raster order, (prod(shape), dim)."""
        n = len(self.shape)
        parts = []
        for i, s in enumerate(self.shape):
            view = [1] * n + [-1]
            view[i] = s
            e = self.emb[f"d_{i}"].view(view)                       # (1, .., d_i, .., 1, dim/n)
            parts.append(e.expand(*self.shape, -1))                  # (*shape, dim/n)
        return torch.cat(parts, dim=-1).view(-1, self.dim)          # (L, dim)

    def forward(self, x, pos=None):
        """Add the embeddings to x (B, L, dim), or to x (B, n, dim) at the flat positions pos (n,)."""
        table = self.table()
        return x + (table if pos is None else table[pos]).to(x.dtype)


def rotary_tables(shape, head_dim, base=10.0):
    """cos and sin (prod(shape), 2P) of rotary embeddings (Su et al., 2021) over a grid; not in the paper, an
    option of the prior (GPTConfig.rope). Rotated queries and keys have dot products that depend on their offset
    only: "the same place one latent step back" is one thing everywhere. Each axis gets P = head_dim // 2 //
    n_axes channel pairs (any rest unrotated); pair j turns by position * base^(-j / P), in columns 2j, 2j + 1."""
    pairs = head_dim // 2 // len(shape)
    freqs = base ** (-torch.arange(pairs, dtype=torch.float32) / pairs)                # (pairs,)
    coords = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    angles = torch.cat([c.reshape(-1, 1) * freqs for c in coords], dim=-1)            # (L, P), P = n_axes * pairs
    cos = angles.cos().repeat_interleave(2, dim=-1)                                    # (L, 2P)
    sin = torch.stack([-angles.sin(), angles.sin()], dim=-1).flatten(-2)               # (L, 2P)
    return cos, sin


def rotate(x, cos, sin):
    """Rotate the channel pairs (2i, 2i + 1) of x (..., n, hs) by the angles of `rotary_tables` rows
    cos, sin (n, 2P); channels past 2P are left as they are."""
    r = cos.shape[-1]                                                                  # channels rotated
    # (a, b) turned by the angle is (a cos - b sin, b cos + a sin): the pairs times (cos, cos) plus the
    # swapped pairs (b, a) times (-sin, sin), two whole-tensor multiplies.
    pairs = x[..., :r]                                                                 # (..., n, 2P)
    swapped = pairs.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)                        # (..., n, 2P)
    return torch.cat([pairs * cos.to(x.dtype) + swapped * sin.to(x.dtype), x[..., r:]], dim=-1)   # (..., n, hs)


# -----------------------------------------------------------------------------
# Masks of the prior: causal, and the original's strided sparse pattern


def causal_mask(L):
    """(L, L) boolean, True where query i may see key j: j <= i."""
    return torch.ones(L, L, dtype=torch.bool).tril()


def strided_sparse_layout(shape, block=32, num_local_blocks=4):
    """Boolean (L, L) mask of the original's strided block-sparse attention (Child et al., 2019): blocks of
    `block` tokens on a grid (trailing axes merged until they hold more than one block) attend to (a) their
    `num_local_blocks` predecessors and themselves, (b) for every grid axis but the last, the earlier blocks
    that differ only along that axis; causal inside. fast.py skips the empty tiles, as DeepSpeed's did."""
    L = math.prod(shape)
    assert L % block == 0, f"sparse attention needs the sequence length {L} to be a multiple of block={block}"
    # Block grid: merge trailing axes until they hold more than one block.
    cum, i = 1, len(shape) - 1
    for i in range(len(shape) - 1, -1, -1):
        cum *= shape[i]
        if cum > block:
            break
    assert cum % block == 0, f"latent shape {tuple(shape)} cannot be cut into blocks of {block}"
    grid = (*shape[:i], cum // block)
    n_blocks = L // block
    coords = torch.stack(torch.unravel_index(torch.arange(n_blocks), grid), dim=1)   # (n_blocks, n_axes)
    row, col = torch.arange(n_blocks).view(-1, 1), torch.arange(n_blocks).view(1, -1)   # (n_blocks, 1), (1, n_blocks)
    # (a) local: the previous num_local_blocks blocks and itself.
    local = (col >= row - num_local_blocks) & (col <= row)
    # (b) strided: same block coordinates except along one axis (the last axis excluded).
    strided = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
    for d in range(len(grid) - 1):
        others = [a for a in range(len(grid)) if a != d]
        same = (coords[:, None, others] == coords[None, :, others]).all(-1)          # (n_blocks, n_blocks)
        strided |= same & (coords[None, :, d] <= coords[:, None, d])
    layout = local | strided                                                        # (n_blocks, n_blocks)
    mask = layout.repeat_interleave(block, 0).repeat_interleave(block, 1)           # (L, L)
    return mask & causal_mask(L)


# -----------------------------------------------------------------------------
# The key/value cache for sampling


class KVCache:
    """One layer's keys and values for every position, allocated once. Without it each new code would recompute
    the keys and values of all the codes before it; with it a step writes the newest code's at its position
    and attends over the buffer (the mask hides positions not yet written), reallocating nothing."""

    def __init__(self, batch_size, n_head, length, d_k, d_v, dtype, device):
        self.k = torch.zeros(batch_size, n_head, length, d_k, dtype=dtype, device=device)
        self.v = torch.zeros(batch_size, n_head, length, d_v, dtype=dtype, device=device)

    def update(self, pos, k, v):
        """Write k (B, nh, n, hs) and v (B, nh, n, hv) at positions pos (n,); return the whole buffers."""
        self.k.index_copy_(2, pos, k.to(self.k.dtype))
        self.v.index_copy_(2, pos, v.to(self.v.dtype))
        return self.k, self.v                                  # (B, nh, L, hs), (B, nh, L, hv)
