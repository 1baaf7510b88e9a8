"""``hybrid-lm train CONFIG [key.sub=value ...]``: validate the config, then train.

    hybrid-lm train configs/debug.yaml train.steps=50                      # 1 process
    hybrid-lm train configs/debug.yaml --nproc-per-node 2                  # 2 local processes (torchrun)
    torchrun --nproc_per_node 2 -m hybrid_lm.cli train configs/tiny.yaml   # same, launched by hand
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD:29500 \
        -m hybrid_lm.cli train configs/tiny.yaml                           # 2 nodes

The config is parsed and validated here, in the launching process, so an unknown key or a wrong
type fails with its name before any worker (or GPU) is touched. Exit codes: 0 finished or stopped
by SIGTERM/SIGUSR1 after a checkpoint, 1 a checkpoint that cannot be used or written (one line
naming the file), 2 bad config, 3 diverged (too many NaN steps), 4 another training holds the run
dir (the message names its pid and host). With ``--nproc-per-node`` the command exits with the code
of the first worker that failed (128 + N for one killed by signal N).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, NoReturn

from hybrid_lm.typed_config import ConfigError

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from hybrid_lm.train.config import JobConfig


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML/TOML/JSON job config (see configs/ and train/README.md)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 parallel.zero_stage=2")
    parser.add_argument("--nproc-per-node", type=int, default=0,
                        help="validate here, then start this many local workers with torchrun")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")


def worker_exit_code(exc: ChildFailedError) -> tuple[int, int]:
    """(global rank, exit code) of the worker whose failure ended a ``--nproc-per-node`` run.

    torchrun SIGTERMs the other workers once one fails, and its failure timestamps have one-second
    resolution, so its "first failure" can be a worker it killed itself. A worker that exited on its
    own (code > 0) is the cause; only when every worker died by a signal N is the code 128 + N.
    """
    own = {rank: f for rank, f in exc.failures.items() if f.exitcode > 0}
    rank, failure = min((own or exc.failures).items(), key=lambda item: (item[1].timestamp, item[0]))
    return rank, failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode


def main(args: argparse.Namespace) -> int:
    from hybrid_lm.train.config import job_config_to_dict, load_job_config

    try:
        cfg = load_job_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"hybrid-lm train: config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(job_config_to_dict(cfg), indent=2))
        return 0
    if args.nproc_per_node > 0 and "LOCAL_RANK" not in os.environ:
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import main as torchrun_main

        from hybrid_lm.train.distributed import free_port

        argv = [f"--nproc_per_node={args.nproc_per_node}", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                "-m", "hybrid_lm.cli", "train", args.config, *args.overrides]
        try:
            torchrun_main(argv)
        except ChildFailedError as exc:
            # the workers have printed their one-line reason; keep their exit code (2, 3, ...) rather
            # than torchrun's traceback and exit code 1
            rank, code = worker_exit_code(exc)
            print(f"hybrid-lm train: worker rank {rank} exited with code {code}", file=sys.stderr)
            return code
        return 0
    code = _train_here(cfg)
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:
        exit_without_finalizing(code)
    return code


def exit_without_finalizing(code: int) -> NoReturn:
    """End a torchrun worker with ``code`` without Python's interpreter finalisation.

    The gloo process groups keep their worker threads after ``destroy_process_group`` (DeepSpeed and
    megatron-core still hold the groups). A thread that finishes the last collective's work drops
    its tensors afterwards, which needs the GIL; if the main thread is finalising by then, the
    thread is killed mid-destructor and the process aborts ("terminate called without an active
    exception", SIGABRT) after a complete run. Seen on loaded 2-core machines in the two-node test:
    torchrun then counts the node failed and the other node's agent waits out its 300 s exit
    barrier. Everything this run writes is closed and synced by now (checkpoints, metrics); only
    the standard streams and logging handlers need flushing."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _train_here(cfg: "JobConfig") -> int:
    """Train in this process (one worker of a launch, or the only one) -> the exit code."""
    from hybrid_lm.train.checkpoint import CheckpointError
    from hybrid_lm.train.faults import TrainingDiverged
    from hybrid_lm.train.loop import train
    from hybrid_lm.train.run_lock import RunDirLocked

    try:
        train(cfg)
    except ConfigError as exc:
        print(f"hybrid-lm train: config error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"hybrid-lm train: {exc}", file=sys.stderr)
        return 3
    except RunDirLocked as exc:
        print(f"hybrid-lm train: error: {exc}", file=sys.stderr)
        return 4
    except CheckpointError as exc:
        print(f"hybrid-lm train: error: {exc}", file=sys.stderr)
        return 1
    finally:
        from hybrid_lm.train.distributed import destroy_distributed

        destroy_distributed()
    return 0
