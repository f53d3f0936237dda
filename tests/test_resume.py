"""Killed, interrupted and resumed runs, and files that are never half-written.

python -m pytest tests/test_resume.py

Real processes and real signals: SIGKILL, SIGINT (Ctrl-C), SIGTERM (what a
cluster scheduler sends before it kills).
"""

import glob
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import (ROOT, TINY, run_train, saved_step, start_script, start_train, train_records,
                      wait_for_step)

# -----------------------------------------------------------------------------
# Exact resume; Ctrl-C and SIGTERM save


def test_killed_and_interrupted_runs_resume_exactly(tmp_path, digits_h5):
    """SIGKILL, then Ctrl-C, then a preemption warning, each followed by the same command: the run
    of an uninterrupted one."""
    # One DataLoader worker, so that worker processes and their RNG are part of what is resumed.
    cmd = [*TINY, "--data", digits_h5, "--max_steps", "100", "--eval_interval", "25",
           "--num_workers", "1"]
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    import train
    # the same code as the command, in here
    train.train(train.parse_args(cmd + ["--out_dir", straight]))

    # SIGKILL somewhere between checkpoints: the restart goes back to the last one.
    p = start_train(*cmd, "--out_dir", broken)
    killed_at = wait_for_step(broken, 30, p)
    p.kill()
    p.wait()
    assert saved_step(broken) % 25 == 0 and saved_step(broken) <= killed_at < 100

    # Ctrl-C: the step in progress finishes, a checkpoint of exactly that step is written, exit
    # status 130.
    p = start_train(*cmd, "--out_dir", broken)
    wait_for_step(broken, 55, p)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err[-2000:]
    stopped = saved_step(broken)
    assert f"stopped at step {stopped}; {os.path.join(broken, 'ckpt.pt')} (step {stopped})" in out
    assert max(r["step"] for r in train_records(broken)) == stopped < 100 and "Traceback" not in err

    # Preempted: Slurm's --signal=USR1@SECONDS warning (SIGUSR1) saves the step and exits 138; the
    # job, requeued with the same command, continues.
    p = start_train(*cmd, "--out_dir", broken)
    wait_for_step(broken, stopped + 15, p)
    p.send_signal(signal.SIGUSR1)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGUSR1, err[-2000:]
    assert saved_step(broken) > stopped and "SIGUSR1: stopping after this step" in out + err
    assert max(r["step"] for r in train_records(broken)) == saved_step(broken) < 100

    # The same command once more finishes the run.
    r = run_train(*cmd, "--out_dir", broken)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = train_records(straight), train_records(broken)
    assert [r["step"] for r in b] == list(range(1, 101))                 # every step logged once
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6), ra["step"]
    wa = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)
    wb = torch.load(os.path.join(broken, "ckpt.pt"), weights_only=True)
    for k, v in wa["model"].items():  # the codebook buffers included
        torch.testing.assert_close(wb["model"][k], v, atol=1e-6, rtol=0, msg=k)
    # The torch stream (codebook restarts draw from it) is where the uninterrupted run left it.
    assert torch.equal(wa["rng"][0]["torch"], wb["rng"][0]["torch"])
    assert wa["optimizer"]["state"][0]["step"] == wb["optimizer"]["state"][0]["step"] == 100


def test_sigterm_finishes_the_step_saves_it_and_exits_143(tmp_path, digits_h5, monkeypatch):
    """What a scheduler sends before it kills: a real SIGTERM to this process, in the middle of step
    5."""
    import train
    calls = []
    loss = train.VQVAEStage.loss

    def loss_then_sigterm(self, model, batch, device):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(self, model, batch, device)

    monkeypatch.setattr(train.VQVAEStage, "loss", loss_then_sigterm)
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        train.train(train.parse_args(TINY + ["--data", digits_h5, "--out_dir", out, "--max_steps",
                                             "50", "--eval_interval", "100"]))
    # step 5 finished, saved, nothing more
    assert e.value.code == 143 and saved_step(out) == 5 == len(calls)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back


def test_resume_continues_every_random_stream(tmp_path, digits_h5, monkeypatch):
    """Torch, numpy and Python draws after a resume are those the uninterrupted run made."""
    import random

    import train
    draws = []
    loss = train.VQVAEStage.loss

    def drawing_loss(self, model, batch, device):
        # Stand-in for any user code that draws random numbers (augmentation, noise, ...) each step.
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(()))))
        return loss(self, model, batch, device)

    monkeypatch.setattr(train.VQVAEStage, "loss", drawing_loss)
    args = TINY + ["--data", digits_h5, "--eval_interval", "2"]
    train.train(train.parse_args(args + ["--out_dir", str(tmp_path / "a"), "--max_steps", "4"]))
    straight, draws[:] = list(draws), []
    train.train(train.parse_args(args + ["--out_dir", str(tmp_path / "b"), "--max_steps", "2"]))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)  # a new process would start elsewhere
    train.train(train.parse_args(args + ["--out_dir", str(tmp_path / "b"), "--max_steps", "4"]))
    assert len(straight) == 4 + 2 and draws == straight  # 4 steps and 2 evaluations


