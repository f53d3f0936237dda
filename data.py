"""Video data in and out: preprocessing, the datasets, video files and pictures.

Every dataset yields dicts `{"video": (3, T, H, W) float in [-0.5, 0.5]}`, plus `"label"`, and
per-frame `"actions"` and `"states"` where the data has them. Both training stages read these.

* `HDF5Dataset` reads the original VideoGPT layout: `train_data` uint8 (N_frames, H, W, 3) holds
  all videos' frames back to back, `train_idx` int64 (N_videos,) their start frames, and the
  same for `test_`; labels, actions, states and class names are optional.
* `VideoFolderDataset` reads `ROOT/{train,test}/**/*.{mp4,avi,webm}` with PyAV; a video's class
  is its parent folder, and frame counts are indexed once, in a sidecar file.
* `MovingDigitsDataset` is the built-in default: digits bouncing in a black frame, drawn here.

An item is one video's random `sequence_length` window. Asked for as `(index, seed)`, the window
is fixed, so the data a run sees is a pure function of its seed and step, whatever the DataLoader
workers do. Out: checkpoints.py tiles clips into pictures (`video_grid`, `grid_video`) and writes
them whole or not at all (`save_gif`, `save_mp4`, `save_png`). `python -m prepare` makes datasets.
"""

import concurrent.futures
import functools
import glob
import hashlib
import json
import math
import os
import sys
import warnings

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from checkpoints import atomic_write
# Writing video files and grids lives in checkpoints.py now; the names still import from here.
from checkpoints import grid_video, save_gif, save_mp4, save_png, upscale, video_grid  # noqa: F401
from runtime import cache_dir, first_line

VIDEO_EXTS = (".mp4", ".avi", ".webm")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")


# -----------------------------------------------------------------------------
# Preprocessing


def resize_and_crop(frames, size):
    """Float frames (N, C, H, W) -> (N, C, size, size): the shorter side scaled to `size`, then a
    center crop. Bilinear with align_corners=False, the longer side rounded up, as in the
    original; the FVD protocol of the original VideoGPT script uses it too (to 224)."""
    N, C, H, W = frames.shape
    scale = size / min(H, W)
    target = (size, math.ceil(W * scale)) if H < W else (math.ceil(H * scale), size)
    if target != (H, W):
        frames = F.interpolate(frames, size=target, mode="bilinear",
                               align_corners=False)                      # (N, C, H', W')
    top, left = (frames.shape[2] - size) // 2, (frames.shape[3] - size) // 2
    return frames[:, :, top:top + size, left:left + size]                # (N, C, size, size)


def preprocess(video, resolution, sequence_length=None):
    """uint8 video (T, H, W, C) -> float (3, T, resolution, resolution) in [-0.5, 0.5]: the
    first `sequence_length` frames if given, resized and cropped square (resize_and_crop).
    Grayscale (C=1) is repeated to RGB."""
    video = torch.as_tensor(np.asarray(video))
    assert video.dim() == 4 and video.shape[-1] in (1, 3), \
        f"expected a video of shape (T, H, W, 1 or 3), got {tuple(video.shape)}"
    if sequence_length is not None:
        assert sequence_length <= video.shape[0], \
            f"sequence_length={sequence_length} is longer than the video ({video.shape[0]} frames)"
        video = video[:sequence_length]
    video = video.permute(0, 3, 1, 2).float() / 255.0                     # (T, C, H, W)
    if video.shape[1] == 1:
        video = video.expand(-1, 3, -1, -1)                               # (T, 3, H, W)
    video = resize_and_crop(video, resolution)                            # (T, 3, R, R)
    return video.permute(1, 0, 2, 3).contiguous() - 0.5                 # (3, T, R, R)


