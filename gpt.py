"""The GPT prior of VideoGPT: an autoregressive transformer over the VQ-VAE's codes.

This is Section 3.2 of Yan et al. (2021). The VQ-VAE turns a clip into a (t, h, w) grid of codes.
The prior reads the grid in raster order as one sequence of L = t*h*w tokens, each token the
code's codebook vector. The sequence is shifted right behind a learned start vector and given a
position embedding per axis, and a stack of causal pre-norm blocks predicts every code from the
codes before it. A prior can also be conditioned: on a class, on the first frames of the clip, or
on the actions taken in each frame ("The conditioning inputs" below tells how).

    from gpt import VideoGPT, GPTConfig, load_gpt
    gpt, vq = load_gpt("runs/gpt/ckpt.pt")   # ours, or an original VideoGPT prior .ckpt
    logits = gpt(codes, label=None, frames=None, actions=None)   # (B, t, h, w, n_codes)
    codes = gpt.sample(16, temperature=1.0, top_k=None, top_p=None, generator=g)
    video = vq.decode(codes)                 # (16, 3, T, H, W)

Read it in order: the config, the norms, the block, the right shift, the conditioning inputs,
how a code is drawn from its logits, and then `VideoGPT` itself, whose `forward` trains and whose
`sample` draws one code after the other through a key/value cache. The released VideoGPT priors
load and give the same logits; where that needs a particular piece of arithmetic, a one-line
comment says so, and docs/compatibility.md tells why. fast.py samples the same codes, sooner.
"""

import math
import os
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import (BroadcastPosEmbed, KVCache, MultiHeadAttention, causal_mask,
                       rotary_tables, strided_sparse_layout)
from checkpoints import (current_prior_keys, expect_kind, load_checkpoint, load_weights,
                         original_prior, stored_config)
from vqvae import VQVAE, VQVAEConfig

# The width of the tokens that the blocks cross-attend to: frame features and action tokens.
CONTEXT_DIM = 240


