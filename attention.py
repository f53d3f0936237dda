"""Attention, the mechanism both halves of VideoGPT (Yan et al., 2021) are built on.

The VQ-VAE uses axial attention (Section 3.1; Ho et al., 2019). The prior uses causal
self-attention over the (t, h, w) grid of codes, and cross-attention to the frames it is
conditioned on (Section 3.2).

Read in this order: the formula, multi-head attention, axial attention, the prior's position
embeddings, its masks (causal, and the strided sparse pattern of the paper's code), and the
key/value cache that makes drawing one code cheap. Rotary embeddings, which the paper does not
have, sit in a section of their own. A faster kernel with the same numbers comes in as one
argument, `MultiHeadAttention.attend` (fast.py does that).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# The formula, and multi-head attention


def attention(q, k, v, mask=None, dropout_p=0.0):
    """softmax(q k^T / sqrt(hs)) v.

    The queries are (B, nh, Lq, hs), the keys (B, nh, Lk, hs) and the values (B, nh, Lk, hv).
    `mask` (Lq, Lk) is True where a query may look. `dropout_p` is the share of attention weights
    dropped while training.
    """
    # The scale goes on the queries (Lq x hs numbers) rather than on the scores (Lq x Lk numbers),
    # which saves one pass over the larger tensor.
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))  # (B, nh, Lq, Lk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))                 # (B, nh, Lq, Lk)
    weights = scores.softmax(dim=-1)                                      # (B, nh, Lq, Lk)
    if dropout_p:
        weights = F.dropout(weights, p=dropout_p)
    return torch.matmul(weights, v)                                       # (B, nh, Lq, hv)


class MultiHeadAttention(nn.Module):
    """Multi-head attention from a `dim_q`-wide stream to a `dim_kv`-wide context.

    The values keep the context's width per head. That is how the prior's cross-attention reads
    240-wide frame features into its 576-wide stream.
    """

    def __init__(self, dim_q, dim_kv, n_head, n_layer=1, attn_dropout=0.0):
        super().__init__()
        assert dim_q % n_head == 0 and dim_kv % n_head == 0, (
            f"n_head={n_head} must divide dim_q={dim_q} and dim_kv={dim_kv}")
        self.n_head = n_head
        self.d_k = dim_q // n_head    # the width of a head's queries and keys
        self.d_v = dim_kv // n_head   # the width of a head's values
        self.attn_dropout = attn_dropout
        # The function that applies the formula; fast.py hands in faster ones.
        self.attend = attention
        # The q, k and v projections carry no bias; the output projection does.
        self.w_qs = nn.Linear(dim_q, n_head * self.d_k, bias=False)
        self.w_ks = nn.Linear(dim_kv, n_head * self.d_k, bias=False)
        self.w_vs = nn.Linear(dim_kv, n_head * self.d_v, bias=False)
        self.fc = nn.Linear(n_head * self.d_v, dim_q, bias=True)
        self.init_weights(dim_q, dim_kv, n_layer)

    @torch.no_grad()
    def init_weights(self, dim_q, dim_kv, n_layer):
        """The paper's code's scheme, every weight normal with zero mean:
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

        `mask` (Lq, Lk) is True where a query may look. `kv` holds keys and values computed earlier.
        With a `cache`, the new keys and values are written at positions `pos` (Lq,), and the
        queries attend over the whole buffer. `rotary` is the (cos, sin) of the queries' positions
        (see `rotary_tables` below).
        """
        q = self.split_heads(self.w_qs(x), self.d_k)       # (B, nh, Lq, hs)
        # The keys and values are given, or computed from the context (or from x itself).
        k, v = kv if kv is not None else self.keys_values(x if context is None else context)
        if rotary is not None:
            # Self-attention: the keys sit at the queries' positions.
            q, k = rotate(q, *rotary), rotate(k, *rotary)
        if cache is not None:
            k, v = cache.update(pos, k, v)                 # (B, nh, L, hs), (B, nh, L, hv)
        # softmax(q k^T / sqrt(hs)) v, with dropout on the attention weights while training.
        dropout_p = self.attn_dropout if self.training else 0.0
        a = self.attend(q, k, v, mask, dropout_p)          # (B, nh, Lq, hv)
        # Concatenate the heads and mix them back to dim_q.
        return self.fc(self.merge_heads(a))                # (B, Lq, dim_q)


# -----------------------------------------------------------------------------
# Axial attention (the VQ-VAE's residual blocks)


class AxialAttention(nn.Module):
    """Three self-attentions of a (B, T, H, W, C) tensor, along T, along H and along W, summed.

    Along one axis, each position of the other two axes is a sequence of its own. That costs
    O(THW * (T + H + W)) instead of full attention's O((THW)^2).
    """

    def __init__(self, n_hiddens, n_head):
        super().__init__()
        # One attention per axis.
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
        # For exactness: the order w, h, t of the paper's code (a float sum depends on its order).
        return (self.along(self.attn_w, x, 3)
                + self.along(self.attn_h, x, 2)
                + self.along(self.attn_t, x, 1))  # (B, T, H, W, C)


# -----------------------------------------------------------------------------
# Position embeddings of the prior: a learned table per axis


class BroadcastPosEmbed(nn.Module):
    """Learned position embeddings for a (d_0, ..., d_{n-1}) grid, one small table per axis.

    Table i is (d_i, dim / n). Position (i_0, i_1, ...) is row i_0 of table 0, row i_1 of table 1,
    and so on, concatenated. A 4x32x32 grid needs 4 + 32 + 32 rows instead of 4096.
    """

    def __init__(self, shape, dim):
        super().__init__()
        self.shape, self.dim = tuple(shape), dim
        n = len(self.shape)
        assert dim % n == 0, f"dim={dim} is not divisible by the {n} axes of {self.shape}"
        self.emb = nn.ParameterDict({f"d_{i}": nn.Parameter(torch.randn(s, dim // n) * 0.01)
                                     for i, s in enumerate(self.shape)})

    def table(self):
        """All positions' embeddings in raster order, (prod(shape), dim)."""
        n = len(self.shape)
        parts = []
        for i, s in enumerate(self.shape):
            view = [1] * n + [-1]
            view[i] = s
            e = self.emb[f"d_{i}"].view(view)                  # (1, .., d_i, .., 1, dim/n)
            parts.append(e.expand(*self.shape, -1))             # (*shape, dim/n)
        return torch.cat(parts, dim=-1).view(-1, self.dim)     # (L, dim)

    def forward(self, x, pos=None):
        """Add the embeddings to x (B, L, dim), or to x (B, n, dim) at flat positions pos (n,)."""
        table = self.table()
        return x + (table if pos is None else table[pos]).to(x.dtype)


