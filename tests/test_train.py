"""train.py end to end: steps, exact resume, clear errors, two processes under torchrun.

python -m pytest tests/test_train.py
"""

import io
import os

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import muon
import run as run_module
from conftest import TINY, run_script, train_error, train_records

def test_train_writes_checkpoint_pictures_and_resumes_exactly(tmp_path, digits_h5):
    import train
    from vqvae import load_vqvae
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    model = train.train(train.parse_args(TINY + ["--data", digits_h5, "--out_dir", straight,
                                                 "--max_steps", "6"]))
    for name in ("ckpt.pt", "log.jsonl", "loss.png", "recon_0000002.png", "recon_0000006.png"):
        assert os.path.exists(os.path.join(straight, name)), name
    ckpt = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)
    assert ckpt["stage"] == "vqvae" and ckpt["step"] == 6 and ckpt["train_args"]["max_steps"] == 6
    assert set(ckpt) >= {"config", "model", "optimizer", "scaler", "train_args"}
    assert bool(ckpt["model"]["codebook.initialized"])
    # The saved model is the trained one, and load_vqvae reads it.
    vq = load_vqvae(os.path.join(straight, "ckpt.pt"))
    assert all(torch.equal(v, vq.state_dict()[k]) for k, v in model.state_dict().items())
    # Stop after 4 steps, start again with a higher --max_steps: the same run as going straight to
    # 6.
    train.train(train.parse_args(TINY + ["--data", digits_h5, "--out_dir", resumed, "--max_steps",
                                         "4"]))
    train.train(train.parse_args(TINY + ["--data", digits_h5, "--out_dir", resumed, "--max_steps",
                                         "6"]))
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
    r = run_script("train.py", *TINY, "--data", str(tmp_path / "missing.h5"), "--out_dir", out,
                   "--max_steps", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"train.py: error: {tmp_path / 'missing.h5'}: no such file or folder"
    # The same path in this process, for the other cases.
    with h5py.File(tmp_path / "nokeys.h5", "w") as f:
        f.create_dataset("videos", data=np.zeros((2, 4, 4, 3), np.uint8))
    cases = [
        (["--data", str(tmp_path / "nokeys.h5")],
         "nokeys.h5: missing HDF5 key(s) train_data, train_idx"),
        (["--data", digits_h5, "--sequence_length", "8"],
         "all 6 train videos are shorter than sequence_length=8 (the longest has 6 frames)"),
        (["--data", digits_h5, "--downsample", "8", "4", "4"],
         "downsample (8, 4, 4) does not divide the input: sequence_length=4 is not a multiple "
         "of 8"),
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
    saved = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)
    assert bool(saved["model"]["codebook.initialized"])
    # Each rank saw its own clips: at every step the two batches differ, and over an epoch (3 steps
    # of 2 clips on each of 2 ranks covers 6 train videos twice) they share the dataset between
    # them.
    items = ranks["items"]
    assert len(items[0]) == len(items[1]) == 3 * 2
    first_epoch = [i for i, _ in items[0][:3]] + [i for i, _ in items[1][:3]]
    assert sorted(first_epoch) == list(range(6))
    # no window seed repeats across ranks
    assert not {s for _, s in items[0]} & {s for _, s in items[1]}
    # Rank 0 wrote the checkpoint, log and pictures; rank 1 wrote nothing at all under out_dir.
    assert ranks["writes"][1] == []
    written = {os.path.basename(p) for _, p in ranks["writes"][0]}
    assert {"ckpt.pt", "log.jsonl", "loss.png"} <= written


def test_learning_rate_schedule_by_hand(tmp_path, digits_h5):
    import math

    import train
    flags = lambda kw: [a for k, v in kw.items() for a in (f"--{k}", str(v))]
    args = lambda kw: train.parse_args(TINY + ["--out_dir", "x", "--lr", "1e-3"] + flags(kw))
    lr = lambda step, **kw: train.get_lr(step, args(kw))
    # Warm-up of 10 steps, then cosine to zero at step 110: step 0 already trains, at lr / 10.
    cos = dict(warmup_steps=10, max_steps=110, lr_schedule="cosine")
    assert lr(0, **cos) == pytest.approx(1e-4, rel=1e-12)
    assert lr(4, **cos) == pytest.approx(5e-4, rel=1e-12)
    assert lr(9, **cos) == pytest.approx(1e-3, rel=1e-12)   # the last warm-up step reaches the peak
    assert lr(10, **cos) == pytest.approx(1e-3, rel=1e-12)  # the cosine starts at the peak
    # a quarter of the way
    assert lr(35, **cos) == pytest.approx(1e-3 * 0.5 * (1 + math.sqrt(0.5)), rel=1e-12)
    assert lr(60, **cos) == pytest.approx(5e-4, rel=1e-12)          # half way
    # the last step
    assert lr(109, **cos) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.99)), rel=1e-9)
    assert lr(110, **cos) == 0.0 and lr(500, **cos) == 0.0
    # Constant: the peak from step 0 without warm-up, after it with one.
    constant = dict(warmup_steps=0, lr_schedule="constant")
    assert lr(0, **constant) == lr(10**6, **constant) == 1e-3
    assert lr(3, warmup_steps=10, lr_schedule="constant") == pytest.approx(4e-4, rel=1e-12)
    assert lr(10, warmup_steps=10, lr_schedule="constant") == 1e-3
    # The optimizer really steps with it: the logged lr of step s is the one of step index s - 1.
    out = str(tmp_path / "warm")
    train.train(train.parse_args(TINY + ["--data", digits_h5, "--out_dir", out, "--max_steps", "3",
                                         "--lr", "1e-3",
                                         "--warmup_steps", "4", "--eval_interval", "10"]))
    assert [r["lr"] for r in train_records(out)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4], rel=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_optimizer_steps_with_unscaled_clipped_gradients(tmp_path, digits_h5, monkeypatch,
                                                             dtype):
    """--gradient_clip_val c: Adam sees gradients of norm min(true norm, c); the log reports the
    true norm."""
    import train
    seen = []
    step = torch.optim.Adam.step

    def spying_step(self, *a, **kw):
        grads = [p.grad for group in self.param_groups for p in group["params"]
                 if p.grad is not None]
        norms = torch.stack([torch.linalg.vector_norm(g) for g in grads])
        seen.append(torch.linalg.vector_norm(norms).item())
        return step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", spying_step)
    out = str(tmp_path / "clip")
    train.train(train.parse_args(TINY + ["--data", digits_h5, "--out_dir", out, "--max_steps",
                                         "24", "--dtype", dtype,
                                         "--gradient_clip_val", "0.5", "--eval_interval", "100"]))
    # float16: overflow steps have none
    norms = [r["grad_norm"] for r in train_records(out) if "grad_norm" in r]
    assert len(seen) == len(norms) >= 4 and max(norms) > 0.5
    assert seen == pytest.approx([min(n, 0.5) for n in norms], rel=1e-3)


