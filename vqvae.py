"""The VQ-VAE of VideoGPT: video -> grid of discrete codes -> video.

Section 3.1 of Yan et al. (2021). Strided 3D convolutions and axial-attention residual blocks compress a clip
(B, 3, T, H, W) by `downsample` (dt, dh, dw) into a grid (B, D, t, h, w); each vector is replaced by its nearest
codebook entry (van den Oord et al., 2017), entries that follow moving averages of the encoder outputs assigned
to them (Razavi et al., 2019). A mirrored decoder turns the codes back into a video.

    from vqvae import VQVAE, VQVAEConfig, load_vqvae
    vq = VQVAE(VQVAEConfig(n_hiddens=64, n_codes=256))
    codes = vq.encode(video)        # (B, 3, T, H, W) -> (B, t, h, w) int64
    recon = vq.decode(codes)        # (B, t, h, w) -> (B, 3, T, H, W)
    out = vq(video)                 # dict: recon, loss, recon_loss, commitment_loss, perplexity, codes, usage

The arithmetic is the original implementation's, so its published checkpoints
load with `load_vqvae` and give the same codes and reconstructions; each of its
quirks is marked `# original:`. Training is train.py's.
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
    embedding_dim: int = 256          # width D of each codebook vector (and of the latent grid)
    n_codes: int = 2048               # number of codebook entries K
    n_hiddens: int = 240              # channels inside the encoder and decoder
    n_res_layers: int = 4             # attention residual blocks in the encoder, and again in the decoder
    decoder_res_layers: int = None    # the decoder's own count, when it differs (None: n_res_layers)
    local_encoder: bool = False       # each code sees only its own (dt, dh, dw) patch (see Encoder); needs n_res_layers=0
    downsample: tuple = (4, 4, 4)     # (T, H, W) compression factors, each a power of two
    sequence_length: int = 16         # frames per training clip; with resolution it fixes the latent shape
    resolution: int = 64              # height = width of training clips, pixels
    n_head: int = 2                   # heads of each axial attention
    commitment_cost: float = 0.25     # beta: weight of ||z - sg[e]||^2 in the loss
    ema_decay: float = 0.99           # decay of the codebook's moving averages
    dead_code_threshold: float = 1.0  # restart a code whose EMA uses per step fall below (the original's 1: of 32x1024)
    data_variance: float = 0.06       # divides the MSE, giving the paper's normalized MSE
    latent_shape: tuple = field(init=False)  # (t, h, w) of one training clip, derived

    def __post_init__(self):
        # Accept lists (argparse, JSON) and store tuples so configs compare and hash.
        self.downsample = tuple(int(d) for d in self.downsample)
        if self.decoder_res_layers is None:
            self.decoder_res_layers = self.n_res_layers
        input_shape = (self.sequence_length, self.resolution, self.resolution)
        bad = [f"{n}={size} is not a multiple of {d}" for n, size, d in
               zip(("sequence_length", "resolution", "resolution"), input_shape, self.downsample) if size % d]
        for ok, message in (
                (len(self.downsample) == 3, f"downsample must have 3 factors (T, H, W), got {self.downsample}"),
                (all(d >= 1 and not d & (d - 1) for d in self.downsample),
                 f"downsample factors must be powers of two, got {self.downsample}"),
                (max(self.downsample) > 1, "downsample (1, 1, 1) compresses nothing; use at least one factor of 2 or more"),
                (not (self.local_encoder and self.n_res_layers), f"local_encoder needs n_res_layers=0: the encoder's "
                 f"attention (n_res_layers={self.n_res_layers}) would let every code see the whole clip"),
                (self.n_hiddens % 2 == 0, f"n_hiddens must be even (the residual blocks halve it), got {self.n_hiddens}"),
                (self.n_hiddens % self.n_head == 0, f"n_hiddens={self.n_hiddens} is not divisible by n_head={self.n_head}"),
                (not bad, f"downsample {self.downsample} does not divide the input: {bad[0] if bad else ''}")):
            if not ok:
                raise ValueError(message)
        self.latent_shape = tuple(s // d for s, d in zip(input_shape, self.downsample))

    def to_dict(self):
        """The constructor's arguments as a plain dict, for checkpoints."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}


