"""Datasets, preprocessing and the data.py command line: python -m pytest tests/test_data.py"""

import json
import os

import h5py
import numpy as np
import pytest
import torch

from conftest import ROOT, gradient_video, run_script, write_video
from data import (HDF5Dataset, MovingDigitsDataset, VideoFolderDataset, make_dataset, preprocess,
                  to_uint8, window_start)
from data import moving_digits


def test_preprocess_non_square_scales_shorter_side_and_center_crops():
    # 6 frames of 20x40: a left half of 0s and a right half of 255s, with a 10-pixel band of 128 in
    # the middle.
    video = np.zeros((6, 20, 40, 3), np.uint8)
    video[:, :, 20:] = 255
    video[:, :, 15:25] = 128
    out = preprocess(video, resolution=10, sequence_length=4)
    assert out.shape == (3, 4, 10, 10) and out.dtype == torch.float32
    assert out.min() >= -0.5 and out.max() <= 0.5
    # Scaled to 10x20, the crop keeps columns 5..14 of it: the middle band maps to columns
    # 7.5..12.5.
    row = out[0, 0, 5]
    assert row[0] == pytest.approx(-0.5) and row[-1] == pytest.approx(0.5)
    assert row[4] == pytest.approx(128 / 255 - 0.5, abs=1e-6)
    # Tall input: the crop is vertical.
    assert preprocess(np.zeros((2, 50, 30, 3), np.uint8), 16).shape == (3, 2, 16, 16)
    # Grayscale is repeated to three channels.
    gray = preprocess(np.full((2, 8, 8, 1), 255, np.uint8), 8)
    assert gray.shape == (3, 2, 8, 8) and torch.all(gray == 0.5)


def test_preprocess_is_exact_at_native_resolution_and_inverts_to_uint8():
    video = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    assert np.array_equal(to_uint8(preprocess(video, 16)).numpy(), video)


def test_window_start_allows_exact_length_and_is_seeded():
    assert window_start(8, 8) == 0 and window_start(8, 8, seed=123) == 0
    starts = {window_start(20, 8, seed=s) for s in range(200)}
    assert starts == set(range(13))
    assert window_start(20, 8, seed=5) == window_start(20, 8, seed=5)


def write_h5(path, lengths, size=8, labels=None, split="train"):
    """Videos whose frames are filled with (video index * 10 + frame number)."""
    videos = [np.stack([np.full((size, size, 3), 10 * v + f, np.uint8) for f in range(n)])
              for v, n in enumerate(lengths)]
    with h5py.File(path, "w") as f:
        for s in ("train", "test"):
            f.create_dataset(f"{s}_data", data=np.concatenate(videos))
            f.create_dataset(f"{s}_idx", data=np.cumsum([0] + list(lengths[:-1])))
            if labels is not None:
                f.create_dataset(f"{s}_labels", data=np.asarray(labels))
    return videos


def test_hdf5_reads_windows_including_exact_length_videos(tmp_path):
    path = tmp_path / "set.h5"
    write_h5(path, lengths=[4, 6, 3], labels=[2, 0, 1])  # the last video (3 frames) is too short
    with pytest.warns(UserWarning, match="skipping 1 train videos shorter than sequence_length=4"):
        ds = HDF5Dataset(path, sequence_length=4, resolution=8)
    assert len(ds) == 2 and ds.n_skipped == 1 and ds.n_classes == 3
    # Video 0 is exactly 4 frames long: its only window is all of it.
    item = ds[0]
    frames = to_uint8(item["video"]).numpy()[:, 0, 0, 0]
    assert frames.tolist() == [0, 1, 2, 3] and item["label"] == 2
    # Video 1 has 3 windows; the seeded form picks the same one every time.
    seen = {tuple(to_uint8(ds[(1, s)]["video"]).numpy()[:, 0, 0, 0]) for s in range(50)}
    assert seen == {(10, 11, 12, 13), (11, 12, 13, 14), (12, 13, 14, 15)}
    assert torch.equal(ds[(1, 7)]["video"], ds[(1, 7)]["video"])


