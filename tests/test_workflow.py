"""A researcher's own workflow: gradient accumulation (--grad_accum), fine-tuning
(--init_from), and sampling from one's own frames (sample.py --cond_from FILE).

python -m pytest tests/test_workflow.py
"""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import ROOT, run_script, train_records

# One optimizer step, in this process, reading clips in a fixed order.
ONE_STEP = ["--num_workers", "0", "--max_steps", "1", "--device", "cpu", "--dtype", "float32",
            "--eval_interval", "100", "--log_interval", "1"]
# A tiny prior without dropout (dropout would draw other masks for other batch shapes).
PRIOR = ["--stage", "gpt", "--hidden_dim", "24", "--heads", "2", "--layers", "1",
         "--no-cache_codes", "--dropout", "0", "--attn_dropout", "0"]


def train_once(*argv):
    """train.train in this process; the trained model's state, copied."""
    import train
    model = train.train(train.parse_args(list(argv)))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def biggest_difference(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def tiny_vqvae(tmp_path_factory):
    """A one-step VQ-VAE of the moving digits (4 frames of 16x16), its codebook seeded."""
    out = tmp_path_factory.mktemp("vq")
    train_once("--stage", "vqvae", "--out_dir", str(out), "--sequence_length", "4",
               "--resolution", "16", "--n_hiddens", "16", "--n_res_layers", "0",
               "--decoder_res_layers", "0", "--embedding_dim", "8", "--n_codes", "16",
               "--downsample", "2", "4", "4", "--batch_size", "2", *ONE_STEP)
    return str(out / "ckpt.pt")


@pytest.fixture(scope="module")
def priors(tiny_vqvae, tmp_path_factory):
    """One-step priors on the tiny VQ-VAE: unconditional, and conditioned on the first frame."""
    out = tmp_path_factory.mktemp("priors")
    for name, flags in (("plain", []), ("framed", ["--n_cond_frames", "1"])):
        train_once(*PRIOR, "--vqvae", tiny_vqvae, "--out_dir", str(out / name),
                   "--batch_size", "2", *flags, *ONE_STEP)
    return {name: str(out / name / "ckpt.pt") for name in ("plain", "framed")}


# -----------------------------------------------------------------------------
# --grad_accum


def test_micro_batches_give_the_big_batchs_step(tiny_vqvae, tmp_path):
    """--batch_size 2 --grad_accum 4 reads the clips a batch of 8 reads, in the same order, and
    steps the prior to the same weights: the sums differ only in the order of float additions
    (measured 4e-12 after one Muon step; the bound is 1e-6)."""
    big = train_once(*PRIOR, "--vqvae", tiny_vqvae, "--out_dir", str(tmp_path / "big"),
                     "--batch_size", "8", *ONE_STEP)
    micro = train_once(*PRIOR, "--vqvae", tiny_vqvae, "--out_dir", str(tmp_path / "micro"),
                       "--batch_size", "2", "--grad_accum", "4", *ONE_STEP)
    assert biggest_difference(big, micro) < 1e-6
    # The logged loss is the mean over the micro-batches: the big batch's.
    loss = lambda name: train_records(tmp_path / name)[0]["loss"]
    assert loss("micro") == pytest.approx(loss("big"), rel=1e-6)
    # Not a vacuous match: one micro-batch of 2 alone steps elsewhere.
    alone = train_once(*PRIOR, "--vqvae", tiny_vqvae, "--out_dir", str(tmp_path / "alone"),
                       "--batch_size", "2", *ONE_STEP)
    assert biggest_difference(big, alone) > 1e-5


def test_the_codebook_takes_one_ema_step_over_all_micro_batches():
    """Four micro-batches quantize with the codebook as it was, and their counts, sums and
    restart rows make the one EMA update a batch of all of them makes, dead codes included."""
    from run import one_codebook_step
    from vqvae import Codebook
    torch.manual_seed(0)
    z = torch.randn(8, 4, 2, 3, 3)                                   # (B, D, t, h, w)
    # A threshold above every count: each code restarts at a random encoder output.
    books = [Codebook(16, 4, dead_code_threshold=100.0) for _ in range(2)]
    books[0].init_from(torch.randn(32, 4))
    books[1].load_state_dict(books[0].state_dict())
    start = books[1].embeddings.clone()
    torch.manual_seed(1)
    whole = books[0](z)
    torch.manual_seed(1)
    parts = []
    with one_codebook_step(SimpleNamespace(codebook=books[1]), 4):   # as a VQVAE holds it
        for chunk in z.split(2):
            parts.append(books[1](chunk))
            # Until the step ends, every micro-batch sees the codebook of its start.
            assert torch.equal(books[1].embeddings, start)
    assert not torch.equal(books[1].embeddings, start)
    assert torch.equal(torch.cat([p["codes"] for p in parts]), whole["codes"])
    for name in ("embeddings", "N", "z_avg"):
        torch.testing.assert_close(getattr(books[1], name), getattr(books[0], name),
                                   rtol=1e-6, atol=1e-6)


def test_micro_batches_under_ddp_step_as_one_process_does(tiny_vqvae, tmp_path):
    """Two gloo processes: each process's micro-batches are dealt from its share of the clips.
    The prior (2 processes x 2 micro-batches of 2) steps as one process with a batch of 8. The
    VQ-VAE's BatchNorm normalises each batch it is given by that batch's statistics, so its
    micro-batches step as processes do: 2 x 2 micro-batches of 1 as 4 processes of 1 would,
    which one process with 4 micro-batches of 1 reproduces."""
    gathered = tmp_path / "ddp.pt"
    r = run_script("-m torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   os.path.join("tests", "ddp_accum_worker.py"), gathered, tiny_vqvae,
                   tmp_path / "ddp", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = torch.load(gathered, weights_only=True)
    prior = train_once(*PRIOR, "--vqvae", tiny_vqvae, "--out_dir", str(tmp_path / "gpt"),
                       "--batch_size", "8", *ONE_STEP)
    assert biggest_difference(ddp["gpt"], prior) < 1e-6
    vq = train_once("--stage", "vqvae", "--init_from", tiny_vqvae, "--out_dir",
                    str(tmp_path / "vq"), "--batch_size", "1", "--grad_accum", "4", *ONE_STEP)
    # Weights and codebook alike; BatchNorm's running statistics (read in eval mode only) are
    # each process's own.
    running = ("running_mean", "running_var", "num_batches_tracked")
    trained = {k: v for k, v in vq.items() if not k.endswith(running)}
    assert biggest_difference(trained, ddp["vqvae"]) < 1e-5


def test_a_run_with_micro_batches_resumes_where_it_stopped(tiny_vqvae, tmp_path):
    common = [*PRIOR, "--vqvae", tiny_vqvae, "--batch_size", "2", "--grad_accum", "2",
              *ONE_STEP[:2], *ONE_STEP[4:]]
    straight = train_once(*common, "--out_dir", str(tmp_path / "a"), "--max_steps", "4")
    train_once(*common, "--out_dir", str(tmp_path / "b"), "--max_steps", "2")
    resumed = train_once(*common, "--out_dir", str(tmp_path / "b"), "--max_steps", "4")
    assert biggest_difference(straight, resumed) == 0.0


# -----------------------------------------------------------------------------
# --init_from


def digits_file(path, seed):
    """A small moving-digits HDF5 file of 4-frame 16x16 clips: 8 train, 2 test."""
    from data import moving_digits
    from prepare import write_hdf5
    write_hdf5(str(path), {s: (list(moving_digits(n, 4, 16, seed=seed, train=s == "train")), None)
                           for s, n in (("train", 8), ("test", 2))})
    return str(path)


def test_a_fine_tune_starts_from_the_source_and_learns_the_new_data(tiny_vqvae, priors,
                                                                    tmp_path):
    import run
    from data import make_dataset
    from gpt import load_gpt
    source = priors["plain"]
    data = digits_file(tmp_path / "other.h5", seed=1)
    # Twelve steps on the other file, from the source's weights; --vqvae may name its VQ-VAE.
    train_once("--stage", "gpt", "--init_from", source, "--vqvae", tiny_vqvae,
               "--data", data, "--out_dir", str(tmp_path / "tuned"), "--batch_size", "4",
               *ONE_STEP[:2], "--max_steps", "12", *ONE_STEP[4:], "--lr", "1e-2",
               "--warmup_steps", "0")
    records = train_records(tmp_path / "tuned")
    assert records[0]["step"] == 1 and records[-1]["step"] == 12
    # Its first loss is the source model's loss on the first batch of the new data.
    gpt, vq = load_gpt(source)
    clips = make_dataset(data, 4, resolution=16, seed=0)
    order = iter(run.InfiniteSampler(len(clips), seed=0))
    x = torch.stack([clips[next(order)]["video"] for _ in range(4)])
    with torch.no_grad():
        codes = vq.encode(x)
        first = torch.nn.functional.cross_entropy(gpt(codes).flatten(0, -2), codes.flatten())
    assert records[0]["loss"] == pytest.approx(first.item(), rel=1e-5)
    # ...and training on the new data lowers it.
    assert records[-1]["loss"] < records[0]["loss"] - 0.1
    # A fresh optimizer at step 0: the new run's checkpoint counts its own steps.
    saved = torch.load(tmp_path / "tuned" / "ckpt.pt", weights_only=True)
    assert saved["step"] == 12 and saved["train_args"]["init_from"] == source


def test_a_fine_tune_keeps_the_models_shape_and_its_vqvae(priors, tmp_path):
    from conftest import train_error
    ckpt = priors["plain"]
    tune = ["--stage", "gpt", "--init_from", ckpt, "--no-cache_codes", *ONE_STEP]
    message = train_error(*tune, "--hidden_dim", "48", "--out_dir", str(tmp_path / "a"))
    assert message.endswith(f"{ckpt}: --hidden_dim 48 differs from the checkpoint's 24; a "
                            f"fine-tune keeps the model's shape (leave the flag out)")
    assert "--class_cond, but the checkpoint's prior has no classes" in train_error(
        *tune, "--class_cond", "--out_dir", str(tmp_path / "b"))
    # Another VQ-VAE (another seed gives other weights) is refused; dropout may change.
    other = tmp_path / "other_vq"
    train_once("--stage", "vqvae", "--out_dir", str(other), "--sequence_length", "4",
               "--resolution", "16", "--n_hiddens", "16", "--n_res_layers", "0",
               "--decoder_res_layers", "0", "--embedding_dim", "8", "--n_codes", "16",
               "--downsample", "2", "4", "4", "--batch_size", "2", "--seed", "1", *ONE_STEP)
    message = train_error(*tune, "--vqvae", str(other / "ckpt.pt"), "--out_dir",
                          str(tmp_path / "c"))
    assert f"{other / 'ckpt.pt'}: is not the VQ-VAE that {ckpt} was trained with" in message
    tuned = tmp_path / "d"
    train_once(*tune, "--dropout", "0.3", "--out_dir", str(tuned))
    config = torch.load(tuned / "ckpt.pt", weights_only=True)["config"]
    assert config["dropout"] == 0.3 and config["hidden_dim"] == 24


def test_a_fine_tune_starts_from_an_original_release_checkpoint(tmp_path):
    """The original's prior files hold no configs: the fine-tune reads them off the weights, as
    gpt.load_gpt does, and its first loss is the loaded prior's."""
    from originals import ORIGINAL_ARGS, PRIOR_KEYS, original_state_dict, save_like_lightning
    sd = original_state_dict(seed=0, keys=PRIOR_KEYS["uncond"])
    args = dict(ORIGINAL_ARGS, hidden_dim=60, heads=2, layers=2, attn_type="full",
                vqvae="vqvae.ckpt")
    save_like_lightning(tmp_path / "prior.ckpt", sd, args)
    train_once("--stage", "gpt", "--init_from", str(tmp_path / "prior.ckpt"), "--no-cache_codes",
               "--batch_size", "2", "--dropout", "0", "--attn_dropout", "0",
               "--out_dir", str(tmp_path / "tuned"), *ONE_STEP)
    record = train_records(tmp_path / "tuned")[0]
    assert record["step"] == 1 and np.isfinite(record["loss"])
    saved = torch.load(tmp_path / "tuned" / "ckpt.pt", weights_only=True)
    assert saved["config"]["hidden_dim"] == 60
    assert tuple(saved["config"]["latent_shape"]) == (4, 8, 8)


def test_a_decoder_fine_tune_keeps_every_code_so_the_prior_still_holds(tiny_vqvae, priors,
                                                                         tmp_path):
    """--decoder_only --texture_weight, from the VQ-VAE a prior carries: three steps change the
    decoder and leave the encoder and the codebook (weights and moving averages) as they were;
    the loss logged is the paper's plus the texture term."""
    from conftest import train_error
    from gpt import load_gpt
    from vqvae import load_vqvae
    tuned = train_once("--stage", "vqvae", "--init_from", priors["plain"], "--decoder_only",
                       "--texture_weight", "2", "--out_dir", str(tmp_path / "sharp"),
                       "--batch_size", "2", *ONE_STEP[:2], "--max_steps", "3", *ONE_STEP[4:])
    source = torch.load(tiny_vqvae, weights_only=True)["model"]
    coding = ("encoder.", "pre_vq_conv.", "codebook.")
    for k, v in source.items():
        if k.startswith(coding):
            assert torch.equal(tuned[k], v), k
    decoding = [k for k in source if k.startswith(("decoder.", "post_vq_conv."))]
    assert decoding and all(not torch.equal(tuned[k], source[k]) for k in decoding)
    for r in train_records(tmp_path / "sharp"):
        assert r["loss"] == pytest.approx(r["recon_loss"] + r["commitment_loss"]
                                          + 2 * r["texture_loss"], rel=1e-5)
    # The prior's own VQ-VAE and the fine-tuned one give a clip the same codes.
    _, vq = load_gpt(priors["plain"])
    x = torch.rand(2, 3, 4, 16, 16) - 0.5
    assert torch.equal(load_vqvae(str(tmp_path / "sharp" / "ckpt.pt")).encode(x), vq.encode(x))
    # One-line errors: nothing to fine-tune, a negative weight, a prior's stage.
    assert train_error("--stage", "vqvae", "--decoder_only", "--out_dir",
                       str(tmp_path / "a")).endswith(
        "--decoder_only trains the decoder of a trained VQ-VAE: give --init_from CKPT")
    assert train_error("--stage", "vqvae", "--texture_weight", "-1", "--out_dir",
                       str(tmp_path / "b")).endswith("--texture_weight must be 0 or more, got -1.0")
    assert "--decoder_only and --texture_weight train a VQ-VAE's decoder" in train_error(
        *PRIOR, "--vqvae", tiny_vqvae, "--decoder_only", "--out_dir", str(tmp_path / "c"))
    # weights/make.py --sharpen takes such a decoder only: an encoder changed by one number, or
    # a file that is no VQ-VAE of the prior's shape, is refused and the shipped file kept.
    import importlib.util
    import shutil
    spec = importlib.util.spec_from_file_location("make", os.path.join(ROOT, "weights", "make.py"))
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copy(priors["plain"], shipped / "vizdoom.pt")
    before = open(shipped / "vizdoom.pt", "rb").read()
    bent = torch.load(tmp_path / "sharp" / "ckpt.pt", weights_only=True)
    key = next(k for k in bent["model"] if k.startswith("encoder."))
    bent["model"][key] = bent["model"][key] + 1
    torch.save(bent, tmp_path / "bent.pt")
    for given, message in ((tmp_path / "bent.pt", f"its {key} is not"),
                           (priors["framed"], "not a VQ-VAE of")):
        with pytest.raises(SystemExit, match=message):
            make.sharpen(str(given), "unused.h5", 4, 0, str(shipped))
    assert open(shipped / "vizdoom.pt", "rb").read() == before


# -----------------------------------------------------------------------------
# sample.py --cond_from: your own frames


def conditioning_of(ckpt, *argv):
    """What sample.py gives the prior for these arguments: (cond, context)."""
    import sample
    from gpt import load_gpt
    gpt, vq = load_gpt(ckpt)
    args = sample.parse_args(["--ckpt", ckpt, "--n", "3", *argv])
    return sample.conditioning(gpt, args, vq.config, torch.device("cpu"))


def test_samples_continue_your_own_image_or_video(priors, tmp_path):
    from PIL import Image
    from conftest import gradient_video, write_video
    from data import preprocess, read_frames
    # An RGBA image of another size and shape: resized, centre-cropped, its alpha dropped.
    rgba = np.random.default_rng(0).integers(0, 256, (20, 28, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "frame.png")
    cond, context = conditioning_of(priors["framed"], "--cond_from", str(tmp_path / "frame.png"))
    given = preprocess(rgba[None, :, :, :3], 16)                       # (3, 1, 16, 16)
    assert cond["frames"].shape == (3, 3, 1, 16, 16) and context is None
    assert all(torch.equal(f, given) for f in cond["frames"])
    # A video file continued from its first 2 frames by an unconditional prior.
    write_video(tmp_path / "clip.mp4", gradient_video(6, 24, 32))
    cond, context = conditioning_of(priors["plain"], "--cond_from", str(tmp_path / "clip.mp4"),
                                    "--context_frames", "2")
    decoded = preprocess(read_frames(str(tmp_path / "clip.mp4"), 0, 2), 16)   # (3, 2, 16, 16)
    assert context.shape == (3, 3, 2, 16, 16) and torch.equal(context[1], decoded)
    # The whole command, to a picture and a video, both samples framed as the given frames are.
    import sample
    for ckpt, argv in ((priors["framed"], ["--cond_from", str(tmp_path / "frame.png")]),
                       (priors["plain"], ["--cond_from", str(tmp_path / "clip.mp4"),
                                          "--context_frames", "2"])):
        out = tmp_path / f"{os.path.basename(os.path.dirname(ckpt))}.gif"
        sample.main(["--ckpt", ckpt, "--n", "2", "--out", str(out), "--device", "cpu", *argv])
        assert out.stat().st_size > 0


def test_your_own_frames_give_one_line_errors(priors, tmp_path):
    from PIL import Image
    from conftest import gradient_video, write_video
    import sample
    write_video(tmp_path / "short.mp4", gradient_video(1, 16, 16))
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "frames").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "frames" / "0.png")
    Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(tmp_path / "frames" / "1.png")
    (tmp_path / "empty").mkdir()
    cases = [
        (priors["plain"], ["--cond_from", tmp_path / "short.mp4", "--context_frames", "2"],
         f"{tmp_path / 'short.mp4'}: 1 frame(s), but the prior needs 2 to continue"),
        (priors["plain"], ["--cond_from", tmp_path / "a.png"],
         f"{tmp_path / 'a.png'}: this prior takes no frames; pass --context_frames K to "
         f"continue the first K"),
        (priors["plain"], ["--cond_from", tmp_path / "frames", "--context_frames", "2"],
         f"{tmp_path / 'frames' / '1.png'}: 20x16 pixels, but the first frame is 16x16"),
        (priors["framed"], ["--cond_from", tmp_path / "empty"],
         f"{tmp_path / 'empty'}: holds no images (.png, .jpg, .jpeg)"),
    ]
    for ckpt, argv, message in cases:
        with pytest.raises(SystemExit) as e:
            sample.main(["--ckpt", ckpt, "--n", "2", "--out", str(tmp_path / "x.gif"),
                         *map(str, argv)])
        assert str(e.value.code) == f"sample.py: error: {message}"
        assert not (tmp_path / "x.gif").exists()


# -----------------------------------------------------------------------------
# Scores for any videos: SSIM and PSNR of predicted frames, FVD between two sets


def test_ssim_is_the_standard_one():
    """metrics.ssim against scikit-image's structural_similarity with the same definition
    (Gaussian window, sigma 1.5, population statistics, per RGB channel), and against what it
    must be by hand."""
    from metrics import psnr_per_frame, ssim, ssim_per_frame
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 3, 24, 20, 3), dtype=np.uint8)       # (N, T, H, W, 3)
    b = np.clip(a + rng.normal(0, 25, a.shape), 0, 255).astype(np.uint8)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    # The models' layout, float (N, 3, T, H, W) in [-0.5, 0.5], gives the same numbers.
    as_float = lambda v: torch.from_numpy(v).permute(0, 4, 1, 2, 3).double() / 255 - 0.5
    assert ssim(as_float(a), as_float(b)) == pytest.approx(ssim(a, b), abs=1e-9)
    # PSNR by hand: a constant error of 5 levels is an MSE of 25.
    exact = np.minimum(a, 250)
    expected = torch.full((2, 3), 10 * np.log10(255 ** 2 / 25), dtype=torch.float64)
    torch.testing.assert_close(psnr_per_frame(exact, exact + 5), expected)
    metrics_skimage = pytest.importorskip("skimage.metrics", reason="scikit-image: the reference")
    per_frame = ssim_per_frame(a, b)                                    # (N, T)
    for i in range(2):
        for t in range(3):
            reference = metrics_skimage.structural_similarity(
                a[i, t], b[i, t], channel_axis=-1, gaussian_weights=True, sigma=1.5,
                use_sample_covariance=False, data_range=255)
            assert per_frame[i, t].item() == pytest.approx(reference, abs=1e-9)


