"""The VQ-VAE of VideoGPT: video -> grid of discrete codes -> video.

Section 3.1 of Yan et al. (2021). Strided 3D convolutions and axial-attention residual blocks
compress a clip (B, 3, T, H, W) by `downsample` (dt, dh, dw) into a grid (B, D, t, h, w). Each
vector of the grid is replaced by its nearest codebook entry (van den Oord et al., 2017), and the
entries follow moving averages of the encoder outputs assigned to them (Razavi et al., 2019). A
mirrored decoder turns the codes back into a video.

    from vqvae import VQVAE, VQVAEConfig, load_vqvae
    vq = VQVAE(VQVAEConfig(n_hiddens=64, n_codes=256))
    codes = vq.encode(video)   # (B, 3, T, H, W) -> (B, t, h, w) int64
    recon = vq.decode(codes)   # (B, t, h, w) -> (B, 3, T, H, W)
    out = vq(video)            # recon, loss, recon_loss, commitment_loss, perplexity, codes, usage

The arithmetic is that of the paper's code, so its published checkpoints load with `load_vqvae`
and give the same codes and reconstructions. Where exactness needs a choice, one comment line says
so; docs/using.md has the history. Training is train.py's.
"""

import math
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from attention import AxialAttention
from checkpoints import expect_kind, load_checkpoint, load_weights, original_vqvae, stored_config


