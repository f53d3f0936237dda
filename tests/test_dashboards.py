"""train.py --tensorboard and --wandb (run.Dashboards): what they hold, read back with each tool's
own format.

python -m pytest tests/test_dashboards.py

Both packages are optional dependencies (CI installs them); without one, its tests skip, except the
one-line errors that say what to install. W&B runs offline, as it does without network.
"""

import glob
import json
import os
import shutil
import struct
import sys

import pytest

from conftest import TINY, TINY_GPT, train_error


def needs(package):
    pytest.importorskip(package, reason=f"the optional {package} package (pip install {package})")


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """W&B with no network and nothing outside tmp_path: offline mode, its own folders, no console
    capture."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))


def tensorboard_scalars(out_dir):
    """{tag: {step: value}} and {tag: {step: encoded image bytes}} as TensorBoard's own reader sees
    them (which drops what a killed run logged past its checkpoint, `purge_step`)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(out_dir, "tb"),
                              size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)]
               for tag in events.Tags()["scalars"]}
    images = {tag: [(e.step, e.encoded_image_string) for e in events.Images(tag)]
              for tag in events.Tags()["images"]}
    return scalars, images


def wandb_history(out_dir):
    """The history rows ({key: value}, with _step) of every offline W&B run file in out_dir, in
    order. A .wandb file is W&B's 7-byte header, then LevelDB-log records (32 KiB blocks; each
    piece: checksum, length, type 1 full / 2 first / 3 middle / 4 last) holding protobuf Records."""
    from wandb.proto import wandb_internal_pb2
    rows = []
    for path in sorted(glob.glob(os.path.join(out_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        data, pos, piece = open(path, "rb").read(), 7, b""
        assert data[:4] == b":W&B", path
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            length, kind = struct.unpack("<HB", data[pos + 4:pos + 7]) if left >= 7 else (0, 0)
            if kind == 0:            # the zero padding at a block's end
                pos += left
                continue
            piece, pos = piece + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(piece)
                piece = b""
                if record.WhichOneof("record_type") == "history":
                    rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                 for i in record.history.item})
    return rows


def logged(out_dir):
    """{SPLIT/FIELD: {step: value}} of log.jsonl's numbers."""
    out = {}
    for r in map(json.loads, open(os.path.join(out_dir, "log.jsonl"))):
        for k, v in r.items():
            if k not in ("step", "split"):
                out.setdefault(f"{r['split']}/{k}", {})[r["step"]] = v
    return out


@pytest.fixture(scope="module")
def vqvae_ckpt(tmp_path_factory, digits_h5):
    import train
    out = str(tmp_path_factory.mktemp("vq"))
    train.train(train.parse_args(TINY + ["--data", digits_h5, "--out_dir", out, "--max_steps",
                                         "2"]))
    return os.path.join(out, "ckpt.pt")


def test_tensorboard_holds_every_logged_number_and_the_reconstructions(tmp_path, digits_h5):
    needs("tensorboard")
    import train
    out = str(tmp_path / "vq")
    train.train(train.parse_args(TINY + ["--data", digits_h5, "--out_dir", out, "--max_steps", "4",
                                         "--tensorboard"]))
    scalars, images = tensorboard_scalars(out)
    expected = logged(out)
    for name in ("train/loss", "train/recon_loss", "train/commitment_loss", "train/perplexity",
                 "train/lr",
                 "train/grad_norm", "train/clips_per_s", "test/loss", "test/recon_loss",
                 "test/perplexity"):
        assert name in scalars, (name, sorted(scalars))
    for name, by_step in expected.items():
        assert [s for s, _ in scalars[name]] == sorted(by_step), name
        for step, value in scalars[name]:
            # stored as float32
            assert value == pytest.approx(by_step[step], rel=1e-6), (name, step)
    assert [s for s, _ in images["test/recon"]] == [2, 4]
    assert all(png.startswith(b"\x89PNG") for _, png in images["test/recon"])
    assert images["test/recon"][-1][1] == open(os.path.join(out, "recon_0000004.png"), "rb").read()


def test_a_killed_and_resumed_prior_has_each_step_once_in_tensorboard_and_wandb(
        tmp_path, digits_h5, vqvae_ckpt, offline_wandb):
    """Killed after logging step 6 with its last checkpoint at step 4 (ckpt.pt put back to the
    step-4 copy), then run on to 8: each step once in both, the values log.jsonl has, the samples
    GIF as a video."""
    needs("tensorboard")
    needs("wandb")
    import train
    out = str(tmp_path / "gpt")
    argv = TINY_GPT + ["--data", digits_h5, "--vqvae", vqvae_ckpt, "--out_dir", out,
                       "--tensorboard",
                       "--wandb", "videogpt-tests", "--wandb_run", "tiny", "--keep_last", "3"]
    train.train(train.parse_args(argv + ["--max_steps", "6"]))
    run_id = open(os.path.join(out, "wandb_run_id")).read().strip()
    shutil.copy(os.path.join(out, "ckpt_0000004.pt"), os.path.join(out, "ckpt.pt"))
    train.train(train.parse_args(argv + ["--max_steps", "8"]))
    expected = logged(out)
    assert sorted(expected["train/loss"]) == list(range(1, 9))
    scalars, images = tensorboard_scalars(out)
    for name in ("train/loss", "train/bits_per_code", "train/lr", "test/loss"):
        assert [s for s, _ in scalars[name]] == sorted(expected[name]), name
        assert all(v == pytest.approx(expected[name][s], rel=1e-6) for s, v in scalars[name]), name
    assert [s for s, _ in images["test/samples"]] == [2, 4, 6, 8]
    # a video TensorBoard plays
    assert all(gif.startswith(b"GIF8") for _, gif in images["test/samples"])
    # W&B: one run id, resumed; every step once over the two offline run files, the same numbers.
    assert open(os.path.join(out, "wandb_run_id")).read().strip() == run_id
    assert len(glob.glob(os.path.join(out, "wandb", f"offline-run-*-{run_id}"))) == 2
    rows = wandb_history(out)
    assert [r["_step"] for r in rows] == list(range(1, 9))
    for r in rows:
        for name in ("train/loss", "test/loss"):
            if r["_step"] in expected[name]:
                assert r[name] == pytest.approx(expected[name][r["_step"]], rel=1e-6), (name,
                                                                                        r["_step"])
    # the GIF, as W&B keeps media
    videos = [r for r in rows if r.get("test/samples/_type") == "video-file"]
    assert [r["_step"] for r in videos] == [2, 4, 6, 8]
    assert all(r["test/samples/path"].endswith(".gif") and r["test/samples/size"] > 0
               for r in videos)


def test_without_the_packages_the_flags_say_what_to_install(tmp_path, digits_h5, monkeypatch):
    # import now raises ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "wandb", None)
    common = TINY + ["--data", digits_h5, "--max_steps", "1"]
    assert train_error(*common, "--out_dir", str(tmp_path / "a"), "--tensorboard") == \
        "train.py: error: --tensorboard needs the tensorboard package: pip install tensorboard"
    assert train_error(*common, "--out_dir", str(tmp_path / "b"), "--wandb", "p") == \
        "train.py: error: --wandb needs the wandb package: pip install wandb"
