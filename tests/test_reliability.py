"""What happens when a run is killed, diverges, loses a peer or meets bad input: each promise, tested.

python -m pytest tests/test_reliability.py

Real processes and real signals throughout: SIGKILL, SIGINT (Ctrl-C), SIGTERM
(what a cluster scheduler sends before it kills), SIGSTOP (a stalled peer).
"""

import ast
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings

import h5py
import numpy as np
import pytest
import torch

from conftest import (ROOT, TINY, Exploit, gradient_video, run_script, run_train, start_script, train_error,
                      train_records, write_video)

PYTHON_FILES = ["attention.py", "vqvae.py", "gpt.py", "data.py", "train.py", "sample.py", "fvd.py", "bench.py",
                "checkpoints.py", "runtime.py"]


def start_train(*args, env=None):
    return start_script("train.py", *args, env=env)


def wait_for_step(out_dir, step, proc, timeout=120):
    """Block until out_dir/log.jsonl records a training step >= `step` (the process must still be running)."""
    path, deadline = os.path.join(out_dir, "log.jsonl"), time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"the run ended early: {proc.communicate()[1][-2000:]}"
        if os.path.exists(path):
            steps = [json.loads(l)["step"] for l in open(path) if l.endswith("\n") and '"train"' in l]
            if steps and max(steps) >= step:
                return max(steps)
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout} s")


def saved_step(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["step"]


# -----------------------------------------------------------------------------
# 1. Exact resume, 8. Ctrl-C saves


def test_killed_and_interrupted_runs_resume_exactly(tmp_path, digits_h5):
    """SIGKILL, then Ctrl-C, each followed by the same command: the run of an uninterrupted one."""
    # One DataLoader worker, so that worker processes and their RNG are part of what is resumed.
    cmd = [*TINY, "--data", digits_h5, "--max_steps", "100", "--eval_interval", "25", "--num_workers", "1"]
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    import train
    train.train(train.parse_args(cmd + ["--out_dir", straight]))          # the same code as the command, in here

    # SIGKILL somewhere between checkpoints: the restart goes back to the last one.
    p = start_train(*cmd, "--out_dir", broken)
    killed_at = wait_for_step(broken, 30, p)
    p.kill()
    p.wait()
    assert saved_step(broken) % 25 == 0 and saved_step(broken) <= killed_at < 100

    # Ctrl-C: the step in progress finishes, a checkpoint of exactly that step is written, exit status 130.
    p = start_train(*cmd, "--out_dir", broken)
    wait_for_step(broken, 55, p)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err[-2000:]
    stopped = saved_step(broken)
    assert f"stopped at step {stopped}; {os.path.join(broken, 'ckpt.pt')} (step {stopped})" in out
    assert max(r["step"] for r in train_records(broken)) == stopped < 100 and "Traceback" not in err

    # The same command once more finishes the run.
    r = run_train(*cmd, "--out_dir", broken)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = train_records(straight), train_records(broken)
    assert [r["step"] for r in b] == list(range(1, 101))                 # every step logged once
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6), ra["step"]
    wa = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)
    wb = torch.load(os.path.join(broken, "ckpt.pt"), weights_only=True)
    for k, v in wa["model"].items():                                        # the codebook buffers included
        torch.testing.assert_close(wb["model"][k], v, atol=1e-6, rtol=0, msg=k)
    # The torch stream (codebook restarts draw from it) is where the uninterrupted run left it.
    assert torch.equal(wa["rng"][0]["torch"], wb["rng"][0]["torch"])
    assert wa["optimizer"]["state"][0]["step"] == wb["optimizer"]["state"][0]["step"] == 100


def test_sigterm_finishes_the_step_saves_it_and_exits_143(tmp_path, digits_h5, monkeypatch):
    """What a scheduler sends before it kills: a real SIGTERM to this process, in the middle of step 5."""
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
        train.train(train.parse_args(TINY + ["--data", digits_h5, "--out_dir", out, "--max_steps", "50",
                                             "--eval_interval", "100"]))
    assert e.value.code == 143 and saved_step(out) == 5 == len(calls)      # step 5 finished, saved, nothing more
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL               # the handlers are put back


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
    random.seed(1), np.random.seed(1), torch.manual_seed(1)                  # a new process would start elsewhere
    train.train(train.parse_args(args + ["--out_dir", str(tmp_path / "b"), "--max_steps", "4"]))
    assert len(straight) == 4 + 2 and draws == straight                    # 4 steps and 2 evaluations


