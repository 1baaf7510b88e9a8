"""A rank program for the launch-script tests: all-reduce (rank + 1) and record what each rank saw.

    python -m allreduce_probe OUT_DIR [--fail-once]

``--fail-once`` makes global rank 1 exit 1 once, to check that MAX_RESTARTS brings the whole job
back. "Once" is a marker file in OUT_DIR, not TORCHELASTIC_RESTART_COUNT: with several nodes only
the failed node's agent counts a restart; the others re-form the group on the membership change
with their count unchanged, so a healthy node's workers may run again with count 0 (and rank 1).
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
failed_marker = os.path.join(out_dir, "rank1-failed-once")
if fail_once and rank == 1 and not os.path.exists(failed_marker):
    open(failed_marker, "w").close()
    sys.exit(1)
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump({"rank": rank, "world": world, "sum": t.item(), "node": os.environ.get("GROUP_RANK"),
               "restart": restart, "after_failure": os.path.exists(failed_marker)}, f)
dist.destroy_process_group()
