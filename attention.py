"""Attention building blocks shared by the VQ-VAE and the GPT prior.

VideoGPT (Yan et al., 2021) uses attention in two places:

* Section 3.1: the VQ-VAE's residual blocks end in *axial* attention, three
  independent self-attentions along the time, height and width axes of a
  feature video, summed (Ho et al., 2019, "Axial Attention in Multidimensional
  Transformers").
* Section 3.2: the prior is a GPT whose blocks use causal self-attention over the
  flattened (t, h, w) grid of codes, and cross-attention to conditioning frames.

Attention runs on `F.scaled_dot_product_attention`, which dispatches to
flash / memory-efficient kernels on CUDA and to a fused kernel on CPU;
`explicit_attention` writes the same formula out, for a compiler to fuse and
for short bfloat16 sequences on a CPU, where it is faster (`attend` chooses).
For sampling, `KVCache` holds every layer's keys and values in buffers
allocated once at full length and written at explicit positions, so a
decoding step reads the written prefix (or, with a mask, the whole buffer:
fixed shapes for CUDA graphs). `BroadcastPosEmbed` and `strided_sparse_layout`
are the prior's position embeddings and the block-sparse pattern of its
published checkpoints; `sparse_block_mask` and `flex_attention` run that
pattern tile by tile with FlexAttention; `rotary_tables` and `rotate` are
rotary position embeddings over the latent grid (an option of the prior).

Parameter names (`w_qs`, `w_ks`, `w_vs`, `fc`, `attn_t`, `attn_h`, `attn_w`)
are the original implementation's, so its published state dicts load into
these modules without a translation table.

Not here: the blocks that use these pieces (vqvae.py, gpt.py). This file
imports nothing from the project.
"""

import functools
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

    def keys_values(self, context):
        """Keys and values of `context` (B, Lk, dim_kv), split into heads."""
        k = self.split_heads(self.w_ks(context), self.d_k)  # (B, nh, Lk, hs)
        v = self.split_heads(self.w_vs(context), self.d_v)  # (B, nh, Lk, hv)
        return k, v

    def fused_qkv_weight(self):
        """The q, k, v projections stacked, (3 * n_head * d_k, dim): one matmul instead of three for
        self-attention while sampling, where the weights do not change between steps."""
        assert self.d_k == self.d_v, "fusing q, k and v needs equal widths (self-attention)"
        return torch.cat([self.w_qs.weight, self.w_ks.weight, self.w_vs.weight])

    def fused_qkv(self, x, weight):
        """Queries, keys and values of x (B, L, dim) with the stacked weight of fused_qkv_weight()."""
        B, L, _ = x.shape
        return F.linear(x, weight).view(B, L, 3, self.n_head, self.d_k).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, L, hs)

    def forward(self, x, context=None, mask=None, is_causal=False, kv=None, cache=None, pos=None, block_mask=None,
                rotary=None):
        """Attend from `x` (B, Lq, dim_q) to `context` (B, Lk, dim_kv), or to `x` itself.

        `mask` is a boolean (Lq, Lk) or broadcastable tensor, True where a query
        may look; `is_causal` is the lower-triangular special case that SDPA
        can run without materialising a mask. `kv` passes keys and values
        computed earlier (cross-attention to fixed frames while sampling).
        With `cache` (a KVCache layer) the new keys and values are written at
        positions `pos` (Lq,) and the queries attend over the whole buffer,
        `mask` saying which of its positions are visible. `block_mask` (a
        FlexAttention BlockMask, see `sparse_block_mask`) replaces `mask` for
        block-sparse self-attention: the tiles nobody looks at are skipped.
        `rotary` (cos, sin) of the queries' positions rotates queries and keys
        of self-attention (`rotary_tables`).
        """
        q = self.split_heads(self.w_qs(x), self.d_k)        # (B, nh, Lq, hs)
        # Keys and values: given, computed from the context, or appended to the cache.
        k, v = kv if kv is not None else self.keys_values(x if context is None else context)
        if rotary is not None:
            q, k = rotate(q, *rotary), rotate(k, *rotary)   # self-attention: keys at the queries' positions
        if cache is not None:
            k, v = cache.update(pos, k, v)                  # (B, nh, L, hs), (B, nh, L, hv)
        # Softmax(q k^T / sqrt(hs)) v, dropout on the attention weights while training.
        dropout_p = self.attn_dropout if self.training else 0.0
        if block_mask is not None:
            assert dropout_p == 0.0, "FlexAttention has no attention dropout"
            a = flex_attention(q, k, v, block_mask)                       # (B, nh, Lq, hv)
        else:
            a = attend(q, k, v, mask, is_causal, dropout_p)              # (B, nh, Lq, hv)
        # Concatenate heads and mix them back to dim_q.
        return self.fc(self.merge_heads(a))  # (B, Lq, dim_q)