@dataclass
class GPTConfig:
    latent_shape: tuple = (4, 32, 32)  # (t, h, w) of the VQ-VAE's code grid for one clip
    n_codes: int = 2048                # VQ-VAE codebook size, so the number of logits
    embedding_dim: int = 256           # width of the VQ-VAE's code vectors, the prior's input
    hidden_dim: int = 576              # transformer width; divisible by 3 and by heads
    heads: int = 4                     # attention heads
    layers: int = 8                    # transformer blocks
    dropout: float = 0.2               # dropout on each residual branch
    attn_dropout: float = 0.3          # dropout on attention weights (full attention only)
    attn_type: str = "full"            # "full" causal attention, or the strided "sparse" pattern
    n_cond_frames: int = 0             # first frames given as conditioning (0: none)
    resolution: int = 64               # frame size of conditioning frames, pixels
    n_classes: int = 0                 # classes for class conditioning (0: none)
    action_dim: int = 0                # size of each frame's action vector (0: no actions)
    action_norms: bool = False         # actions through the conditional norms (the paper's way)
    sequence_length: int = 16          # frames per clip (the VQ-VAE's); one action per frame
    sparse_block: int = 32             # sparse attention: tokens per block
    sparse_local_blocks: int = 4       # sparse attention: preceding blocks every block sees
    rope: bool = False                 # rotary embeddings in self-attention, besides the tables
    seq_len: int = field(init=False)          # t*h*w, derived
    norm_cond: int = field(init=False)        # width of the norms' conditioning vector
    cross_attends: bool = field(init=False)   # whether the blocks cross-attend (frames, actions)

    def __post_init__(self):
        self.latent_shape = tuple(int(s) for s in self.latent_shape)
        self.seq_len = math.prod(self.latent_shape)
        # The norms see a class's one-hot and, with action norms, all T actions of the clip.
        action_columns = self.sequence_length * self.action_dim if self.action_norms else 0
        self.norm_cond = self.n_classes + action_columns
        # Frames always arrive as tokens to cross-attend to; actions do unless they go to the norms.
        self.cross_attends = bool(self.n_cond_frames or (self.action_dim and not self.action_norms))
        self.check()

    def check(self):
        """Raise a one-line ValueError for sizes that cannot build a prior."""
        axes = len(self.latent_shape)
        if self.hidden_dim % axes:
            raise ValueError(
                f"hidden_dim={self.hidden_dim} is not divisible by {axes}: the position "
                f"embedding has one table of hidden_dim/{axes} per latent axis")
        if self.hidden_dim % self.heads:
            raise ValueError(
                f"hidden_dim={self.hidden_dim} is not divisible by heads={self.heads}")
        if self.attn_type not in ("full", "sparse"):
            raise ValueError(f"attn_type must be 'full' or 'sparse', got {self.attn_type!r}")
        if self.attn_type == "sparse" and self.seq_len % self.sparse_block:
            raise ValueError(
                f"sparse attention needs t*h*w={self.seq_len} to be a multiple of "
                f"sparse_block={self.sparse_block}")
        if self.n_cond_frames and self.resolution % 4:
            raise ValueError("frame conditioning needs resolution divisible by 4")
        if self.cross_attends and CONTEXT_DIM % self.heads:
            raise ValueError(
                f"frame and action conditioning need heads to divide the context width "
                f"{CONTEXT_DIM}, got {self.heads}")

    @property
    def cond_shape(self):
        """The (k, H/4, W/4) grid of the conditioning frames' features."""
        return (self.n_cond_frames, self.resolution // 4, self.resolution // 4)

    def to_dict(self):
        """The constructor's arguments as a plain dict, for checkpoints."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}


# -----------------------------------------------------------------------------
# Normalisation, optionally conditional


class CondLayerNorm(nn.Module):
    """A LayerNorm whose gain and bias can depend on a conditioning vector c.

    Without conditioning, the gain and bias are learned vectors, as in nn.LayerNorm. With it,
    they are computed from c by two linear maps: the gain is 1 + to_gain(c) and the bias is
    to_bias(c). The vector c is a class's one-hot, followed (with action norms) by the clip's
    actions, so each class, and each action sequence, gets its own scale and shift of every
    feature (Perez et al., 2018, call this FiLM).
    """

    def __init__(self, dim, cond_dim=0):
        super().__init__()
        self.conditional = cond_dim > 0
        if self.conditional:
            self.to_gain = nn.Linear(cond_dim, dim, bias=False)
            self.to_bias = nn.Linear(cond_dim, dim, bias=False)
        else:
            self.gain = nn.Parameter(torch.ones(dim))
            self.bias = nn.Parameter(torch.zeros(dim))

    def gain_bias(self, vector=None):
        """The gain and bias: the learned vectors (D,), or ones computed from `vector` (B, 1, D)."""
        if self.conditional:
            gain = 1 + self.to_gain(vector).unsqueeze(1)    # (B, 1, D)
            bias = self.to_bias(vector).unsqueeze(1)        # (B, 1, D)
            return gain, bias
        return self.gain, self.bias

    def forward(self, x, vector=None):
        return normalize(x, *self.gain_bias(vector))


def normalize(x, gain, bias):
    """Layer normalisation of x over its last axis, computed in float32 whatever autocast says.

    Exactness: the epsilon is added to 1/sqrt(var), not to var under the root (see
    docs/compatibility.md; nn.LayerNorm's arithmetic moves the released priors' logits by 1e-4).
    """
    xf = x.float()
    mean = xf.mean(dim=-1, keepdim=True)
    var = (xf - mean).square().mean(dim=-1, keepdim=True)
    xf = (xf - mean) * (1e-5 + var.rsqrt())
    return (xf * gain.float() + bias.float()).type_as(x)


# -----------------------------------------------------------------------------
# The transformer block


def gelu2(x):
    """x * sigmoid(1.702 x): the sigmoid approximation of GELU (Hendrycks and Gimpel, 2016)."""
    return (1.702 * x).sigmoid() * x


class MLP(nn.Module):
    """The block's feed-forward part: up to four times the width, GELU, and back down."""

    def __init__(self, dim):
        super().__init__()
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.down(gelu2(self.up(x)))


class Block(nn.Module):
    """A pre-norm transformer block with three residual branches.

    Each branch normalises its input, transforms it, and adds the result back to the stream:
    causal self-attention over the codes, then cross-attention to the conditioning tokens (frames
    or action tokens, if any), then the MLP. Every norm is a CondLayerNorm.
    """

    def __init__(self, config):
        super().__init__()
        c, h = config, config.hidden_dim
        self.attn_norm = CondLayerNorm(h, c.norm_cond)
        # Exactness: sparse attention has no dropout on its weights, as in the released code.
        attn_dropout = c.attn_dropout if c.attn_type == "full" else 0.0
        self.attn = MultiHeadAttention(h, h, c.heads, n_layer=c.layers, attn_dropout=attn_dropout)
        self.cross_norm = self.cross_attn = None
        if c.cross_attends:
            self.cross_norm = CondLayerNorm(h, c.norm_cond)
            self.cross_attn = MultiHeadAttention(h, CONTEXT_DIM, c.heads, n_layer=c.layers)
        self.mlp_norm = CondLayerNorm(h, c.norm_cond)
        self.mlp = MLP(h)
        # Dropout on each branch's output, before it joins the stream.
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x, cond, mask, cache=None, pos=None, rotary=None):
        """Stream x (B, n, hidden) -> (B, n, hidden).

        `mask` (n, L) says which positions each of the n tokens may attend to. With a `cache`, the
        tokens sit at positions `pos` (n,) and their keys and values are written there. `rotary`
        is the (cos, sin) of those positions, or None.
        """
        vector = cond["vector"]
        h = self.attn(self.attn_norm(x, vector), mask=mask, cache=cache, pos=pos, rotary=rotary)
        x = x + self.dropout(h)
        if self.cross_attn is not None:
            # Every conditioning token is known before the first code, so no mask is needed.
            h = self.cross_attn(self.cross_norm(x, vector), context=cond["context"])
            x = x + self.dropout(h)
        return x + self.dropout(self.mlp(self.mlp_norm(x, vector)))


