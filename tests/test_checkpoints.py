"""Checkpoints: ours, the original VideoGPT release's, and refusing unsafe ones.

python -m pytest tests/test_checkpoints.py
"""

import os
import sys
from collections import OrderedDict

import pytest
import torch

from conftest import ROOT, Exploit
from originals import ORIGINAL_ARGS, original_state_dict, save_like_lightning
from reference_videogpt import reference_decode, reference_encode, reference_latents
from vqvae import VQVAE, VQVAEConfig, load_vqvae


def test_original_checkpoint_matches_reference_arithmetic(tmp_path):
    path = tmp_path / "bair_stride4x2x2.ckpt"
    sd = original_state_dict()
    torch.manual_seed(1)
    x = torch.rand(2, 3, 8, 32, 32) - 0.5
    # Codes drawn from this input's own latents, as a trained codebook would be, so many get used.
    z = reference_latents(sd, x, ORIGINAL_ARGS["downsample"], ORIGINAL_ARGS["n_res_layers"])
    flat = z.movedim(1, -1).reshape(-1, z.shape[1])
    picked = flat[torch.randperm(len(flat))[:64]]                      # (64, D)
    sd["codebook.embeddings"] = picked + 0.01 * torch.randn(64, z.shape[1])
    save_like_lightning(path, sd, ORIGINAL_ARGS)
    assert b"cuda:0" in open(path, "rb").read()          # tensors really are tagged as GPU tensors
    assert "pytorch_lightning" not in sys.modules
    vq = load_vqvae(path)
    assert not vq.training and vq.config.latent_shape == (4, 8, 8)
    codes = vq.encode(x)
    ref_codes = reference_encode(sd, x, ORIGINAL_ARGS["downsample"], ORIGINAL_ARGS["n_res_layers"])
    assert torch.equal(codes, ref_codes)
    assert len(codes.unique()) > 20              # a meaningful comparison, not one code everywhere
    recon = vq.decode(codes)
    ref_recon = reference_decode(sd, codes, ORIGINAL_ARGS["downsample"],
                                 ORIGINAL_ARGS["n_res_layers"])
    torch.testing.assert_close(recon, ref_recon, atol=1e-5, rtol=1e-5)
    # Training from a loaded checkpoint continues its codebook instead of re-initialising it.
    assert bool(vq.codebook.initialized)


def test_our_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    config = VQVAEConfig(embedding_dim=8, n_codes=16, n_hiddens=16, n_res_layers=1,
                         downsample=(2, 4, 4), sequence_length=8, resolution=16)
    model = VQVAE(config)
    # One training forward: the codebook initialised, its moving averages moved.
    model(torch.rand(2, 3, 8, 16, 16) - 0.5)
    model.eval()
    torch.save(dict(stage="vqvae", config=config.to_dict(), model=model.state_dict(), step=1),
               tmp_path / "ckpt.pt")
    loaded = load_vqvae(tmp_path / "ckpt.pt")
    assert loaded.config == config
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x = torch.rand(1, 3, 8, 16, 16) - 0.5
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert torch.equal(loaded.decode(model.encode(x)), model.decode(model.encode(x)))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    target = tmp_path / "owned.txt"
    torch.save({"stage": "vqvae", "model": Exploit(target)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt: refused to load"):
        load_vqvae(tmp_path / "evil.pt")
    assert not target.exists()


def test_wrong_stage_unknown_format_truncated_and_missing(tmp_path):
    # An original prior checkpoint holds vqvae.* keys: not a VQ-VAE checkpoint.
    prior = OrderedDict(("vqvae." + k, v) for k, v in original_state_dict().items())
    save_like_lightning(tmp_path / "bair_gpt.ckpt", prior, dict(ORIGINAL_ARGS, hidden_dim=60))
    with pytest.raises(ValueError, match="bair_gpt.ckpt: is a 'gpt' checkpoint, not a VQ-VAE one"):
        load_vqvae(tmp_path / "bair_gpt.ckpt")
    torch.save(dict(stage="gpt", config={}, model={}), tmp_path / "ours_gpt.pt")
    with pytest.raises(ValueError, match="is a 'gpt' checkpoint"):
        load_vqvae(tmp_path / "ours_gpt.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: unknown checkpoint format"):
        load_vqvae(tmp_path / "other.pt")
    good = tmp_path / "good.pt"
    torch.save(dict(stage="vqvae", config={}, model=original_state_dict()), good)
    data = open(good, "rb").read()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pt: not a readable PyTorch checkpoint"):
        load_vqvae(tmp_path / "cut.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt: no such checkpoint file"):
        load_vqvae(tmp_path / "nope.pt")


def hold_lock(path):
    """Another process holding OutputLock(path) (locks belong to processes); returns it once the
    lock is taken."""
    import subprocess
    code = (f"import sys, time; sys.path.insert(0, {ROOT!r}); from checkpoints import OutputLock; "
            f"lock = OutputLock({path!r}, '').acquire(); print('held', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_output_lock_admits_one_holder_names_it_and_dies_with_its_process(tmp_path):
    import socket
    from checkpoints import OutputInUse, OutputLock
    path = str(tmp_path / "out.lock")
    child = hold_lock(path)
    with pytest.raises(OutputInUse) as e:
        OutputLock(path, "try later").acquire()
    assert e.value.filename == path
    assert e.value.strerror == f"in use by pid {child.pid} on {socket.gethostname()}; try later"
    # Killed: the kernel drops the lock with the process; nothing stale blocks the next holder.
    child.kill()
    child.wait()
    with OutputLock(path, ""):
        assert open(path).read() == f"pid {os.getpid()} on {socket.gethostname()}"
    assert not os.path.exists(path)                              # released: the file is gone


def test_sample_py_refuses_an_output_another_process_is_writing(tmp_path):
    import sample
    out = str(tmp_path / "s.gif")
    child = hold_lock(out + ".lock")
    try:
        with pytest.raises(SystemExit) as e:
            sample.main(["--ckpt", str(tmp_path / "any.pt"), "--out", out])
    finally:
        child.kill()
        child.wait()
    assert str(e.value.code).startswith(
        f"sample.py: error: {out}.lock: in use by pid {child.pid} on ")
    assert str(e.value.code).endswith("; wait for it to finish or choose another --out")
