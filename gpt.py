"""The GPT prior of VideoGPT: an autoregressive transformer over the VQ-VAE's codes.

Section 3.2 of Yan et al. (2021). A clip's codes (t, h, w) are read in raster
order as one sequence of L = t*h*w tokens. Each token enters as its code's
vector from the (frozen) VQ-VAE codebook, linearly mapped to `hidden_dim`; the
sequence is shifted right by one behind a learned start vector, spatio-temporal
position embeddings are added, and a stack of pre-norm transformer blocks with
causal self-attention predicts every code from the ones before it. Optional
conditioning: a class label through conditional LayerNorms, and the first
`n_cond_frames` frames through a 3D ResNet whose features every block
cross-attends to; per-frame actions (BAIR's robot arm) join that
cross-attention memory as one token per frame.

    from gpt import VideoGPT, GPTConfig, load_gpt
    gpt, vq = load_gpt("runs/gpt/ckpt.pt")              # ours, or an original VideoGPT prior .ckpt
    logits = gpt(codes, label=None, frames=None, actions=None)   # (B, t, h, w) -> (B, t, h, w, n_codes)
    codes = gpt.sample(16, temperature=1.0, top_k=None, top_p=None, generator=g)
    video = vq.decode(codes)                            # (16, 3, T, H, W)

Sampling uses a hand-written KV cache: per-layer key/value buffers allocated
once at full length, a `prefill` for the start token (and any given codes) and
`decode_one_token` for every later one, which attends over the written prefix
(or over the whole buffer with a mask: fixed shapes, for CUDA graphs); the
cross-attention keys and values, the position table and fused q/k/v weights
are computed once per call. `DecodeStep` is one whole step including the draw
of the next code (Gumbel-max on given uniform noise), which
`sample(compile=True)` compiles once and keeps. `sample_naive` recomputes the
whole sequence at every step and is kept as the reference the cache is tested
against. `rope=True` adds rotary position embeddings over (t, h, w).
`sample(prefix=...)` keeps given first latent steps (video prediction), and
`sample(frames_out=N)` slides the window over latent time for videos longer
than the prior was trained on (`sample_long`).

The arithmetic is the original implementation's, so its published priors give
the same logits; each place where the original has a quirk is marked `# original:`.

Not here: training (train.py), writing videos (sample.py), and reading files:
`load_gpt` asks checkpoints.py to read a checkpoint safely, then builds the
prior and its VQ-VAE itself.
"""

import math
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from attention import (BroadcastPosEmbed, KVCache, MultiHeadAttention, explicit_attention, flex_available, rotary_tables,
                       rotate, sparse_block_mask, strided_sparse_layout)
from checkpoints import checkpoint_kind, load_checkpoint, load_weights, original_args, stored_config
from vqvae import VQVAEConfig, vqvae_from_state

