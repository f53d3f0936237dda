"""Make the weights that ship with the project from two finished runs of the README's own commands.

    python weights/make.py --vizdoom runs/doom_gpt/ckpt.pt --digits runs/gpt/ckpt.pt \
        --data vizdoom.h5
    python weights/make.py --reader          # the digit reader fvd.py digits reads with
    python weights/make.py --sharpen runs/doom_vq_sharp/ckpt.pt --data vizdoom.h5
                                             # vizdoom.pt with a decoder fine-tuned for texture

weights/vizdoom.pt is the ViZDoom block's action-conditional prior, weights/digits.pt the Quick
start's prior; each carries its VQ-VAE, as every prior checkpoint of ours does. A shipped file keeps
what loading and sampling need (config, weights, action names, the training flags and step) and
drops what resuming needs (optimizer, scaler, random streams, curves); its floating-point weights
are stored in half precision, and load as float32 (load_state_dict copies them into float32
parameters). The ViZDoom file also keeps a start for play.py: the codes and actions of the opening
frames of one test clip, so that play starts from the real game with no data file at hand.

weights/record.json says how they were made (the commands, the seed, the commit) and what they
score, before and after half precision: steering (fvd.py steer) and long play (fvd.py dream) for
ViZDoom, digit legibility (fvd.py digits) for the digits. weights/digit_reader.pt is the network
fvd.py digits reads frames with: shipped, it spares every user its 90 s of training.
"""

import argparse
import json
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from checkpoints import atomic_write, load_checkpoint  # noqa: E402  (after the project is on the path)
from gpt import load_gpt  # noqa: E402
from data import moving_digits  # noqa: E402
from metrics import (READER_STEPS, digits_main, dream_main, legibility, load_digit_reader,  # noqa: E402
                     sha256, steer_main, train_digit_reader)
from world import clip_start  # noqa: E402
from run import CODING  # noqa: E402

# What a shipped file keeps of a run's checkpoint.
KEEP = ("stage", "config", "model", "vqvae", "step", "train_args", "action_names")

COMMANDS = {
    "vizdoom.pt": ["python -m prepare vizdoom vizdoom.h5",
                   "python train.py --stage vqvae --data vizdoom.h5 --preset cpu --out_dir "
                   "runs/doom_vq",
                   "python train.py --stage gpt --data vizdoom.h5 --preset cpu --vqvae "
                   "runs/doom_vq/ckpt.pt --action_cond norms --out_dir runs/doom_gpt"],
    "digits.pt": ["python train.py --stage vqvae --out_dir runs/vqvae",
                  "python train.py --stage gpt --vqvae runs/vqvae/ckpt.pt --out_dir runs/gpt"],
}


# How weights/vizdoom.pt's decoder was sharpened after the run (docs/vizdoom.md): its VQ-VAE's
# decoder fine-tuned with the texture term, the codes kept; the prior is the run's.
SHARPEN = ["python train.py --stage vqvae --data vizdoom.h5 --preset cpu --init_from "
           "weights/vizdoom.pt --decoder_only --texture_weight 1 --max_steps 500 --out_dir "
           "runs/doom_vq_sharp",
           "python weights/make.py --sharpen runs/doom_vq_sharp/ckpt.pt --data vizdoom.h5"]


def half(state):
    """A state dict with its floating-point tensors in float16 (integers and flags as they are)."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def shipped(ckpt, start=None):
    """The shipped form of a run's prior checkpoint."""
    out = {k: ckpt[k] for k in KEEP if k in ckpt}
    out["model"] = half(ckpt["model"])
    out["vqvae"] = dict(config=ckpt["vqvae"]["config"], model=half(ckpt["vqvae"]["model"]))
    if start is not None:
        out["play_start"] = start
    return out


