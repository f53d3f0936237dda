"""Training entry point for both stages of VideoGPT.

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
"""

import argparse
import datetime
import json
import math
import os
import random
import re
import signal
import threading
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from data import (RunError, atomic_write, check_writable, first_line, frame_conditioning, grid_video, make_dataset,
                  remove_stale_temps, run_cli, save_gif, save_png, to_uint8, video_grid)
from gpt import GPTConfig, VideoGPT, embedded_vqvae
from vqvae import VQVAE, VQVAEConfig, checkpoint_kind, load_checkpoint, load_vqvae, stored_config

# -----------------------------------------------------------------------------
# Arguments

# Flags left unset take these values: the paper's for real data, small ones for the
# moving-digits default so that a 2-core CPU runs the whole pipeline in minutes.
PRESETS = {
    ("vqvae", "paper"): dict(embedding_dim=256, n_codes=2048, n_hiddens=240, n_res_layers=4, downsample=[4, 4, 4],
                             sequence_length=16, resolution=64, batch_size=32, lr=7e-4, warmup_steps=0,
                             lr_schedule="constant", max_steps=200_000, eval_interval=2000, log_interval=50),
    ("vqvae", "digits"): dict(embedding_dim=64, n_codes=512, n_hiddens=64, n_res_layers=1, downsample=[2, 4, 4],
                              sequence_length=8, resolution=32, batch_size=8, lr=2e-3, warmup_steps=0,
                              lr_schedule="constant", max_steps=1600, eval_interval=400, log_interval=25),
    ("gpt", "paper"): dict(hidden_dim=576, heads=4, layers=8, dropout=0.2, attn_dropout=0.3, batch_size=32,
                           lr=3e-4, warmup_steps=1000, lr_schedule="cosine", max_steps=200_000,
                           eval_interval=2000, log_interval=50),
    ("gpt", "digits"): dict(hidden_dim=120, heads=4, layers=4, dropout=0.0, attn_dropout=0.0, batch_size=16,
                            lr=1e-3, warmup_steps=100, lr_schedule="cosine", max_steps=1200,
                            eval_interval=600, log_interval=25),
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
    p.add_argument("--num_workers", type=int, default=max(1, min(4, (os.cpu_count() or 2) // 2)),
                   help="DataLoader worker processes per process (default: half the cores, at most 4)")
    # VQ-VAE
    p.add_argument("--embedding_dim", type=int, default=None, help="vqvae: width of each code vector")
    p.add_argument("--n_codes", type=int, default=None, help="vqvae: codebook size")
    p.add_argument("--n_hiddens", type=int, default=None, help="vqvae: channels of the encoder and decoder")
    p.add_argument("--n_res_layers", type=int, default=None, help="vqvae: attention residual blocks per side")
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
    p.add_argument("--n_cond_frames", type=int, default=0, help="gpt: condition on the first k frames")
    p.add_argument("--class_cond", action="store_true", help="gpt: condition on the data's class labels")
    p.add_argument("--cache_codes", action="store_true",
                   help="gpt: encode every clip once (window fixed per clip) to out_dir/codes.pt instead of every step")
    p.add_argument("--grad_checkpointing", action="store_true", help="gpt: recompute activations in backward")
    # optimisation
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (peak)")
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
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="autocast precision; float16 uses a GradScaler; the codebook always runs in float32")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, data order and clip windows")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--sync_batchnorm", action="store_true", help="vqvae: BatchNorm statistics over all processes")
    args = p.parse_args(argv)
    # Fill unset flags from the stage's preset.
    for k, v in PRESETS[(args.stage, "digits" if args.data is None else "paper")].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


# -----------------------------------------------------------------------------
# Distributed set-up and small helpers


def setup(args):
    """Read torchrun's environment; returns (ddp, rank, world_size, device)."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and ddp:
        device = f"cuda:{local_rank}"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ddp:
        # NCCL between GPUs, gloo between CPU processes; a dead peer fails collectives after --ddp_timeout.
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=args.ddp_timeout))
    return ddp, rank, world, device


def all_mean(values, ddp):
    """Average a dict of floats over processes (one all-reduce)."""
    if not ddp:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    t = t.to("cuda") if dist.get_backend() == "nccl" else t
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist()))


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
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.n, generator=g)
            perm = torch.cat([perm, perm[: per_rank * self.world - self.n]])   # pad so every rank gets per_rank
            for j in range(offset, per_rank):
                pos = j * self.world + self.rank
                yield int(perm[pos]), (self.seed * 100_003 + epoch) * (per_rank * self.world) + pos
            epoch, offset = epoch + 1, 0


def get_lr(step, args):
    """Learning rate as a pure function of the step: linear warm-up, then constant or cosine to zero."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.lr_schedule == "constant":
        return args.lr
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def save_checkpoint(obj, path):
    """torch.save, atomically: a kill during the save leaves the previous checkpoint intact."""
    atomic_write(path, lambda f: torch.save(obj, f))


def keep_copy(ckpt_path, step, keep_last):
    """Keep the checkpoint just written as ckpt_STEP.pt too, and delete all but the newest `keep_last`.

    The copy is a hard link (no extra disk): ckpt.pt is later replaced by a new
    file, not rewritten, so the link keeps this step's bytes.
    """
    folder = os.path.dirname(ckpt_path)
    kept = os.path.join(folder, f"ckpt_{step:07d}.pt")
    tmp = kept + f".tmp{os.getpid()}"
    try:
        os.link(ckpt_path, tmp)
        os.replace(tmp, kept)
    except OSError:   # a filesystem without hard links: copy instead
        with open(ckpt_path, "rb") as src:
            atomic_write(kept, lambda f: f.write(src.read()))
    old = sorted(n for n in os.listdir(folder) if n.startswith("ckpt_") and n.endswith(".pt"))
    for name in old[:-keep_last]:
        os.remove(os.path.join(folder, name))


def rng_state(device):
    """Every random stream a process draws from, in types that weights_only loading accepts."""
    np_state = np.random.get_state(legacy=False)   # dict; its key array becomes a tensor
    return dict(torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                numpy=dict(key=torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                           pos=np_state["state"]["pos"], has_gauss=np_state["has_gauss"], gauss=np_state["gauss"]),
                python=random.getstate())


def set_rng_state(state, device):
    """Inverse of rng_state."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    if "numpy" in state:   # absent from checkpoints of older versions, which kept the torch streams only
        n = state["numpy"]
        np.random.set_state(dict(bit_generator="MT19937", state=dict(key=n["key"].numpy().astype(np.uint32), pos=n["pos"]),
                                 has_gauss=n["has_gauss"], gauss=n["gauss"]))
        random.setstate(state["python"])


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def trim_log(path, step):
    """Drop log records after `step`: a killed run logged steps that the resumed one repeats.

    A torn last line (killed mid-append) is dropped too. Returns how many records went.
    """
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if line.endswith("\n") and json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass   # a torn or foreign line
    if len(kept) < len(lines):
        atomic_write(path, lambda f: f.writelines(kept), binary=False)
    return len(lines) - len(kept)


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM, which cluster schedulers send before a kill, asks for a clean stop.

    The loop finishes its step, saves a checkpoint and exits; a second Ctrl-C
    quits at once without saving. Stopping between steps rather than wherever
    the signal lands keeps the checkpoint consistent (weights, optimizer and step
    from the same moment), and under DDP lets every process stop at the same step.
    """

    def __init__(self):
        self.signum = None
        # Python delivers signals to the main thread only; train() called from another thread keeps the defaults.
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint"
              + (" (Ctrl-C again to quit at once)" if signum == signal.SIGINT else ""), flush=True)

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def ignore_stop_signals(worker_id):
    """DataLoader worker init: the main process decides when to stop, so workers ignore Ctrl-C and SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def collective_failure(error):
    """True if `error` is a failed collective (a peer died, or stalled past the timeout).

    Backends raise most of these as plain RuntimeErrors, so the text decides. gloo puts its
    source location in front of the operation that failed first, but every later operation on
    the same connection (DDP's buffer broadcast in the next forward, say) gets a bare
    "Application timeout caused pair closure".
    """
    text = str(error)
    return isinstance(error, dist.DistError) or any(k in text for k in (
        "gloo", "Gloo", "NCCL", "Connection closed", "Connection reset", "pair closure", "Timed out", "timed out"))


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
# The two stages: what differs between them is here, the loop below is shared


class VQVAEStage:
    """Reconstruction: loss = normalized MSE + 0.25 * commitment; the codebook follows by EMA."""

    name, curve, curve_label = "vqvae", "recon_loss", "normalized MSE"
    logged = ("loss", "recon_loss", "commitment_loss", "perplexity", "usage")

    def __init__(self, args, ckpt, device):
        self.config = VQVAEConfig(embedding_dim=args.embedding_dim, n_codes=args.n_codes, n_hiddens=args.n_hiddens,
                                  n_res_layers=args.n_res_layers, downsample=args.downsample,
                                  sequence_length=args.sequence_length, resolution=args.resolution)
        if ckpt:
            saved = stored_config(VQVAEConfig, ckpt, os.path.join(args.out_dir, "ckpt.pt"))
            if saved != self.config:
                warnings.warn(f"{args.out_dir}: resuming with the checkpoint's model config, not the flags'")
            self.config = saved
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


class GPTStage:
    """Prior: cross-entropy of every code given the codes before it (and the conditioning)."""

    name, curve, curve_label = "gpt", "loss", "cross-entropy (nats per code)"
    logged = ("loss", "bits_per_code")

    def __init__(self, args, ckpt, device):
        # The VQ-VAE: the checkpoint's own copy when resuming, else --vqvae; frozen, in eval mode, for good.
        if ckpt:
            self.vq = embedded_vqvae(ckpt, os.path.join(args.out_dir, "ckpt.pt"))
        elif args.vqvae is None:
            raise ValueError("--stage gpt needs --vqvae PATH (a VQ-VAE checkpoint: ours or an original VideoGPT .ckpt)")
        else:
            self.vq = load_vqvae(args.vqvae)
        self.vq = self.vq.to(device).eval().requires_grad_(False)
        vc = self.vq.config
        self.clip = (vc.sequence_length, vc.resolution)
        for flag, value in (("sequence_length", vc.sequence_length), ("resolution", vc.resolution)):
            if getattr(args, flag) not in (None, value):
                warnings.warn(f"--{flag} {getattr(args, flag)} ignored: the prior models clips of the VQ-VAE's {value}")
        if args.n_cond_frames >= vc.sequence_length:
            raise ValueError(f"--n_cond_frames {args.n_cond_frames} must be smaller than the clip's "
                             f"{vc.sequence_length} frames")
        if args.cache_codes and args.n_cond_frames:
            raise ValueError("--cache_codes keeps only codes, but --n_cond_frames needs the frames; use one of them")
        self.ckpt, self.args = ckpt, args

    def build(self, args, train_set):
        if self.ckpt:
            self.config = stored_config(GPTConfig, self.ckpt, os.path.join(args.out_dir, "ckpt.pt"))
        else:
            if args.class_cond and not train_set.n_classes:
                raise ValueError(f"--class_cond: the data {args.data or '(moving digits)'} has no class labels")
            vc = self.vq.config
            self.config = GPTConfig(latent_shape=vc.latent_shape, n_codes=vc.n_codes, embedding_dim=vc.embedding_dim,
                                    hidden_dim=args.hidden_dim, heads=args.heads, layers=args.layers,
                                    dropout=args.dropout, attn_dropout=args.attn_dropout, attn_type=args.attn_type,
                                    n_cond_frames=args.n_cond_frames, resolution=vc.resolution,
                                    n_classes=train_set.n_classes if args.class_cond else 0)
        model = VideoGPT(self.config)
        model.set_codebook(self.vq.codebook.embeddings)
        model.set_grad_checkpointing(args.grad_checkpointing)
        return model

    def conditioning(self, batch, x, device):
        c = self.config
        label = batch["label"].to(device) if c.n_classes else None
        frames = x[:, :, :c.n_cond_frames] if c.n_cond_frames else None      # (B, 3, k, H, W)
        return label, frames

    def loss(self, model, batch, device):
        if "codes" in batch:
            codes, x = batch["codes"].to(device), None
        else:
            x = batch["video"].to(device, non_blocking=True)                  # (B, 3, T, H, W)
            codes = self.vq.encode(x)                                           # (B, t, h, w), no gradient
        label, frames = self.conditioning(batch, x, device)
        logits = model(codes, label, frames)                                    # (B, t, h, w, n_codes)
        loss = F.cross_entropy(logits.flatten(0, -2).float(), codes.flatten())     # (B*t*h*w, n_codes) vs (B*t*h*w,)
        return loss, dict(loss=loss, bits_per_code=loss / math.log(2))

    def describe(self):
        c = self.config
        text = f"{c.seq_len} codes {c.latent_shape}, {c.attn_type} attention"
        if c.n_cond_frames:
            text += f", conditioned on {c.n_cond_frames} frame(s)"
        if c.n_classes:
            text += f", conditioned on {c.n_classes} classes"
        return text

    def checkpoint(self):
        return dict(config=self.config.to_dict(), vqvae=dict(config=self.vq.config.to_dict(), model=self.vq.state_dict()))

    @torch.no_grad()
    def picture(self, model, batch, device, path):
        """Four real test clips (top row) and four samples (bottom row, conditioned on the clips; eval mode)."""
        x = batch.get("video")
        n = min(4, len(next(iter(batch.values()))))
        real = x[:n].to(device) if x is not None else self.vq.decode(batch["codes"][:n].to(device))
        label, frames = self.conditioning({k: v[:n] for k, v in batch.items()}, real, device)
        codes = model.sample(n, label, frames, generator=torch.Generator(device).manual_seed(0))
        fake = self.vq.decode(codes)
        if frames is not None:
            fake[:, :, :self.config.n_cond_frames] = frames                    # the given frames, shown as given
        clips = to_uint8(torch.cat([real, fake.float()])).numpy()               # (2n, T, H, W, 3)
        clips[n:] = frame_conditioning(clips[n:], self.config.n_cond_frames)
        save_gif(grid_video(clips, ncol=n), f"{path}.gif", fps=4)


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


# -----------------------------------------------------------------------------
# Training


@torch.no_grad()
def evaluate(stage, model, loader, device, autocast, ddp):
    """Mean test metrics over the loader, averaged over processes; and the first batch."""
    model.eval()
    sums, n, first = {}, 0, None
    for batch in loader:
        with autocast:
            _, metrics = stage.loss(model, batch, device)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v.item()
        n += 1
        first = batch if first is None else first
    model.train()
    return all_mean({k: v / max(n, 1) for k, v in sums.items()}, ddp), first


def train(args):
    ddp, rank, world, device = setup(args)
    master = rank == 0
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    log_path = os.path.join(args.out_dir, "log.jsonl")
    if master:
        # Fail now, not at the first checkpoint, if out_dir cannot be written; clear what a kill mid-save left.
        check_writable(args.out_dir)
        remove_stale_temps(ckpt_path)

    # Resume from out_dir/ckpt.pt when it exists; its configs win over the flags.
    ckpt = None
    if os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path)
        kind = checkpoint_kind(ckpt)
        if kind != args.stage:
            raise ValueError(f"{ckpt_path}: is a '{kind}' checkpoint but --stage is '{args.stage}'; "
                             f"use another --out_dir")
        missing = {"model", "optimizer", "scaler", "step", "rng"} - set(ckpt)
        if missing:
            raise ValueError(f"{ckpt_path}: cannot resume from it: no {', '.join(sorted(missing))} "
                             f"(a weights-only checkpoint?); use another --out_dir")
    stage = (VQVAEStage if args.stage == "vqvae" else GPTStage)(args, ckpt, device)

    # Data: the sampler fixes the order; windows and shuffling come from --seed.
    seq_len, resolution = stage.clip
    train_set = make_dataset(args.data, seq_len, train=True, resolution=resolution, seed=args.seed)
    test_set = make_dataset(args.data, seq_len, train=False, resolution=resolution, seed=args.seed)

    # Model, optimizer, scaler. The same seed on every rank gives the same initial weights.
    torch.manual_seed(args.seed)
    model = stage.build(args, train_set).to(device)
    if args.stage == "gpt" and args.cache_codes:
        # Encode once on rank 0 (fixed windows), then every rank reads the file.
        codes_path = os.path.join(args.out_dir, "codes.pt")
        if master and not os.path.exists(codes_path):
            remove_stale_temps(codes_path)
            print(f"encoding {len(train_set)} + {len(test_set)} clips once to {codes_path}", flush=True)
            tr, te = encode_all(stage.vq, train_set, device, args.batch_size), encode_all(stage.vq, test_set, device, args.batch_size)
            save_checkpoint(dict(train=tr, test=te), codes_path)
        if ddp:
            dist.barrier()
        try:
            cached = torch.load(codes_path, weights_only=True)
            train_set, test_set = CodesDataset(*cached["train"]), CodesDataset(*cached["test"])
        except Exception as e:  # unreadable or not ours: say so; deleting it makes the next run re-encode
            raise ValueError(f"{codes_path}: not a readable codes cache ({type(e).__name__}); delete it to re-encode") from None
    step = ckpt["step"] if ckpt else 0
    sampler = InfiniteSampler(len(train_set), args.seed, rank, world, start=step * args.batch_size)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                              num_workers=args.num_workers, pin_memory=device.type == "cuda",
                              worker_init_fn=ignore_stop_signals,
                              # Its own generator: starting an iterator must not draw from the global RNG,
                              # or a resumed run's random draws would differ from an uninterrupted one's.
                              generator=torch.Generator().manual_seed(args.seed))
    # Fixed clips and windows at every evaluation; every rank gets at least one (a tiny test set repeats).
    n_eval = max(world, min(len(test_set), args.eval_batches * args.batch_size * world))
    eval_items = [(i % len(test_set), i % len(test_set)) for i in range(rank, n_eval, world)]
    test_loader = DataLoader(test_set, batch_size=args.batch_size, sampler=eval_items, num_workers=0)

    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999))
    ptdtype = getattr(torch, args.dtype)   # float32, bfloat16 or float16
    scaler = torch.amp.GradScaler(device.type, enabled=ptdtype == torch.float16)
    history = {"train": [], "test": []}
    seed_everything(args.seed + rank)    # torch, numpy and Python streams, different on every rank
    if ckpt:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{ckpt_path}: cannot resume from it ({first_line(e)}); use another --out_dir") from None
        history = ckpt.get("history", history)
        # Each rank continues its own random streams; on a different number of processes they start afresh.
        rngs = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]   # a dict: one process, older format
        if len(rngs) == world:
            set_rng_state(rngs[rank], device)
        else:
            seed_everything(args.seed + rank + 1_000_003 * step)
            if master:
                warnings.warn(f"{ckpt_path}: saved by {len(rngs)} process(es), resumed by {world}: "
                              f"random streams and data order are not those of an uninterrupted run")
    if master:
        # Records past the checkpoint (or all of them, with none) come from a run that was killed: it repeats them.
        dropped = trim_log(log_path, step)
        if dropped:
            print(f"{log_path}: dropped {dropped} record(s) after step {step}, where the checkpoint is", flush=True)
    raw_model = model
    if ddp and args.sync_batchnorm:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif master:
            warnings.warn("--sync_batchnorm needs CUDA (PyTorch's SyncBatchNorm is GPU-only); ignored on CPU")
    if ddp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    autocast = torch.autocast(device_type=device.type, dtype=ptdtype, enabled=ptdtype != torch.float32)
    # Small all-reduced flags live where the backend wants them: GPU memory for NCCL, CPU for gloo.
    flag_device = device if device.type == "cuda" else torch.device("cpu")
    saved_step = step if ckpt else None

    def checkpoint():
        """Everything needed to continue exactly: weights, optimizer, scaler, step, every rank's RNG, curves."""
        nonlocal saved_step
        rng = [rng_state(device)]
        if ddp:
            mine, rng = rng[0], [None] * world
            dist.all_gather_object(rng, mine)
        if master:
            save_checkpoint(dict(stage=args.stage, model=raw_model.state_dict(), step=step,
                                 optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), train_args=vars(args),
                                 history=history, rng=rng, **stage.checkpoint()), ckpt_path)
            if args.keep_last > 0:
                keep_copy(ckpt_path, step, args.keep_last)
        saved_step = step

    def log(record):
        if master:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def run_eval():
        metrics, batch = evaluate(stage, model, test_loader, device, autocast, ddp)
        if master:
            history["test"].append((step, metrics[stage.curve]))
            log(dict(step=step, split="test", **metrics))
            # Eval mode: on rank 0 alone a training-mode forward would start codebook collectives.
            raw_model.eval()
            with autocast:
                stage.picture(raw_model, batch, device, os.path.join(args.out_dir, f"{'recon' if args.stage == 'vqvae' else 'samples'}_{step:07d}"))
            raw_model.train()
            plot_losses(history, os.path.join(args.out_dir, "loss.png"), stage.curve_label)
            print(f"step {step}: test " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
        # Weights that give a non-finite test loss are not worth keeping: the last good checkpoint stays.
        if not math.isfinite(metrics[stage.curve]):
            if master:
                tqdm.write(f"warning: step {step}: test {stage.curve} is {metrics[stage.curve]}; checkpoint not written")
            return
        checkpoint()

    def last_good():
        return f"{ckpt_path} (step {saved_step}) is the last good checkpoint" if saved_step is not None \
            else "no checkpoint was written"

    if master:
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"{args.stage}: {n_params / 1e6:.2f}M parameters, {stage.describe()}, {len(train_set)} train / "
              f"{len(test_set)} test clips, {world} process(es) on {device}, {args.dtype}"
              + (f", resuming at step {step}" if step else ""), flush=True)

    # The loop: forward, backward, clip, check, step, log, evaluate/checkpoint, stop if asked.
    bar = tqdm(total=args.max_steps, initial=step, disable=not master, dynamic_ncols=True, unit="step")
    batches = iter(train_loader)
    t0, window, stopping = time.time(), [], False
    skipped, scaler_skipped, bad_run = 0, 0, 0   # non-finite steps, float16 overflows, bad steps in a row
    stop = StopRequest()
    try:
        while step < args.max_steps:
            lr = get_lr(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = next(batches)
            with autocast:
                loss, metrics = stage.loss(model, batch, device)
            scaler.scale(loss).backward()
            # Unscale before clipping so the norm is the true one; log what clipping returns.
            scaler.unscale_(optimizer)
            clip = args.gradient_clip_val if args.gradient_clip_val > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            values = {k: v.item() for k, v in metrics.items()} | {"grad_norm": grad_norm.item()}
            # A non-finite loss or gradient skips the step. With float16 an overflowing gradient is
            # the GradScaler's business (it skips and lowers the scale), so only the loss counts there.
            # The flag travels with any stop request in one all-reduce, so every process agrees on both.
            finite_grad = math.isfinite(values["grad_norm"])
            bad = not math.isfinite(values["loss"]) or (not scaler.is_enabled() and not finite_grad)
            flags = torch.tensor([bad, stop.signum is not None], dtype=torch.float32, device=flag_device)
            if ddp:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            bad, stopping = bool(flags[0]), bool(flags[1])
            if scaler.is_enabled():
                scaler.step(optimizer)
            elif not bad:
                optimizer.step()
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if bad:
                skipped, bad_run = skipped + 1, bad_run + 1
                if master:
                    tqdm.write(f"warning: step {step}: non-finite loss {values['loss']:.4g} or gradient norm "
                               f"{values['grad_norm']:.4g}; step skipped ({bad_run} in a row, "
                               f"the run stops at --max_bad_steps={args.max_bad_steps})")
            elif not finite_grad:
                scaler_skipped += 1      # float16 overflow: the scaler skipped the step, routine early in a run
            else:
                bad_run = 0
                window.append(values)
            if step % args.log_interval == 0 or step == args.max_steps:
                metrics = {k: float(np.mean([w[k] for w in window])) for k in window[0]} if window else {}
                metrics = all_mean(metrics, ddp)
                clips_per_s = (len(window) + skipped + scaler_skipped) * args.batch_size * world / (time.time() - t0)
                extra = dict(skipped=skipped)
                if scaler.is_enabled():
                    extra |= dict(scaler_skipped=scaler_skipped, loss_scale=scaler.get_scale())
                window, t0, skipped, scaler_skipped = [], time.time(), 0, 0
                if master:
                    if stage.curve in metrics:
                        history["train"].append((step, metrics[stage.curve]))
                    log(dict(step=step, split="train", lr=lr, clips_per_s=clips_per_s, **metrics, **extra))
                    bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()} | {"clips/s": f"{clips_per_s:.1f}"})
            if bad_run >= args.max_bad_steps:
                raise RunError(f"{args.out_dir}: stopped at step {step} after {bad_run} consecutive steps with a "
                               f"non-finite loss or gradient; {last_good()}. Try a lower --lr, "
                               f"--gradient_clip_val 1, or --dtype bfloat16 / float32")
            # Evaluate and checkpoint, but never in the middle of a bad stretch: the last good checkpoint stays.
            if (step % args.eval_interval == 0 or step == args.max_steps) and bad_run == 0:
                run_eval()
            if stopping:
                break
        if stopping:
            if saved_step != step and bad_run == 0:
                checkpoint()
            if master:
                tqdm.write(f"stopped at step {step}; {last_good()}; run the same command to resume")
            raise SystemExit(128 + (stop.signum or signal.SIGTERM))
    except KeyboardInterrupt:
        if master:
            tqdm.write(f"interrupted at step {step} without saving; {last_good()}")
        raise
    except RuntimeError as e:
        if not (ddp and collective_failure(e)):
            raise
        # gloo's text starts with a source location; the first sentence after it says what happened.
        first = re.sub(r"^\[[^\]]*\]\s*", "", first_line(e, limit=None)).split(". ")[0]
        raise RunError(f"rank {rank}: lost contact with the other processes at step {step} (one died, or stalled "
                       f"longer than --ddp_timeout={args.ddp_timeout:g}s): {first}; {last_good()}") from None
    finally:
        stop.restore()
        bar.close()
        # The workers ignore SIGTERM, so they must be shut down here, not terminated at exit.
        del batches
    if master:
        print(f"done: {ckpt_path}", flush=True)
    return raw_model


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
