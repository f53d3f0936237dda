"""UCF-101 in its official train/test splits, as links to the user's files (or one HDF5 file).

    python -m prepare ucf101 UCF-101/ ucfTrainTestlist/ ucf101_fold1/   # links, never moves files
    python -m prepare ucf101 UCF-101/ ucfTrainTestlist/ ucf101.h5 --hdf5 --resolution 64

The links make a video folder (data.VideoFolderDataset: ROOT/{train,test}/Class/
video.avi) with the classes in classInd's order in classes.txt; --hdf5 decodes
every video once at --resolution instead.
"""

import errno
import os
import shutil
import warnings

import h5py
import numpy as np
from tqdm import tqdm

from checkpoints import atomic_write
from data import CLASSES_FILE, find_videos, preprocess, read_frames, text_lines, to_uint8
from runtime import first_line

#
# UCF-101/ holds 101 class folders of v_Class_gXX_cYY.avi; ucfTrainTestlist/ holds
# classInd.txt ("1 ApplyEyeMakeup" lines), trainlist0F.txt ("Class/file.avi 1"
# lines) and testlist0F.txt ("Class/file.avi" lines) for the folds F = 1, 2, 3,
# with Windows line endings. Labels are classInd's order, 0-based: it is not
# Python's sorted order (HammerThrow sorts before Hammering), so the class names
# travel with the data, in classes.txt or the HDF5 file's `classes`.


def ucf101_splits(splits_dir, fold=1):
    """(classes in classInd order, {"train"/"test": [(relative path, label)]}) from the official
    lists."""
    index_file = os.path.join(splits_dir, "classInd.txt")
    classes = []
    for n, line in text_lines(index_file):
        parts = line.split()
        if len(parts) != 2 or parts[0] != str(len(classes) + 1):
            raise ValueError(f"{index_file}: line {n}: expected '{len(classes) + 1} CLASSNAME', "
                             f"got {line!r}")
        classes.append(parts[1])
    label = {name: i for i, name in enumerate(classes)}
    lists = {}
    for split in ("train", "test"):
        list_file = os.path.join(splits_dir, f"{split}list0{fold}.txt")
        entries = []
        for n, line in text_lines(list_file):
            parts = line.split()
            rel = parts[0].replace("\\", "/")
            name = rel.split("/")[0] if "/" in rel else None
            if name not in label:
                raise ValueError(f"{list_file}: line {n}: unknown class {name or rel!r} (not in "
                                 "classInd.txt)")
            # the train lists repeat the index
            if len(parts) > 1 and parts[1] != str(label[name] + 1):
                raise ValueError(f"{list_file}: line {n}: class index {parts[1]} disagrees with "
                                 f"classInd.txt ({name} is {label[name] + 1})")
            entries.append((rel, label[name]))
        lists[split] = entries
    return classes, lists


def ucf101_present(ucf_dir, lists):
    """The lists without the files that are missing; reports missing and unlisted files (never
    fatal)."""
    if not os.path.isdir(ucf_dir):
        raise FileNotFoundError(f"{ucf_dir}: no such folder (expected the unpacked UCF-101/)")
    present = {os.path.relpath(p, ucf_dir).replace(os.sep, "/") for p in find_videos(ucf_dir)}
    listed = {rel for entries in lists.values() for rel, _ in entries}
    for what, names in (("listed but missing", sorted(listed - present)),
                        ("present but in no list", sorted(present - listed))):
        if names:
            warnings.warn(f"{ucf_dir}: {len(names)} video(s) {what}, skipped: "
                          f"{', '.join(names[:3])}"
                          + (" ..." if len(names) > 3 else ""))
    kept = {split: [(rel, y) for rel, y in entries if rel in present] for split,
            entries in lists.items()}
    if not all(kept.values()):
        raise ValueError(f"{ucf_dir}: none of the listed videos of a split is there (is it the "
                         "UCF-101/ folder?)")
    return kept


def link(src, dst):
    """A hard link (no copy, no extra space); a symbolic one where hard links cannot go (another
    file system)."""
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
        os.symlink(os.path.abspath(src), dst)


def write_ucf101_links(ucf_dir, classes, lists, out):
    """OUT/{train,test}/<class>/<file>.avi as links to the user's files, and OUT/classes.txt; built
    beside OUT and renamed into place, so OUT is complete or absent."""
    if os.path.exists(out):
        raise ValueError(f"{out}: already exists; remove it or choose another output folder")
    tmp = f"{out.rstrip(os.sep)}.partial{os.getpid()}"
    try:
        for split, entries in lists.items():
            for rel, _ in tqdm(entries, desc=f"linking {split}", unit="video"):
                dst = os.path.join(tmp, split, *rel.split("/"))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                link(os.path.join(ucf_dir, *rel.split("/")), dst)
        with open(os.path.join(tmp, CLASSES_FILE), "w") as f:
            f.write("".join(name + "\n" for name in classes))
        os.rename(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def write_ucf101_hdf5(ucf_dir, classes, lists, out, resolution):
    """The HDF5 layout at `resolution`, with `{split}_labels` and the class names as `classes`;
    atomic, one video in memory at a time. A video that cannot be decoded is skipped with a
    warning."""
    def write(f):
        with h5py.File(f, "w") as h5:
            h5.create_dataset("classes", data=np.array(classes, dtype=h5py.string_dtype()))
            for split, entries in lists.items():
                data = h5.create_dataset(f"{split}_data", (0, resolution, resolution, 3), np.uint8,
                                         maxshape=(None, resolution, resolution, 3),
                                         chunks=(16, resolution, resolution, 3))
                starts, labels = [], []
                for rel, y in tqdm(entries, desc=f"encoding {split}", unit="video"):
                    path = os.path.join(ucf_dir, *rel.split("/"))
                    try:
                        # (T, R, R, 3)
                        video = to_uint8(preprocess(read_frames(path), resolution)).numpy()
                    except Exception as e:  # any decoder failure: skip this video, say so
                        warnings.warn(f"{path}: cannot be decoded ({first_line(e)}), skipped")
                        continue
                    starts.append(data.shape[0])
                    labels.append(y)
                    data.resize(data.shape[0] + len(video), axis=0)
                    data[-len(video):] = video
                h5.create_dataset(f"{split}_idx", data=np.array(starts, np.int64))
                h5.create_dataset(f"{split}_labels", data=np.array(labels, np.int64))
    atomic_write(out, write)
