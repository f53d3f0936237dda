"""A training run's set-up and chores: what train.py's loop calls by name.

train.py holds the algorithm: the flags, the two stages (what is trained and
its loss), the optimizer, the scaler, the batches and the loop. Everything else
a serious run needs lives here, behind the `Run` object the loop holds:

* set-up: out_dir checked and locked, resume from out_dir/ckpt.pt (weights,
  optimizer, scaler, step, curves, every rank's random streams; a line naming
  the flags that changed), data in an order fixed by (seed, step) on any number
  of processes and workers (`InfiniteSampler`), the prior's codes encoded once
  (`cached_codes`), DDP, SyncBatchNorm, torch.compile, the fast attention kernels,
  a fine-tune's source, and beyond the paper a decoder fine-tuned for texture
  (`TextureTune`: `DecoderOnly`, `texture_loss`);
* chores of the loop: one device read per step (`step_flags`), metric windows,
  log lines (log.jsonl, the progress bar, TensorBoard and W&B when asked for),
  evaluation, pictures and loss.png,
  atomic checkpoints (and --keep_last copies), non-finite steps skipped and a
  diverged run stopped, stop signals, lost peers and full disks turned into one
  line naming the last good checkpoint.

What guards against faults underneath (signals, collectives, atomic files)
is runtime.py and checkpoints.py.
"""

import contextlib
import io
import json
import math
import os
import secrets
import time
import warnings
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from checkpoints import (DiskFull, OutputLock, atomic_write, check_writable, checkpoint_kind,
                         current_prior_keys, expect_kind, keep_copy, load_checkpoint,
                         load_weights, original_prior, original_vqvae, remove_stale_temps,
                         save_checkpoint, stored_config, trim_log)
from data import make_dataset
from fast import use_fast_attention
from gpt import embedded_vqvae
from muon import optimizer_kind
from runtime import (RunError, all_mean, autocast, collective_failure, first_line,
                     ignore_stop_signals, init_distributed, lost_peer_error, rng_state,
                     seed_everything, set_rng_state)
from vqvae import VQVAE, VQVAEConfig, load_vqvae

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
            # pad so every rank gets per_rank
            perm = torch.cat([perm, perm[: per_rank * self.world - self.n]])
            for j in range(offset, per_rank):
                pos = j * self.world + self.rank
                yield int(perm[pos]), epoch_seed * (per_rank * self.world) + pos
            epoch, offset = epoch + 1, 0


# -----------------------------------------------------------------------------
# Resuming: which flags changed since the checkpoint's run

# Flags that decide which clips a step sees: changed on resume, the data order is no longer an
# uninterrupted run's.
DATA_ORDER_FLAGS = ("batch_size", "grad_accum", "seed", "data", "sample_every")
# Flags that only say where and how to report, never what is trained; and a fine-tune's source,
# which only its first start reads.
HARMLESS_FLAGS = ("out_dir", "num_workers", "log_interval", "eval_batches", "keep_last", "device",
                  "ddp_timeout", "init_from", "from_preset")


def changed_flags(saved, args, model_flags, saved_world, world):
    """One line naming every flag that differs from the checkpoint's run and what happens to it;
    None if none."""
    parts = []
    for k, v in sorted(vars(args).items()):
        old = saved.get(k, v)
        if k in HARMLESS_FLAGS or old == v or (isinstance(v, (list, tuple))
                                               and list(old or ()) == list(v)):
            continue
        fate = ("the checkpoint's value is kept" if k in model_flags else
                "the new value is used; the data order is no longer that of an uninterrupted run"
                if k in DATA_ORDER_FLAGS else "the new value is used")
        parts.append(f"--{k} {v} (was {old}: {fate})")
    if saved_world != world:
        parts.append(f"{world} process(es) (was {saved_world}: random streams and data order are "
                     "no longer those of an uninterrupted run)")
    return "resuming with changed flags: " + "; ".join(parts) if parts else None


# -----------------------------------------------------------------------------
# The prior's codes, encoded once (--cache_codes)


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
    """Codes (N, t, h, w) int16 and labels of every clip, each with its window fixed by its
    index."""
    loader = DataLoader(dataset, batch_size=batch_size,
                        sampler=[(i, i) for i in range(len(dataset))])
    codes, labels = [], []
    for batch in loader:
        codes.append(vq.encode(batch["video"].to(device)).to(torch.int16).cpu())
        if "label" in batch:
            labels.append(batch["label"])
    return torch.cat(codes), (torch.cat(labels) if labels else None)


