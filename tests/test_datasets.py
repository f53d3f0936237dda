"""The paper's datasets without TensorFlow: BAIR from its TFRecords, UCF-101 from its official split
lists.

The TFRecord files are written here byte by byte (framing, CRCs and protobuf), so
the suite needs no TensorFlow and checks the reader against an independent writer.
"""
import os
import struct
import tarfile

import crc32c
import h5py
import numpy as np
import pytest

import data
from conftest import gradient_video, run_script, write_video
from prepare import bair
from prepare.__main__ import main as prepare_main


# -----------------------------------------------------------------------------
# An independent TFRecord / tf.train.Example writer


def varint(n):
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def field(number, wire, payload):
    """One protobuf field: its key, then the payload (length-prefixed for wire type 2)."""
    key = varint(number << 3 | wire)
    return key + (varint(len(payload)) + payload if wire == 2 else payload)


def bytes_feature(*values):
    return field(1, 2, b"".join(field(1, 2, v) for v in values))           # Feature.bytes_list


def float_feature(values, packed=True):
    if packed:
        body = field(1, 2, struct.pack(f"<{len(values)}f", *values))
    else:
        body = b"".join(field(1, 5, struct.pack("<f", v)) for v in values)
    return field(2, 2, body)                                                  # Feature.float_list


def int_feature(values, packed=True):
    enc = [varint(v % (1 << 64)) for v in values]  # negative: two's complement
    body = field(1, 2, b"".join(enc)) if packed else b"".join(field(1, 0, e) for e in enc)
    return field(3, 2, body)                                                  # Feature.int64_list


def example(features):
    """tf.train.Example bytes from {name: Feature bytes}."""
    entries = b"".join(field(1, 2, field(1, 2, name.encode()) + field(2, 2, feat))
                       for name, feat in features.items())
    return field(1, 2, entries)


def masked(data_bytes):
    crc = crc32c.crc32c(data_bytes)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def record(data_bytes):
    header = struct.pack("<Q", len(data_bytes))
    return header + struct.pack("<I", masked(header)) + data_bytes + struct.pack("<I",
                                                                                 masked(data_bytes))


def trajectory(rng, T=3):
    """A random BAIR-like trajectory: both cameras, actions, states."""
    return dict(aux1=rng.integers(0, 256, (T, 64, 64, 3), dtype=np.uint8),
                main=rng.integers(0, 256, (T, 64, 64, 3), dtype=np.uint8),
                actions=rng.normal(size=(T, 4)).astype(np.float32),
                states=rng.normal(size=(T, 3)).astype(np.float32))


def bair_example(traj, drop=None, image_bytes=None):
    features = {}
    for t in range(len(traj["aux1"])):
        features[f"{t}/image_aux1/encoded"] = bytes_feature(traj["aux1"][t].tobytes())
        features[f"{t}/image_main/encoded"] = bytes_feature(traj["main"][t].tobytes())
        features[f"{t}/action"] = float_feature(traj["actions"][t].tolist())
        features[f"{t}/endeffector_pos"] = float_feature(traj["states"][t].tolist(),
                                                         packed=t % 2 == 0)
    if image_bytes is not None:
        features["1/image_aux1/encoded"] = bytes_feature(image_bytes)
    features.pop(drop, None)
    return example(features)


def make_bair(root, rng):
    """root/softmotion30_44k/{train,test}/*.tfrecords; returns the trajectories in the documented
    order."""
    files = {"train": ["traj_256_to_257.tfrecords", "traj_0_to_1.tfrecords"],
             "test": ["traj_0_to_1.tfrecords"]}
    expected = {}
    for split, names in files.items():
        os.makedirs(root / bair.BAIR_FOLDER / split)
        by_name = {}
        for name in names:
            trajs = [trajectory(rng), trajectory(rng)]
            tfrecords = b"".join(record(bair_example(t)) for t in trajs)
            (root / bair.BAIR_FOLDER / split / name).write_bytes(tfrecords)
            by_name[name] = trajs
        # Order: the first number in the file name (0 before 256), then the records in file order.
        expected[split] = [t for name in sorted(names, key=bair.first_number)
                           for t in by_name[name]]
    return expected


def check_bair_h5(path, expected, view="aux1"):
    with h5py.File(path, "r") as f:
        for split, trajs in expected.items():
            np.testing.assert_array_equal(f[f"{split}_data"][()],
                                          np.concatenate([t[view] for t in trajs]))
            np.testing.assert_array_equal(f[f"{split}_actions"][()],
                                          np.concatenate([t["actions"] for t in trajs]))
            np.testing.assert_array_equal(f[f"{split}_states"][()],
                                          np.concatenate([t["states"] for t in trajs]))
            np.testing.assert_array_equal(f[f"{split}_idx"][()], np.arange(len(trajs)) * 3)
            assert f[f"{split}_idx"].dtype == np.int64 and f[f"{split}_actions"].dtype == np.float32