def test_hdf5_works_in_dataloader_workers(tmp_path):
    path = tmp_path / "set.h5"
    write_h5(path, lengths=[5, 5, 5, 5])
    ds = HDF5Dataset(path, sequence_length=4, resolution=8)
    ds[0]                                                   # the parent opens its handle first
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    batches = [b["video"] for b in loader]
    assert len(batches) == 2 and batches[0].shape == (2, 3, 4, 8, 8)


def test_hdf5_errors_name_the_file_and_problem(tmp_path):
    with h5py.File(tmp_path / "nokeys.h5", "w") as f:
        f.create_dataset("frames", data=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"nokeys.h5: missing HDF5 key\(s\) train_data, train_idx"):
        HDF5Dataset(tmp_path / "nokeys.h5", 4)
    write_h5(tmp_path / "short.h5", lengths=[3, 2])
    with pytest.raises(ValueError,
                       match="short.h5: all 2 train videos are shorter than sequence_length=8"):
        HDF5Dataset(tmp_path / "short.h5", 8)
    with h5py.File(tmp_path / "float.h5", "w") as f:
        f.create_dataset("train_data", data=np.zeros((4, 8, 8, 3), np.float32))
        f.create_dataset("train_idx", data=np.array([0]))
    with pytest.raises(ValueError, match="float.h5: train_data must be uint8"):
        HDF5Dataset(tmp_path / "float.h5", 4)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match="text.h5: not a readable HDF5 file"):
        HDF5Dataset(tmp_path / "text.h5", 4)
    with pytest.raises(FileNotFoundError, match="missing.h5: no such file or folder"):
        make_dataset(str(tmp_path / "missing.h5"), 4)


