"""Shared fixtures and helpers: the project on sys.path, a clean environment, tiny runs, small
files.

Run the whole suite with `python -m pytest` from the repository root (or
`python -m pytest /path/to/repo/tests` from anywhere: nothing depends on the
working directory, the terminal, the signal dispositions the suite was started
with, or variables such as CI, RANK or VIDEOGPT_DEBUG in the environment).
"""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Variables that change what the project does: torchrun's (a suite started inside a job would try to
# join it), the traceback switch (errors would no longer be one line), warning filters.
FOREIGN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
               "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "VIDEOGPT_DEBUG", "VIDEOGPT_C3D", "PYTHONWARNINGS")


@pytest.fixture(autouse=True)
def clean_environment(tmp_path, monkeypatch):
    """Each test sees the same environment: generated data and indexes in a temp folder, never
    ~/.cache; none of the variables above (subprocesses inherit this environment)."""
    monkeypatch.setenv("VIDEOGPT_CACHE", str(tmp_path / "cache"))
    for name in FOREIGN_ENV:
        monkeypatch.delenv(name, raising=False)


def default_signals():
    """In the child, before Python starts: SIGINT, SIGTERM and SIGUSR1 back to their defaults.

    A process started with SIGINT ignored (a script run in the background, nohup,
    some CI runners) passes that on, and Python then never installs its Ctrl-C
    handler; a test that sends a signal must not depend on how the suite was started.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def script_command(script, *args):
    """[python, ROOT/script, args...]; `-m module` runs a module (torch.distributed.run)."""
    if script.startswith("-m "):
        head = [sys.executable, "-m", script[3:]]
    else:
        head = [sys.executable, os.path.join(ROOT, script)]
    return head + [str(a) for a in args]


def start_script(script, *args, env=None, cwd=ROOT, **kw):
    """Popen of one of the project's scripts: text pipes, no stdin, default signal dispositions."""
    return subprocess.Popen(script_command(script, *args), cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_signals, **kw)


def run_script(script, *args, cwd=ROOT, timeout=600, **kw):
    """subprocess.run of one of the project's scripts, output captured; returns the
    CompletedProcess."""
    return subprocess.run(script_command(script, *args), cwd=cwd, stdin=subprocess.DEVNULL,
                          capture_output=True,
                          text=True, preexec_fn=default_signals, timeout=timeout, **kw)


# -----------------------------------------------------------------------------
# Tiny training runs

TINY = ["--stage", "vqvae", "--sequence_length", "4", "--resolution", "16", "--n_hiddens", "16",
        "--n_res_layers", "1", "--embedding_dim", "8", "--n_codes", "32", "--downsample", "2", "4",
        "4",
        "--batch_size", "2", "--num_workers", "0", "--log_interval", "1", "--eval_interval", "2",
        "--eval_batches", "1", "--device", "cpu"]

TINY_GPT = ["--stage", "gpt", "--hidden_dim", "24", "--heads", "2", "--layers", "1",
            "--batch_size", "2",
            "--num_workers", "0", "--log_interval", "1", "--eval_interval", "2", "--eval_batches",
            "1", "--device", "cpu", "--dropout", "0", "--attn_dropout", "0"]


def run_train(*args):
    """train.py as a command; returns the CompletedProcess."""
    return run_script("train.py", *args)


def train_error(*argv):
    """train.py's error for these arguments, run in this process: what the command prints, exiting
    with status 1.

    (`sys.exit(message)` prints the message alone on stderr and exits with 1.)
    """
    import train
    with pytest.raises(SystemExit) as e:
        train.main(list(argv))
    message = e.value.code
    assert isinstance(message, str) and "\n" not in message, message
    assert message.startswith("train.py: error: "), message
    return message


def tiny_vqvae_and_prior(out, sequence_length, resolution, downsample, data=None):
    """One-step tiny VQ-VAE and prior trained in this process: out/vq/ckpt.pt and
    out/gpt/ckpt.pt."""
    import train
    common = ["--batch_size", "2", "--num_workers", "0", "--eval_interval", "1", "--eval_batches",
              "1",
              "--max_steps", "1", "--device", "cpu", "--dtype", "float32"] + (["--data", str(data)]
                                                                              if data else [])
    train.train(train.parse_args(["--stage", "vqvae", "--out_dir", os.path.join(out, "vq"),
                                  "--sequence_length",
                                  str(sequence_length), "--resolution", str(resolution),
                                  "--n_hiddens", "16",
                                  "--n_res_layers", "1", "--embedding_dim", "8", "--n_codes", "16",
                                  "--downsample", *map(str, downsample)] + common))
    # One step needs no cache of the moving digits' 10,256 clips (encoding them is most of this
    # helper's time).
    train.train(train.parse_args(["--stage", "gpt", "--out_dir", os.path.join(out, "gpt"),
                                  "--vqvae", os.path.join(out, "vq", "ckpt.pt"),
                                  "--hidden_dim", "12", "--heads", "2", "--layers", "1"]
                                 + common + ([] if data else ["--no-cache_codes"])))


def train_records(out_dir):
    """The training records of out_dir/log.jsonl."""
    return [r for r in map(json.loads, open(os.path.join(out_dir, "log.jsonl")))
            if r["split"] == "train"]


