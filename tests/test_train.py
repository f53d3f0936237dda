"""train.py end to end: steps, exact resume, clear errors, two processes under torchrun.

python -m pytest tests/test_train.py
"""

import os

import h5py
import numpy as np
import pytest
import torch

from conftest import TINY, run_script, train_error, train_records

def test_train_writes_checkpoint_pictures_and_resumes_exactly(tmp_path, digits_h5):
    import train
    from vqvae import load_vqvae
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    model = train.train(train.parse_args(TINY + ["--data", digits_h5, "--out_dir", straight, "--max_steps", "6"]))
    for name in ("ckpt.pt", "log.jsonl", "loss.png", "recon_0000002.png", "recon_0000006.png"):
        assert os.path.exists(os.path.join(straight, name)), name
    ckpt = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)
    assert ckpt["stage"] == "vqvae" and ckpt["step"] == 6 and ckpt["train_args"]["max_steps"] == 6
    assert set(ckpt) >= {"config", "model", "optimizer", "scaler", "train_args"}
    assert bool(ckpt["model"]["codebook.initialized"])
    # The saved model is the trained one, and load_vqvae reads it.
    vq = load_vqvae(os.path.join(straight, "ckpt.pt"))
    assert all(torch.equal(v, vq.state_dict()[k]) for k, v in model.state_dict().items())
    # Stop after 4 steps, start again with a higher --max_steps: the same run as going straight to 6.
    train.train(train.parse_args(TINY + ["--data", digits_h5, "--out_dir", resumed, "--max_steps", "4"]))
    train.train(train.parse_args(TINY + ["--data", digits_h5, "--out_dir", resumed, "--max_steps", "6"]))
    a, b = train_records(straight), train_records(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6), ra["step"]
    final = torch.load(os.path.join(resumed, "ckpt.pt"), weights_only=True)["model"]
    for k, v in ckpt["model"].items():
        torch.testing.assert_close(final[k], v, atol=1e-6, rtol=0, msg=k)
    # Training moved the loss.
    assert a[-1]["recon_loss"] < a[0]["recon_loss"]


def test_bad_input_gives_one_line_errors_and_loses_nothing(tmp_path, digits_h5):
    out = str(tmp_path / "run")
    # The real command: one line on stderr, exit status 1, no traceback.
    r = run_script("train.py", *TINY, "--data", str(tmp_path / "missing.h5"), "--out_dir", out, "--max_steps", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"train.py: error: {tmp_path / 'missing.h5'}: no such file or folder"
    # The same path in this process, for the other cases.
    with h5py.File(tmp_path / "nokeys.h5", "w") as f:
        f.create_dataset("videos", data=np.zeros((2, 4, 4, 3), np.uint8))
    cases = [
        (["--data", str(tmp_path / "nokeys.h5")], "nokeys.h5: missing HDF5 key(s) train_data, train_idx"),
        (["--data", digits_h5, "--sequence_length", "8"],
         "all 6 train videos are shorter than sequence_length=8 (the longest has 6 frames)"),
        (["--data", digits_h5, "--downsample", "8", "4", "4"],
         "downsample (8, 4, 4) does not divide the input: sequence_length=4 is not a multiple of 8"),
    ]
    for extra, message in cases:
        assert message in train_error(*TINY, "--out_dir", out, "--max_steps", "1", *extra)
    # A checkpoint of another stage in --out_dir is refused and left as it was.
    os.makedirs(out, exist_ok=True)
    torch.save(dict(stage="gpt", config={}, model={}), os.path.join(out, "ckpt.pt"))
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    message = train_error(*TINY, "--data", digits_h5, "--out_dir", out, "--max_steps", "1")
    assert "is a 'gpt' checkpoint but --stage is 'vqvae'" in message
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before


def test_two_gloo_processes_agree_see_different_data_and_only_rank0_writes(tmp_path, digits_h5):
    gathered = tmp_path / "ranks.pt"
    r = run_script("-m torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   os.path.join("tests", "ddp_worker.py"), gathered, *TINY, "--data", digits_h5,
                   "--out_dir", tmp_path / "ddp", "--max_steps", "3", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = torch.load(gathered, weights_only=True)
    assert torch.equal(ranks["codebooks"][0], ranks["codebooks"][1])
    assert torch.equal(ranks["states"][0], ranks["states"][1])
    assert (tmp_path / "ddp" / "ckpt.pt").exists()
    # The codebook really trained: it is no longer its random initialisation.
    assert bool(torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)["model"]["codebook.initialized"])
    # Each rank saw its own clips: at every step the two batches differ, and over an epoch (3 steps
    # of 2 clips on each of 2 ranks covers 6 train videos twice) they share the dataset between them.
    items = ranks["items"]
    assert len(items[0]) == len(items[1]) == 3 * 2
    first_epoch = [i for i, _ in items[0][:3]] + [i for i, _ in items[1][:3]]
    assert sorted(first_epoch) == list(range(6))
    assert not {s for _, s in items[0]} & {s for _, s in items[1]}          # no window seed repeats across ranks
    # Rank 0 wrote the checkpoint, log and pictures; rank 1 wrote nothing at all under out_dir.
    assert ranks["writes"][1] == []
    written = {os.path.basename(p) for _, p in ranks["writes"][0]}
    assert {"ckpt.pt", "log.jsonl", "loss.png"} <= written


def test_learning_rate_schedule_by_hand(tmp_path, digits_h5):
    import math

    import train
    lr = lambda step, **kw: train.get_lr(step, train.parse_args(TINY + ["--out_dir", "x", "--lr", "1e-3"] + [
        a for k, v in kw.items() for a in (f"--{k}", str(v))]))
    # Warm-up of 10 steps, then cosine to zero at step 110: step 0 already trains, at lr / 10.
    cos = dict(warmup_steps=10, max_steps=110, lr_schedule="cosine")
    assert lr(0, **cos) == pytest.approx(1e-4, rel=1e-12)
    assert lr(4, **cos) == pytest.approx(5e-4, rel=1e-12)
    assert lr(9, **cos) == pytest.approx(1e-3, rel=1e-12)           # the last warm-up step reaches the peak
    assert lr(10, **cos) == pytest.approx(1e-3, rel=1e-12)          # the cosine starts at the peak
    assert lr(35, **cos) == pytest.approx(1e-3 * 0.5 * (1 + math.sqrt(0.5)), rel=1e-12)   # a quarter of the way
    assert lr(60, **cos) == pytest.approx(5e-4, rel=1e-12)          # half way
    assert lr(109, **cos) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.99)), rel=1e-9)  # the last step
    assert lr(110, **cos) == 0.0 and lr(500, **cos) == 0.0
    # Constant: the peak from step 0 without warm-up, after it with one.
    assert lr(0, warmup_steps=0, lr_schedule="constant") == lr(10**6, warmup_steps=0, lr_schedule="constant") == 1e-3
    assert lr(3, warmup_steps=10, lr_schedule="constant") == pytest.approx(4e-4, rel=1e-12)
    assert lr(10, warmup_steps=10, lr_schedule="constant") == 1e-3
    # The optimizer really steps with it: the logged lr of step s is the one of step index s - 1.
    out = str(tmp_path / "warm")
    train.train(train.parse_args(TINY + ["--data", digits_h5, "--out_dir", out, "--max_steps", "3", "--lr", "1e-3",
                                         "--warmup_steps", "4", "--eval_interval", "10"]))
    assert [r["lr"] for r in train_records(out)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4], rel=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_optimizer_steps_with_unscaled_clipped_gradients(tmp_path, digits_h5, monkeypatch, dtype):
    """--gradient_clip_val c: Adam sees gradients of norm min(true norm, c); the log reports the true norm."""
    import train
    seen = []
    step = torch.optim.Adam.step

    def spying_step(self, *a, **kw):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        return step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", spying_step)
    out = str(tmp_path / "clip")
    train.train(train.parse_args(TINY + ["--data", digits_h5, "--out_dir", out, "--max_steps", "24", "--dtype", dtype,
                                         "--gradient_clip_val", "0.5", "--eval_interval", "100"]))
    norms = [r["grad_norm"] for r in train_records(out) if "grad_norm" in r]   # float16: overflow steps have none
    assert len(seen) == len(norms) >= 4 and max(norms) > 0.5
    assert seen == pytest.approx([min(n, 0.5) for n in norms], rel=1e-3)


