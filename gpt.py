"""The GPT prior of VideoGPT: an autoregressive transformer over the VQ-VAE's codes.

Section 3.2 of Yan et al. (2021). A clip's codes (t, h, w), read in raster order as L = t*h*w tokens
(each its codebook vector), shifted right behind a start vector, with position embeddings per axis: causal
pre-norm blocks predict every code from the ones before it. Conditioning: a class through conditional
LayerNorms, the first frames through a 3D ResNet the blocks cross-attend to, actions as per-frame tokens
the blocks cross-attend to or (the paper's way) through the conditional LayerNorms.

    from gpt import VideoGPT, GPTConfig, load_gpt
    gpt, vq = load_gpt("runs/gpt/ckpt.pt")              # ours, or an original VideoGPT prior .ckpt
    logits = gpt(codes, label=None, frames=None, actions=None)   # (B, t, h, w) -> (B, t, h, w, n_codes)
    codes = gpt.sample(16, temperature=1.0, top_k=None, top_p=None, generator=g)
    video = vq.decode(codes)                            # (16, 3, T, H, W)

Read in order: the config, the norms, the ResNet, the block, `forward` (training), then `sample` (the start
vector first, then each drawn code at the next position, through a KV cache). The arithmetic is the original's,
so its priors give the same logits; its quirks are marked `# original:`. fast.py samples the same, sooner.
"""

import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import BroadcastPosEmbed, KVCache, MultiHeadAttention, causal_mask, rotary_tables, strided_sparse_layout
from checkpoints import expect_kind, load_checkpoint, load_weights, original_prior, stored_config
from vqvae import VQVAE, VQVAEConfig