@dataclass
class VQVAEConfig:
    embedding_dim: int = 256          # the width D of each codebook vector (and of the latent grid)
    n_codes: int = 2048               # the number K of codebook entries
    n_hiddens: int = 240              # the channels inside the encoder and the decoder
    n_res_layers: int = 4             # attention residual blocks in the encoder, and in the decoder
    decoder_res_layers: int = None    # the decoder's own count, if it differs (None: n_res_layers)
    # Each code sees only its own (dt, dh, dw) patch (see Encoder); needs n_res_layers=0.
    local_encoder: bool = False
    downsample: tuple = (4, 4, 4)     # the (T, H, W) compression factors, each a power of two
    sequence_length: int = 16         # frames per training clip; with resolution, the latent shape
    resolution: int = 64              # the height and width of training clips, in pixels
    n_head: int = 2                   # the heads of each axial attention
    commitment_cost: float = 0.25     # beta, the weight of ||z - sg[e]||^2 in the loss
    ema_decay: float = 0.99           # the decay of the codebook's moving averages
    # A code is restarted when its moving average of uses per step falls below this. The paper's
    # code used 1, with batches of 32 clips and 1024 codes.
    dead_code_threshold: float = 1.0
    data_variance: float = 0.06       # divides the MSE, which gives the paper's normalized MSE
    latent_shape: tuple = field(init=False)  # the (t, h, w) of one training clip, derived

    def __post_init__(self):
        # Accept lists (argparse, JSON) and store tuples so configs compare and hash.
        self.downsample = tuple(int(d) for d in self.downsample)
        if self.decoder_res_layers is None:
            self.decoder_res_layers = self.n_res_layers
        input_shape = (self.sequence_length, self.resolution, self.resolution)
        self.check(input_shape)
        self.latent_shape = tuple(s // d for s, d in zip(input_shape, self.downsample))

    def check(self, input_shape):
        """A ValueError that says what is wrong with the settings, if anything is."""
        ds = self.downsample
        if len(ds) != 3:
            raise ValueError(f"downsample must have 3 factors (T, H, W), got {ds}")
        if not all(d >= 1 and not d & (d - 1) for d in ds):
            raise ValueError(f"downsample factors must be powers of two, got {ds}")
        if max(ds) == 1:
            raise ValueError("downsample (1, 1, 1) compresses nothing; "
                             "use at least one factor of 2 or more")
        if self.local_encoder and self.n_res_layers:
            raise ValueError(f"local_encoder needs n_res_layers=0: the encoder's attention "
                             f"(n_res_layers={self.n_res_layers}) would let every code see the "
                             f"whole clip")
        if self.n_hiddens % 2:
            raise ValueError(f"n_hiddens must be even (the residual blocks halve it), "
                             f"got {self.n_hiddens}")
        if self.n_hiddens % self.n_head:
            raise ValueError(f"n_hiddens={self.n_hiddens} is not divisible by n_head={self.n_head}")
        names = ("sequence_length", "resolution", "resolution")
        for name, size, d in zip(names, input_shape, ds):
            if size % d:
                raise ValueError(f"downsample {ds} does not divide the input: "
                                 f"{name}={size} is not a multiple of {d}")

    def to_dict(self):
        """The constructor's arguments as a plain dict, for checkpoints."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}


# -----------------------------------------------------------------------------
# "Same"-padded 3D convolutions


def same_padding(kernel_size, stride):
    """F.pad's argument that pads each axis by k - s, the odd element first.

    A stride-s convolution then maps n positions to n / s, like TensorFlow's "SAME" padding. The
    result runs W, H, T, because F.pad starts at the last axis.
    """
    pad = []
    for k, s in zip(reversed(kernel_size), reversed(stride)):
        p = k - s
        pad += [p // 2 + p % 2, p // 2]
    return tuple(pad)


class SamePadConv3d(nn.Module):
    """Conv3d whose output size is input size / stride."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, bias=True):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, bias=bias)
        # Conv3d has made both the kernel size and the stride triples.
        self.pad = same_padding(self.conv.kernel_size, self.conv.stride)

    def forward(self, x):
        return self.conv(F.pad(x, self.pad))  # (B, C_out, T/st, H/sh, W/sw)


class SamePadConvTranspose3d(nn.Module):
    """ConvTranspose3d whose output size is input size * stride, the inverse of SamePadConv3d."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, bias=True):
        super().__init__()
        self.convt = nn.ConvTranspose3d(in_channels, out_channels, kernel_size, stride=stride,
                                        bias=bias)
        self.pad = same_padding(self.convt.kernel_size, self.convt.stride)
        # The input is padded by k - s, and the transposed convolution crops k - 1 from each side
        # (its `padding`): together, exactly n * s outputs, as in the paper's code.
        self.convt.padding = tuple(k - 1 for k in self.convt.kernel_size)

    def forward(self, x):
        return self.convt(F.pad(x, self.pad))  # (B, C_out, T*st, H*sh, W*sw)


# -----------------------------------------------------------------------------
# Encoder and decoder


class AttentionResidualBlock(nn.Module):
    """x + [BN-ReLU-conv3(C->C/2) - BN-ReLU-conv1(C/2->C) - BN-ReLU - axial attention](x)."""

    def __init__(self, n_hiddens, n_head=2):
        super().__init__()
        half = n_hiddens // 2
        self.block = nn.Sequential(
            nn.BatchNorm3d(n_hiddens), nn.ReLU(), SamePadConv3d(n_hiddens, half, 3, bias=False),
            nn.BatchNorm3d(half), nn.ReLU(), SamePadConv3d(half, n_hiddens, 1, bias=False),
            nn.BatchNorm3d(n_hiddens), nn.ReLU(), AxialAttention(n_hiddens, n_head))

    def forward(self, x):
        # Convolutional part, channels first.
        h = self.block[:-1](x)                         # (B, C, T, H, W)
        # Axial attention wants channels last.
        h = self.block[-1](h.permute(0, 2, 3, 4, 1))   # (B, T, H, W, C)
        return x + h.permute(0, 4, 1, 2, 3)            # (B, C, T, H, W)


def res_stack(n_hiddens, n_res_layers, n_head):
    """The attention residual blocks, then BN-ReLU: the encoder's end and the decoder's start."""
    blocks = [AttentionResidualBlock(n_hiddens, n_head) for _ in range(n_res_layers)]
    return nn.Sequential(*blocks, nn.BatchNorm3d(n_hiddens), nn.ReLU())


def halvings(downsample):
    """How many stride-2 stages each axis needs: (4, 4, 1) -> [2, 2, 0]."""
    return [int(math.log2(d)) for d in downsample]


class Encoder(nn.Module):
    """(B, 3, T, H, W) -> (B, n_hiddens, T/dt, H/dh, W/dw).

    With `local` (not in the paper), the kernels equal their strides and the last one is 1. Each
    code is then a function of its own patch, and equal patches get equal codes, which the prior
    finds easier to model (docs/presets.md). The decoder still sees the neighbours.
    """

    def __init__(self, n_hiddens, n_res_layers, downsample, n_head=2, local=False):
        super().__init__()
        # One stride-2 convolution per halving; an axis already small enough gets stride 1.
        todo = halvings(downsample)
        self.convs = nn.ModuleList()
        for i in range(max(todo)):
            stride = tuple(2 if n > i else 1 for n in todo)
            kernel = stride if local else 4
            self.convs.append(SamePadConv3d(3 if i == 0 else n_hiddens, n_hiddens, kernel, stride))
        self.conv_last = SamePadConv3d(n_hiddens, n_hiddens, kernel_size=1 if local else 3)
        self.res_stack = res_stack(n_hiddens, n_res_layers, n_head)

    def forward(self, x):
        # Strided convolutions with ReLU downsample each axis by its factor.
        h = x
        for conv in self.convs:
            h = F.relu(conv(h))       # (B, C, ...) halved along the axes still to shrink
        # A kernel-3 conv (no ReLU), then the attention residual stack ending in BN-ReLU.
        h = self.conv_last(h)         # (B, C, t, h, w)
        return self.res_stack(h)     # (B, C, t, h, w)


class Decoder(nn.Module):
    """(B, n_hiddens, t, h, w) -> (B, 3, t*dt, h*dh, w*dw), the encoder's mirror."""

    def __init__(self, n_hiddens, n_res_layers, upsample, n_head=2):
        super().__init__()
        self.res_stack = res_stack(n_hiddens, n_res_layers, n_head)
        # One stride-2 transposed conv per doubling; the last one outputs RGB.
        todo = halvings(upsample)
        n = max(todo)
        self.convts = nn.ModuleList()
        for i in range(n):
            stride = tuple(2 if m > i else 1 for m in todo)
            out = 3 if i == n - 1 else n_hiddens
            self.convts.append(SamePadConvTranspose3d(n_hiddens, out, 4, stride=stride))

    def forward(self, h):
        # Attention residual stack at latent resolution.
        h = self.res_stack(h)                     # (B, C, t, h, w)
        # Transposed convolutions upsample, ReLU between them but not after the last.
        for i, convt in enumerate(self.convts):
            # Doubled along the axes still to grow.
            h = convt(h)                          # (B, C or 3, ...)
            if i < len(self.convts) - 1:
                h = F.relu(h)
        return h                                  # (B, 3, T, H, W)


# -----------------------------------------------------------------------------
# The EMA codebook


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Codebook(nn.Module):
    """A nearest-neighbour quantizer whose entries are moving averages.

    It holds the embeddings e_k (K, D) and two moving averages: N (K,), of how many encoder outputs
    chose each code, and z_avg (K, D), of their sum. All three are buffers, so checkpoints carry
    them. After each training step, e_k = z_avg_k / N_k, and a code whose N_k is below
    dead_code_threshold restarts at a random encoder output. Under DDP, the counts and sums are
    all-reduced and the random rows broadcast. Everything runs in float32 with autocast off: nearly
    equal distances and long averages are where half precision fails.
    """

    def __init__(self, n_codes, embedding_dim, decay=0.99, dead_code_threshold=1.0, eps=1e-7):
        super().__init__()
        self.n_codes, self.embedding_dim = n_codes, embedding_dim
        self.decay, self.dead_code_threshold = decay, dead_code_threshold
        self.eps = eps  # Laplace smoothing of the counts, so an unused code never divides by zero
        self.register_buffer("embeddings", torch.randn(n_codes, embedding_dim))
        self.register_buffer("N", torch.zeros(n_codes))
        self.register_buffer("z_avg", self.embeddings.clone())
        # A buffer, so that a resumed run does not seed its codebook again.
        self.register_buffer("initialized", torch.tensor(False))

    def random_rows(self, flat):
        """K rows drawn without replacement from flat (N, D), the same on every rank.

        Fewer than K vectors are tiled and jittered by noise of std 0.01 / sqrt(D), so that repeated
        rows still differ (as in the paper's code).
        """
        n, d = flat.shape
        if n < self.n_codes:
            flat = flat.repeat((self.n_codes + n - 1) // n, 1)             # (ceil(K/N)*N, D)
            flat = flat + torch.randn_like(flat) * (0.01 / math.sqrt(d))
        order = torch.randperm(flat.shape[0], device=flat.device)
        rows = flat[order[: self.n_codes]]                                 # (K, D)
        if _distributed():
            dist.broadcast(rows, src=0)
        return rows

    def nearest(self, flat):
        """Index of the nearest code for each row of flat (N, D) -> (N,)."""
        # For exactness: ||z||^2 - 2 z.e + ||e||^2 in the paper's code's order, so ties break alike.
        distances = ((flat ** 2).sum(dim=1, keepdim=True)
                     - 2 * flat @ self.embeddings.t()
                     + (self.embeddings.t() ** 2).sum(dim=0, keepdim=True))  # (N, K)
        return distances.argmin(dim=1)

    @torch.no_grad()
    def ema_update(self, flat, idx, counts):
        """One EMA step from the encoder outputs flat (N, D), their codes idx (N,) and the codes'
        histogram counts (K,)."""
        # Per-code counts and sums of this batch (all ranks' batches under DDP).
        n_total = counts.clone()                                              # (K,)
        encode_sum = torch.zeros_like(self.z_avg).index_add_(0, idx, flat)   # (K, D)
        if _distributed():
            dist.all_reduce(n_total)
            dist.all_reduce(encode_sum)
        # A diverging encoder (NaN or inf on any rank, since the sums are all-reduced) must not
        # poison the averages for good: the update is skipped (and so is the step).
        if not torch.isfinite(encode_sum).all():
            return
        # Moving averages of counts and sums.
        self.N.mul_(self.decay).add_(n_total, alpha=1 - self.decay)
        self.z_avg.mul_(self.decay).add_(encode_sum, alpha=1 - self.decay)
        # e_k = z_avg_k / N_k, with Laplace-smoothed counts that keep the total n.
        n = self.N.sum()
        weights = (self.N + self.eps) / (n + self.n_codes * self.eps) * n     # (K,)
        self.embeddings.copy_(self.z_avg / weights.unsqueeze(1))
        # Restart the dead codes at random encoder outputs. N and z_avg are left as they are, so a
        # code is restarted at every step until it is used.
        dead = self.N < self.dead_code_threshold                              # (K,)
        if dead.any():
            restarted = torch.where(dead.unsqueeze(1), self.random_rows(flat), self.embeddings)
            self.embeddings.copy_(restarted)

    @torch.no_grad()
    def init_from(self, flat):
        """Seed every code with a random encoder output of the first training batch."""
        rows = self.random_rows(flat)
        if not torch.isfinite(rows).all():
            return   # a non-finite first batch: stay uninitialised and seed from the next one
        self.embeddings.copy_(rows)
        self.z_avg.copy_(rows)
        self.N.fill_(1.0)
        self.initialized.fill_(True)

    def forward(self, z):
        """Quantize z (B, D, t, h, w); in training mode also update the codebook."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            B, D, t, h, w = z.shape
            flat = z.permute(0, 2, 3, 4, 1).reshape(-1, D)        # (B*t*h*w, D)
            if self.training and not self.initialized:
                self.init_from(flat.detach())
            # The nearest code of every latent vector, and this batch's histogram of codes.
            idx = self.nearest(flat.detach())                      # (B*t*h*w,)
            codes = idx.view(B, t, h, w)                           # (B, t, h, w)
            counts = torch.bincount(idx, minlength=self.n_codes).float()          # (K,)
            e = F.embedding(codes, self.embeddings).permute(0, 4, 1, 2, 3)        # (B, D, t, h, w)
            # The encoder is pulled towards its codes; the codes themselves move by EMA.
            commitment_loss = F.mse_loss(z, e.detach())
            if self.training:
                self.ema_update(flat.detach(), idx, counts)
            # The straight-through estimator: the forward pass uses e, and the backward pass hands
            # the gradients to z unchanged.
            e_st = z + (e - z).detach()                            # (B, D, t, h, w)
            # The codebook's health: the perplexity of this batch's codes, and the share it used.
            probs = counts / idx.numel()
            perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
            usage = (counts > 0).float().mean()
        return dict(embeddings=e_st, codes=codes, commitment_loss=commitment_loss,
                    perplexity=perplexity, usage=usage)


# -----------------------------------------------------------------------------
# The VQ-VAE, and loading it (ours, and the paper's release, read safely by checkpoints.py)


class VQVAE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c.n_hiddens, c.n_res_layers, c.downsample, c.n_head, c.local_encoder)
        self.decoder = Decoder(c.n_hiddens, c.decoder_res_layers, c.downsample, c.n_head)
        # 1x1x1 convolutions in and out of the codebook's width.
        self.pre_vq_conv = SamePadConv3d(c.n_hiddens, c.embedding_dim, 1)
        self.post_vq_conv = SamePadConv3d(c.embedding_dim, c.n_hiddens, 1)
        self.codebook = Codebook(c.n_codes, c.embedding_dim, decay=c.ema_decay,
                                 dead_code_threshold=c.dead_code_threshold)

    def check_video(self, x):
        """Assert x is (B, 3, T, H, W) with T, H, W divisible by the downsample factors."""
        assert x.dim() == 5 and x.shape[1] == 3, (
            f"expected a video of shape (B, 3, T, H, W), got {tuple(x.shape)}")
        for name, size, d in zip("THW", x.shape[2:], self.config.downsample):
            assert size % d == 0, (f"{name}={size} is not divisible by its downsample factor {d} "
                                   f"(downsample={self.config.downsample})")

    def forward(self, x):
        """x (B, 3, T, H, W) in [-0.5, 0.5] -> the reconstruction, losses, codebook health."""
        self.check_video(x)
        # Encode, project to the codebook's width, and quantize.
        z = self.pre_vq_conv(self.encoder(x))                      # (B, D, t, h, w)
        vq = self.codebook(z)
        # Decode the quantized grid (straight through).
        recon = self.decoder(self.post_vq_conv(vq["embeddings"]))  # (B, 3, T, H, W)
        # Normalized MSE: the MSE divided by the data's variance, as in the paper.
        recon_loss = F.mse_loss(recon.float(), x.float()) / self.config.data_variance
        commitment_loss = self.config.commitment_cost * vq["commitment_loss"]
        return dict(recon=recon, loss=recon_loss + commitment_loss, recon_loss=recon_loss,
                    commitment_loss=commitment_loss, perplexity=vq["perplexity"],
                    usage=vq["usage"], codes=vq["codes"])

    @torch.no_grad()
    def encode(self, x):
        """(B, 3, T, H, W) in [-0.5, 0.5] -> codes (B, t, h, w) int64; the codebook stays as is."""
        self.check_video(x)
        z = self.pre_vq_conv(self.encoder(x))                   # (B, D, t, h, w)
        with torch.autocast(device_type=z.device.type, enabled=False):
            B, D, t, h, w = z.shape
            flat = z.float().permute(0, 2, 3, 4, 1).reshape(-1, D)  # (B*t*h*w, D)
            return self.codebook.nearest(flat).view(B, t, h, w)   # (B, t, h, w)

    @torch.no_grad()
    def decode(self, codes):
        """codes (B, t, h, w) int64 -> video (B, 3, T, H, W), roughly in [-0.5, 0.5]."""
        assert codes.dim() == 4 and codes.dtype == torch.long, (
            f"expected int64 codes (B, t, h, w), got {codes.dtype} {tuple(codes.shape)}")
        e = F.embedding(codes, self.codebook.embeddings)        # (B, t, h, w, D)
        h = self.post_vq_conv(e.permute(0, 4, 1, 2, 3))         # (B, C, t, h, w)
        return self.decoder(h)                                  # (B, 3, T, H, W)


def load_vqvae(path, device="cpu"):
    """A VQ-VAE in eval mode, from a checkpoint of ours or a .ckpt of the paper's release."""
    ckpt = load_checkpoint(path)
    expect_kind(ckpt, path, "vqvae")
    if "stage" in ckpt:
        config, state = stored_config(VQVAEConfig, ckpt, path), ckpt.get("model")
    else:
        kwargs, state = original_vqvae(ckpt, path)
        config = VQVAEConfig(**kwargs)
    return load_weights(VQVAE(config), state, path, "the VQ-VAE's config").to(device).eval()
