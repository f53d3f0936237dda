"""train.py --stage gpt and sample.py end to end: python -m pytest tests/test_gpt_stage.py"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, TINY_GPT, run_script, train_error, train_records


@pytest.fixture(scope="module")
def vqvae_ckpt(tmp_path_factory, digits_h5):
    import train
    out = str(tmp_path_factory.mktemp("vq"))
    train.train(train.parse_args(TINY + ["--data", digits_h5, "--out_dir", out, "--max_steps",
                                         "3"]))
    return os.path.join(out, "ckpt.pt")


def run_sample(*args):
    return run_script("sample.py", *args)


def test_gpt_stage_keeps_vqvae_frozen_resumes_exactly_and_samples(tmp_path, digits_h5, vqvae_ckpt):
    import train
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    # With Muon (the digits prior's optimizer; Adam's resume is the VQ-VAE tests'): its momenta are
    # saved too.
    common = TINY_GPT + ["--data", digits_h5, "--vqvae", vqvae_ckpt, "--optimizer", "muon"]
    train.train(train.parse_args(common + ["--out_dir", straight, "--max_steps", "4"]))
    ckpt = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)
    assert ckpt["stage"] == "gpt" and ckpt["step"] == 4
    muon = ckpt["optimizer"]["muon"]["state"]
    # 1 block: q k v out, MLP x2
    assert len(muon) == 6 and all(s["momentum_buffer"].ndim == 2 for s in muon.values())
    # The VQ-VAE inside is exactly the one given: no gradient step, no codebook EMA update.
    given = torch.load(vqvae_ckpt, weights_only=True)["model"]
    assert all(torch.equal(v, ckpt["vqvae"]["model"][k]) for k, v in given.items())
    assert torch.equal(ckpt["model"]["codebook"], given["codebook.embeddings"])
    assert os.path.exists(os.path.join(straight, "samples_0000004.gif"))
    records = [json.loads(line) for line in open(os.path.join(straight, "log.jsonl"))]
    assert all(abs(r["bits_per_code"] - r["loss"] / 0.6931471805599453) < 1e-6 for r in records)
    # Interrupted after 2 steps and restarted: the same losses and weights as going straight to 4.
    train.train(train.parse_args(common + ["--out_dir", resumed, "--max_steps", "2"]))
    train.train(train.parse_args(common + ["--out_dir", resumed, "--max_steps", "4"]))
    for a, b in zip(train_records(straight), train_records(resumed)):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    final = torch.load(os.path.join(resumed, "ckpt.pt"), weights_only=True)["model"]
    for k, v in ckpt["model"].items():
        torch.testing.assert_close(final[k], v, atol=1e-6, rtol=0, msg=k)
    # sample.py needs nothing but the prior's checkpoint; a GIF has one frame per clip frame.
    gif = tmp_path / "s.gif"
    r = run_sample("--ckpt", os.path.join(straight, "ckpt.pt"), "--n", "3", "--out", str(gif),
                   "--batch_size", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(gif)
    assert Image.open(gif).n_frames == 4        # the VQ-VAE's sequence_length
    for ext in ("png", "mp4"):
        r = run_sample("--ckpt", os.path.join(straight, "ckpt.pt"), "--n", "2", "--out",
                       str(tmp_path / f"s.{ext}"))
        assert r.returncode == 0 and os.path.getsize(tmp_path / f"s.{ext}") > 0, r.stderr


def test_vqvae_gets_no_gradient_in_the_gpt_loss(digits_h5, vqvae_ckpt, tmp_path):
    import train
    from data import make_dataset
    args = train.parse_args(TINY_GPT + ["--data", digits_h5, "--vqvae", vqvae_ckpt, "--out_dir",
                                        str(tmp_path)])
    stage = train.GPTStage(args, None, str(tmp_path / "ckpt.pt"))
    model = stage.build(args, make_dataset(digits_h5, 4, resolution=16))
    before = {k: v.clone() for k, v in stage.vq.state_dict().items()}
    batch = {"video": torch.rand(2, 3, 4, 16, 16) - 0.5}
    loss, _ = stage.loss(model, batch, torch.device("cpu"))
    loss.backward()
    assert not stage.vq.training
    assert all(p.grad is None and not p.requires_grad for p in stage.vq.parameters())
    assert all(torch.equal(before[k], v) for k, v in stage.vq.state_dict().items())


def test_conditional_prior_trains_and_samples_with_red_frames(tmp_path, digits_h5, vqvae_ckpt,
                                                              monkeypatch):
    import sample
    import train
    monkeypatch.delenv("VIDEOGPT_DEBUG", raising=False)    # errors as the one line users see
    out = str(tmp_path / "cond")
    train.train(train.parse_args([*TINY_GPT, "--data", digits_h5, "--vqvae", vqvae_ckpt,
                                  "--out_dir", out,
                                  "--max_steps", "2", "--n_cond_frames", "1", "--class_cond"]))
    ckpt = os.path.join(out, "ckpt.pt")
    with pytest.raises(SystemExit) as e:                    # the command's code, in this process
        sample.main(["--ckpt", ckpt, "--n", "2", "--out", str(tmp_path / "c.gif")])
    assert "pass --cond_from DATA" in str(e.value.code) and not os.path.exists(tmp_path / "c.gif")
    r = run_sample("--ckpt", ckpt, "--n", "2", "--out", str(tmp_path / "c.gif"), "--cond_from",
                   digits_h5, "--label", "1")
    assert r.returncode == 0, r.stderr
    gif = Image.open(tmp_path / "c.gif")
    assert gif.n_frames == 4
    first = np.asarray(gif.convert("RGB"))      # (H, W, 3) of the first frame
    assert first[0, 0].tolist() == [255, 0, 0]  # the conditioning frame is framed in red
    gif.seek(3)
    last = np.asarray(gif.convert("RGB"))
    assert last[0, 0].tolist() != [255, 0, 0]


def test_gpt_stage_errors_are_one_line(tmp_path, digits_h5, vqvae_ckpt):
    out = str(tmp_path / "g")
    cases = [
        ([], "--stage gpt needs --vqvae PATH"),
        (["--vqvae", vqvae_ckpt, "--hidden_dim", "20"], "hidden_dim=20 is not divisible by 3"),
        (["--vqvae", vqvae_ckpt, "--n_cond_frames", "4"],
         "--n_cond_frames 4 must be smaller than the clip's 4 frames"),
        (["--vqvae", str(tmp_path / "none.pt")], "none.pt: no such checkpoint file"),
    ]
    for extra, message in cases:
        assert message in train_error(*TINY_GPT, "--data", digits_h5, "--out_dir", out,
                                      "--max_steps", "1", *extra)
    # A prior checkpoint given as --vqvae: the wrong stage.
    torch.save(dict(stage="gpt", config={}, model={}), tmp_path / "prior.pt")
    message = train_error(*TINY_GPT, "--data", digits_h5, "--out_dir", out, "--max_steps", "1",
                          "--vqvae", str(tmp_path / "prior.pt"))
    assert "prior.pt: is a 'gpt' checkpoint, not a VQ-VAE one" in message
    r = run_sample("--ckpt", vqvae_ckpt, "--out", str(tmp_path / "x.gif"))
    assert r.returncode == 1 and "is a 'vqvae' checkpoint, not a prior ('gpt') one" in r.stderr


def test_cache_codes_encodes_once_and_trains_on_the_file(tmp_path, digits_h5, vqvae_ckpt):
    import train
    from vqvae import load_vqvae
    out = str(tmp_path / "cached")
    args = TINY_GPT + ["--data", digits_h5, "--vqvae", vqvae_ckpt, "--out_dir", out,
                       "--cache_codes", "--class_cond"]
    train.train(train.parse_args(args + ["--max_steps", "2"]))
    cached = torch.load(os.path.join(out, "codes.pt"), weights_only=True)
    codes, labels = cached["train"]
    assert codes.shape == (6, 2, 4, 4) and labels.tolist() == [0, 1, 0, 1, 0, 1]
    # Clip i is encoded with its window fixed by seed i.
    from data import HDF5Dataset
    clip = HDF5Dataset(digits_h5, 4, resolution=16)[(3, 3)]["video"]
    assert torch.equal(codes[3].long(), load_vqvae(vqvae_ckpt).encode(clip[None])[0])
    # A second start reuses the file instead of encoding again.
    os.utime(os.path.join(out, "codes.pt"), (0, 0))
    train.train(train.parse_args(args + ["--max_steps", "3"]))
    assert os.stat(os.path.join(out, "codes.pt")).st_mtime == 0


# -----------------------------------------------------------------------------
# Action conditioning end to end: flags, checkpoint, sample.py's --cond_from and --actions


def test_action_conditional_prior_trains_saves_and_samples_from_data_or_a_file(tmp_path, digits_h5,
                                                                               vqvae_ckpt):
    import h5py
    import sample
    import world
    import train
    from gpt import load_gpt
    # The digits file with a 3-d action per frame added, as python -m prepare bair writes it.
    data = tmp_path / "with_actions.h5"
    with h5py.File(digits_h5, "r") as src, h5py.File(data, "w") as f:
        for split in ("train", "test"):
            for key in ("data", "idx"):
                f[f"{split}_{key}"] = src[f"{split}_{key}"][()]
            n_frames = len(f[f"{split}_data"])
            actions = np.random.default_rng(0).normal(size=(n_frames, 3))
            f[f"{split}_actions"] = actions.astype(np.float32)
        f["action_names"] = np.array(["LEFT", "RIGHT", "GO"], dtype=h5py.string_dtype())
    out = tmp_path / "gpt"
    train.train(train.parse_args(TINY_GPT + ["--data", str(data), "--vqvae", vqvae_ckpt,
                                             "--out_dir", str(out),
                                             "--max_steps", "2", "--action_cond"]))
    gpt, _ = load_gpt(out / "ckpt.pt")
    assert gpt.config.action_dim == 3 and gpt.config.sequence_length == 4
    # Actions from the test clips, or the user's own: one sequence for all samples, or one per
    # sample.
    ckpt = ["--ckpt", str(out / "ckpt.pt"), "--n", "2"]
    sample.main(ckpt + ["--cond_from", str(data), "--out", str(tmp_path / "a.gif")])
    np.save(tmp_path / "push.npy", np.ones((4, 3)))
    sample.main(ckpt + ["--actions", str(tmp_path / "push.npy"), "--out", str(tmp_path / "b.gif")])
    # Or by name: the checkpoint keeps the data's action names; each name held for its count of
    # frames.
    assert torch.load(out / "ckpt.pt", weights_only=True)["action_names"] == ["LEFT", "RIGHT", "GO"]
    sample.main(ckpt + ["--actions", "LEFT*2,GO,GO", "--out", str(tmp_path / "named.gif")])
    sample.main(ckpt + ["--actions", "RIGHT*8", "--frames", "8", "--out",
                        str(tmp_path / "long.gif")])
    assert world.named_actions("LEFT*2,GO,GO", ["LEFT", "RIGHT", "GO"], 2, (4,), "x").tolist() == \
        [[[1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 0, 1]]] * 2
    assert all(os.path.getsize(tmp_path / f) > 0
               for f in ("a.gif", "b.gif", "named.gif", "long.gif"))
    # Wrong or missing actions: one line naming the problem.
    np.save(tmp_path / "short.npy", np.ones((3, 3)))
    for argv, message in (
            (["--actions", str(tmp_path / "short.npy")],
             f"{tmp_path / 'short.npy'}: actions must be numbers of shape (4, 3) or (2, 4, 3), got "
             "float64 (2, 3, 3)"),
            (["--cond_from", digits_h5],
             "the prior is conditioned on actions; pass --actions FILE.npy (4, 3)"),
            (["--actions", "LEFT*2,JUMP*2"],
             "--actions: unknown action 'JUMP'; this prior's actions are LEFT, RIGHT, GO"),
            (["--actions", "LEFT*3"], "--actions LEFT*3: 3 frames of actions, the video has 4"),
            (["--actions", "LEFT*x,GO*2"],
             "--actions: 'LEFT*x': the count after * must be a positive whole number")):
        with pytest.raises(SystemExit) as e:
            sample.main(ckpt + argv + ["--out", str(tmp_path / "c.gif")])
        assert str(e.value.code).startswith("sample.py: error: ") and message in str(e.value.code)
    assert train_error(*TINY_GPT, "--data", digits_h5, "--vqvae", vqvae_ckpt, "--out_dir",
                       str(tmp_path / "x"),
                       "--action_cond").endswith("has no per-frame actions (an HDF5 file with "
                                                 "train_actions, e.g. from python -m prepare bair)")


# -----------------------------------------------------------------------------
# Longer videos and video prediction from the command line


def test_sample_py_makes_longer_videos_and_continues_real_clips(tmp_path, digits_h5, vqvae_ckpt):
    import sample
    import train
    from PIL import Image
    out = tmp_path / "gpt"
    train.train(train.parse_args(TINY_GPT + ["--data", digits_h5, "--vqvae", vqvae_ckpt,
                                             "--out_dir", str(out), "--max_steps", "1"]))
    ckpt = ["--ckpt", str(out / "ckpt.pt"), "--n", "2"]
    # trained on 4 frames
    sample.main(ckpt + ["--frames", "10", "--out", str(tmp_path / "long.gif")])
    assert Image.open(tmp_path / "long.gif").n_frames == 10
    sample.main(ckpt + ["--frames", "8", "--stride", "1", "--cond_from", digits_h5,
                        "--context_frames", "2", "--out", str(tmp_path / "predicted.png")])
    sheet = np.asarray(Image.open(tmp_path / "predicted.png"))
    assert sheet.shape[1] > sheet.shape[0]  # 8 frames per row
    for argv, message in ((["--frames", "7"],
                           "--frames 7 must be a multiple of the VQ-VAE's temporal stride 2"),
                          (["--frames", "2"], "and at least the trained 4 frames"),
                          (["--context_frames", "2"],
                           "--context_frames continues real clips: pass --cond_from"),
                          (["--cond_from", digits_h5, "--context_frames", "4"],
                           "fewer than the window's 4 frames")):
        with pytest.raises(SystemExit) as e:
            sample.main(ckpt + argv + ["--out", str(tmp_path / "x.gif")])
        assert str(e.value.code).startswith("sample.py: error: ") and message in str(e.value.code)


def test_sample_py_compiles_only_runs_that_draw_enough_codes():
    import sample
    from gpt import GPTConfig, VideoGPT
    gpt = VideoGPT(GPTConfig(latent_shape=(4, 32, 32), n_codes=16, embedding_dim=8, hidden_dim=24,
                             heads=2, layers=1, sequence_length=16))
    args = sample.parse_args(["--ckpt", "x.pt", "--n", "64", "--batch_size", "32"])
    assert args.compile is None                                          # auto
    assert sample.decoding_steps(args, gpt, 16) == 2 * 4096              # two batches of one window
    # 48 frames = 12 latent steps: the first window, then 4 more of s = 2 new latent steps (1024
    # codes each).
    assert sample.decoding_steps(args, gpt, 48) == 2 * (4096 + 4 * 2 * 1024)
    args = sample.parse_args(["--ckpt", "x.pt", "--n", "256", "--batch_size", "32"])
    # BAIR-size FVD run: compiles
    assert sample.decoding_steps(args, gpt, 16) == 8 * 4096 >= sample.AUTO_COMPILE_STEPS
    assert sample.parse_args(["--ckpt", "x.pt", "--no-compile"]).compile is False
