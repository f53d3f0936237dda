"""Run by tests/test_train.py under torchrun: trains, then gathers every rank's state to rank 0.

torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py OUT.pt TRAIN_ARGS...
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

out_path, argv = sys.argv[1], sys.argv[2:]
model = train.train(train.parse_args(argv))
# Every parameter of this rank, flattened into one vector, gathered on every rank. (BatchNorm
# running statistics are per rank between DDP's buffer broadcasts; the codebook is compared apart.)
state = torch.cat([p.detach().flatten() for p in model.parameters()])
states = [torch.zeros_like(state) for _ in range(dist.get_world_size())]
dist.all_gather(states, state)
codebooks = [torch.zeros_like(model.codebook.embeddings) for _ in range(dist.get_world_size())]
dist.all_gather(codebooks, model.codebook.embeddings.contiguous())
if dist.get_rank() == 0:
    torch.save(dict(states=states, codebooks=codebooks), out_path)
dist.barrier()   # nobody tears the group down while a peer still uses it
dist.destroy_process_group()