def to_uint8(video):
    """float (..., 3, T, H, W) in [-0.5, 0.5] -> uint8 (..., T, H, W, 3), the I/O layout."""
    video = ((video.detach().float().cpu() + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return video.movedim(-4, -1)  # (..., T, H, W, 3)


def frame_conditioning(videos, k, width=2):
    """Paint a red border on the first k frames of uint8 (N, T, H, W, 3) clips: the frames given to
    a frame-conditional prior, as the paper's figures show them."""
    videos = np.array(videos)
    if k:
        red = np.array([255, 0, 0], np.uint8)
        videos[:, :k, :width], videos[:, :k, -width:] = red, red
        videos[:, :k, :, :width], videos[:, :k, :, -width:] = red, red
    return videos


def samples_to_uint8(video, frames=None, mark=True):
    """Decoded samples (B, 3, T, H, W) -> uint8 clips (B, T, H, W, 3) to show or score.

    A frame-conditional prior's samples start with its k given frames (B, 3, k, H, W). Those are
    put back exactly as given, since the VQ-VAE's decoding of them is only an approximation, and
    with `mark` they are framed in red, as in the paper's figures."""
    video = video.detach().float().clamp(-0.5, 0.5)
    k = 0 if frames is None else frames.shape[2]
    if k:
        video = torch.cat([frames.to(video), video[:, :, k:]], dim=2)   # (B, 3, T, H, W)
    clips = to_uint8(video).numpy()                                      # (B, T, H, W, 3)
    return frame_conditioning(clips, k) if mark else clips


def window_start(n_frames, sequence_length, seed=None):
    """Random start of a `sequence_length` window in a video of `n_frames` frames.

    original: drew from range(n_frames - sequence_length), which crashed on a video exactly
    `sequence_length` long; here that video is valid."""
    high = n_frames - sequence_length + 1
    if seed is None:
        return int(torch.randint(high, ()).item())
    return int(np.random.default_rng(seed).integers(high))


def split_item(item):
    """A dataset index is an int, or (int, seed) to fix the random window."""
    if isinstance(item, (tuple, list)):
        return int(item[0]), int(item[1])
    return int(item), None


# -----------------------------------------------------------------------------
# What both file-backed datasets share: a clip that cannot be read is replaced, not fatal


class VideoFileDataset(Dataset):
    """Base of the HDF5 and video-folder datasets; subclasses define `load(i, seed)` and `where(i)`.

    Every file is checked when the dataset is built, so a read that fails later means the data
    changed or a disk went bad during the run. Rather than stop a run hours in for one bad clip,
    the next video is read, with a one-line warning; only a long run of failures is an error.
    """

    max_read_failures = 8
    sample_every = 1   # take every K-th frame: a window then spans (T - 1) * K + 1 frames

    @property
    def span(self):
        """The frames a window covers, of which it keeps every sample_every-th."""
        return (self.sequence_length - 1) * self.sample_every + 1

    def window_text(self):
        """What a video must be at least as long as, for messages."""
        every = f" every {self.sample_every} frames ({self.span})" * (self.sample_every > 1)
        return f"sequence_length={self.sequence_length}{every}"

    def __getitem__(self, item):
        i, seed = split_item(item)
        for attempt in range(min(len(self), self.max_read_failures)):
            j = (i + attempt) % len(self)
            try:
                return self.load(j, seed)
            except Exception as e:  # any decoder or I/O failure: try the next video
                warnings.warn(f"{self.where(j)}: could not be read ({first_line(e)}); using the "
                              f"next video instead")
        raise ValueError(f"{self.where(i)}: {self.max_read_failures} videos in a row could not be "
                         f"read; the data changed or is damaged since the run started")


# -----------------------------------------------------------------------------
# HDF5 datasets (the original VideoGPT layout)


class HDF5Dataset(VideoFileDataset):
    """Videos stored as in the original VideoGPT HDF5 files; see the module docstring."""

    def __init__(self, path, sequence_length, train=True, resolution=64, sample_every=1):
        super().__init__()
        self.path = os.fspath(path)
        self.sequence_length, self.resolution = sequence_length, resolution
        self.sample_every = sample_every
        self.split = "train" if train else "test"
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such file")
        try:
            f = h5py.File(self.path, "r")
        except OSError:
            raise ValueError(f"{self.path}: not a readable HDF5 file") from None
        try:
            with f:
                n_frames_total, idx, labels = self.read_index(f)
        except (OSError, KeyError, RuntimeError, TypeError) as e:
            # HDF5 metadata damaged past the header: h5py fails in many ways, all meaning this.
            raise ValueError(f"{self.path}: damaged HDF5 file ({first_line(e)})") from None
        # Each video runs from its start to the next one's (the last one to the end of the data).
        # original: ended the last video at n_videos instead of n_frames.
        lengths = np.append(idx[1:], n_frames_total) - idx
        keep = lengths >= self.span
        if not keep.any():
            raise ValueError(f"{self.path}: all {len(idx)} {self.split} videos are shorter than "
                             f"{self.window_text()} (the longest has {lengths.max()} frames)")
        self.n_skipped = int((~keep).sum())
        if self.n_skipped:
            warnings.warn(f"{self.path}: skipping {self.n_skipped} {self.split} videos shorter "
                          f"than {self.window_text()}")
        self.starts, self.lengths = idx[keep], lengths[keep]
        self.labels = labels[keep] if labels is not None else None
        self.n_classes = int(labels.max()) + 1 if labels is not None else 0
        self.classes = self.class_names
        if self.classes is not None:
            self.n_classes = max(self.n_classes, len(self.classes))
        # The file is opened lazily, once per process: h5py handles do not survive a fork.
        self._file = self._pid = None

    def read_index(self, f):
        """Check the split's keys, dtype and start indices; (n_frames, idx, labels or None)."""
        data_key, idx_key = f"{self.split}_data", f"{self.split}_idx"
        labels_key = f"{self.split}_labels"
        missing = [k for k in (data_key, idx_key) if k not in f]
        if missing:
            raise ValueError(f"{self.path}: missing HDF5 key(s) {', '.join(missing)} (expected "
                             f"train_data, train_idx, test_data, test_idx; found "
                             f"{', '.join(f.keys()) or 'none'})")
        data = f[data_key]
        if data.dtype != np.uint8 or data.ndim != 4 or data.shape[-1] not in (1, 3):
            raise ValueError(f"{self.path}: {data_key} must be uint8 (N_frames, H, W, 3), "
                             f"got {data.dtype} {data.shape}")
        n_frames_total = data.shape[0]
        idx = np.asarray(f[idx_key][()]).astype(np.int64).reshape(-1)      # (N_videos,)
        if len(idx) == 0:
            raise ValueError(f"{self.path}: {idx_key} is empty")
        if idx.min() < 0 or idx.max() >= n_frames_total or np.any(np.diff(idx) < 0):
            raise ValueError(f"{self.path}: {idx_key} must be increasing start frames within "
                             f"[0, {n_frames_total}), got values in [{idx.min()}, {idx.max()}]")
        # Per-frame extras (BAIR's robot actions and end-effector states) travel with the window.
        self.extras = []
        for name in ("actions", "states"):
            key = f"{self.split}_{name}"
            if key in f:
                if f[key].ndim != 2 or f[key].shape[0] != n_frames_total:
                    raise ValueError(f"{self.path}: {key} must be (N_frames={n_frames_total}, "
                                     f"dim), got {f[key].shape}")
                self.extras.append(name)
        # Names of the classes, and of the actions' entries (e.g. TURN_LEFT), where stored.
        self.class_names = stored_names(f, "classes")
        self.action_names = stored_names(f, "action_names")
        labels = None
        if labels_key in f:
            labels = np.asarray(f[labels_key][()]).astype(np.int64).reshape(-1)   # (N_videos,)
            if len(labels) != len(idx):
                raise ValueError(f"{self.path}: {labels_key} has {len(labels)} entries for "
                                 f"{len(idx)} videos")
            if labels.min() < 0:
                raise ValueError(f"{self.path}: {labels_key} holds a negative class index "
                                 f"({labels.min()})")
        return n_frames_total, idx, labels

    def __len__(self):
        return len(self.starts)

    def frames(self, name="data"):
        """The `{split}_{name}` dataset (data, actions or states), through this process's own
        file handle."""
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file[f"{self.split}_{name}"]

    def __getstate__(self):
        # DataLoader workers receive a copy without the handle and open their own.
        state = self.__dict__.copy()
        state["_file"] = None
        return state

    def where(self, i):
        return f"{self.path}: {self.split} video {i}"

    def load(self, i, seed):
        start = self.starts[i] + window_start(self.lengths[i], self.span, seed)
        window = slice(start, start + self.span, self.sample_every)
        video = self.frames()[window]                                        # (T, H, W, 3) uint8
        out = dict(video=preprocess(video, self.resolution))
        if self.labels is not None:
            out["label"] = int(self.labels[i])
        for name in self.extras:
            extra = self.frames(name)[window]                                 # (T, dim)
            out[name] = torch.from_numpy(np.asarray(extra, np.float32))
        return out


def stored_names(f, key):
    """The strings of an HDF5 dataset `key` (bytes decoded), or None if `f` has no such key."""
    if key not in f:
        return None
    return [c.decode() if isinstance(c, bytes) else str(c) for c in f[key][()]]


# -----------------------------------------------------------------------------
# Video files (decoded with PyAV), images, and folders of them


def find_videos(folder):
    """Sorted paths of every video below `folder`: a .mp4/.avi/.webm file (any case), or a folder
    of frame images (.png/.jpg), one frame per image in the order of their names."""
    paths = glob.glob(os.path.join(folder, "**", "*"), recursive=True)
    files = [p for p in paths if os.path.isfile(p) and p.lower().endswith(VIDEO_EXTS)]
    # A folder holding frame images is one video (the split's own folder is not).
    frame_folders = {os.path.dirname(p) for p in paths if p.lower().endswith(IMAGE_EXTS)}
    return sorted(files + [f for f in frame_folders if not os.path.samefile(f, folder)])


def frame_images(folder):
    """The frame images of a video stored as a folder of them, in the order of their names."""
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTS))
    return [os.path.join(folder, n) for n in names]


