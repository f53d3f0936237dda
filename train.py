"""Training, both stages of VideoGPT: `--stage vqvae` (Section 3.1), then `--stage gpt` (3.2).

The VQ-VAE learns to compress clips into codes; the prior then learns those codes, read by a
frozen VQ-VAE (`--vqvae PATH`: our checkpoint or an original VideoGPT one).

Single process (GPU if present, else CPU):
    python train.py --stage vqvae --out_dir runs/vqvae
    python train.py --stage gpt --vqvae runs/vqvae/ckpt.pt --out_dir runs/gpt
Several GPUs on one machine, plain DDP:
    torchrun --standalone --nproc_per_node=8 train.py --stage vqvae --data bair.hdf5 \
        --out_dir runs/bair
    torchrun --standalone --nproc_per_node=8 train.py --stage gpt --vqvae runs/bair/ckpt.pt \
        --data bair.hdf5 --n_cond_frames 1 --attn_type sparse --out_dir runs/bair_gpt
Several machines: the usual torchrun flags (--nnodes, --node_rank, --rdzv_endpoint).

With no --data a run trains on the built-in moving digits, and every flag left out takes a small
value that trains in minutes on a CPU; with --data, flags left out take the paper's values. A run
writes to --out_dir: ckpt.pt (the latest checkpoint, written atomically; a restart resumes from
it; a prior's embeds its VQ-VAE), log.jsonl, loss.png, and pictures: recon_*.png (test clips
above their reconstructions) or samples_*.gif (real clips above samples).

Read it in this order: the flags and their presets (the one place a run's settings are decided),
the learning rate, the two stages (what differs between training the VQ-VAE and the prior:
config, loss, pictures), then `train`, the loop. The loop holds a `Run` (run.py) that sets
everything up and does the chores (logging, evaluating, checkpointing, stopping), each one named
call.
"""

import argparse
import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from checkpoints import grid_video, save_gif, save_png, stored_config, video_grid
from data import samples_to_uint8, to_uint8
from gpt import GPTConfig, VideoGPT, embedded_vqvae
from fast import use_channels_last, use_fast_attention, use_grad_checkpointing
from muon import make_optimizer
from run import (Run, TextureTune, check_prior_data, check_prior_flags, fine_tune_config,
                 fine_tune_vqvae, gradient_sync, one_codebook_step, step_flags)
from runtime import StopRequest, default_device, run_cli
from vqvae import VQVAEConfig, load_vqvae

# -----------------------------------------------------------------------------
# Arguments

