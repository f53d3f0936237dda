"""Files that must survive a crash, and checkpoints that must not run code: the plumbing of saving
and loading.

Nothing here is part of VideoGPT's algorithm; every chapter that writes or reads
a file that matters uses it:

* `atomic_write` and friends: a file is replaced whole or not at all, a kill
  leaves at worst a `NAME.tmpPID` that the next start clears, and an output
  folder is proved writable before hours of work go into it. `OutputLock`:
  one run per output folder (or file), released by the kernel if the run dies.
  `video_grid` and `grid_video` tile clips into a picture or a video, which `save_gif`,
  `save_mp4` and `save_png` write that way.
* Checkpoints: `save_checkpoint` / `keep_copy` write ours; `load_checkpoint`
  reads ours and the original VideoGPT release's PyTorch Lightning files with
  `weights_only=True` and an explicit allow-list, so a file that would run code
  is refused; `checkpoint_kind`, `stored_config` and `load_weights` turn what a
  file holds into one-line errors naming the file. Building a model from what is
  read is the models' business (`vqvae.load_vqvae`, `gpt.load_gpt`); this file
  imports nothing from the project.
* `trim_log`: the training log is cut back to the checkpoint a run resumes from.

What this file does not hold: the checkpoint's contents (train.py decides them),
and the run's process concerns (runtime.py).
"""

import argparse
import errno
import fcntl
import glob
import hashlib
import json
import math
import os
import pickle
import re
import socket

import numpy as np
import torch