@dataclass
class GPTConfig:
    latent_shape: tuple = (4, 32, 32)  # (t, h, w) of the VQ-VAE's code grid for one clip
    n_codes: int = 2048                # VQ-VAE codebook size = number of logits
    embedding_dim: int = 256           # width of the VQ-VAE's code vectors, the prior's input
    hidden_dim: int = 576              # transformer width; divisible by 3 and by heads
    heads: int = 4                     # attention heads
    layers: int = 8                    # transformer blocks
    dropout: float = 0.2               # dropout on each residual branch
    attn_dropout: float = 0.3          # dropout on attention weights (full attention only)
    attn_type: str = "full"            # "full" causal attention, or the original's strided "sparse"
    n_cond_frames: int = 0             # first frames given as conditioning (0: none)
    resolution: int = 64               # frame size of conditioning frames, pixels
    n_classes: int = 0                 # classes for class conditioning (0: none)
    action_dim: int = 0                # size of each frame's action vector for action conditioning (0: none)
    action_norms: bool = False         # actions through the conditional LayerNorms (the paper's), not tokens
    sequence_length: int = 16          # frames per clip (the VQ-VAE's); one action per frame
    sparse_block: int = 32             # sparse attention: tokens per block
    sparse_local_blocks: int = 4       # sparse attention: preceding blocks every block sees
    rope: bool = False                 # rotary position embeddings over (t, h, w) in self-attention, besides the tables
    seq_len: int = field(init=False)   # t*h*w, derived
    norm_cond: int = field(init=False)        # width of the norms' conditioning vector: classes (+ T*A with action norms)
    cross_attends: bool = field(init=False)   # the blocks cross-attend: to conditioning frames or action tokens

    def __post_init__(self):
        self.latent_shape = tuple(int(s) for s in self.latent_shape)
        self.seq_len, n = math.prod(self.latent_shape), len(self.latent_shape)
        self.norm_cond = self.n_classes + (self.sequence_length * self.action_dim if self.action_norms else 0)
        self.cross_attends = bool(self.n_cond_frames or (self.action_dim and not self.action_norms))
        for ok, message in (
                (self.hidden_dim % n == 0, f"hidden_dim={self.hidden_dim} is not divisible by {n}: the position "
                                           f"embedding has one table of hidden_dim/{n} per latent axis"),
                (self.hidden_dim % self.heads == 0, f"hidden_dim={self.hidden_dim} is not divisible by heads={self.heads}"),
                (self.attn_type in ("full", "sparse"), f"attn_type must be 'full' or 'sparse', got {self.attn_type!r}"),
                (self.attn_type != "sparse" or self.seq_len % self.sparse_block == 0, f"sparse attention needs "
                 f"t*h*w={self.seq_len} to be a multiple of sparse_block={self.sparse_block}"),
                (not self.n_cond_frames or self.resolution % 4 == 0, "frame conditioning needs resolution divisible by 4"),
                (not self.cross_attends or RESNET_DIM % self.heads == 0,
                 f"frame and action conditioning need heads to divide the context width {RESNET_DIM}, got {self.heads}")):
            if not ok:
                raise ValueError(message)

    @property
    def cond_shape(self):
        """(k, H/4, W/4) grid of the conditioning frames' features."""
        return (self.n_cond_frames, self.resolution // 4, self.resolution // 4)

    def to_dict(self):
        """The constructor's arguments as a plain dict, for checkpoints."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}


RESNET_DIM = 240  # width of the frame features (the original's resnet_dim)


# -----------------------------------------------------------------------------
# Normalisation and the MLP nonlinearity


class CondLayerNorm(nn.Module):
    """The original's LayerNorm, optionally conditional: gain 1 + W_g c and bias W_b c for a vector c (a one-hot
    class; with action norms, the clip's actions after it). It normalises in float32 as (x - mean) * (1e-5 +
    rsqrt(var)), the epsilon *outside* the root: published weights need it (nn.LayerNorm: logits off by 1e-4)."""

    def __init__(self, dim, cond_dim=0):
        super().__init__()
        self.conditional = cond_dim > 0
        if self.conditional:
            self.w = nn.Linear(cond_dim, dim, bias=False)    # gain offset
            self.wb = nn.Linear(cond_dim, dim, bias=False)   # bias
        else:
            self.g = nn.Parameter(torch.ones(dim))
            self.b = nn.Parameter(torch.zeros(dim))

    def gain_bias(self, vector=None):
        """Gain and bias: the learned vectors (D,), or computed from the conditioning vector (B, 1, D)."""
        if self.conditional:
            return 1 + self.w(vector).unsqueeze(1), self.wb(vector).unsqueeze(1)   # (B, 1, D) each
        return self.g, self.b

    def forward(self, x, vector=None):
        return normalize(x, *self.gain_bias(vector))


def normalize(x, g, b):
    """The original's LayerNorm arithmetic, in float32 whatever the autocast dtype. original: eps outside the root."""
    xf = x.float()
    mu = xf.mean(dim=-1, keepdim=True)
    var = (xf - mu).square().mean(dim=-1, keepdim=True)
    xf = (xf - mu) * (1e-5 + var.rsqrt())
    return (xf * g.float() + b.float()).type_as(x)


class GeLU2(nn.Module):
    """x * sigmoid(1.702 x), the sigmoid approximation of GELU used by the original."""

    def forward(self, x):
        return (1.702 * x).sigmoid() * x


# -----------------------------------------------------------------------------
# Frame conditioning: a 3D ResNet-34


class ChannelLayerNorm(nn.Module):
    """nn.LayerNorm over the channels of a (B, C, T, H, W) tensor."""

    def __init__(self, channels):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x):
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)  # (B, C, T, H, W)


class NormReLU(nn.Module):
    """Channel LayerNorm in float32, then (optionally) ReLU."""

    def __init__(self, channels, relu=True):
        super().__init__()
        self.relu = relu
        self.norm = ChannelLayerNorm(channels)

    def forward(self, x):
        x = self.norm(x.float()).type_as(x)
        return F.relu(x) if self.relu else x


