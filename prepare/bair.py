"""BAIR robot pushing, read from the release's TFRecords without TensorFlow.

    python -m prepare bair bair_robot_pushing_dataset_v0.tar bair.h5    # or the unpacked folder
    python -m prepare bair softmotion30_44k/.. bair_main.h5 --view main  # the other camera

Writes the HDF5 layout every dataset here uses (data.HDF5Dataset): 64x64 frames
of camera image_aux1 (the original VideoGPT's) or image_main, 30 per
trajectory, with `{split}_actions` (4 floats per frame) and `{split}_states`
(the end effector's position, 3 floats). The tar is read in place: nothing is
extracted. Every record's checksums are verified; a damaged one is one line
naming the file and the record, and no output is left behind.
"""

import glob
import itertools
import os
import re
import struct
import tarfile

import crc32c
import h5py
import numpy as np
from tqdm import tqdm

from checkpoints import atomic_write

#
# The release, bair_robot_pushing_dataset_v0.tar (30 GB), holds
# softmotion30_44k/{train,test}/traj_A_to_B.tfrecords. A TFRecord file is a plain sequence of
# records, each framed as length: uint64 LE | masked CRC32C of those 8 bytes: uint32 LE | data |
# masked CRC32C of data: uint32 LE and the data of each record is one trajectory, a serialized
# tf.train.Example: a protobuf message that maps feature names to lists of bytes, floats or ints.
# Per step t of the 30: "{t}/image_aux1/encoded" and "{t}/image_main/encoded" (raw 64x64x3 RGB
# bytes, one per camera), "{t}/action" (4 floats) and "{t}/endeffector_pos" (3 floats).

BAIR_FOLDER = "softmotion30_44k"
BAIR_SIDE = 64                                # frames are 64x64 RGB
BAIR_ACTION_DIM, BAIR_STATE_DIM = 4, 3


def masked_crc32c(data):
    """TFRecord's checksum: the CRC32C, rotated right by 15 bits, plus a constant.

    The masking keeps a CRC computed over bytes that themselves hold CRCs from
    being trivially zero.
    """
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_tfrecords(f, name):
    """Yield the data of every record of the binary file `f`, checking both CRCs; `name` is for
    errors."""
    for i in itertools.count():
        header = f.read(12)
        if not header:
            return                                             # a clean end between records
        if len(header) < 12:
            raise ValueError(f"{name}: record {i} is truncated (the file ends inside its header)")
        length, length_crc = struct.unpack("<QI", header)
        if masked_crc32c(header[:8]) != length_crc:
            raise ValueError(f"{name}: record {i} is corrupt (CRC mismatch in its length)")
        data, footer = f.read(length), f.read(4)
        if len(data) < length or len(footer) < 4:
            raise ValueError(f"{name}: record {i} is truncated ({len(data)} of its {length} bytes)")
        if masked_crc32c(data) != struct.unpack("<I", footer)[0]:
            raise ValueError(f"{name}: record {i} is corrupt (CRC mismatch in its data)")
        yield data


def read_varint(buf, pos):
    """The base-128 varint at buf[pos:] -> (value, position after it): 7 bits per byte, low bits
    first."""
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated protobuf varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:  # the high bit says "more bytes follow"
            return value, pos
        shift += 7


def protobuf_fields(buf):
    """Yield (field number, wire type, value) for each field of a protobuf message.

    Wire types: 0 varint (an int), 1 and 5 fixed 64/32 bits (their bytes), 2
    length-delimited (a memoryview: a string, bytes, a sub-message or a packed list).
    """
    buf, pos = memoryview(buf), 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = read_varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 2:
            size, pos = read_varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        yield number, wire, value


