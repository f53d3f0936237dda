"""The converters: real datasets into the HDF5 layout (or video folder) that data.py reads.

    python -m prepare bair bair_robot_pushing_dataset_v0.tar|DIR OUT.h5 [--view aux1|main]
    python -m prepare ucf101 UCF-101/ ucfTrainTestlist/ OUT [--fold 1|2|3] [--hdf5 --resolution R]

One file per dataset, as nanoGPT keeps data/<name>/prepare.py: `bair.py` reads
the release's TFRecords without TensorFlow, `ucf101.py` links the official
splits without moving a file. Each writes atomically (the output is complete
or absent) and turns bad input into one line naming the file. Run from the
repository's root (the converters import data.py).
"""