# On a CPU in bfloat16, PyTorch's fused SDPA kernel costs more than the formula written out
# until about 512 keys (fixed cost per call, bf16 arithmetic): forward + backward of one layer,
# 4 heads of width 30, 4096 tokens a batch, 2 cores: 256 keys 30 ms fused vs 21 ms written out,
# 512 keys 40 vs 34 ms, 1024 keys 50 vs 99 ms. In float32 the fused kernel wins at every length.
# `python bench.py --only attention`.
EXPLICIT_MAX_KEYS = 512


def attend(q, k, v, mask=None, is_causal=False, dropout_p=0.0):
    """softmax(q k^T / sqrt(hs)) v with an optional boolean `mask` (True where visible) or the causal
    triangle, by the faster of two exact routes: `explicit_attention` for short bfloat16 sequences on a
    CPU without dropout, F.scaled_dot_product_attention everywhere else."""
    if (q.device.type == "cpu" and q.dtype == torch.bfloat16 and dropout_p == 0.0
            and k.shape[-2] <= EXPLICIT_MAX_KEYS):
        if is_causal:   # SDPA's causal triangle: query i sees keys 0..i
            mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        return explicit_attention(q, k, v, mask)                                  # (B, nh, Lq, hv)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=is_causal)                    # (B, nh, Lq, hv)


