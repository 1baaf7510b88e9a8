"""HMT through the training engine unchanged: ZeRO, bitwise resume on the streaming loader (packed
documents reset the memory), eval hooks through the segment recurrence, the two-stage recipe with
``train.init_from``, a plain stack's weights as the backbone, and the layouts HMT refuses."""
import json

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


@pytest.mark.parametrize("key", ["pipeline_parallel", "context_parallel"])
def test_model_parallel_layouts_are_refused_at_load(tmp_path, key):
    with pytest.raises(ConfigError, match=rf"parallel\.{key}: 2 is not supported"):
        load_job_config("configs/hmt-tiny.yaml", [f"parallel.{key}=2", "model.layer_pattern=A-A-"])


def test_tensor_parallel_loads_and_sequence_parallel_is_refused():
    with pytest.raises(ConfigError, match=r"parallel\.sequence_parallel: True is not supported with model\.hmt"):
        load_job_config("configs/hmt-tiny.yaml", ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true",
                                                  "model.layer_pattern=A-A-"])
    load_job_config("configs/hmt-tiny.yaml", ["parallel.tensor_parallel=2", "model.layer_pattern=A-A-"])


def _train_worker(rank, world_size, jobs):
    from hybrid_lm.train.config import job_config_from_dict
    from hybrid_lm.train.loop import train
    from hybrid_lm.train.process_groups import destroy_process_groups

    out = []
    for job in jobs:
        result = train(job_config_from_dict(job), make_loader=synthetic.factory())
        out.append((result.losses, str(result.checkpoint), result.evals))
        destroy_process_groups()  # megatron's groups are made per degrees: the next job may differ
    if world_size == 2:
        out.append(_tp_decode(TP_MODEL))
    return out