# -----------------------------------------------------------------------------
# TFRecord framing and the Example protobuf


def test_crc32c_is_castagnoli_and_masked_as_tfrecord_does():
    # The CRC-32C check value of "123456789" is 0xE3069283 (RFC 3720); masked by hand:
    # rotate right 15 -> 0x2507C60D, + 0xA282EAD8 -> 0xC78AB0E5 (mod 2**32).
    assert crc32c.crc32c(b"123456789") == 0xE3069283
    assert bair.masked_crc32c(b"123456789") == 0xC78AB0E5


def test_parse_example_reads_bytes_floats_and_ints_packed_or_not():
    buf = example({"img": bytes_feature(b"\x00\x01\xff", b""), "f": float_feature([1.5, -2.25]),
                   "fu": float_feature([0.5, 3.0], packed=False), "i": int_feature([0, 300, -7]),
                   "iu": int_feature([5, -1], packed=False), "empty": float_feature([])})
    ex = bair.parse_example(buf)
    assert ex["img"] == [b"\x00\x01\xff", b""]
    np.testing.assert_array_equal(ex["f"], [1.5, -2.25])
    np.testing.assert_array_equal(ex["fu"], [0.5, 3.0])
    assert ex["i"].tolist() == [0, 300, -7] and ex["i"].dtype == np.int64
    assert ex["iu"].tolist() == [5, -1]
    assert len(ex["empty"]) == 0


def test_read_tfrecords_yields_every_record(tmp_path):
    path = tmp_path / "a.tfrecords"
    payloads = [b"", b"x" * 1000, bytes(range(256))]
    path.write_bytes(b"".join(record(p) for p in payloads))
    with open(path, "rb") as f:
        assert list(bair.read_tfrecords(f, str(path))) == payloads


# -----------------------------------------------------------------------------
# python -m prepare bair


def test_bair_from_folder_and_from_tar_reproduces_the_records_exactly(tmp_path):
    src = tmp_path / "release"
    expected = make_bair(src, np.random.default_rng(0))
    tar_path = tmp_path / "bair_robot_pushing_dataset_v0.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(src / bair.BAIR_FOLDER, arcname=bair.BAIR_FOLDER)
    out_tar, out_dir, out_main = (tmp_path / "from_tar.h5", tmp_path / "from_dir.h5",
                                  tmp_path / "main.h5")
    r = run_script("-m prepare", "bair", str(tar_path), str(out_tar))
    assert r.returncode == 0, r.stderr
    assert "4 train and 2 test trajectories" in r.stdout
    check_bair_h5(out_tar, expected)
    prepare_main(["bair", str(src), str(out_dir)])
    check_bair_h5(out_dir, expected)
    prepare_main(["bair", str(src), str(out_main), "--view", "main"])
    check_bair_h5(out_main, expected, view="main")
    r = run_script("-m prepare", "inspect", str(out_dir), "--frames", "2", "--out",
                   str(tmp_path / "sheet.png"))
    assert (r.returncode == 0 and "per-frame actions: 4 values" in r.stdout
            and "per-frame states: 3 values" in r.stdout)
    # The dataset hands out each window's actions and states with its frames.
    ds = data.HDF5Dataset(out_dir, sequence_length=2, train=True, resolution=64)
    item = ds[(1, 0)]
    start = 3 + data.window_start(3, 2, 0)
    assert item["video"].shape == (3, 2, 64, 64)
    np.testing.assert_array_equal(item["actions"].numpy(),
                                  expected["train"][1]["actions"][start - 3:start - 1])
    np.testing.assert_array_equal(item["states"].numpy(),
                                  expected["train"][1]["states"][start - 3:start - 1])


def bair_error(tmp_path, src, out=None):
    """The one-line error of converting `src`; checks that nothing was written."""
    out = out or tmp_path / "out.h5"
    with pytest.raises(SystemExit) as e:
        prepare_main(["bair", str(src), str(out)])
    message = str(e.value.code)
    assert message.startswith("prepare: error: ") and "\n" not in message
    assert not os.path.exists(out)
    if os.path.isdir(os.path.dirname(out)):
        assert not [p for p in os.listdir(os.path.dirname(out)) if ".tmp" in p]
    return message


