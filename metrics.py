"""The other metrics, beside FVD: the paper's UCF-101 Inception Score, and digit legibility for the
moving digits.

* The Inception Score of TGANv2's C3D (the paper's UCF-101 number), from the
  release's two npz files, without Chainer:
      python fvd.py is --ckpt PRIOR.pt | --videos FILE.npy|DIR | --data DATA
          --c3d conv3d_deepnetA_ucf.npz --mean mean2.npz
      c3d = load_c3d("conv3d_deepnetA_ucf.npz", "mean2.npz")
      # (B, T >= 16, H, W, 3) uint8 -> (B, 101)
      probs = c3d_logits(c3d, videos_uint8).softmax(-1)
      mean, std = inception_score(probs.numpy(), splits=1)
* Digit legibility: a small classifier reads which digits a moving-digits frame
  shows, so the Quick start's samples get a number a person agrees with:
      python fvd.py digits --ckpt runs/gpt/ckpt.pt [--n 256]
* Steering (ViZDoom): whether the view turns the way an action-conditional
  prior was told, read from how far the picture slides sideways between frames:
      python fvd.py steer --ckpt runs/doom_gpt/ckpt.pt --data vizdoom.h5 [--n 256
          --picture steer.png]
* Long play (ViZDoom): a session of hundreds of frames through the play loop,
  played by a player who ends each walk before a wall: does it keep turning as
  told, and stay a world (colours, sky and floor)? --game plays the real game
  the same way, the bar:
      python fvd.py dream --ckpt weights/vizdoom.pt --data vizdoom.h5 [--frames 1000
          --game --plot drift.png]

And what every score shares (fvd.py uses it too): a seed per trial, clips
gathered in order under torchrun, and a JSON record of the settings and the
files' hashes written beside the score.
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from checkpoints import atomic_write, checkpoint_kind, load_checkpoint, load_weights, sha256
from data import (HDF5Dataset, find_videos, make_dataset, preprocess, read_frames,
                  samples_to_uint8, to_uint8)
from fast import AUTO_COMPILE_STEPS, compile_pays_off, generate, use_fast_attention
from gpt import load_gpt
from data import digit_glyphs, moving_digits_video
from runtime import cache_dir, default_device, init_distributed, run_cli
from vqvae import load_vqvae
from world import load_world, named_actions, start_world

# -----------------------------------------------------------------------------
# What every score shares: trial seeds, gathering, records, flags

# Trial t draws its clips' windows and its samples from seeds t * TRIAL_SEED_STRIDE + i: a prime
# larger than any number of clips, so no two (trial, clip) pairs share a seed.
TRIAL_SEED_STRIDE = 1_000_003


def trial_seed(seed, trial):
    """The seed of trial `trial` of a command run with --seed `seed`; seed 0 gives trial t seed
    t."""
    return seed * TRIAL_SEED_STRIDE + trial

def gather_in_order(x, ddp):
    """Every process's rows of x (features or probabilities of clips), where process r holds clips
    r, r + world, ...; concatenated in clip order on every rank, as one process would have them."""
    if not ddp:
        return x
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, x.cpu())
    out = torch.empty(sum(len(p) for p in parts), *x.shape[1:], dtype=x.dtype)
    for r, p in enumerate(parts):
        out[r::len(parts)] = p
    return out



def provenance(**paths):
    """What a score was computed from: each named file's absolute path and SHA-256 (None for a
    folder or nothing), the torch version and the date (UTC). Written next to every score by
    --out."""
    record = {}
    for name, path in paths.items():
        record[name] = None if path is None else os.path.abspath(path)
        exists = path is not None and os.path.isfile(path)
        record[f"{name}_sha256"] = sha256(path) if exists else None
    record.update(torch=torch.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    return record


def write_record(path, record):
    """A score and its settings to `path` as JSON, atomically (a file is complete or absent)."""
    atomic_write(path, lambda f: json.dump(record, f, indent=1), binary=False)
    print(path, flush=True)


def add_device_flags(p):
    """--batch_size and --device, which every scoring command takes."""
    p.add_argument("--batch_size", type=int, default=16, help="clips per batch")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")


def compile_sampling(args, gpt, n_per_process):
    """--compile / --no-compile, or by default whether this process draws enough codes over all
    trials for compiling the decoding step to pay off (fast.compile_pays_off)."""
    if args.compile is not None:
        return args.compile
    batches = math.ceil(n_per_process / args.batch_size) * args.trials
    return compile_pays_off(batches * gpt.config.seq_len)


def add_compile_flag(p):
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the prior's decoding step (default: when the samples need "
                        f"at least {AUTO_COMPILE_STEPS} codes drawn one after the other)")


def add_sampling_flags(p):
    """--temperature and --top_k of the scores that draw samples."""
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top_k", type=int, default=None, help="sample among the k most likely codes")


def add_record_flags(p, seeds):
    """--seed and --out, which every scoring command takes; `seeds` says what the seed draws."""
    p.add_argument("--seed", type=int, default=0, help=f"seeds {seeds}")
    p.add_argument("--out", default=None,
                   help="also write the scores and their settings to this JSON file")


# -----------------------------------------------------------------------------
# The UCF-101 Inception Score: TGANv2's C3D, read from its release files
#
# The paper reports UCF-101 as an Inception Score, IS = exp(E_x KL(p(y|x) || p(y))),
# with p(y|x) from TGANv2's C3D, a 3D-convolutional classifier of the 101 classes.
# TGANv2 publishes its weights as two Chainer npz archives, which are plain numpy
# archives: conv3d_deepnetA_ucf.npz ("conv1a/W" (64, 3, 3, 3, 3), "conv1a/b", ...,
# "fc8/W" (101, 4096)) and mean2.npz ("mean" (3, 16, 128, 171), BGR). Chainer's
# Convolution3D and Linear store their weights in PyTorch's layout, so they load as is.

C3D_CONVS = ("conv1a", "conv2a", "conv3a", "conv3b", "conv4a", "conv4b", "conv5a", "conv5b")
C3D_FCS = ("fc6", "fc7", "fc8")
# max pool after these
C3D_POOLS = {"conv1a": (1, 2, 2), "conv2a": 2, "conv3b": 2, "conv4b": 2, "conv5b": 2}
C3D_FRAMES, C3D_SIDE = 16, 112


class C3D(nn.Module):
    """TGANv2's C3DVersion1UCF101 for evaluation: (B, 3, 16, 112, 112) preprocessed clips -> (B,
    101) logits.

    Eight 3x3x3 convolutions (padding 1, ReLU), max pools after conv1a (1x2x2)
    and after conv2a, conv3b, conv4b, conv5b (2x2x2, in ceil mode as Chainer's
    cover_all: 7 -> 4, so fc6 sees C x 1 x 4 x 4), then fc6, fc7 (ReLU; their
    dropout is off at evaluation) and fc8. Widths come from the weights.
    """

    def __init__(self, conv_widths, fc_widths, mean):
        super().__init__()
        self.convs = nn.ModuleDict({name: nn.Conv3d(c_in, c_out, 3, padding=1)
                                    for name, (c_in, c_out) in zip(C3D_CONVS, conv_widths)})
        self.fcs = nn.ModuleDict({name: nn.Linear(f_in, f_out) for name,
                                  (f_in, f_out) in zip(C3D_FCS, fc_widths)})
        # TGANv2 subtracts the crop [8:120, 8:120] of its 128x171 mean clip from the 112x112 frames.
        # (3, 16, 112, 112)
        self.register_buffer("mean", torch.as_tensor(mean[:, :, 8:120, 8:120], dtype=torch.float32))

    def forward(self, x):
        for name in C3D_CONVS:
            x = F.relu(self.convs[name](x))
            if name in C3D_POOLS:
                x = F.max_pool3d(x, C3D_POOLS[name], C3D_POOLS[name], ceil_mode=True)
        x = x.flatten(1)  # (B, C * 1 * 4 * 4), Chainer's order
        x = F.relu(self.fcs["fc6"](x))
        x = F.relu(self.fcs["fc7"](x))
        return self.fcs["fc8"](x)                                 # (B, 101)


C3D_RELEASE = ("the C3D Inception Score reads conv3d_deepnetA_ucf.npz (--c3d) and mean2.npz "
               "(--mean), published with TGANv2's GitHub release v1.0: "
               "https://github.com/pfnet-research/tgan2/releases/tag/v1.0")


def load_c3d(weights, mean, device=None):
    """TGANv2's C3D from its release files (or narrower ones in the same layout), in eval mode.
    Any problem with either file is one line: the file, what is wrong, and where the files come
    from."""
    try:
        return read_c3d_files(weights, mean).to(default_device(device)).eval()
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"{e}; {C3D_RELEASE}") from None


def c3d_paths(weights=None, mean=None):
    """The two release files: as given, else conv3d_deepnetA_ucf.npz and mean2.npz in the folder
    that the environment variable VIDEOGPT_C3D names."""
    folder = os.environ.get("VIDEOGPT_C3D")
    if (weights is None or mean is None) and not folder:
        raise ValueError("no C3D weights given: pass --c3d and --mean, or set VIDEOGPT_C3D to "
                         f"their folder; {C3D_RELEASE}")
    return (weights or os.path.join(folder, "conv3d_deepnetA_ucf.npz"),
            mean or os.path.join(folder, "mean2.npz"))


def read_c3d_files(weights, mean):
    """The C3D of `load_c3d`, on the CPU; every layer's shape checked against the one before."""
    arrays = {}
    for path, keys in ((weights, [f"{n}/{p}" for n in C3D_CONVS + C3D_FCS for p in ("W", "b")]),
                       (mean, ["mean"])):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        try:
            with np.load(path) as f:  # allow_pickle is off by default: arrays only
                found = {k: f[k] for k in keys if k in f.files}
        # not an npz, or one holding pickles
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: not a readable npz archive ({type(e).__name__})") from None
        missing = [k for k in keys if k not in found]
        if missing:
            raise ValueError(f"{path}: not a TGANv2 C3D file: no {', '.join(missing[:3])}")
        arrays.update(found)
    # Each layer must take what the one before gives: 3 colours in, 1 x 4 x 4 positions per channel
    # into fc6.
    width = 3
    for n in C3D_CONVS + C3D_FCS:
        w, b = arrays[f"{n}/W"].shape, arrays[f"{n}/b"].shape
        expected = (width, 3, 3, 3) if n in C3D_CONVS else (width * (16 if n == "fc6" else 1),)
        if tuple(w[1:]) != expected or b != (w[0],):
            raise ValueError(f"{weights}: '{n}/W' is {w} with bias {b}, expected (out, "
                             f"{', '.join(map(str, expected))}) with bias (out,)")
        width = w[0]
    convs = [arrays[f"{n}/W"].shape for n in C3D_CONVS]
    fcs = [arrays[f"{n}/W"].shape for n in C3D_FCS]
    mean_shape = arrays["mean"].shape
    if len(mean_shape) != 4 or mean_shape[:2] != (3, C3D_FRAMES) or min(mean_shape[2:]) < 120:
        raise ValueError(f"{mean}: 'mean' must be (3, 16, >=120, >=120), got {mean_shape}")
    c3d = C3D([(w[1], w[0]) for w in convs], [(w[1], w[0]) for w in fcs], arrays["mean"])
    state = {}
    for n in C3D_CONVS + C3D_FCS:
        group = "convs" if n in C3D_CONVS else "fcs"
        for p, kind in (("W", "weight"), ("b", "bias")):
            array = np.ascontiguousarray(arrays[f"{n}/{p}"], np.float32)
            state[f"{group}.{n}.{kind}"] = torch.from_numpy(array)
    state["mean"] = c3d.mean
    load_weights(c3d, state, weights, "TGANv2's C3D layout")
    return c3d


