"""lm-evaluation-harness runs on an export, offline, with a local task (``lm_eval_task/``).

This is the documented way to evaluate exports (export/README.md). Each architecture kind is run
once: a native class (Llama) and a remote-code one (``trust_remote_code=True``, with a sliding
window shorter than the requests). lm-eval's loglikelihood of every request must equal the one
our own model computes for the same bytes, and its acc/perplexity must follow from them: a
model with other weights, or scores read one position off, differ by 1e-2 to 0.3 nats per
request even on these near-uniform tiny models, where fp32 rounding leaves ~2e-6 (tolerance 1e-4).
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from export_helpers import save_tiny

from hybrid_lm.data.tokenizer import Tokenizer
from hybrid_lm.export.api import export_checkpoint
from hybrid_lm.models.hybrid import HybridLM

pytest.importorskip("lm_eval", reason="lm-eval is the 'eval' extra: pip install -e '.[eval]'")
TASK_DIR = Path(__file__).parent / "lm_eval_task"


def our_loglikelihood(model: HybridLM, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) summed over its tokens, and whether every one is the argmax:
    what lm-eval's loglikelihood request returns, from our model and training tokenizer."""
    tok = Tokenizer.byte_level()
    ctx, whole = tok.encode(context), tok.encode(context + continuation)
    assert whole[: len(ctx)] == ctx
    ids = torch.tensor([whole])
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits[0, len(ctx) - 1 :]  # the positions that predict the continuation
    target = ids[0, len(ctx) :]
    logp = torch.log_softmax(logits.double(), dim=-1)
    return logp.gather(-1, target[:, None]).sum().item(), bool((logits.argmax(-1) == target).all())


@pytest.mark.slow
@pytest.mark.parametrize("case", ["llama", "remote_window"])
def test_lm_eval_scores_equal_our_model(tmp_path, case):
    src, model = save_tiny(tmp_path, case)
    out = export_checkpoint(src, tmp_path / "hf")
    # a user's shell has no rendezvous: drop what an in-process training run in this pytest worker
    # left behind (LOCAL_RANK without RANK makes accelerate inside lm_eval refuse to start)
    launch_vars = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {**{k: v for k, v in os.environ.items() if k not in launch_vars}, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={out},trust_remote_code=True,dtype=float32",
           "--tasks", "hybrid_lm_smoke", "--include_path", ".", "--device", "cpu", "--batch_size", "1",
           "--output_path", str(tmp_path / "results"), "--log_samples"]
    proc = subprocess.run(cmd, cwd=TASK_DIR, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = list((tmp_path / "results").rglob("results_*.json"))
    samples = list((tmp_path / "results").rglob("samples_hybrid_lm_smoke_*.jsonl"))
    assert results and samples, proc.stdout[-2000:]
    records = [json.loads(line) for line in samples[0].read_text().splitlines()]
    assert len(records) == len((TASK_DIR / "smoke.jsonl").read_text().splitlines())
    ours = []
    for r in records:
        theirs_ll, theirs_greedy = r["resps"][0][0]
        ll, greedy = our_loglikelihood(model, r["doc"]["context"], r["doc"]["continuation"])
        assert float(theirs_ll) == pytest.approx(ll, abs=1e-4), r["doc"]
        assert (theirs_greedy == "True") == greedy, r["doc"]
        ours.append((ll, greedy))
    metrics = json.loads(results[0].read_text())["results"]["hybrid_lm_smoke"]
    assert metrics["acc,none"] == pytest.approx(sum(g for _, g in ours) / len(ours))
    assert metrics["perplexity,none"] == pytest.approx(math.exp(-sum(ll for ll, _ in ours) / len(ours)), rel=1e-4)
