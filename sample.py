"""Sample videos from a trained prior and write them as one grid video.

    python sample.py --ckpt runs/gpt/ckpt.pt --n 16 --out samples.mp4
    python sample.py --ckpt runs/gpt/ckpt.pt --out s.gif --temperature 0.9 --top_k 100 --seed 1
    python sample.py --ckpt bair_gpt.ckpt --cond_from bair.hdf5 --out bair.mp4    # given frames
    python sample.py --ckpt ucf_gpt.ckpt --label 3 --out class3.png                # a class
    python sample.py --ckpt bair_act.ckpt --cond_from bair.h5 --actions push.npy   # actions
    python sample.py --ckpt doom.ckpt --actions "TURN_LEFT*8,MOVE_FORWARD*8"       # actions by name
    python sample.py --ckpt runs/gpt/ckpt.pt --frames 64 --out long.mp4           # longer videos
    python sample.py --ckpt runs/gpt/ckpt.pt --cond_from DATA --context_frames 4 --frames 32 \
        --out predicted.mp4                                                       # prediction
    python sample.py --ckpt bair_gpt.ckpt --cond_from my_frame.png --out mine.mp4  # your frame
    python sample.py --ckpt runs/gpt/ckpt.pt --cond_from clip.mp4 --context_frames 4 --out next.mp4

The checkpoint is ours (it embeds its VQ-VAE) or an original VideoGPT prior.
Codes are drawn with the fast KV-cached sampler (fast.generate, which draws
the codes gpt.VideoGPT.sample draws) in batches,
decoded by the VQ-VAE, and tiled into a grid: an MP4 (PyAV), a GIF (Pillow),
or a PNG contact sheet with one sample per row. Conditioning frames are framed
in red, as in the paper's figures. The written path is printed.

Not here: the samplers themselves (gpt.VideoGPT.sample; fast.generate, and fast.sample_long
for videos longer than the prior was trained on).
"""

import argparse
import math
import os

import numpy as np
import torch

from checkpoints import (OutputLock, check_writable, grid_video, load_checkpoint, save_gif,
                         save_mp4, save_png, trained_with, video_grid)
from data import IMAGE_EXTS, VIDEO_EXTS, make_dataset, preprocess, read_clip, samples_to_uint8
from fast import AUTO_COMPILE_STEPS, compile_pays_off, sample_long, use_fast_attention
from gpt import load_gpt
from runtime import autocast, default_device, run_cli
from world import named_actions

WRITERS = {".mp4", ".gif", ".png"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample videos from a VideoGPT prior.")
    p.add_argument("--ckpt", required=True,
                   help="prior checkpoint: ours (ckpt.pt) or an original VideoGPT .ckpt")
    p.add_argument("--n", type=int, default=16, help="number of videos")
    p.add_argument("--out", default="samples.mp4", help="output path: .mp4, .gif or .png")
    # sampling
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (> 0)")
    p.add_argument("--top_k", type=int, default=None, help="sample among the k most likely codes")
    p.add_argument("--top_p", type=float, default=None,
                   help="nucleus sampling: the smallest set of codes with this mass")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    # conditioning
    p.add_argument("--label", type=int, default=None,
                   help="class of every sample (class-conditional priors)")
    p.add_argument("--cond_from", default=None,
                   help="HDF5 file or video folder whose test clips give the conditioning frames "
                        "(and labels, actions); or your own clip: a video file, an image, or a "
                        "folder of images, whose first frames every sample continues")
    p.add_argument("--sample_every", type=int, default=None, metavar="K",
                   help="--cond_from DATA: every K-th frame (default: as the prior was trained)")
    p.add_argument("--actions", default=None,
                   help="action-conditional priors: the actions' names, each held for a number of "
                        "frames, e.g. \"TURN_RIGHT*8,MOVE_FORWARD*8\" (one per frame, for every "
                        "sample); or a .npy of float actions, (T, action_dim) for every sample or "
                        "(n, T, action_dim), T the clip's frames; replaces those of --cond_from")
    # length
    p.add_argument("--frames", type=int, default=None,
                   help="frames per video: more than the prior was trained on slides its window "
                        "over latent time (a multiple of the VQ-VAE's temporal stride; default: "
                        "the trained length)")
    p.add_argument("--stride", type=int, default=None,
                   help="with --frames: latent time steps drawn per window (default: half the "
                        "window)")
    p.add_argument("--context_frames", type=int, default=0,
                   help="with --cond_from: video prediction, the first K real frames are encoded "
                        "and continued")
    # run
    p.add_argument("--batch_size", type=int, default=16, help="videos sampled at once")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="autocast precision")
    p.add_argument("--fps", type=int, default=4, help="frames per second of the MP4/GIF")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decoding step (CUDA graphs on GPU); default: only when "
                        f"the run draws at least {AUTO_COMPILE_STEPS} codes one after the other, "
                        f"where it pays for itself")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# Conditioning from the command line


