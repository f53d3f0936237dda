"""Throughput and memory benchmarks, printed as one JSON object per line.

Speed is measured here and only here: the tests check behaviour, never timings.

    python bench.py                               # tiny sizes, CPU
    python bench.py --device cuda                 # the paper's BAIR sizes, bf16
    python bench.py --only sample --codes 1024    # one benchmark, another latent size
    python bench.py --only sample --no-compile_sample   # the eager sampler only

Benchmarks:
  vqvae_train   VQ-VAE training steps: clips/s; the optimizer's own step, Adam's and
                train.py's --optimizer muon (Muon over the hidden matrices, Adam the rest);
                the peak memory of one micro-batch per size up to the batch (--grad_accum)
  gpt_train     prior training steps: tokens/s, and MFU on CUDA; the optimizer's step and the
                micro-batches' peak memory, as above
  sample        prior sampling: seconds for one whole batch through fast.generate, eager and
                compiled (and the compiling first call), the lesson's gpt.sample once,
                its VQ-VAE decode, tokens/s of
                the cached and of the naive full-recompute sampler and their ratio, and a
                video twice the trained length (sliding window)
  sparse        the strided sparse prior at 4096 codes: forward (and, on CUDA, training step)
                with the dense mask and with FlexAttention's block mask, and the ratio
  attention     one causal self-attention, forward + backward, at the prior's head width:
                SDPA's fused kernel against the formula written out, per sequence length
                (tokens per batch fixed) in bfloat16 and float32; fast.fast_attention takes the
                written-out formula on a CPU in bfloat16 up to EXPLICIT_MAX_KEYS keys
  play          (only with --only play) the play loop (world.World) on --ckpt (default:
                weights/vizdoom.pt; random weights at the ViZDoom recipe's sizes without it):
                frames/s of a rollout per window stride, eager and compiled; the latent step
                split into prefill, codes and decode, per decoder context; the page's
                key-to-frame latency and its first frame, paced at --fps
  page          (only with --only page) the page of play.py on --ckpt in headless Chromium on
                the same machine (pip install playwright; apt-get install chromium): its first
                frame, when the compiled step plays, then --page_seconds of held keys: frames/s,
                late frames (1.5 periods or more after the one before: 50 ms at --fps 30),
                frames counted each second, key-to-screen latency
  dashboards    (only with --only dashboards) train.py --tensorboard / --wandb: the
                milliseconds of one log call (a prior's log record) and of one picture (a
                16-frame samples GIF), per dashboard whose package is installed (W&B offline);
                run on the host, whatever --device

Times are medians over timed steps after warm-up (CUDA synchronised), so one
slow step does not move them. Peak memory is CUDA's max allocated, or the
process's peak resident set on CPU (reset before each micro-batch size on Linux,
so those include the model, its gradients and the optimizer's state). The naive
sampler costs the same at every position (a full forward of the grid), so it is
timed over `--naive_steps` positions and reported per token.
"""

import argparse
import contextlib
import json
import math
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

from fast import (explicit_attention, fast_attention, flex_available, generate, sample_long,
                  use_channels_last, use_fast_attention)
from gpt import GPTConfig, VideoGPT
from muon import make_optimizer
from runtime import autocast as autocast_for
from vqvae import VQVAE, VQVAEConfig
from world import (DECODE_CONTEXT, PROGRAMS, Player, World, load_world, package_file,
                   start_world)

# Dense bf16 peak FLOP/s by GPU name, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
              "4090": 165e12}

