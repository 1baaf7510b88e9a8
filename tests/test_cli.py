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
