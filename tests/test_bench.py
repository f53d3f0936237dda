"""bench.py runs and prints one JSON object per benchmark: python -m pytest tests/test_bench.py

Speeds are measured there, never asserted here: this only checks the report's shape.
"""

import json

from conftest import run_script


def test_bench_prints_json_lines():
    r = run_script("bench.py", "--size", "tiny", "--steps", "1", "--warmup", "0",
                   "--naive_steps", "1", "--codes", "64", "--no-compile_sample")
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert [rec["bench"] for rec in records] == ["vqvae_train", "gpt_train", "sample", "sparse",
                                                 "attention", "attention"]
    assert records[0]["clips_per_s"] > 0 and records[1]["tokens_per_s"] > 0
    # The optimizers' steps, and the peak memory of each micro-batch size up to the batch.
    assert all(rec["adam_step_ms"] > 0 and rec["muon_step_ms"] > 0 for rec in records[:2])
    for rec in records[:2]:
        sizes = [int(b) for b in rec["micro_batch_peak_mem_mb"]]
        assert sizes[0] == 1 and sizes[-1] == rec["batch"] and sizes == sorted(sizes)
        assert all(mb > 0 for mb in rec["micro_batch_peak_mem_mb"].values())
    sample = records[2]
    assert sample["codes"] == 64 and sample["latent"] == [4, 4, 4]
    ratio = sample["cached_tokens_per_s"] / sample["naive_tokens_per_s"]
    assert abs(sample["speedup"] - ratio) < 1e-2 * sample["speedup"]
    sparse = records[3]
    assert sparse["codes"] == 128 and 0 < sparse["density"] <= 1
    if sparse.get("flex_forward_ms") is not None:
        assert sparse["dense_forward_ms"] > 0 and sparse["flex_forward_ms"] > 0
    attention = records[4:]
    assert [(rec["dtype"], rec["keys"], rec["batch"]) for rec in attention] == [
        ("bfloat16", 16, 2), ("float32", 16, 2)]
    assert all(rec["fused_ms"] > 0 and rec["written_out_ms"] > 0 for rec in attention)
    assert all(rec["peak_mem_mb"] > 0 for rec in records)


def test_bench_play_reports_the_loop_and_the_page():
    r = run_script("bench.py", "--only", "play", "--play_steps", "2", "--play_keys", "1",
                   "--play_pace_s", "0.5", "--no-compile_sample")
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.strip().splitlines()]
    loops, page = records[:-1], records[-1]
    assert [(rec["stride"], rec["decode_context"]) for rec in loops] == [
        (1, 2), (2, 2), (4, 2), (1, 1), (1, 2), (1, 8)]
    assert all(rec["fps"] > 0 and rec["prefill_ms"] > 0 and rec["codes_ms"] > 0
               and rec["decode_ms"] > 0 for rec in loops)
    # Decoding the whole window is the reference itself: no PSNR against it.
    assert loops[-1]["psnr_vs_window_db"] is None and loops[-3]["psnr_vs_window_db"] > 0
    assert page["page_fps"] > 0 and page["first_frame_s"] > 0 and page["latency_median_ms"] > 0
