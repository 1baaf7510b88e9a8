"""Activation checkpointing (``train/activation_checkpointing.py``): exact, per family, through the engine.

A small hybrid with every kind of block the issue names (``M``, ``A``, ``T``, ``-``) gives the
same loss and bit-identical gradients with ``full``, ``selective`` and no checkpointing; the
training loop gives the same per-step losses; the config refuses layer letters that cannot work.
"""
from __future__ import annotations

import copy

import pytest
import torch

import synthetic
from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.hybrid import Block, HybridLM
from hybrid_lm.train.activation_checkpointing import CheckpointedBlock, apply_activation_checkpointing
from hybrid_lm.train.config import job_config_from_dict
from hybrid_lm.train.loop import train
from hybrid_lm.typed_config import ConfigError, from_dict

V, D, B, T = 64, 32, 2, 16
MODEL = dict(vocab_size=V, d_model=D, layer_pattern="M-A-T-", attention=dict(n_heads=2),
             mamba2=dict(d_state=8, headdim=8, chunk_size=8),
             titans=dict(n_heads=2, chunk_size=4, memory_expansion=2))


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, T), generator=g)
    doc_ids = torch.zeros(B, T, dtype=torch.long)
    doc_ids[0, 6:] = 1  # a document start inside a row: the stateful layers reset in the recompute too
    return {"input_ids": ids, "labels": torch.roll(ids, -1, dims=1), "doc_ids": doc_ids}


def _loss_and_grads(model: HybridLM) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = model(**_batch()).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode,layers,wrapped", [("full", "", "M-A-T-"), ("selective", "MT", "MT")])
def test_checkpointing_is_exact(mode, layers, wrapped):
    torch.manual_seed(0)
    plain = HybridLM(from_dict(ModelConfig, MODEL))
    checkpointed = copy.deepcopy(plain)
    n = apply_activation_checkpointing(checkpointed, mode, layers)
    assert n == len(wrapped)
    assert [b.letter for b in checkpointed.blocks if isinstance(b, CheckpointedBlock)] == list(wrapped)
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()  # names unchanged
    ref_loss, ref_grads = _loss_and_grads(plain)
    loss, grads = _loss_and_grads(checkpointed)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), name


def test_checkpointed_blocks_recompute_and_eval_runs_plainly():
    """The recompute really happens (the block runs twice per training step), and not under no_grad.
    (Counted at the block's norm: the recompute stops early, inside the layer, once the backward
    has every tensor it needs, so a hook on the layer's output would not fire.)"""
    torch.manual_seed(0)
    model = HybridLM(from_dict(ModelConfig, MODEL))
    apply_activation_checkpointing(model, "selective", "A")
    calls = []
    block = next(b for b in model.blocks if b.letter == "A")
    block.norm.register_forward_hook(lambda *_: calls.append(1))
    model(**_batch()).loss.backward()
    assert len(calls) == 2
    with torch.no_grad():
        model(**_batch())
    assert len(calls) == 3
    assert type(model.blocks[0]) is Block  # M was not selected


def _job(run_dir, **parallel) -> dict:
    job = synthetic.job_dict(run_dir, steps=2)
    job["model"] = MODEL
    job["parallel"].update(parallel)
    return job


def test_training_losses_equal_with_checkpointing(tmp_path):
    """Two optimizer steps of the real engine (DeepSpeed ZeRO-0, clipping) on M-A-T-: the same losses."""
    runs = {}
    for name, par in {"none": {}, "full": {"activation_checkpointing": "full"}}.items():
        runs[name] = train(job_config_from_dict(_job(tmp_path / name, **par)), make_loader=synthetic.factory())
    assert runs["full"].losses == runs["none"].losses


@pytest.mark.parametrize("parallel,model,match", [
    ({"activation_checkpointing": "selective"}, {}, "needs the layer letters"),
    ({"activation_checkpointing": "full", "activation_checkpointing_layers": "M"}, {}, "only read with"),
    ({"activation_checkpointing": "selective", "activation_checkpointing_layers": "Q"}, {}, "'Q' is not a layer letter"),
    ({"activation_checkpointing": "selective", "activation_checkpointing_layers": "X"}, {},
     "'X' does not occur in model.layer_pattern 'M-A-T-'"),
    ({"activation_checkpointing": "full", "context_parallel": 2}, {}, "cannot be combined with parallel.context_parallel=2"),
])
def test_config_refuses(tmp_path, parallel, model, match):
    with pytest.raises(ConfigError, match=match):
        job_config_from_dict(_job(tmp_path, **parallel)).validate()


def test_config_names_key_on_the_command_line(tmp_path):
    from hybrid_lm.train.config import load_job_config

    path = tmp_path / "job.yaml"
    path.write_text("model: {layer_pattern: 'M-'}\n")
    cfg = load_job_config(path, ["parallel.activation_checkpointing=selective",
                                 "parallel.activation_checkpointing_layers=M"])
    assert cfg.parallel.activation_checkpointing_layers == "M"
    with pytest.raises(ConfigError, match="parallel.activation_checkpointing: "):
        load_job_config(path, ["parallel.activation_checkpointing=some"])