def one_file_release(tmp_path, payload):
    src = tmp_path / "src"
    for split in ("train", "test"):
        os.makedirs(src / bair.BAIR_FOLDER / split)
        good = record(bair_example(trajectory(np.random.default_rng(1))))
        (src / bair.BAIR_FOLDER / split / "traj_0_to_0.tfrecords").write_bytes(
            payload if split == "train" else good)
    return src, f"{bair.BAIR_FOLDER}/train/traj_0_to_0.tfrecords"


def test_bair_bad_input_gives_one_line_and_writes_nothing(tmp_path):
    rng = np.random.default_rng(2)
    good = record(bair_example(trajectory(rng)))
    # A tar without the release's folder.
    other = tmp_path / "other.tar"
    (tmp_path / "readme.txt").write_text("hi")
    with tarfile.open(other, "w") as tar:
        tar.add(tmp_path / "readme.txt", arcname="readme.txt")
    assert f"{other}: no {bair.BAIR_FOLDER}/train/*.tfrecords found" in bair_error(tmp_path, other)
    # Not a tar at all.
    assert "not a tar file" in bair_error(tmp_path, tmp_path / "readme.txt")
    # A flipped byte in the second record's data: its CRC no longer matches.
    bad = bytearray(good + good)
    bad[len(good) + 100] ^= 1
    src, name = one_file_release(tmp_path / "crc", bytes(bad))
    msg = bair_error(tmp_path, src)
    assert name in msg and "record 1 is corrupt (CRC mismatch in its data)" in msg
    # A record cut short by a truncated download.
    src, name = one_file_release(tmp_path / "trunc", good + good[:5000])
    msg = bair_error(tmp_path, src)
    assert name in msg and "record 1 is truncated" in msg
    # An Example without one of the features, and one with an image of the wrong size.
    src, name = one_file_release(tmp_path / "missing",
                                 record(bair_example(trajectory(rng), drop="2/action")))
    assert "record 0: missing feature '2/action'" in bair_error(tmp_path, src)
    src, name = one_file_release(tmp_path / "size",
                                 record(bair_example(trajectory(rng), image_bytes=b"\x00" * 100)))
    msg = bair_error(tmp_path, src)
    assert "feature '1/image_aux1/encoded' has 100 bytes, expected 12288" in msg
    # An output folder that cannot be written.
    src, _ = one_file_release(tmp_path / "fine", good)
    msg = bair_error(tmp_path, src, out=tmp_path / "no" / "such" / "out.h5")
    assert "out.h5" in msg and "No such file or directory" in msg


def test_bair_error_from_the_command_line_has_no_traceback(tmp_path):
    src, name = one_file_release(tmp_path, b"\x01\x02")
    r = run_script("-m prepare", "bair", str(src), str(tmp_path / "out.h5"))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (f"prepare: error: {src / name}: record 0 is "
                                                 "truncated (the file ends inside its header)")


# -----------------------------------------------------------------------------
# python -m prepare ucf101

# classInd's order is not Python's sorted order: "HammerThrow" < "Hammering" in ASCII.
UCF_CLASSES = ["ApplyEyeMakeup", "Hammering", "HammerThrow"]


def make_ucf(tmp_path):
    """A fake UCF-101/ and ucfTrainTestlist/ (CRLF endings) with one missing and one unlisted
    file."""
    ucf, splits = tmp_path / "UCF-101", tmp_path / "ucfTrainTestlist"
    train, test = [], []
    for c, name in enumerate(UCF_CLASSES):
        os.makedirs(ucf / name)
        for g in (1, 2):
            rel = f"{name}/v_{name}_g{g:02d}_c01.avi"
            write_video(ucf / rel, gradient_video(6, 24, 32, seed=c * 2 + g))
            (train if g == 1 else test).append((rel, c))
    # unlisted
    write_video(ucf / "Hammering" / "v_Hammering_g09_c01.avi", gradient_video(6, 24, 32, seed=9))
    os.makedirs(splits)
    crlf = lambda lines: "".join(line + "\r\n" for line in lines)
    (splits / "classInd.txt").write_text(crlf(f"{i + 1} {n}" for i, n in enumerate(UCF_CLASSES)),
                                         newline="")
    (splits / "trainlist01.txt").write_text(
        # The last line lists a video that is missing.
        crlf([f"{rel} {c + 1}" for rel, c in train]
             + ["ApplyEyeMakeup/v_ApplyEyeMakeup_g07_c01.avi 1"]),
        newline="")
    (splits / "testlist01.txt").write_text(crlf(rel for rel, _ in test), newline="")
    return ucf, splits, train, test


def tree(folder):
    return sorted((os.path.relpath(os.path.join(d, f), folder), os.path.getsize(os.path.join(d, f)))
                  for d, _, files in os.walk(folder) for f in files)