def parse_example(buf):
    """A serialized tf.train.Example -> {feature name: list of bytes | float32 array | int64 array}.

    The schema (tensorflow/core/example/{example,feature}.proto), by field number:
    Example {1: Features}; Features {1: map entry {1: name, 2: Feature}, repeated};
    Feature {1: BytesList | 2: FloatList | 3: Int64List}; each list {1: values},
    numbers usually packed into one length-delimited field, sometimes one per field.
    """
    out = {}
    for n, _, features in protobuf_fields(buf):
        for m, _, entry in (protobuf_fields(features) if n == 1 else ()):
            if m != 1:
                continue
            fields = {k: v for k, _, v in protobuf_fields(entry)}
            name = bytes(fields.get(1, b"")).decode("utf-8", "replace")
            for kind, _, values in protobuf_fields(fields.get(2, b"")):
                items = [(w, v) for k, w, v in protobuf_fields(values) if k == 1]
                if kind == 1:
                    out[name] = [bytes(v) for _, v in items]
                # packed (wire 2) or one float per field (wire 5): little-endian float32 either way
                elif kind == 2:
                    out[name] = np.frombuffer(b"".join(bytes(v) for _, v in items), "<f4")
                # packed varints, or one varint per field; negative numbers wrap around 2**64
                elif kind == 3:
                    ints = []
                    for w, v in items:
                        pos = 0
                        while w == 2 and pos < len(v):
                            x, pos = read_varint(v, pos)
                            ints.append(x)
                        if w == 0:
                            ints.append(v)
                    out[name] = np.array([x - (1 << 64) if x >= 1 << 63 else x for x in ints],
                                         np.int64)
    return out


def bair_trajectory(example, view, where):
    """(frames uint8 (T, 64, 64, 3), actions float32 (T, 4), states float32 (T, 3)) of one parsed
    Example."""
    T = 0
    while f"{T}/image_{view}/encoded" in example:
        T += 1
    if T == 0:
        raise ValueError(f"{where}: missing feature '0/image_{view}/encoded'")
    frames, actions, states = [], [], []
    for t in range(T):
        for key, dim in ((f"{t}/action", BAIR_ACTION_DIM),
                         (f"{t}/endeffector_pos", BAIR_STATE_DIM)):
            if key not in example:
                raise ValueError(f"{where}: missing feature '{key}'")
            if len(example[key]) != dim:
                raise ValueError(f"{where}: feature '{key}' has {len(example[key])} values, "
                                 f"expected {dim}")
        image = example[f"{t}/image_{view}/encoded"]
        size = BAIR_SIDE * BAIR_SIDE * 3
        if len(image) != 1 or len(image[0]) != size:
            got = len(image[0]) if len(image) == 1 else f"{len(image)} values, not one of"
            raise ValueError(f"{where}: feature '{t}/image_{view}/encoded' has {got} bytes, "
                             f"expected {size} (raw {BAIR_SIDE}x{BAIR_SIDE}x3 RGB)")
        # (64, 64, 3)
        frames.append(np.frombuffer(image[0], np.uint8).reshape(BAIR_SIDE, BAIR_SIDE, 3))
        actions.append(example[f"{t}/action"])
        states.append(example[f"{t}/endeffector_pos"])
    actions, states = (np.stack(x).astype(np.float32) for x in (actions, states))
    return np.stack(frames), actions, states


def first_number(name):
    """The first number in a file name: traj_256_to_511.tfrecords -> 256 (the release's order)."""
    match = re.search(r"\d+", os.path.basename(name))
    return int(match.group()) if match else -1


