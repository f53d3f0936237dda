"""The weights that ship with the project (weights/): small half-precision checkpoints that every
command loads, made as weights/record.json says, and still good: the ViZDoom prior turns as told,
and the digits read as digits.

python -m pytest tests/test_weights.py
"""

import json
import os

import numpy as np
import torch

from conftest import ROOT
from checkpoints import load_checkpoint
from fast import generate, use_fast_attention
from gpt import load_gpt
from metrics import legibility, sha256, view_slides
from data import moving_digits
from data import samples_to_uint8
from world import load_world, named_actions, start_world

WEIGHTS = os.path.join(ROOT, "weights")
FILES = ("vizdoom.pt", "digits.pt")


def test_they_are_small_half_precision_checkpoints_made_as_their_record_says():
    assert sum(os.path.getsize(os.path.join(WEIGHTS, f)) for f in FILES) <= 15 * 2**20
    record = json.load(open(os.path.join(WEIGHTS, "record.json")))
    assert len(record["commit"]) == 40 and record["seed"] == 0
    for name in FILES:
        path = os.path.join(WEIGHTS, name)
        entry = record["files"][name]
        assert entry["sha256"] == sha256(path) and entry["bytes"] == os.path.getsize(path)
        assert all(c.startswith(("python train.py", "python -m prepare", "python weights/make.py"))
                   for c in entry["commands"])
        ckpt = load_checkpoint(path)
        assert "optimizer" not in ckpt and ckpt["stage"] == "gpt"
        tensors = (*ckpt["model"].values(), *ckpt["vqvae"]["model"].values())
        floats = [v for v in tensors if v.is_floating_point()]
        assert floats and all(v.dtype == torch.float16 for v in floats)
        gpt, vq = load_gpt(path)                         # loaded as float32, as every command does
        assert gpt.fc_in.weight.dtype == torch.float32
        assert vq.codebook.embeddings.dtype == torch.float32
        # Half precision kept the scores (measured on 128 clips when they were made).
        scores = entry["scores"]
        if name == "vizdoom.pt":
            for key in ("told TURN_LEFT", "told TURN_RIGHT", "samples"):
                assert scores["shipped"]["steer"][key]["turned_as_told"] >= 0.95
        else:
            assert abs(scores["shipped"]["digits"]["samples"]["clips_kept"]
                       - scores["float32_run"]["digits"]["samples"]["clips_kept"]) <= 0.03


def test_the_shipped_digit_reader_is_made_as_its_record_says_and_training_it_is_seeded():
    """weights/digit_reader.pt: half precision, its hash in the record, what fvd.py digits loads
    when --reader is left out; and train_digit_reader, which made it, gives the same weights for a
    seed and other weights for another."""
    from metrics import SHIPPED_READER, default_reader_path, train_digit_reader
    entry = json.load(open(os.path.join(WEIGHTS, "record.json")))["files"]["digit_reader.pt"]
    assert entry["sha256"] == sha256(SHIPPED_READER) and entry["commands"] == [
        "python weights/make.py --reader"]
    state = torch.load(SHIPPED_READER, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    assert default_reader_path() == SHIPPED_READER
    scores = entry["scores"]["real_test_clips"]   # half precision read as float32 did
    assert abs(scores["shipped"]["frames_read"] - scores["float32"]["frames_read"]) <= 0.01
    a, b, c = (train_digit_reader(steps=2, batch_size=4, seed=s, progress=False).state_dict()
               for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["head.1.weight"],
                                                                         c["head.1.weight"])


def test_the_shipped_vizdoom_prior_turns_as_told():
    """Three samples told TURN_LEFT all the way slide right, three told TURN_RIGHT slide left; and
    in play, from the start stored with the weights, holding a turn turns the view."""
    gpt, vq = (use_fast_attention(m) for m in load_gpt(os.path.join(WEIGHTS, "vizdoom.pt")))
    names = load_checkpoint(os.path.join(WEIGHTS, "vizdoom.pt"))["action_names"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, sign in (("TURN_LEFT", 1), ("TURN_RIGHT", -1)):
            actions = named_actions(f"{name}*16", names, 3, (16,), "weights")
            codes = generate(gpt, 3, actions=actions, generator=g)
            slides = view_slides(samples_to_uint8(vq.decode(codes)))                       # (3, 15)
            assert (sign * slides.sum(1) > 0).all(), (name, slides.sum(1))
    world, names, start = load_world(os.path.join(WEIGHTS, "vizdoom.pt"))
    assert start["codes"].shape == (8, 8, 8) and len(start["actions"]) == 16
    for name, sign in (("TURN_LEFT", 1), ("TURN_RIGHT", -1)):
        frames = np.concatenate([start_world(world, start)[-1:]]
                                + [world.step(name) for _ in range(6)])
        assert sign * view_slides(frames[None]).sum() > 0, name


def test_the_shipped_digits_prior_reads_as_digits(digit_reader, tmp_path):
    """Its samples are about as legible as real clips to the shipped reader, as the Quick start's
    own run is; and sample.py writes them in a fresh clone, with no training."""
    gpt, vq = (use_fast_attention(m) for m in load_gpt(os.path.join(WEIGHTS, "digits.pt")))
    with torch.no_grad():
        codes = generate(gpt, 32, generator=torch.Generator().manual_seed(0))
        fake = samples_to_uint8(vq.decode(codes))
    real = moving_digits(32, frames=8, resolution=32, seed=0, train=False)
    ours, theirs = legibility(digit_reader, fake), legibility(digit_reader, real)
    assert all(ours[k] >= 0.7 * theirs[k] > 0 for k in ("frames_read", "clips_kept")), (
        ours, theirs)
    import sample
    sample.main(["--ckpt", os.path.join(WEIGHTS, "digits.pt"), "--n", "2",
                 "--out", str(tmp_path / "samples.gif")])
    assert os.path.getsize(tmp_path / "samples.gif") > 0