def test_presets_fill_only_what_the_flags_leave_out():
    import train
    digits = train.parse_args(["--stage", "gpt", "--out_dir", "x"])
    assert (digits.cache_codes, digits.dtype, digits.hidden_dim) == (True, "bfloat16", 120)
    assert train.parse_args(["--stage", "gpt", "--out_dir", "x", "--n_cond_frames", "1"]).cache_codes is False
    assert train.parse_args(["--stage", "gpt", "--out_dir", "x", "--no-cache_codes"]).cache_codes is False
    paper = train.parse_args(["--stage", "gpt", "--out_dir", "x", "--data", "bair.h5"])
    assert (paper.cache_codes, paper.dtype, paper.hidden_dim, paper.lr) == (False, "float32", 576, 3e-4)
    vq = train.parse_args(["--stage", "vqvae", "--out_dir", "x", "--dtype", "float16", "--lr", "1e-3"])
    assert (vq.dtype, vq.lr, vq.max_steps, vq.n_codes, vq.local_encoder) == ("float16", 1e-3, 3500, 256, True)
    paper_vq = train.parse_args(["--stage", "vqvae", "--out_dir", "x", "--data", "d.h5"])
    assert paper_vq.local_encoder is False   # the paper's encoder unless asked
    assert train.parse_args(["--stage", "vqvae", "--out_dir", "x", "--no-local_encoder"]).local_encoder is False
    assert train.parse_args(["--stage", "vqvae", "--out_dir", "x", "--n_res_layers", "1"]).local_encoder is False


def test_cached_codes_load_in_the_training_process_and_clips_in_workers():
    from types import SimpleNamespace

    import train
    from data import MovingDigitsDataset
    run = SimpleNamespace(args=train.parse_args(["--stage", "gpt", "--out_dir", "x"]), state=SimpleNamespace(step=0),
                          dist=SimpleNamespace(rank=0, world=1), device=torch.device("cpu"))
    assert run.args.num_workers is None
    codes = train.CodesDataset(torch.zeros(4, 2, 2, 2, dtype=torch.int16))
    clips = MovingDigitsDataset(4, sequence_length=4, resolution=16)
    assert train.Run.train_loader(run, codes).num_workers == 0
    assert train.Run.train_loader(run, clips).num_workers == max(1, min(4, (os.cpu_count() or 2) // 2))
    run.args.num_workers = 2                                     # a given count is kept for both
    assert train.Run.train_loader(run, codes).num_workers == 2