def open_video(path):
    """Open a file with PyAV and return (container, its first video stream)."""
    import av  # lazy: only the folder reader and MP4 writers need PyAV
    container = av.open(path)
    if not container.streams.video:
        container.close()
        raise ValueError("no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # decode with several threads
    return container, stream


def count_frames(path):
    """Number of decodable frames of a video file (all decoded, which proves it readable), or of
    images in a folder of frames (the first read)."""
    if os.path.isdir(path):
        images = frame_images(path)
        read_images(images[:1])
        return len(images)
    container, stream = open_video(path)
    with container:
        return sum(1 for _ in container.decode(stream))


def read_frames(path, start=0, length=None, indexed=True):
    """Frames [start, start + length) of a video file, uint8 (length, H, W, 3); all without
    a length, and fewer (not indexed: a user's file) if it ends sooner."""
    if os.path.isdir(path):   # a folder of frame images
        paths = frame_images(path)[start:None if length is None else start + length]
        frames = list(read_images(paths)) if paths else []
    else:
        frames = decode_frames(path, start, length)
    if indexed and (not frames or (length is not None and len(frames) < length)):
        raise ValueError(f"{path}: has fewer frames than indexed (changed since?); delete its "
                         f"index sidecar")
    return np.stack(frames)                                       # (T, H, W, 3)


def decode_frames(path, start, length):
    """Frames [start, start + length) of a video file as a list of uint8 (H, W, 3)."""
    container, stream = open_video(path)
    frames = []
    with container:
        for i, frame in enumerate(container.decode(stream)):
            if i >= start:
                frames.append(frame.to_ndarray(format="rgb24"))   # (H, W, 3)
            if length is not None and len(frames) == length:
                break
    return frames


def read_images(paths):
    """uint8 (T, H, W, 3) frames from image files, in the order given (RGB, alpha dropped)."""
    from PIL import Image  # Pillow comes with matplotlib
    frames = []
    for path in paths:
        try:
            with Image.open(path) as image:
                frames.append(np.asarray(image.convert("RGB")))          # (H, W, 3)
        except OSError as e:
            raise ValueError(f"{path}: not a readable image ({first_line(e)})") from None
        if frames[-1].shape != frames[0].shape:
            raise ValueError(f"{path}: {frames[-1].shape[1]}x{frames[-1].shape[0]} pixels, but "
                             f"the first frame is {frames[0].shape[1]}x{frames[0].shape[0]}")
    return np.stack(frames)                                               # (T, H, W, 3)


def read_clip(path, n_frames):
    """Up to `n_frames` first frames of a user's clip (a video file, an image, or a folder of
    images in the order of their names), uint8 (T, H, W, 3)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        images = frame_images(path)
        if not images:
            raise ValueError(f"{path}: holds no images ({', '.join(IMAGE_EXTS)})")
        return read_images(images[:n_frames])
    if path.lower().endswith(IMAGE_EXTS):
        return read_images([path])
    try:
        return read_frames(path, 0, n_frames, indexed=False)               # (T, H, W, 3)
    except Exception as e:  # any decoder failure means: not a video we can read
        raise ValueError(f"{path}: not a readable video ({first_line(e)})") from None


def index_videos(folder, paths, workers=None):
    """{path: frame count, or None if undecodable}, cached in a sidecar file.

    The sidecar `folder/.videogpt_index.json` (or a file in the cache folder if `folder` is
    read-only) maps each relative path, with its size and mtime, to its frame count, so that a
    second start reads it instead of decoding every video."""
    sidecar = os.path.join(folder, ".videogpt_index.json")
    folder_id = hashlib.sha1(os.path.abspath(folder).encode()).hexdigest()[:16]
    fallback = os.path.join(cache_dir(), f"index-{folder_id}.json")
    cached = {}
    for p in (sidecar, fallback):
        try:
            with open(p) as f:
                cached = json.load(f)["files"]
            break
        except (OSError, ValueError, KeyError, TypeError):
            continue
    entries, todo = {}, []
    for path in paths:
        rel, st = os.path.relpath(path, folder), os.stat(path)
        e = cached.get(rel)
        unchanged = isinstance(e, dict) and (e.get("size"), e.get("mtime_ns")) == (
            st.st_size, st.st_mtime_ns)
        if unchanged:
            entries[rel] = e
        else:
            todo.append((rel, path, st))
    if todo:
        def probe(job):
            rel, path, st = job
            try:
                n, err = count_frames(path), None
                if n == 0:
                    n, err = None, "no decodable frame"
            except Exception as e:  # any decoder failure means: skip this file
                n, err = None, f"{type(e).__name__}: {e}"
            return rel, dict(size=st.st_size, mtime_ns=st.st_mtime_ns, frames=n, error=err)
        # Decoding releases the GIL inside FFmpeg, so threads index several files at once.
        workers = workers or min(8, os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            jobs = tqdm(pool.map(probe, todo), total=len(todo), desc=f"indexing {folder}",
                        disable=len(todo) < 20)
            for rel, e in jobs:
                entries[rel] = e
        index = dict(version=1, files=entries)
        try:
            atomic_write(sidecar, lambda f: json.dump(index, f), binary=False)
        except OSError:
            os.makedirs(cache_dir(), exist_ok=True)
            atomic_write(fallback, lambda f: json.dump(index, f), binary=False)
    return {p: entries[os.path.relpath(p, folder)]["frames"] for p in paths}


def text_lines(path):
    """The non-blank lines of a text file, stripped (so Windows line endings do not matter)."""
    with open(path, encoding="utf-8") as f:
        lines = enumerate(f.read().splitlines(), 1)
        return [(n, line.strip()) for n, line in lines if line.strip()]


# Optional, in a video folder's root: one class name per line, in the labels' order.
CLASSES_FILE = "classes.txt"


class VideoFolderDataset(VideoFileDataset):
    """`ROOT/train/**/*.{mp4,avi,webm}` (or test/); the class of a video is its parent folder."""

    def __init__(self, root, sequence_length, train=True, resolution=64, index_workers=None,
                 sample_every=1):
        super().__init__()
        self.root = os.fspath(root)
        self.sequence_length, self.resolution = sequence_length, resolution
        self.sample_every = sample_every
        self.split = "train" if train else "test"
        folder = os.path.join(self.root, self.split)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{self.root}: has no '{self.split}' folder (expected "
                                    f"{self.root}/train/**/*.mp4 and {self.root}/test/**/*.mp4)")
        paths = find_videos(folder)
        if not paths:
            raise ValueError(f"{folder}: no videos (.mp4, .avi, .webm, or folders of images)")
        # Classes are the parent folders of both splits, so that train and test agree on labels.
        # They are in the order of ROOT/classes.txt when there is one (a dataset's official
        # order), else sorted.
        everything = [p for split in ("train", "test")
                      for p in find_videos(os.path.join(self.root, split))]
        folders = {os.path.basename(os.path.dirname(p)) for p in everything}
        listed = os.path.join(self.root, CLASSES_FILE)
        if os.path.isfile(listed):
            self.classes = [name for _, name in text_lines(listed)]
            unknown = sorted(folders - set(self.classes))
            if unknown:
                raise ValueError(f"{listed}: does not list the class folder(s) "
                                 f"{', '.join(unknown[:3])}")
        else:
            self.classes = sorted(folders)
        self.n_classes = len(self.classes)
        counts = index_videos(folder, paths, workers=index_workers)
        self.paths, self.lengths, self.n_skipped = [], [], 0
        for p in paths:
            n = counts[p]
            if n is None:
                warnings.warn(f"{p}: cannot be decoded, skipped")
                self.n_skipped += 1
            elif n < self.span:
                self.n_skipped += 1
            else:
                self.paths.append(p)
                self.lengths.append(n)
        if not self.paths:
            decodable = [n for n in counts.values() if n is not None]
            reason = "none of them can be decoded"
            if decodable:
                reason = (f"all are shorter than {self.window_text()} (the longest has "
                          f"{max(decodable)} frames)")
            raise ValueError(f"{folder}: no usable video among {len(paths)} files: {reason}")
        label = {c: i for i, c in enumerate(self.classes)}
        self.labels = [label[os.path.basename(os.path.dirname(p))] for p in self.paths]

    def __len__(self):
        return len(self.paths)

    def where(self, i):
        return self.paths[i]

    def load(self, i, seed):
        start = window_start(self.lengths[i], self.span, seed)
        video = read_frames(self.paths[i], start, self.span)[::self.sample_every]   # (T, H, W, 3)
        return dict(video=preprocess(video, self.resolution), label=self.labels[i])


# -----------------------------------------------------------------------------
# The built-in default: moving digits, made here
#
# Two coloured digits bouncing in a black frame, the Quick start's data, drawn with the font that
# matplotlib ships. A clip is a pure function of (seed, split, index), so MovingDigitsDataset draws
# them on the fly, and `python -m prepare digits digits.h5` writes the same set to a file.

# Six bright, saturated colours. A palette rather than any hue: the VQ-VAE spends its
# codes on shapes instead of shades, and the prior has one colour of six to keep per digit.
PALETTE = np.array([[1.0, 0.25, 0.25], [0.25, 1.0, 0.25], [0.35, 0.55, 1.0],
                    [1.0, 1.0, 0.25], [0.25, 1.0, 1.0], [1.0, 0.35, 1.0]], np.float32)


@functools.cache
def digit_glyphs(size, font=None):
    """(10, size, size) float32 masks of the digits 0-9, centered, 85% of the square high.

    `font` None is the dataset's own, matplotlib's bundled DejaVu Sans Bold; else the file name of
    another font matplotlib ships (e.g. "cmr10.ttf"), from which the digit reader of fvd.py learns
    so that it never sees the dataset's font. Made once per (size, font).
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties
    style = dict(fontweight="bold", family="DejaVu Sans")
    if font is not None:
        path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", font)
        style = dict(fontproperties=FontProperties(fname=path))
    # Render large, crop each digit to its ink, and center it in a size x size square.
    big = 4 * size
    fig = Figure(figsize=(1, 1), dpi=big)
    canvas = FigureCanvasAgg(fig)
    glyphs = np.zeros((10, size, size), np.float32)
    for d in range(10):
        fig.clear()
        fig.patch.set_facecolor("black")
        fig.text(0.5, 0.5, str(d), ha="center", va="center", color="white",
                 fontsize=72 * 0.9, **style)
        canvas.draw()
        ink = np.asarray(canvas.buffer_rgba())[..., 0].astype(np.float32) / 255   # (big, big)
        ys, xs = np.nonzero(ink > 0.05)
        ink = ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        # Height fills 85% of the square; keep the aspect ratio (never wider than the square).
        h = int(round(0.85 * size))
        w = min(size, max(1, int(round(ink.shape[1] * h / ink.shape[0]))))
        small = F.interpolate(torch.from_numpy(ink)[None, None], size=(h, w), mode="bilinear",
                              align_corners=False, antialias=True)[0, 0].numpy()   # (h, w)
        top, left = (size - h) // 2, (size - w) // 2
        glyphs[d, top:top + h, left:left + w] = small.clip(0, 1)
    return glyphs


# The eight directions a digit can move in: (dy, dx) per frame, in units of its speed.
DIRECTIONS = np.array([[-1, -1], [-1, 0], [-1, 1], [0, -1], [0, 1], [1, -1], [1, 0], [1, 1]])


def moving_digits_video(rng, frames=16, resolution=64, n_digits=2, glyphs=None, digits=None,
                        speed=None, grid=None, apart=True):
    """uint8 (frames, R, R, 3): `n_digits` coloured digits bouncing off the walls.

    Each digit starts on a grid of `grid` pixels and moves `speed` pixels a frame in one of eight
    directions (by default speed R/16, which is 2 pixels at 32x32, and a grid of twice that). On
    the grid, a digit sits the same way in the VQ-VAE's code cells at every latent step, so it
    keeps its codes, shifted, and a prior trained for minutes can carry them along. With `apart`
    each digit starts where its square covers no other's, so the digits meet as they move, not
    from the first frame (docs/presets.md measures both choices). `glyphs` (10, g, g) replaces
    the dataset's font; the digits drawn are appended to the list `digits` if one is given.
    """
    # A glyph's square is 24/64 of the frame: two digits seldom hide each other (docs/presets.md).
    glyph = digit_glyphs(max(8, round(resolution * 24 / 64))) if glyphs is None else glyphs
    g = glyph.shape[-1]
    speed = max(1, round(resolution / 16)) if speed is None else speed
    grid = 2 * speed if grid is None else grid
    top = (resolution - g) // grid * grid        # the farthest a corner goes, on the grid
    # Every grid point where a square's top-left corner can start.
    cells = grid * np.arange(top // grid + 1)
    corners = np.stack(np.meshgrid(cells, cells, indexing="ij"), -1).reshape(-1, 2)   # (n, 2)
    video = np.zeros((frames, resolution, resolution, 3), np.float32)
    starts = []
    for _ in range(n_digits):
        digit = rng.integers(10)
        if digits is not None:
            digits.append(int(digit))
        color = PALETTE[rng.integers(len(PALETTE))]
        if apart:
            # A corner whose square covers no earlier digit's square (any, if none is left).
            free = [c for c in corners if all(np.abs(c - s).max() >= g for s in starts)]
            choices = free or list(corners)
            pos = choices[rng.integers(len(choices))].copy()
        else:
            pos = grid * rng.integers(0, top // grid + 1, size=2)   # (y, x) of the corner
        starts.append(pos)   # never changed in place: each move below makes a new array first
        vel = speed * DIRECTIONS[rng.integers(len(DIRECTIONS))]            # (dy, dx) per frame
        for t in range(frames):
            y, x = pos
            patch = glyph[digit][..., None] * color                       # (g, g, 3)
            video[t, y:y + g, x:x + g] = np.maximum(video[t, y:y + g, x:x + g], patch)
            # Move, and bounce off the borders by reflecting position and velocity
            # (which keeps the corner on the grid when it started there).
            pos = pos + vel
            for a in range(2):
                if pos[a] < 0:
                    pos[a], vel[a] = -pos[a], -vel[a]
                elif pos[a] > top:
                    pos[a], vel[a] = 2 * top - pos[a], -vel[a]
    return (video * 255).round().astype(np.uint8)


def moving_digits(n_videos, frames=16, resolution=64, seed=0, train=True):
    """uint8 (n_videos, frames, R, R, 3); video i depends only on (seed, split, i)."""
    split = 0 if train else 1
    rngs = [np.random.default_rng([seed, split, i]) for i in range(n_videos)]
    return np.stack([moving_digits_video(rng, frames, resolution) for rng in rngs])


class MovingDigitsDataset(Dataset):
    """Moving digits generated on the fly; deterministic per (seed, split, index)."""

    def __init__(self, n_videos, sequence_length=16, train=True, resolution=64, seed=0):
        super().__init__()
        self.n_videos, self.sequence_length, self.resolution = n_videos, sequence_length, resolution
        self.seed, self.split = seed, 0 if train else 1
        self.n_classes, self.n_skipped = 0, 0

    def __len__(self):
        return self.n_videos

    def __getitem__(self, item):
        i, _ = split_item(item)  # the video is a pure function of its index; no window to choose
        rng = np.random.default_rng([self.seed, self.split, i])
        video = moving_digits_video(rng, self.sequence_length, self.resolution)  # (T, R, R, 3)
        return dict(video=preprocess(video, self.resolution))


# -----------------------------------------------------------------------------
# Choosing a dataset from a path


def make_dataset(data, sequence_length, train=True, resolution=64, n_default=(10000, 256), seed=0,
                 sample_every=1):
    """`data` None -> moving digits; a folder -> VideoFolderDataset; a file -> HDF5Dataset. With
    `sample_every` K, a clip is every K-th frame of its window (footage of a high frame rate)."""
    if data is None:
        if sample_every != 1:
            raise ValueError(f"--sample_every {sample_every}: the built-in moving digits are "
                             f"drawn at their own speed; it takes a folder or an HDF5 file")
        return MovingDigitsDataset(n_default[0] if train else n_default[1], sequence_length,
                                   train=train, resolution=resolution, seed=seed)
    data = os.fspath(data)
    kw = dict(train=train, resolution=resolution, sample_every=sample_every)
    if os.path.isdir(data):
        return VideoFolderDataset(data, sequence_length, **kw)
    if os.path.isfile(data):
        return HDF5Dataset(data, sequence_length, **kw)
    raise FileNotFoundError(f"{data}: no such file or folder")


def main(argv=None):
    """The dataset commands moved to `python -m prepare`; this says where, in one line."""
    given = (sys.argv[1:] if argv is None else argv)[:1] or ["COMMAND"]
    name = {"moving-digits": "digits", "folder-to-hdf5": "folder"}.get(given[0], given[0])
    raise SystemExit(f"data.py: error: the dataset commands moved: python -m prepare {name} ...")


if __name__ == "__main__":
    main()