SIZES = {
    # CPU: the sizes the original VideoGPT was timed at on a 2-core CPU (docs/measurements.md):
    # VQ-VAE batch 4 of 16x64x64; prior training batch 2 of 8x16x16 = 2048 codes with dropout;
    # sampling 4 clips of 4x16x16 = 1024 codes, decoded by a VQ-VAE of the same widths into 8x64x64
    # clips.
    "cpu": dict(vqvae=dict(embedding_dim=64, n_codes=512, n_hiddens=64, n_res_layers=2,
                           downsample=(2, 4, 4),
                           sequence_length=16, resolution=64), vq_batch=4,
                gpt=dict(latent_shape=(8, 16, 16), n_codes=512, embedding_dim=64, hidden_dim=120,
                         heads=4, layers=4,
                         dropout=0.1, attn_dropout=0.1), gpt_batch=2,
                sample_latent=(4, 16, 16), sample_batch=4, sparse_latent=(4, 32, 32),
                attention_lengths=(256, 512, 1024, 2048), attention_tokens=4096),
    # A smoke test of the benchmarks themselves (tests/test_bench.py): seconds, not a measurement.
    "tiny": dict(vqvae=dict(embedding_dim=16, n_codes=64, n_hiddens=16, n_res_layers=1,
                            downsample=(2, 4, 4),
                            sequence_length=4, resolution=16), vq_batch=2,
                 gpt=dict(latent_shape=(2, 4, 4), n_codes=64, embedding_dim=16, hidden_dim=24,
                          heads=2, layers=1,
                          dropout=0.1, attn_dropout=0.1), gpt_batch=2,
                 sample_latent=(4, 4, 4), sample_batch=2, sparse_latent=(2, 8, 8),
                 attention_lengths=(16,), attention_tokens=32),
    # CUDA: BAIR as in the paper: 16x64x64 clips, VQ-VAE stride 4x2x2, latent 4x32x32 = 4096 codes.
    "cuda": dict(vqvae=dict(embedding_dim=256, n_codes=1024, n_hiddens=240, n_res_layers=4,
                            downsample=(4, 2, 2),
                            sequence_length=16, resolution=64), vq_batch=32,
                 gpt=dict(latent_shape=(4, 32, 32), n_codes=1024, embedding_dim=256,
                          hidden_dim=576, heads=4, layers=8,
                          dropout=0.2, attn_dropout=0.3), gpt_batch=32,
                 sample_latent=(4, 32, 32), sample_batch=32, sparse_latent=(4, 32, 32),
                 attention_lengths=(1024, 4096), attention_tokens=32768),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(device):
    """CUDA's peak allocated memory, or the process's peak resident set (since the last reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/self/status") as f:   # Linux: VmHWM, in kB, which a reset lowers
            return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # kilobytes on Linux


def reset_peak_memory(device):
    """Start a new peak: CUDA's counter, or (Linux) the process's resident-set high-water mark."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def micro_batch_memory(step_with, batch, device):
    """{micro-batch size: peak MB of one forward and backward at that size}, for the sizes up to
    `batch`: what train.py --grad_accum needs per micro-batch, to choose N."""
    sizes = sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b < batch} | {batch})
    peaks = {}
    for b in sizes:
        sync(device)
        reset_peak_memory(device)
        step_with(b)
        sync(device)
        peaks[str(b)] = peak_memory_mb(device)
    return peaks


