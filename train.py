"""Training entry point for both stages of VideoGPT, and the training loop they share.

`--stage vqvae` trains the VQ-VAE of Section 3.1; `--stage gpt` trains the
prior of Section 3.2 on the codes of a frozen VQ-VAE (`--vqvae PATH`: our
checkpoint or an original VideoGPT one).

Single process (GPU if present, else CPU):
    python train.py --stage vqvae --out_dir runs/vqvae
    python train.py --stage gpt --vqvae runs/vqvae/ckpt.pt --out_dir runs/gpt
Several GPUs on one machine, plain DDP:
    torchrun --standalone --nproc_per_node=8 train.py --stage vqvae --data bair.hdf5 --out_dir runs/bair
    torchrun --standalone --nproc_per_node=8 train.py --stage gpt --vqvae runs/bair/ckpt.pt --data bair.hdf5 \
        --n_cond_frames 1 --attn_type sparse --out_dir runs/bair_gpt
Several machines: the usual torchrun flags (--nnodes, --node_rank, --rdzv_endpoint).

With no --data a run trains on the built-in moving-digits set, and every flag
left out takes a small value that trains in minutes on a CPU; with --data,
flags left out take the paper's values. A run writes to --out_dir:
    ckpt.pt        latest checkpoint (written atomically; a restart resumes from it);
                   a prior's checkpoint embeds its VQ-VAE, so sample.py needs nothing else
    log.jsonl      one JSON object per logged step and per evaluation
    recon_*.png    (vqvae) test clips (odd rows) above their reconstructions (even rows)
    samples_*.gif  (gpt) real test clips (top row) above samples (bottom row)
    loss.png       training and test loss curves

Read it in this order: the flags and their presets (the one place a run's
settings are decided), the data order and the learning rate, the optimizer
(the paper's Adam, or Muon for the models' matrices), the two stages (what
differs between training the VQ-VAE and the prior: config, loss, pictures),
then `train`, the loop, with the `Run` that sets it up, logs, evaluates and
checkpoints. What guards the loop against faults (signals, dead peers,
non-finite steps, torn files) is called by name here and lives in runtime.py
and checkpoints.py.
"""

import argparse
import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from checkpoints import (DiskFull, OutputLock, atomic_write, check_writable, checkpoint_kind, keep_copy,
                         load_checkpoint, remove_stale_temps, save_checkpoint, stored_config, trim_log)
from data import grid_video, make_dataset, samples_to_uint8, save_gif, save_png, to_uint8, video_grid
from fast import use_fast_attention
from gpt import GPTConfig, VideoGPT, embedded_vqvae
from muon import make_optimizer, optimizer_kind
from runtime import (RunError, StopRequest, all_mean, autocast, collective_failure, first_line, ignore_stop_signals,
                     init_distributed, lost_peer_error, rng_state, run_cli, seed_everything, set_rng_state)
from vqvae import VQVAE, VQVAEConfig, load_vqvae

# -----------------------------------------------------------------------------
# Arguments