# -----------------------------------------------------------------------------
# No torn files


def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    from checkpoints import remove_stale_temps
    from vqvae import VQVAE, VQVAEConfig, load_vqvae
    config = VQVAEConfig(embedding_dim=8, n_codes=16, n_hiddens=16, n_res_layers=1,
                         downsample=(2, 4, 4), sequence_length=4, resolution=16)
    target = tmp_path / "ckpt.pt"
    torch.save(dict(stage="vqvae", config=config.to_dict(), model=VQVAE(config).state_dict()),
               target)
    before = target.read_bytes()
    # A process half-way through writing a new checkpoint over it, killed there.
    script = (f"import sys, time; sys.path.insert(0, {ROOT!r})\nfrom checkpoints import "
              "atomic_write\ndef write(f):\n    f.write(b'PK' + bytes(100_000)); f.flush(); "
              f"print('writing', flush=True); time.sleep(60)\natomic_write({str(target)!r}, "
              "write)\n")
    p = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    p.kill()
    p.wait()
    assert target.read_bytes() == before
    load_vqvae(target)  # still a whole checkpoint
    leftovers = glob.glob(str(target) + ".tmp*")
    assert len(leftovers) == 1 and os.path.getsize(leftovers[0]) > 100_000
    assert remove_stale_temps(str(target)) == 1 and not glob.glob(str(target) + ".tmp*")


def test_keep_last_stale_temps_and_torn_log_lines(tmp_path, digits_h5):
    import train
    out = tmp_path / "run"
    out.mkdir()
    # What a run killed mid-save and mid-log, before its first checkpoint, leaves behind.
    (out / "ckpt.pt.tmp4242").write_bytes(b"PK\x03\x04 half a checkpoint")
    (out / "log.jsonl").write_text('{"step": 1, "split": "train", "loss": 9.0}\n{"step": 2, "spl')
    train.train(train.parse_args(TINY + ["--data", digits_h5, "--out_dir", str(out), "--max_steps",
                                         "6", "--eval_interval", "2", "--keep_last", "2"]))
    assert sorted(p.name for p in out.glob("ckpt*")) == ["ckpt.pt", "ckpt_0000004.pt",
                                                         "ckpt_0000006.pt"]
    for step in (4, 6):
        assert torch.load(out / f"ckpt_{step:07d}.pt", weights_only=True)["step"] == step
    assert (out / "ckpt.pt").read_bytes() == (out / "ckpt_0000006.pt").read_bytes()
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert all(r.get("loss") != 9.0 for r in records)  # the dead run's record is gone




# -----------------------------------------------------------------------------
# Long jobs: Ctrl-C while sampling


def test_ctrl_c_while_sampling_exits_cleanly_and_writes_nothing(tmp_path):
    from gpt import GPTConfig, VideoGPT
    from vqvae import VQVAE, VQVAEConfig
    vc = VQVAEConfig(embedding_dim=8, n_codes=16, n_hiddens=16, n_res_layers=1,
                     downsample=(1, 2, 2),
                     sequence_length=4, resolution=32)  # 4 x 16 x 16 codes per video
    vq = VQVAE(vc)
    gc = GPTConfig(latent_shape=vc.latent_shape, n_codes=16, embedding_dim=8, hidden_dim=24,
                   heads=2, layers=1, resolution=32)
    gpt = VideoGPT(gc)
    gpt.set_codebook(vq.codebook.embeddings)
    torch.save(dict(stage="gpt", config=gc.to_dict(), model=gpt.state_dict(),
                    vqvae=dict(config=vc.to_dict(), model=vq.state_dict())), tmp_path / "prior.pt")
    out = tmp_path / "samples" / "grid.mp4"
    p = start_script("sample.py", "--ckpt", tmp_path / "prior.pt", "--n", "64", "--batch_size",
                     "8", "--out", out, "--device", "cpu")
    assert p.stdout.readline().startswith("sampled 8/64")  # a progress line: it is under way
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.strip().splitlines()[-1] == "sample.py: interrupted"
    assert "Traceback" not in err and os.listdir(tmp_path / "samples") == []


# -----------------------------------------------------------------------------
# Shared clusters: one run per output folder, changed flags on resume


