"""Shared fixtures: the project root on sys.path, a private cache folder, small video files.

Run the whole suite with `python -m pytest` from the repository root.
"""

import os
import sys

import h5py
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Generated data and indexes go to a temp folder, never to ~/.cache."""
    monkeypatch.setenv("VIDEOGPT_CACHE", str(tmp_path / "cache"))


def write_video(path, frames, codec=None, fps=10):
    """Write uint8 frames (T, H, W, 3) to `path` with PyAV; the codec follows the extension."""
    import av
    codec = codec or {".mp4": "libx264", ".avi": "mpeg4", ".webm": "libvpx"}[os.path.splitext(path)[1]]
    T, H, W, _ = frames.shape
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def gradient_video(T, H, W, seed=0):
    """A smooth, moving colour pattern that survives lossy codecs."""
    t, y, x = np.meshgrid(np.arange(T), np.arange(H), np.arange(W), indexing="ij")
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 6, size=3)
    video = np.stack([127 + 100 * np.sin(0.2 * x + 0.3 * t + phase[0]),
                      127 + 100 * np.sin(0.15 * y - 0.2 * t + phase[1]),
                      127 + 100 * np.sin(0.1 * (x + y) + phase[2]) * np.ones_like(t)], axis=-1)
    return video.astype(np.uint8)


@pytest.fixture(scope="session")
def digits_h5(tmp_path_factory):
    """A tiny moving-digits HDF5 file: 6 train and 2 test videos of 6 frames at 32x32, labels 0/1."""
    from data import moving_digits
    path = tmp_path_factory.mktemp("data") / "digits.h5"
    with h5py.File(path, "w") as f:
        for split, n in (("train", 6), ("test", 2)):
            videos = moving_digits(n, frames=6, resolution=32, seed=0, train=split == "train")
            f.create_dataset(f"{split}_data", data=videos.reshape(-1, 32, 32, 3))
            f.create_dataset(f"{split}_idx", data=np.arange(n) * 6)
            f.create_dataset(f"{split}_labels", data=np.arange(n) % 2)
    return str(path)


class Exploit:
    """A pickle payload that would run a shell command when unpickled (it must never be)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"echo owned > {self.target}",))
