"""The moving digits, made here: two coloured digits bouncing in a black frame, the Quick start's data.

    from prepare.digits import moving_digits, moving_digits_video
    clips = moving_digits(16, frames=8, resolution=32)          # uint8 (16, 8, 32, 32, 3), deterministic
    python -m prepare digits digits.h5                            # the same set as an HDF5 file

No download: the glyphs are rendered with the font matplotlib ships. A clip is
a pure function of (seed, split, index), so data.MovingDigitsDataset draws
them on the fly and every run sees the same set. This file imports nothing
from the project (data.py reads these clips).
"""

import os

import numpy as np
import torch
import torch.nn.functional as F

_GLYPHS = {}

# Six bright, saturated colours. A palette rather than any hue: the VQ-VAE spends its
# codes on shapes instead of shades, and the prior has one colour of six to keep per digit.
PALETTE = np.array([[1.0, 0.25, 0.25], [0.25, 1.0, 0.25], [0.35, 0.55, 1.0],
                    [1.0, 1.0, 0.25], [0.25, 1.0, 1.0], [1.0, 0.35, 1.0]], np.float32)


def digit_glyphs(size, font=None):
    """(10, size, size) float32 masks of the digits 0-9, centered, 85% of the square high.

    `font` None is the dataset's own, matplotlib's bundled DejaVu Sans Bold; else
    the file name of another font matplotlib ships (e.g. "cmr10.ttf"), which the
    digit reader of fvd.py learns from so that it never sees the dataset's font.
    """
    if (size, font) not in _GLYPHS:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.font_manager import FontProperties
        style = (dict(fontweight="bold", family="DejaVu Sans") if font is None else
                 dict(fontproperties=FontProperties(fname=os.path.join(matplotlib.get_data_path(), "fonts", "ttf", font))))
        # Render large, crop each digit to its ink, and center it in a size x size square.
        big = 4 * size
        fig = Figure(figsize=(1, 1), dpi=big)
        canvas = FigureCanvasAgg(fig)
        glyphs = np.zeros((10, size, size), np.float32)
        for d in range(10):
            fig.clear()
            fig.patch.set_facecolor("black")
            fig.text(0.5, 0.5, str(d), ha="center", va="center", color="white", fontsize=72 * 0.9, **style)
            canvas.draw()
            ink = np.asarray(canvas.buffer_rgba())[..., 0].astype(np.float32) / 255   # (big, big)
            ys, xs = np.nonzero(ink > 0.05)
            ink = ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            # Height fills 85% of the square; keep the aspect ratio (never wider than the square).
            h = int(round(0.85 * size))
            w = min(size, max(1, int(round(ink.shape[1] * h / ink.shape[0]))))
            small = F.interpolate(torch.from_numpy(ink)[None, None], size=(h, w),
                                  mode="bilinear", align_corners=False, antialias=True)[0, 0].numpy()
            top, left = (size - h) // 2, (size - w) // 2
            glyphs[d, top:top + h, left:left + w] = small.clip(0, 1)
        _GLYPHS[size, font] = glyphs
    return _GLYPHS[size, font]


# The eight directions a digit can move in: (dy, dx) per frame, in units of its speed.
DIRECTIONS = np.array([[-1, -1], [-1, 0], [-1, 1], [0, -1], [0, 1], [1, -1], [1, 0], [1, 1]])


def moving_digits_video(rng, frames=16, resolution=64, n_digits=2, glyphs=None, digits=None, speed=None, grid=None,
                        apart=True):
    """uint8 (frames, R, R, 3): `n_digits` coloured digits bouncing off the walls.

    Each digit starts on a grid of `grid` pixels and moves `speed` pixels a frame
    in one of eight directions (default: speed R/16, 2 pixels at 32x32, and a grid
    of twice that). Why the grid: the digits VQ-VAE gives one code to each 2 frames
    x 4x4 pixels, so a digit that starts on the 4-pixel grid and moves 2 pixels a
    frame sits the same way in its code cells at every latent step (one cell
    further on): it keeps the same codes, shifted, and the prior learns to carry
    them along. A digit at any sub-cell offset gets new codes at every step, which
    a prior trained for minutes cannot follow (docs/presets.md).
    With `apart` each digit starts where its square does not cover another's (where
    the frame has room): they meet as they move and bounce, not from the first frame.
    `glyphs` (10, g, g) replaces the dataset's font; the digits drawn are appended to
    the list `digits` when one is given (the digit reader's labels).
    """
    # A glyph's square is 24/64 of the frame (12 pixels at 32x32; the digit 85% of it high): two
    # squares starting apart then share ink in 26% of the frames and more than 15 pixels in 10%, where
    # 28/64 (Moving MNIST's 28 pixels at 64x64) starting anywhere overlapped in 65% and 36%: a third
    # of the frames, of which even the real ones read only half (fvd.py digits).
    glyph = digit_glyphs(max(8, round(resolution * 24 / 64))) if glyphs is None else glyphs
    g = glyph.shape[-1]
    speed = max(1, round(resolution / 16)) if speed is None else speed
    grid = 2 * speed if grid is None else grid
    top = (resolution - g) // grid * grid                                 # the farthest a corner goes, on the grid
    cells = grid * np.arange(top // grid + 1)
    corners = np.stack(np.meshgrid(cells, cells, indexing="ij"), -1).reshape(-1, 2)   # (n, 2): where a square can start
    video = np.zeros((frames, resolution, resolution, 3), np.float32)
    starts = []
    for _ in range(n_digits):
        digit = rng.integers(10)
        if digits is not None:
            digits.append(int(digit))
        color = PALETTE[rng.integers(len(PALETTE))]
        if apart:   # a corner whose square covers no earlier digit's square (any corner if none is left)
            choices = [c for c in corners if all(np.abs(c - s).max() >= g for s in starts)] or list(corners)
            pos = choices[rng.integers(len(choices))].copy()
        else:
            pos = grid * rng.integers(0, top // grid + 1, size=2)         # (y, x) of the top-left corner
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
    return np.stack([moving_digits_video(np.random.default_rng([seed, split, i]), frames, resolution)
                     for i in range(n_videos)])