def play_start(run, data, clip):
    """The codes (int16 (t, h, w)) and actions (int8 (T,)) of test clip `clip`'s first window."""
    gpt, vq = load_gpt(run)
    names = load_checkpoint(run)["action_names"]
    found = clip_start(data, clip, vq.config, names)
    # (3, T, H, W)
    video = torch.from_numpy(found["frames"]).permute(3, 0, 1, 2).float() / 255 - 0.5
    with torch.no_grad():
        codes = vq.encode(video[None])[0]  # (t, h, w)
    return dict(codes=codes.to(torch.int16),
                actions=torch.tensor([names.index(a) for a in found["actions"]],
                                                                 dtype=torch.int8), clip=clip)


def scores(kind, path, data, n, clip):
    """The scores of one file: steering and long play for ViZDoom, legibility for the digits."""
    if kind == "vizdoom.pt":
        steer = steer_main(["--ckpt", path, "--data", data, "--n", str(n)])
        # played blind, the session the record was made with (docs/play.md: a person who looks
        # ahead does better)
        dream = dream_main(["--ckpt", path, "--data", data, "--frames", "300", "--start", data,
                            "--clip", str(clip), "--player", "blind"])
        kept = ("turned_as_told", "turns", "in_real_range", "in_reconstructions_range", "froze",
                "longest_still", "stretches_keeping_their_look", "drift_mean")
        return dict(steer=steer, long_play_300={k: dream[k] for k in kept})
    return dict(digits=digits_main(["--ckpt", path, "--n", str(n)]))


def sharpen(vq_run, data, n, clip, out_dir):
    """--sharpen: weights/vizdoom.pt again, its VQ-VAE's decoder replaced by a decoder fine-tune of
    it (train.py --decoder_only --texture_weight, from weights/vizdoom.pt). The encoder and the
    codebook must be the shipped ones, weight for weight, so that every clip keeps its codes and
    the prior still holds; the record keeps the scores before and adds those after."""
    out = os.path.join(out_dir, "vizdoom.pt")
    ckpt, tuned = load_checkpoint(out), load_checkpoint(vq_run)
    if tuned.get("stage") != "vqvae" or tuned.get("config") != ckpt["vqvae"]["config"]:
        raise SystemExit(f"{vq_run}: not a VQ-VAE of {out}'s shape")
    coding = tuple(f"{name}." for name in CODING)   # the encoder's side: run.DecoderOnly's
    for k, v in ckpt["vqvae"]["model"].items():
        if k.startswith(coding) and not torch.equal(tuned["model"][k].to(v.dtype), v):
            raise SystemExit(f"{vq_run}: its {k} is not {out}'s: only the decoder may change")
    ckpt["vqvae"]["model"] = half(tuned["model"])
    atomic_write(out, lambda f: torch.save(ckpt, f))
    path = os.path.join(out_dir, "record.json")
    record = json.load(open(path))
    entry = record["files"]["vizdoom.pt"]
    entry["scores"]["before_sharpening"] = entry["scores"].pop("shipped")
    entry["commands"] = COMMANDS["vizdoom.pt"] + SHARPEN
    entry.update(sharpened_at=git_commit(HERE), bytes=os.path.getsize(out), sha256=sha256(out),
                 scores=dict(entry["scores"], shipped=scores("vizdoom.pt", out, data, n, clip)))
    atomic_write(path, lambda f: json.dump(record, f, indent=1, default=float), binary=False)
    print(f"{out}: {os.path.getsize(out) / 1e6:.1f} MB, its decoder from {vq_run}", flush=True)


def git_commit(folder):
    """The commit checked out in `folder`, or None outside a clone."""
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True,
                          text=True).stdout.strip() or None


