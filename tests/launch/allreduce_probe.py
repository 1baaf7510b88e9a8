"""A rank program for the launch-script tests: all-reduce (rank + 1) and record what each rank saw.

    python -m allreduce_probe OUT_DIR [--fail-once]

``--fail-once`` makes global rank 1 exit 1 on torchrun's first attempt, to check that MAX_RESTARTS
brings the whole job back (every rank runs again, with TORCHELASTIC_RESTART_COUNT=1).
"""
import json
import os
import sys

import torch
import torch.distributed as dist

out_dir, fail_once = sys.argv[1], "--fail-once" in sys.argv[2:]
restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
if fail_once and restart == 0 and rank == 1:
    sys.exit(1)
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump({"rank": rank, "world": world, "sum": t.item(), "node": os.environ.get("GROUP_RANK"),
               "restart": restart}, f)
dist.destroy_process_group()
