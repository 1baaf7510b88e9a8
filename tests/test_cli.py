"""The console script dispatches to subcommand modules and rejects unknown commands."""
import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hybrid_lm.cli", *args], capture_output=True, text=True, timeout=120)


def test_unknown_command_fails_with_choices():
    result = run_cli("frobnicate")
    assert result.returncode != 0
    assert "invalid choice" in result.stderr and "train" in result.stderr


def test_every_command_module_has_configure_and_main():
    import importlib

    from hybrid_lm.cli import COMMANDS

    for name, (module_name, _) in COMMANDS.items():
        module = importlib.import_module(module_name)
        assert callable(module.configure) and callable(module.main), name


def test_nproc_per_node_exit_code_is_the_failed_workers_not_a_killed_ones():
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from hybrid_lm.train.cli import worker_exit_code

    def failure(rank, code, timestamp):
        f = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file="<N/A>")
        f.timestamp = timestamp  # torchrun's are whole seconds: a killed worker can tie with the cause
        return f

    # rank 1 diverged (3); torchrun then SIGTERMed rank 0 within the same second
    assert worker_exit_code(ChildFailedError("w", {0: failure(0, -15, 7), 1: failure(1, 3, 7)})) == (1, 3)
    assert worker_exit_code(ChildFailedError("w", {0: failure(0, 2, 8), 1: failure(1, 3, 7)})) == (1, 3)
    # every worker killed by a signal: the earliest, as 128 + N
    assert worker_exit_code(ChildFailedError("w", {0: failure(0, -15, 8), 1: failure(1, -9, 7)})) == (1, 137)