# -----------------------------------------------------------------------------
# 2. No torn files


def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    from checkpoints import remove_stale_temps
    from vqvae import VQVAE, VQVAEConfig, load_vqvae
    config = VQVAEConfig(embedding_dim=8, n_codes=16, n_hiddens=16, n_res_layers=1, downsample=(2, 4, 4),
                         sequence_length=4, resolution=16)
    target = tmp_path / "ckpt.pt"
    torch.save(dict(stage="vqvae", config=config.to_dict(), model=VQVAE(config).state_dict()), target)
    before = target.read_bytes()
    # A process half-way through writing a new checkpoint over it, killed there.
    script = (f"import sys, time; sys.path.insert(0, {ROOT!r})\n"
              "from checkpoints import atomic_write\n"
              "def write(f):\n"
              "    f.write(b'PK' + bytes(100_000)); f.flush(); print('writing', flush=True); time.sleep(60)\n"
              f"atomic_write({str(target)!r}, write)\n")
    p = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    p.kill()
    p.wait()
    assert target.read_bytes() == before
    load_vqvae(target)                                                      # still a whole checkpoint
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
    train.train(train.parse_args(TINY + ["--data", digits_h5, "--out_dir", str(out), "--max_steps", "6",
                                         "--eval_interval", "2", "--keep_last", "2"]))
    assert sorted(p.name for p in out.glob("ckpt*")) == ["ckpt.pt", "ckpt_0000004.pt", "ckpt_0000006.pt"]
    for step in (4, 6):
        assert torch.load(out / f"ckpt_{step:07d}.pt", weights_only=True)["step"] == step
    assert (out / "ckpt.pt").read_bytes() == (out / "ckpt_0000006.pt").read_bytes()
    records = [json.loads(l) for l in open(out / "log.jsonl")]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert all(r.get("loss") != 9.0 for r in records)                    # the dead run's record is gone


# -----------------------------------------------------------------------------
# 3. Divergence


def test_divergence_skips_steps_then_stops_keeping_the_last_good_checkpoint(tmp_path, digits_h5):
    import train
    from runtime import RunError
    out = str(tmp_path / "run")
    train.train(train.parse_args(TINY + ["--data", digits_h5, "--out_dir", out, "--max_steps", "2"]))
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    # Resumed with an absurd learning rate: step 3 is finite but wrecks the weights (its test loss is
    # NaN, so it is not saved), steps 4, 5, 6 are non-finite and skipped, and the third one stops the run.
    with pytest.raises(RunError, match=r"stopped at step 6 after 3 consecutive steps with a non-finite loss or "
                                       r"gradient; .*ckpt.pt \(step 2\) is the last good checkpoint"):
        train.train(train.parse_args(TINY + ["--data", digits_h5, "--out_dir", out, "--max_steps", "50",
                                             "--eval_interval", "1", "--lr", "1e30", "--max_bad_steps", "3"]))
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before
    records = train_records(out)
    assert [(r["step"], r["skipped"]) for r in records[2:]] == [(3, 0), (4, 1), (5, 1), (6, 1)]
    assert "loss" not in records[-1]                                    # nothing non-finite was averaged in
    # Through the command's error handling: one line, exit status 1.
    message = train_error(*TINY, "--data", digits_h5, "--out_dir", out, "--max_steps", "50", "--lr", "1e30",
                          "--max_bad_steps", "2")
    assert message.startswith(f"train.py: error: {out}: stopped at step 5 after 2 ")


# -----------------------------------------------------------------------------
# 4. Mixed precision