def timed(fn, device, warmup, steps):
    """Median seconds of fn() over `steps` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def emit(**record):
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}),
          flush=True)


def optimizer_steps_ms(model, device, args):
    """The optimizer's share of a training step, on random gradients of the model's shapes: Adam
    over every weight, and --optimizer muon (Muon over muon.hidden_matrices, Adam over the rest), as
    train.py builds them."""
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return {f"{kind}_step_ms": 1000 * timed(make_optimizer(model, kind, lr=1e-4).step, device,
                                            args.warmup, args.steps)
            for kind in ("adam", "muon")}


def bench_vqvae(size, args, device, autocast):
    # as train.py runs it
    model = use_fast_attention(VQVAE(VQVAEConfig(**size["vqvae"])).to(device))
    use_channels_last(model, device, args.dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    c, B = model.config, size["vq_batch"]
    x = torch.rand(B, 3, c.sequence_length, c.resolution, c.resolution, device=device) - 0.5

    def step():
        with autocast:
            loss = model(x)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def forward_backward(b):
        with autocast:
            loss = model(x[:b])["loss"]
        loss.backward()
        opt.zero_grad(set_to_none=True)
    t = timed(step, device, args.warmup, args.steps)
    peak = peak_memory_mb(device)
    per_micro_batch = micro_batch_memory(forward_backward, B, device)
    emit(bench="vqvae_train", device=str(device), dtype=args.dtype,
         threads=torch.get_num_threads(), batch=B,
         clip=[c.sequence_length, c.resolution], n_hiddens=c.n_hiddens, n_res_layers=c.n_res_layers,
         downsample=list(c.downsample), n_codes=c.n_codes, embedding_dim=c.embedding_dim,
         step_ms=1000 * t, clips_per_s=B / t, peak_mem_mb=peak,
         micro_batch_peak_mem_mb=per_micro_batch, **optimizer_steps_ms(model, device, args))


def bench_gpt_train(size, args, device, autocast):
    config = GPTConfig(**size["gpt"])
    model = use_fast_attention(VideoGPT(config).to(device))   # as train.py runs it
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    B, L = size["gpt_batch"], config.seq_len
    codes = torch.randint(config.n_codes, (B, *config.latent_shape), device=device)
    fwd = torch.compile(model) if args.compile else model

    def step():
        with autocast:
            logits = fwd(codes)
        logits = logits.flatten(0, -2).float()                            # (B*L, n_codes)
        F.cross_entropy(logits, codes.flatten()).backward()               # against (B*L,)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def forward_backward(b):
        with autocast:
            logits = fwd(codes[:b])
        logits = logits.flatten(0, -2).float()                            # (b*L, n_codes)
        F.cross_entropy(logits, codes[:b].flatten()).backward()           # against (b*L,)
        opt.zero_grad(set_to_none=True)
    t = timed(step, device, args.warmup, args.steps)
    peak = peak_memory_mb(device)
    per_micro_batch = micro_batch_memory(forward_backward, B, device)
    tokens_per_s = B * L / t
    optimizer_ms = optimizer_steps_ms(model, device, args)
    # Training FLOPs per token: 6 per weight, plus the attention scores and sums (PaLM's estimate).
    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = 6 * n_params + 12 * config.layers * config.hidden_dim * L
    record = dict(bench="gpt_train", device=str(device), dtype=args.dtype,
                  threads=torch.get_num_threads(), batch=B,
                  codes=L, latent=list(config.latent_shape), hidden=config.hidden_dim,
                  layers=config.layers,
                  heads=config.heads, dropout=config.dropout, attn_dropout=config.attn_dropout,
                  attn_type=config.attn_type, compiled=args.compile, params_m=n_params / 1e6,
                  step_ms=1000 * t, **optimizer_ms, tokens_per_s=tokens_per_s,
                  peak_mem_mb=peak, micro_batch_peak_mem_mb=per_micro_batch)
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        record.update(gpu=name, mfu=flops_per_token * tokens_per_s / peak if peak else None)
    emit(**record)


@torch.no_grad()
def bench_sample(size, args, device, autocast):
    latent = latent_for(args.codes) if args.codes else size["sample_latent"]
    d = size["vqvae"]["downsample"]
    config = GPTConfig(**{**size["gpt"], "latent_shape": latent, "dropout": 0.0,
                          "attn_dropout": 0.0,
                          "sequence_length": latent[0] * d[0]})
    model = use_fast_attention(VideoGPT(config).to(device).eval())
    model.fc_out.weight.normal_(std=0.02)   # zero at init would make every code equally likely
    # The VQ-VAE that decodes the samples: the benchmark's widths, a clip that gives this latent.
    vq_config = VQVAEConfig(**{**size["vqvae"], "sequence_length": latent[0] * d[0],
                               "resolution": latent[1] * d[1], "n_codes": config.n_codes,
                               "embedding_dim": config.embedding_dim})
    vq = VQVAE(vq_config).to(device).eval()
    B, L = size["sample_batch"], config.seq_len
    g = torch.Generator(device).manual_seed(0)
    record = dict(bench="sample", device=str(device), dtype=args.dtype,
                  threads=torch.get_num_threads(), batch=B,
                  codes=L, latent=list(config.latent_shape), hidden=config.hidden_dim,
                  layers=config.layers,
                  heads=config.heads, n_codes=config.n_codes)
    with autocast:
        # Cached, as users call it: whole batches, so the time includes prefill, every step and the
        # cache set-up.
        t_eager = timed(lambda: generate(model, B, generator=g), device, 1, args.sample_repeats)
        samples = generate(model, B, generator=g)
        # The lesson's sampler (gpt.VideoGPT.sample), which the fast one draws the same codes as.
        t_lesson = timed(lambda: model.sample(B, generator=g), device, 0, 1)
        t_decode = timed(lambda: vq.decode(samples), device, 1, args.sample_repeats)
        record.update(eager_s=t_eager, lesson_s=t_lesson, decode_s=t_decode,
                      eager_with_decode_s=t_eager + t_decode)
        if args.compile_sample:
            # The first call compiles (once per process; the rest reuse it).
            t = time.perf_counter()
            generate(model, B, generator=g, compile=True)
            sync(device)
            compile_s = time.perf_counter() - t
            t_compiled = timed(lambda: generate(model, B, generator=g, compile=True), device, 1,
                               args.sample_repeats)
            record.update(compiled_s=t_compiled, compiled_with_decode_s=t_compiled + t_decode,
                          first_compiled_call_s=compile_s)
        # Twice the trained length with the sliding window (half a window of context, half new per
        # window).
        frames_long = 2 * config.sequence_length
        t_long = timed(lambda: sample_long(model, B, frames_long, generator=g,
                                           compile=args.compile_sample),
                       device, 0, 1)
    # Naive: a full forward per position, the same cost at every position; time a few.
    codes = torch.randint(config.n_codes, (B, *config.latent_shape), device=device)

    def naive_step():
        with autocast:
            model(codes)
    t_naive = timed(naive_step, device, 1, args.naive_steps)
    best = record.get("compiled_s", t_eager)
    record.update(cached_tokens_per_s=B * L / best, naive_tokens_per_s=B / t_naive,
                  naive_s_per_batch_est=L * t_naive,
                  speedup=(B * L / best) / (B / t_naive),
                  codes_per_frame=L // config.sequence_length,
                  long_frames=frames_long, long_s=t_long, long_s_per_frame=t_long / frames_long,
                  peak_mem_mb=peak_memory_mb(device))
    emit(**record)


def bench_sparse(size, args, device, autocast):
    """The strided sparse prior at 4096 codes (latent 4x32x32): the dense mask against
    FlexAttention's tiles."""
    config = GPTConfig(**{**size["gpt"], "latent_shape": size["sparse_latent"],
                          "attn_type": "sparse", "dropout": 0.0,
                          "attn_dropout": 0.0})
    model = VideoGPT(config).to(device)
    B = size["gpt_batch"]
    codes = torch.randint(config.n_codes, (B, *config.latent_shape), device=device)
    record = dict(bench="sparse", device=str(device), dtype=args.dtype,
                  threads=torch.get_num_threads(), batch=B,
                  codes=config.seq_len, hidden=config.hidden_dim, layers=config.layers,
                  heads=config.heads,
                  density=model.mask.float().mean().item())
    if not flex_available():
        emit(**record, flex=None)
        return
    times = {}
    for flex in (False, True):
        # Dense: SDPA with the (L, L) mask; flex: fast.py's kernel for the sparse pattern.
        use_fast_attention(model)
        if not flex:
            for block in model.blocks:
                block.attn.attend = fast_attention
        model.eval()

        def forward():
            with torch.no_grad(), autocast:
                model(codes)
        t = time.perf_counter()
        forward()                                   # FlexAttention compiles on its first call
        sync(device)
        times[flex] = timed(forward, device, 1, args.steps)
        record[f"{'flex' if flex else 'dense'}_forward_ms"] = 1000 * times[flex]
        if flex:
            record["flex_first_call_s"] = time.perf_counter() - t
        # FlexAttention's CPU kernels have no backward: training only on GPUs
        if device.type == "cuda":
            model.train()

            def train_step():
                with autocast:
                    logits = model(codes)
                logits = logits.flatten(0, -2).float()                    # (B*L, n_codes)
                F.cross_entropy(logits, codes.flatten()).backward()       # against (B*L,)
            record[f"{'flex' if flex else 'dense'}_train_step_ms"] = 1000 * timed(train_step,
                                                                                  device, 1,
                                                                                  args.steps)
    record.update(forward_speedup=times[False] / times[True], peak_mem_mb=peak_memory_mb(device))
    emit(**record)