class ResidualBlock3d(nn.Module):
    """Two 3x3x3 convolutions with a (projected) shortcut."""

    def __init__(self, in_channels, filters, stride, projection=False):
        super().__init__()
        self.projection = projection
        if projection:
            self.proj_conv = nn.Conv3d(in_channels, filters, kernel_size=1, stride=stride, bias=False)
            self.proj_bnr = NormReLU(filters, relu=False)
        self.conv1 = nn.Conv3d(in_channels, filters, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bnr1 = NormReLU(filters)
        self.conv2 = nn.Conv3d(filters, filters, kernel_size=3, padding=1, bias=False)
        # original: the second norm also applies a ReLU before the residual sum.
        self.bnr2 = NormReLU(filters)

    def forward(self, x):
        shortcut = self.proj_bnr(self.proj_conv(x)) if self.projection else x
        h = self.bnr2(self.conv2(self.bnr1(self.conv1(x))))
        return F.relu(h + shortcut)


def block_group(in_channels, filters, blocks, stride):
    """A projected block then `blocks - 1` plain ones (the original's names: start_block, blocks.i)."""
    rest = nn.Sequential(*[ResidualBlock3d(filters, filters, 1) for _ in range(blocks - 1)])
    return nn.Sequential(OrderedDict(start_block=ResidualBlock3d(in_channels, filters, stride, projection=True),
                                     blocks=rest))


class ResNet3d(nn.Module):
    """(B, 3, k, H, W) frames -> (B, k, H/4, W/4, 240) features: ResNet-34 (3, 4, 6, 3 blocks of widths
    64, 128, 256, 240), a 3x3x3 stem, no downsampling in time; groups 2 and 3 halve H and W."""

    def __init__(self, out_dim=RESNET_DIM):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(3, 64, kernel_size=3, padding=1, bias=False), NormReLU(64))
        self.group1 = block_group(64, 64, blocks=3, stride=1)
        self.group2 = block_group(64, 128, blocks=4, stride=(1, 2, 2))
        self.group3 = block_group(128, 256, blocks=6, stride=(1, 2, 2))
        self.group4 = block_group(256, out_dim, blocks=3, stride=1)

    def forward(self, x):
        x = self.group4(self.group3(self.group2(self.group1(self.stem(x)))))  # (B, 240, k, H/4, W/4)
        return x.movedim(1, -1)                                              # (B, k, H/4, W/4, 240)


# -----------------------------------------------------------------------------
# The transformer


class Block(nn.Module):
    """Pre-norm block: self-attention, [cross-attention to frames and actions], MLP, each a residual branch."""

    def __init__(self, config):
        super().__init__()
        c, h = config, config.hidden_dim
        self.pre_attn_norm = CondLayerNorm(h, c.norm_cond)
        # original: sparse attention ignored attn_dropout; kept so published priors behave the same.
        self.attn = MultiHeadAttention(h, h, c.heads, n_layer=c.layers,
                                       attn_dropout=c.attn_dropout if c.attn_type == "full" else 0.0)
        self.post_attn_dp = nn.Dropout(c.dropout)
        if c.cross_attends:
            self.pre_enc_norm = CondLayerNorm(h, c.norm_cond)
            self.enc_attn = MultiHeadAttention(h, RESNET_DIM, c.heads, n_layer=c.layers)
            self.post_enc_dp = nn.Dropout(c.dropout)
        self.pre_fc_norm = CondLayerNorm(h, c.norm_cond)
        self.fc_block = nn.Sequential(nn.Linear(h, 4 * h), GeLU2(), nn.Linear(4 * h, h))
        self.post_fc_dp = nn.Dropout(c.dropout)

    def forward(self, x, cond, mask, cache=None, pos=None, rotary=None):
        """x (B, n, hidden) -> (B, n, hidden). `mask` (n, L) says what each of the n tokens sees.
        With a `cache`, x is at positions `pos` (n,). `rotary` is (cos, sin) of those positions."""
        # Causal self-attention.
        h = self.attn(self.pre_attn_norm(x, cond["vector"]), mask=mask, cache=cache, pos=pos, rotary=rotary)
        x = x + self.post_attn_dp(h)
        # Cross-attention to the conditioning frames' features and actions (no mask: all are known).
        if hasattr(self, "enc_attn"):
            h = self.enc_attn(self.pre_enc_norm(x, cond["vector"]), context=cond["context"])
            x = x + self.post_enc_dp(h)
        # MLP.
        return x + self.post_fc_dp(self.fc_block(self.pre_fc_norm(x, cond["vector"])))


class RightShift(nn.Module):
    """Prepends a learned start vector and drops the last token: position i sees tokens < i."""

    def __init__(self, dim):
        super().__init__()
        self.sos = nn.Parameter(torch.empty(dim).normal_(std=0.02))

    def forward(self, x):
        sos = self.sos.to(x.dtype).expand(x.shape[0], 1, -1)   # (B, 1, hidden)
        return torch.cat([sos, x[:, :-1]], dim=1)              # (B, L, hidden)