def c3d_input(videos, mean):
    """uint8 clips (B, T >= 16, H, W, 3) -> (B, 3, 16, 112, 112) as TGANv2 feeds its C3D: the first
    16 frames, u / 127.5 - 1, channels reversed to BGR and times 128, every frame resized to 112x112
    (bilinear, align_corners=True as Chainer's resize_images), then + 128 - mean."""
    # (B, 16, H, W, 3)
    x = torch.as_tensor(np.asarray(videos[:, :C3D_FRAMES])).to(mean.device).float() / 127.5 - 1
    x = x.flip(-1) * 128                                                      # BGR, in [-128, 128]
    B, T, H, W, _ = x.shape
    x = x.permute(0, 1, 4, 2, 3).reshape(B * T, 3, H, W)                      # (B*16, 3, H, W)
    x = F.interpolate(x, size=(C3D_SIDE, C3D_SIDE), mode="bilinear", align_corners=True)
    x = x.view(B, T, 3, C3D_SIDE, C3D_SIDE).permute(0, 2, 1, 3, 4)           # (B, 3, 16, 112, 112)
    return x + 128 - mean


@torch.no_grad()
def c3d_logits(c3d, videos, batch_size=16):
    """uint8 clips (B, T >= 16, H, W, 3) -> C3D logits (B, 101), float64 on the CPU."""
    if videos.shape[1] < C3D_FRAMES:
        raise ValueError(f"the C3D Inception Score needs clips of at least {C3D_FRAMES} frames, "
                         f"got {videos.shape[1]}")
    return torch.cat([c3d(c3d_input(videos[i:i + batch_size], c3d.mean)).double().cpu()
                      for i in range(0, len(videos), batch_size)])


def inception_score(probs, splits=1):
    """(mean, std) over `splits` equal parts of exp(mean over clips of KL(p || mean p)); 1e-20 keeps
    the logarithms of zero probabilities finite, as in TGANv2. probs: (N, classes)."""
    p = np.asarray(probs, np.float64)
    n = len(p)
    scores = []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]  # TGANv2's split boundaries
        marginal = part.mean(0, keepdims=True)           # (1, classes)
        kl = (part * (np.log(part + 1e-20) - np.log(marginal + 1e-20))).sum(1).mean()
        scores.append(math.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def first_16_frames(videos, where, say=True):
    """The clips' first 16 frames (saying so when they are longer); shorter clips are an error."""
    if videos.shape[1] < C3D_FRAMES:
        raise ValueError(f"{where}: clips of {videos.shape[1]} frames; the C3D Inception Score "
                         f"needs {C3D_FRAMES}")
    if videos.shape[1] > C3D_FRAMES and say:
        print(f"{where}: clips of {videos.shape[1]} frames; scoring their first {C3D_FRAMES}",
              flush=True)
    return videos[:, :C3D_FRAMES]


def clips_to_score(args, trial, device, indices):
    """uint8 clips (len(indices), T, H, W, 3) of one trial, clips `indices` of its N: sampled from
    --ckpt, read from --videos, or real --data clips. Under torchrun each process passes its own
    share."""
    if args.videos is not None:
        return read_video_set(args.videos, args.n, C3D_FRAMES, indices, cut=False)
    key = trial_seed(args.seed, trial)
    if args.data is not None:
        # Clip i is test clip order[i] with its window seeded by (seed, trial, i): the same on any
        # number of processes.
        data = make_dataset(args.data, C3D_FRAMES, train=False, resolution=args.resolution)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(key))
        items = [data[(int(order[i % len(data)]), key * TRIAL_SEED_STRIDE + i)] for i in indices]
        return np.stack([to_uint8(it["video"]).numpy() for it in items])         # (n, 16, R, R, 3)
    gpt, vq = (use_fast_attention(m) for m in load_gpt(args.ckpt, device=device))
    labels = None
    # drawn for all N, so clip i has the same label on any number of processes
    if gpt.config.n_classes:
        labels = torch.randint(gpt.config.n_classes, (args.n,),
                               generator=torch.Generator().manual_seed(key))
        labels = labels[torch.tensor(indices, dtype=torch.long)].to(device)
        if trial == 0 and indices[:1] == [0]:
            print(f"{args.ckpt}: class-conditional prior: labels drawn uniformly from its "
                  f"{gpt.config.n_classes} classes", flush=True)
    clips = []
    compile = compile_sampling(args, gpt, len(indices))
    with torch.no_grad():
        for start in tqdm(range(0, len(indices), args.batch_size), desc=f"trial {trial}: sampling",
                          leave=False):
            sl = slice(start, min(len(indices), start + args.batch_size))
            seed = key * TRIAL_SEED_STRIDE + indices[start]
            generator = torch.Generator(device).manual_seed(seed)
            codes = generate(gpt, sl.stop - sl.start, None if labels is None else labels[sl],
                             generator=generator, compile=compile)
            clips.append(samples_to_uint8(vq.decode(codes), mark=False))
    return np.concatenate(clips)                                                  # (n, T, H, W, 3)


def inception_score_command(args):
    """`fvd.py is`: the C3D Inception Score of sampled, given or real clips; optionally written to
    --out. Under torchrun each process scores its share of the clips and rank 0 reports."""
    d = init_distributed(args.device)
    ddp, rank, world, device = d.ddp, d.rank, d.world, d.device
    try:
        args.c3d, args.mean = c3d_paths(args.c3d, args.mean)
        if args.n < world:
            raise ValueError(f"--n {args.n}: fewer clips than the {world} processes sharing them")
        c3d = load_c3d(args.c3d, args.mean, device=device)
        source = args.ckpt or args.videos or args.data
        # given clips are the same in every trial
        trials = 1 if args.videos is not None else args.trials
        per_trial = []
        for trial in range(trials):
            videos = clips_to_score(args, trial, device, list(range(rank, args.n, world)))
            videos = first_16_frames(videos, source, say=rank == 0)
            probs = c3d_logits(c3d, videos, args.batch_size).softmax(-1)         # (n, 101)
            probs = gather_in_order(probs, ddp).numpy()                          # (N, 101)
            per_trial.append(inception_score(probs, args.splits))
        # Over trials (the published setting: 10 trials of one split) or, for one trial, over its
        # splits.
        mean, std = ((float(np.mean([m for m, _ in per_trial])),
                      float(np.std([m for m, _ in per_trial])))
                     if trials > 1 else per_trial[0])
        if rank == 0:
            print(f"IS {mean:.4f} ± {std:.4f}  (N={len(probs)}, {C3D_FRAMES} frames, {trials} "
                  f"trial(s), {args.splits} split(s), seed {args.seed}, "
                  f"{os.path.basename(source.rstrip('/'))})", flush=True)
            if args.out:
                write_record(args.out, dict(
                    metric="inception_score", protocol="TGANv2 C3D (conv3d_deepnetA_ucf)",
                    n=len(probs), trials=trials, splits=args.splits, frames=C3D_FRAMES,
                    resolution=args.resolution, seed=args.seed, processes=world,
                    **provenance(source=source, c3d=args.c3d, c3d_mean=args.mean),
                    mean=mean, std=std, per_trial=[m for m, _ in per_trial]))
        return mean, std
    finally:
        if ddp:
            dist.destroy_process_group()


