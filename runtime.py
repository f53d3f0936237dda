"""The run's process concerns: devices, precision, processes, stop signals, random state, errors.

Nothing here is part of VideoGPT's algorithm; the entry points (train.py,
sample.py, fvd.py, bench.py, data.py) use it so that none of them carries its
own copy:

* `default_device`, `autocast`: the device when none is named (CUDA if present)
  and the one autocast recipe (float32 means no autocast at all).
* `init_distributed`, `all_mean`, `collective_failure`, `lost_peer_error`,
  `exit_now`: plain DDP under torchrun (NCCL between GPUs, gloo between CPU
  processes), and what happens when a peer dies or stalls.
* `StopRequest`, `ignore_stop_signals`: Ctrl-C, SIGTERM and SIGUSR1 ask for a clean stop.
* `rng_state`, `set_rng_state`, `seed_everything`: every random stream a
  process draws from, in a form a `weights_only` checkpoint can hold.
* `RunError`, `first_line`, `run_cli`: one line on stderr for anything a user
  can fix, never a traceback (unless VIDEOGPT_DEBUG=1).

What this file does not hold: anything about files (checkpoints.py). It imports
nothing from the project.
"""

import datetime
import os
import random
import re
import signal
import sys
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# One-line errors for the command lines


class RunError(Exception):
    """A run that cannot go on (it diverged, or lost a peer process); the message says why and
    what is kept."""


class LostPeer(RunError):
    """A collective failed: a peer process died or stalled. The command prints its line and
    leaves at once."""


def first_line(error, limit=200):
    """The first line of an exception's message (its type name if it has none), for one-line
    reports."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


def one_line_warnings():
    """Print warnings as `warning: MESSAGE` lines (the messages already name their file)."""
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"


def run_cli(prog, fn, *args):
    """Run an entry point: warnings one line each; bad input one line on stderr, exit status 1.

    Ctrl-C ends with one line and exit status 130. Set VIDEOGPT_DEBUG=1 to get
    the traceback instead.
    """
    one_line_warnings()
    try:
        return fn(*args)
    except LostPeer as e:
        if os.environ.get("VIDEOGPT_DEBUG"):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        exit_now(1)
    except (ValueError, RunError, OSError) as e:
        if os.environ.get("VIDEOGPT_DEBUG"):
            raise
        # An OSError from the system (disk full, no permission) names its file itself.
        if isinstance(e, OSError) and e.filename and e.strerror:
            e = f"{e.filename}: {e.strerror}"
        sys.exit(f"{prog}: error: {e}")
    except KeyboardInterrupt:
        if os.environ.get("VIDEOGPT_DEBUG"):
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)


# -----------------------------------------------------------------------------
# Devices and precision


def default_device(name=None, local_rank=0):
    """torch.device(name), or CUDA when present and CPU otherwise; under torchrun, this process's
    GPU."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def autocast(device, dtype):
    """The autocast context for `dtype` ("float32", "bfloat16" or "float16"); float32 disables it.

    Autocast casts activations only: weights, gradients and optimizer state stay float32.
    """
    ptdtype = getattr(torch, dtype)
    return torch.autocast(device_type=device.type, dtype=ptdtype, enabled=ptdtype != torch.float32)


# -----------------------------------------------------------------------------
# Several processes


@dataclass
class Distributed:
    """Where this process stands under torchrun (ddp False: a single process)."""
    ddp: bool
    rank: int
    world: int
    device: torch.device

    @property
    def master(self):
        return self.rank == 0