# -----------------------------------------------------------------------------
# Configuration


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
    sequence_length: int = 16          # frames per clip (the VQ-VAE's); one action per frame
    sparse_block: int = 32             # sparse attention: tokens per block
    sparse_local_blocks: int = 4       # sparse attention: preceding blocks every block sees
    rope: bool = False                 # rotary position embeddings over (t, h, w) in self-attention, besides the tables
    seq_len: int = field(init=False)   # t*h*w, derived

    def __post_init__(self):
        self.latent_shape = tuple(int(s) for s in self.latent_shape)
        n_axes = len(self.latent_shape)
        if self.hidden_dim % n_axes:
            raise ValueError(f"hidden_dim={self.hidden_dim} is not divisible by {n_axes}: the position "
                             f"embedding has one table of hidden_dim/{n_axes} per latent axis")
        if self.hidden_dim % self.heads:
            raise ValueError(f"hidden_dim={self.hidden_dim} is not divisible by heads={self.heads}")
        if self.attn_type not in ("full", "sparse"):
            raise ValueError(f"attn_type must be 'full' or 'sparse', got {self.attn_type!r}")
        self.seq_len = math.prod(self.latent_shape)
        if self.attn_type == "sparse" and self.seq_len % self.sparse_block:
            raise ValueError(f"sparse attention needs t*h*w={self.seq_len} to be a multiple of "
                             f"sparse_block={self.sparse_block}")
        if self.n_cond_frames and self.resolution % 4:
            raise ValueError(f"frame conditioning needs resolution divisible by 4, got {self.resolution}")
        if (self.n_cond_frames or self.action_dim) and RESNET_DIM % self.heads:
            raise ValueError(f"frame and action conditioning need heads to divide the context width {RESNET_DIM}, "
                             f"got {self.heads}")

    @property
    def cond_shape(self):
        """(k, H/4, W/4) grid of the conditioning frames' features."""
        return (self.n_cond_frames, self.resolution // 4, self.resolution // 4)

    def to_dict(self):
        d = asdict(self)
        d.pop("seq_len")
        d["latent_shape"] = list(d["latent_shape"])
        return d


RESNET_DIM = 240  # width of the frame features (the original's resnet_dim)


# -----------------------------------------------------------------------------
# Normalisation and the MLP nonlinearity


class CondLayerNorm(nn.Module):
    """The original's LayerNorm, optionally class-conditional.

    It normalises in float32 as (x - mean) * (1e-5 + rsqrt(var)): the epsilon is
    added *outside* the square root, unlike nn.LayerNorm. Published weights were
    trained with it, so nn.LayerNorm would shift their logits by ~1e-4.
    With classes, gain and bias are 1 + W_g c and W_b c for the one-hot class c.
    """

    def __init__(self, dim, n_classes=0):
        super().__init__()
        self.conditional = n_classes > 0
        if self.conditional:
            self.w = nn.Linear(n_classes, dim, bias=False)    # gain offset per class
            self.wb = nn.Linear(n_classes, dim, bias=False)   # bias per class
        else:
            self.g = nn.Parameter(torch.ones(dim))
            self.b = nn.Parameter(torch.zeros(dim))

    def gain_bias(self, onehot=None):
        """Gain and bias: the learned vectors (D,), or computed from the class (B, 1, D)."""
        if self.conditional:
            return 1 + self.w(onehot).unsqueeze(1), self.wb(onehot).unsqueeze(1)   # (B, 1, D) each
        return self.g, self.b

    def forward(self, x, onehot=None):
        return normalize(x, *self.gain_bias(onehot))


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
        return gelu2(x)


def gelu2(x):
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


class BlockGroup(nn.Module):
    def __init__(self, in_channels, filters, blocks, stride):
        super().__init__()
        self.start_block = ResidualBlock3d(in_channels, filters, stride, projection=True)
        self.blocks = nn.Sequential(*[ResidualBlock3d(filters, filters, 1) for _ in range(blocks - 1)])

    def forward(self, x):
        return self.blocks(self.start_block(x))


class ResNet3d(nn.Module):
    """(B, 3, k, H, W) frames -> (B, k, H/4, W/4, 240) features.

    ResNet-34 (3, 4, 6, 3 blocks of widths 64, 128, 256, 240) with a 3x3x3 stem
    and no downsampling in time; groups 2 and 3 halve H and W.
    """

    def __init__(self, out_dim=RESNET_DIM):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(3, 64, kernel_size=3, padding=1, bias=False), NormReLU(64))
        self.group1 = BlockGroup(64, 64, blocks=3, stride=1)
        self.group2 = BlockGroup(64, 128, blocks=4, stride=(1, 2, 2))
        self.group3 = BlockGroup(128, 256, blocks=6, stride=(1, 2, 2))
        self.group4 = BlockGroup(256, out_dim, blocks=3, stride=1)

    def forward(self, x):
        x = self.group4(self.group3(self.group2(self.group1(self.stem(x)))))  # (B, 240, k, H/4, W/4)
        return x.movedim(1, -1)                                              # (B, k, H/4, W/4, 240)


# -----------------------------------------------------------------------------
# The transformer


class Block(nn.Module):
    """Pre-norm block: self-attention, [cross-attention to frames], MLP, each a residual branch."""

    def __init__(self, config):
        super().__init__()
        c = config
        h = c.hidden_dim
        self.pre_attn_norm = CondLayerNorm(h, c.n_classes)
        # original: sparse attention ignored attn_dropout; kept so published priors behave the same.
        self.attn = MultiHeadAttention(h, h, c.heads, n_layer=c.layers,
                                       attn_dropout=c.attn_dropout if c.attn_type == "full" else 0.0)
        self.post_attn_dp = nn.Dropout(c.dropout)
        if c.n_cond_frames or c.action_dim:
            self.pre_enc_norm = CondLayerNorm(h, c.n_classes)
            self.enc_attn = MultiHeadAttention(h, RESNET_DIM, c.heads, n_layer=c.layers)
            self.post_enc_dp = nn.Dropout(c.dropout)
        self.pre_fc_norm = CondLayerNorm(h, c.n_classes)
        self.fc_block = nn.Sequential(nn.Linear(h, 4 * h), GeLU2(), nn.Linear(4 * h, h))
        self.post_fc_dp = nn.Dropout(c.dropout)
        self.grad_checkpointing = False

    def forward(self, x, cond, mask=None, is_causal=False, cache=None, pos=None, frame_kv=None, block_mask=None,
                rotary=None):
        """x (B, n, hidden) -> (B, n, hidden). cond: dict(onehot, context); frame_kv: this
        block's cross-attention keys and values, precomputed for sampling; block_mask: FlexAttention's
        tiles of sparse attention, instead of `mask`; rotary: (cos, sin) of the n positions."""
        ckpt = (lambda f, *a: checkpoint(f, *a, use_reentrant=False)) if self.grad_checkpointing and self.training \
            else (lambda f, *a: f(*a))
        # Causal self-attention.
        h = self.pre_attn_norm(x, cond["onehot"])
        h = ckpt(lambda h: self.attn(h, mask=mask, is_causal=is_causal, cache=cache, pos=pos, block_mask=block_mask,
                                     rotary=rotary), h)
        x = x + self.post_attn_dp(h)
        # Cross-attention to the conditioning frames' features and actions (no mask: all are known).
        if hasattr(self, "enc_attn"):
            h = self.pre_enc_norm(x, cond["onehot"])
            h = ckpt(lambda h: self.enc_attn(h, context=cond["context"], kv=frame_kv), h)
            x = x + self.post_enc_dp(h)
        # MLP.
        h = self.pre_fc_norm(x, cond["onehot"])
        x = x + self.post_fc_dp(ckpt(self.fc_block, h))
        return x


    def decode(self, x, pos, cache, mask, plan, qkv, frame_kv=None, length=None, rotary=None):
        """`forward` for the newest token x (B, 1, D) at position pos (1,) while sampling, the same
        arithmetic as plain tensor operations: the norms' gains from `plan` (VideoGPT.decode_plan), the
        stacked q/k/v weight `qkv`, the other weights read straight from the modules. At one token per
        step, calling ten small modules per block costs more than their math. With `length` the
        attention reads only the cache's first `length` keys."""
        q, k, v = self.attn.fused_qkv(normalize(x, *plan["attn_norm"]), qkv)         # 3 x (B, nh, 1, hs)
        if rotary is not None:
            q, k = rotate(q, *rotary), rotate(k, *rotary)
        k, v = cache.update(pos, k, v, length)                                        # (B, nh, length or L, hs) each
        # Compiled, the attention is written out (inductor fuses it into one kernel, faster than calling
        # the CPU flash kernel for a single query); eager, the library kernel is the faster of the two.
        a = (explicit_attention(q, k, v, mask) if torch.compiler.is_compiling() else
             F.scaled_dot_product_attention(q, k, v, attn_mask=mask))                # (B, nh, 1, hs)
        x = x + F.linear(self.attn.merge_heads(a), self.attn.fc.weight, self.attn.fc.bias)   # (B, 1, D)
        if hasattr(self, "enc_attn"):
            x = x + self.enc_attn(normalize(x, *plan["enc_norm"]), kv=frame_kv)
        h = F.linear(normalize(x, *plan["fc_norm"]), self.fc_block[0].weight, self.fc_block[0].bias)
        return x + F.linear(gelu2(h), self.fc_block[2].weight, self.fc_block[2].bias)


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