def explicit_attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(hs)) v written out, for (B, nh, Lq, hs) queries, keys (B, nh, Lk, hs) and
    values, `mask` (Lq, Lk) True where visible: what F.scaled_dot_product_attention computes, as
    plain operations a compiler can fuse."""
    # Every pass over the (Lq, Lk) scores costs about as much as a matmul on a CPU, so the scale goes
    # on the queries (Lq x hs numbers) and the mask is one added bias (its backward passes the gradient
    # through untouched) rather than a multiply and a masked fill, each paid forward and backward.
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))      # (B, nh, Lq, Lk)
    if mask is not None:
        scores = scores + torch.zeros(mask.shape, dtype=scores.dtype, device=mask.device).masked_fill(
            ~mask, float("-inf"))                                             # (B, nh, Lq, Lk)
    return torch.matmul(scores.softmax(dim=-1), v)                            # (B, nh, Lq, hv)


# -----------------------------------------------------------------------------
# The key/value cache for sampling


class KVCache:
    """One layer's keys and values for every position of the sequence, allocated once.

    Decoding writes the newest token's key and value at its position and
    attends over the buffers (or their written prefix); nothing is concatenated
    or reallocated while sampling. A plain object, not a module: a compiled
    decoding step reads and writes these tensors as inputs, where a module's
    buffers could be taken for constants.
    """

    def __init__(self, batch_size, n_head, length, d_k, d_v, dtype, device):
        self.k = torch.zeros(batch_size, n_head, length, d_k, dtype=dtype, device=device)
        self.v = torch.zeros(batch_size, n_head, length, d_v, dtype=dtype, device=device)

    def update(self, pos, k, v, length=None):
        """Write k (B, nh, n, hs) and v at positions pos (n,) and return the whole buffers; or, given
        `length` (the newest position + 1), only the written prefix: attention over pos + 1 keys instead
        of all of them, half on average. `length` is a Python int, so torch.compile sees it as a size
        (compiled once for every length), and `pos` a tensor, so writing never specialises on it."""
        self.k.index_copy_(2, pos, k.to(self.k.dtype))
        self.v.index_copy_(2, pos, v.to(self.v.dtype))
        if length is None:
            return self.k, self.v
        return self.k[:, :, :length], self.v[:, :, :length]   # (B, nh, length, hs) each


# -----------------------------------------------------------------------------
# Position embeddings and the strided sparse layout (GPT prior)


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

    def rows(self, pos):
        """Embeddings of the flat positions pos (n,) alone, (n, dim): one row of each table."""
        coords = torch.unravel_index(pos, self.shape)                                     # n_axes x (n,)
        return torch.cat([self.emb[f"d_{i}"][c] for i, c in enumerate(coords)], dim=-1)  # (n, dim)

    def forward(self, x, pos=None):
        """Add the embeddings to x (B, L, dim), or to x (B, n, dim) at positions pos (n,)."""
        return x + (self.table() if pos is None else self.rows(pos)).to(x.dtype)


def rotary_tables(shape, head_dim, base=10.0):
    """cos and sin (prod(shape), 2P) of rotary position embeddings (Su et al., 2021) over a grid,
    one column per rotated channel: pair j's angle in columns 2j and 2j + 1, sin signed (-, +).

    A query and a key rotated by their positions have a dot product that depends on their
    offset only: the prior sees "the same place one latent step back" or "the code to the
    left" directly, not through learned absolute tables. The channel pairs are split evenly
    over the axes (P = head_dim // 2 // n_axes pairs each, any rest left unrotated); along an
    axis, pair j turns by position * base^(-j / P), slow to fast.
    """
    pairs = head_dim // 2 // len(shape)
    freqs = base ** (-torch.arange(pairs, dtype=torch.float32) / pairs)                # (pairs,)
    coords = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    angles = torch.cat([c.reshape(-1, 1) * freqs for c in coords], dim=-1)            # (L, P), P = n_axes * pairs
    # Laid out per channel once here, so that `rotate` (called at every layer and every sampling
    # step) is two whole-tensor multiplies.
    cos = angles.cos().repeat_interleave(2, dim=-1)                                    # (L, 2P)
    sin = torch.stack([-angles.sin(), angles.sin()], dim=-1).flatten(-2)               # (L, 2P)
    return cos, sin


def rotate(x, cos, sin):
    """Rotate the channel pairs (2i, 2i + 1) of x (..., n, hs) by the angles of `rotary_tables` rows
    cos, sin (n, 2P); channels past 2P are left as they are."""
    r = cos.shape[-1]                                                                  # channels rotated
    # (a, b) turned by the angle is (a cos - b sin, b cos + a sin): the pairs times (cos, cos) plus the
    # swapped pairs (b, a) times (-sin, sin). Two whole-tensor multiplies instead of four on every
    # other channel: three times faster forward and backward on a CPU, and the same numbers.
    pairs = x[..., :r]                                                                 # (..., n, 2P)
    swapped = pairs.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)                        # (..., n, 2P)
    return torch.cat([pairs * cos.to(x.dtype) + swapped * sin.to(x.dtype), x[..., r:]], dim=-1)   # (..., n, hs)


def strided_sparse_layout(shape, block=32, num_local_blocks=4, causal=True):
    """Boolean (L, L) mask of the original's strided block-sparse attention (Child et al., 2019).

    The flattened sequence is cut into blocks of `block` tokens, arranged as a
    grid: the trailing axes are merged until they hold more than one block. A
    block row attends to (a) its `num_local_blocks` predecessors and itself,
    and (b) for every block-grid axis but the last, the blocks that differ from
    it only along that axis (earlier ones only, if causal). Inside the diagonal
    block the usual causal triangle applies. The original ran this with
    DeepSpeed's block-sparse kernels; as a dense mask it gives the same
    attention weights on any device.
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
    if causal:
        mask &= torch.ones(L, L, dtype=torch.bool).tril()
    return mask


def sparse_block_mask(mask, block):
    """FlexAttention's BlockMask of a causal block-sparse mask (L, L) built from `block` x `block`
    tiles (strided_sparse_layout's). Where the dense mask makes attention compute every score and
    then throw most away (95% at 4096 codes), FlexAttention visits only the tiles in the layout.
    The tiles' pattern is read off the mask (its top-left corners) and the causal triangle added."""
    from torch.nn.attention.flex_attention import create_block_mask   # lazy: PyTorch >= 2.5
    L = mask.shape[-1]
    layout = mask[::block, ::block].clone()                           # (L / block, L / block)

    def visible(b, h, q, kv):
        return layout[q // block, kv // block] & (kv <= q)
    return create_block_mask(visible, None, None, L, L, device=mask.device, BLOCK_SIZE=block)


_compiled_flex = None


def flex_attention(q, k, v, block_mask):
    """softmax(q k^T / sqrt(hs)) v over the tiles of `block_mask`, with FlexAttention compiled once per
    process (uncompiled, it runs a slow reference). Its CPU kernels have no backward: on a CPU it
    serves evaluation and sampling, training keeps the dense mask (VideoGPT.attention_kwargs)."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention as flex   # lazy: PyTorch >= 2.5
        _compiled_flex = torch.compile(flex)
    return _compiled_flex(q, k, v, block_mask=block_mask, scale=q.shape[-1] ** -0.5)


@functools.cache
def flex_available():
    """Whether this PyTorch has FlexAttention (2.5 and later); asked at every sparse forward, found out once."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


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
