"""Bad input: one line naming the file; damaged and foreign files; checkpoints that would run code.

python -m pytest tests/test_bad_input.py
"""

import ast
import glob
import os
import warnings

import h5py
import numpy as np
import torch

from conftest import ROOT, TINY, Exploit, gradient_video, run_script, train_error, write_video

# Every Python file of the project: the top level and the converters' folder.
PYTHON_FILES = sorted(os.path.relpath(p, ROOT) for pattern in ("*.py", "prepare/*.py")
                      for p in glob.glob(os.path.join(ROOT, pattern)))

# -----------------------------------------------------------------------------
# Bad input


def write_h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f.create_dataset(k, data=v)


def test_bad_input_is_one_line_naming_the_file(tmp_path, digits_h5):
    frames = np.zeros((8, 16, 16, 3), np.uint8)
    write_h5(tmp_path / "range.h5", train_data=frames, train_idx=np.array([0, 12]))
    write_h5(tmp_path / "shape.h5", train_data=np.zeros((8, 16, 16), np.uint8),
             train_idx=np.array([0]))
    (tmp_path / "not_a_dir").write_text("a file")
    good = ["--data", digits_h5, "--max_steps", "1"]
    out = ["--out_dir", str(tmp_path / "out")]
    cases = [
        (["--data", str(tmp_path / "range.h5"), *out],
         "range.h5: train_idx must be increasing start frames within [0, 8), got values in "
         "[0, 12]"),
        (["--data", str(tmp_path / "shape.h5"), *out],
         "shape.h5: train_data must be uint8 (N_frames, H, W, 3), got uint8 (8, 16, 16)"),
        ([*good, "--out_dir", str(tmp_path / "not_a_dir" / "run")],
         "not_a_dir/run: cannot write there (Not a directory)"),
    ]
    for extra, message in cases:
        assert message in train_error(*TINY, "--max_steps", "1", *extra)
    # sample.py: a truncated checkpoint, and an output folder that cannot exist.
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04" + bytes(50))
    r = run_script("sample.py", "--ckpt", tmp_path / "cut.pt", "--out", tmp_path / "s.gif")
    assert r.returncode == 1 and r.stderr.strip() == (f"sample.py: error: {tmp_path / 'cut.pt'}: "
                                                      "not a readable PyTorch checkpoint "
                                                      "(truncated or corrupt?): RuntimeError")
    r = run_script("sample.py", "--ckpt", tmp_path / "cut.pt", "--out",
                   tmp_path / "not_a_dir" / "s.gif")
    assert (r.returncode == 1
            and r.stderr.strip() == f"sample.py: error: {tmp_path / 'not_a_dir'}: cannot write "
            "there (a file, not a folder)")


def write_odd_video(path, frames, pix_fmt):
    """A lossless AVI (FFV1) in any pixel format, any frame size."""
    import av
    T, H, W, _ = frames.shape
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = W, H, pix_fmt
        for frame in frames:
            image = av.VideoFrame.from_ndarray(frame[..., 0] if pix_fmt == "gray" else frame,
                                               format="gray" if pix_fmt == "gray" else "rgb24")
            for packet in stream.encode(image.reformat(format=pix_fmt)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_grayscale_and_odd_sized_videos_are_converted(tmp_path):
    from data import VideoFolderDataset, preprocess
    os.makedirs(tmp_path / "train" / "a")
    video = gradient_video(6, 21, 35)                                   # odd height and width
    gray = np.repeat(video[..., :1], 3, axis=-1)
    write_odd_video(tmp_path / "train" / "a" / "gray.avi", gray, "gray")
    write_odd_video(tmp_path / "train" / "a" / "odd.avi", video, "bgr0")
    ds = VideoFolderDataset(tmp_path, sequence_length=6, resolution=16)
    assert ds.n_skipped == 0 and len(ds) == 2
    for i, expected in ((0, gray), (1, video)):
        clip = ds[(i, 0)]["video"]
        assert clip.shape == (3, 6, 16, 16)
        # Lossless codec: exactly the preprocessed frames (grayscale comes back as three equal
        # channels).
        torch.testing.assert_close(clip, preprocess(expected, 16), atol=1 / 255, rtol=0)


def mutations(data, rng):
    """Random bytes, truncations and bit flips of a valid file's bytes."""
    out = [b"", bytes([7]), rng.bytes(3000), rng.bytes(len(data))]
    out += [data[: int(len(data) * f)] for f in (0.01, 0.1, 0.5, 0.9, 0.99)]
    for _ in range(6):
        b = bytearray(data)
        for i in rng.integers(len(b), size=8):
            b[i] ^= 1 << int(rng.integers(8))
        out.append(bytes(b))
    return out


def test_fuzzed_hdf5_video_and_checkpoint_files_give_only_clear_errors(tmp_path):
    """Whatever the bytes: success, or a ValueError/FileNotFoundError naming the file, never another
    exception."""
    from data import HDF5Dataset, VideoFolderDataset
    from prepare import write_hdf5
    from data import moving_digits
    from gpt import load_gpt
    from vqvae import VQVAE, VQVAEConfig, load_vqvae
    rng = np.random.default_rng(0)
    videos = list(moving_digits(3, frames=6, resolution=16, seed=0))
    write_hdf5(tmp_path / "ok.h5", {"train": (videos, [0, 1, 0]), "test": (videos[:1], [0])})
    write_video(tmp_path / "ok.mp4", gradient_video(8, 16, 16))
    config = VQVAEConfig(embedding_dim=8, n_codes=16, n_hiddens=16, n_res_layers=1,
                         downsample=(2, 4, 4), sequence_length=4, resolution=16)
    torch.save(dict(stage="vqvae", config=config.to_dict(), model=VQVAE(config).state_dict()),
               tmp_path / "ok.pt")

    def expect_clear(fn, name):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn()
        except (ValueError, FileNotFoundError) as e:
            assert name in str(e) and "\n" not in str(e), str(e)

    for k, blob in enumerate(mutations((tmp_path / "ok.h5").read_bytes(), rng)):
        path = tmp_path / f"h5_{k}.h5"
        path.write_bytes(blob)
        expect_clear(lambda: [ds[(i, 0)] for ds in [HDF5Dataset(path, 4, resolution=16)]
                              for i in range(len(ds))],
                     path.name)
    for k, blob in enumerate(mutations((tmp_path / "ok.mp4").read_bytes(), rng)):
        # The damaged video sits among good ones: it is read, or skipped with a warning and counted.
        root = tmp_path / f"videos_{k}"
        os.makedirs(root / "train" / "a")
        for name in ("good1.mp4", "good2.mp4"):
            (root / "train" / "a" / name).write_bytes((tmp_path / "ok.mp4").read_bytes())
        (root / "train" / "a" / "bad.mp4").write_bytes(blob)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = VideoFolderDataset(root, 4, resolution=16)
            items = [ds[(i, 0)] for i in range(len(ds))]
        skipped = [w for w in caught if "bad.mp4: cannot be decoded, skipped" in str(w.message)]
        assert len(items) == len(ds) == 3 - ds.n_skipped and len(skipped) <= ds.n_skipped <= 1
        assert all(it["video"].shape == (3, 4, 16, 16) for it in items)
    for k, blob in enumerate(mutations((tmp_path / "ok.pt").read_bytes(), rng)):
        path = tmp_path / f"ckpt_{k}.pt"
        path.write_bytes(blob)
        expect_clear(lambda: load_vqvae(path), path.name)
        expect_clear(lambda: load_gpt(path), path.name)


# -----------------------------------------------------------------------------
# Safe loading


def calls(tree, owner, name):
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute)
            and n.func.attr == name and isinstance(n.func.value, ast.Name)
            and n.func.value.id == owner]