def cached_codes(vq, args, train_set, test_set, device, master, ddp):
    """--cache_codes: every clip encoded once (window fixed per clip) to out_dir/codes.pt; datasets
    of codes."""
    codes_path = os.path.join(args.out_dir, "codes.pt")
    if master and not os.path.exists(codes_path):
        remove_stale_temps(codes_path)
        print(f"encoding {len(train_set)} + {len(test_set)} clips once to {codes_path}", flush=True)
        tr, te = (encode_all(vq, s, device, args.batch_size) for s in (train_set, test_set))
        save_checkpoint(dict(train=tr, test=te), codes_path)
    if ddp:
        dist.barrier()    # every rank reads the file rank 0 wrote
    try:
        cached = torch.load(codes_path, weights_only=True)
        return CodesDataset(*cached["train"]), CodesDataset(*cached["test"])
    # unreadable or not ours: say so; deleting it makes the next run re-encode
    except Exception as e:
        raise ValueError(f"{codes_path}: not a readable codes cache ({type(e).__name__}); delete "
                         "it to re-encode") from None


# -----------------------------------------------------------------------------
# The state of a run, and the metrics of a log window


# -----------------------------------------------------------------------------
# Fine-tuning: a new run that starts from another run's weights (--init_from)

# Model flags a fine-tune may change: how the model is regularised and when codes restart, not
# its shape. (The learning rate and its schedule are not model flags: they are always the run's.)
SAFE_TO_CHANGE = ("dropout", "attn_dropout", "dead_code_threshold")


def fine_tune_source(path, stage):
    """A checkpoint to fine-tune from, ours or the original release's, as our checkpoint's dict:
    stage, config, model (today's parameter names) and, for a prior, the VQ-VAE it was trained
    with ({config, model}) and its action names. For --stage vqvae, a prior of ours stands for
    the VQ-VAE it carries."""
    ckpt = load_checkpoint(path)
    if stage == "vqvae" and ckpt.get("stage") == "gpt" and isinstance(ckpt.get("vqvae"), dict):
        # A prior of ours carries the VQ-VAE it was trained with: fine-tune that one.
        return dict(stage=stage, **ckpt["vqvae"])
    expect_kind(ckpt, path, stage)
    if "stage" in ckpt:
        model = ckpt.get("model")
        if stage == "gpt":
            model = current_prior_keys(model)
        return dict(ckpt, model=model)
    if stage == "vqvae":
        config, model = original_vqvae(ckpt, path)
        return dict(stage=stage, config=config, model=model)
    vq_config, config, vq_model, model = original_prior(ckpt, path)
    model = dict(current_prior_keys(model), codebook=vq_model["codebook.embeddings"])
    return dict(stage=stage, config=config, model=model,
                vqvae=dict(config=vq_config, model=vq_model))


def fine_tune_config(cls, source, args):
    """The source checkpoint's config, with the flags that may safely change taken from the run;
    a model flag the user set to another value than the checkpoint's is a one-line error."""
    config = stored_config(cls, source, args.init_from)
    prior = cls.__name__ == "GPTConfig"
    # A prior's clip is its VQ-VAE's, and its frame count is checked below.
    not_flags = ("sequence_length", "resolution", "n_cond_frames") if prior else ()
    given = {k for k in vars(args) if k not in args.from_preset and getattr(args, k) is not None}
    for f in fields(config):
        if not f.init or f.name not in given or f.name in not_flags:
            continue
        flag, saved = getattr(args, f.name), getattr(config, f.name)
        if f.name in SAFE_TO_CHANGE:
            setattr(config, f.name, flag)
        elif as_list(flag) != as_list(saved):
            raise ValueError(f"{args.init_from}: --{f.name} {flag} differs from the checkpoint's "
                             f"{saved}; a fine-tune keeps the model's shape (leave the flag out)")
    if prior:
        if args.class_cond and not config.n_classes:
            raise ValueError(f"{args.init_from}: --class_cond, but the checkpoint's prior has no "
                             f"classes")
        if args.action_cond and (not config.action_dim
                                 or (args.action_cond == "norms") != config.action_norms):
            raise ValueError(f"{args.init_from}: --action_cond {args.action_cond}, but the "
                             f"checkpoint's prior is not conditioned on actions that way")
        if args.n_cond_frames not in (0, config.n_cond_frames):
            raise ValueError(f"{args.init_from}: --n_cond_frames {args.n_cond_frames} differs "
                             f"from the checkpoint's {config.n_cond_frames}")
    return type(config)(**config.to_dict())   # derived fields recomputed, checks run again


def as_list(value):
    """Flags and configs hold sequences as lists or tuples: compare them as lists."""
    return list(value) if isinstance(value, (list, tuple)) else value


def fine_tune_vqvae(source, args):
    """The VQ-VAE a prior was trained with, from the fine-tune's source; --vqvae, if given, must
    be the same one."""
    vq = embedded_vqvae(source, args.init_from)
    if args.vqvae is not None:
        same_weights(vq, load_vqvae(args.vqvae), args.vqvae, args.init_from)
    # A prior conditioned on frames or actions reads clips, not cached codes.
    config = source.get("config") or {}
    if config.get("n_cond_frames") or config.get("action_dim"):
        args.cache_codes = False
    return vq