# -----------------------------------------------------------------------------
# Beyond the paper: rotary embeddings


def rotary_tables(shape, head_dim, base=10.0):
    """The cos and sin tables (prod(shape), 2P) of rotary embeddings (Su et al., 2021) over a grid.

    The paper does not use them; they are an option of the prior (GPTConfig.rope). After rotation,
    the dot product of a query and a key depends only on their offset, so "the same place, one
    latent step back" means one thing everywhere in the grid. Each axis gets
    P = head_dim // 2 // n_axes pairs of channels, and any channels left over are not rotated.
    Pair j, in columns 2j and 2j + 1, turns by the angle position * base^(-j / P).
    """
    pairs = head_dim // 2 // len(shape)
    freqs = base ** (-torch.arange(pairs, dtype=torch.float32) / pairs)          # (pairs,)
    coords = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    # P = n_axes * pairs angles per position.
    angles = torch.cat([c.reshape(-1, 1) * freqs for c in coords], dim=-1)      # (L, P)
    cos = angles.cos().repeat_interleave(2, dim=-1)                              # (L, 2P)
    sin = torch.stack([-angles.sin(), angles.sin()], dim=-1).flatten(-2)         # (L, 2P)
    return cos, sin


def rotate(x, cos, sin):
    """Rotate the channel pairs (2i, 2i + 1) of x (..., n, hs) by the angles of `rotary_tables`.

    `cos` and `sin` are the tables' rows for the n positions, (n, 2P). Channels past 2P are left
    as they are.
    """
    r = cos.shape[-1]                                                            # channels rotated
    # The pair (a, b) turned by an angle is (a cos - b sin, b cos + a sin). That is the pairs times
    # (cos, cos), plus the swapped pairs (b, a) times (-sin, sin): two whole-tensor multiplies.
    pairs = x[..., :r]                                                           # (..., n, 2P)
    swapped = pairs.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)                  # (..., n, 2P)
    turned = pairs * cos.to(x.dtype) + swapped * sin.to(x.dtype)                 # (..., n, 2P)
    return torch.cat([turned, x[..., r:]], dim=-1)                              # (..., n, hs)