def test_bfloat16_trains_both_stages_without_nan_and_float16_lets_the_scaler_skip(tmp_path, digits_h5):
    import train
    steps = 200
    common = ["--data", digits_h5, "--max_steps", str(steps), "--eval_interval", str(steps), "--log_interval", "20"]
    vq_out, gpt_out, fp16_out = (str(tmp_path / n) for n in ("vq", "gpt", "fp16"))
    vq = train.train(train.parse_args(TINY + common + ["--out_dir", vq_out, "--dtype", "bfloat16"]))
    gpt = train.train(train.parse_args(
        ["--stage", "gpt", "--vqvae", os.path.join(vq_out, "ckpt.pt"), "--hidden_dim", "24", "--heads", "2",
         "--layers", "1", "--batch_size", "2", "--num_workers", "0", "--eval_batches", "1", "--device", "cpu",
         "--dtype", "bfloat16", "--out_dir", gpt_out] + common))
    for out, model in ((vq_out, vq), (gpt_out, gpt)):
        records = train_records(out)
        assert len(records) == steps // 20 and all(r["skipped"] == 0 for r in records), out
        assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in records), out
        assert records[-1]["loss"] < records[0]["loss"], out
        # Autocast casts activations, never the stored weights: every tensor is still float32.
        assert all(v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point()), out
    assert torch.isfinite(vq.codebook.embeddings).all() and vq.codebook.embeddings.dtype == torch.float32
    # float16 with a GradScaler: its first scale (65536) overflows this model's gradients; the scaler skips
    # those steps and lowers the scale, and none of that counts as divergence.
    fp16 = train.train(train.parse_args(TINY + common[:3] + ["100", "--log_interval", "20", "--out_dir", fp16_out,
                                                             "--dtype", "float16"]))
    records = train_records(fp16_out)
    assert sum(r["scaler_skipped"] for r in records) > 0 and all(r["skipped"] == 0 for r in records)
    assert records[-1]["loss_scale"] < 65536 and records[-1]["loss"] < records[0]["loss"]
    assert torch.isfinite(fp16.codebook.embeddings).all()
    scaler = torch.load(os.path.join(fp16_out, "ckpt.pt"), weights_only=True)["scaler"]
    assert scaler["scale"] == records[-1]["loss_scale"]                   # resumes with the scale it reached


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_mixed_precision_trains_both_stages_without_nan(tmp_path, digits_h5, dtype):
    import train
    common = ["--data", digits_h5, "--max_steps", "300", "--eval_interval", "300", "--log_interval", "20",
              "--dtype", dtype, "--device", "cuda"]
    vq_out, gpt_out = str(tmp_path / "vq"), str(tmp_path / "gpt")
    cuda_tiny = [a if a != "cpu" else "cuda" for a in TINY]
    train.train(train.parse_args(cuda_tiny + common + ["--out_dir", vq_out]))
    train.train(train.parse_args(
        ["--stage", "gpt", "--vqvae", os.path.join(vq_out, "ckpt.pt"), "--hidden_dim", "24", "--heads", "2",
         "--layers", "1", "--batch_size", "2", "--num_workers", "0", "--eval_batches", "1", "--out_dir", gpt_out]
        + common))
    for out in (vq_out, gpt_out):
        records = train_records(out)
        assert all(r["skipped"] == 0 and np.isfinite(r["loss"]) for r in records), out
        assert records[-1]["loss"] < records[0]["loss"], out