def sample_logits(logits, temperature=1.0, top_k=None, top_p=None, generator=None, noise=None):
    """Draw one index per row of logits (B, V) after temperature, top-k and nucleus filtering.

    The draw is the Gumbel-max trick: argmax(logits / T + g) with g = -log(-log u) for uniform
    noise u (B, V), given or drawn from `generator`. It picks index i with probability
    softmax(logits / T)_i, exactly as a softmax followed by torch.multinomial, but as plain tensor
    arithmetic on an input: a compiled decoding step (DecodeStep) draws inside its graph, and given
    the same u every sampler draws the same codes.
    """
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
    """The uniform noise of `steps` draws, (n, n_codes) each, drawn `chunk` draws at a time: one
    call to the generator instead of 64 (on a CPU the numbers are the same as drawn one by one).
    Every sampler reads its noise from here, so the same generator gives them the same codes."""
    for start in range(0, steps, chunk):
        yield from torch.rand(min(chunk, steps - start), n, n_codes, generator=generator, device=device)


class DecodeStep(nn.Module):
    """One whole sampling step of a prior as a module: the previous code in, the next code out.

    It wraps `decode_one_token` and the draw of `sample_logits` so that torch.compile turns
    a step into one graph: every block, the output layer, temperature, top-k / top-p and the
    Gumbel-max draw on the uniform noise it is given. The prior is a sub-module, so with
    inductor's "freezing" its weights become constants of the compiled code (on CPU its
    matmuls are then generated and fused, not called one by one). Built by
    `VideoGPT.compiled_step`, which also says how it is compiled on each device.
    """

    def __init__(self, gpt, temperature, top_k, top_p):
        super().__init__()
        self.gpt = gpt
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        # The prior's decode_weights as buffers of this module: constants of the compiled code, too.
        w = gpt.decode_weights()
        self.register_buffer("inputs", w["inputs"], persistent=False)
        self.register_buffer("pos_table", w["pos_table"], persistent=False)
        # One buffer per block, not one stacked tensor: frozen views of a stacked constant came out
        # wrong in compiled code (the compiled samples no longer matched the eager ones).
        self.n_qkv = len(w["qkv"])
        for i, qkv in enumerate(w["qkv"]):
            self.register_buffer(f"qkv_{i}", qkv, persistent=False)

    def forward(self, code, pos, cond, caches, noise, length=None):
        weights = dict(inputs=self.inputs, pos_table=self.pos_table,
                       qkv=[getattr(self, f"qkv_{i}") for i in range(self.n_qkv)])
        logits = self.gpt.decode_one_token(code, pos, cond, caches, length, weights)   # (B, n_codes)
        return sample_logits(logits, self.temperature, self.top_k, self.top_p, noise=noise)


# Compiling the decoding step costs 10-30 s on a CPU (about a minute on a GPU) and saves about half a
# millisecond per step on a CPU (more on a GPU, where an eager step is launch-bound): it pays for itself
# over some tens of thousands of steps (e.g. 8 BAIR batches of 4096 codes), not for a handful of clips.
AUTO_COMPILE_STEPS = 30_000


def compile_pays_off(steps):
    """Whether a run that draws `steps` codes one after the other should compile its decoding step."""
    return steps >= AUTO_COMPILE_STEPS