# -----------------------------------------------------------------------------
# The right shift: position i sees the codes before i


class RightShift(nn.Module):
    """Puts a learned start vector in front of the sequence and drops its last token.

    Position i then holds token i - 1, so the causal blocks predict token i from the tokens before
    it; position 0, which sees only the start vector, predicts the first code."""

    def __init__(self, dim):
        super().__init__()
        self.sos = nn.Parameter(torch.empty(dim).normal_(std=0.02))   # "start of sequence"

    def forward(self, x):
        sos = self.sos.to(x.dtype).expand(x.shape[0], 1, -1)   # (B, 1, hidden)
        return torch.cat([sos, x[:, :-1]], dim=1)              # (B, L, hidden)


# -----------------------------------------------------------------------------
# The conditioning inputs
#
# A prior can be told three things, and each reaches the blocks by one of two doors.
#
# * A class becomes a one-hot vector. That vector drives every CondLayerNorm: each class scales
#   and shifts every feature in its own way.
# * The first frames of the clip pass through a 3D ResNet (below). Its features, with a position
#   embedding, become tokens that every block cross-attends to.
# * Actions, one vector per frame, take either door. As tokens (the default), each frame's action
#   is mapped to the context width and given its frame's embedding, and joins the frames' tokens:
#   a code can then attend to the actions of the frames it depends on. Through the norms (the
#   paper's way, --action_cond norms), the clip's T actions are flattened and appended to the
#   class's one-hot, so the norms' vector is (n_classes + T * action_dim) wide.
#
# The norms' weights for the action columns start at zero (see VideoGPT.init_weights): a new
# prior then normalises as if it had no actions and learns how far each action should move each
# gain. A default random start would add many random offsets to every gain, one per active action
# entry, before the prior has learned anything about actions.


class ChannelNorm(nn.LayerNorm):
    """A LayerNorm over the channels of a (B, C, T, H, W) tensor, in float32."""

    def forward(self, x):
        y = super().forward(x.float().movedim(1, -1))    # (B, T, H, W, C)
        return y.movedim(-1, 1).type_as(x)               # (B, C, T, H, W)


