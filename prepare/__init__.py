"""Making datasets: real ones converted, synthetic ones made here, in the HDF5 layout data.py reads.

    python -m prepare digits OUT.h5 [--n_videos N --frames T --resolution R --seed S]
    python -m prepare bair bair_robot_pushing_dataset_v0.tar|DIR OUT.h5 [--view aux1|main]
    python -m prepare ucf101 UCF-101/ ucfTrainTestlist/ OUT [--fold 1|2|3] [--hdf5 --resolution R]
    python -m prepare folder DIR OUT.h5 [--resolution R]     # ROOT/{train,test}/**/*.mp4 to HDF5
    python -m prepare inspect PATH [--out sheet.png]           # counts, shapes, classes, a sheet

One file per dataset, as nanoGPT keeps data/<name>/prepare.py: `bair.py` reads
the release's TFRecords without TensorFlow, `ucf101.py` links the official
splits without moving a file, `vizdoom.py` plays the game; the moving digits
are drawn by data.py itself, and `digits` writes them to a file. Each writes
atomically (the output is complete or absent) and turns bad input into one line
naming the file. Run from the repository's root (the converters import data.py).
`write_hdf5`, below, writes that layout for the converters that hold whole videos in memory.
"""

import h5py
import numpy as np

from checkpoints import atomic_write


def write_hdf5(path, splits):
    """Write {split: (list of uint8 (T, H, W, 3) videos, labels or None)} in the original
    layout, atomically."""
    def write(f):
        with h5py.File(f, "w") as h5:
            for split, (videos, labels) in splits.items():
                starts = np.cumsum([0] + [len(v) for v in videos[:-1]]).astype(np.int64)
                h5.create_dataset(f"{split}_data", data=np.concatenate(videos),
                                  chunks=(1, *videos[0].shape[1:]))
                h5.create_dataset(f"{split}_idx", data=starts)
                if labels is not None:
                    h5.create_dataset(f"{split}_labels", data=np.asarray(labels, np.int64))
    atomic_write(path, write)