def test_fvd_predict_scores_the_predicted_frames(priors, tmp_path):
    """PSNR and SSIM per predicted frame, and the best of the samples, on the data the prior was
    trained on (here the built-in digits), for an unconditional and a frame-conditional prior."""
    import fvd
    for name, given in (("plain", 2), ("framed", 1)):
        out = tmp_path / f"{name}.json"
        fvd.main(["predict", "--ckpt", priors[name], "--n", "3", "--samples", "2", "--out",
                  str(out), "--device", "cpu"])
        record = json.load(open(out))
        assert record["given_frames"] == given and record["predicted_frames"] == 4 - given
        assert record["data"] is None and record["samples"] == 2
        for score, low, high in (("psnr", 0, 100), ("ssim", -1, 1)):
            r = record[score]
            assert len(r["per_frame"]) == 4 - given and low < r["mean"] < high
            assert r["mean"] == pytest.approx(np.mean(r["per_frame"]))
            assert r["best_of_samples"]["mean"] >= r["mean"]


def test_fvd_between_any_two_sets_of_videos(monkeypatch, tmp_path, capsys):
    """--real and --fake read a .npy, a folder of video files or an HDF5 file's test split; a set
    smaller than --n is scored whole, and the record says how many. (The I3D network is replaced
    by a cheap stand-in here: the reading and counting are what is tested.)"""
    import fvd
    from conftest import gradient_video, write_video
    from prepare import write_hdf5
    # Each clip's mean colour over time and space: 3 features.
    features = lambda i3d, v, protocol, batch_size: torch.from_numpy(
        v.reshape(len(v), -1, 3).mean(1).astype(np.float64))                    # (N, 3)
    monkeypatch.setattr(fvd, "load_i3d", lambda *a, **kw: None)
    monkeypatch.setattr(fvd, "i3d_logits", features)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "real.npy", rng.integers(0, 256, (6, 12, 16, 16, 3), dtype=np.uint8))
    (tmp_path / "fake").mkdir()
    for i in range(4):
        write_video(tmp_path / "fake" / f"{i}.mp4", gradient_video(12, 16, 16, seed=i))
    out = str(tmp_path / "fvd.json")
    score = fvd.main(["--real", str(tmp_path / "real.npy"), "--fake", str(tmp_path / "fake"),
                      "--n", "5", "--frames", "10", "--i3d", "unused.pt", "--out", out])
    record = json.load(open(out))
    assert (record["n_real"], record["n_fake"], record["frames"]) == (5, 4, 10)
    assert record["scores"]["FVD"] == score > 0
    assert "(real N=5, fake N=4, 10 frames, protocol tf)" in capsys.readouterr().out
    # A set against itself is at distance 0; an HDF5 file's test split is a set too.
    videos = [rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8) for _ in range(8)]
    write_hdf5(str(tmp_path / "d.h5"), {"train": (videos, None), "test": (videos, None)})
    same = fvd.main(["--real", str(tmp_path / "d.h5"), "--fake", str(tmp_path / "d.h5"),
                     "--frames", "10"])
    assert same == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(SystemExit) as e:
        fvd.main(["--real", str(tmp_path / "real.npy"), "--fake", str(tmp_path / "fake"),
                  "--frames", "13"])
    assert str(e.value.code) == (f"fvd.py: error: {tmp_path / 'real.npy'}: a clip of 12 frames; "
                                 f"scoring needs 13")


