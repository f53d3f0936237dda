"""python -m prepare DATASET ...: the converters' command line (see prepare/__init__.py)."""

import argparse

from prepare import bair, ucf101
from runtime import run_cli


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
          f"{len(classes)} classes (fold {args.fold}{', HDF5 at %d pixels' % args.resolution if args.hdf5 else ', links'})")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m prepare", description="Convert real video datasets to HDF5.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bair", help="BAIR robot pushing (the release tar or its folder) to HDF5, no TensorFlow")
    p.add_argument("src", help="bair_robot_pushing_dataset_v0.tar, or a folder holding softmotion30_44k/")
    p.add_argument("out", help="output .h5 path")
    p.add_argument("--view", default="aux1", choices=["aux1", "main"],
                   help="camera: image_aux1 (the original VideoGPT's) or image_main")
    p.set_defaults(fn=cmd_bair)
    p = sub.add_parser("ucf101", help="UCF-101 in its official train/test split, as links (or HDF5)")
    p.add_argument("ucf_dir", help="the unpacked UCF-101/ folder (never modified)")
    p.add_argument("splits_dir", help="the unpacked ucfTrainTestlist/ folder")
    p.add_argument("out", help="output folder of links (or .h5 path with --hdf5)")
    p.add_argument("--fold", type=int, default=1, choices=[1, 2, 3], help="which official split")
    p.add_argument("--hdf5", action="store_true", help="write an HDF5 file at --resolution instead of links")
    p.add_argument("--resolution", type=int, default=64, help="with --hdf5: shorter side scaled, then center-cropped")
    p.set_defaults(fn=cmd_ucf101)
    args = parser.parse_args(argv)
    run_cli("prepare", args.fn, args)


if __name__ == "__main__":
    main()
