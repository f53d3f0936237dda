"""Makes the C3D Inception Score fixture with TGANv2's own code; run once, the outputs are
committed.

    python3.8 -m venv c3d38 && c3d38/bin/pip install "numpy<1.20" chainer==7.8.1
    c3d38/bin/python tests/data/make_c3d_fixture.py --tgan2 PATH/TO/tgan2 --out tests/data

PATH/TO/tgan2 is a checkout of https://github.com/pfnet-research/tgan2; only its
tgan2/models/c3d/c3d_ucf101.py and tgan2/evaluations/inception_score.py are
imported (by file, so the package's other dependencies are not needed).

Writes, in the layout of TGANv2's release files but narrow (so the fixture is small):
  c3d_narrow.npz         conv1a/W (4, 3, 3, 3, 3), conv1a/b, ... conv5b/*, fc6/W (16, 128),
                         fc7/*, fc8/W (101, 12)
  c3d_narrow_mean.npz    mean (3, 16, 128, 171), BGR
and c3d_tgan2_expected.npz: uint8 clips (N, 16, S, S, 3) at S = 64 and 128, the fc8 logits
TGANv2's C3DVersion1UCF101 gives for them (clips as u / 127.5 - 1, channels first, as its
generators emit them), and the (mean, std) its inception_score gives with 1 and 2 splits.
"""

import argparse
import collections
import importlib.util
import os

import chainer
import chainer.links as L
import numpy as np

CONVS = ("conv1a", "conv2a", "conv3a", "conv3b", "conv4a", "conv4b", "conv5a", "conv5b")
CONV_WIDTHS = (4, 4, 6, 6, 8, 8, 8, 8)
FCS = ("fc6", "fc7", "fc8")
FC_WIDTHS = (16, 12, 101)


def module(tgan2, relative):
    spec = importlib.util.spec_from_file_location(os.path.basename(relative)[:-3],
                                                  os.path.join(tgan2, relative))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def narrow_weights(rng):
    """He-scaled random weights so that activations neither vanish nor explode through eleven
    layers."""
    arrays, c_in = {}, 3
    for name, c in zip(CONVS, CONV_WIDTHS):
        # The input is in pixel units (about +-128 around the mean), so the first layer is scaled
        # down by 128.
        std = np.sqrt(2 / (27 * c_in)) / (128 if name == "conv1a" else 1)
        arrays[f"{name}/W"] = rng.normal(0, std, (c, c_in, 3, 3, 3)).astype(np.float32)
        arrays[f"{name}/b"] = rng.normal(0, 0.1, c).astype(np.float32)
        c_in = c
    f_in = c_in * 4 * 4  # conv5b's C x 1 x 4 x 4 after the ceil-mode pool5
    for name, c in zip(FCS, FC_WIDTHS):
        arrays[f"{name}/W"] = rng.normal(0, np.sqrt(2 / f_in), (c, f_in)).astype(np.float32)
        arrays[f"{name}/b"] = rng.normal(0, 0.1, c).astype(np.float32)
        f_in = c
    return arrays


def mean_clip(rng):
    """A BGR mean clip like the release's (around 90-110), coarse so that it compresses."""
    coarse = rng.integers(80, 120, (3, 4, 8, 9)).astype(np.float32)  # (3, 16/4, 128/16, ~171/19)
    # (3, 16, 128, 171)
    return np.repeat(np.repeat(np.repeat(coarse, 4, 1), 16, 2), 19, 3)[:, :, :, :171]