# Flags left unset take these values: the paper's for real data, small ones for the
# moving-digits default so that a 2-core CPU runs the whole pipeline in minutes.
PRESETS = {
    ("vqvae", "paper"): dict(embedding_dim=256, n_codes=2048, dead_code_threshold=1.0, n_hiddens=240, n_res_layers=4,
                             local_encoder=False, downsample=[4, 4, 4],
                             sequence_length=16, resolution=64, batch_size=32, optimizer="adam", lr=7e-4,
                             warmup_steps=0, lr_schedule="constant", max_steps=200_000, eval_interval=2000,
                             log_interval=50, dtype="float32"),
    ("vqvae", "digits"): dict(embedding_dim=64, n_codes=512, dead_code_threshold=0.05, n_hiddens=64, n_res_layers=0,
                              decoder_res_layers=1, local_encoder=True, downsample=[2, 4, 4],
                              sequence_length=8, resolution=32, batch_size=8, optimizer="muon", lr=4e-3,
                              warmup_steps=0, lr_schedule="constant", max_steps=4500, eval_interval=900,
                              log_interval=25, dtype="bfloat16"),
    ("gpt", "paper"): dict(hidden_dim=576, heads=4, layers=8, dropout=0.2, attn_dropout=0.3, rope=False, batch_size=32,
                           optimizer="adam", lr=3e-4, warmup_steps=1000, lr_schedule="cosine", max_steps=200_000,
                           eval_interval=2000, log_interval=50, dtype="float32"),
    ("gpt", "digits"): dict(hidden_dim=120, heads=4, layers=4, dropout=0.0, attn_dropout=0.0, rope=True, batch_size=8,
                            optimizer="muon", lr=3e-3, warmup_steps=100, lr_schedule="cosine", max_steps=4000,
                            eval_interval=2000, log_interval=25, dtype="bfloat16"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train VideoGPT's VQ-VAE or its GPT prior.")
    p.add_argument("--stage", required=True, choices=["vqvae", "gpt"], help="what to train")
    # data
    p.add_argument("--data", "--data_path", dest="data", default=None,
                   help="HDF5 file or video folder (default: the built-in moving digits)")
    p.add_argument("--sequence_length", type=int, default=None, help="frames per clip (gpt: the VQ-VAE's)")
    p.add_argument("--resolution", type=int, default=None, help="frame height = width, pixels (gpt: the VQ-VAE's)")
    p.add_argument("--batch_size", type=int, default=None, help="clips per step per process")
    p.add_argument("--num_workers", type=int, default=None,
                   help="DataLoader worker processes per process (default: half the cores, at most 4; none for "
                        "cached codes, which are already in memory)")
    # VQ-VAE
    p.add_argument("--embedding_dim", type=int, default=None, help="vqvae: width of each code vector")
    p.add_argument("--n_codes", type=int, default=None, help="vqvae: codebook size")
    p.add_argument("--dead_code_threshold", type=float, default=None,
                   help="vqvae: a code whose moving average of uses per step falls below this is restarted")
    p.add_argument("--n_hiddens", type=int, default=None, help="vqvae: channels of the encoder and decoder")
    p.add_argument("--n_res_layers", type=int, default=None, help="vqvae: attention residual blocks per side")
    p.add_argument("--decoder_res_layers", type=int, default=None,
                   help="vqvae: the decoder's attention residual blocks, when not --n_res_layers")
    p.add_argument("--local_encoder", action=argparse.BooleanOptionalAction, default=None,
                   help="vqvae: each code sees only its own patch (kernels = strides); equal patches, equal codes")
    p.add_argument("--downsample", type=int, nargs=3, default=None, metavar=("T", "H", "W"),
                   help="vqvae: compression factor per axis, powers of two")
    # prior
    p.add_argument("--vqvae", default=None, help="gpt: the frozen VQ-VAE checkpoint (ours or an original .ckpt)")
    p.add_argument("--hidden_dim", type=int, default=None, help="gpt: transformer width, divisible by 3 and heads")
    p.add_argument("--heads", type=int, default=None, help="gpt: attention heads")
    p.add_argument("--layers", type=int, default=None, help="gpt: transformer blocks")
    p.add_argument("--dropout", type=float, default=None, help="gpt: residual dropout")
    p.add_argument("--attn_dropout", type=float, default=None, help="gpt: attention-weight dropout")
    p.add_argument("--attn_type", default="full", choices=["full", "sparse"], help="gpt: causal attention pattern")
    p.add_argument("--rope", action=argparse.BooleanOptionalAction, default=None,
                   help="gpt: rotary position embeddings over (t, h, w) in self-attention, besides the learned "
                        "tables (default: on for the moving digits, off for real data as in the paper)")
    p.add_argument("--n_cond_frames", type=int, default=0, help="gpt: condition on the first k frames")
    p.add_argument("--class_cond", action="store_true", help="gpt: condition on the data's class labels")
    p.add_argument("--action_cond", action="store_true",
                   help="gpt: condition on the data's per-frame actions (an HDF5 file with {split}_actions, e.g. BAIR)")
    p.add_argument("--cache_codes", action=argparse.BooleanOptionalAction, default=None,
                   help="gpt: encode every clip once (window fixed per clip) to out_dir/codes.pt instead of every step "
                        "(default: on for the moving digits, whose clips are exactly one window long, unless "
                        "--n_cond_frames)")
    p.add_argument("--grad_checkpointing", action="store_true", help="gpt: recompute activations in backward")
    # optimisation
    p.add_argument("--optimizer", default=None, choices=["adam", "muon"],
                   help="adam (the paper's), or muon: Muon for the model's hidden matrices (the prior's attention "
                        "and MLP, the VQ-VAE's convolutions), Adam for the rest (default: muon for the moving "
                        "digits, adam for real data; a resumed run keeps its checkpoint's)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (Adam's; Muon's updates are scaled to match an Adam update's size)")
    p.add_argument("--lr_schedule", default=None, choices=["constant", "cosine"], help="after warm-up")
    p.add_argument("--warmup_steps", type=int, default=None, help="linear learning-rate warm-up steps")
    p.add_argument("--max_steps", type=int, default=None, help="optimizer steps in total")
    p.add_argument("--gradient_clip_val", type=float, default=0.0, help="clip the gradient norm to this (0: off)")
    # run
    p.add_argument("--out_dir", required=True, help="checkpoint, logs and pictures go here")
    p.add_argument("--keep_last", type=int, default=0,
                   help="also keep the newest K checkpoints as ckpt_STEP.pt (0: only the latest, ckpt.pt)")
    p.add_argument("--max_bad_steps", type=int, default=20,
                   help="stop after this many consecutive steps with a non-finite loss or gradient")
    p.add_argument("--ddp_timeout", type=float, default=600,
                   help="seconds a process waits for its peers in a collective before the job stops")
    p.add_argument("--eval_interval", type=int, default=None, help="steps between evaluations and checkpoints")
    p.add_argument("--eval_batches", type=int, default=4, help="test batches per evaluation")
    p.add_argument("--log_interval", type=int, default=None, help="steps between log lines")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="autocast precision; float16 uses a GradScaler; the codebook always runs in float32 "
                        "(default: float32 with --data, bfloat16 for the moving digits)")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, data order and clip windows")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--sync_batchnorm", action="store_true", help="vqvae: BatchNorm statistics over all processes")
    return fill_from_preset(p.parse_args(argv))


def fill_from_preset(args):
    """The flags left unset take the stage's preset (the paper's with --data, the digits' without)."""
    preset = PRESETS[(args.stage, "digits" if args.data is None else "paper")]
    filled = [k for k in preset if getattr(args, k) is None]
    for k in filled:
        setattr(args, k, preset[k])
    # The digits' local encoder goes with their attention-free encoder: asking for attention turns it off.
    if "local_encoder" in filled and args.n_res_layers:
        args.local_encoder = False
    if args.cache_codes is None:
        args.cache_codes = args.stage == "gpt" and args.data is None and args.n_cond_frames == 0
    return args