def check_prior_flags(args, vq_config):
    """The prior's flags against its VQ-VAE's clips: one-line errors, and a warning for the clip
    flags it ignores."""
    for flag in ("sequence_length", "resolution"):
        value = getattr(vq_config, flag)
        if getattr(args, flag) not in (None, value):
            warnings.warn(f"--{flag} {getattr(args, flag)} ignored: the prior models clips of the "
                          f"VQ-VAE's {value}")
    if args.decoder_only or args.texture_weight:
        raise ValueError("--decoder_only and --texture_weight train a VQ-VAE's decoder (--stage "
                         "vqvae); the prior reads the codes it is given")
    if args.n_cond_frames >= vq_config.sequence_length:
        raise ValueError(f"--n_cond_frames {args.n_cond_frames} must be smaller than the clip's "
                         f"{vq_config.sequence_length} frames")
    if args.cache_codes and (args.n_cond_frames or args.action_cond):
        raise ValueError("--cache_codes keeps only codes, but --n_cond_frames and --action_cond "
                         "need the clips' frames and actions; use one or the other")


def check_prior_data(args, train_set, config=None):
    """The data must hold what the prior is conditioned on: what the flags ask for, or (a
    fine-tune's) what its source `config` is conditioned on."""
    data = args.data or "(moving digits)"
    has_actions = "actions" in getattr(train_set, "extras", ())
    if config is None:
        if args.class_cond and not train_set.n_classes:
            raise ValueError(f"--class_cond: the data {data} has no class labels")
        if args.action_cond and not has_actions:
            raise ValueError(f"--action_cond: the data {data} has no per-frame actions (an HDF5 "
                             f"file with train_actions, e.g. from python -m prepare bair)")
        return
    if config.n_classes and not train_set.n_classes:
        raise ValueError(f"{args.init_from}: its prior is class-conditional, but the data {data} "
                         f"has no class labels")
    if config.action_dim and not has_actions:
        raise ValueError(f"{args.init_from}: its prior is action-conditional, but the data {data} "
                         f"has no per-frame actions")


def same_weights(model, other, path, source):
    """Stop with one line unless `model` (the fine-tune's VQ-VAE) has the weights of `other`."""
    theirs = other.state_dict()
    for name, tensor in model.state_dict().items():
        if name not in theirs or not torch.equal(tensor.cpu(), theirs[name].cpu()):
            raise ValueError(f"{path}: is not the VQ-VAE that {source} was trained with "
                             f"({name} differs); leave --vqvae out to use that one")


# -----------------------------------------------------------------------------
# Beyond the paper: a decoder fine-tuned for texture (--decoder_only, --texture_weight)
#
# The paper's VQ-VAE loss is the mean squared error alone. Where a code cannot tell where a brick's
# edge or a blade of grass lies inside its patch, that error is least for their average, so the
# decoder paints a smooth wall, with less spread of colour than any real frame of one
# (docs/vizdoom.md has the numbers). The texture term asks each small patch of the reconstruction
# for the real patch's spread, wherever its details lie. Training the decoder alone keeps every
# clip's codes, so a prior trained on them still holds.


CODING = ("encoder", "pre_vq_conv", "codebook")   # a VQVAE's modules that decide the codes


class DecoderOnly(VQVAE):
    """A VQ-VAE that trains its decoder alone: the encoder, its projection and the codebook keep
    their weights (no gradients, no moving averages, no restarts), so every clip keeps its codes.
    Its state dict is a VQVAE's."""

    def __init__(self, config):
        super().__init__(config)
        self.coding().requires_grad_(False)
        self.train()   # the coding modules in eval mode from the start: their BatchNorm stays

    def coding(self):
        """The modules that decide the codes (CODING)."""
        return nn.ModuleList([getattr(self, name) for name in CODING])

    def train(self, mode=True):
        super().train(mode)
        self.coding().eval()   # in eval mode the codebook neither averages nor restarts
        return self


class TextureTune:
    """What train.py's VQ-VAE stage does beyond the paper, from its flags: the model it builds
    (`model`: DecoderOnly with --decoder_only) and the texture term it adds to the loss
    (`add_to`, with --texture_weight). One-line errors for flags that cannot work."""

    def __init__(self, args, source):
        if args.decoder_only and not source:
            raise ValueError("--decoder_only trains the decoder of a trained VQ-VAE: give "
                             "--init_from CKPT")
        if args.texture_weight < 0:
            raise ValueError(f"--texture_weight must be 0 or more, got {args.texture_weight}")
        self.weight, self.model = args.texture_weight, DecoderOnly if args.decoder_only else VQVAE

    def add_to(self, out, x):
        """The VQ-VAE's outputs on clips x, with the weighted term in the loss and logged."""
        if self.weight:
            out["texture_loss"] = texture_loss(out["recon"], x)
            out["loss"] = out["loss"] + self.weight * out["texture_loss"]
        return out


def patch_spread(video, size):
    """Each channel's standard deviation over each size x size patch of each frame:
    (B, C, T, H, W) -> (B, C, T, H // size, W // size); rows and columns past the last whole
    patch are left out."""
    B, C, T, H, W = video.shape
    h, w = H // size, W // size
    video = video[..., :h * size, :w * size]                              # (B, C, T, h*s, w*s)
    patches = video.reshape(B, C, T, h, size, w, size)                    # (B, C, T, h, s, w, s)
    return patches.float().std(dim=(4, 6))                                # (B, C, T, h, w)


