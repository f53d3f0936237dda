"""Attention, the one mechanism both halves of VideoGPT are built on.

VideoGPT (Yan et al., 2021) uses attention in two places:

* Section 3.1: the VQ-VAE's residual blocks end in *axial* attention, three
  independent self-attentions along the time, height and width axes of a
  feature video, summed (Ho et al., 2019, "Axial Attention in Multidimensional
  Transformers").
* Section 3.2: the prior is a GPT whose blocks use causal self-attention over the
  flattened (t, h, w) grid of codes, with position embeddings per axis, and
  cross-attention to conditioning frames.

Read in this order: the formula (`attention`), multi-head attention, axial
attention, the prior's position embeddings (learned per-axis tables, and
rotary embeddings as an option), its masks (causal, and the original's strided
sparse pattern), and the key/value cache that makes sampling one code cheap.

Every module here computes softmax(q k^T / sqrt(d)) v with `attention`, written
out. A faster kernel with the same numbers (PyTorch's fused SDPA, FlexAttention
for the sparse pattern) is handed in as one argument, `MultiHeadAttention.attend`;
fast.py chooses and proves them. Parameter names (`w_qs`, `w_ks`, `w_vs`, `fc`,
`attn_t`, `attn_h`, `attn_w`) are the original implementation's, so its
published state dicts load without a translation table. This file imports
nothing from the project.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# The formula


def attention(q, k, v, mask=None, dropout_p=0.0):
    """softmax(q k^T / sqrt(hs)) v for queries (B, nh, Lq, hs), keys (B, nh, Lk, hs), values (B, nh, Lk, hv).

    `mask` (Lq, Lk) is True where a query may look; `dropout_p` drops attention weights (training).
    """
    # The scale goes on the queries (Lq x hs numbers) rather than on the (Lq, Lk) scores: one pass less.
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))      # (B, nh, Lq, Lk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))                     # (B, nh, Lq, Lk)
    weights = scores.softmax(dim=-1)                                          # (B, nh, Lq, Lk)
    if dropout_p:
        weights = F.dropout(weights, p=dropout_p)
    return torch.matmul(weights, v)                                           # (B, nh, Lq, hv)


# -----------------------------------------------------------------------------
# Multi-head attention


class MultiHeadAttention(nn.Module):
    """Multi-head attention from `dim_q` queries to `dim_kv` keys/values.

    Queries and keys are projected to `n_head * (dim_q // n_head)` channels and
    values to `n_head * (dim_kv // n_head)`, then concatenated heads go through
    an output projection back to `dim_q`. Keys and values keep their own width
    because the prior's cross-attention reads 240-wide frame features into a
    576-wide stream. `attend` is the function that applies the formula:
    `attention` here, or a faster kernel with the same numbers (fast.py).
    """

    def __init__(self, dim_q, dim_kv, n_head, n_layer=1, attn_dropout=0.0):
        super().__init__()
        assert dim_q % n_head == 0, f"dim_q={dim_q} is not divisible by n_head={n_head}"
        assert dim_kv % n_head == 0, f"dim_kv={dim_kv} is not divisible by n_head={n_head}"
        self.n_head = n_head
        self.d_k = dim_q // n_head    # per-head width of queries and keys
        self.d_v = dim_kv // n_head   # per-head width of values
        self.attn_dropout = attn_dropout
        self.attend = attention
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
        """Attend from `x` (B, Lq, dim_q) to `context` (B, Lk, dim_kv), or to `x` itself.

        `mask` (Lq, Lk) is True where a query may look. `kv` passes keys and
        values computed earlier (cross-attention to fixed frames while
        sampling). With `cache` (a KVCache) the new keys and values are written
        at positions `pos` (Lq,) and the queries attend over the whole buffer,
        `mask` saying which of its positions are visible. `rotary` (cos, sin)
        of the queries' positions rotates queries and keys (`rotary_tables`).
        """
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


# -----------------------------------------------------------------------------
# Position embeddings of the prior: learned per-axis tables, and rotary embeddings


class BroadcastPosEmbed(nn.Module):
    """Learned position embeddings for a (d_0, ..., d_{n-1}) grid, one small table per axis.

    Table i is (d_i, dim / n); the embedding of position (i_0, ..., i_{n-1}) is
    the concatenation of row i_0 of table 0, row i_1 of table 1, ... So a
    4x32x32 grid needs 4 + 32 + 32 rows instead of 4096.
    """

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
    """cos and sin (prod(shape), 2P) of rotary position embeddings (Su et al., 2021) over a grid,
    one column per rotated channel: pair j's angle in columns 2j and 2j + 1, sin signed (-, +).

    A query and a key rotated by their positions have a dot product that depends on their
    offset only: the prior sees "the same place one latent step back" or "the code to the
    left" directly, not through learned absolute tables. The channel pairs are split evenly
    over the axes (P = head_dim // 2 // n_axes pairs each, any rest left unrotated); along an
    axis, pair j turns by position * base^(-j / P), slow to fast. Not in the paper: an
    option of the prior (GPTConfig.rope), on in the moving-digits preset.
    """
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


def strided_sparse_layout(shape, block=32, num_local_blocks=4, causal=True):
    """Boolean (L, L) mask of the original's strided block-sparse attention (Child et al., 2019).

    The flattened sequence is cut into blocks of `block` tokens, arranged as a
    grid: the trailing axes are merged until they hold more than one block. A
    block row attends to (a) its `num_local_blocks` predecessors and itself,
    and (b) for every block-grid axis but the last, the blocks that differ from
    it only along that axis (earlier ones only, if causal). Inside the diagonal
    block the usual causal triangle applies. The original ran this with
    DeepSpeed's block-sparse kernels; as a dense mask it gives the same
    attention weights on any device (fast.py skips its empty tiles).
    """
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
    # (a) local: the previous num_local_blocks blocks (and, if not causal, the next ones).
    local = (col >= row - num_local_blocks) & (col <= row if causal else col < row + num_local_blocks)
    # (b) strided: same block coordinates except along one axis (the last axis excluded).
    strided = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
    for d in range(len(grid) - 1):
        others = [a for a in range(len(grid)) if a != d]
        same = (coords[:, None, others] == coords[None, :, others]).all(-1)          # (n_blocks, n_blocks)
        strided |= same & (coords[None, :, d] <= coords[:, None, d] if causal else same)
    layout = local | strided                                                        # (n_blocks, n_blocks)
    mask = layout.repeat_interleave(block, 0).repeat_interleave(block, 1)           # (L, L)
    return mask & causal_mask(L) if causal else mask


# -----------------------------------------------------------------------------
# The key/value cache for sampling


class KVCache:
    """One layer's keys and values for every position of the sequence, allocated once.

    Sampling draws one code at a time; without a cache, every new code would
    recompute the keys and values of all the codes before it. With one, a step
    computes the newest code's key and value, writes them at its position, and
    attends over the buffer (the mask hides positions not yet written). Nothing
    is concatenated or reallocated while sampling.
    """

    def __init__(self, batch_size, n_head, length, d_k, d_v, dtype, device):
        self.k = torch.zeros(batch_size, n_head, length, d_k, dtype=dtype, device=device)
        self.v = torch.zeros(batch_size, n_head, length, d_v, dtype=dtype, device=device)

    def update(self, pos, k, v):
        """Write k (B, nh, n, hs) and v (B, nh, n, hv) at positions pos (n,); return the whole buffers."""
        self.k.index_copy_(2, pos, k.to(self.k.dtype))
        self.v.index_copy_(2, pos, v.to(self.v.dtype))
        return self.k, self.v                                  # (B, nh, L, hs), (B, nh, L, hv)