class ResidualBlock3d(nn.Module):
    """Two normalised 3x3x3 convolutions and a shortcut, projected when the shape changes."""

    def __init__(self, in_channels, filters, stride, projection=False):
        super().__init__()
        self.projection = projection
        if projection:
            self.proj_conv = nn.Conv3d(in_channels, filters, 1, stride=stride, bias=False)
            self.proj_norm = ChannelNorm(filters)
        self.conv1 = nn.Conv3d(in_channels, filters, 3, stride=stride, padding=1, bias=False)
        self.norm1 = ChannelNorm(filters)
        self.conv2 = nn.Conv3d(filters, filters, 3, padding=1, bias=False)
        self.norm2 = ChannelNorm(filters)

    def forward(self, x):
        shortcut = self.proj_norm(self.proj_conv(x)) if self.projection else x
        h = F.relu(self.norm1(self.conv1(x)))
        # Exactness: a ReLU before the residual sum as well as after it, as in the released code.
        h = F.relu(self.norm2(self.conv2(h)))
        return F.relu(h + shortcut)


def block_group(in_channels, filters, blocks, stride):
    """`blocks` residual blocks; the first projects its input to `filters` channels at `stride`."""
    # The plain blocks are made first: that order of drawing initial weights is kept from the
    # paper's code, so a seed gives the same prior.
    rest = [ResidualBlock3d(filters, filters, 1) for _ in range(blocks - 1)]
    first = ResidualBlock3d(in_channels, filters, stride, projection=True)
    return nn.Sequential(first, *rest)


class ResNet3d(nn.Module):
    """Frames (B, 3, k, H, W) -> features (B, k, H/4, W/4, 240).

    A ResNet-34 in 3D: a 3x3x3 stem, then groups of 3, 4, 6 and 3 residual blocks, 64, 128, 256
    and 240 channels wide. Groups 2 and 3 halve the height and width; time is never downsampled,
    so each conditioning frame keeps its own features.
    """

    def __init__(self, out_dim=CONTEXT_DIM):
        super().__init__()
        self.stem_conv = nn.Conv3d(3, 64, kernel_size=3, padding=1, bias=False)
        self.stem_norm = ChannelNorm(64)
        self.group1 = block_group(64, 64, blocks=3, stride=1)
        self.group2 = block_group(64, 128, blocks=4, stride=(1, 2, 2))
        self.group3 = block_group(128, 256, blocks=6, stride=(1, 2, 2))
        self.group4 = block_group(256, out_dim, blocks=3, stride=1)

    def forward(self, x):
        x = F.relu(self.stem_norm(self.stem_conv(x)))              # (B, 64, k, H, W)
        x = self.group2(self.group1(x))                            # (B, 128, k, H/2, W/2)
        x = self.group4(self.group3(x))                            # (B, 240, k, H/4, W/4)
        return x.movedim(1, -1)                                    # (B, k, H/4, W/4, 240)


def check_conditioning(c, batch_size, label, frames, actions):
    """Raise a one-line error unless the inputs are what the prior with config c is given."""
    if c.n_classes:
        assert label is not None, "this prior is class-conditional: pass label=(B,) int64"
        in_range = int(label.min()) >= 0 and int(label.max()) < c.n_classes
        assert label.shape == (batch_size,) and in_range, (
            f"label must be (B={batch_size},) in [0, {c.n_classes}), got {tuple(label.shape)}")
    if c.n_cond_frames:
        expected = (batch_size, 3, c.n_cond_frames, c.resolution, c.resolution)
        got = None if frames is None else tuple(frames.shape)
        assert got == expected, (
            f"this prior is frame-conditional: frames must be {expected}, got {got}")
    if c.action_dim:
        expected = (batch_size, c.sequence_length, c.action_dim)
        got = None if actions is None else tuple(actions.shape)
        assert got == expected, (
            f"this prior is action-conditional: actions must be {expected}, got {got}")


# -----------------------------------------------------------------------------
# Drawing a code from its logits