def texture_loss(recon, x, size=4, data_variance=VQVAEConfig.data_variance):
    """The mean absolute difference of the patches' spreads (patch_spread), at full resolution
    and at half (2x2 pixels averaged, so that a one-pixel checkerboard cannot pay for a missing
    texture twice), in the units of the normalized MSE's square root."""
    loss = 0.0
    for scale in (1, 2):
        r, t = (F.avg_pool3d(v, (1, scale, scale)) for v in (recon, x))
        loss = loss + (patch_spread(r, size) - patch_spread(t, size)).abs().mean()
    return loss / 2 / data_variance ** 0.5


# -----------------------------------------------------------------------------
# Gradient accumulation: the micro-batches of one optimizer step


def clips_per_step(args):
    """The clips one optimizer step reads in each process: --grad_accum micro-batches of
    --batch_size."""
    return args.batch_size * args.grad_accum


def gradient_sync(model, last):
    """DDP averages the gradients over the processes at the backward of the last micro-batch
    only; the earlier ones add up locally (DDP.no_sync). Nothing to do in one process."""
    model = getattr(model, "_orig_mod", model)   # under --compile, the DDP module it wraps
    if isinstance(model, DDP) and not last:
        return model.no_sync()
    return contextlib.nullcontext()


@contextlib.contextmanager
def one_codebook_step(model, micro_batches):
    """The VQ-VAE's codebook takes one EMA step per optimizer step, over all its micro-batches.

    Each micro-batch quantizes with the codebook as it was at the start of the step, as one big
    batch would; their codes' counts and sums, and the encoder outputs that dead codes restart
    from, are gathered, and one update (all-reduced under DDP) runs when the step's last
    micro-batch is done. A batch of 8 and 4 micro-batches of 2 thus give the same codebook.
    """
    codebook = getattr(model, "codebook", None)
    if micro_batches == 1 or not hasattr(codebook, "ema_update"):
        yield
        return
    seen = []
    codebook.ema_update = lambda flat, idx, counts: seen.append((flat, idx, counts))
    try:
        yield
    finally:
        del codebook.ema_update   # back to the class's method
    if seen:
        flat, idx, counts = zip(*seen)
        codebook.ema_update(torch.cat(flat), torch.cat(idx), sum(counts))


@dataclass
class RunState:
    """Where a run is: what a checkpoint saves with the weights, and what resume restores."""
    step: int = 0                     # optimizer steps taken (skipped ones included)
    # loss curves, (step, value)
    history: dict = field(default_factory=lambda: {"train": [], "test": []})
    saved_step: int = None            # step of the newest checkpoint on disk (None: none yet)
    bad_run: int = 0                  # consecutive steps with a non-finite loss or gradient

    def state_dict(self, rng):
        """`rng`: every process's random streams (runtime.rng_state), gathered to rank 0."""
        return dict(step=self.step, history=self.history, rng=rng)

    def load_state_dict(self, ckpt, dist_info):
        """Restore the step, curves and this process's random streams from a checkpoint."""
        self.step = self.saved_step = ckpt["step"]
        self.history = ckpt.get("history", self.history)
        # Each rank continues its own random streams; on a different number of processes they start
        # afresh.
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
        """Mean of each metric over the window and the processes; the time since the window
        began."""
        # one read of the device
        sums = torch.stack(list(self.sums.values())).tolist() if self.sums else []
        means = {k: v / self.steps for k, v in zip(self.sums, sums)}
        return all_mean(means, ddp), time.time() - self.t0


def step_flags(loss, grad_norm, scaler, stop, flag_device, ddp):
    """(bad, overflow, stopping) of this step, agreed by every process: the loop's one read per
    step.

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


def last_logged_step(path):
    """The last step in log.jsonl (0 without one): how far a killed run's dashboards got, at
    least."""
    step = 0
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    step = max(step, json.loads(line)["step"])
    return step


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
# Dashboards: TensorBoard (--tensorboard) and Weights & Biases (--wandb PROJECT)
#
# Both optional, imported only when asked for, fed from the one place a log record goes (Run.log,
# which also writes log.jsonl) and from Run.pictures, on rank 0, at the log and evaluation intervals
# only: the numbers are the log line's, already on the host. Every number of a record is a scalar
# SPLIT/FIELD (train/loss, train/bits_per_code, train/lr, test/loss, ...) at the record's step; the
# PNG a VQ-VAE run draws is an image (test/recon), the GIF a prior's draws a video (test/samples:
# TensorBoard plays a GIF image summary, so no moviepy is needed). A resumed run continues the same
# curves with each step once: TensorBoard reopens with purge_step = the checkpoint's step + 1, so
# its readers drop what the killed run logged after the checkpoint (logged again now, with the same
# values: resume is exact); W&B resumes the run whose id OUT_DIR/wandb_run_id keeps, and the steps
# the killed run already sent (up to the last line of log.jsonl, which is written after the
# dashboards) are not sent again.


def missing(package, flag):
    return ValueError(f"{flag} needs the {package} package: pip install {package}")


def numeric_fields(record):
    """{SPLIT/FIELD: value} of a log record's numbers (not its step and split)."""
    return {f"{record['split']}/{k}": float(v) for k, v in record.items()
            if k not in ("step", "split") and isinstance(v, (int, float))
            and not isinstance(v, bool)}


