"""HMT through the training engine unchanged: ZeRO, bitwise resume on the streaming loader (packed
documents reset the memory), eval hooks through the segment recurrence, the two-stage recipe with
``train.init_from``, a plain stack's weights as the backbone, and the layouts HMT refuses."""
import pytest
import torch

import synthetic
from hybrid_lm.data.writer import build_shards
from hybrid_lm.train.checkpoint import load_model_state
from hybrid_lm.train.config import job_config_from_dict, load_job_config
from hybrid_lm.train.loop import train
from hybrid_lm.typed_config import ConfigError
from test_engine_hybrid_resume import write_corpus

STEPS = 4
HMT = {"segment_length": 16, "sensory_tokens": 2, "cache_size": 4, "bptt_depth": 2}
BACKBONE = {"vocab_size": 258, "d_model": 32, "layer_pattern": "M-A-", "attention": {"n_heads": 2},
            "mamba2": {"d_state": 16, "headdim": 16, "chunk_size": 16}}


def job(run_dir, shards, hmt=HMT, zero_stage=1, **train_section):
    return job_config_from_dict(synthetic.job_dict(
        run_dir, steps=STEPS, zero_stage=zero_stage, model={**BACKBONE, "hmt": hmt},
        data={"path": str(shards), "seq_len": 40, "micro_batch_size": 2},
        eval={"max_batches": 2, "hooks": ["val_loss", "position_loss", "passkey"], "passkey_lengths": [100],
              "passkey_depths": [0.5]}, train=train_section))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("hmt-data")
    write_corpus(root / "corpus.jsonl")
    build_shards(str(root / "corpus.jsonl"), root / "shards", shard_tokens=1500, val_fraction=0.1, progress=False)
    return root / "shards"


@pytest.mark.slow
def test_hmt_exact_resume_with_zero_and_eval_hooks(tmp_path, shards):
    straight = train(job(tmp_path / "a", shards))
    first = train(job(tmp_path / "b", shards, stop_at=STEPS // 2))
    second = train(job(tmp_path / "b", shards))
    assert {**first.losses, **second.losses} == straight.losses  # bitwise
    a, b = load_model_state(straight.checkpoint), load_model_state(second.checkpoint)
    assert a.model_config.hmt is not None and "backbone.blocks.0.layer.A_log" in a.state_dict
    for name in ("summary_prompt", "memory_init", "recall_q.weight", "recall_k.weight"):
        assert torch.equal(a.state_dict[name], b.state_dict[name]), name
    for name, tensor in a.state_dict.items():
        assert torch.equal(tensor, b.state_dict[name]), name
    scores = straight.evals[STEPS]
    assert scores == second.evals[STEPS]
    assert {"val_loss", "passkey/100"} <= set(scores) and any(k.startswith("position_loss/") for k in scores)


@pytest.mark.slow
def test_two_stage_recipe_and_a_plain_backbone_as_init(tmp_path, shards):
    stage1 = train(job(tmp_path / "s1", shards, hmt={**HMT, "memory_search": False, "bptt_depth": 1}, zero_stage=0))
    s1 = load_model_state(stage1.checkpoint).state_dict
    stage2_cfg = job(tmp_path / "s2", shards, hmt={**HMT, "bptt_depth": 3}, zero_stage=0, init_from=str(tmp_path / "s1"),
                     steps=2)
    from hybrid_lm.train.build import build_model

    model = build_model(stage2_cfg.model, seed=5, init_from=stage2_cfg.train.init_from, resuming=False)
    for name, tensor in model.state_dict().items():  # every weight, the unused recall ones too
        assert torch.equal(tensor, s1[name]), name
    # a plain stack of the same widths loads as the backbone; the HMT weights keep their init
    plain = train(job_config_from_dict(synthetic.job_dict(
        tmp_path / "plain", steps=2, model=BACKBONE, data={"path": str(shards), "seq_len": 40, "micro_batch_size": 2},
        eval={"hooks": []})))
    fresh = build_model(stage2_cfg.model, seed=5, init_from=None, resuming=False)
    model = build_model(stage2_cfg.model, seed=5, init_from=str(tmp_path / "plain"), resuming=False)
    plain_state = load_model_state(plain.checkpoint).state_dict
    for name, tensor in model.state_dict().items():
        expected = plain_state[name[len("backbone."):]] if name.startswith("backbone.") else fresh.state_dict()[name]
        assert torch.equal(tensor, expected), name


@pytest.mark.parametrize("key", ["tensor_parallel", "pipeline_parallel", "context_parallel"])
def test_model_parallel_layouts_are_refused_at_load(tmp_path, key):
    with pytest.raises(ConfigError, match=rf"parallel\.{key}: 2 is not supported"):
        load_job_config("configs/hmt-tiny.yaml", [f"parallel.{key}=2", "model.layer_pattern=A-A-"])


def _train_worker(rank, world_size, job):
    from hybrid_lm.train.config import job_config_from_dict
    from hybrid_lm.train.loop import train

    return train(job_config_from_dict(job), make_loader=synthetic.factory()).losses


@pytest.mark.distributed
def test_two_ranks_match_one_rank_with_double_accumulation(tmp_path):
    """Data parallelism: 2 gloo ranks at ZeRO-2 give one rank's losses with 2 micro-batches."""
    from distributed_utils import run_distributed

    model = {"vocab_size": 64, "d_model": 32, "layer_pattern": "M-A-", "attention": {"n_heads": 2},
             "mamba2": {"d_state": 8, "headdim": 16, "chunk_size": 8}, "hmt": HMT}
    two = run_distributed(_train_worker, 2, args=(synthetic.job_dict(tmp_path / "two", steps=4, zero_stage=2,
                                                                     model=model, eval={"hooks": []}),))
    one = run_distributed(_train_worker, 1, args=(synthetic.job_dict(tmp_path / "one", steps=4, zero_stage=0, gas=2,
                                                                     model=model, eval={"hooks": []}),))
    assert sorted(two[0]) == sorted(one[0]) == list(range(4))
    for step in one[0]:
        assert two[0][step] == pytest.approx(one[0][step], rel=1e-5, abs=1e-6), step


@pytest.mark.slow
def test_frozen_backbone_keeps_its_weights(tmp_path):
    from hybrid_lm.train.build import build_model

    model = {"vocab_size": 64, "d_model": 32, "layer_pattern": "A-", "attention": {"n_heads": 2},
             "hmt": {**HMT, "freeze_backbone": True}}
    cfg = job_config_from_dict(synthetic.job_dict(tmp_path, steps=3, zero_stage=0, model=model, eval={"hooks": []}))
    result = train(cfg, make_loader=synthetic.factory())
    start = build_model(cfg.model, seed=0, init_from=None, resuming=False).state_dict()
    trained = load_model_state(result.checkpoint).state_dict
    for name, tensor in start.items():
        assert torch.equal(trained[name], tensor) == name.startswith("backbone."), name


def test_frozen_backbone_with_zero_is_refused_at_load():
    with pytest.raises(ConfigError, match=r"model\.hmt\.freeze_backbone: needs parallel\.zero_stage=0, got 1"):
        load_job_config("configs/hmt-tiny.yaml", ["model.hmt.freeze_backbone=true"])