def is_main(argv):
    """`python fvd.py is ...`: the command line of the C3D Inception Score."""
    p = argparse.ArgumentParser(prog="fvd.py is",
                                description="The C3D Inception Score of TGANv2 (UCF-101).")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a prior checkpoint: score N samples of it")
    source.add_argument("--videos",
                        help="clips made elsewhere: a uint8 (N, T, H, W, 3) .npy, or a folder of "
                             "videos")
    source.add_argument("--data",
                        help="a dataset whose real test clips are scored (the reference point)")
    p.add_argument("--c3d", default=None,
                   help="conv3d_deepnetA_ucf.npz from TGANv2's release (default: in the folder "
                        "$VIDEOGPT_C3D)")
    p.add_argument("--mean", default=None,
                   help="mean2.npz from TGANv2's release (default: in the folder $VIDEOGPT_C3D)")
    p.add_argument("--n", "--num_videos", dest="n", type=int, default=2048,
                   help="clips per trial (the published setting: 2048; under torchrun write "
                        "--num_videos)")
    p.add_argument("--trials", type=int, default=10, help="trials with fresh clips (published: 10)")
    p.add_argument("--splits", type=int, default=1, help="splits per trial (published: 1)")
    p.add_argument("--resolution", type=int, default=128,
                   help="--data: frame size the clips are read at")
    add_record_flags(p, "the clips drawn and the samples")
    add_compile_flag(p)
    add_device_flags(p)
    args = p.parse_args(argv)
    return run_cli("fvd.py", lambda: inception_score_command(args))


# -----------------------------------------------------------------------------
# Digit legibility: a score for the moving-digits set, as FVD is for real video

# The reader learns from fonts matplotlib ships, never from the dataset's own (DejaVu Sans Bold),
# so a high score means digits a stranger can read, not pixels memorised from the training set.
READER_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSansMono.ttf",
                "DejaVuSansMono-Bold.ttf",
                "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf",
                "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmtt10.ttf")
READER_SIZE = 32  # frames are read at 32x32 (the dataset's glyphs are 24/64 of the frame)
MAX_COUNT = 3     # counts 0..3 of each digit (the dataset's frames hold two digits, maybe equal)
CONFIDENT = 0.9   # a frame is read when every digit's count has at least this probability
READER_LR = 2e-3  # peak learning rate of its training, cosine to zero
# training steps of the cached reader (about a minute and a half on a 2-core CPU)
READER_STEPS = 2000


class DigitReader(nn.Module):
    """How many times each digit 0-9 appears in a frame: (B, 1, 32, 32) -> logits (B, 10, 4) over
    0..3.

    Counts rather than a set, so that a frame showing the same digit twice is read
    as such; a small VGG-style network, flattened (not pooled) so position and
    overlap survive.
    """

    def __init__(self):
        super().__init__()
        conv = lambda c_in, c_out: [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(c_out), nn.ReLU()]
        self.features = nn.Sequential(*conv(1, 16), *conv(16, 16), nn.MaxPool2d(2),
                                      *conv(16, 32), *conv(32, 32), nn.MaxPool2d(2), *conv(32, 64))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 8 * 8, 192), nn.ReLU(),
                                  nn.Linear(192, 10 * (MAX_COUNT + 1)))

    def forward(self, x):
        return self.head(self.features(x)).view(-1, 10, MAX_COUNT + 1)      # (B, 10, 4)


def reader_input(frames):
    """uint8 frames (N, H, W, 3) -> (N, 1, 32, 32) ink in [0, 1]: the brightest channel, resized.

    The digits are saturated colours on black, so the brightest channel is their
    shape whatever the colour.
    """
    x = torch.as_tensor(np.asarray(frames)).float().amax(-1)[:, None] / 255     # (N, 1, H, W)
    if x.shape[-2:] != (READER_SIZE, READER_SIZE):
        x = F.interpolate(x, size=(READER_SIZE, READER_SIZE), mode="bilinear", align_corners=False,
                          antialias=True)
    return x                                                                 # (N, 1, 32, 32)


def reader_batch(rng, n):
    """n training frames and their digit counts (n, 10).

    Most are drawn like the dataset's frames (two coloured digits anywhere, overlapping
    at times) in the reader's fonts and sizes; some hold one, three or no digit, and
    some are noise or smooth blobs with no digit at all, so that "two digits" is
    something the reader must see, not assume. Lightly blurred, dimmed and noised:
    decoded videos are softer than rendered ones.
    """
    frames, counts = [], np.zeros((n, 10), np.int64)
    for i in range(n):
        kind = rng.uniform()
        if kind < 0.08:        # noise: fine-grained or smooth blobs, no digit
            side = int(rng.choice([4, 8, 16, 32]))
            blob = rng.uniform(0, 1, (side, side, 3)) ** 2
            k = READER_SIZE // side
            frames.append((255 * blob.repeat(k, 0).repeat(k, 1)).astype(np.uint8))
            continue
        n_digits = 2 if kind < 0.78 else int(rng.choice([0, 1, 1, 3]))
        size = int(rng.integers(11, 17))  # the dataset's 12 px, and larger
        glyphs = digit_glyphs(size, READER_FONTS[rng.integers(len(READER_FONTS))])
        digits = []
        frames.append(moving_digits_video(rng, frames=1, resolution=READER_SIZE, n_digits=n_digits,
                                          glyphs=glyphs,
                                          # anywhere, to the pixel
                                          digits=digits, grid=1, apart=False)[0])
        np.add.at(counts[i], digits, 1)
    x = reader_input(np.stack(frames))                                    # (n, 1, 32, 32)
    blur = torch.from_numpy(rng.uniform(0, 1, (n, 1, 1, 1)) < 0.5).float()
    x = blur * F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False) + (1 - blur) * x
    x = x * torch.from_numpy(rng.uniform(0.6, 1.0, (n, 1, 1, 1))).float()
    x = x + torch.from_numpy(rng.normal(0, 1, x.shape) * rng.uniform(0, 0.08, (n, 1, 1, 1))).float()
    return x.clamp(0, 1), torch.from_numpy(counts.clip(max=MAX_COUNT))