def test_presets_fill_only_what_the_flags_leave_out():
    import train
    digits = train.parse_args(["--stage", "gpt", "--out_dir", "x"])
    assert (digits.cache_codes, digits.dtype, digits.hidden_dim) == (True, "bfloat16", 120)
    gpt_args = lambda *flags: train.parse_args(["--stage", "gpt", "--out_dir", "x", *flags])
    vqvae_args = lambda *flags: train.parse_args(["--stage", "vqvae", "--out_dir", "x", *flags])
    assert gpt_args("--n_cond_frames", "1").cache_codes is False
    assert gpt_args("--no-cache_codes").cache_codes is False
    paper = train.parse_args(["--stage", "gpt", "--out_dir", "x", "--data", "bair.h5"])
    assert (paper.cache_codes, paper.dtype, paper.hidden_dim, paper.lr) == (False, "float32", 576,
                                                                            3e-4)
    vq = train.parse_args(["--stage", "vqvae", "--out_dir", "x", "--dtype", "float16", "--lr",
                           "1e-3"])
    assert (vq.dtype, vq.lr, vq.max_steps, vq.n_codes, vq.local_encoder) == ("float16", 1e-3, 4500,
                                                                             512, True)
    paper_vq = train.parse_args(["--stage", "vqvae", "--out_dir", "x", "--data", "d.h5"])
    assert paper_vq.local_encoder is False   # the paper's encoder unless asked
    # Muon for both digits stages; the paper's Adam on real data. Codes restart at the original's
    # threshold on real data, at a lower one on the digits' smaller batches; the flag reaches the
    # codebook.
    optimizers = (digits.optimizer, paper.optimizer, vq.optimizer, paper_vq.optimizer)
    assert optimizers == ("muon", "adam", "muon", "adam")
    assert (vq.dead_code_threshold, paper_vq.dead_code_threshold) == (0.05, 1.0)
    asked = train.parse_args(["--stage", "vqvae", "--out_dir", "x", "--dead_code_threshold", "0.2"])
    assert train.VQVAEStage(asked, None, "x/ckpt.pt").config.dead_code_threshold == 0.2
    stage = train.VQVAEStage(asked, None, "x/ckpt.pt")
    codebook = stage.build(asked, None).codebook
    assert codebook.dead_code_threshold == 0.2
    assert vqvae_args("--no-local_encoder").local_encoder is False
    assert vqvae_args("--n_res_layers", "1").local_encoder is False
    # --preset chooses the set: real data at CPU sizes (ViZDoom's recipe), or the paper's without
    # --data.
    cpu = train.parse_args(["--stage", "vqvae", "--out_dir", "x", "--data", "d.h5", "--preset",
                            "cpu"])
    assert (cpu.downsample, cpu.resolution, cpu.sequence_length, cpu.max_steps) == (
        [2, 8, 8], 64, 16, 1500)
    cpu_gpt = train.parse_args(["--stage", "gpt", "--out_dir", "x", "--data", "d.h5", "--preset",
                                "cpu", "--action_cond", "norms"])
    assert (cpu_gpt.hidden_dim, cpu_gpt.max_steps, cpu_gpt.action_cond, cpu_gpt.cache_codes) == (
        120, 3000, "norms", False)
    assert gpt_args("--preset", "paper").hidden_dim == 576
    assert gpt_args("--action_cond").action_cond == "tokens"