def write_video(path, frames, codec=None, fps=10):
    """Write uint8 frames (T, H, W, 3) to `path` with PyAV; the codec follows the extension."""
    import av
    codec = (codec
             or {".mp4": "libx264", ".avi": "mpeg4", ".webm": "libvpx"}[os.path.splitext(path)[1]])
    T, H, W, _ = frames.shape
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for frame in frames:
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def gradient_video(T, H, W, seed=0):
    """A smooth, moving colour pattern that survives lossy codecs."""
    t, y, x = np.meshgrid(np.arange(T), np.arange(H), np.arange(W), indexing="ij")
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 6, size=3)
    video = np.stack([127 + 100 * np.sin(0.2 * x + 0.3 * t + phase[0]),
                      127 + 100 * np.sin(0.15 * y - 0.2 * t + phase[1]),
                      127 + 100 * np.sin(0.1 * (x + y) + phase[2]) * np.ones_like(t)], axis=-1)
    return video.astype(np.uint8)


@pytest.fixture(scope="session")
def digits_h5(tmp_path_factory):
    """A tiny moving-digits HDF5 file: 6 train and 2 test videos of 6 frames at 32x32, labels
    0/1."""
    from data import moving_digits
    path = tmp_path_factory.mktemp("data") / "digits.h5"
    with h5py.File(path, "w") as f:
        for split, n in (("train", 6), ("test", 2)):
            videos = moving_digits(n, frames=6, resolution=32, seed=0, train=split == "train")
            f.create_dataset(f"{split}_data", data=videos.reshape(-1, 32, 32, 3))
            f.create_dataset(f"{split}_idx", data=np.arange(n) * 6)
            f.create_dataset(f"{split}_labels", data=np.arange(n) % 2)
    return str(path)


class Exploit:
    """A pickle payload that would run a shell command when unpickled (it must never be)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"echo owned > {self.target}",))


# -----------------------------------------------------------------------------
# Runs in other processes, watched through their log


def start_train(*args, env=None):
    """train.py as a running command (see start_script)."""
    return start_script("train.py", *args, env=env)


def wait_for_step(out_dir, step, proc, timeout=120):
    """Block until out_dir/log.jsonl records a training step >= `step` (the process must still be
    running)."""
    path, deadline = os.path.join(out_dir, "log.jsonl"), time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"the run ended early: {proc.communicate()[1][-2000:]}"
        if os.path.exists(path):
            steps = [json.loads(line)["step"] for line in open(path) if line.endswith("\n")
                     and '"train"' in line]
            if steps and max(steps) >= step:
                return max(steps)
        # polling the log: the event waited for is the step, whatever the machine's speed
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout} s")


def saved_step(out_dir):
    """The step of out_dir/ckpt.pt."""
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["step"]


# -----------------------------------------------------------------------------
# Tiny priors (tests/test_gpt.py, tests/test_fast.py)

# One prior per kind of attention and conditioning.
VARIANTS = {
    "full": dict(),
    "sparse": dict(attn_type="sparse", sparse_block=8, sparse_local_blocks=1),
    "class": dict(n_classes=3),
    "frames": dict(n_cond_frames=1, resolution=8),
    "actions": dict(action_dim=3, sequence_length=4),
    "frames+actions": dict(n_cond_frames=1, resolution=8, action_dim=2, sequence_length=4),
    "class+action norms": dict(n_classes=3, action_dim=2, sequence_length=4, action_norms=True),
    "rope": dict(rope=True),
    "rope+sparse": dict(rope=True, attn_type="sparse", sparse_block=8, sparse_local_blocks=1),
}


@pytest.fixture(scope="session")
def digit_reader():
    """The digit reader that ships (weights/digit_reader.pt), as `fvd.py digits` loads it."""
    from metrics import SHIPPED_READER, load_digit_reader
    return load_digit_reader(SHIPPED_READER)


def tiny_prior(seed=0, **kw):
    """A small prior with every weight random (fc_out too, which is zero at init)."""
    from gpt import GPTConfig, VideoGPT
    torch.manual_seed(seed)
    config = GPTConfig(**{**dict(latent_shape=(2, 4, 4), n_codes=16, embedding_dim=8,
                                 hidden_dim=24, heads=2,
                                 layers=2, dropout=0.0, attn_dropout=0.0), **kw})
    gpt = VideoGPT(config)
    gpt.codebook.normal_()
    gpt.fc_out.weight.data.normal_(std=0.3)
    return gpt


def inputs(gpt, B=3, seed=1):
    c = gpt.config
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(c.n_codes, (B, *c.latent_shape), generator=g)
    label = torch.randint(c.n_classes, (B,), generator=g) if c.n_classes else None
    frames = (torch.rand(B, 3, c.n_cond_frames, c.resolution, c.resolution, generator=g) - 0.5
              if c.n_cond_frames else None)
    actions = torch.randn(B, c.sequence_length, c.action_dim, generator=g) if c.action_dim else None
    return codes, dict(label=label, frames=frames, actions=actions)


@torch.no_grad()
def naive_sample(gpt, n, label=None, frames=None, actions=None, temperature=1.0, top_k=None,
                 top_p=None, generator=None):
    """The reference sampler: the whole teacher-forced forward at every position, O(L) times slower
    than the cache. Reads its noise as every sampler does, so the same generator gives the same
    codes."""
    from gpt import sample_logits, uniform_noise
    c = gpt.config
    codes = torch.zeros(n, c.seq_len, dtype=torch.long)
    noise = uniform_noise(n, c.n_codes, c.seq_len, generator, codes.device)
    for i in range(c.seq_len):
        logits = gpt(codes.view(n, *c.latent_shape), label, frames, actions)   # (n, t, h, w, V)
        logits = logits.view(n, c.seq_len, -1)[:, i]                          # (n, n_codes)
        codes[:, i] = sample_logits(logits, temperature, top_k, top_p, noise=next(noise))
    return codes.view(n, *c.latent_shape)                                     # (n, t, h, w)