def train_digit_reader(steps=READER_STEPS, batch_size=64, seed=0, progress=True):
    """A DigitReader trained on frames of the reader's fonts; deterministic for a seed; eval
    mode."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    reader = DigitReader()
    opt = torch.optim.Adam(reader.parameters(), lr=READER_LR)
    for step in tqdm(range(steps), desc="training the digit reader", disable=not progress,
                     leave=False):
        for group in opt.param_groups:
            group["lr"] = READER_LR * 0.5 * (1 + math.cos(math.pi * step / steps))  # cosine to zero
        x, counts = reader_batch(rng, batch_size)
        loss = F.cross_entropy(reader(x).flatten(0, 1), counts.flatten())   # (B*10, 4) vs (B*10,)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return reader.eval()


# The reader ships with the project (weights/digit_reader.pt, made by `python weights/make.py
# --reader`: train_digit_reader's 2,000 steps at seed 0, in half precision). Without that file it is
# trained on first use, about 90 s, and kept in the cache folder.
SHIPPED_READER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights",
                              "digit_reader.pt")


def reader_cache_path():
    """Where the reader trained on first use is kept (VIDEOGPT_CACHE or ~/.cache/videogpt)."""
    return os.path.join(cache_dir(), f"digit_reader_v3_{READER_STEPS}.pt")


def default_reader_path():
    """The reader `fvd.py digits` reads with when --reader is left out: the shipped one, else the
    cached one."""
    return SHIPPED_READER if os.path.isfile(SHIPPED_READER) else reader_cache_path()


def load_digit_reader(path=None):
    """The reader from `path` (a state dict), else the shipped one, else the one trained once and
    cached (VIDEOGPT_CACHE or ~/.cache/videogpt)."""
    if path is not None:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # any failure to read means: not a usable weights file
            raise ValueError(f"{path}: not a readable digit reader state dict "
                             f"({type(e).__name__})") from None
        return load_weights(DigitReader(), sd, path, "the digit reader").eval()
    for path in (SHIPPED_READER, reader_cache_path()):
        if os.path.isfile(path):
            try:
                return load_digit_reader(path)
            except ValueError:   # a damaged file: the next, or train again
                pass
    reader = train_digit_reader()
    os.makedirs(cache_dir(), exist_ok=True)
    atomic_write(reader_cache_path(), lambda f: torch.save(reader.state_dict(), f))
    return reader


@torch.no_grad()
def read_digits(reader, videos):
    """uint8 clips (N, T, H, W, 3) -> (counts (N, T, 10), read (N, T) bool): what each frame shows,
    and whether it was read confidently as exactly two digits."""
    N, T = videos.shape[:2]
    frames = videos.reshape(-1, *videos.shape[2:])                        # (N*T, H, W, 3)
    probs = torch.cat([reader(reader_input(frames[i:i + 512])).softmax(-1)
                       for i in range(0, N * T, 512)])                    # (N*T, 10, 4)
    top, counts = probs.max(-1)                                           # (N*T, 10) each
    read = (top > CONFIDENT).all(-1) & (counts.sum(-1) == 2)
    return counts.view(N, T, 10), read.view(N, T)                         # (N, T, 10), (N, T)


def legibility(reader, videos, reference=None):
    """Scores of uint8 clips (N, T, H, W, 3): the share of frames read (two digits, confidently);
    the share of clips that keep their digits: read in at least half their frames, and every frame
    read shows the same two digits (frames where the digits overlap too much to read are not held
    against a clip, as they are not against a real one); and, given reference clips (the real ones
    for reconstructions), the share of frames read as the same digits as the reference frame."""
    counts, read = read_digits(reader, videos)                                  # (N, T, 10), (N, T)
    # (N, 1, 10): first frame read
    first = counts.gather(1, read.float().argmax(1)[:, None, None].expand(-1, 1, 10))
    agree = ((counts == first).all(-1) | ~read).all(-1)                         # (N,)
    scores = dict(frames_read=read.float().mean().item(),
                  clips_kept=(agree & (2 * read.sum(-1) >= read.shape[1])).float().mean().item())
    if reference is not None:
        ref_counts, ref_read = read_digits(reader, reference)
        same = read & ref_read & (counts == ref_counts).all(-1)
        scores["same_as_real"] = same.float().mean().item()
    return scores


def digits_of_checkpoint(args):
    """`fvd.py digits`: legibility of real test clips, their reconstructions and (for a prior)
    samples."""
    device = default_device(args.device)
    kind = checkpoint_kind(load_checkpoint(args.ckpt))
    if kind == "gpt":
        gpt, vq = (use_fast_attention(m) for m in load_gpt(args.ckpt, device=device))
    else:
        gpt, vq = None, load_vqvae(args.ckpt, device=device)
    c = vq.config
    data = make_dataset(args.data, c.sequence_length, train=False, resolution=c.resolution)
    reader = load_digit_reader(args.reader)
    real, recon, fake = [], [], []
    generator = torch.Generator(device).manual_seed(args.seed)
    with torch.no_grad():
        for start in tqdm(range(0, args.n, args.batch_size), desc="clips", leave=False):
            items = [data[(i % len(data), i)]
                     for i in range(start, min(args.n, start + args.batch_size))]
            x = torch.stack([it["video"] for it in items]).to(device)  # (b, 3, T, H, W)
            real.append(to_uint8(x).numpy())
            recon.append(samples_to_uint8(vq.decode(vq.encode(x))))
            if gpt is not None:
                k = gpt.config.n_cond_frames
                label = torch.tensor([it.get("label", 0) for it in items], device=device) \
                    if gpt.config.n_classes else None
                codes = generate(gpt, len(items), label, x[:, :, :k] if k else None,
                                 temperature=args.temperature,
                                 top_k=args.top_k, generator=generator)
                fake.append(samples_to_uint8(vq.decode(codes), x[:, :, :k] if k else None,
                                             mark=False))
    real = np.concatenate(real)
    rows = {"real": legibility(reader, real),
            "reconstructions": legibility(reader, np.concatenate(recon), real)}
    if fake:
        rows["samples"] = legibility(reader, np.concatenate(fake))
    for name, r in rows.items():
        line = (f"{name:>15}: frames read {100 * r['frames_read']:5.1f}%  clips keeping their "
                f"digits {100 * r['clips_kept']:5.1f}%")
        if "same_as_real" in r:
            line += f"  frames read as the real one {100 * r['same_as_real']:5.1f}%"
        print(line, flush=True)
    print(f"(N={args.n} clips of {c.sequence_length} frames, seed {args.seed}, "
          f"{os.path.basename(args.ckpt)}"
          + (f", temperature {args.temperature}, top_k {args.top_k}" if fake else "") + ")",
          flush=True)
    if args.out:
        write_record(args.out, dict(
            metric="digit_legibility",
            protocol=f"DigitReader, read when every count has p > {CONFIDENT}", n=args.n,
            frames=c.sequence_length, resolution=c.resolution, seed=args.seed,
            temperature=args.temperature, top_k=args.top_k,
            **provenance(ckpt=args.ckpt, data=args.data,
                         reader=args.reader or default_reader_path()),
            scores=rows))
    return rows


def digits_main(argv):
    """`python fvd.py digits ...`: the command line of digit legibility."""
    p = argparse.ArgumentParser(prog="fvd.py digits",
                                description="Digit legibility of moving-digits clips: real, "
                                            "reconstructed, sampled.")
    p.add_argument("--ckpt", required=True,
                   help="a prior checkpoint (real, reconstructions, samples) or a VQ-VAE one")
    p.add_argument("--data", default=None,
                   help="moving-digits HDF5 file (default: the built-in set)")
    p.add_argument("--n", type=int, default=64, help="clips per set")
    add_sampling_flags(p)
    p.add_argument("--reader", default=None,
                   help="digit reader weights (default: weights/digit_reader.pt, else trained on "
                        "first use, about 90 s, then cached)")
    add_record_flags(p, "the sampling generator")
    add_device_flags(p)
    args = p.parse_args(argv)
    return run_cli("fvd.py", lambda: digits_of_checkpoint(args))


# -----------------------------------------------------------------------------
# Steering: does the view turn the way it was told?
#
# Turning in place slides the whole picture sideways (TURN_LEFT: the world moves right), about 11
# pixels a step at 64x64 and ViZDoom's frame_skip 4, where walking forward spreads it out from the
# centre with no net slide. So the slide between two frames, the horizontal offset that best lines
# them up, reads the turn: on real ViZDoom test frames, 97% of the steps after TURN_LEFT slide right
# and 97% after TURN_RIGHT slide left.
#
# Where the player holds a weapon (Battle2), the weapon sprite stands still at the bottom centre of
# every frame and the floor below the horizon is one flat grey: the whole frame lines up best with
# no slide at all in 36% of turning steps, and 81% of Battle2's real held turns read right. The top
# half of the frame (walls, monsters, the horizon) holds what slides: 99% of the held turns read
# right.

TURN_SIGN = {"TURN_LEFT": 1, "TURN_RIGHT": -1}   # the sign of the slide each turn makes


def view_rows(names, height):
    """The rows a turn is read from: the top half where the buttons include ATTACK (a weapon is
    drawn at the bottom), every row otherwise."""
    armed = any("ATTACK" in name.split("+") for name in names or ())
    return slice(0, height // 2) if armed else slice(0, height)


def view_shift(a, b, most=None, rows=slice(None)):
    """How many pixels the picture slid right from frame a to frame b (uint8 (H, W, 3)): the offset
    in -most..most (default W // 4) with the least mean squared difference of the overlapping grey
    columns of the given rows (default: all)."""
    a, b = a[rows].astype(np.float32).mean(-1), b[rows].astype(np.float32).mean(-1)    # (h, W)
    w = a.shape[1]
    most = most or w // 4
    # The mean squared difference of the two pictures' overlap when b is slid d columns.
    overlap = lambda d: (a[:, max(0, -d):w - max(0, d)], b[:, max(0, d):w - max(0, -d)])
    error = lambda d: np.mean(np.subtract(*overlap(d)) ** 2)
    return min(range(-most, most + 1), key=error)


def held_turns(actions, signs, min_hold=3):
    """(clip, first, last, sign) of every run of one action held for at least min_hold steps in
    (N, T) action indices, for the actions in `signs` (index -> its slide's sign: the turns, or the
    strafes; the shots use it with sign 1). The run's steps t lead to t + 1, so the last step of a
    clip leads nowhere and is left out."""
    runs = []
    for i, row in enumerate(np.asarray(actions)[:, :-1]):
        start = 0
        for t in range(1, len(row) + 1):
            if t == len(row) or row[t] != row[start]:
                if row[start] in signs and t - start >= min_hold:
                    runs.append((i, start, t, signs[row[start]]))
                start = t
    return runs


def view_slides(videos, rows=slice(None)):
    """Every step's slide (view_shift, read from the given rows) of uint8 clips (N, T, H, W, 3):
    int (N, T - 1), frame t to t + 1."""
    return np.array([[view_shift(v[t], v[t + 1], rows=rows) for t in range(len(v) - 1)]
                     for v in videos])


def turn_following(slides, actions, signs, min_hold=3):
    """The share of held turns (held_turns) after which the picture slid the commanded way over the
    run (summed over its steps), from clips' slides (N, T - 1) and (N, T) button indices (None
    without a held turn); and how many."""
    runs = held_turns(actions, signs, min_hold)
    right = [sign * slides[i, first:last].sum() > 0 for i, first, last, sign in runs]
    return (float(np.mean(right)) if runs else None), len(runs)


# Battle2's other buttons. A strafe slides the picture the way a turn to the same side does, but
# less (3-4 px a step against 11), and unevenly: near things slide further than far ones. Near the
# top of the view only near walls reach (a far wall ends lower down), while the band around the
# horizon is mostly far walls. So a held strafe shows when the near band slides the told way, and
# further than the horizon band. On Battle2's 100 real test lives: 63% of 182 held strafes, against
# 28% of 968 held turns, which slide both bands alike. A weak reading, but one that separates.
#
# A shot shows the muzzle flash: a blob of warm, bright pixels just above the pistol's barrel, the
# weapon sprite drawn in its firing pose around it. The pistol fires about every fourth frame while
# ATTACK is held, so 44% of the three frames after a press flash, and 4% of the frames with no
# press in the five before (a fireball, a lit pickup). A shot counts as shown when one of the frames
# it leads to, or the two after, flashes: 98% of 284 real presses, against 18% of 217 walks forward.

STRAFE_SIGN = {"MOVE_LEFT": 1, "MOVE_RIGHT": -1}   # the sign of a strafe's slide, as for turns


def button_signs(names, signs):
    """{action index: sign} for every action that holds one of the buttons in `signs`, alone or with
    others (Battle2's MOVE_FORWARD+TURN_LEFT, ...)."""
    return {i: signs[b] for i, name in enumerate(names) for b in name.split("+") if b in signs}


def strafe_following(videos, actions, signs, min_hold=3):
    """The share of held strafes after which the near band (the top 3/16 of the frame) slid the told
    way, and further than the horizon band (the middle 3/16); and how many. videos uint8 (N, T, H,
    W, 3), actions (N, T) action indices, signs as for held_turns."""
    h = videos.shape[2]
    near = view_slides(videos, slice(0, 3 * h // 16))                                  # (N, T - 1)
    far = view_slides(videos, slice(11 * h // 32, 17 * h // 32))                      # (N, T - 1)
    runs = held_turns(actions, signs, min_hold)
    shown = [sign * near[i, a:b].sum() > max(0, sign * far[i, a:b].sum()) for i, a, b, sign in runs]
    return (float(np.mean(shown)) if runs else None), len(runs)


def muzzle_flash(frames):
    """Whether each uint8 frame (..., H, W, 3) shows the pistol's muzzle flash: at least 4 warm,
    bright pixels (at 64x64) in the patch above the barrel, rows 7/16 to 3/4 and columns 11/32 to
    21/32 of the frame."""
    h, w = frames.shape[-3:-1]
    patch = frames[..., 7 * h // 16:3 * h // 4, 11 * w // 32:21 * w // 32, :].astype(np.int16)
    warm = (patch[..., 0] > 200) & (patch[..., 1] > 140) & (patch[..., 2] < 140)
    return warm.sum((-1, -2)) >= 4 * h * w / 4096


def shot_following(videos, actions, shoots):
    """The share of shots (runs of actions holding ATTACK, the indices in `shoots`) followed by a
    muzzle flash in one of the frames they lead to or the two after; and how many. videos (N, T, H,
    W, 3), actions (N, T)."""
    flash = muzzle_flash(videos)                                                         # (N, T)
    runs = held_turns(actions, dict.fromkeys(shoots, 1), min_hold=1)
    shown = [flash[i, a + 1:b + 3].any() for i, a, b, _ in runs]
    return (float(np.mean(shown)) if runs else None), len(runs)


# The actions a prior is told all the way through a clip, in the picture's order: on Battle2
# Figure 8's "moving forward and right" first (three rows, as the paper shows), then Figure 7's
# left, straight, right, then the strafes and the shot.
TOLD = ("MOVE_FORWARD+MOVE_RIGHT", "TURN_LEFT", "MOVE_FORWARD", "TURN_RIGHT", "MOVE_LEFT",
        "MOVE_RIGHT", "ATTACK")
PICTURE_ROWS = {"MOVE_FORWARD+MOVE_RIGHT": 3}


def steer_sets(args, gpt, vq, names, told, device):
    """The clips `fvd.py steer` scores, uint8 (n, T, H, W, 3) per set: the real test clips, their
    reconstructions, samples given their actions, samples told each action in `told` all the way
    through, and (with --uncond) an unconditional prior's samples; and the real clips' action
    indices (n, T)."""
    c = vq.config
    data = make_dataset(args.data, c.sequence_length, train=False, resolution=c.resolution)
    if "actions" not in getattr(data, "extras", ()):
        raise ValueError(f"{args.data}: no per-frame actions to steer by (expected an HDF5 file "
                         "with test_actions)")
    generator = torch.Generator(device).manual_seed(args.seed)
    sample = lambda gpt, vq, n, a=None: samples_to_uint8(vq.decode(generate(
        gpt, n, actions=a, temperature=args.temperature, top_k=args.top_k, generator=generator)))
    uncond = None
    if args.uncond:
        uncond = tuple(use_fast_attention(m) for m in load_gpt(args.uncond, device=device))
        if uncond[0].config.action_dim:
            raise ValueError(f"--uncond {args.uncond}: a prior conditioned on actions, expected "
                             "one without")
    T = c.sequence_length
    sets = {"real": [], "reconstructions": [], "samples": []} | {f"told {k}": [] for k in told}
    sets |= {"unconditional": []} if uncond else {}
    buttons = []
    with torch.no_grad():
        for start in tqdm(range(0, args.n, args.batch_size), desc="clips", leave=False):
            items = [data[(i % len(data), i)]
                     for i in range(start, min(args.n, start + args.batch_size))]
            x = torch.stack([it["video"] for it in items]).to(device)  # (b, 3, T, H, W)
            a = torch.stack([it["actions"] for it in items]).to(device)  # (b, T, A)
            buttons.append(a.argmax(-1).cpu().numpy())
            sets["real"].append(to_uint8(x).numpy())
            sets["reconstructions"].append(samples_to_uint8(vq.decode(vq.encode(x))))
            sets["samples"].append(sample(gpt, vq, len(items), a))
            for k in told:   # every clip told the same action all the way through
                told_k = named_actions(f"{k}*{T}", names, len(items), (T,), args.ckpt)
                sets[f"told {k}"].append(sample(gpt, vq, len(items), told_k.to(device)))
            if uncond:
                sets["unconditional"].append(sample(*uncond, len(items)))
    return {k: np.concatenate(v) for k, v in sets.items()}, np.concatenate(buttons)


def steer_scores(sets, buttons, names, told, min_hold):
    """Each set's scores: turns followed, and where the prior has them strafes and shots shown, the
    share of frames that flash, and the mean slide per step. A told set is scored against its one
    action; the unconditional samples only for the slide and the flashes."""
    turns, strafes = button_signs(names, TURN_SIGN), button_signs(names, STRAFE_SIGN)
    shoots = [i for i, name in enumerate(names) if "ATTACK" in name.split("+")]
    rows = {}
    for name, videos in sets.items():
        b = np.full(buttons.shape, names.index(name[5:])) if name.startswith("told") else buttons
        b = np.full(buttons.shape, -1) if name == "unconditional" else b
        slides = view_slides(videos, view_rows(names, videos.shape[2]))               # (N, T - 1)
        share, count = turn_following(slides, b, turns, min_hold)
        row = rows[name] = dict(turned_as_told=share, turns=count,
                                mean_slide=float(np.abs(slides).mean()))
        if strafes:
            row["strafed_as_told"], row["strafes"] = strafe_following(videos, b, strafes, min_hold)
        if shoots:
            row["shots_shown"], row["shots"] = shot_following(videos, b, shoots)
            row["flash_frames"] = float(muzzle_flash(videos).mean())
        line = f"{name:>31}: slide {row['mean_slide']:5.2f} px/step"
        for key, total, what in (("turned_as_told", "turns", "turns"),
                                 ("strafed_as_told", "strafes", "strafes"),
                                 ("shots_shown", "shots", "shots")):
            if row.get(total):
                line += f"  {what} {100 * row[key]:5.1f}% of {row[total]}"
        if shoots:
            line += f"  flashing frames {100 * row['flash_frames']:4.1f}%"
        print(line, flush=True)
    return rows


def steer_of_checkpoint(args):
    """`fvd.py steer`: the turn-following of real test clips (the ceiling), their reconstructions,
    samples given the real clips' actions, and samples told to turn left or right (or go straight)
    all the way; on Battle2 also strafes and shots."""
    device = default_device(args.device)
    gpt, vq = (use_fast_attention(m) for m in load_gpt(args.ckpt, device=device))
    c = vq.config
    names = load_checkpoint(args.ckpt).get("action_names")
    if not gpt.config.action_dim or not names or not set(TURN_SIGN) <= set(names):
        raise ValueError(f"{args.ckpt}: steer needs a prior conditioned on actions named TURN_LEFT "
                         "and TURN_RIGHT (trained with --action_cond on ViZDoom data), got "
                         f"{names or 'no action names'}")
    told = [k for k in TOLD if k in names]
    sets, buttons = steer_sets(args, gpt, vq, names, told, device)
    rows = steer_scores(sets, buttons, names, told, args.min_hold)
    print(f"(N={args.n} clips of {c.sequence_length} frames, turns and strafes held >= "
          f"{args.min_hold} steps, seed {args.seed}, {os.path.basename(args.ckpt)}, temperature "
          f"{args.temperature}, top_k {args.top_k})", flush=True)
    # Figure 7 of the paper: the same model told to turn left, go straight, turn right; Figure 8:
    # an unconditional row, then three told to move forward and right, then the other buttons.
    if args.picture:
        from checkpoints import save_png, video_grid
        shown = list(sets.get("unconditional", [])[:args.picture_rows])
        shown += [sets[f"told {k}"][i] for k in told
                  for i in range(args.picture_rows * PICTURE_ROWS.get(k, 1))]
        save_png(video_grid(np.stack(shown)), args.picture)
        print(args.picture, flush=True)
    if args.out:
        rows_read = view_rows(names, c.resolution)
        write_record(args.out, dict(
            metric="turn_following",
            protocol=f"view_shift of rows {rows_read.start}-{rows_read.stop - 1}, turns and "
                     f"strafes held >= {args.min_hold}, a flash within 3 frames of a shot",
            n=args.n, frames=c.sequence_length, resolution=c.resolution, seed=args.seed,
            temperature=args.temperature, top_k=args.top_k,
            **provenance(ckpt=args.ckpt, data=args.data, uncond=args.uncond), scores=rows))
    return rows


def steer_main(argv):
    """`python fvd.py steer ...`: the command line of the steering score."""
    p = argparse.ArgumentParser(prog="fvd.py steer",
                                description="How often an action-conditional prior's samples turn "
                                            "the way they were told.")
    p.add_argument("--ckpt", required=True,
                   help="an action-conditional prior (ViZDoom: TURN_LEFT, TURN_RIGHT, ...)")
    p.add_argument("--data", required=True,
                   help="the HDF5 file it was trained on; its test clips and their actions")
    p.add_argument("--n", type=int, default=64, help="clips per set")
    p.add_argument("--min_hold", type=int, default=3,
                   help="score turns held for at least this many steps")
    add_sampling_flags(p)
    p.add_argument("--picture", default=None,
                   help="also write a PNG: samples told to turn left, go straight, turn right (a "
                        "row each); on Battle2 also three told to move forward and right, the "
                        "strafes and the shot (the paper's Figure 8)")
    p.add_argument("--picture_rows", type=int, default=1, help="rows per told action in --picture")
    p.add_argument("--uncond", default=None,
                   help="a prior without actions on the same data: its samples are scored too and "
                        "make the top row of --picture (the paper's Figure 8)")
    add_record_flags(p, "the sampling generator")
    add_device_flags(p)
    args = p.parse_args(argv)
    return run_cli("fvd.py", lambda: steer_of_checkpoint(args))


# -----------------------------------------------------------------------------
# Long play: does the dream stay a world?
#
# A dream that dissolves drifts away from what the game looks like: its colours go grey, its sky and
# floor fade, or it freezes. Each frame is measured against the real game's test frames by its
# colour statistics (each channel's mean and spread), by how much of it is sky (ViZDoom's dark blue)
# and floor (its green), and by how much it changed since the frame before. The same measures of the
# real game, played the same way, and of its frames through the VQ-VAE, say how far a dream could
# get: the decoder draws a close wall smoother than the game does, whatever the prior draws.

SHOWS = 0.02   # a frame shows the sky (the floor) when at least 2% of its pixels are sky (floor)


def colour_stats(frames):
    """uint8 frames (N, H, W, 3) -> (N, 6): each channel's mean, then each channel's standard
    deviation."""
    x = np.asarray(frames, np.float32).reshape(len(frames), -1, 3)                     # (N, H*W, 3)
    return np.concatenate([x.mean(1), x.std(1)], axis=1)                                # (N, 6)


def sky_and_floor(frames):
    """The share of each frame's pixels that is sky (blue well above red and green) and floor (green
    well above red and blue): float (N, 2)."""
    x = np.asarray(frames, np.int16)  # (N, H, W, 3)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    sky = (b > r + 15) & (b > g + 15)
    floor = (g > r + 15) & (g > b + 15)
    return np.stack([sky.mean((1, 2)), floor.mean((1, 2))], axis=1)                    # (N, 2)


def world_reference(frames):
    """What real frames look like: the range (least and greatest), mean and spread of their colour
    statistics, and the share of them that show the sky and the floor."""
    stats, looks = colour_stats(frames), sky_and_floor(frames)
    return dict(low=stats.min(0).tolist(), high=stats.max(0).tolist(), mean=stats.mean(0).tolist(),
                std=stats.std(0).tolist(), shows_sky=float((looks[:, 0] >= SHOWS).mean()),
                shows_floor=float((looks[:, 1] >= SHOWS).mean()))


def drift(frames, reference):
    """How far each frame's colour statistics lie from the real frames', in their standard
    deviations (the root mean square over the six): float (N,). Real frames average about 1."""
    z = (colour_stats(frames) - np.array(reference["mean"])) / np.array(reference["std"])
    return np.sqrt((z ** 2).mean(1))


def longest_still(frames, still=1.0):
    """The longest run of frames each within `still` grey levels (mean absolute difference) of the
    one before: 1 for a picture that always moves."""
    x = np.asarray(frames, np.float32)
    change = np.abs(x[1:] - x[:-1]).mean((1, 2, 3))                                  # (N - 1,)
    longest = count = 0
    for c in change:
        count = count + 1 if c < still else 0
        longest = max(longest, count)
    return longest + 1


FROZEN = 16   # frames standing still in a row that count as a frozen picture (a whole window)


def stays_a_world(frames, reference, stretch=50):
    """The long-play report of uint8 frames (N, H, W, 3) against world_reference's dict: the share
    of frames whose colour statistics lie in the real range; whether the picture froze; per stretch
    of `stretch` frames (a last partial one left out) the shares showing sky and floor, and whether
    both are at least half the real game's (a dream melted to grey keeps its colours' spread but
    loses its sky); the drift per frame."""
    stats, looks = colour_stats(frames), sky_and_floor(frames)
    # (N,)
    inside = ((stats >= np.array(reference["low"])) & (stats <= np.array(reference["high"]))).all(1)
    stretches = []
    # (a session shorter than a stretch is one stretch)
    for start in range(0, max(len(frames) - stretch, 0) + 1, stretch):
        part = looks[start:start + stretch] >= SHOWS
        sky, floor = float(part[:, 0].mean()), float(part[:, 1].mean())
        keeps = sky >= reference["shows_sky"] / 2 and floor >= reference["shows_floor"] / 2
        stretches.append(dict(first=start, shows_sky=sky, shows_floor=floor, keeps_its_look=keeps))
    d = drift(frames, reference)
    return dict(frames=len(frames), in_real_range=float(inside.mean()),
                longest_still=longest_still(frames),
                froze=longest_still(frames) >= FROZEN,
                stretches_keeping_their_look=float(np.mean([s["keeps_its_look"]
                                                            for s in stretches])),
                stretches=stretches, drift_mean=float(d.mean()),
                drift=[round(float(v), 3) for v in d])


# The session: turns held 12 to 16 frames, with walks between them and direct reversals (left
# straight into right), as (action, frames) in the order played, over and over.
LONG_PLAY = [("MOVE_FORWARD", 10), ("TURN_LEFT", 12), ("TURN_RIGHT", 12), ("MOVE_FORWARD", 8),
             ("TURN_RIGHT", 14), ("MOVE_FORWARD", 6), ("TURN_LEFT", 16), ("MOVE_FORWARD", 12),
             ("TURN_RIGHT", 12), ("TURN_LEFT", 12), ("MOVE_FORWARD", 8)]
BLOCKED = 0.35   # the way ahead is blocked when less than this share of the ground ahead is floor


def way_blocked(frame):
    """Whether a wall stands close ahead in a uint8 frame (H, W, 3): less than BLOCKED of the ground
    just ahead (the bottom 3/8 of the frame, its middle third across) is floor. This is what the
    data's player reads from the depth buffer (prepare/vizdoom.py's Explorer: a wall about four
    steps away), read from the picture instead, as a person does: the two agree on 98.9% of 712
    frames of the real game played at random (tests/test_vizdoom.py checks it on rendered
    frames)."""
    h, w = frame.shape[:2]
    ahead = sky_and_floor(frame[None, 5 * h // 8:, w // 3:2 * w // 3])[0, 1]
    return bool(ahead < BLOCKED)


class LongPlayer:
    """Plays the long-play session (LONG_PLAY) as a person would: each walk ends as soon as a wall
    stands close ahead in the newest frame (way_blocked), and the next turn starts; turns are held
    their whole length. With `looks=False` it plays blind, every walk to its end, as a fixed script:
    into walls, where the real game stays stuck against them too (docs/play.md)."""

    def __init__(self, names, looks=True):
        missing = {n for n, _ in LONG_PLAY} - set(names)
        if missing:
            raise ValueError(f"the long-play script needs the actions {', '.join(sorted(missing))}")
        self.looks, self.part, self.left = looks, 0, LONG_PLAY[0][1]

    def actions(self, frame, n):
        """The next `n` actions, given the newest frame (looked at once, before the first)."""
        blocked = self.looks and frame is not None and way_blocked(frame)
        out = []
        while len(out) < n:
            name = LONG_PLAY[self.part][0]
            if self.left == 0 or (blocked and not out and name == "MOVE_FORWARD"):
                self.part = (self.part + 1) % len(LONG_PLAY)   # on to the next part of the session
                self.left = LONG_PLAY[self.part][1]
                continue
            out.append(name)
            self.left -= 1
        return out


def play_turns(frames, script, names, start):
    """The steering score of a played session (frames: the `start` ones, then one per scripted
    action): the share of its turns held 12 frames or more after which the picture slid the
    commanded way; and how many. Action i is the action of frame start + i (the data's convention:
    it leads to the next)."""
    signs = button_signs(names, TURN_SIGN)
    frames = np.asarray(frames)                                                   # (N, H, W, 3)
    slides = view_slides(frames[None, start:], view_rows(names, frames.shape[1]))  # (1, N - 1)
    buttons = np.array([[names.index(a) for a in script]])                             # (1, N)
    return turn_following(slides, buttons, signs, min_hold=12)


def play_dream(world, start, player, n_frames):
    """The dream played by `player` (a LongPlayer) for `n_frames` frames after the start: uint8
    frames (start + N, H, W, 3), the actions played (N,), and the number of start frames."""
    frames = [start_world(world, start)]
    n_start, script = len(frames[0]), []
    with tqdm(total=n_frames, desc="playing the dream", unit="frame", leave=False) as bar:
        while len(script) < n_frames:
            actions = player.actions(frames[-1][-1], world.per_step)
            frames.append(world.step(actions))
            script += actions
            bar.update(len(actions))
    return np.concatenate(frames), script, n_start


def play_game(game, player, n_frames, per_step):
    """The real game (world.Game) played by `player` for `n_frames` frames, a new life whenever one
    ends: uint8 frames (N, H, W, 3), the actions played (N,), and where each life starts. The player
    looks at the newest frame and acts `per_step` frames at a time (a latent step), as in the
    dream."""
    frames, script, planned, lives = [], [], [], [0]
    game.new_episode()
    while len(frames) < n_frames:
        if game.ended():
            game.new_episode()
            lives.append(len(frames))
        frames.append(game.frame())
        planned = planned or player.actions(frames[-1], per_step)
        script.append(planned.pop(0))
        game.act(script[-1])
    return np.stack(frames), script, lives


def reconstruct(vq, clips):
    """Float clips (N, 3, T, H, W) through the VQ-VAE, 16 at a time: uint8 (N * T, H, W, 3), what
    its decoder can show of them."""
    with torch.no_grad():
        recon = torch.cat([vq.decode(vq.encode(clips[i:i + 16]))
                           for i in range(0, len(clips), 16)])
    frames = samples_to_uint8(recon)                                           # (N, T, H, W, 3)
    return frames.reshape(-1, *frames.shape[2:])                               # (N*T, H, W, 3)


def facing_a_wall(frames):
    """The share of uint8 frames (N, H, W, 3) with a wall close ahead (way_blocked)."""
    return float(np.mean([way_blocked(f) for f in frames]))


def game_report(args, world, names, reference):
    """--game: the real scenario played by the same player for as many frames; its frames and their
    reconstructions scored against the same real frames. The bar the dream is held to: the game
    itself, and the game as the VQ-VAE can show it."""
    from world import Game, default_scenario
    with contextlib.ExitStack() as stack:
        game = Game(stack, default_scenario(names), args.frame_skip, world.vq.config.resolution,
                    names, args.seed)
        frames, script, lives = play_game(game, LongPlayer(names, looks=args.player == "looking"),
                                          args.frames, world.per_step)
    # turns read within each life: a new life's first frame is no slide of the last one's
    each = [play_turns(frames[a:b], script[a:b], names, 0)
            for a, b in zip(lives, lives[1:] + [len(frames)])]
    turns = sum(n for _, n in each)
    share = sum((s or 0) * n for s, n in each) / turns if turns else None
    report = stays_a_world(frames, reference)
    T = world.vq.config.sequence_length   # the game's frames as clips, the rest left out
    clips = torch.stack([preprocess(frames[i:i + T], frames.shape[1])       # (3, T, H, W) each
                         for i in range(0, len(frames) - T + 1, T)])        # (N // T, 3, T, H, W)
    recon = stays_a_world(reconstruct(world.vq, clips), reference)
    return dict(turned_as_told=share, turns=turns, in_real_range=report["in_real_range"],
                reconstructions_in_real_range=recon["in_real_range"],
                stretches_keeping_their_look=report["stretches_keeping_their_look"],
                drift_mean=report["drift_mean"], drift=report["drift"],
                blocked=facing_a_wall(frames))


def dream_of_checkpoint(args):
    """`fvd.py dream`: play a prior for --frames frames of the long-play session; score its turns
    and whether it stays a world against the real test frames (and, with --game, the real game
    played the same way); plot the drift."""
    world, names, start = load_world(args.ckpt, start=args.start, clip=args.clip,
                                     temperature=args.temperature,
                                     top_k=args.top_k, seed=args.seed, stride=args.stride)
    if not names or not set(TURN_SIGN) <= set(names):
        raise ValueError(f"{args.ckpt}: dream needs a prior conditioned on actions named TURN_LEFT "
                         "and TURN_RIGHT")
    c = world.vq.config
    data = make_dataset(args.data, c.sequence_length, train=False, resolution=c.resolution)
    # (n, 3, T, H, W)
    clips = torch.stack([data[(i % len(data), i)]["video"] for i in range(args.n_real)])
    real = to_uint8(clips).numpy().reshape(-1, c.resolution, c.resolution, 3)  # (n*T, H, W, 3)
    recon = reconstruct(world.vq, clips)        # (n*T, H, W, 3): what the decoder shows of the game
    references = dict(real=world_reference(real), reconstructions=world_reference(recon))
    player = LongPlayer(names, looks=args.player == "looking")
    frames, script, n_start = play_dream(world, start, player, args.frames)
    share, turns = play_turns(frames, script, names, n_start)
    report = stays_a_world(frames[n_start:], references["real"])
    in_recon = stays_a_world(frames[n_start:], references["reconstructions"])
    report["in_reconstructions_range"] = in_recon["in_real_range"]
    report["blocked"] = facing_a_wall(frames[n_start:])
    recon_report = stays_a_world(recon, references["real"])
    real_drift = drift(real, references["real"])
    print(f"{args.frames} frames played ({args.player}): turned the way told "
          f"{100 * (share or 0):.1f}% of {turns} held turns; colour statistics within the real "
          f"frames' {100 * report['in_real_range']:.1f}% (the reconstructions of real frames: "
          f"{100 * recon_report['in_real_range']:.1f}%), within the reconstructions' "
          f"{100 * report['in_reconstructions_range']:.1f}%; longest still "
          f"{report['longest_still']} frames; stretches of 50 showing sky and floor: "
          f"{100 * report['stretches_keeping_their_look']:.0f}%; mean drift "
          f"{report['drift_mean']:.2f} (real frames: {real_drift.mean():.2f}); facing a wall "
          f"{100 * report['blocked']:.0f}% of frames", flush=True)
    game = game_report(args, world, names, references["real"]) if args.game else None
    if game:
        print(f"the real game, played the same way: turned the way told "
              f"{100 * (game['turned_as_told'] or 0):.1f}% of {game['turns']} held turns; colour "
              f"statistics within the real frames' {100 * game['in_real_range']:.1f}%, through the "
              f"VQ-VAE {100 * game['reconstructions_in_real_range']:.1f}%; stretches of 50 showing "
              f"sky and floor: {100 * game['stretches_keeping_their_look']:.0f}%; mean drift "
              f"{game['drift_mean']:.2f}; facing a wall {100 * game['blocked']:.0f}% of frames",
              flush=True)
    if args.plot:
        plot_drift(report["drift"], real_drift, args.plot,
                   f"{os.path.basename(args.ckpt)}, {args.frames} frames, temperature "
                   f"{args.temperature}, {args.player}", game=game and game["drift"])
    if args.out:
        write_record(args.out, dict(
            metric="long_play", frames=args.frames, seed=args.seed, stride=args.stride,
            temperature=args.temperature, top_k=args.top_k, player=args.player,
            turned_as_told=share, turns=turns,
            **provenance(ckpt=args.ckpt, data=args.data), references=references,
            reconstructions_in_real_range=recon_report["in_real_range"], dream=report, game=game))
    return dict(turned_as_told=share, turns=turns, **report, game=game)


def plot_drift(dream, real, path, title, game=None):
    """The drift of each played frame, beside the real frames' mean and 99th percentile (and the
    real game's played the same way, where given)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3), dpi=100)
    ax.plot(np.arange(len(dream)), dream, lw=0.6, alpha=0.6, label="the dream, frame by frame")
    ax.plot(np.arange(12, len(dream) - 12), np.convolve(dream, np.ones(25) / 25, mode="valid"),
            lw=2,
            label="its mean over 25 frames")
    if game is not None:
        ax.plot(np.arange(12, len(game) - 12), np.convolve(game, np.ones(25) / 25, mode="valid"),
                lw=1.5, color="0.4", label="the real game played the same way: mean over 25")
    ax.axhline(np.percentile(real, 99), color="k", ls="--", lw=1,
               label="real frames: 99th percentile")
    ax.axhline(np.mean(real), color="k", ls=":", lw=1, label="real frames: mean")
    ax.set_xlabel("frame played")
    ax.set_ylabel("colour drift (real std)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    print(path, flush=True)


def dream_main(argv):
    """`python fvd.py dream ...`: the command line of the long-play score."""
    p = argparse.ArgumentParser(prog="fvd.py dream",
                                description="Play an action-conditional ViZDoom prior for a long "
                                            "scripted session: does it turn as told and stay a "
                                            "world?")
    p.add_argument("--ckpt", required=True,
                   help="an action-conditional ViZDoom prior, e.g. weights/vizdoom.pt")
    p.add_argument("--data", required=True,
                   help="the HDF5 file it was trained on: its test frames are the reference")
    p.add_argument("--frames", type=int, default=300, help="frames to play after the start")
    p.add_argument("--start", default=None,
                   help="start from a test clip of this dataset (default: the stored start)")
    p.add_argument("--clip", type=int, default=0, help="with --start: which test clip")
    p.add_argument("--n_real", type=int, default=256,
                   help="real test clips (and their reconstructions) to compare with")
    p.add_argument("--temperature", type=float, default=0.9,
                   help="sampling temperature (play's default: 0.9)")
    p.add_argument("--top_k", type=int, default=None, help="sample among the k most likely codes")
    p.add_argument("--stride", type=int, default=1,
                   help="latent steps dropped each time the play loop's window slides")
    p.add_argument("--player", choices=["looking", "blind"], default="looking",
                   help="looking: each walk ends before a wall, as a person plays (default); "
                        "blind: every walk to its end, into walls")
    p.add_argument("--game", action="store_true",
                   help="also play the real scenario the same way and score it: the bar (pip "
                        "install vizdoom)")
    p.add_argument("--frame_skip", type=int, default=4, help="with --game: game tics per frame")
    p.add_argument("--plot", default=None, help="also draw the drift per frame to this PNG")
    add_record_flags(p, "the dream's draws")
    args = p.parse_args(argv)
    return run_cli("fvd.py", lambda: dream_of_checkpoint(args))


# -----------------------------------------------------------------------------
# Any set of videos: a folder of video files, a .npy array, or an HDF5 file's test split


def read_video_set(path, n, frames, indices=None, cut=True):
    """Up to `n` clips of `frames` frames each, uint8 (N, frames, H, W, 3), from a folder of video
    files (sorted by name), a uint8 (N, T, H, W, 3) .npy, or the test split of an HDF5 file in
    the project's layout (each video's first frames). `indices` picks clips of the n (a
    process's share). Clips shorter than `frames` are an error and longer ones are cut; without
    `cut`, a .npy's clips come whole (the caller says what it scores)."""
    path = os.fspath(path)
    indices = range(n) if indices is None else indices
    if os.path.isdir(path):
        paths = find_videos(path)[:n]
        if not paths:
            raise ValueError(f"{path}: no video files")
        clips = [read_frames(paths[i], 0, frames, indexed=False)
                 for i in indices if i < len(paths)]
    elif path.endswith((".h5", ".hdf5")):
        data = HDF5Dataset(path, frames, train=False)
        clips = [np.asarray(data.frames()[data.starts[i]:data.starts[i] + frames])
                 for i in indices if i < len(data)]
    else:
        try:
            videos = np.load(path, mmap_mode="r")   # allow_pickle is off by default: arrays only
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable .npy file ({type(e).__name__})") from None
        if videos.dtype != np.uint8 or videos.ndim != 5 or videos.shape[-1] != 3:
            raise ValueError(f"{path}: expected uint8 clips (N, T, H, W, 3), got "
                             f"{videos.dtype} {videos.shape}")
        clips = [np.asarray(videos[i, :frames] if cut else videos[i])
                 for i in indices if i < len(videos)]
    short = [len(c) for c in clips if len(c) < frames]
    if short and cut:
        raise ValueError(f"{path}: a clip of {short[0]} frames; scoring needs {frames}")
    shapes = sorted({str(c.shape) for c in clips})
    if len(shapes) > 1:
        raise ValueError(f"{path}: clips of different shapes ({', '.join(shapes[:3])})")
    return np.stack(clips) if clips else np.zeros((0, frames, 1, 1, 3), np.uint8)


# -----------------------------------------------------------------------------
# Video prediction: PSNR and SSIM of the predicted frames against the real ones
#
# Given the first k frames of a test clip, the prior draws the rest; each predicted frame is
# compared with the real frame at its place. PSNR = 10 log10(255^2 / MSE) per frame, over its
# pixels and channels (identical frames: capped at 100 dB). SSIM follows Wang et al. (2004): the
# local means, variances and covariance under an 11x11 Gaussian window of sigma 1.5, population
# (not sample) statistics, K1 = 0.01, K2 = 0.03, L = 255, averaged over the positions where the
# window fits, per RGB channel, then over the channels (scikit-image's structural_similarity
# with gaussian_weights=True and use_sample_covariance=False gives the same numbers; tested).

SSIM_SIZE, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def as_frames(videos):
    """Videos in either of the project's layouts -> float64 frames (N, T, 3, H, W) on 0..255:
    uint8 (N, T, H, W, 3), or the models' float (N, 3, T, H, W) in [-0.5, 0.5]."""
    v = torch.as_tensor(np.asarray(videos) if not torch.is_tensor(videos) else videos)
    if v.dtype == torch.uint8:
        return v.double().permute(0, 1, 4, 2, 3)                         # (N, T, 3, H, W)
    return ((v.double() + 0.5).clamp(0, 1) * 255).permute(0, 2, 1, 3, 4)  # (N, T, 3, H, W)


def ssim_per_frame(a, b):
    """SSIM of each frame pair, (N, T), of two batches of videos of one shape (see as_frames)."""
    x, y = as_frames(a), as_frames(b)
    N, T, C, H, W = x.shape
    g = torch.arange(SSIM_SIZE, dtype=torch.float64) - SSIM_SIZE // 2
    g = torch.exp(-g ** 2 / (2 * SSIM_SIGMA ** 2))
    g = g / g.sum()                                                       # (11,)
    window = (g[:, None] * g[None, :])[None, None]                        # (1, 1, 11, 11)
    blur = lambda z: F.conv2d(z.reshape(-1, 1, H, W), window)            # (N*T*C, 1, H', W')
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (SSIM_K1 * 255) ** 2, (SSIM_K2 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.view(N, T, C, -1).mean(dim=(2, 3))                           # (N, T)


def ssim(a, b):
    """Mean SSIM of two batches of videos (Wang et al., 2004; see above)."""
    return ssim_per_frame(a, b).mean().item()


def psnr_per_frame(a, b):
    """PSNR in dB of each frame pair, (N, T), capped at 100 for identical frames."""
    mse = (as_frames(a) - as_frames(b)).square().mean(dim=(2, 3, 4))     # (N, T)
    return 10 * torch.log10(255 ** 2 / mse.clamp_min(255 ** 2 * 1e-10))


def prediction_summary(values):
    """Per-clip, per-sample, per-frame scores (N, S, T') -> their mean and per-frame curve, and
    the same for the best of the S samples of each clip (the one with the best mean)."""
    pick = values.mean(-1).argmax(1)[:, None, None]                       # (N, 1, 1)
    best = values.gather(1, pick.expand(-1, 1, values.shape[-1]))         # (N, 1, T')
    curve = lambda v: [float(x) for x in v.mean(dim=tuple(range(v.dim() - 1)))]
    return dict(mean=float(values.mean()), per_frame=curve(values),
                best_of_samples=dict(mean=float(best.mean()), per_frame=curve(best)))


@torch.no_grad()
def prediction_scores(args):
    """PSNR and SSIM of the prior's continuations of the first k frames of --n test clips."""
    device = default_device(args.device)
    gpt, vq = (use_fast_attention(m) for m in load_gpt(args.ckpt, device=device))
    c, vc = gpt.config, vq.config
    stride = vc.sequence_length // c.latent_shape[0]                      # frames per latent step
    k = c.n_cond_frames or args.context_frames or stride
    if not c.n_cond_frames and (k % stride or k >= vc.sequence_length):
        raise ValueError(f"--context_frames {k} must be a multiple of {stride} below the clip's "
                         f"{vc.sequence_length} frames")
    # The data and frame rate the prior was trained with, unless told otherwise (None: the
    # built-in digits); an original checkpoint does not say.
    trained = load_checkpoint(args.ckpt).get("train_args")
    if args.data is None and not isinstance(trained, dict):
        raise ValueError(f"{args.ckpt}: does not say what it was trained on; pass --data")
    data_path = args.data if args.data is not None else trained.get("data")
    every = args.sample_every or (trained or {}).get("sample_every") or 1
    data = make_dataset(data_path, vc.sequence_length, train=False, resolution=vc.resolution,
                        sample_every=every)
    psnr, ssim_ = [], []
    for start in tqdm(range(0, args.n, args.batch_size), desc="predicting", leave=False):
        end = min(args.n, start + args.batch_size)
        items = [data[(i % len(data), i)] for i in range(start, end)]
        x = torch.stack([it["video"] for it in items]).to(device)         # (b, 3, T, H, W)
        real = to_uint8(x).numpy()[:, k:]                                  # (b, T - k, H, W, 3)
        label = actions = None
        if c.n_classes:
            label = torch.tensor([it["label"] for it in items], device=device)
        if c.action_dim:
            actions = torch.stack([it["actions"] for it in items]).to(device)
        frames = x[:, :, :k] if c.n_cond_frames else None
        prefix = None if c.n_cond_frames else vq.encode(x[:, :, :k])     # (b, k/stride, h, w)
        p, s = [], []
        for sample in range(args.samples):
            g = torch.Generator(device).manual_seed(
                trial_seed(args.seed, sample) * TRIAL_SEED_STRIDE + start)
            codes = generate(gpt, len(items), label, frames, actions,
                             temperature=args.temperature, top_k=args.top_k, generator=g,
                             prefix=prefix)
            fake = samples_to_uint8(vq.decode(codes), frames, mark=False)[:, k:]
            p.append(psnr_per_frame(fake, real))                          # (b, T - k)
            s.append(ssim_per_frame(fake, real))                          # (b, T - k)
        psnr.append(torch.stack(p, 1))                                    # (b, S, T - k)
        ssim_.append(torch.stack(s, 1))                                   # (b, S, T - k)
    scores = dict(psnr=prediction_summary(torch.cat(psnr)),
                  ssim=prediction_summary(torch.cat(ssim_)))
    p, s = scores["psnr"], scores["ssim"]
    best = (f"  (best of {args.samples} per clip: PSNR {p['best_of_samples']['mean']:.2f} dB, "
            f"SSIM {s['best_of_samples']['mean']:.4f})" if args.samples > 1 else "")
    print(f"PSNR {p['mean']:.2f} dB  SSIM {s['mean']:.4f}{best}  (N={args.n} clips of "
          f"{vc.sequence_length} frames: {k} given, {vc.sequence_length - k} predicted; seed "
          f"{args.seed}, {os.path.basename(args.ckpt)})", flush=True)
    if args.out:
        write_record(args.out, dict(
            metric="video_prediction", n=args.n, samples=args.samples, given_frames=k,
            predicted_frames=vc.sequence_length - k, resolution=vc.resolution, seed=args.seed,
            temperature=args.temperature, top_k=args.top_k,
            protocol="PSNR (capped at 100 dB) and SSIM (Wang et al. 2004: 11x11 Gaussian, "
                     "sigma 1.5, K1 0.01, K2 0.03) per predicted frame, uint8 RGB",
            **provenance(ckpt=args.ckpt, data=data_path), **scores))
    return scores


def predict_main(argv):
    """`python fvd.py predict ...`: the command line of the video-prediction scores."""
    p = argparse.ArgumentParser(prog="fvd.py predict",
                                description="PSNR and SSIM of a prior's predicted frames against "
                                            "the real ones, given the first frames of test clips.")
    p.add_argument("--ckpt", required=True, help="a prior checkpoint (ours or an original .ckpt)")
    p.add_argument("--data", default=None,
                   help="HDF5 file or video folder whose test clips are continued (default: the "
                        "data the prior was trained on, the built-in digits included)")
    p.add_argument("--n", type=int, default=64, help="test clips")
    p.add_argument("--sample_every", type=int, default=None, metavar="K",
                   help="every K-th frame of the data (default: as the prior was trained)")
    p.add_argument("--samples", type=int, default=1,
                   help="samples per clip; with more than one, the best is reported too")
    p.add_argument("--context_frames", type=int, default=None,
                   help="frames given to an unconditional prior (default: one latent step's); a "
                        "frame-conditional prior is given its n_cond_frames")
    add_sampling_flags(p)
    add_record_flags(p, "the samples")
    add_device_flags(p)
    args = p.parse_args(argv)
    return run_cli("fvd.py", lambda: prediction_scores(args))