# -----------------------------------------------------------------------------
# 5. Several processes: a dead or stalled peer


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_stalled_rank_stops_the_job_with_a_clear_message(tmp_path, digits_h5, fault):
    """Two gloo processes started by hand (torchrun would kill the survivor itself); rank 1 is killed or frozen."""
    out, port = str(tmp_path / "ddp"), str(free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        procs.append(start_train(*TINY, "--data", digits_h5, "--out_dir", out, "--max_steps", "100000",
                                 "--eval_interval", "3", "--ddp_timeout", "3", env=env))
    try:
        wait_for_step(out, 5, procs[0])
        procs[1].send_signal(getattr(signal, fault))
        t = time.time()
        _, err = procs[0].communicate(timeout=60)
        waited = time.time() - t
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == 1 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("train.py: error: rank 0: lost contact with the other processes at step "), last
    assert "(one died, or stalled longer than --ddp_timeout=3s)" in last and "is the last good checkpoint" in last
    # A dead peer is noticed at once; a frozen one after the timeout.
    assert waited < 30 if fault == "SIGKILL" else 2.5 < waited < 30
    # The checkpoint named in the message is whole.
    assert saved_step(out) % 3 == 0 and f"(step {saved_step(out)})" in last


def test_every_error_of_a_timed_out_gloo_group_is_recognised_as_a_lost_peer():
    """The real errors of a gloo group whose peer never answers: the operation that times out, then the next one.

    Which of the two a stalled run meets depends on timing (DDP's buffer broadcast in the forward
    meets the second), so both must turn into the one-line "lost contact" message.
    """
    import datetime
    import threading
    import torch.distributed as dist
    from runtime import collective_failure
    store, groups = dist.HashStore(), [None, None]

    def join(rank):   # both ranks of a two-process group, here as two threads of this process
        groups[rank] = dist.ProcessGroupGloo(store, rank, 2, datetime.timedelta(seconds=1))
    threads = [threading.Thread(target=join, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    errors = []
    for _ in range(2):   # rank 1 never takes part
        with pytest.raises(RuntimeError) as info:
            groups[0].allreduce([torch.ones(2)]).wait()
        errors.append(info.value)
    assert "Timed out" in str(errors[0]) and "pair closure" in str(errors[1])
    assert all(collective_failure(e) for e in errors)
    assert not collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))


# -----------------------------------------------------------------------------
# 6. Bad input


def write_h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f.create_dataset(k, data=v)


def test_bad_input_is_one_line_naming_the_file(tmp_path, digits_h5):
    frames = np.zeros((8, 16, 16, 3), np.uint8)
    write_h5(tmp_path / "range.h5", train_data=frames, train_idx=np.array([0, 12]))
    write_h5(tmp_path / "shape.h5", train_data=np.zeros((8, 16, 16), np.uint8), train_idx=np.array([0]))
    (tmp_path / "not_a_dir").write_text("a file")
    good = ["--data", digits_h5, "--max_steps", "1"]
    out = ["--out_dir", str(tmp_path / "out")]
    cases = [
        (["--data", str(tmp_path / "range.h5"), *out], "range.h5: train_idx must be increasing start frames within [0, 8), got values in [0, 12]"),
        (["--data", str(tmp_path / "shape.h5"), *out], "shape.h5: train_data must be uint8 (N_frames, H, W, 3), got uint8 (8, 16, 16)"),
        ([*good, "--out_dir", str(tmp_path / "not_a_dir" / "run")], "not_a_dir/run: cannot write there (Not a directory)"),
    ]
    for extra, message in cases:
        assert message in train_error(*TINY, "--max_steps", "1", *extra)
    # sample.py: a truncated checkpoint, and an output folder that cannot exist.
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04" + bytes(50))
    r = run_script("sample.py", "--ckpt", tmp_path / "cut.pt", "--out", tmp_path / "s.gif")
    assert r.returncode == 1 and r.stderr.strip() == (f"sample.py: error: {tmp_path / 'cut.pt'}: not a readable "
                                                      f"PyTorch checkpoint (truncated or corrupt?): RuntimeError")
    r = run_script("sample.py", "--ckpt", tmp_path / "cut.pt", "--out", tmp_path / "not_a_dir" / "s.gif")
    assert r.returncode == 1 and r.stderr.strip() == f"sample.py: error: {tmp_path / 'not_a_dir'}: cannot write there (a file, not a folder)"


def write_odd_video(path, frames, pix_fmt):
    """A lossless AVI (FFV1) in any pixel format, any frame size."""
    import av
    T, H, W, _ = frames.shape
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = W, H, pix_fmt
        for frame in frames:
            image = av.VideoFrame.from_ndarray(frame[..., 0] if pix_fmt == "gray" else frame,
                                               format="gray" if pix_fmt == "gray" else "rgb24")
            for packet in stream.encode(image.reformat(format=pix_fmt)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_grayscale_and_odd_sized_videos_are_converted(tmp_path):
    from data import VideoFolderDataset, preprocess
    os.makedirs(tmp_path / "train" / "a")
    video = gradient_video(6, 21, 35)                                   # odd height and width
    gray = np.repeat(video[..., :1], 3, axis=-1)
    write_odd_video(tmp_path / "train" / "a" / "gray.avi", gray, "gray")
    write_odd_video(tmp_path / "train" / "a" / "odd.avi", video, "bgr0")
    ds = VideoFolderDataset(tmp_path, sequence_length=6, resolution=16)
    assert ds.n_skipped == 0 and len(ds) == 2
    for i, expected in ((0, gray), (1, video)):
        clip = ds[(i, 0)]["video"]
        assert clip.shape == (3, 6, 16, 16)
        # Lossless codec: exactly the preprocessed frames (grayscale comes back as three equal channels).
        torch.testing.assert_close(clip, preprocess(expected, 16), atol=1 / 255, rtol=0)


def mutations(data, rng):
    """Random bytes, truncations and bit flips of a valid file's bytes."""
    out = [b"", bytes([7]), rng.bytes(3000), rng.bytes(len(data))]
    out += [data[: int(len(data) * f)] for f in (0.01, 0.1, 0.5, 0.9, 0.99)]
    for _ in range(6):
        b = bytearray(data)
        for i in rng.integers(len(b), size=8):
            b[i] ^= 1 << int(rng.integers(8))
        out.append(bytes(b))
    return out


def test_fuzzed_hdf5_video_and_checkpoint_files_give_only_clear_errors(tmp_path):
    """Whatever the bytes: success, or a ValueError/FileNotFoundError naming the file, never another exception."""
    from data import HDF5Dataset, VideoFolderDataset, moving_digits, write_hdf5
    from gpt import load_gpt
    from vqvae import VQVAE, VQVAEConfig, load_vqvae
    rng = np.random.default_rng(0)
    videos = list(moving_digits(3, frames=6, resolution=16, seed=0))
    write_hdf5(tmp_path / "ok.h5", {"train": (videos, [0, 1, 0]), "test": (videos[:1], [0])})
    write_video(tmp_path / "ok.mp4", gradient_video(8, 16, 16))
    config = VQVAEConfig(embedding_dim=8, n_codes=16, n_hiddens=16, n_res_layers=1, downsample=(2, 4, 4),
                         sequence_length=4, resolution=16)
    torch.save(dict(stage="vqvae", config=config.to_dict(), model=VQVAE(config).state_dict()), tmp_path / "ok.pt")

    def expect_clear(fn, name):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn()
        except (ValueError, FileNotFoundError) as e:
            assert name in str(e) and "\n" not in str(e), str(e)

    for k, blob in enumerate(mutations((tmp_path / "ok.h5").read_bytes(), rng)):
        path = tmp_path / f"h5_{k}.h5"
        path.write_bytes(blob)
        expect_clear(lambda: [ds[(i, 0)] for ds in [HDF5Dataset(path, 4, resolution=16)] for i in range(len(ds))],
                     path.name)
    for k, blob in enumerate(mutations((tmp_path / "ok.mp4").read_bytes(), rng)):
        # The damaged video sits among good ones: it is read, or skipped with a warning and counted.
        root = tmp_path / f"videos_{k}"
        os.makedirs(root / "train" / "a")
        for name in ("good1.mp4", "good2.mp4"):
            (root / "train" / "a" / name).write_bytes((tmp_path / "ok.mp4").read_bytes())
        (root / "train" / "a" / "bad.mp4").write_bytes(blob)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = VideoFolderDataset(root, 4, resolution=16)
            items = [ds[(i, 0)] for i in range(len(ds))]
        skipped = [w for w in caught if "bad.mp4: cannot be decoded, skipped" in str(w.message)]
        assert len(items) == len(ds) == 3 - ds.n_skipped and len(skipped) <= ds.n_skipped <= 1
        assert all(it["video"].shape == (3, 4, 16, 16) for it in items)
    for k, blob in enumerate(mutations((tmp_path / "ok.pt").read_bytes(), rng)):
        path = tmp_path / f"ckpt_{k}.pt"
        path.write_bytes(blob)
        expect_clear(lambda: load_vqvae(path), path.name)
        expect_clear(lambda: load_gpt(path), path.name)


# -----------------------------------------------------------------------------
# 7. Safe loading


def calls(tree, owner, name):
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == name and isinstance(n.func.value, ast.Name) and n.func.value.id == owner]


def test_every_load_in_the_project_is_weights_only_and_no_raw_unpickling():
    for name in PYTHON_FILES:
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        for call in calls(tree, "torch", "load"):
            kw = {k.arg: k.value for k in call.keywords}
            assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                f"{name}:{call.lineno}: torch.load without weights_only=True"
        for fn in ("load", "loads"):
            assert not calls(tree, "pickle", fn), f"{name}: pickle.{fn} unpickles anything"
        for call in calls(tree, "np", "load"):
            assert not any(k.arg == "allow_pickle" for k in call.keywords), f"{name}:{call.lineno}: np.load(allow_pickle)"


def test_planted_pickles_are_refused_everywhere_a_file_is_loaded(tmp_path, digits_h5):
    target = tmp_path / "owned.txt"
    evil = dict(stage="vqvae", config={}, model={"w": Exploit(target)})
    # A checkpoint to resume from, in --out_dir; a prior's --vqvae.
    os.makedirs(tmp_path / "run")
    torch.save(evil, tmp_path / "run" / "ckpt.pt")
    message = train_error(*TINY, "--data", digits_h5, "--out_dir", str(tmp_path / "run"), "--max_steps", "1")
    assert "ckpt.pt: refused to load: it names posix.system" in message
    torch.save(evil, tmp_path / "evil.pt")
    message = train_error("--stage", "gpt", "--vqvae", str(tmp_path / "evil.pt"), "--data", digits_h5,
                          "--out_dir", str(tmp_path / "gpt"), "--device", "cpu")
    assert "evil.pt: refused to load: it names posix.system" in message
    # sample.py's --ckpt, fvd.py's --ckpt and --i3d, as commands.
    for script, args in (("sample.py", ["--ckpt", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "s.gif")]),
                         ("fvd.py", ["--ckpt", str(tmp_path / "evil.pt"), "--data", digits_h5, "--i3d",
                                     str(tmp_path / "evil.pt")])):
        r = run_script(script, *args)
        assert r.returncode == 1 and "evil.pt: " in r.stderr and "Traceback" not in r.stderr, (script, r.stderr)
    # The prior stage's code cache in --out_dir.
    import train
    train.train(train.parse_args(TINY + ["--data", digits_h5, "--out_dir", str(tmp_path / "vq"), "--max_steps", "1"]))
    os.makedirs(tmp_path / "cached")
    torch.save({"train": Exploit(target)}, tmp_path / "cached" / "codes.pt")
    message = train_error("--stage", "gpt", "--vqvae", str(tmp_path / "vq" / "ckpt.pt"), "--data", digits_h5,
                          "--cache_codes", "--out_dir", str(tmp_path / "cached"), "--max_steps", "1", "--device", "cpu",
                          "--num_workers", "0")
    assert "codes.pt: not a readable codes cache (UnpicklingError); delete it" in message
    assert not target.exists()