# -----------------------------------------------------------------------------
# "Same"-padded 3D convolutions


def same_padding(kernel_size, stride):
    """F.pad's argument padding each axis by k - s (the extra element first), so that a stride-s convolution
    maps n -> n / s, like TensorFlow's "SAME". It runs W, H, T: F.pad starts at the last axis."""
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
        self.pad = same_padding(self.conv.kernel_size, self.conv.stride)    # Conv3d made both triples

    def forward(self, x):
        return self.conv(F.pad(x, self.pad))  # (B, C_out, T/st, H/sh, W/sw)


class SamePadConvTranspose3d(nn.Module):
    """ConvTranspose3d whose output size is input size * stride, the inverse of SamePadConv3d."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, bias=True):
        super().__init__()
        self.convt = nn.ConvTranspose3d(in_channels, out_channels, kernel_size, stride=stride, bias=bias)
        self.pad = same_padding(self.convt.kernel_size, self.convt.stride)
        # original: the input is padded by k - s, then the transposed convolution crops k - 1 from each side
        # (its padding): together exactly n * s outputs.
        self.convt.padding = tuple(k - 1 for k in self.convt.kernel_size)

    def forward(self, x):
        return self.convt(F.pad(x, self.pad))  # (B, C_out, T*st, H*sh, W*sw)


# -----------------------------------------------------------------------------
# Encoder and decoder


class AttentionResidualBlock(nn.Module):
    """x + [BN-ReLU-conv3(C->C/2) - BN-ReLU-conv1(C/2->C) - BN-ReLU - axial attention](x)."""

    def __init__(self, n_hiddens, n_head=2):
        super().__init__()
        # A Sequential so that the parameter names (block.0, block.2, ..., block.8) are the original's.
        self.block = nn.Sequential(
            nn.BatchNorm3d(n_hiddens), nn.ReLU(), SamePadConv3d(n_hiddens, n_hiddens // 2, 3, bias=False),
            nn.BatchNorm3d(n_hiddens // 2), nn.ReLU(), SamePadConv3d(n_hiddens // 2, n_hiddens, 1, bias=False),
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
    """(B, 3, T, H, W) -> (B, n_hiddens, T/dt, H/dh, W/dw). `local` (not in the original): kernels equal to
    their strides and a last one of 1, so that each code is a function of its own patch and equal patches
    get equal codes, cheaper for the prior to model (docs/presets.md); the decoder still sees neighbours."""

    def __init__(self, n_hiddens, n_res_layers, downsample, n_head=2, local=False):
        super().__init__()
        # One stride-2 conv per halving; an axis that is already small enough gets stride 1.
        todo = halvings(downsample)
        self.convs = nn.ModuleList()
        for i in range(max(todo)):
            stride = tuple(2 if n > i else 1 for n in todo)
            self.convs.append(SamePadConv3d(3 if i == 0 else n_hiddens, n_hiddens, stride if local else 4, stride=stride))
        # original: conv_last took the last strided conv's *input* width, 3 (a crash) when one halving is enough.
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
            self.convts.append(SamePadConvTranspose3d(n_hiddens, 3 if i == n - 1 else n_hiddens, 4, stride=stride))

    def forward(self, h):
        # Attention residual stack at latent resolution.
        h = self.res_stack(h)                     # (B, C, t, h, w)
        # Transposed convolutions upsample, ReLU between them but not after the last.
        for i, convt in enumerate(self.convts):
            h = convt(h)                          # (B, C or 3, ...) doubled along the axes still to grow
            if i < len(self.convts) - 1:
                h = F.relu(h)
        return h                                  # (B, 3, T, H, W)


# -----------------------------------------------------------------------------
# The EMA codebook


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Codebook(nn.Module):
    """Nearest-neighbour quantizer whose entries are moving averages: embeddings e_k (K, D), N (K,) and z_avg
    (K, D) averages of how many encoder outputs chose each code and of their sum; all buffers, so checkpoints
    carry them. After each training step e_k = z_avg_k / N_k, and a code with N_k below dead_code_threshold
    restarts at a random encoder output. Under DDP counts and sums are all-reduced, random rows broadcast.
    All in float32 with autocast off: nearly equal distances and long averages are where half precision fails.
    """

    def __init__(self, n_codes, embedding_dim, decay=0.99, dead_code_threshold=1.0, eps=1e-7):
        super().__init__()
        self.n_codes, self.embedding_dim, self.decay, self.dead_code_threshold = n_codes, embedding_dim, decay, dead_code_threshold
        self.eps = eps  # Laplace smoothing of the counts, so an unused code never divides by zero
        self.register_buffer("embeddings", torch.randn(n_codes, embedding_dim))
        self.register_buffer("N", torch.zeros(n_codes))
        self.register_buffer("z_avg", self.embeddings.clone())
        # original: a plain Python attribute, so a resumed run re-initialised its codebook.
        self.register_buffer("initialized", torch.tensor(False))

    def random_rows(self, flat):
        """K rows drawn without replacement from flat (N, D), identical on every rank. original: fewer than K
        vectors are tiled and jittered by noise of std 0.01 / sqrt(D), so that repeated rows still differ."""
        n, d = flat.shape
        if n < self.n_codes:
            flat = flat.repeat((self.n_codes + n - 1) // n, 1)             # (ceil(K/N)*N, D)
            flat = flat + torch.randn_like(flat) * (0.01 / math.sqrt(d))
        rows = flat[torch.randperm(flat.shape[0], device=flat.device)[: self.n_codes]]  # (K, D)
        if _distributed():
            dist.broadcast(rows, src=0)
        return rows

    def nearest(self, flat):
        """Index of the nearest code for each row of flat (N, D) -> (N,)."""
        # ||z||^2 - 2 z.e + ||e||^2, in the original's order so that ties break the same way.
        distances = ((flat ** 2).sum(dim=1, keepdim=True)
                     - 2 * flat @ self.embeddings.t()
                     + (self.embeddings.t() ** 2).sum(dim=0, keepdim=True))  # (N, K)
        return distances.argmin(dim=1)

    @torch.no_grad()
    def ema_update(self, flat, idx, counts):
        """One EMA step from the encoder outputs flat (N, D), their codes idx (N,) and its histogram (K,)."""
        # Per-code counts and sums of this batch (all ranks' batches under DDP).
        n_total = counts.clone()                                                      # (K,)
        encode_sum = torch.zeros_like(self.z_avg).index_add_(0, idx, flat)           # (K, D)
        if _distributed():
            dist.all_reduce(n_total)
            dist.all_reduce(encode_sum)
        # A diverging encoder (NaN or inf on any rank: the sums are all-reduced) must not poison the
        # averages for good: skip the update (the step is skipped too).
        if not torch.isfinite(encode_sum).all():
            return
        # Moving averages of counts and sums.
        self.N.mul_(self.decay).add_(n_total, alpha=1 - self.decay)
        self.z_avg.mul_(self.decay).add_(encode_sum, alpha=1 - self.decay)
        # e_k = z_avg_k / N_k with Laplace-smoothed counts that keep the total n.
        n = self.N.sum()
        weights = (self.N + self.eps) / (n + self.n_codes * self.eps) * n               # (K,)
        self.embeddings.copy_(self.z_avg / weights.unsqueeze(1))
        # Restart dead codes at random encoder outputs (N and z_avg left as they are, so a code is restarted
        # each step until used). original: drew the random rows every step; here only when a code is dead.
        dead = self.N < self.dead_code_threshold                                       # (K,)
        if dead.any():
            self.embeddings.copy_(torch.where(dead.unsqueeze(1), self.random_rows(flat), self.embeddings))

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
            # Nearest code for every latent vector.
            idx = self.nearest(flat.detach())                      # (B*t*h*w,)
            codes = idx.view(B, t, h, w)                           # (B, t, h, w)
            counts = torch.bincount(idx, minlength=self.n_codes).float()  # (K,) this batch's histogram
            e = F.embedding(codes, self.embeddings).permute(0, 4, 1, 2, 3)  # (B, D, t, h, w)
            # The encoder is pulled towards its codes; the codes themselves move by EMA.
            commitment_loss = F.mse_loss(z, e.detach())
            if self.training:
                self.ema_update(flat.detach(), idx, counts)
            # Straight-through estimator: forward uses e, backward passes gradients to z unchanged.
            e_st = z + (e - z).detach()                            # (B, D, t, h, w)
            # Codebook health: perplexity of this batch's code histogram, and the share of codes it used.
            probs = counts / idx.numel()
            perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
            usage = (counts > 0).float().mean()
        return dict(embeddings=e_st, codes=codes, commitment_loss=commitment_loss,
                    perplexity=perplexity, usage=usage)


# -----------------------------------------------------------------------------
# The VQ-VAE, and loading it: our checkpoints and the original release's (read safely by checkpoints.py)


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
        assert x.dim() == 5 and x.shape[1] == 3, f"expected a video of shape (B, 3, T, H, W), got {tuple(x.shape)}"
        for name, size, d in zip("THW", x.shape[2:], self.config.downsample):
            assert size % d == 0, \
                f"{name}={size} is not divisible by its downsample factor {d} (downsample={self.config.downsample})"

    def forward(self, x):
        """x (B, 3, T, H, W) in [-0.5, 0.5] -> dict of reconstruction, losses and codebook statistics."""
        self.check_video(x)
        # Encode, project to the codebook's width, quantize.
        z = self.pre_vq_conv(self.encoder(x))                   # (B, D, t, h, w)
        vq = self.codebook(z)
        # Decode the (straight-through) quantized grid.
        recon = self.decoder(self.post_vq_conv(vq["embeddings"]))  # (B, 3, T, H, W)
        # Normalized MSE: the MSE divided by the data's variance, as in the paper.
        recon_loss = F.mse_loss(recon.float(), x.float()) / self.config.data_variance
        commitment_loss = self.config.commitment_cost * vq["commitment_loss"]
        return dict(recon=recon, loss=recon_loss + commitment_loss, recon_loss=recon_loss,
                    commitment_loss=commitment_loss, perplexity=vq["perplexity"],
                    usage=vq["usage"], codes=vq["codes"])

    @torch.no_grad()
    def encode(self, x):
        """(B, 3, T, H, W) in [-0.5, 0.5] -> codes (B, t, h, w) int64. Never updates the codebook."""
        self.check_video(x)
        z = self.pre_vq_conv(self.encoder(x))                   # (B, D, t, h, w)
        with torch.autocast(device_type=z.device.type, enabled=False):
            B, D, t, h, w = z.shape
            flat = z.float().permute(0, 2, 3, 4, 1).reshape(-1, D)   # (B*t*h*w, D)
            return self.codebook.nearest(flat).view(B, t, h, w)    # (B, t, h, w)

    @torch.no_grad()
    def decode(self, codes):
        """codes (B, t, h, w) int64 -> video (B, 3, T, H, W), roughly in [-0.5, 0.5]."""
        assert codes.dim() == 4 and codes.dtype == torch.long, f"expected int64 codes (B, t, h, w), got {codes.dtype} {tuple(codes.shape)}"
        e = F.embedding(codes, self.codebook.embeddings)        # (B, t, h, w, D)
        h = self.post_vq_conv(e.permute(0, 4, 1, 2, 3))         # (B, C, t, h, w)
        return self.decoder(h)                                  # (B, 3, T, H, W)


def load_vqvae(path, device="cpu"):
    """Load a VQ-VAE in eval mode from our checkpoint or an original VideoGPT .ckpt."""
    ckpt = load_checkpoint(path)
    expect_kind(ckpt, path, "vqvae")
    if "stage" in ckpt:
        config, state = stored_config(VQVAEConfig, ckpt, path), ckpt.get("model")
    else:
        kwargs, state = original_vqvae(ckpt, path)
        config = VQVAEConfig(**kwargs)
    return load_weights(VQVAE(config), state, path, "the VQ-VAE's config").to(device).eval()
