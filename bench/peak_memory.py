"""Peak-memory probe shared by the benchmarks: growth of the resident set's high-water mark.

The figure is ``VmHWM`` from /proc/self/status (reset through /proc/self/clear_refs; Linux only)
minus the resident size ``VmRSS`` just before the measured call, taken in a fresh subprocess per
measurement after the caller's warm-up. It counts every allocation torch makes on CPU
(activations, intermediates freed before the call returns), not just Python objects, which is
all ``tracemalloc`` sees. ``ru_maxrss`` would not do: Linux carries it over from the parent
across fork/exec, and it cannot be reset.

Usage: the benchmark script re-runs itself with a private flag (``run_child``); the child sets
up and warms up, then prints ``report(hwm_growth(fn))`` as its last line of stdout.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Callable


def status_kib(key: str) -> int:
    """A ``kB`` field of /proc/self/status, e.g. ``VmRSS`` or ``VmHWM``."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def hwm_growth(fn: Callable[[], object]) -> int:
    """Bytes by which the resident high-water mark rises above the current resident size in ``fn()``."""
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset this process's RSS high-water mark
        f.write("5")
    before = status_kib("VmRSS")
    fn()
    return (status_kib("VmHWM") - before) * 1024


def report(peak_bytes: int) -> None:
    """Child side: hand the measurement to ``run_child`` (must be the last line of stdout)."""
    print(json.dumps({"peak_bytes": peak_bytes}))


def run_child(script: str, *args: str) -> float:
    """Parent side: run ``python script *args`` in a fresh process with one OpenMP thread and
    return the ``peak_bytes`` it reported."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