class TensorBoard:
    """Event files in OUT_DIR/tb through torch.utils.tensorboard (which needs the tensorboard
    package)."""

    def __init__(self, out_dir, resumed_step):
        try:
            from torch.utils.tensorboard import SummaryWriter   # lazy: an optional dependency
        except ImportError:
            raise missing("tensorboard", "--tensorboard") from None
        # purge_step: events of steps >= it that a killed run wrote are dropped by TensorBoard's
        # readers.
        self.writer = SummaryWriter(os.path.join(out_dir, "tb"), purge_step=resumed_step + 1)

    def log(self, record):
        for name, value in numeric_fields(record).items():
            self.writer.add_scalar(name, value, record["step"])
        self.writer.flush()   # a killed run leaves on disk what log.jsonl has

    def picture(self, name, path, step):
        """A PNG as an image, a GIF as a video (an animated image summary, which TensorBoard
        plays)."""
        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary
        with open(path, "rb") as f:
            encoded = f.read()
        width, height = Image.open(io.BytesIO(encoded)).size
        image = Summary.Image(height=height, width=width, colorspace=3,
                              encoded_image_string=encoded)
        self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=name, image=image)]),
                                            step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandB:
    """A W&B run: scalars, images and videos at the run's steps, the resolved config, resumed by
    id."""

    def __init__(self, out_dir, project, name, config, logged_until=0):
        try:
            import wandb   # lazy: an optional dependency
        except ImportError:
            raise missing("wandb", "--wandb") from None
        self.wandb = wandb
        id_path = os.path.join(out_dir, "wandb_run_id")
        if os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        else:
            run_id = secrets.token_hex(4)          # W&B ids are letters and digits
            atomic_write(id_path, lambda f: f.write(run_id + "\n"), binary=False)
        self.run = wandb.init(project=project, name=name, id=run_id, resume="allow", dir=out_dir,
                              config=config)
        self.logged_until = logged_until   # steps a killed run already sent: not sent twice

    def log(self, record):
        if record["step"] > self.logged_until:
            self.run.log(numeric_fields(record), step=record["step"])

    def picture(self, name, path, step):
        if step <= self.logged_until:
            return
        if path.endswith(".gif"):
            media = self.wandb.Video(path, format="gif")
        else:
            media = self.wandb.Image(path)
        self.run.log({name: media}, step=step)

    def close(self):
        self.run.finish()


class Dashboards:
    """The dashboards a run's flags ask for (none, one or both), called as one."""

    def __init__(self, args, resumed_step, logged_until, config, master=True):
        self.boards = []
        if master and args.tensorboard:
            self.boards.append(TensorBoard(args.out_dir, resumed_step))
        if master and args.wandb:
            self.boards.append(WandB(args.out_dir, args.wandb, args.wandb_run, config,
                                     logged_until))

    def log(self, record):
        for board in self.boards:
            board.log(record)

    def picture(self, name, path, step):
        for board in self.boards:
            board.picture(name, path, step)

    def close(self):
        for board in self.boards:
            board.close()


# -----------------------------------------------------------------------------
# The run: its set-up, and the chores of the loop