def test_every_load_in_the_project_is_weights_only_and_no_raw_unpickling():
    for name in PYTHON_FILES:
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        for call in calls(tree, "torch", "load"):
            kw = {k.arg: k.value for k in call.keywords}
            safe = kw.get("weights_only")
            assert isinstance(safe, ast.Constant) and safe.value is True, (
                f"{name}:{call.lineno}: torch.load without weights_only=True")
        for fn in ("load", "loads"):
            assert not calls(tree, "pickle", fn), f"{name}: pickle.{fn} unpickles anything"
        for call in calls(tree, "np", "load"):
            assert not any(k.arg == "allow_pickle" for k in call.keywords), (
                f"{name}:{call.lineno}: np.load(allow_pickle)")


def test_planted_pickles_are_refused_everywhere_a_file_is_loaded(tmp_path, digits_h5):
    target = tmp_path / "owned.txt"
    evil = dict(stage="vqvae", config={}, model={"w": Exploit(target)})
    # A checkpoint to resume from, in --out_dir; a prior's --vqvae.
    os.makedirs(tmp_path / "run")
    torch.save(evil, tmp_path / "run" / "ckpt.pt")
    message = train_error(*TINY, "--data", digits_h5, "--out_dir", str(tmp_path / "run"),
                          "--max_steps", "1")
    assert "ckpt.pt: refused to load: it names posix.system" in message
    torch.save(evil, tmp_path / "evil.pt")
    message = train_error("--stage", "gpt", "--vqvae", str(tmp_path / "evil.pt"), "--data",
                          digits_h5, "--out_dir", str(tmp_path / "gpt"), "--device", "cpu")
    assert "evil.pt: refused to load: it names posix.system" in message
    # sample.py's --ckpt, fvd.py's --ckpt and --i3d, as commands.
    for script, args in (("sample.py",
                          ["--ckpt", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "s.gif")]),
                         ("fvd.py",
                          ["--ckpt", str(tmp_path / "evil.pt"), "--data", digits_h5, "--i3d",
                                     str(tmp_path / "evil.pt")])):
        r = run_script(script, *args)
        assert r.returncode == 1 and "evil.pt: " in r.stderr, (script, r.stderr)
        assert "Traceback" not in r.stderr, (script, r.stderr)
    # The prior stage's code cache in --out_dir.
    import train
    train.train(train.parse_args(TINY + ["--data", digits_h5, "--out_dir", str(tmp_path / "vq"),
                                         "--max_steps", "1"]))
    os.makedirs(tmp_path / "cached")
    torch.save({"train": Exploit(target)}, tmp_path / "cached" / "codes.pt")
    message = train_error("--stage", "gpt", "--vqvae", str(tmp_path / "vq" / "ckpt.pt"), "--data",
                          digits_h5,
                          "--cache_codes", "--out_dir", str(tmp_path / "cached"), "--max_steps",
                          "1", "--device", "cpu", "--num_workers", "0")
    assert "codes.pt: not a readable codes cache (UnpicklingError); delete it" in message
    assert not target.exists()
