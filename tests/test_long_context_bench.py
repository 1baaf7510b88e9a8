"""bench/long_context.py --quick: the state-collapse experiment runs end to end (training, state-passing
continuation, every inference mitigation, passkey through the shards' tokenizer, table, JSON, PNG)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "long_context.py"


@pytest.mark.slow
def test_quick_experiment_runs_every_variant(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("long_context_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    summary = bench.run(bench.quick_setup(), tmp_path, None)  # in process: no second torch/DeepSpeed import
    results = summary["results"]
    knobs = {name.split("=")[0] for name in results if "=" in name}
    assert knobs == set(bench.KNOBS)
    assert {"no mitigation", "continued, no state passing", "state passing (carry)"} <= set(results)
    for r in results.values():
        assert len(r["loss_by_position"]) == 4 and all(0 < x < 10 for x in r["loss_by_position"])
        assert set(r["passkey"]) == {"128"} or set(r["passkey"]) == {128}
    # the continued training moved the weights
    assert results["no mitigation"]["loss_by_position"] != results["continued, no state passing"]["loss_by_position"]
    table = capsys.readouterr().out
    assert "| state passing (carry) |" in table and "passkey 1L" in table
    assert json.loads((tmp_path / "long_context.json").read_text())["setup"]["seq_len"] == 128
    assert (tmp_path / "long_context.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "state_passing" / "checkpoints").is_dir()