def make_reader(out_dir, n):
    """weights/digit_reader.pt: the digit reader `fvd.py digits` reads with (train_digit_reader,
    seed 0), in half precision, and its entry in record.json: its legibility of n real test clips
    in float32 and as shipped."""
    reader = train_digit_reader(seed=0)
    out = os.path.join(out_dir, "digit_reader.pt")
    atomic_write(out, lambda f: torch.save(half(reader.state_dict()), f))
    real = moving_digits(n, frames=8, resolution=32, seed=0, train=False)
    shipped = load_digit_reader(out)            # the half-precision file, loaded as float32
    scores = dict(float32=legibility(reader, real), shipped=legibility(shipped, real))
    path = os.path.join(out_dir, "record.json")
    record = json.load(open(path)) if os.path.isfile(path) else dict(seed=0, files={})
    record["files"]["digit_reader.pt"] = dict(
        commands=["python weights/make.py --reader"], commit=git_commit(HERE), seed=0,
        steps=READER_STEPS, bytes=os.path.getsize(out), sha256=sha256(out), dtype="float16",
        torch=torch.__version__, scores=dict(real_test_clips=scores))
    atomic_write(path, lambda f: json.dump(record, f, indent=1, default=float), binary=False)
    print(f"{out}: {os.path.getsize(out) / 1e6:.1f} MB; real clips read: {scores}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description="Make weights/vizdoom.pt and weights/digits.pt from "
                                            "finished runs, or (--reader) the digit reader.")
    p.add_argument("--reader", action="store_true",
                   help="make weights/digit_reader.pt alone (trained here, about 90 s) and add it "
                        "to record.json")
    p.add_argument("--vizdoom", help="the ViZDoom block's prior: runs/doom_gpt/ckpt.pt")
    p.add_argument("--digits", help="the Quick start's prior: runs/gpt/ckpt.pt")
    p.add_argument("--data", help="vizdoom.h5: the start clip, and the scores' real clips")
    p.add_argument("--clip", type=int, default=0,
                   help="the test clip whose opening frames play starts from")
    p.add_argument("--n", type=int, default=128, help="clips per score")
    p.add_argument("--out_dir", default=HERE, help="where the files go (default: this folder)")
    p.add_argument("--sharpen", metavar="VQVAE",
                   help="give the shipped vizdoom.pt this VQ-VAE: a decoder fine-tune of its own "
                        "(train.py --decoder_only); needs --data")
    args = p.parse_args(argv)
    if args.sharpen:
        if not args.data:
            p.error("--sharpen needs --data (vizdoom.h5, for the scores)")
        return sharpen(args.sharpen, args.data, args.n, args.clip, args.out_dir)
    if args.reader:
        return make_reader(args.out_dir, args.n)
    if not (args.vizdoom and args.digits and args.data):
        p.error("--vizdoom, --digits and --data are needed (or --reader alone)")
    commit = git_commit(os.path.dirname(os.path.abspath(args.vizdoom)))
    record = dict(commit=commit, seed=0, torch=torch.__version__, files={})
    for kind, run in (("vizdoom.pt", args.vizdoom), ("digits.pt", args.digits)):
        ckpt = load_checkpoint(run)
        start = play_start(run, args.data, args.clip) if kind == "vizdoom.pt" else None
        out = os.path.join(args.out_dir, kind)
        atomic_write(out, lambda f: torch.save(shipped(ckpt, start), f))
        record["files"][kind] = dict(
            commands=COMMANDS[kind], step=ckpt.get("step"), bytes=os.path.getsize(out),
            sha256=sha256(out), seed=ckpt.get("train_args", {}).get("seed"), dtype="float16",
            scores=dict(float32_run=scores(kind, run, args.data, args.n, args.clip),
                        shipped=scores(kind, out, args.data, args.n, args.clip)))
        print(f"{out}: {os.path.getsize(out) / 1e6:.1f} MB", flush=True)
    atomic_write(os.path.join(args.out_dir, "record.json"),
                 lambda f: json.dump(record, f, indent=1, default=float),
                 binary=False)
    print(json.dumps({k: v["bytes"] for k, v in record["files"].items()}))


if __name__ == "__main__":
    main()