# -----------------------------------------------------------------------------
# Data options: folders of frame images, --sample_every


def numbered_frames(n, side=16):
    """uint8 (n, side, side, 3) frames whose pixels hold their frame number (times 10)."""
    return np.repeat(np.arange(n, dtype=np.uint8)[:, None, None, None] * 10, side * side * 3
                     ).reshape(n, side, side, 3)


def frame_number(clip):
    """The frame numbers a preprocessed clip (3, T, H, W) holds, read back from its pixels."""
    return [round((float(f.mean()) + 0.5) * 255 / 10) for f in clip.unbind(1)]


def test_folders_of_frame_images_are_videos_and_sample_every_thins_them(tmp_path, monkeypatch):
    from PIL import Image
    import data
    root = tmp_path / "frames"
    for split, videos in (("train", [("Walk", "a", 12), ("Run", "b", 9)]),
                          ("test", [("Walk", "c", 12)])):
        for cls, name, n in videos:
            folder = root / split / cls / name
            folder.mkdir(parents=True)
            for t, frame in enumerate(numbered_frames(n)):
                Image.fromarray(frame).save(folder / f"{t:04d}.png")
    ds = data.make_dataset(str(root), 4, resolution=16)
    assert len(ds) == 2 and ds.classes == ["Run", "Walk"] and sorted(ds.labels) == [0, 1]
    start = data.window_start(12, 4, seed=5)
    assert frame_number(ds[(ds.labels.index(1), 5)]["video"]) == list(range(start, start + 4))
    # Every 3rd frame: a window of 4 then spans 10 frames, and the 9-frame video is too short.
    thin = data.make_dataset(str(root), 4, resolution=16, sample_every=3)
    assert len(thin) == 1
    start = data.window_start(12, 10, seed=7)
    assert frame_number(thin[(0, 7)]["video"]) == [start, start + 3, start + 6, start + 9]
    # The index written by the first read serves the later ones: nothing is counted again.
    assert (root / "train" / ".videogpt_index.json").exists()
    monkeypatch.setattr(data, "count_frames", lambda path: pytest.fail(f"counted {path}"))
    assert len(data.make_dataset(str(root), 4, resolution=16, sample_every=2)) == 2
    monkeypatch.undo()
    # HDF5 files alike; the built-in digits are drawn at their own speed.
    from prepare import write_hdf5
    splits = {s: ([numbered_frames(12)], None) for s in ("train", "test")}
    write_hdf5(str(tmp_path / "n.h5"), splits)
    h5 = data.make_dataset(str(tmp_path / "n.h5"), 4, resolution=16, sample_every=2)
    start = data.window_start(12, 7, seed=3)
    assert frame_number(h5[(0, 3)]["video"]) == [start, start + 2, start + 4, start + 6]
    with pytest.raises(ValueError, match=r"all 1 train videos are shorter than "
                                         r"sequence_length=4 every 4 frames \(13\) \(the longest "
                                         r"has 12 frames\)"):
        data.make_dataset(str(tmp_path / "n.h5"), 4, resolution=16, sample_every=4)
    with pytest.raises(ValueError, match="--sample_every 2: the built-in moving digits"):
        data.make_dataset(None, 4, resolution=16, sample_every=2)
    # And train.py reads them so.
    train_once("--stage", "vqvae", "--data", str(root), "--sample_every", "2",
               "--sequence_length", "4", "--resolution", "16", "--n_hiddens", "16",
               "--n_res_layers", "0", "--embedding_dim", "8", "--n_codes", "16",
               "--downsample", "2", "4", "4", "--batch_size", "2", "--out_dir",
               str(tmp_path / "run"), *ONE_STEP)
    saved = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert saved["train_args"]["sample_every"] == 2