# Flags left unset take these values: the paper's for real data, small ones for the
# moving-digits default so that a 2-core CPU runs the whole pipeline in minutes.
PRESETS = {
    ("vqvae", "paper"): dict(
        embedding_dim=256, n_codes=2048, dead_code_threshold=1.0, n_hiddens=240, n_res_layers=4,
        local_encoder=False, downsample=[4, 4, 4], sequence_length=16, resolution=64,
        batch_size=32, optimizer="adam", lr=7e-4, warmup_steps=0, lr_schedule="constant",
        max_steps=200_000, eval_interval=2000, log_interval=50, dtype="float32"),
    ("vqvae", "digits"): dict(
        embedding_dim=64, n_codes=512, dead_code_threshold=0.05, n_hiddens=64, n_res_layers=0,
        decoder_res_layers=1, local_encoder=True, downsample=[2, 4, 4], sequence_length=8,
        resolution=32, batch_size=8, optimizer="muon", lr=4e-3, warmup_steps=0,
        lr_schedule="constant", max_steps=4500, eval_interval=900, log_interval=25,
        dtype="bfloat16"),
    ("gpt", "paper"): dict(
        hidden_dim=576, heads=4, layers=8, dropout=0.2, attn_dropout=0.3, rope=False,
        batch_size=32, optimizer="adam", lr=3e-4, warmup_steps=1000, lr_schedule="cosine",
        max_steps=200_000, eval_interval=2000, log_interval=50, dtype="float32"),
    # A real dataset's 64x64 clips of 16 frames on a 2-core CPU (the ViZDoom recipe, about 30
    # minutes): each code covers an 8x8 patch of two frames, so a clip is (8, 8, 8) codes.
    # docs/vizdoom.md tells why, and what it measured.
    ("vqvae", "cpu"): dict(
        embedding_dim=64, n_codes=512, dead_code_threshold=0.05, n_hiddens=64, n_res_layers=0,
        decoder_res_layers=1, local_encoder=True, downsample=[2, 8, 8], sequence_length=16,
        resolution=64, batch_size=8, optimizer="muon", lr=4e-3, warmup_steps=0,
        lr_schedule="constant", max_steps=1500, eval_interval=500, log_interval=25,
        dtype="bfloat16"),
    ("gpt", "cpu"): dict(
        hidden_dim=120, heads=4, layers=4, dropout=0.0, attn_dropout=0.0, rope=True, batch_size=8,
        optimizer="muon", lr=3e-3, warmup_steps=100, lr_schedule="cosine", max_steps=3000,
        eval_interval=1000, log_interval=25, dtype="bfloat16"),
    ("gpt", "digits"): dict(
        hidden_dim=120, heads=4, layers=4, dropout=0.0, attn_dropout=0.0, rope=True, batch_size=8,
        optimizer="muon", lr=3e-3, warmup_steps=100, lr_schedule="cosine", max_steps=4000,
        eval_interval=2000, log_interval=25, dtype="bfloat16"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train VideoGPT's VQ-VAE or its GPT prior.")
    p.add_argument("--stage", required=True, choices=["vqvae", "gpt"], help="what to train")
    for add_flags in (data_flags, vqvae_flags, prior_flags, optimisation_flags, run_flags):
        add_flags(p)
    return fill_from_preset(p.parse_args(argv))


def data_flags(p):
    p.add_argument("--data", "--data_path", dest="data", default=None,
                   help="HDF5 file, or folder of videos or of image folders (default: digits)")
    p.add_argument("--sample_every", type=int, default=1, metavar="K",
                   help="a clip takes every K-th frame of its window (high-fps footage)")
    p.add_argument("--preset", default=None, choices=["paper", "digits", "cpu"],
                   help="flags left out take: paper (default with --data), digits (without), cpu "
                        "(64x64 real data on a CPU)")
    p.add_argument("--sequence_length", type=int, default=None, help="frames per clip")
    p.add_argument("--resolution", type=int, default=None, help="frame height = width, pixels")
    p.add_argument("--batch_size", type=int, default=None, help="clips per step per process")
    p.add_argument("--num_workers", type=int, default=None,
                   help="DataLoader workers per process (default: half the cores, at most 4)")


def vqvae_flags(p):
    p.add_argument("--embedding_dim", type=int, default=None,
                   help="vqvae: width of each code vector")
    p.add_argument("--n_codes", type=int, default=None, help="vqvae: codebook size")
    p.add_argument("--dead_code_threshold", type=float, default=None,
                   help="vqvae: a code whose moving average of uses per step falls below this "
                        "is restarted")
    p.add_argument("--n_hiddens", type=int, default=None,
                   help="vqvae: channels of the encoder and decoder")
    p.add_argument("--n_res_layers", type=int, default=None,
                   help="vqvae: attention residual blocks per side")
    p.add_argument("--decoder_res_layers", type=int, default=None,
                   help="vqvae: the decoder's attention residual blocks, when not --n_res_layers")
    p.add_argument("--local_encoder", action=argparse.BooleanOptionalAction, default=None,
                   help="vqvae: each code sees only its own patch (kernels = strides); equal "
                        "patches, equal codes")
    p.add_argument("--downsample", type=int, nargs=3, default=None, metavar=("T", "H", "W"),
                   help="vqvae: compression factor per axis, powers of two")
    p.add_argument("--texture_weight", type=float, default=0.0, help="vqvae: texture term weight")
    p.add_argument("--decoder_only", action="store_true", help="vqvae: train the decoder alone")


def prior_flags(p):
    p.add_argument("--vqvae", default=None,
                   help="gpt: the frozen VQ-VAE checkpoint (ours or an original .ckpt)")
    p.add_argument("--hidden_dim", type=int, default=None,
                   help="gpt: transformer width, divisible by 3 and heads")
    p.add_argument("--heads", type=int, default=None, help="gpt: attention heads")
    p.add_argument("--layers", type=int, default=None, help="gpt: transformer blocks")
    p.add_argument("--dropout", type=float, default=None, help="gpt: residual dropout")
    p.add_argument("--attn_dropout", type=float, default=None, help="gpt: attention-weight dropout")
    p.add_argument("--attn_type", default=None, choices=["full", "sparse"],
                   help="gpt: causal attention pattern (default: full)")
    p.add_argument("--rope", action=argparse.BooleanOptionalAction, default=None,
                   help="gpt: rotary position embeddings over (t, h, w) besides the learned "
                        "tables (default: on for the digits, off for real data, as the paper)")
    p.add_argument("--n_cond_frames", type=int, default=0,
                   help="gpt: condition on the first k frames")
    p.add_argument("--class_cond", action="store_true",
                   help="gpt: condition on the data's class labels")
    p.add_argument("--action_cond", nargs="?", const="tokens", default=None,
                   choices=["tokens", "norms"],
                   help="gpt: condition on the data's per-frame actions as tokens to cross-attend "
                        "to (the default), or norms: the paper's conditional LayerNorms")
    p.add_argument("--cache_codes", action=argparse.BooleanOptionalAction, default=None,
                   help="gpt: encode every clip once, to out_dir/codes.pt (default: on for the "
                        "digits, whose clips are one window long, unless conditioned on frames)")
    p.add_argument("--grad_checkpointing", action="store_true",
                   help="gpt: recompute activations in backward")


def optimisation_flags(p):
    p.add_argument("--optimizer", default=None, choices=["adam", "muon"],
                   help="adam (the paper's), or muon: Muon for the model's hidden matrices (the "
                        "prior's attention and MLP, the VQ-VAE's convolutions), Adam for the rest "
                        "(default: muon for the moving digits, adam for real data; a resumed run "
                        "keeps its checkpoint's)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (Adam's; Muon's updates are scaled to match an Adam "
                        "update's size)")
    p.add_argument("--lr_schedule", default=None, choices=["constant", "cosine"],
                   help="after warm-up")
    p.add_argument("--warmup_steps", type=int, default=None,
                   help="linear learning-rate warm-up steps")
    p.add_argument("--max_steps", type=int, default=None, help="optimizer steps in total")
    p.add_argument("--gradient_clip_val", type=float, default=0.0,
                   help="clip the gradient norm to this (0: off)")
    p.add_argument("--grad_accum", type=int, default=1, metavar="N",
                   help="micro-batches of --batch_size whose gradients add up to one optimizer "
                        "step, per process: the step sees batch_size x N x processes clips")
    p.add_argument("--init_from", default=None, metavar="CKPT",
                   help="fine-tune from this checkpoint of the stage (ours or an original .ckpt; "
                        "for vqvae also a prior of ours, for the VQ-VAE it carries): its weights, "
                        "a fresh optimizer, step 0; model flags must agree")


def run_flags(p):
    p.add_argument("--out_dir", required=True, help="checkpoint, logs and pictures go here")
    p.add_argument("--keep_last", type=int, default=0,
                   help="also keep the newest K checkpoints as ckpt_STEP.pt")
    p.add_argument("--max_bad_steps", type=int, default=20,
                   help="stop after this many consecutive steps with a non-finite loss or gradient")
    p.add_argument("--ddp_timeout", type=float, default=600,
                   help="seconds a process waits for its peers before the job stops")
    p.add_argument("--eval_interval", type=int, default=None,
                   help="steps between evaluations and checkpoints")
    p.add_argument("--eval_batches", type=int, default=4, help="test batches per evaluation")
    p.add_argument("--log_interval", type=int, default=None, help="steps between log lines")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log curves, pictures, videos to out_dir/tb")
    p.add_argument("--wandb", default=None, metavar="PROJECT",
                   help="also log them to this W&B project (offline too)")
    p.add_argument("--wandb_run", default=None, metavar="NAME", help="the W&B run's display name")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="autocast precision; float16 adds a GradScaler; the codebook stays float32 "
                        "(default: float32 with --data, bfloat16 for the digits)")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, data order and clip windows")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--sync_batchnorm", action="store_true",
                   help="vqvae: BatchNorm statistics over all processes")