# -----------------------------------------------------------------------------
# 8. Long jobs: Ctrl-C while sampling


def test_ctrl_c_while_sampling_exits_cleanly_and_writes_nothing(tmp_path):
    from gpt import GPTConfig, VideoGPT
    from vqvae import VQVAE, VQVAEConfig
    vc = VQVAEConfig(embedding_dim=8, n_codes=16, n_hiddens=16, n_res_layers=1, downsample=(1, 2, 2),
                     sequence_length=4, resolution=32)                   # 4 x 16 x 16 codes per video
    vq = VQVAE(vc)
    gc = GPTConfig(latent_shape=vc.latent_shape, n_codes=16, embedding_dim=8, hidden_dim=24, heads=2, layers=1,
                   resolution=32)
    gpt = VideoGPT(gc)
    gpt.set_codebook(vq.codebook.embeddings)
    torch.save(dict(stage="gpt", config=gc.to_dict(), model=gpt.state_dict(),
                    vqvae=dict(config=vc.to_dict(), model=vq.state_dict())), tmp_path / "prior.pt")
    out = tmp_path / "samples" / "grid.mp4"
    p = start_script("sample.py", "--ckpt", tmp_path / "prior.pt", "--n", "64", "--batch_size", "8", "--out", out,
                     "--device", "cpu")
    assert p.stdout.readline().startswith("sampled 8/64")                # a progress line: it is under way
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.strip().splitlines()[-1] == "sample.py: interrupted"
    assert "Traceback" not in err and os.listdir(tmp_path / "samples") == []