def make_folder(root):
    """train/cats: an mp4 and an avi; train/dogs: an mp4 and a corrupt file; test/dogs: a webm-free
    mp4."""
    for rel, T, seed in [("train/cats/a.mp4", 12, 0), ("train/cats/b.avi", 10, 1),
                         ("train/dogs/c.mp4", 9, 2), ("test/dogs/d.mp4", 8, 3)]:
        os.makedirs(os.path.dirname(root / rel), exist_ok=True)
        write_video(root / rel, gradient_video(T, 24, 32, seed))
    (root / "train/dogs/broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))


def test_video_folder_reads_mp4_and_avi_skips_corrupt_and_caches_index(tmp_path):
    make_folder(tmp_path)
    with pytest.warns(UserWarning, match="broken.mp4: cannot be decoded, skipped"):
        ds = VideoFolderDataset(tmp_path, sequence_length=8, resolution=16)
    assert [os.path.basename(p) for p in ds.paths] == ["a.mp4", "b.avi", "c.mp4"]
    assert ds.lengths == [12, 10, 9] and ds.n_skipped == 1
    assert ds.classes == ["cats", "dogs"] and ds.labels == [0, 0, 1]
    item = ds[(1, 0)]
    assert item["video"].shape == (3, 8, 16, 16) and item["label"] == 0
    # The decoded clip looks like what was written (lossy codecs: a loose bound).
    expected = preprocess(gradient_video(10, 24, 32, 1), 16)
    start = window_start(10, 8, seed=0)
    assert (item["video"] - expected[:, start:start + 8]).abs().mean() < 0.05
    # The sidecar holds the frame counts; a second start reads it and decodes nothing.
    index = json.load(open(tmp_path / "train" / ".videogpt_index.json"))["files"]
    assert index[os.path.join("cats", "a.mp4")]["frames"] == 12
    assert index[os.path.join("dogs", "broken.mp4")]["frames"] is None
    import data
    calls = []
    original = data.count_frames
    data.count_frames = lambda p: calls.append(p) or original(p)
    try:
        with pytest.warns(UserWarning):
            again = VideoFolderDataset(tmp_path, sequence_length=8, resolution=16)
    finally:
        data.count_frames = original
    assert calls == [] and again.lengths == ds.lengths
    test = VideoFolderDataset(tmp_path, sequence_length=8, train=False, resolution=16)
    assert test.labels == [1]                                # classes shared with the train split


def test_video_folder_with_no_usable_video_is_a_clear_error(tmp_path):
    os.makedirs(tmp_path / "train" / "x")
    (tmp_path / "train" / "x" / "a.mp4").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(ValueError,
                                                  match="no usable video among 1 files: none of "
                                                        "them can be decoded"):
        VideoFolderDataset(tmp_path, sequence_length=4)
    with pytest.raises(FileNotFoundError, match="has no 'test' folder"):
        VideoFolderDataset(tmp_path, sequence_length=4, train=False)


def test_moving_digits_are_deterministic_and_splits_differ():
    a = moving_digits(3, frames=6, resolution=32, seed=1)
    b = moving_digits(3, frames=6, resolution=32, seed=1)
    assert a.shape == (3, 6, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, moving_digits(3, frames=6, resolution=32, seed=2))
    assert not np.array_equal(a, moving_digits(3, frames=6, resolution=32, seed=1, train=False))
    # Something moves, and there is ink in every frame.
    assert (a[:, 0] != a[:, -1]).any() and (a.reshape(3, 6, -1).max(-1) > 200).all()
    ds = MovingDigitsDataset(5, sequence_length=6, resolution=32, seed=1)
    assert torch.equal(to_uint8(ds[2]["video"]), torch.from_numpy(a[2]))
    # Every fully inked pixel of a digit drawn alone has one of the palette's six colours.
    from data import PALETTE, moving_digits_video
    # (4, 32, 32, 3)
    one = moving_digits_video(np.random.default_rng(0), frames=4, resolution=32, n_digits=1)
    full = one[one.max(-1) == 255]  # (n, 3)
    palette = (PALETTE * 255).round().astype(np.uint8)
    assert len(full) > 20 and (full[:, None] == palette[None]).all(-1).any(-1).all()
    assert len(np.unique(full, axis=0)) == 1


def test_moving_digits_start_on_the_latent_grid_and_move_one_cell_per_latent_step():
    # A lone digit: every frame is the first one shifted by whole pixels; the corner of its glyph's
    # square starts on the 4-pixel grid at 32x32 (8 at 64x64) and moves 2 pixels (4) a frame along
    # each axis it moves on, bouncing off the walls, so at every other frame (every latent step of
    # the digits VQ-VAE) it is on the grid again.
    from data import DIRECTIONS, digit_glyphs, moving_digits_video
    for resolution, speed, grid in ((32, 2, 4), (64, 4, 8)):
        g = round(resolution * 24 / 64)
        moved = set()
        for seed in range(12):
            digits = []
            ink = moving_digits_video(np.random.default_rng(seed), frames=8, resolution=resolution,
                                      n_digits=1,
                                      digits=digits).max(-1)                        # (8, R, R)
            ys, xs = np.nonzero(digit_glyphs(g)[digits[0]])
            margin = np.array([ys.min(), xs.min()])  # glyph ink inside its square
            corners = []
            for t in range(8):
                ys, xs = np.nonzero(ink[t])
                corners.append(np.array([ys.min(), xs.min()]) - margin)
            corners = np.stack(corners)  # (8, 2) the square's corner
            for t in range(8):
                assert np.array_equal(ink[t],
                                      np.roll(ink[0], tuple(corners[t] - corners[0]), axis=(0, 1)))
            assert ((corners[::2] % grid == 0).all() and corners.min() >= 0
                    and corners.max() <= resolution - g)
            step = np.abs(np.diff(corners, axis=0))  # (7, 2) pixels per frame
            assert set(np.unique(step)) <= {0, speed} and step.any()
            moved.add(tuple(np.sign(corners[1] - corners[0])))
        assert len(moved) >= 4  # several of the 8 directions
    assert len(DIRECTIONS) == 8 and not (DIRECTIONS == 0).all(-1).any()
    # The digit reader's frames are drawn to the pixel, anywhere in the frame.
    offsets = set()
    for seed in range(40):
        v = moving_digits_video(np.random.default_rng(seed), frames=1, resolution=32, n_digits=1,
                                grid=1)
        ys, xs = np.nonzero(v[0].max(-1))
        offsets.add((ys.min() % 4, xs.min() % 4))
    assert len(offsets) > 8


def test_moving_digits_start_apart_and_still_overlap_as_they_move():
    # Solid squares for glyphs: the inked area of a frame is 2 * 12 * 12 exactly when the two
    # squares do not overlap. Every clip starts with them apart; they meet later in some clips;
    # drawn anywhere (apart=False, as the digit reader's frames are) some start overlapped.
    from data import moving_digits_video
    squares = np.ones((10, 12, 12), np.float32)
    video = lambda seed, **kw: moving_digits_video(np.random.default_rng(seed), frames=8,
                                                   resolution=32, glyphs=squares, **kw)
    # (60, 8) inked pixels
    area = lambda **kw: np.stack([(video(seed, **kw).max(-1) > 0).sum((1, 2))
                                  for seed in range(60)])
    apart, anywhere = area(), area(apart=False)
    assert (apart[:, 0] == 2 * 144).all() and (apart < 2 * 144).any()
    assert (anywhere[:, 0] < 2 * 144).any()
    # Three digits still fit apart at 32x32.
    assert (area(n_digits=3)[:, 0] == 3 * 144).all()


def test_cli_digits_inspect_and_folder_to_hdf5(tmp_path, monkeypatch, capsys):
    from prepare.__main__ import main as prepare_main
    # From another folder than the repository's: relative paths are the user's.
    run = lambda *a: run_script("-m prepare", *a, cwd=tmp_path,
                                env=dict(os.environ, PYTHONPATH=ROOT))
    r = run("digits", "md.h5", "--n_videos", "4", "--frames", "6", "--resolution", "32")
    assert r.returncode == 0, r.stderr
    with h5py.File(tmp_path / "md.h5") as f:
        assert f["train_data"].shape == (24, 32, 32, 3) and list(f["train_idx"]) == [0, 6, 12, 18]
        assert f["test_idx"].shape == (1,)
    make_folder(tmp_path / "vids")
    r = run("folder", "vids", "vids.h5", "--resolution", "16")
    assert r.returncode == 0, r.stderr
    assert "warning: " in r.stderr and "broken.mp4: cannot be decoded" in r.stderr
    ds = HDF5Dataset(tmp_path / "vids.h5", sequence_length=8, resolution=16)
    assert len(ds) == 3 and ds.n_classes == 2
    # inspect, in this process: counts and a contact sheet beside the user, or one line.
    monkeypatch.chdir(tmp_path)
    prepare_main(["inspect", "md.h5", "--frames", "4", "--resolution", "32"])
    assert ("train: 4 videos, 24 frames" in capsys.readouterr().out
            and (tmp_path / "md_sheet.png").exists())
    with pytest.raises(SystemExit) as e:
        prepare_main(["inspect", "nothing_here"])
    assert str(e.value.code) == "prepare: error: nothing_here: no such file or folder"


def test_pictures_enlarge_small_frames_by_a_whole_factor():
    from checkpoints import grid_video, upscale, video_grid
    clips = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32, 3), dtype=np.uint8)
    big = upscale(clips)                                        # 32 -> 128: each pixel a 4x4 block
    assert big.shape == (2, 3, 128, 128, 3) and np.array_equal(big[:, :, ::4, ::4], clips)
    assert np.array_equal(big[0, 0, 4:8, 8:12], np.broadcast_to(clips[0, 0, 1, 2], (4, 4, 3)))
    sheet = video_grid(clips)                                   # a clip per row, 2-pixel white gaps
    assert sheet.shape == (2 * 130 - 2, 3 * 130 - 2, 3) and (sheet[128:130] == 255).all()
    assert grid_video(clips, ncol=2).shape == (3, 128, 258, 3)
    large = np.zeros((1, 2, 200, 100, 3), np.uint8)
    assert upscale(large) is large                              # already large enough: untouched
