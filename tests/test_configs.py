"""What the shipped configs say about themselves holds: the parameter count in their header equals
the model built on the meta device, the size in their name is within 5% of it, and the layout line
matches the config and fits by ``hybrid-lm plan`` (OLMo-core-style structural test; the configs'
parsing itself is tests/train/test_config.py)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from hybrid_lm.cli import main as cli_main
from hybrid_lm.train.config import load_job_config
from hybrid_lm.train.plan import build_meta

ROOT = Path(__file__).resolve().parents[1]
SIZED = sorted(p for p in (ROOT / "configs").glob("*.yaml") if "# parameters:" in p.read_text())


def test_scale_configs_shipped():
    names = {p.stem for p in SIZED}
    assert {"hybrid_1b", "attention_1b", "hybrid_3b", "hybrid_7b"} <= names
    patterns = {p.stem: load_job_config(p).model.block_pattern for p in SIZED}
    assert set(patterns["attention_1b"]) == {"A", "-"}
    assert any(set(pat) & set("TCGL") for pat in patterns.values()), "one scale config has Titans memory layers"
    for name in ("hybrid_1b", "hybrid_3b", "hybrid_7b"):
        mixers = patterns[name][::2]
        assert mixers.count("M") > 3 * mixers.count("A") > 0, f"{name}: Mamba-2-heavy with a few attention layers"
    widths = {load_job_config(ROOT / "configs" / f"{n}.yaml").model.d_model for n in ("hybrid_1b", "attention_1b")}
    assert len(widths) == 1, "the attention baseline has the hybrid's width"


@pytest.mark.parametrize("path", SIZED, ids=lambda p: p.name)
def test_stated_parameters_and_layout(path, capsys):
    text = path.read_text()
    cfg = load_job_config(path)
    stated = int(re.search(r"^# parameters: ([\d,]+)", text, re.M).group(1).replace(",", ""))
    model = build_meta(cfg.model)
    assert next(model.parameters()).device.type == "meta"
    assert sum(p.numel() for p in model.parameters()) == stated
    nominal = float(re.search(r"_(\d+(?:\.\d+)?)b$", path.stem).group(1)) * 1e9
    assert abs(stated / nominal - 1) <= 0.05, f"{path.name}: {stated:,} is not within 5% of {nominal:,.0f}"

    layout = re.search(r"^# layout: (\d+) x (\S+) .*?TP=(\d+) PP=(\d+) CP=(\d+).*?ZeRO-(\d), \w+, seq_len (\d+),"
                       r"\s*(?:#\s*)?micro-batch (\d+)", text, re.M | re.S)
    assert layout, f"{path.name}: no '# layout:' line"
    gpus, _, tp, pp, cp, zero, seq, micro = layout.groups()
    par = cfg.parallel
    assert (int(tp), int(pp), int(cp), int(zero)) == (par.tensor_parallel, par.pipeline_parallel,
                                                      getattr(par, "context_parallel", 1), par.zero_stage)
    assert (int(seq), int(micro)) == (cfg.data.seq_len, cfg.data.micro_batch_size)
    command = re.search(r"hybrid-lm plan (configs/\S+) --gpus (\d+) --gpu (\S+)", text)
    assert command and command.group(1) == f"configs/{path.name}" and command.group(2) == gpus
    assert cli_main(["plan", str(path), "--gpus", gpus, "--gpu", command.group(3)]) == 0
    assert "fits" in capsys.readouterr().out
