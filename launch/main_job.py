"""``hybrid-lm run [CONFIG] [overrides]``: the main job, end to end on one machine.

    hybrid-lm run                                  # configs/tiny.yaml, CPU, about 1.5-2 minutes on 2 cores
    hybrid-lm run configs/debug.yaml train.steps=20

1. builds byte-level shards from the embedded stdlib corpus into ``artifacts/data/`` (skipped when
   a manifest is already there),
2. trains in this process (``artifacts/run/``: metrics.jsonl, checkpoints/),
3. reports the validation loss before the first step and after the last,
4. exports the final checkpoint to a Hugging Face folder in ``artifacts/hf/``, loads it back with
   ``transformers.AutoModelForCausalLM`` and checks its logits on a validation batch against ours
   (the job fails if they differ), and prints a greedy sample from the exported model,
5. draws the loss curves to ``artifacts/run/loss.png``,
and prints where everything is. Re-running resumes the finished run (nothing left to train) and
re-exports; delete ``artifacts/run`` to train again.
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default="configs/tiny.yaml", help="job config (default configs/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    parser.add_argument("--artifacts", default="artifacts", help="where data/, run/ and hf/ go")


def _ensure_shards(data_dir: Path) -> None:
    if (data_dir / "manifest.json").is_file():
        print(f"[run] shards already in {data_dir}", flush=True)
        return
    print(f"[run] building shards from the embedded stdlib corpus into {data_dir}", flush=True)
    cmd = [sys.executable, "-m", "hybrid_lm.cli", "data", "build", "--input", "stdlib", "--out", str(data_dir)]
    subprocess.run(cmd, check=True)


def _val_loss(scores: Optional[dict[str, float]]) -> Optional[float]:
    """The validation loss among the eval scores (hooks name it like ``val/loss``)."""
    if not scores:
        return None
    keys = sorted(k for k in scores if "loss" in k and "val" in k and "bucket" not in k and "pos" not in k)
    return scores[keys[0]] if keys else None


def _export(checkpoint: Path, out_dir: Path) -> Path:
    from hybrid_lm.export.api import export_checkpoint

    return export_checkpoint(checkpoint, out_dir, force=True)


def _check_export(cfg, checkpoint: Path, hf_dir: Path, prompt: str = "def main(") -> tuple[float, str]:
    """Max |logit difference| between the export (loaded by transformers) and our model on one
    validation batch, and a greedy sample from the export. Raises if they disagree."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hybrid_lm.data.loader import build_loader
    from hybrid_lm.models.hybrid import HybridLM
    from hybrid_lm.train.checkpoint import load_model_state

    loaded = load_model_state(checkpoint)
    ours = HybridLM(loaded.model_config)
    ours.load_state_dict(loaded.state_dict)
    ours.eval()
    theirs = AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    batch = next(iter(build_loader(cfg.data, "val", 0, 1)))
    ids = batch["input_ids"][:2]
    with torch.no_grad():
        diff = (ours(ids).logits - theirs(ids).logits).abs().max().item()
        prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
        sample = theirs.generate(prompt_ids, max_new_tokens=48, do_sample=False)
    if not diff < 1e-3:
        raise RuntimeError(f"exported model disagrees with the checkpoint: max |logit diff| = {diff:.3g}")
    return diff, tokenizer.decode(sample[0], skip_special_tokens=True)


def main(args: argparse.Namespace) -> int:
    from hybrid_lm.train.config import load_job_config
    from hybrid_lm.typed_config import ConfigError

    started = time.perf_counter()
    artifacts = Path(args.artifacts)
    data_dir, run_dir, hf_dir = artifacts / "data", artifacts / "run", artifacts / "hf"
    overrides = [f"data.path={data_dir}", f"train.run_dir={run_dir}", *args.overrides]
    try:
        cfg = load_job_config(args.config, overrides)
    except ConfigError as exc:
        print(f"hybrid-lm run: config error: {exc}", file=sys.stderr)
        return 2
    _ensure_shards(Path(cfg.data.path))

    from hybrid_lm.train.distributed import destroy_distributed
    from hybrid_lm.train.loop import train

    train_started = time.perf_counter()
    try:
        result = train(cfg)
    finally:
        destroy_distributed()
    train_s = time.perf_counter() - train_started
    evals = sorted(result.evals.items())
    start = _val_loss(evals[0][1]) if evals else None
    end = _val_loss(evals[-1][1]) if evals else None
    exported = _export(result.checkpoint, hf_dir)
    print(f"[run] exported to {exported}; checking it with transformers", flush=True)
    diff, sample = _check_export(cfg, result.checkpoint, exported)
    from hybrid_lm.train.plot import plot_run

    plot = plot_run(run_dir)
    total_s = time.perf_counter() - started

    def fmt(x: Optional[float]) -> str:
        return "n/a" if x is None or math.isnan(x) else f"{x:.4f}"

    print("\n[run] done")
    print(f"  model:        {cfg.model.layer_pattern} d_model={cfg.model.d_model} vocab={cfg.model.vocab_size}")
    print(f"  steps:        {result.step} ({result.state.tokens:,} tokens, {result.state.nan_skipped} skipped)")
    if evals:
        print(f"  val loss:     {fmt(start)} at step {evals[0][0]} -> {fmt(end)} at step {evals[-1][0]}")
    print(f"  data:         {cfg.data.path}")
    print(f"  run dir:      {run_dir} (metrics.jsonl, checkpoints/)")
    print(f"  checkpoint:   {result.checkpoint}")
    print(f"  export:       {exported} (transformers logits within {diff:.1e} of ours)")
    print(f"  loss curves:  {plot}")
    print(f"  sample:       {sample!r}")
    print(f"  wall time:    {total_s:.0f}s total, {train_s:.0f}s training", flush=True)
    return 0
