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
"""