def load_actions(path, n, sequence_length, action_dim):
    """--actions: a .npy of (T, A) (the same for every sample) or (n, T, A) -> float32 (n, T, A)."""
    try:
        actions = np.load(path)                  # never pickles: allow_pickle is off by default
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .npy file ({type(e).__name__})") from None
    expected = f"({sequence_length}, {action_dim}) or ({n}, {sequence_length}, {action_dim})"
    if actions.ndim == 2:
        actions = np.broadcast_to(actions, (n, *actions.shape))                      # (n, T, A)
    numbers = np.issubdtype(actions.dtype, np.number)
    if actions.shape != (n, sequence_length, action_dim) or not numbers:
        raise ValueError(f"{path}: actions must be numbers of shape {expected}, "
                         f"got {actions.dtype} {actions.shape}")
    if not np.isfinite(actions).all():
        raise ValueError(f"{path}: actions hold NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(actions, np.float32))


def is_own_clip(path):
    """Whether --cond_from names one clip of the user's (a video file, an image, a folder of
    images) rather than a dataset (an HDF5 file, or a folder with train/ and test/)."""
    if os.path.isdir(path):
        return not any(os.path.isdir(os.path.join(path, s)) for s in ("train", "test"))
    return path.lower().endswith(VIDEO_EXTS + IMAGE_EXTS)


def own_frames(args, config, vq_config):
    """The first frames of the user's clip that the prior needs (its conditioning frames, or
    --context_frames to continue), preprocessed as training data is: (3, k, H, W)."""
    needed = max(config.n_cond_frames, args.context_frames)
    if not needed:
        raise ValueError(f"{args.cond_from}: this prior takes no frames; pass --context_frames K "
                         f"to continue the first K")
    clip = read_clip(args.cond_from, needed)                                  # (k, H, W, 3)
    if len(clip) < needed:
        raise ValueError(f"{args.cond_from}: {len(clip)} frame(s), but the prior needs "
                         f"{needed} to continue")
    return preprocess(clip, vq_config.resolution)                             # (3, k, R, R)


def conditioning(gpt, args, vq_config, device):
    """The prior's inputs for all n samples: dict(label (n,), frames (n, 3, k, H, W), actions
    (n, T, A)), None where unused; and the prediction context (n, 3, K, H, W) or None."""
    c = gpt.config
    labels = frames = actions = context = data = None
    if args.context_frames and args.cond_from is None:
        raise ValueError("--context_frames continues real clips: pass --cond_from DATA too")
    if args.cond_from is not None and is_own_clip(args.cond_from):
        video = own_frames(args, c, vq_config).to(device)                     # (3, k, H, W)
        video = video.expand(args.n, -1, -1, -1, -1)                          # (n, 3, k, H, W)
        frames = video[:, :, :c.n_cond_frames] if c.n_cond_frames else None
        context = video[:, :, :args.context_frames] if args.context_frames else None
    elif args.cond_from is not None:
        every = args.sample_every or trained_with(args.ckpt, "sample_every", 1)
        data = make_dataset(args.cond_from, vq_config.sequence_length, train=False,
                            resolution=vq_config.resolution, sample_every=every)
        # The first n test clips (cycled when there are fewer), each with a fixed window.
        items = [data[(i % len(data), i % len(data))] for i in range(args.n)]
        video = torch.stack([it["video"] for it in items]).to(device)          # (n, 3, T, H, W)
        frames = video[:, :, :c.n_cond_frames] if c.n_cond_frames else None
        K = args.context_frames
        context = video[:, :, :K] if K else None                               # (n, 3, K, H, W)
        if c.n_classes and "label" in items[0]:
            labels = torch.tensor([it["label"] for it in items], device=device)
        if c.action_dim and "actions" in items[0]:
            actions = torch.stack([it["actions"] for it in items]).to(device)  # (n, T, A)
    elif c.n_cond_frames:
        raise ValueError(f"{args.ckpt}: the prior is conditioned on {c.n_cond_frames} frame(s); "
                         f"pass --cond_from DATA to take them from a dataset's test clips")
    if c.action_dim:
        a_file = args.actions is not None and (args.actions.endswith(".npy")
                                               or os.path.exists(args.actions))
        if a_file:
            actions = load_actions(args.actions, args.n, c.sequence_length, c.action_dim)
            actions = actions.to(device)
        elif args.actions is not None:
            names = (load_checkpoint(args.ckpt).get("action_names")
                     or getattr(data, "action_names", None))
            lengths = (c.sequence_length, args.frames or c.sequence_length)
            actions = named_actions(args.actions, names, args.n, lengths, args.ckpt).to(device)
        elif actions is None:
            raise ValueError(f"{args.ckpt}: the prior is conditioned on actions; pass --actions "
                             f"FILE.npy ({c.sequence_length}, {c.action_dim}) or --cond_from DATA "
                             f"with actions")
    elif args.actions is not None:
        raise ValueError(f"{args.ckpt}: --actions given, but the prior is not action-conditional")
    if c.n_classes:
        if args.label is not None:
            if not 0 <= args.label < c.n_classes:
                raise ValueError(f"--label {args.label} is outside the prior's {c.n_classes} "
                                 f"classes")
            labels = torch.full((args.n,), args.label, device=device)
        elif labels is None:
            labels = torch.arange(args.n, device=device) % c.n_classes    # every class in turn
    elif args.label is not None:
        raise ValueError(f"{args.ckpt}: --label given, but the prior is not class-conditional")
    return dict(label=labels, frames=frames, actions=actions), context


def decoding_steps(args, gpt, frames_out):
    """How many codes the run draws one after the other: per batch, a window's codes plus s latent
    steps' for each further window of a long video, times the number of batches."""
    c = gpt.config
    per_step = math.prod(c.latent_shape[1:])                          # codes per latent time step
    t, steps_out = c.latent_shape[0], frames_out // (c.sequence_length // c.latent_shape[0])
    s = args.stride or max(1, t // 2)
    windows = max(0, math.ceil((steps_out - t) / s))
    return math.ceil(args.n / args.batch_size) * (c.seq_len + windows * s * per_step)


def check_length(args, vq_config):
    """--frames, --context_frames against the VQ-VAE's clip: one-line errors before any sampling."""
    T, stride = vq_config.sequence_length, vq_config.downsample[0]
    frames = args.frames or T
    if frames % stride or frames < T:
        raise ValueError(f"--frames {frames} must be a multiple of the VQ-VAE's temporal stride "
                         f"{stride} and at least the trained {T} frames")
    if args.context_frames and (args.context_frames % stride or args.context_frames >= T):
        raise ValueError(f"--context_frames {args.context_frames} must be a multiple of {stride} "
                         f"and fewer than the window's {T} frames")
    return frames


# -----------------------------------------------------------------------------
# The command

def run(args):
    ext = os.path.splitext(args.out)[1].lower()
    if ext not in WRITERS:
        raise ValueError(f"{args.out}: unknown output type '{ext}' (use .mp4, .gif or .png)")
    # Before minutes of sampling: the output's folder must be writable (it is made if missing),
    # and no other process may be writing the same output (the lock goes when this process does).
    check_writable(os.path.dirname(os.path.abspath(args.out)))
    with OutputLock(f"{args.out}.lock", "wait for it to finish or choose another --out"):
        sample_and_write(args, ext)


def sample_and_write(args, ext):
    """Load the prior, draw args.n videos, write them to args.out."""
    device = default_device(args.device)
    gpt, vq = (use_fast_attention(m) for m in load_gpt(args.ckpt, device=device))
    frames_out = check_length(args, vq.config)
    cond, context = conditioning(gpt, args, vq.config, device)
    given_actions = cond["actions"].shape[1] if gpt.config.action_dim else frames_out
    if given_actions < frames_out:
        # Actions for the frames beyond the data's window (or the file's): the last one, held.
        extra = cond["actions"][:, -1:].expand(-1, frames_out - given_actions, -1)
        cond["actions"] = torch.cat([cond["actions"], extra], dim=1)          # (n, frames_out, A)
    # Later windows of a frame-conditional prior take their first frames from the decoded context.
    frames_fn = (lambda codes: vq.decode(codes)) if gpt.config.n_cond_frames else None
    generator = torch.Generator(device).manual_seed(args.seed)
    compile = args.compile
    if compile is None:
        compile = compile_pays_off(decoding_steps(args, gpt, frames_out))

    # Sample codes batch by batch with the KV cache, decode them, put the given frames back.
    videos = []
    with torch.no_grad(), autocast(device, args.dtype):
        for start in range(0, args.n, args.batch_size):
            sl = slice(start, min(args.n, start + args.batch_size))
            # This batch's conditioning.
            part = {k: None if v is None else v[sl] for k, v in cond.items()}
            # Video prediction: the real frames' codes are the first latent steps, prefilled:
            # (n, K / the VQ-VAE's temporal stride, h, w).
            prefix = vq.encode(context[sl]) if context is not None else None
            codes = sample_long(gpt, sl.stop - sl.start, frames_out, args.stride, **part,
                                prefix=prefix, frames_fn=frames_fn, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, generator=generator,
                                progress=True, compile=compile)           # (n, t', h, w)
            # The whole latent video is decoded at once: the decoder's convolutions and attention
            # see neighbouring latent steps, so decoding window by window would leave seams.
            video = vq.decode(codes)                                      # (n, 3, T', H, W)
            # The real frames put back and framed in red: the longer of the prediction context
            # and the conditioning frames (both are the clip's first frames).
            real = [part["frames"], None if context is None else context[sl]]
            real = [f for f in real if f is not None]
            given = max(real, key=lambda f: f.shape[2]) if real else None
            videos.append(samples_to_uint8(video, given))                 # (n, T', H, W, 3)
            print(f"sampled {sl.stop}/{args.n}", flush=True)
    clips = np.concatenate(videos)                                        # (N, T, H, W, 3)

    # Write: a grid video (MP4, GIF) or a contact sheet (PNG, one sample per row).
    if ext == ".png":
        save_png(video_grid(clips), args.out)
    else:
        grid = grid_video(clips, ncol=math.ceil(math.sqrt(len(clips))))
        (save_mp4 if ext == ".mp4" else save_gif)(grid, args.out, fps=args.fps)
    print(args.out)


def main(argv=None):
    run_cli("sample.py", run, parse_args(argv))


if __name__ == "__main__":
    main()