def clips(rng, n, side):
    """uint8 (n, 16, side, side, 3): random 8x8-pixel blocks that change every frame, sharp-edged so
    that a resize with other corner alignment would show, each clip tinted its own colour so that
    the random network tells the clips apart (an Inception Score well above 1)."""
    tint = rng.uniform(0, 1, (n, 1, 1, 1, 3)) ** 2
    blocks = rng.integers(0, 256, (n, 16, side // 8, side // 8, 3)) * tint
    return np.repeat(np.repeat(blocks.astype(np.uint8), 8, 2), 8, 3)  # (n, 16, side, side, 3)


def tgan2_c3d(c3d_module, weights_path, mean_path):
    """TGANv2's C3DVersion1UCF101 with its links narrowed to the fixture's widths, then loaded from
    the release-layout npz by Chainer's own load_npz."""
    net = c3d_module.C3DVersion1UCF101(pretrained_model=None, mean_path=mean_path)
    c_in, f_in = 3, CONV_WIDTHS[-1] * 16
    narrow = {}
    for name, c in zip(CONVS, CONV_WIDTHS):
        narrow[name], c_in = L.ConvolutionND(3, c_in, c, 3, 1, 1), c
    for name, c in zip(FCS, FC_WIDTHS):
        narrow[name], f_in = L.Linear(f_in, c), c
    for name, link in narrow.items():
        old = getattr(net, name)
        delattr(net, name)
        with net.init_scope():
            setattr(net, name, link)
        net.functions = collections.OrderedDict((k, [link if f is old else f for f in fs])
                                                for k, fs in net.functions.items())
    chainer.serializers.load_npz(weights_path, net)
    return net


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tgan2", required=True, help="a checkout of pfnet-research/tgan2")
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = p.parse_args()
    rng = np.random.default_rng(2021)
    weights_path = os.path.join(args.out, "c3d_narrow.npz")
    mean_path = os.path.join(args.out, "c3d_narrow_mean.npz")
    np.savez_compressed(weights_path, **narrow_weights(rng))
    np.savez_compressed(mean_path, mean=mean_clip(rng))
    c3d_module = module(args.tgan2, "tgan2/models/c3d/c3d_ucf101.py")
    is_module = module(args.tgan2, "tgan2/evaluations/inception_score.py")
    sets = {side: clips(rng, n, side) for side, n in ((64, 6), (128, 4))}
    inputs = {side: (u.astype(np.float32) / 127.5 - 1).transpose(0, 4, 1, 2, 3)
              for side, u in sets.items()}  # (n, 3, 16, S, S)
    # A random ReLU network maps different clips to nearly parallel features, so every clip would
    # get the same class. Centre fc8 on the clips' mean fc7 feature and scale it to logits of spread
    # ~2, so the score is well above 1 and every part of the softmax matters.
    net = tgan2_c3d(c3d_module, weights_path, mean_path)
    with chainer.using_config("train", False), chainer.using_config("enable_backprop", False):
        # (10, 12)
        h7 = np.concatenate([net.extract(x, layers=["fc7"])["fc7"].array for x in inputs.values()])
    weights = dict(np.load(weights_path))
    w8 = weights["fc8/W"]                                                                # (101, 12)
    weights["fc8/W"] = w8 * np.float32(2 / ((h7 - h7.mean(0)) @ w8.T).std())
    weights["fc8/b"] = -(weights["fc8/W"] @ h7.mean(0)).astype(np.float32)
    np.savez_compressed(weights_path, **weights)
    net = tgan2_c3d(c3d_module, weights_path, mean_path)
    expected = {}
    for side, u in sets.items():
        x = inputs[side]
        with chainer.using_config("train", False), chainer.using_config("enable_backprop", False):
            logits = net(x).array
        expected[f"clips{side}"] = u
        expected[f"logits{side}"] = logits
        for splits in (1, 2):
            mean, std = is_module.inception_score(net, x, batchsize=3, splits=splits)
            expected[f"is{side}_splits{splits}"] = np.array([mean, std], np.float64)
        print(side, logits.shape, {k: v for k, v in expected.items() if k.startswith(f"is{side}")})
    np.savez_compressed(os.path.join(args.out, "c3d_tgan2_expected.npz"), **expected)
    print("chainer", chainer.__version__, "numpy", np.__version__)


if __name__ == "__main__":
    main()