# -----------------------------------------------------------------------------
# Masks of the prior: causal, and the strided sparse pattern


def causal_mask(L):
    """(L, L) boolean, True where query i may see key j: j <= i."""
    return torch.ones(L, L, dtype=torch.bool).tril()


def strided_sparse_layout(shape, block=32, num_local_blocks=4):
    """The (L, L) boolean mask of strided block-sparse attention (Child et al., 2019).

    The paper's code offers it beside full attention. The tokens are cut into blocks of `block`,
    laid on a grid (the trailing axes are merged until they hold more than one block). A block
    attends to (a) its `num_local_blocks` predecessors and itself, and (b) for every grid axis but
    the last, the earlier blocks that differ from it only along that axis. Inside, it is causal.
    fast.py skips the tiles that are empty, as the DeepSpeed kernels of the paper's code did.
    """
    L = math.prod(shape)
    assert L % block == 0, (
        f"sparse attention needs the sequence length {L} to be a multiple of block={block}")
    # The block grid: merge trailing axes until they hold more than one block.
    cum, i = 1, len(shape) - 1
    for i in range(len(shape) - 1, -1, -1):
        cum *= shape[i]
        if cum > block:
            break
    assert cum % block == 0, f"latent shape {tuple(shape)} cannot be cut into blocks of {block}"
    grid = (*shape[:i], cum // block)
    n_blocks = L // block
    blocks = torch.arange(n_blocks)
    coords = torch.stack(torch.unravel_index(blocks, grid), dim=1)             # (n_blocks, n_axes)
    row = torch.arange(n_blocks).view(-1, 1)                                   # (n_blocks, 1)
    col = torch.arange(n_blocks).view(1, -1)                                   # (1, n_blocks)
    # (a) Local: the previous num_local_blocks blocks, and the block itself.
    local = (col >= row - num_local_blocks) & (col <= row)
    # (b) Strided: the same block coordinates except along one axis (not the last one).
    strided = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
    for d in range(len(grid) - 1):
        others = [a for a in range(len(grid)) if a != d]
        same = (coords[:, None, others] == coords[None, :, others]).all(-1)   # (n_blocks, n_blocks)
        strided |= same & (coords[None, :, d] <= coords[:, None, d])
    layout = local | strided                                                 # (n_blocks, n_blocks)
    mask = layout.repeat_interleave(block, 0).repeat_interleave(block, 1)    # (L, L)
    return mask & causal_mask(L)


# -----------------------------------------------------------------------------
# The key/value cache for sampling


class KVCache:
    """One layer's keys and values for every position, allocated once.

    Without it, each new code would compute again the keys and values of all the codes before it.
    With it, a step writes the newest code's keys and values at its position and attends over the
    whole buffer (the mask hides the positions not yet written), allocating nothing.
    """

    def __init__(self, batch_size, n_head, length, d_k, d_v, dtype, device):
        self.k = torch.zeros(batch_size, n_head, length, d_k, dtype=dtype, device=device)
        self.v = torch.zeros(batch_size, n_head, length, d_v, dtype=dtype, device=device)

    def update(self, pos, k, v):
        """Write k (B, nh, n, hs) and v (B, nh, n, hv) at positions pos (n,); the whole buffers."""
        self.k.index_copy_(2, pos, k.to(self.k.dtype))
        self.v.index_copy_(2, pos, v.to(self.v.dtype))
        return self.k, self.v                                  # (B, nh, L, hs), (B, nh, L, hv)
