"""Training entry point: `--stage vqvae` trains the VQ-VAE of Section 3.1.

Single process (GPU if present, else CPU):
    python train.py --stage vqvae --out_dir runs/vqvae
Several GPUs on one machine, plain DDP:
    torchrun --standalone --nproc_per_node=8 train.py --stage vqvae --data bair.hdf5 --out_dir runs/bair
Several machines: the usual torchrun flags (--nnodes, --node_rank, --rdzv_endpoint).

With no --data the run trains on the built-in moving-digits set (scaled to
32x32), and every flag left out takes a small value that trains in about five
minutes on a 2-core CPU; with --data, flags left out take the paper's values. The run writes to --out_dir:
    ckpt.pt        latest checkpoint (written atomically; a restart resumes from it)
    log.jsonl      one JSON object per logged step and per evaluation
    recon_*.png    test clips (odd rows) above their reconstructions (even rows)
    loss.png       training and test loss curves
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Sampler

from data import atomic_write, make_dataset, one_line_warnings, save_png, to_uint8, video_grid
from vqvae import VQVAE, VQVAEConfig, checkpoint_kind, load_checkpoint

# -----------------------------------------------------------------------------
# Arguments

# Flags left unset take these values: the paper's for real data, small ones for
# the moving-digits default so that a CPU gets recognisable reconstructions in minutes.
PRESETS = {
    "paper": dict(embedding_dim=256, n_codes=2048, n_hiddens=240, n_res_layers=4, downsample=[4, 4, 4],
                  sequence_length=16, resolution=64, batch_size=32, lr=7e-4, max_steps=200_000,
                  eval_interval=2000, log_interval=50),
    "digits": dict(embedding_dim=64, n_codes=512, n_hiddens=64, n_res_layers=1, downsample=[2, 4, 4],
                   sequence_length=8, resolution=32, batch_size=8, lr=2e-3, max_steps=2000,
                   eval_interval=500, log_interval=25),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train VideoGPT's VQ-VAE.")
    p.add_argument("--stage", required=True, choices=["vqvae"], help="what to train")
    # data
    p.add_argument("--data", "--data_path", dest="data", default=None,
                   help="HDF5 file or video folder (default: the built-in moving digits)")
    p.add_argument("--sequence_length", type=int, default=None, help="frames per training clip")
    p.add_argument("--resolution", type=int, default=None, help="frame height = width, pixels")
    p.add_argument("--batch_size", type=int, default=None, help="clips per step per process")
    p.add_argument("--num_workers", type=int, default=2, help="DataLoader worker processes per process")
    # model
    p.add_argument("--embedding_dim", type=int, default=None, help="width of each code vector")
    p.add_argument("--n_codes", type=int, default=None, help="codebook size")
    p.add_argument("--n_hiddens", type=int, default=None, help="channels of the encoder and decoder")
    p.add_argument("--n_res_layers", type=int, default=None, help="attention residual blocks per side")
    p.add_argument("--downsample", type=int, nargs=3, default=None, metavar=("T", "H", "W"),
                   help="compression factor per axis, powers of two")
    # optimisation
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    p.add_argument("--warmup_steps", type=int, default=0, help="linear learning-rate warm-up steps")
    p.add_argument("--max_steps", type=int, default=None, help="optimizer steps in total")
    p.add_argument("--gradient_clip_val", type=float, default=0.0, help="clip the gradient norm to this (0: off)")
    # run
    p.add_argument("--out_dir", required=True, help="checkpoint, logs and pictures go here")
    p.add_argument("--eval_interval", type=int, default=None, help="steps between evaluations and checkpoints")
    p.add_argument("--eval_batches", type=int, default=4, help="test batches per evaluation")
    p.add_argument("--log_interval", type=int, default=None, help="steps between log lines")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="autocast precision; float16 uses a GradScaler; the codebook always runs in float32")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, data order and clip windows")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--sync_batchnorm", action="store_true", help="BatchNorm statistics over all processes")
    args = p.parse_args(argv)
    # Fill unset flags from the preset.
    preset = PRESETS["digits" if args.data is None else "paper"]
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


# -----------------------------------------------------------------------------
# Distributed set-up and helpers


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
        # NCCL between GPUs, gloo between CPU processes; a dead peer fails collectives after the timeout.
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=10))
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
    """Learning rate as a pure function of the step: linear warm-up, then constant."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    return args.lr