def sha256(path):
    """Hex SHA-256 of a file, read in 1 MB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

# -----------------------------------------------------------------------------
# Atomic writes


def atomic_write(path, write, binary=True):
    """Call write(f) on a temp file beside `path`, flush it to disk, then rename it over `path`.

    A reader, or a run killed mid-write, never sees half a file: `path` is either
    the old file or the complete new one. A kill can leave the temp file
    (`path.tmpPID`) behind; `remove_stale_temps` clears those.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        # Readable too: h5py reads back what it wrote (metadata, variable-length strings).
        with open(tmp, "w+b" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        sync_folder(path)
    except Exception as e:
        # A full disk surfaces as an OSError, or as whatever the writer raised while handling one
        # (torch.save: "RuntimeError: [enforce fail at inline_container.cc] unexpected pos ...").
        if disk_full(e):
            raise DiskFull(errno.ENOSPC, "could not be written: the disk is full", path) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def sync_folder(path):
    """Flush the folder that holds `path` to disk: a rename lives in the folder, and a power cut
    could otherwise undo it."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass   # some file systems cannot sync a folder; the rename is still atomic


class DiskFull(OSError):
    """A file could not be written because its file system (or the user's quota) is full."""


def disk_full(error):
    """Whether `error`, or an error it was raised while handling, says the disk or the quota is
    full."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def remove_stale_temps(path):
    """Delete temp files a killed atomic_write(path, ...) left behind; returns how many."""
    stale = glob.glob(glob.escape(path) + ".tmp*")
    for p in stale:
        os.remove(p)
    return len(stale)


def check_writable(folder):
    """Fail now, with one line, if files cannot be created in `folder` (made if missing).

    Better than finding out at the first checkpoint, hours into a run. A probe file
    is created and deleted, which also works for root, for whom permissions lie.
    """
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{folder}: cannot write there (a file, not a folder)")
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write_test{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ValueError(f"{folder}: cannot write there ({reason})") from None


# -----------------------------------------------------------------------------
# Pictures and videos: clips tiled, and written whole


# Pictures show every frame at least this many pixels high (nearest neighbour, a whole factor):
# a 32x32 clip shown at its size is too small to read.
MIN_FRAME_SIDE = 128


def upscale(videos, min_side=MIN_FRAME_SIDE):
    """uint8 (..., H, W, 3) enlarged by the smallest whole factor that makes H >= min_side,
    nearest neighbour."""
    k = max(1, math.ceil(min_side / videos.shape[-3]))
    return videos.repeat(k, axis=-3).repeat(k, axis=-2) if k > 1 else videos   # (..., k*H, k*W, 3)


def video_grid(videos, pad=2):
    """uint8 (N, T, H, W, 3) -> one uint8 image: a clip per row, its frames left to right,
    enlarged, with white gaps."""
    videos = upscale(np.asarray(videos))
    N, T, H, W, C = videos.shape
    canvas = np.full((N, H + pad, T, W + pad, C), 255, np.uint8)
    canvas[:, :H, :, :W] = videos.transpose(0, 2, 1, 3, 4)       # (N, H, T, W, 3)
    image = canvas.reshape(N * (H + pad), T * (W + pad), C)     # (N*(H+pad), T*(W+pad), 3)
    return image[:-pad, :-pad] if pad else image


def grid_video(videos, ncol=None, pad=2):
    """uint8 (N, T, H, W, 3) -> uint8 (T, H', W', 3): the clips, enlarged, tiled in a grid and
    playing together."""
    videos = upscale(np.asarray(videos))
    N, T, H, W, C = videos.shape
    ncol = ncol or math.ceil(math.sqrt(N))
    nrow = math.ceil(N / ncol)
    canvas = np.full((T, nrow * (H + pad) - pad, ncol * (W + pad) - pad, C), 255, np.uint8)
    for i in range(N):
        r, c = divmod(i, ncol)
        canvas[:, r * (H + pad):r * (H + pad) + H, c * (W + pad):c * (W + pad) + W] = videos[i]
    return canvas


def save_gif(frames, path, fps=8):
    """Write uint8 frames (T, H, W, 3) as a looping GIF, atomically."""
    from PIL import Image  # Pillow comes with matplotlib
    images = [Image.fromarray(np.ascontiguousarray(f)) for f in frames]
    save = lambda f: images[0].save(f, format="GIF", save_all=True, append_images=images[1:],
                                    duration=round(1000 / fps), loop=0)
    atomic_write(path, save)


def save_mp4(frames, path, fps=8):
    """Write uint8 frames (T, H, W, 3) as an H.264 MP4 with PyAV, atomically; odd sides are
    padded to even."""
    import av  # lazy: only the MP4 writer needs PyAV
    frames = np.asarray(frames)
    T, H, W, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)))   # yuv420p needs even sides

    def write(f):
        with av.open(f, "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = W + W % 2, H + H % 2, "yuv420p"
            stream.options = {"crf": "18"}
            for frame in frames:
                picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
                for packet in stream.encode(picture):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    atomic_write(path, write)


def save_png(image, path):
    """Write a uint8 (H, W, 3) image as PNG, atomically."""
    from PIL import Image  # Pillow comes with matplotlib
    atomic_write(path, lambda f: Image.fromarray(np.ascontiguousarray(image)).save(f, format="PNG"))


# -----------------------------------------------------------------------------
# Writing our checkpoints


class OutputLock:
    """One writer per output: an exclusive lock on `path` (a lock file), held while its owner runs.

    A POSIX record lock (lockf): the kernel drops it when the process ends,
    however it ends, so a killed run never leaves a stale lock that blocks its
    restart; it is not inherited by forked children (flock's would be, and a
    DataLoader worker outliving a killed run would keep the folder locked); and
    NFS carries it to the server (NFSv4, or lockd for v3), so runs on two hosts
    see each other. It belongs to the process: a second lock of the same file
    from the same process succeeds, so only one object per process should hold
    it. The file says which process holds it ("pid P on HOST"), for the message
    of whoever finds it taken, and is removed on release.
    """

    def __init__(self, path, what):
        self.path, self.what, self.file = path, what, None

    def acquire(self):
        while True:
            f = open(self.path, "a+")
            try:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    f.close()
                    raise
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                raise OutputInUse(errno.EBUSY, f"in use by {holder}; {self.what}",
                                  self.path) from None
            # The previous holder may have removed the file between our open and our lock: then lock
            # anew.
            try:
                if os.path.samestat(os.fstat(f.fileno()), os.stat(self.path)):
                    break
            except FileNotFoundError:
                pass
            f.close()
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        self.file = f
        return self

    def release(self):
        """Remove the file, then unlock (in that order, so a waiting process re-checks, see
        acquire)."""
        if self.file is not None:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            self.file.close()
            self.file = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


class OutputInUse(OSError):
    """Another process holds the lock of an output; the message names it."""


def save_checkpoint(obj, path):
    """torch.save, atomically: a kill during the save leaves the previous checkpoint intact."""
    atomic_write(path, lambda f: torch.save(obj, f))


def keep_copy(ckpt_path, step, keep_last):
    """Keep the checkpoint just written as ckpt_STEP.pt too, and delete all but the newest
    `keep_last`.

    The copy is a hard link (no extra disk): ckpt.pt is later replaced by a new
    file, not rewritten, so the link keeps this step's bytes.
    """
    folder = os.path.dirname(ckpt_path)
    kept = os.path.join(folder, f"ckpt_{step:07d}.pt")
    tmp = kept + f".tmp{os.getpid()}"
    try:
        os.link(ckpt_path, tmp)
        os.replace(tmp, kept)
    except OSError:   # a filesystem without hard links: copy instead
        with open(ckpt_path, "rb") as src:
            atomic_write(kept, lambda f: f.write(src.read()))
    old = sorted(n for n in os.listdir(folder) if n.startswith("ckpt_") and n.endswith(".pt"))
    for name in old[:-keep_last]:
        os.remove(os.path.join(folder, name))


def trim_log(path, step):
    """Drop log records after `step`: a killed run logged steps that the resumed one repeats.

    A torn last line (killed mid-append) is dropped too. Returns how many records went.
    """
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if line.endswith("\n") and json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass   # a torn or foreign line
    if len(kept) < len(lines):
        atomic_write(path, lambda f: f.writelines(kept), binary=False)
    return len(lines) - len(kept)


# -----------------------------------------------------------------------------
# Reading checkpoints safely: ours, and the original VideoGPT release's


class LightningModelCheckpoint:
    """Stand-in for pytorch_lightning's ModelCheckpoint class.

    Lightning 1.3 checkpoints key their `callbacks` dict by that class object, so
    unpickling them names it. This empty class is what the name resolves to here;
    it is never instantiated and Lightning is never imported.
    """


# The only non-tensor globals a checkpoint may name. weights_only=True refuses everything else.
SAFE_GLOBALS = [
    argparse.Namespace,
    (LightningModelCheckpoint, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
]


def load_checkpoint(path):
    """torch.load(path) with weights_only=True and the allow-list above; one-line errors."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # The safe unpickler refuses both a file that names a function or class outside the
        # allow-list (it could run code) and bytes that are no pickle at all; say which.
        named = re.search(r"GLOBAL (\S+)", str(e))
        if named:
            raise ValueError(f"{path}: refused to load: it names {named.group(1)}, which is "
                             "outside the allow-list of a checkpoint (it could run code)") from None
        raise ValueError(f"{path}: not a readable PyTorch checkpoint (corrupt?): the data is not a "
                         "valid pickle") from None
    except Exception as e:  # RuntimeError, EOFError, BadZipFile, ...: all mean a damaged file
        raise ValueError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                         f"{type(e).__name__}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: unknown checkpoint format (a {type(ckpt).__name__}, not a dict)")
    return ckpt


def trained_with(path, flag, default=None):
    """train.py's --flag in the run that wrote our checkpoint `path`; `default` for an original
    checkpoint, or a flag the run did not have."""
    args = load_checkpoint(path).get("train_args")
    value = args.get(flag) if isinstance(args, dict) else None
    return default if value is None else value


def checkpoint_kind(ckpt):
    """'vqvae' or 'gpt' for our checkpoints and the original's; None if unrecognised."""
    if "stage" in ckpt:
        return ckpt["stage"]
    sd = ckpt.get("state_dict")
    if isinstance(sd, dict) and "hyper_parameters" in ckpt:
        if any(k.startswith("vqvae.") for k in sd):
            return "gpt"
        if "codebook.embeddings" in sd:
            return "vqvae"
    return None


def expect_kind(ckpt, path, kind):
    """Check that a checkpoint (ours or the original's) holds a `kind` ('vqvae' or 'gpt'); one-line
    errors."""
    found = checkpoint_kind(ckpt)
    if found is None:
        raise ValueError(f"{path}: unknown checkpoint format (neither this project's nor "
                         "VideoGPT's)")
    if found != kind:
        hint = (" (for a prior use gpt.load_gpt, or pass the VQ-VAE checkpoint it was trained on)"
                if kind == "vqvae"
                else "")
        what = "a VQ-VAE" if kind == "vqvae" else "a prior ('gpt')"
        raise ValueError(f"{path}: is a '{found}' checkpoint, not {what} one{hint}")


def original_args(ckpt, path, names):
    """The `argparse.Namespace` of an original VideoGPT checkpoint, checked to hold `names`."""
    hparams = ckpt.get("hyper_parameters")
    args = hparams.get("args") if isinstance(hparams, dict) else None
    missing = [n for n in names if not hasattr(args, n)]
    if missing:
        raise ValueError(f"{path}: hyper_parameters['args'] lacks {', '.join(missing)}")
    return args


def stored_config(cls, ckpt, path, key="config"):
    """cls(**ckpt[key]), a config saved in one of our checkpoints; missing, foreign or invalid: one
    line."""
    d = ckpt.get(key) if isinstance(ckpt, dict) else None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: has no '{key}' dict (damaged, or not written by this project's "
                         "train.py)")
    try:
        return cls(**d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: its stored {cls.__name__} does not fit this code: {e}") from None


def load_weights(model, state_dict, path, what):
    """model.load_state_dict(state_dict, strict=True); a mismatch becomes one line naming the
    file."""
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path}: has no state dict for {what} (found a "
                         f"{type(state_dict).__name__})")
    try:
        model.load_state_dict(state_dict, strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        # PyTorch's message starts "Error(s) in loading state_dict for X:"; the next line says what.
        lines = str(e).strip().splitlines() or [type(e).__name__]
        raise ValueError(f"{path}: weights do not fit {what}: "
                         f"{lines[min(1, len(lines) - 1)].strip()[:300]}") from None
    return model


# -----------------------------------------------------------------------------
# The original VideoGPT release's checkpoints, translated into plain config dicts and state dicts
# (the models build themselves from these: vqvae.load_vqvae, gpt.load_gpt)

# The prior's parameter names: the original release's (which this project also wrote until it
# chose plainer ones) on the left, today's on the right. Each rule is a regular expression applied
# to every key, in this order; a key already in today's names matches none of them.
PRIOR_RENAMES = [
    # The transformer: the blocks were "attention nets" inside an "attention stack".
    (r"^attn_stack\.attn_nets\.", "blocks."),
    (r"^attn_stack\.", ""),                              # right_shift.sos, pos_embd.emb.d_i
    # A block's norms and branches.
    (r"\.pre_attn_norm\.", ".attn_norm."),
    (r"\.pre_enc_norm\.", ".cross_norm."),              # the norm before the cross-attention
    (r"\.enc_attn\.", ".cross_attn."),                  # the cross-attention to the conditioning
    (r"\.pre_fc_norm\.", ".mlp_norm."),
    (r"\.fc_block\.0\.", ".mlp.up."),                   # nn.Sequential(Linear, GeLU2, Linear)
    (r"\.fc_block\.2\.", ".mlp.down."),
    # A norm's gain and bias: learned vectors g and b, or maps w and wb of the conditioning vector.
    (r"norm\.g$", "norm.gain"),
    (r"norm\.b$", "norm.bias"),
    (r"norm\.w\.weight$", "norm.to_gain.weight"),
    (r"norm\.wb\.weight$", "norm.to_bias.weight"),
    # The frame ResNet: its norms were named like BatchNorms (bnr: "BatchNorm, ReLU"), each a
    # LayerNorm inside a wrapper inside a wrapper; its stem and groups were nn.Sequentials.
    (r"^resnet\.stem\.0\.", "resnet.stem_conv."),
    (r"^resnet\.stem\.1\.norm\.norm\.", "resnet.stem_norm."),
    (r"\.start_block\.", ".0."),                         # a group's first, projecting block
    (r"\.blocks\.(\d+)\.", lambda m: f".{int(m.group(1)) + 1}."),   # the rest, one index on
    (r"\.bnr1\.norm\.norm\.", ".norm1."),
    (r"\.bnr2\.norm\.norm\.", ".norm2."),
    (r"\.proj_bnr\.norm\.norm\.", ".proj_norm."),
]


def current_prior_keys(state):
    """A prior's state dict with every key in today's names (see PRIOR_RENAMES), order kept."""
    if not isinstance(state, dict):
        return state   # load_weights says what is wrong with it
    renamed = {}
    for key, value in state.items():
        for pattern, new in PRIOR_RENAMES:
            key = re.sub(pattern, new, key)
        renamed[key] = value
    return renamed


# The original's hyper-parameters that fix a VQ-VAE; its `args` Namespace holds them under these
# names.
VQVAE_ARGS = ("embedding_dim", "n_codes", "n_hiddens", "n_res_layers", "downsample",
              "sequence_length", "resolution")


def original_vqvae(ckpt, path):
    """(VQVAEConfig kwargs, state dict) of an original VideoGPT VQ-VAE checkpoint."""
    args = original_args(ckpt, path, VQVAE_ARGS)
    return {n: getattr(args, n) for n in VQVAE_ARGS}, initialized(ckpt["state_dict"])


def initialized(vq_state):
    """The original codebook has no `initialized` flag; a saved codebook is initialised."""
    if not isinstance(vq_state, dict):
        return vq_state   # load_weights says what is wrong with it
    return dict(vq_state, **{"codebook.initialized": torch.tensor(True)})


def count_indexed(keys, prefix):
    """How many `prefix.{i}.` sub-modules a state dict has."""
    return len({k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)})


def original_prior(ckpt, path):
    """(VQVAEConfig kwargs, GPTConfig kwargs, VQ-VAE state, prior state) of an original VideoGPT
    prior.

    The prior's args hold no VQ-VAE hyper-parameters, so they are read off the
    weights: codebook shape, encoder width and depth, and the downsampling from
    the clip size and the lengths of the position tables (the latent shape).
    The per-layer causal masks the original stored are rebuilt by the model, not loaded.
    """
    try:
        sd, args = ckpt["state_dict"], original_args(ckpt, path, ("sequence_length", "resolution"))
        latent = tuple(sd[f"attn_stack.pos_embd.emb.d_{i}"].shape[0] for i in range(3))
        clip = (args.sequence_length, args.resolution, args.resolution)
        if any(s % n for s, n in zip(clip, latent)):
            raise ValueError(f"{path}: clip {clip} is not a multiple of the latent shape {latent}")
        n_codes, embedding_dim = sd["vqvae.codebook.embeddings"].shape
        vq_config = dict(embedding_dim=embedding_dim, n_codes=n_codes,
                         n_hiddens=sd["vqvae.encoder.conv_last.conv.weight"].shape[0],
                         # minus the final BN
                         n_res_layers=count_indexed(sd, "vqvae.encoder.res_stack.") - 1,
                         downsample=tuple(s // n for s, n in zip(clip, latent)),
                         sequence_length=args.sequence_length, resolution=args.resolution)
        cond_w = sd.get("attn_stack.attn_nets.0.pre_attn_norm.w.weight")
        gpt_config = dict(latent_shape=latent, n_codes=n_codes, embedding_dim=embedding_dim,
                          hidden_dim=sd["fc_in.weight"].shape[0], heads=getattr(args, "heads", 4),
                          layers=count_indexed(sd, "attn_stack.attn_nets."),
                          dropout=getattr(args, "dropout", 0.2),
                          attn_dropout=getattr(args, "attn_dropout", 0.3),
                          attn_type=getattr(args, "attn_type", "full"),
                          n_cond_frames=sd["cond_pos_embd.emb.d_0"].shape[0]
                          if "cond_pos_embd.emb.d_0" in sd else 0,
                          resolution=args.resolution,
                          n_classes=cond_w.shape[1] if cond_w is not None else 0,
                          sequence_length=args.sequence_length)
    except KeyError as e:   # a weight the shapes are read from is missing
        raise ValueError(f"{path}: incomplete VideoGPT prior checkpoint: no {e.args[0]} in its "
                         "state_dict") from None
    except (AttributeError, TypeError) as e:   # hyper_parameters or a weight of the wrong type
        raise ValueError(f"{path}: damaged VideoGPT prior checkpoint "
                         f"({type(e).__name__})") from None
    vq_state = initialized({k[6:]: v for k, v in sd.items() if k.startswith("vqvae.")})
    state = {k: v for k,
             v in sd.items() if not k.startswith("vqvae.") and not k.endswith(".attn.attn.mask")}
    return vq_config, gpt_config, vq_state, state