def test_ucf101_links_follow_the_official_split_and_class_order(tmp_path):
    ucf, splits, train, test = make_ucf(tmp_path)
    before = tree(ucf)
    out = tmp_path / "ucf_fold1"
    r = run_script("-m prepare", "ucf101", str(ucf), str(splits), str(out))
    assert r.returncode == 0, r.stderr
    assert "3 train and 3 test videos of 3 classes" in r.stdout
    # Missing and unlisted files are reported on one line each, with counts and names.
    assert ("1 video(s) listed but missing, skipped: ApplyEyeMakeup/v_ApplyEyeMakeup_g07_c01.avi"
            in r.stderr)
    assert ("1 video(s) present but in no list, skipped: Hammering/v_Hammering_g09_c01.avi"
            in r.stderr)
    assert tree(ucf) == before  # the user's files untouched
    for split, entries in (("train", train), ("test", test)):
        for rel, _ in entries:
            assert os.path.samefile(out / split / rel, ucf / rel)           # a link, not a copy
    assert (out / "classes.txt").read_text().splitlines() == UCF_CLASSES
    # Labels are classInd's order (0-based), not sorted folder names.
    ds = data.VideoFolderDataset(out, sequence_length=4, train=True, resolution=16)
    assert ds.classes == UCF_CLASSES
    found = [(os.path.relpath(p, out / "train"), y) for p, y in zip(ds.paths, ds.labels)]
    assert sorted(found) == sorted(train)
    # A second run refuses to overwrite.
    r = run_script("-m prepare", "ucf101", str(ucf), str(splits), str(out))
    assert r.returncode == 1 and r.stderr.strip().endswith("already exists; remove it or choose "
                                                           "another output folder")


def test_ucf101_hdf5_holds_labels_and_class_names(tmp_path):
    ucf, splits, train, test = make_ucf(tmp_path)
    out = tmp_path / "ucf.h5"
    with pytest.warns(UserWarning, match="listed but missing|present but in no list"):
        prepare_main(["ucf101", str(ucf), str(splits), str(out), "--hdf5", "--resolution", "16"])
    with h5py.File(out, "r") as f:
        assert [c.decode() for c in f["classes"][()]] == UCF_CLASSES
        assert f["train_labels"][()].tolist() == [c for _, c in train]
        assert f["test_labels"][()].tolist() == [c for _, c in test]
        assert f["train_data"].shape == (18, 16, 16, 3) and f["train_idx"][()].tolist() == [0, 6,
                                                                                            12]
    ds = data.HDF5Dataset(out, sequence_length=4, train=False, resolution=16)
    assert ds.classes == UCF_CLASSES and ds.n_classes == 3 and ds[(2, 0)]["label"] == 2


def test_ucf101_bad_split_lists_give_one_line(tmp_path):
    ucf, splits, _, _ = make_ucf(tmp_path)
    with open(splits / "testlist01.txt", "a", newline="") as f:
        f.write("Juggling/v_Juggling_g01_c01.avi\r\n")
    with pytest.raises(SystemExit) as e:
        prepare_main(["ucf101", str(ucf), str(splits), str(tmp_path / "out")])
    assert str(e.value.code) == (f"prepare: error: {splits / 'testlist01.txt'}: line 4: "
                                 f"unknown class 'Juggling' (not in classInd.txt)")
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(SystemExit) as e:
        prepare_main(["ucf101", str(ucf), str(splits), str(tmp_path / "out"), "--fold", "2"])
    assert (str(e.value.code) == f"prepare: error: {splits / 'trainlist02.txt'}: No such file or "
            "directory")
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out")]


def test_ucf101_output_that_cannot_be_written_gives_one_line(tmp_path):
    ucf, splits, _, _ = make_ucf(tmp_path)
    (tmp_path / "a_file").write_text("")
    with pytest.warns(UserWarning):
        with pytest.raises(SystemExit) as e:
            prepare_main(["ucf101", str(ucf), str(splits), str(tmp_path / "a_file" / "out")])
    message = str(e.value.code)
    assert (message.startswith("prepare: error: ") and "a_file" in message
            and "Not a directory" in message)
    assert "\n" not in message


def test_the_old_dataset_commands_say_where_they_went(tmp_path):
    for old, new in (("bair", "bair"), ("moving-digits", "digits"), ("folder-to-hdf5", "folder"),
                     ("inspect", "inspect")):
        with pytest.raises(SystemExit) as e:  # a message: exit status 1, the line on stderr
            data.main([old, str(tmp_path / "in"), str(tmp_path / "out.h5")])
        assert (str(e.value.code) == "data.py: error: the dataset commands moved: python -m "
                f"prepare {new} ...")
    assert not os.path.exists(tmp_path / "out.h5")