class AttentionStack(nn.Module):
    """Right shift, position embeddings and the blocks; the original's module names."""

    def __init__(self, config):
        super().__init__()
        self.right_shift = RightShift(config.hidden_dim)
        self.pos_embd = BroadcastPosEmbed(config.latent_shape, config.hidden_dim)
        self.attn_nets = nn.ModuleList([Block(config) for _ in range(config.layers)])


# -----------------------------------------------------------------------------
# Drawing a code from the logits


def sample_logits(logits, temperature=1.0, top_k=None, top_p=None, generator=None, noise=None):
    """One index per row of logits (B, V) after temperature, top-k and nucleus filtering, by the Gumbel-max
    trick: argmax(logits / T - log(-log u)) for uniform noise u (B, V), given or drawn from `generator`, picks i
    with probability softmax(logits / T)_i, but as arithmetic on an input: the same u, the same codes."""
    assert temperature > 0, f"temperature must be positive, got {temperature}"
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]                   # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Keep the smallest set of most likely codes whose probabilities sum to top_p.
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)         # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p                                 # always keeps the first
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if noise is None:
        noise = torch.rand(logits.shape, generator=generator, device=logits.device)
    gumbel = -torch.log(-torch.log(noise))      # u = 0 gives -inf: never drawn, as probability 0 would be
    return (logits + gumbel).argmax(dim=-1)                                         # (B,)


def uniform_noise(n, n_codes, steps, generator, device, chunk=64):
    """The uniform noise of `steps` draws, (n, n_codes) each, `chunk` draws per call to the generator.
    Every sampler reads its noise from here, so the same generator gives them the same codes."""
    for start in range(0, steps, chunk):
        yield from torch.rand(min(chunk, steps - start), n, n_codes, generator=generator, device=device)


# -----------------------------------------------------------------------------
# The prior, and loading it: ours (with the VQ-VAE inside), and the original release's


class VideoGPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        # A frozen copy of the VQ-VAE codebook: the prior's input is each code's vector.
        self.register_buffer("codebook", torch.zeros(c.n_codes, c.embedding_dim))
        if c.n_cond_frames:
            self.resnet = ResNet3d(RESNET_DIM)
            self.cond_pos_embd = BroadcastPosEmbed(c.cond_shape, RESNET_DIM)
        if c.action_dim and not c.action_norms:
            # Actions join the cross-attention memory as per-frame tokens (the action mapped, plus its frame's
            # embedding): each code attends to the frames it needs, where a norm's one gain serves all.
            self.action_in = nn.Linear(c.action_dim, RESNET_DIM)
            self.action_pos = nn.Parameter(torch.empty(c.sequence_length, RESNET_DIM).normal_(std=0.01))
        self.fc_in = nn.Linear(c.embedding_dim, c.hidden_dim, bias=False)
        self.attn_stack = AttentionStack(c)
        self.norm = CondLayerNorm(c.hidden_dim, c.norm_cond)
        self.fc_out = nn.Linear(c.hidden_dim, c.n_codes, bias=False)
        # Which positions each position may attend to (True = visible): causal, or the original's sparse pattern.
        mask = (strided_sparse_layout(c.latent_shape, c.sparse_block, c.sparse_local_blocks)
                if c.attn_type == "sparse" else causal_mask(c.seq_len))
        self.register_buffer("mask", mask, persistent=False)
        if c.rope:
            cos, sin = rotary_tables(c.latent_shape, c.hidden_dim // c.heads)                   # (L, 2P) each
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """The original's initialisation; what is not listed keeps PyTorch's default:
        | parameter                          | init                                   |
        | ---------------------------------- | -------------------------------------- |
        | fc_in.weight                       | normal, std 0.02                       |
        | attn_stack.right_shift.sos         | normal, std 0.02 (in RightShift)       |
        | position tables                    | normal, std 0.01 (in BroadcastPosEmbed)|
        | attention q/k/v/out projections    | see MultiHeadAttention.init_weights    |
        | CondLayerNorm g, b / w, wb         | 1, 0 / 1/sqrt(n_classes), default; actions' columns 0 |
        | fc_out.weight                      | zeros: uniform logits at the start     |
        """
        self.fc_in.weight.normal_(std=0.02)
        self.fc_out.weight.zero_()
        k = self.config.n_classes
        for m in self.modules():
            if isinstance(m, CondLayerNorm) and m.conditional:
                m.w.weight[:, :k].fill_(1.0 / math.sqrt(max(k, 1)))
                m.w.weight[:, k:].zero_(), m.wb.weight[:, k:].zero_()

    def set_codebook(self, embeddings):
        """Copy the VQ-VAE's codebook (n_codes, embedding_dim) into the prior."""
        assert embeddings.shape == self.codebook.shape, f"codebook {tuple(embeddings.shape)} is not {tuple(self.codebook.shape)}"
        self.codebook.copy_(embeddings)

    def condition(self, label, frames, batch_size, actions=None):
        """Checked conditioning inputs -> dict(vector: the norms' (B, n_classes + T*A), context: (B, n_ctx, 240))."""
        c = self.config
        vector = context = None
        if c.n_classes:
            assert label is not None, "this prior is class-conditional: pass label=(B,) int64"
            assert label.shape == (batch_size,) and int(label.max()) < c.n_classes and int(label.min()) >= 0, \
                f"label must be (B={batch_size},) in [0, {c.n_classes}), got {tuple(label.shape)}"
            vector = F.one_hot(label, c.n_classes).to(self.fc_in.weight.dtype)      # (B, n_classes)
        if c.n_cond_frames:
            expected = (batch_size, 3, c.n_cond_frames, c.resolution, c.resolution)
            assert frames is not None and tuple(frames.shape) == expected, \
                f"this prior is frame-conditional: frames must be {expected}, got {None if frames is None else tuple(frames.shape)}"
            feats = self.resnet(frames)                                             # (B, k, H/4, W/4, 240)
            context = self.cond_pos_embd(feats.flatten(1, 3))                      # (B, k*H/4*W/4, 240)
        if c.action_dim:
            expected = (batch_size, c.sequence_length, c.action_dim)
            assert actions is not None and tuple(actions.shape) == expected, \
                f"this prior is action-conditional: actions must be {expected}, got {None if actions is None else tuple(actions.shape)}"
            actions = actions.to(self.fc_in.weight.dtype)
            if c.action_norms:   # the whole clip's actions as one vector, after the class's one-hot
                vector = torch.cat([v for v in (vector, actions.flatten(1)) if v is not None], dim=1)  # (B, [n_classes +] T*A)
            else:
                tokens = self.action_in(actions) + self.action_pos                                # (B, T, 240)
                context = tokens if context is None else torch.cat([context, tokens], dim=1)     # (B, n_ctx, 240)
        return dict(vector=vector, context=context)

    def embed(self, codes):
        """Codes (B, n) -> input vectors (B, n, hidden): codebook lookup, then fc_in."""
        return self.fc_in(F.embedding(codes, self.codebook).to(self.fc_in.weight.dtype))  # (B, n, hidden)

    def rotary_at(self, pos=None):
        """(cos, sin) of the rotary embedding at positions pos (n,) (all without), or None without rope."""
        if not self.config.rope:
            return None
        return (self.rope_cos, self.rope_sin) if pos is None else (self.rope_cos[pos], self.rope_sin[pos])

    # --- training: every position at once ---

    def forward(self, codes, label=None, frames=None, actions=None):
        """Teacher-forced logits (B, t, h, w, n_codes): position i sees codes < i in raster order."""
        c = self.config
        assert codes.dtype == torch.long and tuple(codes.shape[1:]) == c.latent_shape, \
            f"codes must be int64 (B, {', '.join(map(str, c.latent_shape))}), got {codes.dtype} {tuple(codes.shape)}"
        B = codes.shape[0]
        cond = self.condition(label, frames, B, actions)
        # Inputs: code vectors in raster order, shifted right behind the start vector, plus positions.
        x = self.embed(codes.flatten(1))                                            # (B, L, hidden)
        x = self.attn_stack.pos_embd(self.attn_stack.right_shift(x))                # (B, L, hidden)
        for block in self.attn_stack.attn_nets:
            x = block(x, cond, self.mask, rotary=self.rotary_at())
        logits = self.fc_out(self.norm(x, cond["vector"]))                          # (B, L, n_codes)
        return logits.view(B, *c.latent_shape, c.n_codes)                         # (B, t, h, w, n_codes)

    # --- sampling: one position at a time, through the KV cache ---

    def setup_caches(self, batch_size, device, dtype=None):
        """Fresh full-length key/value buffers for every layer, in the weights' dtype (which holds autocast's
        bfloat16 or float16 keys exactly)."""
        c, dtype = self.config, dtype or self.fc_in.weight.dtype
        d = c.hidden_dim // c.heads
        return [KVCache(batch_size, c.heads, c.seq_len, d, d, dtype, device) for _ in range(c.layers)]

    def step(self, x, pos, cond, caches):
        """Inputs x (B, n, hidden) at positions pos (n,) through the blocks, keys and values into the caches;
        logits (B, n, n_codes). Each query sees the cache through its row of the mask: never the unwritten."""
        x = self.attn_stack.pos_embd(x, pos)                                          # (B, n, hidden)
        for block, cache in zip(self.attn_stack.attn_nets, caches):
            x = block(x, cond, self.mask[pos], cache=cache, pos=pos, rotary=self.rotary_at(pos))
        return self.fc_out(self.norm(x, cond["vector"]))                            # (B, n, n_codes)

    @torch.no_grad()
    def sample(self, n, label=None, frames=None, actions=None, temperature=1.0, top_k=None, top_p=None,
               generator=None):
        """Draw n code grids (n, t, h, w), one code after the other, each given the ones before it."""
        c, device = self.config, self.fc_in.weight.device
        cond = self.condition(label, frames, n, actions)
        caches = self.setup_caches(n, device)
        codes = torch.zeros(n, c.seq_len, dtype=torch.long, device=device)
        noise = uniform_noise(n, c.n_codes, c.seq_len, generator, device)
        # The prefill: the start vector goes in at position 0, and its logits give the first code.
        x = self.attn_stack.right_shift.sos.to(self.fc_in.weight.dtype).expand(n, 1, -1)   # (n, 1, hidden)
        for i in range(c.seq_len):
            logits = self.step(x, torch.tensor([i], device=device), cond, caches)          # (n, 1, n_codes)
            codes[:, i] = sample_logits(logits[:, 0], temperature, top_k, top_p, noise=next(noise))
            # Decoding: the code just drawn is the input at the next position.
            x = self.embed(codes[:, i:i + 1])                                             # (n, 1, hidden)
        return codes.view(n, *c.latent_shape)                                             # (n, t, h, w)


def embedded_vqvae(ckpt, path):
    """The VQ-VAE a prior checkpoint of ours carries in `ckpt["vqvae"]` ({config, model}); one-line errors."""
    saved = ckpt.get("vqvae") if isinstance(ckpt.get("vqvae"), dict) else {}
    vq = VQVAE(stored_config(VQVAEConfig, saved, path))
    return load_weights(vq, saved.get("model"), path, "the VQ-VAE's config")


def load_gpt(path, device="cpu"):
    """(prior, VQ-VAE), both in eval mode, from our checkpoint or an original VideoGPT prior .ckpt."""
    path = os.fspath(path)
    ckpt = load_checkpoint(path)
    expect_kind(ckpt, path, "gpt")
    if "stage" in ckpt:
        vq = embedded_vqvae(ckpt, path)
        config, state = stored_config(GPTConfig, ckpt, path), ckpt.get("model")
        config.sequence_length = vq.config.sequence_length   # older checkpoints did not store it; the VQ-VAE knows
    else:
        # The original's files hold no configs: checkpoints.py reads them off the weights and the run's args.
        vq_config, gpt_config, vq_state, state = original_prior(ckpt, path)
        vq = load_weights(VQVAE(VQVAEConfig(**vq_config)), vq_state, path, "the VQ-VAE's config")
        config = GPTConfig(**gpt_config)
        state["codebook"] = vq.codebook.embeddings.clone()
    gpt = load_weights(VideoGPT(config), state, path, "the prior's config")
    return gpt.to(device).eval(), vq.to(device).eval()