def test_a_second_run_on_the_same_out_dir_refuses_and_a_killed_run_leaves_no_stale_lock(tmp_path,
                                                                                        digits_h5):
    import socket
    cmd = [*TINY, "--data", digits_h5, "--max_steps", "40", "--eval_interval", "10",
           "--log_interval", "1"]
    out = str(tmp_path / "run")
    first = start_train(*cmd, "--out_dir", out)
    wait_for_step(out, 3, first)
    # The same command again (a requeued job while the old one runs): one line naming the holder,
    # nothing touched.
    second = run_train(*cmd, "--out_dir", out)
    assert second.returncode == 1
    assert second.stderr.strip() == (f"train.py: error: {os.path.join(out, '.lock')}: in use by "
                                     f"pid {first.pid} on {socket.gethostname()}; wait for that "
                                     "run to end or choose another --out_dir")
    assert first.poll() is None                                              # the first run goes on
    # Killed outright: the kernel drops the lock with the process, so the restart is not blocked.
    wait_for_step(out, 15, first)
    first.kill()
    first.wait()
    r = run_train(*cmd, "--out_dir", out)
    assert r.returncode == 0, r.stderr[-2000:]
    steps = [rec["step"] for rec in train_records(out)]
    assert steps == list(range(1, 41))                     # one run's log, never interleaved
    assert not os.path.exists(os.path.join(out, ".lock"))  # released at the end


def test_resuming_with_changed_flags_says_which_and_what_happens(tmp_path, digits_h5):
    import train
    out = str(tmp_path / "run")
    cmd = [*TINY, "--data", digits_h5, "--out_dir", out, "--eval_interval", "2"]
    train.train(train.parse_args(cmd + ["--max_steps", "2"]))
    with pytest.warns(UserWarning) as caught:
        train.train(train.parse_args(cmd + ["--max_steps", "4", "--batch_size", "3", "--lr", "0.01",
                                            "--n_codes", "64", "--num_workers", "1", "--optimizer",
                                            "muon"]))
    lines = [str(w.message) for w in caught if "changed flags" in str(w.message)]
    assert lines == [f"{os.path.join(out, 'ckpt.pt')}: resuming with changed flags: --batch_size 3 "
                     "(was 2: the new value is used; the data order is no longer that of an "
                     "uninterrupted run); --lr 0.01 (was 0.0007: the new value is used); "
                     "--max_steps 4 (was 2: the new value is used); --n_codes 64 (was 32: the "
                     "checkpoint's value is kept); --optimizer muon (was adam: the checkpoint's "
                     "value is kept)"]
    resumed = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    # still Adam's state
    assert resumed["config"]["n_codes"] == 32 and "param_groups" in resumed["optimizer"]


@pytest.fixture
def small_disk(tmp_path):
    """A 1.2 MB tmpfs (room for one tiny checkpoint, not for the next one beside it), or None where
    this process may not mount one (not root, or no mount permission in a container)."""
    folder = tmp_path / "small_disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    yield str(folder) if mounted else None
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_full_disk_ends_the_run_with_one_line_and_keeps_the_last_checkpoint(tmp_path, digits_h5,
                                                                              small_disk,
                                                                              monkeypatch):
    cmd = [*TINY, "--data", digits_h5, "--max_steps", "6", "--eval_interval", "2"]
    if small_disk is not None:
        # A real full file system and a real process: the first checkpoint fits, the second does
        # not.
        out = os.path.join(small_disk, "run")
        r = run_train(*cmd, "--out_dir", out)
    else:
        # No way to make a small file system here: the second checkpoint's write fails as a full
        # disk does.
        import errno
        import checkpoints
        import train
        out, calls, save = str(tmp_path / "run"), [], checkpoints.torch.save

        def save_then_fill(obj, f, *a, **kw):
            calls.append(1)
            if len(calls) == 2:
                try:
                    raise OSError(errno.ENOSPC, "No space left on device")
                except OSError:
                    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                                       "704 vs 598")
            return save(obj, f, *a, **kw)
        monkeypatch.setattr(checkpoints.torch, "save", save_then_fill)
        with pytest.raises(SystemExit) as e:
            train.main(cmd + ["--out_dir", out])
        r = subprocess.CompletedProcess([], 1, "", f"{e.value.code}\n")
    ckpt = os.path.join(out, "ckpt.pt")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (f"train.py: error: {ckpt}: could not be written: "
                                                 f"the disk is full (step 4); {ckpt} (step 2) is "
                                                 "the last good checkpoint")
    # the old one intact, no temp file
    assert saved_step(out) == 2 and not glob.glob(ckpt + ".tmp*")
