"""python -m prepare COMMAND ...: making, converting and inspecting datasets (see
prepare/__init__.py)."""

import argparse
import os

import numpy as np
import torch

from checkpoints import save_png, video_grid
from data import (VideoFolderDataset, make_dataset, moving_digits, preprocess, read_frames,
                  to_uint8)
from prepare import bair, ucf101, vizdoom, write_hdf5
from runtime import run_cli


def cmd_digits(args):
    n_test = args.n_test if args.n_test is not None else max(1, args.n_videos // 10)
    splits = {}
    for split, n in (("train", args.n_videos), ("test", n_test)):
        videos = moving_digits(n, args.frames, args.resolution, args.seed, train=split == "train")
        splits[split] = (list(videos), None)
    write_hdf5(args.out, splits)
    print(f"wrote {args.out}: {args.n_videos} train and {n_test} test videos of "
          f"{args.frames}x{args.resolution}x{args.resolution}")


def cmd_folder(args):
    splits = {}
    for split in ("train", "test"):
        ds = VideoFolderDataset(args.dir, sequence_length=1, train=split == "train",
                                resolution=args.resolution)
        videos = [to_uint8(preprocess(read_frames(p), args.resolution)).numpy() for p in ds.paths]
        splits[split] = (videos, ds.labels)
        print(f"{split}: {len(videos)} videos ({ds.n_skipped} skipped), classes: {ds.n_classes}")
    write_hdf5(args.out, splits)
    print(f"wrote {args.out}")


def cmd_inspect(args):
    sheets, errors = [], []
    for train in (True, False):
        try:
            ds = make_dataset(args.path, sequence_length=args.frames, train=train,
                              resolution=args.resolution)
        except (FileNotFoundError, ValueError) as e:
            print(f"{'train' if train else 'test'}: {e}")
            errors.append(e)
            continue
        frames = int(np.sum(ds.lengths)) if hasattr(ds, "lengths") else len(ds) * args.frames
        item = ds[(0, 0)]
        print(f"{ds.split}: {len(ds)} videos, {frames} frames, {ds.n_skipped} skipped, "
              f"{ds.n_classes} classes, clip {tuple(item['video'].shape)} (C, T, H, W)")
        for name in getattr(ds, "extras", ()):
            print(f"  per-frame {name}: {item[name].shape[-1]} values")
        if getattr(ds, "classes", None):
            more = " ..." if len(ds.classes) > 20 else ""
            print(f"  classes: {', '.join(ds.classes[:20])}{more}")
        n = min(4, len(ds))
        # (n, 3, T, R, R)
        clips = torch.stack([ds[(i * len(ds) // n, 0)]["video"] for i in range(n)])
        sheets.append(video_grid(to_uint8(clips).numpy()))
    if not sheets:
        raise errors[0]
    out = args.out or os.path.splitext(os.path.basename(args.path.rstrip("/")))[0] + "_sheet.png"
    save_png(np.concatenate(sheets), out)
    print(f"contact sheet (train rows first, then test): {out}")


def cmd_vizdoom(args):
    counts = vizdoom.write_vizdoom(args.out, args.scenario, args.episodes, args.length,
                                   args.resolution, args.frame_skip, args.seed, args.policy,
                                   wad=args.wad)
    print(f"wrote {args.out}: {counts['train']} train, {counts['val']} val and {counts['test']} "
          f"test episodes of {args.length} frames ({counts['dropped']} ended early and were played "
          f"again); actions {', '.join(counts['buttons'])}")


def cmd_bair(args):
    counts = bair.write_bair(args.src, args.out, view=args.view)
    print(f"wrote {args.out}: {counts['train']} train and {counts['test']} test trajectories "
          f"(camera image_{args.view}, with actions and end-effector states)")


def cmd_ucf101(args):
    classes, lists = ucf101.ucf101_splits(args.splits_dir, args.fold)
    lists = ucf101.ucf101_present(args.ucf_dir, lists)
    if args.hdf5:
        ucf101.write_ucf101_hdf5(args.ucf_dir, classes, lists, args.out, args.resolution)
    else:
        ucf101.write_ucf101_links(args.ucf_dir, classes, lists, args.out)
    print(f"wrote {args.out}: {len(lists['train'])} train and {len(lists['test'])} test videos of "
          f"{len(classes)} classes (fold "
          f"{args.fold}{', HDF5 at %d pixels' % args.resolution if args.hdf5 else ', links'})")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m prepare",
                                     description="Make, convert and inspect video datasets.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("digits", help="write the synthetic moving-digits set as HDF5")
    p.add_argument("out", help="output .h5 path")
    p.add_argument("--n_videos", type=int, default=1000, help="training videos")
    p.add_argument("--n_test", type=int, default=None, help="test videos (default: n_videos / 10)")
    p.add_argument("--frames", type=int, default=16, help="frames per video")
    p.add_argument("--resolution", type=int, default=64, help="frame height = width, pixels")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed; the same seed gives the same videos")
    p.set_defaults(fn=cmd_digits)
    p = sub.add_parser("folder", help="convert ROOT/{train,test}/**/*.mp4 to one HDF5 file")
    p.add_argument("dir", help="root folder holding train/ and test/")
    p.add_argument("out", help="output .h5 path")
    p.add_argument("--resolution", type=int, default=64,
                   help="shorter side scaled to this, then center-cropped")
    p.set_defaults(fn=cmd_folder)
    p = sub.add_parser("inspect", help="print counts, shapes and classes; save a PNG contact sheet")
    p.add_argument("path", help="an HDF5 file or a video folder")
    p.add_argument("--frames", type=int, default=8, help="frames per clip in the contact sheet")
    p.add_argument("--resolution", type=int, default=64, help="frame size in the contact sheet")
    p.add_argument("--out", default=None, help="PNG path (default: NAME_sheet.png here)")
    p.set_defaults(fn=cmd_inspect)
    p = sub.add_parser("bair",
                       help="BAIR robot pushing (the release tar or its folder) to HDF5, no "
                            "TensorFlow")
    p.add_argument("src",
                   help="bair_robot_pushing_dataset_v0.tar, or a folder holding softmotion30_44k/")
    p.add_argument("out", help="output .h5 path")
    p.add_argument("--view", default="aux1", choices=["aux1", "main"],
                   help="camera: image_aux1 (the original VideoGPT's) or image_main")
    p.set_defaults(fn=cmd_bair)
    p = sub.add_parser("ucf101",
                       help="UCF-101 in its official train/test split, as links (or HDF5)")
    p.add_argument("ucf_dir", help="the unpacked UCF-101/ folder (never modified)")
    p.add_argument("splits_dir", help="the unpacked ucfTrainTestlist/ folder")
    p.add_argument("out", help="output folder of links (or .h5 path with --hdf5)")
    p.add_argument("--fold", type=int, default=1, choices=[1, 2, 3], help="which official split")
    p.add_argument("--hdf5", action="store_true",
                   help="write an HDF5 file at --resolution instead of links")
    p.add_argument("--resolution", type=int, default=64,
                   help="with --hdf5: shorter side scaled, then center-cropped")
    p.set_defaults(fn=cmd_ucf101)
    p = sub.add_parser("vizdoom",
                       help="play ViZDoom episodes with their actions, made here (pip install "
                            "vizdoom)")
    p.add_argument("out", help="output .h5 path")
    p.add_argument("--scenario", default="health_gathering_supreme",
                   help="a scenario the vizdoom package ships (by name), battle2 (the paper's "
                        "second world), or the path of a .cfg")
    p.add_argument("--wad", default=None,
                   help="battle2: its map file (default: the one in an installed "
                        "sample-factory==2.1.1), checked by its sha256")
    p.add_argument("--episodes", type=int, default=1000,
                   help="episodes, split 8:1:1 into train / val / test")
    p.add_argument("--length", type=int, default=100, help="frames per episode")
    p.add_argument("--resolution", type=int, default=64, help="frame height = width, pixels")
    p.add_argument("--frame_skip", type=int, default=4,
                   help="game tics between two frames (an action holds for them)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the game and the policy; the same seed, the same bytes")
    p.add_argument("--policy", default=None,
                   help="module:function, a callable (observation) -> button index (default: the "
                        "built-in Explorer, prepare/vizdoom.py)")
    p.set_defaults(fn=cmd_vizdoom)
    args = parser.parse_args(argv)
    run_cli("prepare", args.fn, args)


if __name__ == "__main__":
    main()