def fill_from_preset(args):
    """Give every flag left unset the value of the stage's preset: --preset's, else the paper's
    with --data and the moving digits' without."""
    args.preset = args.preset or ("digits" if args.data is None else "paper")
    preset = PRESETS[(args.stage, args.preset)]
    preset = dict(preset, attn_type="full")
    filled = [k for k in preset if k in vars(args) and getattr(args, k) is None]
    for k in filled:
        setattr(args, k, preset[k])
    # Which flags the user left out: a fine-tune takes those from its checkpoint instead.
    args.from_preset = filled
    # The digits' local encoder goes with their attention-free encoder, so asking for attention
    # blocks turns it off.
    if "local_encoder" in filled and args.n_res_layers:
        args.local_encoder = False
    if args.cache_codes is None:
        needs_clips = args.n_cond_frames or args.action_cond
        args.cache_codes = args.stage == "gpt" and args.data is None and not needs_clips
    return args


# -----------------------------------------------------------------------------
# The learning rate: a pure function of the step


def get_lr(step, args):
    """The learning rate of step `step` (0-based): a linear warm-up, then constant, or a cosine
    down to zero at max_steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.lr_schedule == "constant":
        return args.lr
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# -----------------------------------------------------------------------------
# The two stages: what differs between them is here, the loop below is shared


def resolved_config(config, ckpt, path, source=None, args=None):
    """The config a run uses: `config` from the flags; on resume the checkpoint's, which wins
    (`changed_flags` says which flags it overrode); on a fine-tune's first start its source's."""
    if ckpt is not None:
        return stored_config(type(config), ckpt, path)
    if source is not None:
        return fine_tune_config(type(config), source, args)
    return config


class VQVAEStage:
    """Reconstruction: loss = normalized MSE + 0.25 * commitment; the codebook follows by EMA."""

    name, curve, curve_label, picture_name = "vqvae", "recon_loss", "normalized MSE", "recon"
    logged = ("loss", "recon_loss", "commitment_loss", "perplexity", "usage", "texture_loss")

    def __init__(self, args, ckpt, ckpt_path, source=None):
        self.tune = TextureTune(args, ckpt or source)   # beyond the paper: --decoder_only, ...
        config = VQVAEConfig(
            embedding_dim=args.embedding_dim, n_codes=args.n_codes,
            dead_code_threshold=args.dead_code_threshold, n_hiddens=args.n_hiddens,
            n_res_layers=args.n_res_layers, decoder_res_layers=args.decoder_res_layers,
            local_encoder=args.local_encoder, downsample=args.downsample,
            sequence_length=args.sequence_length, resolution=args.resolution)
        self.config = resolved_config(config, ckpt, ckpt_path, source, args)
        self.clip = (self.config.sequence_length, self.config.resolution)

    def build(self, args, train_set):
        model = self.tune.model(self.config)   # VQVAE(config); run.DecoderOnly: --decoder_only
        return use_channels_last(model, default_device(args.device), args.dtype)

    def loss(self, model, batch, device):
        x = batch["video"].to(device, non_blocking=True)             # (B, 3, T, H, W)
        out = self.tune.add_to(model(x), x)
        return out["loss"], {k: out[k] for k in self.logged if k in out}

    def describe(self):
        return f"latent {self.config.latent_shape}"

    def checkpoint(self):
        return dict(config=self.config.to_dict())

    @torch.no_grad()
    def picture(self, model, batch, device, path):
        """Four test clips, each above its reconstruction (model in eval mode)."""
        x = batch["video"][:4].to(device)
        recon = model(x)["recon"].float()
        # Each clip, then its reconstruction.
        pairs = torch.stack([x, recon], dim=1).flatten(0, 1)       # (2*n, 3, T, H, W)
        save_png(video_grid(to_uint8(pairs).numpy()), f"{path}.png")


class GPTStage:
    """Prior: cross-entropy of every code given the codes before it (and the conditioning)."""

    name, curve, picture_name = "gpt", "loss", "samples"
    curve_label = "cross-entropy (nats per code)"
    logged = ("loss", "bits_per_code")

    def __init__(self, args, ckpt, ckpt_path, device="cpu", source=None):
        # The VQ-VAE is the checkpoint's own copy when resuming or fine-tuning, else --vqvae's. It
        # stays frozen, in eval mode, for good.
        if ckpt:
            self.vq = embedded_vqvae(ckpt, ckpt_path)
        elif source:
            self.vq = fine_tune_vqvae(source, args)
        elif args.vqvae is None:
            raise ValueError("--stage gpt needs --vqvae PATH (a VQ-VAE checkpoint: ours or an "
                             "original VideoGPT .ckpt)")
        else:
            self.vq = load_vqvae(args.vqvae)
        self.vq = use_fast_attention(self.vq.to(device).eval().requires_grad_(False))
        vc = self.vq.config
        self.clip = (vc.sequence_length, vc.resolution)
        check_prior_flags(args, vc)
        self.ckpt, self.ckpt_path, self.source = ckpt, ckpt_path, source

    def build(self, args, train_set):
        has_actions = "actions" in getattr(train_set, "extras", ())
        action_dim = 0
        if args.action_cond and has_actions:
            action_dim = train_set[(0, 0)]["actions"].shape[-1]
        # The actions' names travel with the prior (sample.py --actions "TURN_LEFT*8,...").
        data_names = getattr(train_set, "action_names", None) if action_dim else None
        self.action_names = (self.ckpt or self.source or {}).get("action_names") or data_names
        vc = self.vq.config
        config = GPTConfig(
            latent_shape=vc.latent_shape, n_codes=vc.n_codes, embedding_dim=vc.embedding_dim,
            hidden_dim=args.hidden_dim, heads=args.heads, layers=args.layers,
            dropout=args.dropout, attn_dropout=args.attn_dropout, attn_type=args.attn_type,
            rope=args.rope, n_cond_frames=args.n_cond_frames, resolution=vc.resolution,
            n_classes=train_set.n_classes if args.class_cond else 0, action_dim=action_dim,
            action_norms=args.action_cond == "norms", sequence_length=vc.sequence_length)
        self.config = resolved_config(config, self.ckpt, self.ckpt_path, self.source, args)
        if not self.ckpt:   # the data holds what the flags (or a fine-tune's source) ask for
            check_prior_data(args, train_set, self.config if self.source else None)
        model = VideoGPT(self.config)
        model.set_codebook(self.vq.codebook.embeddings)
        return use_grad_checkpointing(model, args.grad_checkpointing)

    def conditioning(self, batch, x, device):
        """The prior's conditioning inputs of a batch: the label, the first frames (B, 3, k, H, W)
        and the actions (B, T, action_dim), each None where the prior is not given it."""
        c = self.config
        return dict(label=batch["label"].to(device) if c.n_classes else None,
                    frames=x[:, :, :c.n_cond_frames] if c.n_cond_frames else None,
                    actions=batch["actions"].to(device) if c.action_dim else None)

    def loss(self, model, batch, device):
        if "codes" in batch:
            codes, x = batch["codes"].to(device), None
        else:
            x = batch["video"].to(device, non_blocking=True)           # (B, 3, T, H, W)
            codes = self.vq.encode(x)                                    # (B, t, h, w), no gradient
        logits = model(codes, **self.conditioning(batch, x, device))   # (B, t, h, w, n_codes)
        # Every code is a classification over the codebook, computed in float32.
        logits = logits.flatten(0, -2).float()                         # (B*t*h*w, n_codes)
        loss = F.cross_entropy(logits, codes.flatten())                # against (B*t*h*w,)
        return loss, dict(loss=loss, bits_per_code=loss / math.log(2))

    def describe(self):
        c = self.config
        text = f"{c.seq_len} codes {c.latent_shape}, {c.attn_type} attention"
        if c.n_cond_frames:
            text += f", conditioned on {c.n_cond_frames} frame(s)"
        if c.n_classes:
            text += f", conditioned on {c.n_classes} classes"
        if c.action_dim:
            way = "norms" if c.action_norms else "tokens"
            text += f", conditioned on {c.action_dim}-d actions per frame ({way})"
        return text

    def checkpoint(self):
        vqvae = dict(config=self.vq.config.to_dict(), model=self.vq.state_dict())
        return dict(config=self.config.to_dict(), vqvae=vqvae, action_names=self.action_names)

    @torch.no_grad()
    def picture(self, model, batch, device, path):
        """Four real test clips (top row) and four samples (bottom row), each sample conditioned
        on the clip above it (model in eval mode)."""
        x = batch.get("video")
        n = min(4, len(next(iter(batch.values()))))
        real = x[:n].to(device) if x is not None else self.vq.decode(batch["codes"][:n].to(device))
        cond = self.conditioning({k: v[:n] for k, v in batch.items()}, real, device)
        codes = model.sample(n, **cond, generator=torch.Generator(device).manual_seed(0))
        samples = samples_to_uint8(self.vq.decode(codes), cond["frames"])   # (n, T, H, W, 3)
        clips = np.concatenate([to_uint8(real).numpy(), samples])           # (2n, T, H, W, 3)
        save_gif(grid_video(clips, ncol=n), f"{path}.gif", fps=4)


def make_stage(args, ckpt, ckpt_path, device, source=None):
    """The stage `args.stage` names; its config as `resolved_config` says."""
    if args.stage == "vqvae":
        return VQVAEStage(args, ckpt, ckpt_path, source)
    return GPTStage(args, ckpt, ckpt_path, device, source)


# -----------------------------------------------------------------------------
# The training loop


def accumulate_gradients(model, run, scaler, micro_batches):
    """Forward and backward over `micro_batches` batches, whose gradients add up to one optimizer
    step's; returns the loss and metrics, averaged over them.

    Each stage's loss is a mean over its micro-batch. Divided by N, the N gradients sum to the
    gradient of the mean over all N micro-batches, as one batch N times larger would give. The
    VQ-VAE's codebook takes one EMA step over them all, and DDP averages the gradients over the
    processes once, at the last backward.
    """
    seen = []
    with one_codebook_step(run.raw_model, micro_batches):
        for micro in range(micro_batches):
            with gradient_sync(model, last=micro == micro_batches - 1):
                # Forward under autocast; the stage says what the loss is.
                with run.autocast:
                    loss, metrics = run.stage.loss(model, next(run.batches), run.device)
                # Backward through the scaler, which scales the loss only under float16.
                scaler.scale(loss / micro_batches).backward()
            seen.append(metrics)
    metrics = {k: torch.stack([m[k].detach() for m in seen]).mean(0) for k in seen[0]}
    return metrics["loss"], metrics


def train(args):
    """Train one stage as `args` says, resuming from out_dir/ckpt.pt if it is there; returns the
    trained model."""
    run = Run(args, make_stage)   # the stage, its data and model, and out_dir's checkpoint if any
    # Adam, or Muon for the hidden weight matrices with Adam for the rest (muon.py).
    optimizer = make_optimizer(run.raw_model, run.optimizer_kind, args.lr)
    # The gradient scaler acts in float16 only, whose small gradients would otherwise underflow.
    scaler = torch.amp.GradScaler(run.device.type, enabled=args.dtype == "float16")
    # Resuming loads the weights, the optimizer, the scaler, the step and the random streams.
    state = run.start(optimizer, scaler)
    # Endless batches in an order fixed by (seed, step), so a resumed run reads what it would have
    # read. The run holds them, to shut their worker processes down on the way out.
    run.batches = iter(run.train_loader(state.step))
    model = run.wrap(run.raw_model)        # DDP and torch.compile, as asked
    run.describe()
    with StopRequest() as stop, run.failures_explained():
        while state.step < args.max_steps:
            lr = run.set_lr(get_lr(state.step, args))
            # Forward and backward over --grad_accum micro-batches, through the scaler.
            loss, metrics = accumulate_gradients(model, run, scaler, args.grad_accum)
            # Unscale the gradients so that clipping sees their true norm.
            scaler.unscale_(optimizer)
            clip = args.gradient_clip_val or math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            # A non-finite loss or gradient skips the step; a stop request ends the run after it.
            bad, overflow, stopping = step_flags(loss, grad_norm, scaler, stop, run.flag_device,
                                                 run.dist.ddp)
            if scaler.is_enabled() or not bad:
                # With float16 the scaler itself skips a step whose gradients overflowed.
                scaler.step(optimizer)
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