def sample_logits(logits, temperature=1.0, top_k=None, top_p=None, generator=None, noise=None):
    """One index per row of `logits` (B, V), after temperature, top-k and nucleus filtering.

    The draw uses the Gumbel-max trick. For uniform noise u (B, V), the index of the largest
    logits / T - log(-log u) is distributed as softmax(logits / T). The noise is given, or drawn
    from `generator`. Written this way the draw is plain arithmetic on an input: the same noise
    gives the same codes, in every sampler of the project.
    """
    assert temperature > 0, f"temperature must be positive, got {temperature}"
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]            # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Keep the smallest set of most likely codes whose probabilities sum to top_p.
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        # A code is dropped when the codes before it already reach top_p; the first never is.
        drop = probs.cumsum(dim=-1) - probs > top_p                          # (B, V)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if noise is None:
        noise = torch.rand(logits.shape, generator=generator, device=logits.device)
    # u = 0 gives -inf here, so that code is never drawn, just as a probability of 0 would be.
    gumbel = -torch.log(-torch.log(noise))
    return (logits + gumbel).argmax(dim=-1)                                  # (B,)


def uniform_noise(n, n_codes, steps, generator, device, chunk=64):
    """The uniform noise of `steps` draws, (n, n_codes) each, `chunk` draws per generator call.

    Every sampler reads its noise from here, so one generator gives them all the same codes.
    """
    for start in range(0, steps, chunk):
        size = min(chunk, steps - start)
        yield from torch.rand(size, n, n_codes, generator=generator, device=device)


# -----------------------------------------------------------------------------
# The prior


class VideoGPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        # A frozen copy of the VQ-VAE's codebook: the prior's input is each code's vector.
        self.register_buffer("codebook", torch.zeros(c.n_codes, c.embedding_dim))
        if c.n_cond_frames:
            self.resnet = ResNet3d(CONTEXT_DIM)
            self.cond_pos_embd = BroadcastPosEmbed(c.cond_shape, CONTEXT_DIM)
        if c.action_dim and not c.action_norms:
            # Action tokens: the action mapped to the context width, plus its frame's embedding.
            self.action_in = nn.Linear(c.action_dim, CONTEXT_DIM)
            self.action_pos = nn.Parameter(
                torch.empty(c.sequence_length, CONTEXT_DIM).normal_(std=0.01))
        self.fc_in = nn.Linear(c.embedding_dim, c.hidden_dim, bias=False)
        self.right_shift = RightShift(c.hidden_dim)
        self.pos_embd = BroadcastPosEmbed(c.latent_shape, c.hidden_dim)
        self.blocks = nn.ModuleList([Block(c) for _ in range(c.layers)])
        self.norm = CondLayerNorm(c.hidden_dim, c.norm_cond)
        self.fc_out = nn.Linear(c.hidden_dim, c.n_codes, bias=False)
        # Where each position may attend (True): every earlier position, or the sparse pattern.
        if c.attn_type == "sparse":
            mask = strided_sparse_layout(c.latent_shape, c.sparse_block, c.sparse_local_blocks)
        else:
            mask = causal_mask(c.seq_len)
        self.register_buffer("mask", mask, persistent=False)
        if c.rope:
            cos, sin = rotary_tables(c.latent_shape, c.hidden_dim // c.heads)   # (L, 2P) each
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Initialise as the paper's code does; what is not named keeps PyTorch's default.

        fc_in.weight is normal with std 0.02, like the start vector (RightShift); the position
        tables have std 0.01 (BroadcastPosEmbed), the attention projections are set in
        MultiHeadAttention.init_weights, and fc_out.weight is zero, so every code starts equally
        likely. A conditional norm's to_gain is 1/sqrt(n_classes) in the class columns, and both
        its maps are zero in the action columns (see "The conditioning inputs" for why).
        """
        self.fc_in.weight.normal_(std=0.02)
        self.fc_out.weight.zero_()
        k = self.config.n_classes
        for m in self.modules():
            if isinstance(m, CondLayerNorm) and m.conditional:
                m.to_gain.weight[:, :k].fill_(1.0 / math.sqrt(max(k, 1)))
                m.to_gain.weight[:, k:].zero_()
                m.to_bias.weight[:, k:].zero_()

    def set_codebook(self, embeddings):
        """Copy the VQ-VAE's codebook (n_codes, embedding_dim) into the prior."""
        assert embeddings.shape == self.codebook.shape, (
            f"codebook {tuple(embeddings.shape)} is not {tuple(self.codebook.shape)}")
        self.codebook.copy_(embeddings)

    # --- the conditioning: one function per kind ---

    def condition(self, label, frames, batch_size, actions=None):
        """The checked conditioning of a batch, as the blocks read it: dict(vector=the norms'
        vector (B, norm_cond), context=the tokens to cross-attend to (B, n_ctx, 240)), each None
        where the prior is not given that kind."""
        c = self.config
        check_conditioning(c, batch_size, label, frames, actions)
        vectors, tokens = [], []
        if c.n_classes:
            vectors.append(self.class_vector(label))              # (B, n_classes)
        if c.n_cond_frames:
            tokens.append(self.frame_tokens(frames))              # (B, k*H/4*W/4, 240)
        if c.action_dim:
            actions = actions.to(self.fc_in.weight.dtype)
            if c.action_norms:
                vectors.append(actions.flatten(1))                # (B, T*A)
            else:
                tokens.append(self.action_tokens(actions))        # (B, T, 240)
        vector = torch.cat(vectors, dim=1) if vectors else None   # (B, norm_cond)
        context = torch.cat(tokens, dim=1) if tokens else None    # (B, n_ctx, 240)
        return dict(vector=vector, context=context)

    def class_vector(self, label):
        """Class indices (B,) -> their one-hot vectors (B, n_classes), the norms' first columns."""
        return F.one_hot(label, self.config.n_classes).to(self.fc_in.weight.dtype)

    def frame_tokens(self, frames):
        """Frames (B, 3, k, H, W) -> one token per feature position (B, k*H/4*W/4, 240)."""
        features = self.resnet(frames)                             # (B, k, H/4, W/4, 240)
        return self.cond_pos_embd(features.flatten(1, 3))          # (B, k*H/4*W/4, 240)

    def action_tokens(self, actions):
        """Actions (B, T, A) -> one token per frame (B, T, 240), each tagged with its frame."""
        return self.action_in(actions) + self.action_pos           # (B, T, 240)

    # --- training: every position at once ---

    def embed(self, codes):
        """Codes (B, n) -> input vectors (B, n, hidden): the codebook lookup, then fc_in."""
        vectors = F.embedding(codes, self.codebook).to(self.fc_in.weight.dtype)   # (B, n, emb)
        return self.fc_in(vectors)                                                # (B, n, hidden)

    def rotary_at(self, pos=None):
        """(cos, sin) of the rotary embedding at positions pos (n,), or at all without pos."""
        if not self.config.rope:
            return None
        cos, sin = self.rope_cos, self.rope_sin
        return (cos, sin) if pos is None else (cos[pos], sin[pos])

    def forward(self, codes, label=None, frames=None, actions=None):
        """Teacher-forced logits (B, t, h, w, n_codes): position i sees the codes before i."""
        c = self.config
        assert codes.dtype == torch.long and tuple(codes.shape[1:]) == c.latent_shape, (
            f"codes must be int64 (B, {', '.join(map(str, c.latent_shape))}), "
            f"got {codes.dtype} {tuple(codes.shape)}")
        B = codes.shape[0]
        cond = self.condition(label, frames, B, actions)
        # The inputs: code vectors in raster order, shifted right, plus their positions.
        x = self.embed(codes.flatten(1))                           # (B, L, hidden)
        x = self.pos_embd(self.right_shift(x))                     # (B, L, hidden)
        for block in self.blocks:
            x = block(x, cond, self.mask, rotary=self.rotary_at())
        logits = self.fc_out(self.norm(x, cond["vector"]))         # (B, L, n_codes)
        return logits.view(B, *c.latent_shape, c.n_codes)          # (B, t, h, w, n_codes)

    # --- sampling: one position at a time, through the key/value cache ---

    def setup_caches(self, batch_size, device, dtype=None):
        """Fresh full-length key/value buffers for every layer, in the weights' dtype (which
        holds autocast's bfloat16 or float16 keys exactly)."""
        c, dtype = self.config, dtype or self.fc_in.weight.dtype
        d = c.hidden_dim // c.heads
        return [KVCache(batch_size, c.heads, c.seq_len, d, d, dtype, device)
                for _ in range(c.layers)]

    def step(self, x, pos, cond, caches):
        """Run inputs x (B, n, hidden) at positions pos (n,) through the blocks; logits (B, n, V).

        Each block writes the new keys and values into its cache. A query reads the cache through
        its row of the mask, which never shows a position that has not been written yet.
        """
        x = self.pos_embd(x, pos)                                  # (B, n, hidden)
        for block, cache in zip(self.blocks, caches):
            x = block(x, cond, self.mask[pos], cache=cache, pos=pos, rotary=self.rotary_at(pos))
        return self.fc_out(self.norm(x, cond["vector"]))           # (B, n, n_codes)

    @torch.no_grad()
    def sample(self, n, label=None, frames=None, actions=None, temperature=1.0, top_k=None,
               top_p=None, generator=None):
        """Draw n code grids (n, t, h, w), one code after the other, each given those before."""
        c, device = self.config, self.fc_in.weight.device
        cond = self.condition(label, frames, n, actions)
        caches = self.setup_caches(n, device)
        codes = torch.zeros(n, c.seq_len, dtype=torch.long, device=device)
        noise = uniform_noise(n, c.n_codes, c.seq_len, generator, device)
        # The start vector goes in at position 0, and its logits give the first code.
        x = self.right_shift.sos.to(self.fc_in.weight.dtype).expand(n, 1, -1)   # (n, 1, hidden)
        for i in range(c.seq_len):
            pos = torch.tensor([i], device=device)
            logits = self.step(x, pos, cond, caches)                            # (n, 1, n_codes)
            codes[:, i] = sample_logits(logits[:, 0], temperature, top_k, top_p,
                                        noise=next(noise))
            # The code just drawn is the input at the next position.
            x = self.embed(codes[:, i:i + 1])                                   # (n, 1, hidden)
        return codes.view(n, *c.latent_shape)                                   # (n, t, h, w)


# -----------------------------------------------------------------------------
# Loading a prior: ours (with its VQ-VAE inside), and the original release's


def embedded_vqvae(ckpt, path):
    """The VQ-VAE that a prior checkpoint of ours carries in ckpt["vqvae"] ({config, model})."""
    saved = ckpt.get("vqvae") if isinstance(ckpt.get("vqvae"), dict) else {}
    vq = VQVAE(stored_config(VQVAEConfig, saved, path))
    return load_weights(vq, saved.get("model"), path, "the VQ-VAE's config")


def load_gpt(path, device="cpu"):
    """(prior, VQ-VAE), both in eval mode, from our checkpoint or an original VideoGPT prior."""
    path = os.fspath(path)
    ckpt = load_checkpoint(path)
    expect_kind(ckpt, path, "gpt")
    if "stage" in ckpt:
        vq = embedded_vqvae(ckpt, path)
        config, state = stored_config(GPTConfig, ckpt, path), ckpt.get("model")
        # Older checkpoints did not store the clip length; the VQ-VAE knows it.
        config.sequence_length = vq.config.sequence_length
    else:
        # The original's files hold no configs: checkpoints.py reads them off the weights and
        # the run's arguments.
        vq_config, gpt_config, vq_state, state = original_prior(ckpt, path)
        vq = load_weights(VQVAE(VQVAEConfig(**vq_config)), vq_state, path, "the VQ-VAE's config")
        config = GPTConfig(**gpt_config)
        state["codebook"] = vq.codebook.embeddings.clone()
    # Both the original's files and this project's earlier ones use older parameter names.
    state = current_prior_keys(state)
    gpt = load_weights(VideoGPT(config), state, path, "the prior's config")
    return gpt.to(device).eval(), vq.to(device).eval()
