"""Subprocess entry for tests: ``python run_synthetic.py JOB.json`` trains on the synthetic loader.

Used where a test needs a real process boundary (signals, exit codes) but not shards.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import synthetic  # noqa: E402
from hybrid_lm.train.config import job_config_from_dict  # noqa: E402
from hybrid_lm.train.loop import train  # noqa: E402

if __name__ == "__main__":
    result = train(job_config_from_dict(json.loads(Path(sys.argv[1]).read_text())), make_loader=synthetic.factory())
    print(f"finished at step {result.step}, stopped early: {result.stopped_by_signal}", flush=True)