def cache_dir():
    """Where generated data, indexes and compiled steps go when they cannot go beside what they
    come from: $VIDEOGPT_CACHE, else ~/.cache/videogpt."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "videogpt")
    return os.environ.get("VIDEOGPT_CACHE", default)


def init_distributed(device=None, timeout=None):
    """Read torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE) and join the process group.

    NCCL between GPUs, gloo between CPU processes. With `timeout` (seconds) a peer
    that stops answering fails the collective after that long instead of hanging.
    """
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = default_device(device, local_rank=int(os.environ.get("LOCAL_RANK", 0)) if ddp else 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ddp and not dist.is_initialized():   # a second run in the same processes reuses it
        kw = dict(timeout=datetime.timedelta(seconds=timeout)) if timeout else {}
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", **kw)
    return Distributed(ddp, rank, world, device)


def all_mean(values, ddp):
    """Average a dict of floats over processes (one all-reduce)."""
    if not ddp or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    t = t.to("cuda") if dist.get_backend() == "nccl" else t
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist()))


def collective_failure(error):
    """True if `error` is a failed collective (a peer died, or stalled past the timeout).

    Backends raise most of these as plain RuntimeErrors, so the text decides. gloo puts its
    source location in front of the operation that failed first, but every later operation on
    the same connection (DDP's buffer broadcast in the next forward, say) gets a bare
    "Application timeout caused pair closure".
    """
    text = str(error)
    return isinstance(error, dist.DistError) or any(k in text for k in (
        "gloo", "Gloo", "NCCL", "Connection closed", "Connection reset", "pair closure",
        "Timed out", "timed out"))


def lost_peer_error(error, rank, step, timeout, last_good):
    """The one-line error for a failed collective: which rank, at which step, and what is kept."""
    # gloo's text starts with a source location; the first sentence after it says what happened.
    what = re.sub(r"^\[[^\]]*\]\s*", "", first_line(error, limit=None)).split(". ")[0]
    return LostPeer(f"rank {rank}: lost contact with the other processes at step {step} (one died, "
                    f"or stalled longer than --ddp_timeout={timeout:g}s): {what}; {last_good}")


def exit_now(status):
    """Leave the process at once with `status`, after flushing what it printed.

    For a process whose peer died or stalled: the process group still holds
    threads blocked on that peer, and tearing it down at interpreter exit
    destroys a thread that is still running, which aborts the process
    (SIGABRT, "terminate called without an active exception") after the message
    has been printed. Nothing is left to save at that point (checkpoints are
    written atomically, DataLoader workers are already shut down), so the
    process skips the teardown instead.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


# -----------------------------------------------------------------------------
# Stop signals


# What asks a run to stop cleanly: Ctrl-C; SIGTERM, which schedulers send before a kill; and
# SIGUSR1, which Slurm sends a grace period ahead when a job is submitted with
# --signal=USR1@SECONDS.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Ctrl-C (SIGINT), SIGTERM or SIGUSR1 (schedulers, before a kill) asks for a clean stop.

    The loop finishes its step, saves a checkpoint and exits; a second Ctrl-C
    quits at once without saving. Stopping between steps rather than wherever
    the signal lands keeps the checkpoint consistent (weights, optimizer and step
    from the same moment), and under DDP lets every process stop at the same step.
    A context manager: the previous handlers come back on exit.
    """

    def __init__(self):
        self.signum = None
        self.previous = {}

    def __enter__(self):
        # Python delivers signals to the main thread only; a run in another thread keeps the
        # defaults.
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self.handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False

    def handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint"
              + (" (Ctrl-C again to quit at once)" if signum == signal.SIGINT else ""), flush=True)

    @property
    def exit_status(self):
        """What the process exits with after stopping: 128 + the signal's number, as a shell
        reports it."""
        return 128 + (self.signum or signal.SIGTERM)


def ignore_stop_signals(worker_id=None):
    """DataLoader worker init: the main process decides when to stop, so workers ignore the stop
    signals."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


# -----------------------------------------------------------------------------
# Random state


def seed_everything(seed):
    """Seed the torch (CPU and CUDA), numpy and Python streams."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def rng_state(device):
    """Every random stream a process draws from, in types that weights_only loading accepts."""
    np_state = np.random.get_state(legacy=False)   # dict; its key array becomes a tensor
    return dict(torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                numpy=dict(key=torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                           pos=np_state["state"]["pos"], has_gauss=np_state["has_gauss"],
                           gauss=np_state["gauss"]),
                python=random.getstate())


def set_rng_state(state, device):
    """Inverse of rng_state."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    mt = dict(key=n["key"].numpy().astype(np.uint32), pos=n["pos"])
    np.random.set_state(dict(bit_generator="MT19937", state=mt, has_gauss=n["has_gauss"],
                             gauss=n["gauss"]))
    random.setstate(state["python"])