class Run:
    """What a training run holds for train.train (the stage, its data and model, the checkpoint to
    resume), and its chores.

    train.train builds the optimizer and the scaler and hands them to `start`, which resumes
    them with the rest; it asks `train_loader` for the batches and `wrap` for the model it steps.
    The chores (logging, evaluating, checkpointing, stopping) are methods, so the loop in `train`
    is the algorithm and one named call per chore.
    """

    def __init__(self, args, make_stage):
        self.args, self.make_stage = args, make_stage
        self.dist = init_distributed(args.device, timeout=args.ddp_timeout)
        self.master, self.device = self.dist.master, self.dist.device
        self.ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
        self.log_path = os.path.join(args.out_dir, "log.jsonl")
        self.lock = OutputLock(os.path.join(args.out_dir, ".lock"),
                               "wait for that run to end or choose another --out_dir")
        if self.master:
            # Fail now, not at the first checkpoint, if out_dir cannot be written or another run
            # uses it (rank 0 holds the lock for the whole run); clear what a kill mid-save left.
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
        # A fine-tune's first start reads its source; a restart resumes its own checkpoint.
        source = None
        if args.init_from and not ckpt:
            source = fine_tune_source(args.init_from, args.stage)
        self.stage = self.make_stage(args, ckpt, self.ckpt_path, self.device, source)
        seq_len, resolution = self.stage.clip
        train_set, test_set = (make_dataset(args.data, seq_len, train=split, resolution=resolution,
                                            seed=args.seed, sample_every=args.sample_every)
                               for split in (True, False))
        # The same seed on every rank gives the same initial weights.
        torch.manual_seed(args.seed)
        self.raw_model = use_fast_attention(self.stage.build(args, train_set).to(self.device))
        if source is not None:
            load_weights(self.raw_model, source["model"], args.init_from, "the fine-tune's model")
        if args.stage == "gpt" and args.cache_codes:
            train_set, test_set = cached_codes(self.stage.vq, args, train_set, test_set,
                                               self.device, self.master,
                                               self.dist.ddp)
        self.n_clips = (len(train_set), len(test_set))
        self.train_set, self.test_set, self.ckpt = train_set, test_set, ckpt
        # train.train's endless batches: their workers are shut down on the way out
        self.batches = None
        # A resumed run keeps the optimizer whose state its checkpoint holds (resume says if asked
        # otherwise).
        self.optimizer_kind = optimizer_kind(ckpt["optimizer"]) if ckpt else args.optimizer

    def start(self, optimizer, scaler):
        """Resume what out_dir's checkpoint holds (weights, optimizer, scaler, step, random
        streams), or start at step 0; open the log and the dashboards. The run's state: its step and
        curves."""
        args, ckpt = self.args, self.ckpt
        self.optimizer, self.scaler = optimizer, scaler
        self.state = RunState()
        # torch, numpy and Python streams, different on every rank
        seed_everything(args.seed + self.dist.rank)
        if ckpt:
            self.resume(ckpt)
        self.ckpt = None   # its tensors are in the model and the optimizer now
        logged = last_logged_step(self.log_path) if self.master else 0
        if self.master:
            # Records past the checkpoint (or all of them, with none) come from a run that was
            # killed: it repeats them.
            dropped = trim_log(self.log_path, self.state.step)
            if dropped:
                print(f"{self.log_path}: dropped {dropped} record(s) after step {self.state.step}, "
                      f"where the checkpoint is", flush=True)
        # TensorBoard / W&B when asked for (rank 0), opened at the step the run resumes from.
        self.dashboards = Dashboards(args, self.state.step, logged,
                                     dict(vars(args), model=self.stage.config.to_dict()),
                                     self.master)
        self.test_loader = self.eval_loader(self.test_set)
        self.autocast = autocast(self.device, args.dtype)
        # Small all-reduced flags live where the backend wants them: GPU memory for NCCL, CPU for
        # gloo.
        self.flag_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        self.window = MetricWindow()
        return self.state

    # --- set-up ---

    def resumable_checkpoint(self):
        """out_dir/ckpt.pt when it exists (checked to be a checkpoint of this stage to resume from),
        else None."""
        if not os.path.exists(self.ckpt_path):
            return None
        ckpt = load_checkpoint(self.ckpt_path)
        kind = checkpoint_kind(ckpt)
        if kind != self.args.stage:
            raise ValueError(f"{self.ckpt_path}: is a '{kind}' checkpoint but --stage is "
                             f"'{self.args.stage}'; use another --out_dir")
        missing = {"model", "optimizer", "scaler", "step", "rng"} - set(ckpt)
        if missing:
            raise ValueError(f"{self.ckpt_path}: cannot resume from it: no "
                             f"{', '.join(sorted(missing))} (a weights-only checkpoint?); use "
                             "another --out_dir")
        return ckpt

    def resume(self, ckpt):
        """Weights, optimizer, scaler, step, curves and random streams from the checkpoint."""
        try:
            # A prior saved before today's parameter names loads under them (checkpoints.py).
            model = current_prior_keys(ckpt["model"]) if self.args.stage == "gpt" else ckpt["model"]
            self.raw_model.load_state_dict(model)
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scaler.load_state_dict(ckpt["scaler"])
            continued = self.state.load_state_dict(ckpt, self.dist)
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{self.ckpt_path}: cannot resume from it ({first_line(e)}); use "
                             "another --out_dir") from None
        if not continued:
            seed_everything(self.args.seed + self.dist.rank + STEP_SEED_STRIDE * self.state.step)
        # The model's own flags (its config, and what it is conditioned on) stay the checkpoint's,
        # and so does the optimizer whose state it holds (checkpoints from before --optimizer hold
        # Adam's).
        model_flags = {f.name for f in fields(self.stage.config)} | {"class_cond", "action_cond",
                                                                     "vqvae", "optimizer"}
        kind = optimizer_kind(ckpt["optimizer"])
        saved = dict(ckpt.get("train_args", {}), optimizer=kind)
        line = changed_flags(saved, self.args, model_flags, len(ckpt["rng"]), self.dist.world)
        if line and self.master:
            warnings.warn(f"{self.ckpt_path}: {line}")
        self.args.optimizer = kind   # what the next checkpoint records

    def train_loader(self, step):
        """Endless batches from `step` on, in an order fixed by (seed, step); workers ignore stop
        signals (the loop decides)."""
        args, train_set = self.args, self.train_set
        sampler = InfiniteSampler(len(train_set), args.seed, self.dist.rank, self.dist.world,
                                  start=step * clips_per_step(args))
        # Clips are decoded or drawn in worker processes; cached codes are slices of a tensor in
        # memory, which a worker would only pickle across (and on a 2-core CPU take a core from the
        # step: 15% slower).
        workers = args.num_workers
        if workers is None:
            half_the_cores = max(1, min(4, (os.cpu_count() or 2) // 2))
            workers = 0 if isinstance(train_set, CodesDataset) else half_the_cores
        return DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                          num_workers=workers, pin_memory=self.device.type == "cuda",
                          worker_init_fn=ignore_stop_signals,
                          # Its own generator: starting an iterator must not draw from the global
                          # RNG, or a resumed run's random draws would differ from an uninterrupted
                          # one's.
                          generator=torch.Generator().manual_seed(args.seed))

    def eval_loader(self, test_set):
        """The same clips and windows at every evaluation; every rank gets at least one (a tiny test
        set repeats)."""
        args, rank, world = self.args, self.dist.rank, self.dist.world
        # As many clips as eval_batches optimizer steps read, in batches of the micro-batch size.
        n_eval = max(world, min(len(test_set), args.eval_batches * clips_per_step(args) * world))
        items = [(i % len(test_set), i % len(test_set)) for i in range(rank, n_eval, world)]
        return DataLoader(test_set, batch_size=args.batch_size, sampler=items, num_workers=0)

    def wrap(self, model):
        """SyncBatchNorm, DDP and torch.compile around the model, as asked; the raw model stays what
        is saved. The evaluations use the wrapped model too."""
        if self.dist.ddp and self.args.sync_batchnorm:
            if self.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            elif self.master:
                warnings.warn("--sync_batchnorm needs CUDA (PyTorch's SyncBatchNorm is GPU-only); "
                              "ignored on CPU")
        if self.dist.ddp:
            model = DDP(model,
                        device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.model = torch.compile(model) if self.args.compile else model
        return self.model

    def describe(self):
        """Say what is trained, on what, where; and start the progress bar."""
        self.bar = tqdm(total=self.args.max_steps, initial=self.state.step, disable=not self.master,
                        dynamic_ncols=True, unit="step")
        if self.master:
            n_params = sum(p.numel() for p in self.raw_model.parameters())
            print(f"{self.args.stage}: {n_params / 1e6:.2f}M parameters, {self.stage.describe()}, "
                  f"{self.n_clips[0]} train / {self.n_clips[1]} test clips, {self.dist.world} "
                  f"process(es) on {self.device}, {self.args.dtype}, {self.batch_text()}"
                  + (f", resuming at step {self.state.step}" if self.state.step else ""),
                  flush=True)

    def batch_text(self):
        """The clips of one optimizer step: per process and micro-batch, times both."""
        a, world = self.args, self.dist.world
        if a.grad_accum == 1 and world == 1:
            return f"batch {a.batch_size}"
        return (f"batch {a.batch_size} x {a.grad_accum} micro-batch(es) x {world} process(es) = "
                f"{clips_per_step(a) * world} clips per step")

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
                tqdm.write(f"warning: step {self.state.step}: non-finite loss {loss:.4g} or "
                           f"gradient norm {grad_norm:.4g}; step skipped ({self.state.bad_run} in "
                           f"a row, the run stops at --max_bad_steps={self.args.max_bad_steps})")
        elif overflow:
            # float16 overflow: the scaler skipped the step, routine early in a run
            self.window.scaler_skipped += 1
        else:
            self.state.bad_run = 0
            self.window.add(metrics)

    def log_due(self):
        step = self.state.step
        return step % self.args.log_interval == 0 or step == self.args.max_steps

    def eval_due(self):
        # Never in the middle of a bad stretch: the last good checkpoint stays.
        step = self.state.step
        due = step % self.args.eval_interval == 0 or step == self.args.max_steps
        return due and self.state.bad_run == 0

    def log_train(self, lr):
        """One log line: the window's mean metrics, throughput, skipped steps; the loss curve."""
        w = self.window
        metrics, seconds = w.read(self.dist.ddp)
        taken = w.steps + w.skipped + w.scaler_skipped
        extra = dict(skipped=w.skipped)
        if self.scaler.is_enabled():
            extra |= dict(scaler_skipped=w.scaler_skipped, loss_scale=self.scaler.get_scale())
        clips_per_s = taken * clips_per_step(self.args) * self.dist.world / seconds
        self.window = MetricWindow()
        if self.master:
            if self.stage.curve in metrics:
                self.state.history["train"].append((self.state.step, metrics[self.stage.curve]))
            self.log(dict(step=self.state.step, split="train", lr=lr, clips_per_s=clips_per_s,
                          **metrics, **extra))
            shown = {k: f"{v:.4g}" for k, v in metrics.items()}
            self.bar.set_postfix(shown | {"clips/s": f"{clips_per_s:.1f}"})

    def log(self, record):
        """The one place a log record goes: log.jsonl, and the dashboards asked for."""
        if self.master:
            # first: a record in log.jsonl has reached them (see last_logged_step)
            self.dashboards.log(record)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def check_divergence(self):
        if self.state.bad_run >= self.args.max_bad_steps:
            raise RunError(f"{self.args.out_dir}: stopped at step {self.state.step} after "
                           f"{self.state.bad_run} consecutive steps with a non-finite loss or "
                           f"gradient; {self.last_good()}. Try a lower --lr, --gradient_clip_val "
                           "1, or --dtype bfloat16 / float32")

    @torch.no_grad()
    def evaluate(self):
        """Mean test metrics over the fixed test clips, averaged over processes; and the first
        batch."""
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
        """The stage's picture of this step and the loss plot. They are for looking at: one that
        cannot be written (a full disk) is a warning, not the end of the run."""
        # Eval mode: on rank 0 alone a training-mode forward would start codebook collectives.
        self.raw_model.eval()
        try:
            with self.autocast:
                path = os.path.join(self.args.out_dir,
                                    f"{self.stage.picture_name}_{self.state.step:07d}")
                self.stage.picture(self.raw_model, batch, self.device, path)
            for written in (path + ext for ext in (".png", ".gif") if os.path.exists(path + ext)):
                self.dashboards.picture(f"test/{self.stage.picture_name}", written, self.state.step)
            plot_losses(self.state.history, os.path.join(self.args.out_dir, "loss.png"),
                        self.stage.curve_label)
        except OSError as e:
            warnings.warn(f"{e.filename}: {e.strerror or e}; picture skipped, training goes on")
        finally:
            self.raw_model.train()

    def evaluate_and_checkpoint(self):
        """Test metrics, a picture and the loss plot (rank 0), then a checkpoint if the weights are
        worth one."""
        metrics, batch = self.evaluate()
        step, curve = self.state.step, self.stage.curve
        if self.master:
            self.state.history["test"].append((step, metrics[curve]))
            self.log(dict(step=step, split="test", **metrics))
            self.pictures(batch)
            print(f"step {step}: test " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
                  flush=True)
        # Weights that give a non-finite test loss are not worth keeping: the last good checkpoint
        # stays.
        if not math.isfinite(metrics[curve]):
            if self.master:
                tqdm.write(f"warning: step {step}: test {curve} is {metrics[curve]}; checkpoint "
                           "not written")
            return
        self.checkpoint()

    def checkpoint(self):
        """Everything needed to continue exactly: weights, optimizer, scaler, step, every rank's
        RNG, curves."""
        rng = [rng_state(self.device)]
        if self.dist.ddp:
            mine, rng = rng[0], [None] * self.dist.world
            dist.all_gather_object(rng, mine)
        if self.master:
            self.save(dict(stage=self.args.stage, model=self.raw_model.state_dict(),
                           optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
                           train_args=vars(self.args), **self.state.state_dict(rng),
                           **self.stage.checkpoint()))
        self.state.saved_step = self.state.step

    def save(self, ckpt):
        """Write ckpt.pt (and the --keep_last copy); a full disk ends the run with one line, the
        previous checkpoint intact (the write went to a temp file, now removed)."""
        try:
            save_checkpoint(ckpt, self.ckpt_path)
            if self.args.keep_last > 0:
                keep_copy(self.ckpt_path, self.state.step, self.args.keep_last)
        except DiskFull as e:
            raise RunError(f"{e.filename}: {e.strerror} (step {self.state.step}); "
                           f"{self.last_good()}") from None

    def last_good(self):
        saved = self.state.saved_step
        return f"{self.ckpt_path} (step {saved}) is the last good checkpoint" if saved is not None \
            else "no checkpoint was written"

    def stop(self, stop):
        """A stop was asked for (Ctrl-C, SIGTERM): checkpoint this step unless it is saved or bad,
        then exit."""
        if self.state.saved_step != self.state.step and self.state.bad_run == 0:
            self.checkpoint()
        if self.master:
            tqdm.write(f"stopped at step {self.state.step}; {self.last_good()}; run the same "
                       "command to resume")
        raise SystemExit(stop.exit_status)

    @contextlib.contextmanager
    def failures_explained(self):
        """Around the loop: a lost peer becomes one line naming the last good checkpoint; on the way
        out, the progress bar closes and the DataLoader workers are shut down (they ignore SIGTERM,
        so exit cannot)."""
        try:
            yield
        except KeyboardInterrupt:
            if self.master:
                tqdm.write(f"interrupted at step {self.state.step} without saving; "
                           f"{self.last_good()}")
            raise
        except RuntimeError as e:
            if not (self.dist.ddp and collective_failure(e)):
                raise
            raise lost_peer_error(e, self.dist.rank, self.state.step, self.args.ddp_timeout,
                                  self.last_good()) from None
        finally:
            self.bar.close()
            self.batches = None
            self.dashboards.close()
            self.lock.release()


