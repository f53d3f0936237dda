"""Run by tests/test_workflow.py under torchrun: one optimizer step of each stage with gradient
accumulation on two gloo processes; rank 0 saves both models' state dicts.

torchrun --standalone --nproc_per_node=2 tests/ddp_accum_worker.py OUT.pt VQ_CKPT OUT_DIR
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from test_workflow import ONE_STEP, PRIOR  # noqa: E402

out_path, vq_ckpt, out_dir = sys.argv[1:]
# The VQ-VAE: 2 processes x 2 micro-batches of 1 clip. The prior: 2 x 2 micro-batches of 2.
vq = train.train(train.parse_args(
    ["--stage", "vqvae", "--init_from", vq_ckpt, "--out_dir", os.path.join(out_dir, "vq"),
     "--batch_size", "1", "--grad_accum", "2"] + ONE_STEP))
prior = train.train(train.parse_args(
    PRIOR + ["--vqvae", vq_ckpt, "--out_dir", os.path.join(out_dir, "gpt"),
             "--batch_size", "2", "--grad_accum", "2"] + ONE_STEP))
if dist.get_rank() == 0:
    torch.save(dict(vqvae=vq.state_dict(), gpt=prior.state_dict()), out_path)
dist.barrier()   # nobody tears the group down while a peer still uses it
dist.destroy_process_group()
