"""Divergence, mixed precision, and a peer process that dies or stalls.

python -m pytest tests/test_faults.py
"""

import os
import signal
import socket
import time

import numpy as np
import pytest
import torch

from conftest import TINY, saved_step, start_train, train_error, train_records, wait_for_step

# -----------------------------------------------------------------------------
# Divergence


def test_divergence_skips_steps_then_stops_keeping_the_last_good_checkpoint(tmp_path, digits_h5):
    import train
    from runtime import RunError
    out = str(tmp_path / "run")
    train.train(train.parse_args(TINY + ["--data", digits_h5, "--out_dir", out, "--max_steps",
                                         "2"]))
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    # Resumed with an absurd learning rate: step 3 is finite but wrecks the weights (its test loss
    # is NaN, so it is not saved), steps 4, 5, 6 are non-finite and skipped, and the third one stops
    # the run.
    with pytest.raises(RunError,
                       match=r"stopped at step 6 after 3 consecutive steps with a non-finite loss "
                             r"or gradient; .*ckpt.pt \(step 2\) is the last good checkpoint"):
        train.train(train.parse_args(TINY + ["--data", digits_h5, "--out_dir", out, "--max_steps",
                                             "50",
                                             "--eval_interval", "1", "--lr", "1e30",
                                             "--max_bad_steps", "3"]))
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before
    records = train_records(out)
    assert [(r["step"], r["skipped"]) for r in records[2:]] == [(3, 0), (4, 1), (5, 1), (6, 1)]
    assert "loss" not in records[-1]  # nothing non-finite was averaged in
    # Through the command's error handling: one line, exit status 1.
    message = train_error(*TINY, "--data", digits_h5, "--out_dir", out, "--max_steps", "50",
                          "--lr", "1e30", "--max_bad_steps", "2")
    assert message.startswith(f"train.py: error: {out}: stopped at step 5 after 2 ")


# -----------------------------------------------------------------------------
# Mixed precision


def test_bfloat16_trains_both_stages_without_nan_and_float16_lets_the_scaler_skip(tmp_path,
                                                                                  digits_h5):
    import train
    steps = 100
    common = ["--data", digits_h5, "--max_steps", str(steps), "--eval_interval", str(steps),
              "--log_interval", "10"]
    vq_out, gpt_out, fp16_out = (str(tmp_path / n) for n in ("vq", "gpt", "fp16"))
    vq = train.train(train.parse_args(TINY + common + ["--out_dir", vq_out, "--dtype", "bfloat16"]))
    gpt = train.train(train.parse_args(
        ["--stage", "gpt", "--vqvae", os.path.join(vq_out, "ckpt.pt"), "--hidden_dim", "24",
         "--heads", "2",
         "--layers", "1", "--batch_size", "2", "--num_workers", "0", "--eval_batches", "1",
         "--device", "cpu", "--dtype", "bfloat16", "--out_dir", gpt_out] + common))
    for out, model in ((vq_out, vq), (gpt_out, gpt)):
        records = train_records(out)
        assert len(records) == steps // 10 and all(r["skipped"] == 0 for r in records), out
        assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in records), out
        assert records[-1]["loss"] < records[0]["loss"], out
        # Autocast casts activations, never the stored weights: every tensor is still float32.
        floats = [v for v in model.state_dict().values() if v.is_floating_point()]
        assert all(v.dtype == torch.float32 for v in floats), out
    assert (torch.isfinite(vq.codebook.embeddings).all()
            and vq.codebook.embeddings.dtype == torch.float32)
    # float16 with a GradScaler: its first scale (65536) overflows this model's gradients; the
    # scaler skips those steps and lowers the scale, and none of that counts as divergence.
    fp16 = train.train(train.parse_args(TINY + common[:3] + ["60", "--log_interval", "10",
                                                             "--out_dir", fp16_out,
                                                             "--dtype", "float16"]))
    records = train_records(fp16_out)
    assert sum(r["scaler_skipped"] for r in records) > 0 and all(r["skipped"] == 0 for r in records)
    assert records[-1]["loss_scale"] < 65536 and records[-1]["loss"] < records[0]["loss"]
    assert torch.isfinite(fp16.codebook.embeddings).all()
    scaler = torch.load(os.path.join(fp16_out, "ckpt.pt"), weights_only=True)["scaler"]
    assert scaler["scale"] == records[-1]["loss_scale"]  # resumes with the scale it reached


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_mixed_precision_trains_both_stages_without_nan(tmp_path, digits_h5, dtype):
    import train
    common = ["--data", digits_h5, "--max_steps", "300", "--eval_interval", "300",
              "--log_interval", "20", "--dtype", dtype, "--device", "cuda"]
    vq_out, gpt_out = str(tmp_path / "vq"), str(tmp_path / "gpt")
    cuda_tiny = [a if a != "cpu" else "cuda" for a in TINY]
    train.train(train.parse_args(cuda_tiny + common + ["--out_dir", vq_out]))
    train.train(train.parse_args(
        ["--stage", "gpt", "--vqvae", os.path.join(vq_out, "ckpt.pt"), "--hidden_dim", "24",
         "--heads", "2",
         "--layers", "1", "--batch_size", "2", "--num_workers", "0", "--eval_batches", "1",
         "--out_dir", gpt_out]
        + common))
    for out in (vq_out, gpt_out):
        records = train_records(out)
        assert all(r["skipped"] == 0 and np.isfinite(r["loss"]) for r in records), out
        assert records[-1]["loss"] < records[0]["loss"], out


# -----------------------------------------------------------------------------
# Several processes: a dead or stalled peer


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_stalled_rank_stops_the_job_with_a_clear_message(tmp_path, digits_h5, fault):
    """Two gloo processes started by hand (torchrun would kill the survivor itself); rank 1 is
    killed or frozen."""
    out, port = str(tmp_path / "ddp"), str(free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(start_train(*TINY, "--data", digits_h5, "--out_dir", out, "--max_steps",
                                 "100000", "--eval_interval", "3", "--ddp_timeout", "3", env=env))
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
    assert last.startswith("train.py: error: rank 0: lost contact with the other processes at "
                           "step "), last
    assert ("(one died, or stalled longer than --ddp_timeout=3s)" in last
            and "is the last good checkpoint" in last)
    # A dead peer is noticed at once; a frozen one after the timeout.
    assert waited < 30 if fault == "SIGKILL" else 2.5 < waited < 30
    # The checkpoint named in the message is whole.
    assert saved_step(out) % 3 == 0 and f"(step {saved_step(out)})" in last


def test_every_error_of_a_timed_out_gloo_group_is_recognised_as_a_lost_peer():
    """The real errors of a gloo group whose peer never answers: the operation that times out, then
    the next one.

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
    assert not collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and "
                                               "4x5)"))