# -----------------------------------------------------------------------------
# Data order and the learning rate: pure functions of (seed, step)

# Epoch e of a run seeded s shuffles with seed s * EPOCH_SEED_STRIDE + e: a prime larger than any
# number of epochs, so no two (seed, epoch) pairs share a permutation.
EPOCH_SEED_STRIDE = 100_003
# A run resumed on a different number of processes cannot continue each rank's random streams;
# they restart from seed + rank + STEP_SEED_STRIDE * step, away from the seeds of any fresh run.
STEP_SEED_STRIDE = 1_000_003


class InfiniteSampler(Sampler):
    """Endless (index, window seed) pairs for one process, resumable at any position.

    Epoch e visits a permutation of the dataset drawn from (seed, e), dealt out
    round-robin to the processes; each item also carries a seed that fixes its
    random window. So the data a run sees is a pure function of (seed, step),
    whatever the number of DataLoader workers or restarts.
    """

    def __init__(self, n, seed, rank=0, world=1, start=0):
        self.n, self.seed, self.rank, self.world, self.start = n, seed, rank, world, start

    def __iter__(self):
        per_rank = math.ceil(self.n / self.world)
        epoch, offset = divmod(self.start, per_rank)
        while True:
            epoch_seed = self.seed * EPOCH_SEED_STRIDE + epoch
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(epoch_seed))
            perm = torch.cat([perm, perm[: per_rank * self.world - self.n]])   # pad so every rank gets per_rank
            for j in range(offset, per_rank):
                pos = j * self.world + self.rank
                yield int(perm[pos]), epoch_seed * (per_rank * self.world) + pos
            epoch, offset = epoch + 1, 0


def get_lr(step, args):
    """Learning rate of step `step` (0-based): linear warm-up, then constant or cosine to zero at max_steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.lr_schedule == "constant":
        return args.lr
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# -----------------------------------------------------------------------------
# The two stages: what differs between them is here, the loop below is shared


def resolved_config(config, ckpt, path):
    """The config a run uses: `config` from the flags, or on resume the checkpoint's, which wins
    (`changed_flags` tells the user which flags it overrode)."""
    return config if ckpt is None else stored_config(type(config), ckpt, path)


# Flags that decide which clips a step sees: changed on resume, the data order is no longer an uninterrupted run's.
DATA_ORDER_FLAGS = ("batch_size", "seed", "data")
# Flags that only say where and how to report, never what is trained.
HARMLESS_FLAGS = ("out_dir", "num_workers", "log_interval", "eval_batches", "keep_last", "device", "ddp_timeout")


def changed_flags(saved, args, model_flags, saved_world, world):
    """One line naming every flag that differs from the checkpoint's run and what happens to it; None if none."""
    parts = []
    for k, v in sorted(vars(args).items()):
        old = saved.get(k, v)
        if k in HARMLESS_FLAGS or old == v or (isinstance(v, (list, tuple)) and list(old or ()) == list(v)):
            continue
        fate = ("the checkpoint's value is kept" if k in model_flags else
                "the new value is used; the data order is no longer that of an uninterrupted run"
                if k in DATA_ORDER_FLAGS else "the new value is used")
        parts.append(f"--{k} {v} (was {old}: {fate})")
    if saved_world != world:
        parts.append(f"{world} process(es) (was {saved_world}: random streams and data order are no longer those "
                     f"of an uninterrupted run)")
    return "resuming with changed flags: " + "; ".join(parts) if parts else None


class VQVAEStage:
    """Reconstruction: loss = normalized MSE + 0.25 * commitment; the codebook follows by EMA."""

    name, curve, curve_label, picture_name = "vqvae", "recon_loss", "normalized MSE", "recon"
    logged = ("loss", "recon_loss", "commitment_loss", "perplexity", "usage")

    def __init__(self, args, ckpt, ckpt_path):
        self.config = resolved_config(VQVAEConfig(
            embedding_dim=args.embedding_dim, n_codes=args.n_codes, dead_code_threshold=args.dead_code_threshold,
            n_hiddens=args.n_hiddens, n_res_layers=args.n_res_layers, decoder_res_layers=args.decoder_res_layers,
            local_encoder=args.local_encoder, downsample=args.downsample, sequence_length=args.sequence_length,
            resolution=args.resolution), ckpt, ckpt_path)
        self.clip = (self.config.sequence_length, self.config.resolution)

    def build(self, args, train_set):
        return VQVAE(self.config)

    def loss(self, model, batch, device):
        out = model(batch["video"].to(device, non_blocking=True))   # (B, 3, T, H, W) in
        return out["loss"], {k: out[k] for k in self.logged}

    def describe(self):
        return f"latent {self.config.latent_shape}"

    def checkpoint(self):
        return dict(config=self.config.to_dict())

    @torch.no_grad()
    def picture(self, model, batch, device, path):
        """Four test clips, each above its reconstruction (model in eval mode)."""
        x = batch["video"][:4].to(device)
        recon = model(x)["recon"].float()
        pairs = torch.stack([x, recon], dim=1).flatten(0, 1)       # (2*n, 3, T, H, W), clip then recon
        save_png(video_grid(to_uint8(pairs).numpy()), f"{path}.png")


