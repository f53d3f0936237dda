"""Run by tests/test_train.py under torchrun: trains, then gathers every rank's state to rank 0.

torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py OUT.pt TRAIN_ARGS...

Besides the weights and codebooks it reports, per rank, the training items its
sampler handed out and every file it created, renamed or deleted under the run's
out_dir (seen through Python's audit hooks, so no write can slip past).
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import run  # noqa: E402
import train  # noqa: E402

out_path, argv = sys.argv[1], sys.argv[2:]
args = train.parse_args(argv)
out_dir = os.path.abspath(args.out_dir)
writes = []


def audit(event, event_args):
    # open(path, mode, flags) in a write mode or with O_WRONLY/O_RDWR/O_CREAT; rename, replace and
    # link name a source and a target path; remove and mkdir one path.
    if event == "open" and isinstance(event_args[0], (str, bytes, os.PathLike)):
        path, mode, flags = event_args
        by_mode = mode is not None and any(c in str(mode) for c in "wax+")
        writing = by_mode or (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        paths = [path] if writing else []
    elif event in ("os.rename", "os.replace", "os.link"):
        paths = event_args[:2]
    elif event in ("os.remove", "os.mkdir"):
        paths = event_args[:1]
    else:
        return
    for path in paths:
        if os.path.abspath(os.fsdecode(path)).startswith(out_dir):
            writes.append((event, os.fsdecode(path)))


class RecordingSampler(run.InfiniteSampler):
    """The run's own sampler, noting each (index, window seed) it yields."""
    seen = []

    def __iter__(self):
        for item in super().__iter__():
            RecordingSampler.seen.append(item)
            yield item


sys.addaudithook(audit)
run.InfiniteSampler = RecordingSampler
model = train.train(args)
# Every parameter of this rank, flattened into one vector, gathered on every rank. (BatchNorm
# running statistics are per rank between DDP's buffer broadcasts; the codebook is compared apart.)
state = torch.cat([p.detach().flatten() for p in model.parameters()])
states = [torch.zeros_like(state) for _ in range(dist.get_world_size())]
dist.all_gather(states, state)
codebooks = [torch.zeros_like(model.codebook.embeddings) for _ in range(dist.get_world_size())]
dist.all_gather(codebooks, model.codebook.embeddings.contiguous())
# The sampler runs ahead of training (prefetch), so keep only the items of the steps taken.
used = RecordingSampler.seen[: args.max_steps * args.batch_size]
reports = [None] * dist.get_world_size()
dist.all_gather_object(reports, dict(items=used, writes=writes))
if dist.get_rank() == 0:
    torch.save(dict(states=states, codebooks=codebooks, items=[r["items"] for r in reports],
                    writes=[r["writes"] for r in reports]), out_path)
dist.barrier()   # nobody tears the group down while a peer still uses it
dist.destroy_process_group()