def bair_files(src):
    """{split: [(name, size, open())]} of the release's TFRecord files, from the tar or a folder
    holding softmotion30_44k/, each split in the order of the first number in the file names."""
    pattern = re.compile(rf"(^|/){BAIR_FOLDER}/(train|test)/[^/]+\.tfrecords$")
    files = {"train": [], "test": []}
    if os.path.isdir(src):
        for path in glob.glob(os.path.join(src, BAIR_FOLDER, "*", "*.tfrecords")):
            match = pattern.search(os.path.relpath(path, src).replace(os.sep, "/"))
            if match:
                files[match.group(2)].append((path, os.path.getsize(path),
                                              lambda p=path: open(p, "rb")))
    elif os.path.isfile(src):
        try:
            tar = tarfile.open(src)  # members are read in place: no extraction
        except tarfile.TarError:
            raise ValueError(f"{src}: not a tar file (expected bair_robot_pushing_dataset_v0.tar "
                             "or a folder)") from None
        for member in tar.getmembers():
            match = pattern.search(member.name)
            if match and member.isfile():
                files[match.group(2)].append((f"{src}:{member.name}", member.size,
                                              lambda m=member: tar.extractfile(m)))
    else:
        raise FileNotFoundError(f"{src}: no such file or folder")
    for split in files:
        files[split].sort(key=lambda f: (first_number(f[0]), f[0]))
        if not files[split]:
            raise ValueError(f"{src}: no {BAIR_FOLDER}/{split}/*.tfrecords found "
                             f"(expected the BAIR release tar or a folder holding {BAIR_FOLDER}/)")
    return files


def write_bair(src, out, view="aux1", batch=64, progress=True):
    """Convert the BAIR release at `src` into the HDF5 layout at `out`, atomically, in bounded
    memory.

    `{split}_data` uint8 (N*30, 64, 64, 3) from camera `view`, `{split}_idx` the
    start frames, `{split}_actions` float32 (N*30, 4), `{split}_states` float32
    (N*30, 3); trajectories in file order (first number of the name), then record order.
    """
    files = bair_files(src)
    total = sum(size for split in files.values() for _, size, _ in split)
    counts = {}

    def append(h5, split, chunk):
        """Append a list of trajectories to the split's growing datasets."""
        # (frames of the chunk, ...) each
        frames, actions, states = (np.concatenate(parts) for parts in zip(*chunk))
        data = h5[f"{split}_data"]
        start = data.shape[0]
        starts = start + np.cumsum([0] + [len(c[0]) for c in chunk[:-1]])
        for key, values in ((f"{split}_data", frames), (f"{split}_actions", actions),
                            (f"{split}_states", states),
                            (f"{split}_idx", starts.astype(np.int64))):
            d = h5[key]
            d.resize(d.shape[0] + len(values), axis=0)
            d[-len(values):] = values

    def write(f):
        with h5py.File(f, "w") as h5, tqdm(total=total, unit="B", unit_scale=True, desc="BAIR",
                                           disable=not progress) as bar:
            h5.attrs["source"] = f"BAIR robot pushing ({BAIR_FOLDER}), camera image_{view}"
            for split, split_files in files.items():
                shapes = {"data": ((BAIR_SIDE, BAIR_SIDE, 3), np.uint8), "idx": ((), np.int64),
                          "actions": ((BAIR_ACTION_DIM,), np.float32),
                          "states": ((BAIR_STATE_DIM,), np.float32)}
                for key, (shape, dtype) in shapes.items():
                    h5.create_dataset(f"{split}_{key}", (0, *shape), dtype, maxshape=(None, *shape),
                                      chunks=(30 if key == "data" else 1024, *shape))
                chunk, counts[split] = [], 0
                for name, size, opener in split_files:
                    with opener() as tf:
                        for i, record in enumerate(read_tfrecords(tf, name)):
                            try:
                                example = parse_example(record)
                            except ValueError as e:
                                raise ValueError(f"{name}: record {i}: not a tf.train.Example "
                                                 f"({e})") from None
                            chunk.append(bair_trajectory(example, view, f"{name}: record {i}"))
                            if len(chunk) == batch:
                                append(h5, split, chunk)
                                counts[split] += len(chunk)
                                chunk = []
                    bar.update(size)
                if chunk:
                    append(h5, split, chunk)
                    counts[split] += len(chunk)

    atomic_write(out, write)
    return counts