class CodesDataset(Dataset):
    """Pre-encoded codes (and labels) saved by --cache_codes."""

    def __init__(self, codes, labels=None):
        self.codes, self.labels = codes, labels

    def __len__(self):
        return len(self.codes)

    def __getitem__(self, item):
        i = item[0] if isinstance(item, (tuple, list)) else item
        out = dict(codes=self.codes[i].long())
        if self.labels is not None:
            out["label"] = int(self.labels[i])
        return out


@torch.no_grad()
def encode_all(vq, dataset, device, batch_size):
    """Codes (N, t, h, w) int16 and labels of every clip, each with its window fixed by its index."""
    loader = DataLoader(dataset, batch_size=batch_size, sampler=[(i, i) for i in range(len(dataset))])
    codes, labels = [], []
    for batch in loader:
        codes.append(vq.encode(batch["video"].to(device)).to(torch.int16).cpu())
        if "label" in batch:
            labels.append(batch["label"])
    return torch.cat(codes), (torch.cat(labels) if labels else None)


class GPTStage:
    """Prior: cross-entropy of every code given the codes before it (and the conditioning)."""

    name, curve, curve_label, picture_name = "gpt", "loss", "cross-entropy (nats per code)", "samples"
    logged = ("loss", "bits_per_code")

    def __init__(self, args, ckpt, ckpt_path, device="cpu"):
        # The VQ-VAE: the checkpoint's own copy when resuming, else --vqvae; frozen, in eval mode, for good.
        if ckpt:
            self.vq = embedded_vqvae(ckpt, ckpt_path)
        elif args.vqvae is None:
            raise ValueError("--stage gpt needs --vqvae PATH (a VQ-VAE checkpoint: ours or an original VideoGPT .ckpt)")
        else:
            self.vq = load_vqvae(args.vqvae)
        self.vq = use_fast_attention(self.vq.to(device).eval().requires_grad_(False))
        vc = self.vq.config
        self.clip = (vc.sequence_length, vc.resolution)
        for flag, value in (("sequence_length", vc.sequence_length), ("resolution", vc.resolution)):
            if getattr(args, flag) not in (None, value):
                warnings.warn(f"--{flag} {getattr(args, flag)} ignored: the prior models clips of the VQ-VAE's {value}")
        if args.n_cond_frames >= vc.sequence_length:
            raise ValueError(f"--n_cond_frames {args.n_cond_frames} must be smaller than the clip's "
                             f"{vc.sequence_length} frames")
        if args.cache_codes and (args.n_cond_frames or args.action_cond):
            raise ValueError("--cache_codes keeps only codes, but --n_cond_frames and --action_cond need the clips' "
                             "frames and actions; use one or the other")
        self.ckpt, self.ckpt_path = ckpt, ckpt_path

    def build(self, args, train_set):
        if args.class_cond and not train_set.n_classes and not self.ckpt:
            raise ValueError(f"--class_cond: the data {args.data or '(moving digits)'} has no class labels")
        has_actions = "actions" in getattr(train_set, "extras", ())
        if args.action_cond and not has_actions and not self.ckpt:
            raise ValueError(f"--action_cond: the data {args.data or '(moving digits)'} has no per-frame actions "
                             f"(an HDF5 file with train_actions, e.g. from data.py bair)")
        action_dim = train_set[(0, 0)]["actions"].shape[-1] if args.action_cond and has_actions else 0
        vc = self.vq.config
        self.config = resolved_config(GPTConfig(
            latent_shape=vc.latent_shape, n_codes=vc.n_codes, embedding_dim=vc.embedding_dim,
            hidden_dim=args.hidden_dim, heads=args.heads, layers=args.layers, dropout=args.dropout,
            attn_dropout=args.attn_dropout, attn_type=args.attn_type, rope=args.rope, n_cond_frames=args.n_cond_frames,
            resolution=vc.resolution, n_classes=train_set.n_classes if args.class_cond else 0,
            action_dim=action_dim, sequence_length=vc.sequence_length), self.ckpt, self.ckpt_path)
        model = VideoGPT(self.config)
        model.set_codebook(self.vq.codebook.embeddings)
        model.set_grad_checkpointing(args.grad_checkpointing)
        return model

    def conditioning(self, batch, x, device):
        """The prior's conditioning inputs of a batch: label, first frames, actions (None where unused)."""
        c = self.config
        return dict(label=batch["label"].to(device) if c.n_classes else None,
                    frames=x[:, :, :c.n_cond_frames] if c.n_cond_frames else None,   # (B, 3, k, H, W)
                    actions=batch["actions"].to(device) if c.action_dim else None)  # (B, T, action_dim)

    def loss(self, model, batch, device):
        if "codes" in batch:
            codes, x = batch["codes"].to(device), None
        else:
            x = batch["video"].to(device, non_blocking=True)                  # (B, 3, T, H, W)
            codes = self.vq.encode(x)                                           # (B, t, h, w), no gradient
        logits = model(codes, **self.conditioning(batch, x, device))          # (B, t, h, w, n_codes)
        loss = F.cross_entropy(logits.flatten(0, -2).float(), codes.flatten())     # (B*t*h*w, n_codes) vs (B*t*h*w,)
        return loss, dict(loss=loss, bits_per_code=loss / math.log(2))

    def describe(self):
        c = self.config
        text = f"{c.seq_len} codes {c.latent_shape}, {c.attn_type} attention"
        if c.n_cond_frames:
            text += f", conditioned on {c.n_cond_frames} frame(s)"
        if c.n_classes:
            text += f", conditioned on {c.n_classes} classes"
        if c.action_dim:
            text += f", conditioned on {c.action_dim}-d actions per frame"
        return text

    def checkpoint(self):
        return dict(config=self.config.to_dict(), vqvae=dict(config=self.vq.config.to_dict(), model=self.vq.state_dict()))

    @torch.no_grad()
    def picture(self, model, batch, device, path):
        """Four real test clips (top row) and four samples (bottom row, conditioned on the clips; eval mode)."""
        x = batch.get("video")
        n = min(4, len(next(iter(batch.values()))))
        real = x[:n].to(device) if x is not None else self.vq.decode(batch["codes"][:n].to(device))
        cond = self.conditioning({k: v[:n] for k, v in batch.items()}, real, device)
        codes = model.sample(n, **cond, generator=torch.Generator(device).manual_seed(0))
        clips = np.concatenate([to_uint8(real).numpy(), samples_to_uint8(self.vq.decode(codes), cond["frames"])])  # (2n, T, H, W, 3)
        save_gif(grid_video(clips, ncol=n), f"{path}.gif", fps=4)

    def cached_codes(self, args, train_set, test_set, device, master, ddp):
        """--cache_codes: every clip encoded once (window fixed per clip) to out_dir/codes.pt; datasets of codes."""
        codes_path = os.path.join(args.out_dir, "codes.pt")
        if master and not os.path.exists(codes_path):
            remove_stale_temps(codes_path)
            print(f"encoding {len(train_set)} + {len(test_set)} clips once to {codes_path}", flush=True)
            tr, te = (encode_all(self.vq, s, device, args.batch_size) for s in (train_set, test_set))
            save_checkpoint(dict(train=tr, test=te), codes_path)
        if ddp:
            dist.barrier()    # every rank reads the file rank 0 wrote
        try:
            cached = torch.load(codes_path, weights_only=True)
            return CodesDataset(*cached["train"]), CodesDataset(*cached["test"])
        except Exception as e:  # unreadable or not ours: say so; deleting it makes the next run re-encode
            raise ValueError(f"{codes_path}: not a readable codes cache ({type(e).__name__}); delete it to re-encode") from None