def _tp_decode(model: dict) -> tuple[bool, float]:
    """Greedy decoding of an HMT model split over 2 TP ranks against the same weights unsplit (in
    each rank): prefill over two segments, then decode steps that open new segments (the memory
    pass on the split backbone, carried split Mamba-2 states); -> (same tokens, max logit diff)."""
    import copy

    from hybrid_lm.models.config import ModelConfig
    from hybrid_lm.models.kinds import build_lm
    from hybrid_lm.train.process_groups import init_process_groups
    from hybrid_lm.train.tensor_parallel import apply_tensor_parallel
    from hybrid_lm.typed_config import from_dict

    groups = init_process_groups(tensor_parallel=2)
    torch.manual_seed(0)
    full = build_lm(from_dict(ModelConfig, model))
    full.init_weights()
    split = apply_tensor_parallel(copy.deepcopy(full), groups)
    ids = torch.randint(0, model["vocab_size"], (2, 25), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        same = torch.equal(full.generate(ids, 20), split.generate(ids, 20))
        (ref, ref_state), (got, got_state) = full.prefill(ids), split.prefill(ids)
        diff = float((ref - got).abs().max())
        for _ in range(15):
            nxt = ref.argmax(-1)
            (ref, ref_state), (got, got_state) = full.decode(nxt, ref_state), split.decode(nxt, got_state)
            diff = max(diff, float((ref - got).abs().max()))
    return same, diff


#: Mamba-2 (2 groups) + attention (2 heads) + MLP, each split over 2 TP ranks; Mamba-2 states
#: travel between segments, so the split recurrent state is exercised too
TP_MODEL = {"vocab_size": 258, "d_model": 32, "layer_pattern": "M-A-", "attention": {"n_heads": 2},
            "mlp": {"hidden_size": 48}, "mamba2": {"d_state": 8, "headdim": 16, "ngroups": 2, "chunk_size": 8},
            "hmt": {**HMT, "segment_length": 12, "carry_backbone_state": True}}
#: the eval hooks at step 3 of the TP runs: validation and position losses and a passkey prompt of
#: 100 byte tokens (9 segments), each through the segment recurrence on the split backbone
TP_EVALS = {"every": 3, "max_batches": 2, "hooks": ["val_loss", "position_loss", "passkey"],
            "passkey_lengths": [100], "passkey_depths": [0.5]}


@pytest.mark.distributed
def test_data_and_tensor_parallel_match_one_rank(tmp_path):
    """One 2-rank spawn: data parallelism (ZeRO-2) gives one rank's losses with 2 micro-batches;
    tensor parallelism (TP=2, the backbone's layers split by their families' plans, HMT's own
    summary prompt, memory init and recall projections replicated) gives one rank's losses and
    clipping norms for 3 steps, its eval hooks (validation and position losses, passkey) score as
    one rank's, its checkpoint consolidates to the one-rank weights, it resumes at TP=1 on the
    one-rank run's losses, and greedy generation at TP=2 gives the unsplit model's tokens (logits
    within 1e-5). Tolerance rel 1e-5 (fp32; the TP tests' reasons)."""
    from distributed_utils import run_distributed

    model = {"vocab_size": 64, "d_model": 32, "layer_pattern": "M-A-", "attention": {"n_heads": 2},
             "mamba2": {"d_state": 8, "headdim": 16, "chunk_size": 8}, "hmt": HMT}
    dp_job = synthetic.job_dict(tmp_path / "two", steps=4, zero_stage=2, model=model, eval={"hooks": []})
    tp_job = synthetic.job_dict(tmp_path / "tp2", steps=4, zero_stage=0, model=TP_MODEL, eval=TP_EVALS,
                                parallel={"tensor_parallel": 2}, train={"stop_at": 3})
    two, tp, (same_tokens, logit_diff) = run_distributed(_train_worker, 2, args=([dp_job, tp_job],))[0]
    one = run_distributed(_train_worker, 1, args=([synthetic.job_dict(tmp_path / "one", steps=4, zero_stage=0, gas=2,
                                                                       model=model, eval={"hooks": []})],))[0][0]
    assert sorted(two[0]) == sorted(one[0]) == list(range(4))
    for step in one[0]:
        assert two[0][step] == pytest.approx(one[0][step], rel=1e-5, abs=1e-6), step

    straight = train(job_config_from_dict(synthetic.job_dict(tmp_path / "tp1", steps=4, zero_stage=0, model=TP_MODEL,
                                                             eval=TP_EVALS, checkpoint={"every": 3, "keep": 2})),
                     make_loader=synthetic.factory())
    assert sorted(tp[0]) == [0, 1, 2] and straight.losses[3] < straight.losses[0]
    for step in range(3):
        assert tp[0][step] == pytest.approx(straight.losses[step], rel=1e-5, abs=1e-6), step
    norms = [[row["train/grad_norm"] for row in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
              if "train/grad_norm" in row][:3] for run in ("tp2", "tp1")]
    assert len(norms[0]) == 3 and norms[0] == pytest.approx(norms[1], rel=1e-5)
    scores, reference = tp[2][3], straight.evals[3]
    assert {"val_loss", "passkey/100"} <= set(scores) and any(k.startswith("position_loss/") for k in scores)
    assert scores == pytest.approx(reference, rel=1e-5), (scores, reference)
    split = load_model_state(tp[1]).state_dict
    whole = load_model_state(tmp_path / "tp1" / "checkpoints" / "step-0000003").state_dict
    assert split.keys() == whole.keys() and any(k.startswith("recall_") for k in whole)
    for name, tensor in whole.items():
        torch.testing.assert_close(split[name], tensor, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    resumed = train(job_config_from_dict(synthetic.job_dict(tmp_path / "back", steps=4, zero_stage=0, model=TP_MODEL,
                                                            eval={"hooks": []}, train={"resume": tp[1]})),
                    make_loader=synthetic.factory())
    assert sorted(resumed.losses) == [3]
    assert resumed.losses[3] == pytest.approx(straight.losses[3], rel=1e-5, abs=1e-6)
    assert same_tokens and logit_diff < 1e-5, logit_diff  # generation reads gathered (full-vocabulary) logits


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