def save_checkpoint(obj, path):
    """torch.save, atomically: a kill during the save leaves the previous checkpoint intact."""
    atomic_write(path, lambda f: torch.save(obj, f))


def plot_losses(history, path):
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
    ax.set_ylabel("normalized MSE")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


# -----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, loader, device, autocast, ddp):
    """Mean test losses over the loader; returns (metrics, first clips, their reconstructions)."""
    model.eval()
    sums, n, first = {}, 0, None
    for batch in loader:
        x = batch["video"].to(device)
        with autocast:
            out = model(x)
        for k in ("loss", "recon_loss", "commitment_loss", "perplexity", "usage"):
            sums[k] = sums.get(k, 0.0) + out[k].item()
        n += 1
        if first is None:
            first = (x[:4], out["recon"][:4])
    model.train()
    metrics = all_mean({k: v / max(n, 1) for k, v in sums.items()}, ddp)
    return metrics, first


# -----------------------------------------------------------------------------
# Training


def train(args):
    ddp, rank, world, device = setup(args)
    master = rank == 0
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")

    # Resume from out_dir/ckpt.pt when it exists; its config wins over the flags.
    ckpt = None
    config = VQVAEConfig(embedding_dim=args.embedding_dim, n_codes=args.n_codes, n_hiddens=args.n_hiddens,
                         n_res_layers=args.n_res_layers, downsample=args.downsample,
                         sequence_length=args.sequence_length, resolution=args.resolution)
    if os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path)
        kind = checkpoint_kind(ckpt)
        if kind != args.stage:
            raise ValueError(f"{ckpt_path}: is a '{kind}' checkpoint but --stage is '{args.stage}'; "
                             f"use another --out_dir")
        saved = VQVAEConfig(**ckpt["config"])
        if saved != config and master:
            warnings.warn(f"{ckpt_path}: resuming with the checkpoint's model config, not the flags'")
        config = saved

    # Data: the sampler fixes the order; windows and shuffling come from --seed.
    train_set = make_dataset(args.data, config.sequence_length, train=True, resolution=config.resolution, seed=args.seed)
    test_set = make_dataset(args.data, config.sequence_length, train=False, resolution=config.resolution, seed=args.seed)
    step = ckpt["step"] if ckpt else 0
    sampler = InfiniteSampler(len(train_set), args.seed, rank, world, start=step * args.batch_size)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                              num_workers=args.num_workers, pin_memory=device.type == "cuda",
                              persistent_workers=args.num_workers > 0,
                              # Its own generator: starting an iterator must not draw from the global RNG,
                              # or a resumed run's codebook restarts would differ from an uninterrupted one's.
                              generator=torch.Generator().manual_seed(args.seed))
    n_eval = min(len(test_set), args.eval_batches * args.batch_size * world)
    eval_items = [(i, i) for i in range(rank, n_eval, world)]   # fixed clips and windows every time
    test_loader = DataLoader(test_set, batch_size=args.batch_size, sampler=eval_items, num_workers=0)

    # Model, optimizer, scaler. The same seed on every rank gives the same initial weights.
    torch.manual_seed(args.seed)
    model = VQVAE(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999))
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    scaler = torch.amp.GradScaler(device.type, enabled=ptdtype == torch.float16)
    history = {"train recon": [], "test recon": []}
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        history = ckpt.get("history", history)
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    else:
        torch.manual_seed(args.seed + rank)
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

    def checkpoint():
        """Everything needed to continue exactly: weights, optimizer, scaler, step, RNG, curves."""
        if not master:
            return
        rng = dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        save_checkpoint(dict(stage="vqvae", config=config.to_dict(), model=raw_model.state_dict(), step=step,
                             optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), train_args=vars(args),
                             history=history, rng=rng), ckpt_path)

    def log(record):
        if master:
            with open(os.path.join(args.out_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def run_eval():
        metrics, (x, recon) = evaluate(model, test_loader, device, autocast, ddp)
        if master:
            history["test recon"].append((step, metrics["recon_loss"]))
            log(dict(step=step, split="test", **metrics))
            pairs = torch.stack([x, recon.float()], dim=1).flatten(0, 1)        # (2*n, 3, T, H, W), clip then recon
            save_png(video_grid(to_uint8(pairs).numpy()), os.path.join(args.out_dir, f"recon_{step:07d}.png"))
            plot_losses(history, os.path.join(args.out_dir, "loss.png"))
            print(f"step {step}: test recon {metrics['recon_loss']:.4f}  perplexity {metrics['perplexity']:.1f}  "
                  f"codes used {metrics['usage']:.1%}", flush=True)
        checkpoint()

    if master:
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"vqvae: {n_params / 1e6:.2f}M parameters, latent {config.latent_shape}, {len(train_set)} train / "
              f"{len(test_set)} test videos, {world} process(es) on {device}, {args.dtype}"
              + (f", resuming at step {step}" if step else ""), flush=True)

    # The loop: evaluate/checkpoint, forward, backward, clip, step, log.
    from tqdm import tqdm
    bar = tqdm(total=args.max_steps, initial=step, disable=not master, dynamic_ncols=True, unit="step")
    batches = iter(train_loader)
    t0, window = time.time(), []
    try:
        while step < args.max_steps:
            lr = get_lr(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = next(batches)["video"].to(device, non_blocking=True)   # (B, 3, T, H, W)
            with autocast:
                out = model(x)
            scaler.scale(out["loss"]).backward()
            # Unscale before clipping so the norm is the true one; log what clipping returns.
            scaler.unscale_(optimizer)
            clip = args.gradient_clip_val if args.gradient_clip_val > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            window.append({k: out[k].item() for k in ("loss", "recon_loss", "commitment_loss", "perplexity", "usage")}
                          | {"grad_norm": grad_norm.item()})
            if step % args.log_interval == 0 or step == args.max_steps:
                metrics = all_mean({k: float(np.mean([w[k] for w in window])) for k in window[0]}, ddp)
                dt = time.time() - t0
                clips_per_s = len(window) * args.batch_size * world / dt
                window, t0 = [], time.time()
                if master:
                    history["train recon"].append((step, metrics["recon_loss"]))
                    log(dict(step=step, split="train", lr=lr, clips_per_s=clips_per_s, **metrics))
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", ppl=f"{metrics['perplexity']:.0f}",
                                    used=f"{metrics['usage']:.0%}", gnorm=f"{metrics['grad_norm']:.2f}",
                                    clips_s=f"{clips_per_s:.1f}")
            if step % args.eval_interval == 0 or step == args.max_steps:
                run_eval()
    except KeyboardInterrupt:
        if master:
            print(f"\ninterrupted at step {step}; saving {ckpt_path}", flush=True)
        checkpoint()
        raise SystemExit(130)
    finally:
        bar.close()
    if master:
        print(f"done: {ckpt_path}", flush=True)
    return raw_model


def main(argv=None):
    args = parse_args(argv)
    one_line_warnings()
    try:
        train(args)
        if dist.is_initialized():
            dist.barrier()   # nobody tears the group down while a peer still uses it
    except (FileNotFoundError, ValueError) as e:
        if os.environ.get("VIDEOGPT_DEBUG"):
            raise
        sys.exit(f"train.py: error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