# -----------------------------------------------------------------------------
# The state of a run, and the metrics of a log window


@dataclass
class RunState:
    """Where a run is: what a checkpoint saves with the weights, and what resume restores."""
    step: int = 0                     # optimizer steps taken (skipped ones included)
    history: dict = field(default_factory=lambda: {"train": [], "test": []})   # loss curves, (step, value)
    saved_step: int = None            # step of the newest checkpoint on disk (None: none yet)
    bad_run: int = 0                  # consecutive steps with a non-finite loss or gradient

    def state_dict(self, rng):
        """`rng`: every process's random streams (runtime.rng_state), gathered to rank 0."""
        return dict(step=self.step, history=self.history, rng=rng)

    def load_state_dict(self, ckpt, dist_info):
        """Restore the step, curves and this process's random streams from a checkpoint."""
        self.step, self.history, self.saved_step = ckpt["step"], ckpt.get("history", self.history), ckpt["step"]
        # Each rank continues its own random streams; on a different number of processes they start afresh.
        rngs = ckpt["rng"]
        if len(rngs) == dist_info.world:
            set_rng_state(rngs[dist_info.rank], dist_info.device)
            return True
        return False


class MetricWindow:
    """The logged metrics of the steps since the last log line, summed on the device.

    Reading a GPU tensor's value (`.item()`) waits for the GPU to finish, so the
    loop never does it per metric and per step; the window is read once per log
    line, averaged over processes.
    """

    def __init__(self):
        self.sums, self.steps, self.skipped, self.scaler_skipped, self.t0 = {}, 0, 0, 0, time.time()

    def add(self, metrics):
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float()
        self.steps += 1

    def read(self, ddp):
        """Mean of each metric over the window and the processes; the time since the window began."""
        sums = torch.stack(list(self.sums.values())).tolist() if self.sums else []   # one read of the device
        return all_mean({k: v / self.steps for k, v in zip(self.sums, sums)}, ddp), time.time() - self.t0


def step_flags(loss, grad_norm, scaler, stop, flag_device, ddp):
    """(bad, overflow, stopping) of this step, agreed by every process: the loop's one read per step.

    bad: a non-finite loss, or gradient (without a GradScaler), so the step is skipped.
    overflow: a non-finite gradient; with float16 the GradScaler skips it and lowers its scale.
    stopping: some process was asked to stop. One all-reduce carries all three.
    """
    overflow = ~torch.isfinite(grad_norm)
    bad = ~torch.isfinite(loss.detach())
    if not scaler.is_enabled():
        bad = bad | overflow
    stop_flag = torch.tensor(stop.signum is not None, device=bad.device)
    flags = torch.stack([bad, overflow, stop_flag]).to(flag_device, torch.float32)   # (3,)
    if ddp:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad, overflow, stopping = (v > 0 for v in flags.tolist())
    return bad, overflow, stopping