def bench_attention(size, args, device, autocast):
    """SDPA's fused kernel against the formula written out, forward + backward of one causal
    self-attention."""
    heads = size["gpt"]["heads"]
    head_dim = size["gpt"]["hidden_dim"] // heads
    for dtype in (torch.bfloat16, torch.float32):
        for L in size["attention_lengths"]:
            B = max(1, size["attention_tokens"] // L)
            q, k, v = (torch.randn(B, heads, L, head_dim, device=device, dtype=dtype,
                                   requires_grad=True)
                       for _ in range(3))
            causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
            sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
            fused = lambda: sdpa().float().sum().backward()
            written_out = lambda: explicit_attention(q, k, v, causal).float().sum().backward()
            t_fused = timed(fused, device, args.warmup, args.steps)
            t_written = timed(written_out, device, args.warmup, args.steps)
            emit(bench="attention", device=str(device), dtype=str(dtype).removeprefix("torch."),
                 threads=torch.get_num_threads(), batch=B, heads=heads, head_dim=head_dim, keys=L,
                 fused_ms=1000 * t_fused, written_out_ms=1000 * t_written,
                 written_out_speedup=t_fused / t_written,
                 peak_mem_mb=peak_memory_mb(device))


def bench_dashboards(size, args, device, autocast):
    """One log record and one GIF into each dashboard installed, as Run.log and Run.pictures send
    them."""
    import tempfile
    from types import SimpleNamespace

    from PIL import Image

    from run import Dashboards
    record = dict(step=0, split="train", lr=3e-4, clips_per_s=24.5, loss=2.3, bits_per_code=3.3,
                  grad_norm=0.7,
                  skipped=0)
    with tempfile.TemporaryDirectory() as out:
        gif = os.path.join(out, "samples.gif")
        # 2 rows of 4 clips, 128 px frames.
        noise = [np.random.default_rng(t).integers(0, 255, (258, 518, 3), dtype=np.uint8)
                 for t in range(16)]
        frames = [Image.fromarray(f) for f in noise]
        frames[0].save(gif, save_all=True, append_images=frames[1:], duration=125, loop=0)
        os.environ.setdefault("WANDB_MODE", "offline")
        for board in ("tensorboard", "wandb"):
            args_board = SimpleNamespace(out_dir=out, tensorboard=board == "tensorboard",
                                         wandb="bench" if board == "wandb" else None,
                                         wandb_run=None)
            try:
                boards = Dashboards(args_board, 0, 0, {})
            except ValueError as e:
                emit(bench="dashboards", board=board, skipped=str(e))
                continue
            step = iter(range(1, 10**6))
            log = lambda: boards.log(dict(record, step=next(step)))
            picture = lambda: boards.picture("test/samples", gif, next(step))
            emit(bench="dashboards", board=board,
                 log_ms=1000 * timed(log, torch.device("cpu"), args.warmup, args.steps),
                 picture_ms=1000 * timed(picture, torch.device("cpu"), args.warmup, args.steps),
                 gif_kb=os.path.getsize(gif) / 1024)
            boards.close()


def play_world(args):
    """The World bench_play times: the checkpoint's prior, or random weights at the recipe's
    sizes; its frames' precision chosen as play.py's --decode auto chooses it."""
    if args.ckpt and os.path.isfile(args.ckpt):
        world, names, start = load_world(args.ckpt, decode_dtype="auto")
        return world, names, start, os.path.basename(args.ckpt)
    gpt = VideoGPT(GPTConfig(latent_shape=(8, 8, 8), n_codes=512, embedding_dim=64, hidden_dim=120,
                             heads=4, layers=4,
                             dropout=0.0, attn_dropout=0.0, rope=True, action_dim=3,
                             action_norms=True,
                             sequence_length=16))
    gpt.fc_out.weight.data.normal_(std=0.02)
    vq = VQVAE(VQVAEConfig(embedding_dim=64, n_codes=512, n_hiddens=64, n_res_layers=0,
                           decoder_res_layers=1,
                           local_encoder=True, downsample=(2, 8, 8), sequence_length=16,
                           resolution=64))
    gpt, vq = use_fast_attention(gpt.eval()), use_fast_attention(vq.eval())
    names = ["TURN_LEFT", "TURN_RIGHT", "MOVE_FORWARD"]
    return World(gpt, vq, action_names=names, decode_dtype="auto"), names, {}, "random weights"


def page_timing(world, names, start, args, load_s):
    """The page's loop: a tab watching, a key event every 0.3-0.37 s from another thread (as the web
    server's would be); the latency from each to the first frame drawn with it, the frames handed
    out per second, and the first frame's time from loading the checkpoint."""
    t0 = time.perf_counter()
    player = Player(world, names, lambda: start, args.fps)
    player.join()
    found = {}

    def press_keys():
        first = player.next_frame(0, timeout=60)
        found["first_frame_s"] = time.perf_counter() - t0 + load_s
        latencies, seen = [], first[0] if first else 0
        while seen < world.t * world.per_step:   # keys from the end of the start frames on
            seen = (player.next_frame(seen, timeout=5) or (seen + 1,))[0]
        phases = random.Random(0)
        for i in range(args.play_keys):
            # 0.3 s is 9 frames at 30 frames/s: a key every 0.3 s would land at one point of the
            # step each time; up to two frames more sample every point
            time.sleep(0.3 + phases.uniform(0, 2 / args.fps))
            pressed = time.perf_counter()
            player.keys([names[i % len(names)]] if names else [], i + 1)
            while (got := player.next_frame(seen, timeout=5)) is not None:
                seen = got[0]
                if got[1]["key_id"] >= i + 1:
                    latencies.append(1e3 * (time.perf_counter() - pressed))
                    break
        t, n0 = time.perf_counter(), player.seq
        time.sleep(args.play_pace_s)
        found.update(latencies=latencies, page_fps=(player.seq - n0) / (time.perf_counter() - t))
        player.stop()
    threading.Thread(target=press_keys, daemon=True).start()
    player.run()                                    # the main thread draws, as in play.py
    latencies = found.pop("latencies")
    return dict(found, target_fps=args.fps,
                latency_median_ms=statistics.median(latencies) if latencies else None,
                latency_max_ms=max(latencies) if latencies else None)


def compiling_in_background(path, args, decode_dtype):
    """A first start: the eager play's frames/s while a process compiles the step and then the
    prefill into an empty cache folder, the seconds until each plays, the frames/s in between, and
    the frames/s just after."""
    world, _, start = load_world(path, decode_dtype=decode_dtype)
    start_world(world, start)
    key = "TURN_LEFT" if world.n_actions else None
    with tempfile.TemporaryDirectory() as empty, mock.patch.dict(os.environ, VIDEOGPT_CACHE=empty):
        try:
            t0 = time.perf_counter()
            world.compile_step(background=True)
            frames, step_s, frames_step = 0, None, 0
            while world.compiling and time.perf_counter() - t0 < 300:
                got = len(world.step(key))
                if world.compiled_step is None:
                    frames += got
                else:   # the compiled step plays while the prefill compiles
                    step_s = step_s or time.perf_counter() - t0
                    frames_step += got
            ready_s = time.perf_counter() - t0
            t = time.perf_counter()
            after = sum(len(world.step(key)) for _ in range(args.play_steps))
        finally:
            world.stop_compiling()
    step_s = step_s or ready_s
    return dict(step_ready_s=step_s, fps_while_compiling=frames / step_s,
                background_ready_s=ready_s,
                fps_while_compiling_prefill=frames_step / max(ready_s - step_s, 1e-9),
                fps_after=after / (time.perf_counter() - t), compile_error=world.compile_error)


def dtype_name(dtype):
    """torch.bfloat16 -> "bfloat16", as the records say it."""
    return str(dtype).removeprefix("torch.")


def bench_play(size, args, device, autocast):
    """The play loop: frames/s, the latent step's parts, the page's latency and first frame."""
    t0 = time.perf_counter()
    world, names, start, source = play_world(args)
    load_s = time.perf_counter() - t0
    dtype = world.decode_dtype   # the frames' precision, for every row but one
    # a key change every 6 steps
    keys = ["TURN_LEFT"] * 6 + ["MOVE_FORWARD"] * 6 + ["TURN_RIGHT"] * 6 + [None] * 6
    base = dict(bench="play", ckpt=source, threads=torch.get_num_threads(),
                latent=list(world.gpt.config.latent_shape),
                frames_per_step=world.per_step, decode_dtype=dtype_name(dtype))

    def rollout(w, steps):
        """Frames/s of `steps` latent steps after a warm-up, and the medians of the step's parts."""
        start_world(w, start)
        for key in keys[:4]:
            w.step(key)
        parts, t = [], time.perf_counter()
        for i in range(steps):
            w.step(keys[i % len(keys)])
            parts.append(w.timing)
        seconds = time.perf_counter() - t
        median = {k: statistics.median(p[k] for p in parts)
                  for k in ("prefill_ms", "codes_ms", "decode_ms")}
        return dict(fps=steps * w.per_step / seconds, step_ms=1e3 * seconds / steps, **median)

    # Eager first, then compiled: eager steps measured after a compile ran 30-60% slower here.
    strides = [s for s in (1, 2, 4) if s < world.t]
    for stride in strides:
        emit(**base, stride=stride, compiled=False, decode_context=DECODE_CONTEXT,
             **rollout(World(world.gpt, world.vq, action_names=names or None, stride=stride,
                             decode_dtype=dtype), args.play_steps))
    # The decoder's context: the new step alone, with one before it, or the whole window; and how
    # far the new frames lie from the whole window's decoding of them (PSNR in dB over the rollout's
    # last steps).
    for context in (1, 2, world.t):
        w = World(world.gpt, world.vq, action_names=names or None, decode_context=context,
                  decode_dtype=dtype)
        timing = rollout(w, args.play_steps // 2)
        with torch.no_grad():
            errors = []
            for back in range(4):   # each of the last four steps, decoded as the window's newest
                codes = w.codes[:, :w.t - back]  # (1, t - back, h, w)
                # (1, 3, per_step, H, W)
                whole = w.vq.decode(codes)[:, :, -w.per_step:].clamp(-0.5, 0.5)
                part = w.vq.decode(codes[:, -context:])[:, :, -w.per_step:].clamp(-0.5, 0.5)
                errors.append(F.mse_loss(part, whole).item())
        mse = statistics.mean(errors)
        emit(**base, stride=1, compiled=False, decode_context=context,
             psnr_vs_window_db=10 * math.log10(1 / mse) if mse > 0 else None, **timing)
    if args.compile_sample:
        if world.source:  # compiled in the background from nothing, as a first start of the page is
            emit(**base, **compiling_in_background(args.ckpt, args, dtype))
        kept = world.source is not None and all(
            os.path.isfile(package_file(world.source, "inductor", program))
            for program in PROGRAMS)
        t = time.perf_counter()
        world.compile_step(background=False)
        base["load_s" if kept else "compile_s"] = time.perf_counter() - t
        # the compiled step with the eager prefill, both compiled with float32 frames, then both
        # compiled at each stride
        settings = [(1, False, dtype), (1, True, torch.float32)] + [(s, True, dtype)
                                                                     for s in strides]
        for stride, prefill_compiled, frames_dtype in settings:
            w = World(world.gpt, world.vq, action_names=names or None, stride=stride,
                      decode_dtype=frames_dtype)
            w.compiled_step = world.compiled_step
            w.compiled_prefill = world.compiled_prefill if prefill_compiled else None
            emit(**{**base, "decode_dtype": dtype_name(frames_dtype)},
                 stride=stride, compiled=True, prefill_compiled=prefill_compiled,
                 decode_context=DECODE_CONTEXT, **rollout(w, args.play_steps))
    # The page (compiled where asked), as play.py runs it.
    emit(**base, compiled=world.compiled_step is not None,
         **page_timing(world, names, start, args, load_s),
         peak_mem_mb=peak_memory_mb(device))



def bench_page(args):
    """play.py's page in headless Chromium beside it on the same cores, as a person would see it:
    every frame's time taken where the page draws it."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return emit(bench="page", skipped="pip install playwright: it drives the browser")
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        return emit(bench="page", skipped="no Chromium on the PATH (apt-get install chromium)")
    with socket.socket() as s:   # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    play = os.path.join(os.path.dirname(os.path.abspath(__file__)), "play.py")
    proc = subprocess.Popen([sys.executable, play, "--ckpt", args.ckpt, "--port", str(port),
                             "--fps", str(args.fps), "--stride", str(args.page_stride)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    found = dict(bench="page", ckpt=os.path.basename(args.ckpt), target_fps=args.fps,
                 stride=args.page_stride)
    try:
        proc.stdout.readline()   # the URL, once the server listens
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport=dict(width=1000, height=560))
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("window.playStats.frames > 0", timeout=60_000)
            found["first_frame_s"] = time.perf_counter() - t0
            try:   # a first start compiles in the background
                page.wait_for_function("document.getElementById('mode').textContent === "
                                       "'compiled'", timeout=300_000)
                found["compiled_s"] = time.perf_counter() - t0
            except Exception:
                found["compiled_s"] = None
            time.sleep(2)
            page.evaluate("window.playStats.latencies = []; window.playStats.times = []")
            keys, end = ["ArrowLeft", "ArrowUp", "ArrowRight", "ArrowUp"], time.perf_counter()
            end += args.page_seconds
            while time.perf_counter() < end:   # each key held 1.2 s, then 0.3 s of none
                page.keyboard.down(keys[0])
                time.sleep(1.2)
                page.keyboard.up(keys[0])
                time.sleep(0.3)
                keys = keys[1:] + keys[:1]
            times = np.array(page.evaluate("window.playStats.times"))                     # ms
            latencies = page.evaluate("window.playStats.latencies")
            browser.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    if len(times) < 2 or not latencies:
        return emit(**found, frames=len(times), error="the page drew no frames or no key")
    gaps = np.diff(times)
    seconds = int((times[-1] - times[0]) // 1000)
    counted = np.histogram(times, bins=times[0] + 1000 * np.arange(seconds + 1))[0]
    emit(**found, frames=len(times), fps=1e3 * len(gaps) / (times[-1] - times[0]),
         late_frames=int((gaps > 1.5e3 / args.fps).sum()), worst_gap_ms=float(gaps.max()),
         fps_each_second_min=int(counted.min()), fps_each_second_median=float(np.median(counted)),
         latency_median_ms=statistics.median(latencies), latency_max_ms=max(latencies))


def latent_for(codes):
    """A (4, s, s) latent shape with `codes` positions."""
    side = int(math.isqrt(codes // 4))
    assert 4 * side * side == codes, f"--codes must be 4 * s^2, got {codes}"
    return (4, side, side)


def main(argv=None):
    p = argparse.ArgumentParser(description="Benchmark training and sampling throughput.")
    p.add_argument("--device", default="cpu",
                   help="cpu (tiny sizes) or cuda (the paper's BAIR sizes)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="autocast precision (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--only", default=None,
                   choices=["vqvae", "gpt", "sample", "sparse", "attention", "dashboards", "play",
                            "page"],
                   help="run one benchmark")
    p.add_argument("--size", default=None, choices=list(SIZES),
                   help="model and batch sizes (default: cuda on a GPU, else cpu; tiny: a smoke "
                        "test)")
    p.add_argument("--codes", type=int, default=None,
                   help="sampling benchmark: latent size 4*s^2 (e.g. 1024)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps")
    p.add_argument("--sample_repeats", type=int, default=3,
                   help="timed whole-batch cached samplings")
    p.add_argument("--naive_steps", type=int, default=8, help="timed naive-sampler positions")
    p.add_argument("--compile", action="store_true",
                   help="training benchmarks: torch.compile the models")
    p.add_argument("--compile_sample", action=argparse.BooleanOptionalAction, default=True,
                   help="sampling benchmark: also time fast.generate(compile=True) and report its "
                        "first call")
    p.add_argument("--ckpt",
                   default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights",
                                        "vizdoom.pt"),
                   help="play benchmark: the prior to play (without the file: random weights, the "
                        "recipe's sizes)")
    p.add_argument("--play_steps", type=int, default=60,
                   help="play benchmark: timed latent steps per setting")
    p.add_argument("--play_keys", type=int, default=20,
                   help="play benchmark: key events timed to the screen")
    p.add_argument("--fps", type=int, default=30, help="play benchmark: the page's pace")
    p.add_argument("--play_pace_s", type=float, default=2.0,
                   help="play benchmark: seconds the page's pace is timed")
    p.add_argument("--page_seconds", type=float, default=24.0,
                   help="page benchmark: seconds of held keys timed")
    p.add_argument("--page_stride", type=int, default=1,
                   help="page benchmark: play.py's --stride (its --fps is --fps)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    autocast = autocast_for(device, args.dtype)
    size = SIZES[args.size or ("cuda" if device.type == "cuda" else "cpu")]
    torch.manual_seed(0)
    for name, fn in (("vqvae", bench_vqvae), ("gpt", bench_gpt_train), ("sample", bench_sample),
                     ("sparse", bench_sparse), ("attention", bench_attention)):
        if args.only in (None, name):
            fn(size, args, device, autocast)
    if args.only == "dashboards":
        bench_dashboards(size, args, device, autocast)
    if args.only == "play":
        bench_play(size, args, device, autocast)
    if args.only == "page":
        bench_page(args)


if __name__ == "__main__":
    main()
