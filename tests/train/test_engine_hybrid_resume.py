"""Exact resume of a real hybrid (Mamba-2 + attention + MLP) on the real streaming loader.

test_engine.py checks the resume machinery on an MLP-only model and an in-memory loader; this test
adds what those leave out: SSM and attention layers (their states reset at packed-document starts,
driven by the loader's ``doc_ids``) and the shard loader's own cursor and shuffle, through
``train()``'s default loader factory. One process, CPU, a few seconds.
"""
import json
import random

import torch

import synthetic
from hybrid_lm.data.writer import build_shards
from hybrid_lm.train.checkpoint import load_model_state
from hybrid_lm.train.config import job_config_from_dict
from hybrid_lm.train.loop import train

STEPS = 6


def write_corpus(path) -> None:
    """JSONL documents of 20-300 bytes: several per packed 32-token row, so document starts fall
    inside rows and the layers' state resets are exercised."""
    rng = random.Random(0)
    words = ["state", "space", "model", "attention", "chunk", "scan", "token", "shard", "resume", "exact"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randrange(3, 45))) for _ in range(80)]
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs))


def job(run_dir, shards, **train_section):
    return job_config_from_dict(synthetic.job_dict(
        run_dir, steps=STEPS,
        model={"vocab_size": 258, "d_model": 32, "layer_pattern": "M-A-", "attention": {"n_heads": 4},
               "mamba2": {"d_state": 16, "headdim": 16, "chunk_size": 16}},
        data={"path": str(shards), "seq_len": 32, "micro_batch_size": 2},
        eval={"max_batches": 2}, train=train_section))


def test_hybrid_exact_resume_on_streaming_shards(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus)
    shards = tmp_path / "shards"
    # small shards: the loader's shard order and per-shard shuffle are part of what must resume
    build_shards(str(corpus), shards, shard_tokens=1500, val_fraction=0.1, progress=False)
    assert len(list(shards.glob("*.tar"))) > 3

    straight = train(job(tmp_path / "a", shards))  # make_loader=None: the real build_loader
    first = train(job(tmp_path / "b", shards, stop_at=STEPS // 2))
    assert first.stopped_by_signal and first.step == STEPS // 2
    second = train(job(tmp_path / "b", shards))
    assert sorted(second.losses) == list(range(STEPS // 2, STEPS))
    assert {**first.losses, **second.losses} == straight.losses  # bitwise
    assert len(set(straight.losses.values())) == STEPS  # really different batches, not one repeated
    a, b = load_model_state(straight.checkpoint), load_model_state(second.checkpoint)
    assert a.step == b.step == STEPS
    assert {k for k in a.state_dict if "A_log" in k or "q_proj" in k}  # both families are in the weights
    for name, tensor in a.state_dict.items():
        assert torch.equal(tensor, b.state_dict[name]), name
    assert straight.evals.keys() == second.evals.keys() == {STEPS}  # eval.every=0: the final eval
    assert straight.evals[STEPS] == second.evals[STEPS]
