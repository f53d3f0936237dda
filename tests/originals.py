"""Builders of files in the original VideoGPT release's format, from its state-dict key listings."""

import argparse
import math
import os
import sys
import types
from collections import OrderedDict

import torch

DATA = os.path.join(os.path.dirname(__file__), "data")
KEYS = os.path.join(DATA, "videogpt_vqvae_keys.txt")
PRIOR_KEYS = {"uncond": os.path.join(DATA, "videogpt_gpt_uncond_keys.txt"),
              "cond": os.path.join(DATA, "videogpt_gpt_cond_keys.txt")}
# The configuration that the key listing was taken from.
ORIGINAL_ARGS = dict(embedding_dim=32, n_codes=64, n_hiddens=32, n_res_layers=2,
                     downsample=[2, 4, 4], sequence_length=8, resolution=32)


def original_state_dict(seed=0, keys=KEYS):
    """Random weights of plausible scale under every key and shape of an original listing."""
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    for line in open(keys):
        if line.startswith("#") or not line.strip():
            continue
        name, shape, dtype = line.split()
        shape = [int(s) for s in shape.strip("[]").split(",") if s]
        if dtype == "int64":
            sd[name] = torch.tensor(1000)
        elif name.endswith("running_var") or name.endswith("codebook.N"):
            sd[name] = torch.rand(shape, generator=g) + 0.5
        elif name.endswith("running_mean") or name.endswith(".bias"):
            sd[name] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:   # BatchNorm gains
            sd[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith(".mask"):        # the original's stored causal masks
            sd[name] = torch.ones(shape).tril()
        elif "codebook" in name or ".emb." in name or name.endswith(".sos"):
            sd[name] = torch.randn(shape, generator=g)
        else:                   # conv / linear weights, fan-in scaled
            fan_in = math.prod(shape[1:])
            sd[name] = torch.randn(shape, generator=g) / fan_in ** 0.5
    return sd


def save_like_lightning(path, state_dict, args, device_tag="cuda:0"):
    """Write a file shaped like a PyTorch Lightning 1.3.3 checkpoint of the original code.

    Its `callbacks` dict is keyed by the class pytorch_lightning...ModelCheckpoint
    (faked here for the duration of the save), its hyper-parameters are an
    argparse.Namespace, and its tensors are tagged as saved on `device_tag`.
    """
    names = ["pytorch_lightning", "pytorch_lightning.callbacks",
             "pytorch_lightning.callbacks.model_checkpoint"]
    fake = {n: types.ModuleType(n) for n in names}
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": names[-1]})
    fake[names[-1]].ModelCheckpoint = ModelCheckpoint
    ckpt = {
        "epoch": 12, "global_step": 20000, "pytorch-lightning_version": "1.3.3",
        "state_dict": state_dict,
        "callbacks": {ModelCheckpoint: {"monitor": "val/recon_loss",
                                        "best_model_score": torch.tensor(0.12),
                                        "best_model_path": "/home/someone/ckpt.ckpt",
                                        "current_score": torch.tensor(0.13),
                                        "dirpath": "/home/someone"}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 7e-4, "betas": (0.9, 0.999),
                                                             "params": []}]}],
        "lr_schedulers": [],
        "hparams_name": "args",
        "hyper_parameters": {"args": argparse.Namespace(**args, data_path="/data/bair.hdf5",
                                                        batch_size=32, gpus=2)},
    }
    saved_tag = torch.serialization.location_tag
    sys.modules.update(fake)
    torch.serialization.location_tag = lambda storage: device_tag
    try:
        torch.save(ckpt, path)
    finally:
        torch.serialization.location_tag = saved_tag
        for n in names:
            del sys.modules[n]