def test_cached_codes_load_in_the_training_process_and_clips_in_workers():
    from types import SimpleNamespace

    import train
    from data import MovingDigitsDataset
    codes = run_module.CodesDataset(torch.zeros(4, 2, 2, 2, dtype=torch.int16))
    clips = MovingDigitsDataset(4, sequence_length=4, resolution=16)
    args = train.parse_args(["--stage", "gpt", "--out_dir", "x"])
    one_process = SimpleNamespace(rank=0, world=1)
    loader = lambda data: run_module.Run.train_loader(SimpleNamespace(
        args=args, train_set=data, dist=one_process, device=torch.device("cpu")), 0)
    assert args.num_workers is None
    assert loader(codes).num_workers == 0
    assert loader(clips).num_workers == max(1, min(4, (os.cpu_count() or 2) // 2))
    args.num_workers = 2                                         # a given count is kept for both
    assert loader(codes).num_workers == 2


def step_along_known_directions(model, hidden, opt, lr):
    """Give each hidden matrix (a kernel as its (shape[0], rest) matrix) the gradient U diag(10..1)
    V^T and every other weight one of size >= 1; step once and check Muon moved each matrix along -U
    V^T, every direction alike (Adam would step along the gradient's signs, which are no such
    matrix), and Adam the rest by lr."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    directions = {}
    for n, p in model.named_parameters():
        if n in hidden:
            rows, cols = p.shape[0], p[0].numel()
            k = min(rows, cols)
            # (rows, k), orthonormal columns
            u = torch.linalg.qr(torch.randn(rows, k, generator=g))[0]
            v = torch.linalg.qr(torch.randn(cols, k, generator=g))[0]              # (cols, k)
            # (rows, cols) -> p's shape
            p.grad = (u @ torch.diag(torch.linspace(10, 1, k)) @ v.T).reshape(p.shape)
            directions[n] = (u @ v.T).double()
        else:
            sizes = 1 + torch.rand(p.shape, generator=g)
            p.grad = torch.randn(p.shape, generator=g).sign() * sizes
    opt.step()
    for n, p in model.named_parameters():
        step = (p.detach() - before[n]).double()
        if n in hidden:
            step = step.flatten(1)  # (rows, cols): a kernel as its matrix
            s = torch.linalg.svdvals(step)
            assert s.max() / s.min() < 3, n
            assert F.cosine_similarity(step.flatten(), -directions[n].flatten(), dim=0) > 0.95, n
            rms = step.pow(2).mean().sqrt().item()
            assert 0.1 * lr < rms < 0.3 * lr, n    # about 0.2 lr: an Adam update's usual size
        else:
            torch.testing.assert_close(step.abs(), torch.full_like(step, lr), rtol=1e-4, atol=0,
                                       msg=n)  # Adam's first


def loaded_copy_steps_alike(model, opt, lr):
    """Save the optimizer's state, load it into a new one, set the learning rate on both through
    param_groups (as the schedule does on a resumed run's first step), and check that the copy steps
    the model exactly as the original does from the same weights and gradients."""
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    again = muon.make_optimizer(model, "muon", lr=1.0)
    again.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    for group in opt.param_groups + again.param_groups:
        group["lr"] = lr
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    stepped = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(weights[n])
    again.step()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), stepped[n]), n


def test_muon_steps_the_priors_hidden_matrices_and_adam_the_rest():
    """--optimizer muon: orthogonalised updates for the blocks' linear maps, Adam's for every other
    weight."""
    from gpt import GPTConfig, VideoGPT
    torch.manual_seed(0)
    gpt = VideoGPT(GPTConfig(latent_shape=(2, 4, 4), n_codes=16, embedding_dim=8, hidden_dim=24,
                             heads=2, layers=2,
                             dropout=0.0, attn_dropout=0.0, n_classes=3, action_dim=2,
                             sequence_length=4, resolution=16))
    names = {id(p): n for n, p in gpt.named_parameters()}
    hidden = sorted(names[id(p)] for p in muon.hidden_matrices(gpt))
    # Per block: q, k, v, out of the self-attention and of the cross-attention to the actions, and
    # the MLP's two.
    assert len(hidden) == 2 * 10 and all(gpt.get_parameter(n).ndim == 2 for n in hidden)
    assert all(".attn." in n or ".cross_attn." in n or ".mlp." in n for n in hidden)
    # a class's gains (2D, but a lookup) stay Adam's
    assert not any(n.endswith(".to_gain.weight") for n in hidden)
    opt = muon.make_optimizer(gpt, "muon", lr=1e-2)
    assert (isinstance(opt, muon.MuonAdam)
            and len({id(p) for g in opt.param_groups for p in g["params"]}) == len(names))
    step_along_known_directions(gpt, hidden, opt, 1e-2)
    loaded_copy_steps_alike(gpt, opt, lr=5e-3)
    # Under float16's GradScaler (the loop's path): unscale_ reaches both parts' gradients, step
    # steps both.
    codes, label = torch.randint(16, (2, 2, 4, 4)), torch.tensor([0, 2])
    actions = torch.randn(2, 4, 2)
    loss = lambda: gpt(codes, label, actions=actions).float().logsumexp(-1).mean()
    opt.zero_grad()
    loss().backward()
    plain = {n: p.grad.clone() for n, p in gpt.named_parameters() if p.grad is not None}
    opt.zero_grad()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(loss()).backward()
    scaler.unscale_(opt)
    for n, p in gpt.named_parameters():
        if n in plain:
            torch.testing.assert_close(p.grad, plain[n], rtol=1e-4, atol=1e-7, msg=n)
    weights = {n: p.detach().clone() for n, p in gpt.named_parameters()}
    scaler.step(opt)
    moved = {n for n, p in gpt.named_parameters() if not torch.equal(p.detach(), weights[n])}
    assert set(hidden) <= moved and "fc_out.weight" in moved


def test_muon_steps_the_vqvaes_hidden_convolutions_and_adam_the_rgb_ends():
    """The VQ-VAE's Muon: every kernel between hidden widths (as its (out, in*k^3) matrix) and the
    attention projections; the convolutions from and to RGB, biases and norms stay Adam's."""
    from vqvae import VQVAE, VQVAEConfig
    torch.manual_seed(0)
    vq = VQVAE(VQVAEConfig(n_hiddens=16, n_res_layers=1, embedding_dim=8, n_codes=8,
                           downsample=(2, 4, 4), sequence_length=4, resolution=16))
    names = {id(p): n for n, p in vq.named_parameters()}
    hidden = sorted(names[id(p)] for p in muon.hidden_matrices(vq))
    # Encoder: the strided conv after the first, conv_last, an attention block (2 convs, q k v out
    # on 3 axes); decoder: the same block and the transposed conv before the last; the 1x1x1 convs
    # around the codebook.
    assert len(hidden) == (1 + 1 + 2 + 12) + (2 + 12 + 1) + 2
    rgb = {"encoder.convs.0.conv.weight", "decoder.convts.1.convt.weight"}
    assert not rgb & set(hidden)
    inner = {"encoder.convs.1.conv.weight", "decoder.convts.0.convt.weight",
             "pre_vq_conv.conv.weight"}
    assert inner <= set(hidden)
    assert all(p.dim() < 2 for n, p in vq.named_parameters() if n not in hidden and n not in rgb)
    opt = muon.make_optimizer(vq, "muon", lr=1e-2)
    # Wide matrices (a 4x4x4 kernel: 16 x 16*64) and tall ones (a 1x1x1 conv from 8 to 16 channels)
    # alike.
    assert {tuple(vq.get_parameter(n).flatten(1).shape) for n in hidden} >= {(16, 16 * 64),
                                                                             (16, 8), (8, 16 * 27)}
    step_along_known_directions(vq, hidden, opt, 1e-2)
    # The kernels' momenta keep their shapes through a checkpoint: a loaded copy steps exactly as
    # the original.
    loaded_copy_steps_alike(vq, opt, lr=1e-2)
    assert opt.muon.state[vq.decoder.convts[0].convt.weight]["momentum_buffer"].shape == (16, 16,
                                                                                          4, 4, 4)