def plot_losses(history, path, ylabel):
    """Training and test loss curves, log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in history.items():
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=name, marker="o" if name.startswith("test") else None)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


# -----------------------------------------------------------------------------
# The run: its set-up, and the chores of the loop


class Run:
    """Everything a training run holds, set up for `train`: model, optimizer, data, state; and its chores.

    The chores (logging, evaluating, checkpointing, stopping) are methods, so the
    loop in `train` is the algorithm and one named call per chore.
    """

    def __init__(self, args):
        self.args = args
        self.dist = init_distributed(args.device, timeout=args.ddp_timeout)
        self.master, self.device = self.dist.master, self.dist.device
        self.ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
        self.log_path = os.path.join(args.out_dir, "log.jsonl")
        self.lock = OutputLock(os.path.join(args.out_dir, ".lock"), "wait for that run to end or choose another --out_dir")
        if self.master:
            # Fail now, not at the first checkpoint, if out_dir cannot be written or another run uses it
            # (rank 0 holds the lock for the whole run); clear what a kill mid-save left.
            check_writable(args.out_dir)
            self.lock.acquire()
        try:
            self.set_up(args)
        except BaseException:
            self.lock.release()
            raise

    def set_up(self, args):
        if self.master:
            remove_stale_temps(self.ckpt_path)
        ckpt = self.resumable_checkpoint()
        self.stage = (VQVAEStage(args, ckpt, self.ckpt_path) if args.stage == "vqvae"
                      else GPTStage(args, ckpt, self.ckpt_path, self.device))
        seq_len, resolution = self.stage.clip
        train_set, test_set = (make_dataset(args.data, seq_len, train=split, resolution=resolution, seed=args.seed)
                               for split in (True, False))
        # The same seed on every rank gives the same initial weights.
        torch.manual_seed(args.seed)
        self.raw_model = use_fast_attention(self.stage.build(args, train_set).to(self.device))
        if args.stage == "gpt" and args.cache_codes:
            train_set, test_set = self.stage.cached_codes(args, train_set, test_set, self.device, self.master,
                                                          self.dist.ddp)
        self.n_clips = (len(train_set), len(test_set))
        # A resumed run keeps the optimizer whose state its checkpoint holds (resume says if asked otherwise).
        kind = optimizer_kind(ckpt["optimizer"]) if ckpt else args.optimizer
        self.optimizer = make_optimizer(self.raw_model, kind, args.lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.dtype == "float16")
        self.state = RunState()
        seed_everything(args.seed + self.dist.rank)    # torch, numpy and Python streams, different on every rank
        if ckpt:
            self.resume(ckpt)
        if self.master:
            # Records past the checkpoint (or all of them, with none) come from a run that was killed: it repeats them.
            dropped = trim_log(self.log_path, self.state.step)
            if dropped:
                print(f"{self.log_path}: dropped {dropped} record(s) after step {self.state.step}, "
                      f"where the checkpoint is", flush=True)
        self.batches = iter(self.train_loader(train_set))
        self.test_loader = self.eval_loader(test_set)
        self.model = self.wrap(self.raw_model)
        self.autocast = autocast(self.device, args.dtype)
        # Small all-reduced flags live where the backend wants them: GPU memory for NCCL, CPU for gloo.
        self.flag_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        self.window = MetricWindow()
        self.bar = tqdm(total=args.max_steps, initial=self.state.step, disable=not self.master, dynamic_ncols=True,
                        unit="step")

    # --- set-up ---

    def resumable_checkpoint(self):
        """out_dir/ckpt.pt when it exists (checked to be a checkpoint of this stage to resume from), else None."""
        if not os.path.exists(self.ckpt_path):
            return None
        ckpt = load_checkpoint(self.ckpt_path)
        kind = checkpoint_kind(ckpt)
        if kind != self.args.stage:
            raise ValueError(f"{self.ckpt_path}: is a '{kind}' checkpoint but --stage is '{self.args.stage}'; "
                             f"use another --out_dir")
        missing = {"model", "optimizer", "scaler", "step", "rng"} - set(ckpt)
        if missing:
            raise ValueError(f"{self.ckpt_path}: cannot resume from it: no {', '.join(sorted(missing))} "
                             f"(a weights-only checkpoint?); use another --out_dir")
        return ckpt

    def resume(self, ckpt):
        """Weights, optimizer, scaler, step, curves and random streams from the checkpoint."""
        try:
            self.raw_model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scaler.load_state_dict(ckpt["scaler"])
            continued = self.state.load_state_dict(ckpt, self.dist)
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{self.ckpt_path}: cannot resume from it ({first_line(e)}); use another --out_dir") from None
        if not continued:
            seed_everything(self.args.seed + self.dist.rank + STEP_SEED_STRIDE * self.state.step)
        # The model's own flags (its config, and what it is conditioned on) stay the checkpoint's, and so does
        # the optimizer whose state it holds (checkpoints from before --optimizer hold Adam's).
        model_flags = {f.name for f in fields(self.stage.config)} | {"class_cond", "action_cond", "vqvae", "optimizer"}
        kind = optimizer_kind(ckpt["optimizer"])
        saved = dict(ckpt.get("train_args", {}), optimizer=kind)
        line = changed_flags(saved, self.args, model_flags, len(ckpt["rng"]), self.dist.world)
        if line and self.master:
            warnings.warn(f"{self.ckpt_path}: {line}")
        self.args.optimizer = kind   # what the next checkpoint records

    def train_loader(self, train_set):
        """Endless batches in an order fixed by (seed, step); workers ignore stop signals (the loop decides)."""
        args = self.args
        sampler = InfiniteSampler(len(train_set), args.seed, self.dist.rank, self.dist.world,
                                  start=self.state.step * args.batch_size)
        # Clips are decoded or drawn in worker processes; cached codes are slices of a tensor in memory, which
        # a worker would only pickle across (and on a 2-core CPU take a core from the step: 15% slower).
        workers = args.num_workers
        if workers is None:
            workers = 0 if isinstance(train_set, CodesDataset) else max(1, min(4, (os.cpu_count() or 2) // 2))
        return DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                          num_workers=workers, pin_memory=self.device.type == "cuda",
                          worker_init_fn=ignore_stop_signals,
                          # Its own generator: starting an iterator must not draw from the global RNG,
                          # or a resumed run's random draws would differ from an uninterrupted one's.
                          generator=torch.Generator().manual_seed(args.seed))

    def eval_loader(self, test_set):
        """The same clips and windows at every evaluation; every rank gets at least one (a tiny test set repeats)."""
        args, rank, world = self.args, self.dist.rank, self.dist.world
        n_eval = max(world, min(len(test_set), args.eval_batches * args.batch_size * world))
        items = [(i % len(test_set), i % len(test_set)) for i in range(rank, n_eval, world)]
        return DataLoader(test_set, batch_size=args.batch_size, sampler=items, num_workers=0)

    def wrap(self, model):
        """SyncBatchNorm, DDP and torch.compile around the model, as asked; the raw model stays what is saved."""
        if self.dist.ddp and self.args.sync_batchnorm:
            if self.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            elif self.master:
                warnings.warn("--sync_batchnorm needs CUDA (PyTorch's SyncBatchNorm is GPU-only); ignored on CPU")
        if self.dist.ddp:
            model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return torch.compile(model) if self.args.compile else model

    def describe(self):
        if self.master:
            n_params = sum(p.numel() for p in self.raw_model.parameters())
            print(f"{self.args.stage}: {n_params / 1e6:.2f}M parameters, {self.stage.describe()}, {self.n_clips[0]} train / "
                  f"{self.n_clips[1]} test clips, {self.dist.world} process(es) on {self.device}, {self.args.dtype}"
                  + (f", resuming at step {self.state.step}" if self.state.step else ""), flush=True)

    # --- chores of the loop ---

    def set_lr(self, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def record(self, metrics, bad, overflow):
        """Count the step just taken; only good steps enter the logged averages."""
        self.state.step += 1
        self.bar.update(1)
        if bad:
            self.state.bad_run += 1
            self.window.skipped += 1
            if self.master:
                loss, grad_norm = float(metrics["loss"].detach()), float(metrics["grad_norm"])
                tqdm.write(f"warning: step {self.state.step}: non-finite loss {loss:.4g} or gradient norm "
                           f"{grad_norm:.4g}; step skipped "
                           f"({self.state.bad_run} in a row, the run stops at --max_bad_steps={self.args.max_bad_steps})")
        elif overflow:
            self.window.scaler_skipped += 1   # float16 overflow: the scaler skipped the step, routine early in a run
        else:
            self.state.bad_run = 0
            self.window.add(metrics)

    def log_due(self):
        return self.state.step % self.args.log_interval == 0 or self.state.step == self.args.max_steps

    def eval_due(self):
        # Never in the middle of a bad stretch: the last good checkpoint stays.
        step = self.state.step
        return (step % self.args.eval_interval == 0 or step == self.args.max_steps) and self.state.bad_run == 0

    def log_train(self, lr):
        """One log line: the window's mean metrics, throughput, skipped steps; the loss curve."""
        w = self.window
        metrics, seconds = w.read(self.dist.ddp)
        taken = w.steps + w.skipped + w.scaler_skipped
        extra = dict(skipped=w.skipped)
        if self.scaler.is_enabled():
            extra |= dict(scaler_skipped=w.scaler_skipped, loss_scale=self.scaler.get_scale())
        clips_per_s = taken * self.args.batch_size * self.dist.world / seconds
        self.window = MetricWindow()
        if self.master:
            if self.stage.curve in metrics:
                self.state.history["train"].append((self.state.step, metrics[self.stage.curve]))
            self.log(dict(step=self.state.step, split="train", lr=lr, clips_per_s=clips_per_s, **metrics, **extra))
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()} | {"clips/s": f"{clips_per_s:.1f}"})

    def log(self, record):
        if self.master:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def check_divergence(self):
        if self.state.bad_run >= self.args.max_bad_steps:
            raise RunError(f"{self.args.out_dir}: stopped at step {self.state.step} after {self.state.bad_run} "
                           f"consecutive steps with a non-finite loss or gradient; {self.last_good()}. Try a lower "
                           f"--lr, --gradient_clip_val 1, or --dtype bfloat16 / float32")

    @torch.no_grad()
    def evaluate(self):
        """Mean test metrics over the fixed test clips, averaged over processes; and the first batch."""
        self.model.eval()
        sums, n, first = {}, 0, None
        for batch in self.test_loader:
            with self.autocast:
                _, metrics = self.stage.loss(self.model, batch, self.device)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            n += 1
            first = batch if first is None else first
        self.model.train()
        return all_mean({k: v / max(n, 1) for k, v in sums.items()}, self.dist.ddp), first

    def pictures(self, batch):
        """The stage's picture of this step and the loss plot. They are for looking at: one that cannot be
        written (a full disk) is a warning, not the end of the run."""
        # Eval mode: on rank 0 alone a training-mode forward would start codebook collectives.
        self.raw_model.eval()
        try:
            with self.autocast:
                path = os.path.join(self.args.out_dir, f"{self.stage.picture_name}_{self.state.step:07d}")
                self.stage.picture(self.raw_model, batch, self.device, path)
            plot_losses(self.state.history, os.path.join(self.args.out_dir, "loss.png"), self.stage.curve_label)
        except OSError as e:
            warnings.warn(f"{e.filename}: {e.strerror or e}; picture skipped, training goes on")
        finally:
            self.raw_model.train()

    def evaluate_and_checkpoint(self):
        """Test metrics, a picture and the loss plot (rank 0), then a checkpoint if the weights are worth one."""
        metrics, batch = self.evaluate()
        step, curve = self.state.step, self.stage.curve
        if self.master:
            self.state.history["test"].append((step, metrics[curve]))
            self.log(dict(step=step, split="test", **metrics))
            self.pictures(batch)
            print(f"step {step}: test " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
        # Weights that give a non-finite test loss are not worth keeping: the last good checkpoint stays.
        if not math.isfinite(metrics[curve]):
            if self.master:
                tqdm.write(f"warning: step {step}: test {curve} is {metrics[curve]}; checkpoint not written")
            return
        self.checkpoint()

    def checkpoint(self):
        """Everything needed to continue exactly: weights, optimizer, scaler, step, every rank's RNG, curves."""
        rng = [rng_state(self.device)]
        if self.dist.ddp:
            mine, rng = rng[0], [None] * self.dist.world
            dist.all_gather_object(rng, mine)
        if self.master:
            self.save(dict(stage=self.args.stage, model=self.raw_model.state_dict(),
                           optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
                           train_args=vars(self.args), **self.state.state_dict(rng), **self.stage.checkpoint()))
        self.state.saved_step = self.state.step

    def save(self, ckpt):
        """Write ckpt.pt (and the --keep_last copy); a full disk ends the run with one line, the previous
        checkpoint intact (the write went to a temp file, now removed)."""
        try:
            save_checkpoint(ckpt, self.ckpt_path)
            if self.args.keep_last > 0:
                keep_copy(self.ckpt_path, self.state.step, self.args.keep_last)
        except DiskFull as e:
            raise RunError(f"{e.filename}: {e.strerror} (step {self.state.step}); {self.last_good()}") from None

    def last_good(self):
        saved = self.state.saved_step
        return f"{self.ckpt_path} (step {saved}) is the last good checkpoint" if saved is not None \
            else "no checkpoint was written"

    def stop(self, stop):
        """A stop was asked for (Ctrl-C, SIGTERM): checkpoint this step unless it is saved or bad, then exit."""
        if self.state.saved_step != self.state.step and self.state.bad_run == 0:
            self.checkpoint()
        if self.master:
            tqdm.write(f"stopped at step {self.state.step}; {self.last_good()}; run the same command to resume")
        raise SystemExit(stop.exit_status)

    @contextlib.contextmanager
    def failures_explained(self):
        """Around the loop: a lost peer becomes one line naming the last good checkpoint; on the way out, the
        progress bar closes and the DataLoader workers are shut down (they ignore SIGTERM, so exit cannot)."""
        try:
            yield
        except KeyboardInterrupt:
            if self.master:
                tqdm.write(f"interrupted at step {self.state.step} without saving; {self.last_good()}")
            raise
        except RuntimeError as e:
            if not (self.dist.ddp and collective_failure(e)):
                raise
            raise lost_peer_error(e, self.dist.rank, self.state.step, self.args.ddp_timeout, self.last_good()) from None
        finally:
            self.bar.close()
            self.batches = None
            self.lock.release()


# -----------------------------------------------------------------------------
# The training loop


def train(args):
    """Train one stage as `args` says (resuming from out_dir/ckpt.pt if there); returns the trained model."""
    run = Run(args)
    model, optimizer, scaler, state = run.model, run.optimizer, run.scaler, run.state
    run.describe()
    with StopRequest() as stop, run.failures_explained():
        while state.step < args.max_steps:
            lr = run.set_lr(get_lr(state.step, args))
            # Forward under autocast; the stage says what the loss is.
            with run.autocast:
                loss, metrics = run.stage.loss(model, next(run.batches), run.device)
            # Backward through the scaler (a no-op unless float16); unscale so clipping sees the true norm.
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.gradient_clip_val or math.inf)
            # A non-finite loss or gradient skips the step; a stop request ends the run after it.
            bad, overflow, stopping = step_flags(loss, grad_norm, scaler, stop, run.flag_device, run.dist.ddp)
            if scaler.is_enabled() or not bad:
                scaler.step(optimizer)        # with float16 the scaler itself skips an overflowing step
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            run.record(metrics | {"grad_norm": grad_norm}, bad, overflow)
            # Log, give up on a diverged run, evaluate and checkpoint, stop if asked.
            if run.log_due():
                run.log_train(lr)
            run.check_divergence()
            if run.eval_due():
                run.evaluate_and_checkpoint()
            if stopping:
                run.stop(stop)
    if run.master:
        print(f"done: {run.ckpt_path}", flush=True)
    return run.raw_model


def train_and_sync(args):
    train(args)
    if dist.is_initialized():
        dist.barrier()   # nobody tears the group down while a peer still uses it


def main(argv=None):
    args = parse_args(argv)
    try:
        run_cli("train.py", train_and_sync, args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