def frozen_cpu_compile(module):
    """torch.compile for a CPU inference module whose weights stay fixed: inductor's "freezing" makes
    them constants (the matmuls become generated code next to their neighbours instead of library
    calls) and max-autotune picks those kernels. Both settings must hold whenever the module may be
    traced or compiled, which can be at any call, so every call sets them and puts them back (~7 us)."""
    import torch._inductor.config as inductor_config   # lazy: only when compiling
    compiled = torch.compile(module)

    def call(*args):
        saved = inductor_config.freezing, inductor_config.max_autotune
        inductor_config.freezing = inductor_config.max_autotune = True
        try:
            return compiled(*args)
        finally:
            inductor_config.freezing, inductor_config.max_autotune = saved
    return call


class VideoGPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        # A frozen copy of the VQ-VAE codebook: the prior's input is each code's vector.
        self.register_buffer("codebook", torch.zeros(c.n_codes, c.embedding_dim))
        if c.n_cond_frames:
            self.resnet = ResNet3d(RESNET_DIM)
            self.cond_pos_embd = BroadcastPosEmbed(c.cond_shape, RESNET_DIM)
        if c.action_dim:
            # Actions condition through the cross-attention memory, not through conditional norms.
            # A conditional norm applies one gain and bias to every position: right for a class, but
            # actions change from frame to frame, and the code of latent step t should look at the
            # actions of the frames it covers (and, for where the arm is, those before). As one token
            # per frame (a linear map of the action plus a learned embedding of its frame index),
            # every code attends to the actions it needs and learns the frame-to-latent alignment
            # itself; and with frame conditioning the tokens simply follow the frames' features
            # (BAIR: first frame + actions).
            self.action_in = nn.Linear(c.action_dim, RESNET_DIM)
            self.action_pos = nn.Parameter(torch.empty(c.sequence_length, RESNET_DIM).normal_(std=0.01))
        self.fc_in = nn.Linear(c.embedding_dim, c.hidden_dim, bias=False)
        self.attn_stack = AttentionStack(c)
        self.norm = CondLayerNorm(c.hidden_dim, c.n_classes)
        self.fc_out = nn.Linear(c.hidden_dim, c.n_codes, bias=False)
        # Which positions each position may attend to (True = visible), for sparse training and for sampling.
        mask = (strided_sparse_layout(c.latent_shape, c.sparse_block, c.sparse_local_blocks)
                if c.attn_type == "sparse" else torch.ones(c.seq_len, c.seq_len, dtype=torch.bool).tril())
        self.register_buffer("mask", mask, persistent=False)
        if c.rope:
            cos, sin = rotary_tables(c.latent_shape, c.hidden_dim // c.heads)                   # (L, 2P) each
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self._compiled = {}   # compiled decoding steps (compiled_step), not part of the model's state
        # Sparse attention through FlexAttention where it can run (attention_kwargs); its block masks per device.
        self.use_flex, self._block_masks = True, {}
        self.init_weights()

    def __getstate__(self):
        """Copies and pickles leave the compiled steps and block masks behind (made again when needed)."""
        return {**self.__dict__, "_compiled": {}, "_block_masks": {}}

    @torch.no_grad()
    def init_weights(self):
        """The original's initialisation; what is not listed keeps PyTorch's default.

        | parameter                          | init                                   |
        | ---------------------------------- | -------------------------------------- |
        | fc_in.weight                       | normal, std 0.02                       |
        | attn_stack.right_shift.sos         | normal, std 0.02 (in RightShift)       |
        | position tables                    | normal, std 0.01 (in BroadcastPosEmbed)|
        | attention q/k/v/out projections    | see MultiHeadAttention.init_weights    |
        | CondLayerNorm g, b / w, wb         | 1, 0 / constant 1/sqrt(n_classes), default |
        | fc_out.weight                      | zeros: uniform logits at the start     |
        """
        self.fc_in.weight.normal_(std=0.02)
        self.fc_out.weight.zero_()
        for m in self.modules():
            if isinstance(m, CondLayerNorm) and m.conditional:
                m.w.weight.fill_(1.0 / math.sqrt(self.config.n_classes))

    def set_codebook(self, embeddings):
        """Copy the VQ-VAE's codebook (n_codes, embedding_dim) into the prior."""
        assert embeddings.shape == self.codebook.shape, \
            f"codebook shape {tuple(embeddings.shape)} does not match the prior's {tuple(self.codebook.shape)}"
        self.codebook.copy_(embeddings)

    def hidden_matrices(self):
        """The weight matrices of the blocks' attention projections and MLPs: the ones Muon may train
        (train.py --optimizer muon). Embeddings, position tables, norms (a class's gains included),
        biases and the output layer stay with Adam: they are lookups and scales, not linear maps
        between hidden widths, and Muon's orthogonalised updates are made for the latter."""
        matrices = []
        for block in self.attn_stack.attn_nets:
            for part in (block.attn, getattr(block, "enc_attn", None), block.fc_block):
                if part is not None:
                    matrices += [m.weight for m in part.modules() if isinstance(m, nn.Linear)]
        return matrices

    def set_grad_checkpointing(self, enabled=True):
        for block in self.attn_stack.attn_nets:
            block.grad_checkpointing = enabled

    # --- conditioning ---

    def condition(self, label, frames, batch_size, actions=None):
        """dict(onehot, context) from the raw conditioning inputs, checked against the config."""
        c = self.config
        onehot = context = None
        if c.n_classes:
            assert label is not None, "this prior is class-conditional: pass label=(B,) int64"
            assert label.shape == (batch_size,) and int(label.max()) < c.n_classes and int(label.min()) >= 0, \
                f"label must be (B={batch_size},) in [0, {c.n_classes}), got {tuple(label.shape)}"
            onehot = F.one_hot(label, c.n_classes).to(self.fc_in.weight.dtype)      # (B, n_classes)
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
            tokens = self.action_in(actions.to(self.action_in.weight.dtype)) + self.action_pos   # (B, T, 240)
            context = tokens if context is None else torch.cat([context, tokens], dim=1)         # (B, n_ctx, 240)
        return dict(onehot=onehot, context=context)

    # --- teacher forcing ---

    def embed(self, codes):
        """Codes (B, n) -> input vectors (B, n, hidden): codebook lookup, then fc_in."""
        return self.fc_in(F.embedding(codes, self.codebook).to(self.fc_in.weight.dtype))  # (B, n, hidden)

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
        attention = self.attention_kwargs(x.device)
        if c.rope:
            attention["rotary"] = (self.rope_cos, self.rope_sin)
        for block in self.attn_stack.attn_nets:
            x = block(x, cond, **attention)
        logits = self.fc_out(self.norm(x, cond["onehot"]))                          # (B, L, n_codes)
        return logits.view(B, *c.latent_shape, c.n_codes)                         # (B, t, h, w, n_codes)

    def attention_kwargs(self, device):
        """How the teacher-forced pass attends. Full attention: SDPA's causal kernel. Sparse attention:
        FlexAttention over the layout's tiles where it can run (PyTorch >= 2.5; on a CPU only without
        gradients, its CPU kernels have none) and `self.use_flex` is on (the default); else the dense
        mask, the reference the tiles are tested against."""
        if self.config.attn_type != "sparse":
            return dict(is_causal=True)
        if self.use_flex and flex_available() and (device.type == "cuda" or not torch.is_grad_enabled()):
            if device not in self._block_masks:
                self._block_masks[device] = sparse_block_mask(self.mask.to(device), self.config.sparse_block)
            return dict(block_mask=self._block_masks[device])
        return dict(mask=self.mask)

    def rotary_at(self, pos):
        """(cos, sin) of the rotary embedding at positions pos (n,), or None without rope."""
        return (self.rope_cos[pos], self.rope_sin[pos]) if self.config.rope else None

    # --- sampling with the KV cache ---

    def setup_caches(self, batch_size, dtype, device):
        """Fresh full-length key/value buffers for every layer."""
        c = self.config
        d = c.hidden_dim // c.heads
        return [KVCache(batch_size, c.heads, c.seq_len, d, d, dtype, device) for _ in range(c.layers)]

    def step(self, x, pos, cond, caches):
        """Run inputs x (B, n, hidden) at positions pos (n,) through the blocks, writing the cache.

        Each query attends over the whole cache with its row of the mask, so
        positions not yet written (zeros) are never seen (the prefill).
        """
        x = self.attn_stack.pos_embd(x, pos)                                          # (B, n, hidden)
        mask = self.mask[pos]                                                         # (n, L)
        frame_kv = cond.get("frame_kv") or [None] * len(caches)
        rotary = self.rotary_at(pos)
        for block, cache, kv in zip(self.attn_stack.attn_nets, caches, frame_kv):
            x = block(x, cond, mask=mask, cache=cache, pos=pos, frame_kv=kv, rotary=rotary)
        return self.fc_out(self.norm(x, cond["onehot"]))                            # (B, n, n_codes)

    def prefill(self, cond, caches, batch_size, prefix=None):
        """The start vector, then the given codes `prefix` (B, P) if any, in one pass at positions 0..P,
        writing the cache. Returns the logits of the first code to draw, position P (B, n_codes)."""
        x = self.attn_stack.right_shift.sos.to(self.fc_in.weight.dtype).expand(batch_size, 1, -1)  # (B, 1, hidden)
        if prefix is not None and prefix.shape[1]:
            x = torch.cat([x, self.embed(prefix)], dim=1)                          # (B, 1 + P, hidden)
        pos = torch.arange(x.shape[1], device=x.device)
        return self.step(x, pos, cond, caches)[:, -1]

    def decode_one_token(self, code, pos, cond, caches, length=None, weights=None):
        """Feed the code sampled at position pos-1 (B,) in at position pos, a (1,) tensor; logits (B, n_codes).

        Each block runs `Block.decode` with the norms of cond["plan"] and the `weights` of
        `decode_weights` (computed here when not given). With `length` = pos + 1 (a Python int) the
        attention reads only the written prefix of the cache, which needs no mask for full attention;
        without it every step reads the whole buffer with pos's row of the mask: fixed shapes, what
        CUDA graphs replay."""
        plan, w = cond["plan"], weights or self.decode_weights()
        x = (w["inputs"][code] + w["pos_table"][pos]).unsqueeze(1)                # (B, 1, hidden)
        mask = None
        if length is None:
            mask = self.mask[pos]                                                   # (1, L)
        elif self.config.attn_type == "sparse":
            mask = self.mask[pos][:, :length]                                       # (1, length)
        frame_kv = cond.get("frame_kv") or [None] * len(caches)
        rotary = self.rotary_at(pos)
        for block, cache, p, qkv, kv in zip(self.attn_stack.attn_nets, caches, plan["blocks"], w["qkv"], frame_kv):
            x = block.decode(x, pos, cache, mask, p, qkv, kv, length, rotary)
        return F.linear(normalize(x, *plan["norm"]), self.fc_out.weight)[:, -1]    # (B, n_codes)

    def compiled_step(self, batch_size, temperature=1.0, top_k=None, top_p=None):
        """A torch.compile'd DecodeStep for these sampling settings, made once and kept.

        CPU: inductor with freezing and max-autotune (the weights become constants, the matmuls
        generated code), each step over the written prefix, compiled once for every length. CUDA:
        fixed shapes replayed as CUDA graphs ("reduce-overhead"). Compiling takes seconds to
        minutes, so it pays off only over many steps (sample.py decides). The compiled code is kept
        per batch size and settings, and made again when any weight has changed since (frozen
        weights would otherwise be stale): training may call it between optimizer steps.
        """
        device = self.fc_in.weight.device
        versions = tuple(t._version for t in (*self.parameters(), *self.buffers()))
        key = (batch_size, temperature, top_k, top_p, device.type, torch.is_autocast_enabled(device.type))
        if key not in self._compiled or self._compiled[key][0] != versions:
            step = DecodeStep(self, temperature, top_k, top_p)
            self._compiled[key] = (versions, torch.compile(step, mode="reduce-overhead") if device.type == "cuda"
                                   else frozen_cpu_compile(step))
        return self._compiled[key][1]

    def cached_condition(self, label, frames, batch_size, actions=None):
        """What the conditioning fixes for a whole sampling call, computed once: the conditioning itself,
        the cross-attention keys/values of frames and actions, and the norms' gains (`decode_plan`)."""
        cond = self.condition(label, frames, batch_size, actions)
        if cond["context"] is not None:
            cond["frame_kv"] = [b.enc_attn.keys_values(cond["context"]) for b in self.attn_stack.attn_nets]
        cond["plan"] = self.decode_plan(cond)
        return cond

    def decode_plan(self, cond):
        """Each block's norms' gains and biases (per sample for a class-conditional prior) and the final
        norm's: what every decoding step reads and the conditioning decides."""
        onehot = cond["onehot"]
        blocks = [dict(attn_norm=b.pre_attn_norm.gain_bias(onehot), fc_norm=b.pre_fc_norm.gain_bias(onehot),
                       enc_norm=b.pre_enc_norm.gain_bias(onehot) if hasattr(b, "enc_attn") else None)
                  for b in self.attn_stack.attn_nets]
        return dict(blocks=blocks, norm=self.norm.gain_bias(onehot))

    def decode_weights(self):
        """What every decoding step reads and only the weights decide, in the sampling dtype: the input
        of every code, codebook @ fc_in, as one table (n_codes, hidden); every position's embedding
        (L, hidden); each block's q, k, v weights stacked into one (3 * hidden, hidden)."""
        dtype = self.sampling_dtype()
        inputs = self.fc_in(self.codebook.to(self.fc_in.weight.dtype)).to(dtype)              # (n_codes, hidden)
        pos_table = self.attn_stack.pos_embd.table().to(dtype)                                # (L, hidden)
        return dict(inputs=inputs, pos_table=pos_table,
                    qkv=[b.attn.fused_qkv_weight() for b in self.attn_stack.attn_nets])

    def sampling_dtype(self):
        """The dtype of activations while sampling: autocast's when it is on (keys and values come out in
        it, so the cache holds that), else the weights'."""
        device = self.fc_in.weight.device
        return (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                else self.fc_in.weight.dtype)

    @torch.no_grad()
    def sample(self, n, label=None, frames=None, temperature=1.0, top_k=None, top_p=None, generator=None,
               progress=False, compile=False, actions=None, prefix=None, frames_out=None, stride=None,
               frames_fn=None):
        """Draw n code grids (n, t, h, w) with the KV cache.

        `prefix` (n, k, h, w) gives the first k latent time steps (video
        prediction): they are prefilled in one pass and only the rest is drawn.
        `frames_out` asks for a longer video: see `sample_long`.
        `compile=True` runs every step through `compiled_step` (same codes for the
        same generator, up to the last bits of the logits; compiling costs seconds,
        so it pays off over many steps). Each position's draw reads uniform noise
        (n, n_codes) from `generator`, one position after the other, whichever path.
        """
        if frames_out is not None and frames_out != self.config.sequence_length:
            return self.sample_long(n, frames_out, stride, label=label, frames=frames, actions=actions, prefix=prefix,
                                    frames_fn=frames_fn, progress=progress, temperature=temperature, top_k=top_k,
                                    top_p=top_p, generator=generator, compile=compile)
        c = self.config
        device = self.fc_in.weight.device
        cond = self.cached_condition(label, frames, n, actions)
        caches = self.setup_caches(n, self.sampling_dtype(), device)
        step = (self.compiled_step(n, temperature, top_k, top_p) if compile else
                DecodeStep(self, temperature, top_k, top_p))
        # CUDA graphs replay fixed shapes: the whole cache every step. Elsewhere the written prefix.
        fixed = compile and device.type == "cuda"
        codes = torch.zeros(n, c.seq_len, dtype=torch.long, device=device)
        given = 0
        if prefix is not None:
            t, h, w = c.latent_shape
            assert prefix.shape[0] == n and prefix.shape[1] <= t and tuple(prefix.shape[2:]) == (h, w), \
                f"prefix must be (n={n}, k <= {t}, {h}, {w}), got {tuple(prefix.shape)}"
            given = prefix.shape[1] * h * w
            codes[:, :given] = prefix.flatten(1)                                  # (n, k*h*w)
        pos = torch.arange(c.seq_len, device=device)
        positions = range(given, c.seq_len)
        if progress:
            from tqdm import tqdm  # lazy: only for the progress bar
            positions = tqdm(positions, desc="sampling", unit="code", leave=False)
        noise = uniform_noise(n, c.n_codes, c.seq_len - given, generator, device)
        for i in positions:
            u = next(noise)                                                       # (n, n_codes)
            if i == given:
                logits = self.prefill(cond, caches, n, codes[:, :given])
                codes[:, i] = sample_logits(logits, temperature, top_k, top_p, noise=u)
            else:
                codes[:, i] = step(codes[:, i - 1], pos[i:i + 1], cond, caches, u, None if fixed else i + 1)
        return codes.view(n, *c.latent_shape)                                     # (n, t, h, w)

    @torch.no_grad()
    def sample_long(self, n, frames_out, stride=None, label=None, frames=None, actions=None, prefix=None,
                    frames_fn=None, progress=False, **sampling):
        """Codes of `frames_out` frames, more than the prior was trained on, by sliding its window over latent time.

        The prior models windows of t latent steps (sequence_length frames). The
        first window is an ordinary sample (with `prefix`, `frames`, `actions` as
        given); each next one keeps the last t - s generated steps as its
        context, prefills them in one pass (positions restart at 0, as in
        training) and draws s new steps. Default s = t // 2: half the window
        is context. Class labels condition every window; conditioning frames
        only the first: later windows need `frames_fn(context codes)` -> their
        first frames (sample.py decodes the context with the VQ-VAE); actions
        (n, frames_out, A) are cut into each window's frames.
        Returns (n, frames_out / stride_t, h, w).
        """
        c = self.config
        t = c.latent_shape[0]
        per_step = c.sequence_length // t                         # frames per latent time step
        if frames_out % per_step or frames_out < c.sequence_length:
            raise ValueError(f"frames_out={frames_out} must be a multiple of the VQ-VAE's temporal stride {per_step} "
                             f"and at least the trained {c.sequence_length} frames")
        s = stride or max(1, t // 2)
        if not 1 <= s <= t:
            raise ValueError(f"stride={s} must be between 1 and the window's {t} latent steps")
        steps_out = frames_out // per_step
        if c.action_dim:
            assert actions is not None and actions.shape[1] == frames_out, \
                f"an action-conditional prior needs actions for all {frames_out} frames, got {None if actions is None else tuple(actions.shape)}"
        if c.n_cond_frames and frames_fn is None and steps_out > t:
            raise ValueError("a frame-conditional prior needs frames_fn(context codes) -> frames for its later windows")

        def window_actions(start):
            """The actions of the window's frames; past the last given frame, the last action is repeated."""
            if not c.action_dim:
                return None
            idx = torch.arange(start * per_step, (start + t) * per_step, device=actions.device).clamp(max=frames_out - 1)
            return actions[:, idx]                                                        # (n, T, A)

        # The first window, then one more every s latent steps until the video is long enough.
        video = self.sample(n, label, frames, prefix=prefix, actions=window_actions(0), progress=progress,
                            **sampling)                                                   # (n, t, h, w)
        starts = range(s, max(steps_out - t, 0) + s, s)
        if progress:
            from tqdm import tqdm  # lazy: only for the progress bar
            starts = tqdm(starts, desc="windows", unit="window", leave=False)
        for start in starts:
            keep = video[:, start:]                                                       # (n, t - s, h, w)
            cond_frames = frames_fn(keep)[:, :, :c.n_cond_frames] if c.n_cond_frames else None
            window = self.sample(n, label, cond_frames, prefix=keep, actions=window_actions(start), progress=progress,
                                 **sampling)                                              # (n, t, h, w)
            video = torch.cat([video, window[:, keep.shape[1]:]], dim=1)                  # (n, start + t, h, w)
        return video[:, :steps_out]                                                       # (n, steps_out, h, w)

    @torch.no_grad()
    def sample_naive(self, n, label=None, frames=None, temperature=1.0, top_k=None, top_p=None, generator=None,
                     actions=None):
        """Reference sampler: the full teacher-forced forward at every position. O(L) times slower."""
        c = self.config
        codes = torch.zeros(n, c.seq_len, dtype=torch.long, device=self.fc_in.weight.device)
        noise = uniform_noise(n, c.n_codes, c.seq_len, generator, codes.device)
        for i in range(c.seq_len):
            logits = self(codes.view(n, *c.latent_shape), label, frames, actions).view(n, c.seq_len, -1)[:, i]  # (n, n_codes)
            codes[:, i] = sample_logits(logits, temperature, top_k, top_p, noise=next(noise))
        return codes.view(n, *c.latent_shape)                                     # (n, t, h, w)


# -----------------------------------------------------------------------------
# Loading checkpoints: ours (with the VQ-VAE inside), and the original release's priors


def count_indexed(keys, prefix):
    """How many `prefix.{i}.` sub-modules a state dict has."""
    return len({k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)})


def original_configs(ckpt, path):
    """(VQVAEConfig, GPTConfig) of an original VideoGPT prior checkpoint, from tensor shapes and its args.

    The prior's args hold no VQ-VAE hyper-parameters, so they are read off the
    weights: codebook shape, encoder width and depth, and the downsampling from
    the clip size and the lengths of the position tables (the latent shape).
    """
    sd, args = ckpt["state_dict"], original_args(ckpt, path, ("sequence_length", "resolution"))
    latent = tuple(sd[f"attn_stack.pos_embd.emb.d_{i}"].shape[0] for i in range(3))
    clip = (args.sequence_length, args.resolution, args.resolution)
    if any(s % l for s, l in zip(clip, latent)):
        raise ValueError(f"{path}: clip {clip} is not a multiple of the latent shape {latent}")
    n_codes, embedding_dim = sd["vqvae.codebook.embeddings"].shape
    vq_config = VQVAEConfig(embedding_dim=embedding_dim, n_codes=n_codes,
                            n_hiddens=sd["vqvae.encoder.conv_last.conv.weight"].shape[0],
                            n_res_layers=count_indexed(sd, "vqvae.encoder.res_stack.") - 1,  # minus the final BN
                            downsample=tuple(s // l for s, l in zip(clip, latent)),
                            sequence_length=args.sequence_length, resolution=args.resolution)
    hidden = sd["fc_in.weight"].shape[0]
    cond_w = sd.get("attn_stack.attn_nets.0.pre_attn_norm.w.weight")
    gpt_config = GPTConfig(latent_shape=latent, n_codes=n_codes, embedding_dim=embedding_dim, hidden_dim=hidden,
                           heads=getattr(args, "heads", 4), layers=count_indexed(sd, "attn_stack.attn_nets."),
                           dropout=getattr(args, "dropout", 0.2), attn_dropout=getattr(args, "attn_dropout", 0.3),
                           attn_type=getattr(args, "attn_type", "full"),
                           n_cond_frames=sd["cond_pos_embd.emb.d_0"].shape[0] if "cond_pos_embd.emb.d_0" in sd else 0,
                           resolution=args.resolution, n_classes=cond_w.shape[1] if cond_w is not None else 0,
                           sequence_length=args.sequence_length)
    return vq_config, gpt_config


def embedded_vqvae(ckpt, path):
    """The VQ-VAE a prior checkpoint of ours carries in `ckpt["vqvae"]` ({config, model}); one-line errors."""
    saved = ckpt.get("vqvae") if isinstance(ckpt.get("vqvae"), dict) else {}
    return vqvae_from_state(stored_config(VQVAEConfig, saved, path), saved.get("model"), path)


def load_gpt(path, device="cpu"):
    """(prior, VQ-VAE), both in eval mode, from our checkpoint or an original VideoGPT prior .ckpt."""
    path = os.fspath(path)
    ckpt = load_checkpoint(path)
    kind = checkpoint_kind(ckpt)
    if kind is None:
        raise ValueError(f"{path}: unknown checkpoint format (neither this project's nor VideoGPT's)")
    if kind != "gpt":
        raise ValueError(f"{path}: is a '{kind}' checkpoint, not a prior ('gpt') one")
    if "stage" in ckpt:
        vq = embedded_vqvae(ckpt, path)
        config, state = stored_config(GPTConfig, ckpt, path), ckpt.get("model")
        config.sequence_length = vq.config.sequence_length   # older checkpoints did not store it; the VQ-VAE knows
    else:
        try:
            vq_config, config = original_configs(ckpt, path)
        except KeyError as e:   # a weight the shapes are read from is missing
            raise ValueError(f"{path}: incomplete VideoGPT prior checkpoint: no {e.args[0]} in its state_dict") from None
        except (AttributeError, TypeError) as e:   # hyper_parameters or a weight of the wrong type
            raise ValueError(f"{path}: damaged VideoGPT prior checkpoint ({type(e).__name__})") from None
        sd = ckpt["state_dict"]
        vq = vqvae_from_state(vq_config, {k[6:]: v for k, v in sd.items() if k.startswith("vqvae.")}, path,
                              original=True)
        # The per-layer causal masks the original stored are rebuilt here, not loaded.
        state = {k: v for k, v in sd.items() if not k.startswith("vqvae.") and not k.endswith(".attn.attn.mask")}
        state["codebook"] = vq.codebook.embeddings.clone()
    gpt = load_weights(VideoGPT(config), state, path, "the prior's config")
    return gpt.to(device).eval(), vq.to(device).eval()
