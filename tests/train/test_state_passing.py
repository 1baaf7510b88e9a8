"""train.state_passing: batch i+1 starts from batch i's detached final states, noise as the
alternative, config rules, and exact resume with the carried states in the checkpoint."""
import pytest
import torch

import synthetic
from hybrid_lm.models.config import Mamba2Config, ModelConfig
from hybrid_lm.models.hybrid import HybridLM
from hybrid_lm.train.config import job_config_from_dict
from hybrid_lm.train.loop import train
from hybrid_lm.train.state_passing import StatePassing
from hybrid_lm.typed_config import ConfigError
from test_engine_hybrid_resume import STEPS, write_corpus

SMALL = dict(vocab_size=64, d_model=32, layer_pattern="M-A-", mamba2=Mamba2Config(d_state=8, headdim=16, chunk_size=8))


def test_carry_feeds_batch_i_final_states_into_batch_i_plus_lag():
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(**SMALL)).train()
    carrier = StatePassing(model, "carry", lag=2)
    seen = []
    orig = model.blocks[0].layer.forward

    def spy(x, *, state=None, **kw):
        seen.append(state)
        return orig(x, state=state, **kw)

    model.blocks[0].layer.forward = spy
    finals = []
    for i in range(4):
        out = model(torch.randint(64, (2, 12)), labels=torch.randint(64, (2, 12)))
        out.loss.backward()  # the carried states are detached: no graph reaches back a batch
        finals.append(out.states)
    assert seen[0] is None and seen[1] is None  # lag 2: batches 0 and 1 start from zero
    for i in (2, 3):
        for key in ("ssm", "conv"):
            assert torch.equal(seen[i][key], finals[i - 2][0][key]) and not seen[i][key].requires_grad
    assert finals[0][2] is not None and carrier.queue[0][2] is None  # the attention cache is not carried
    model.eval()
    assert model(torch.randint(64, (1, 5))).states is None  # evaluation is left alone
    carrier.detach()
    model.train()
    assert model(torch.randint(64, (1, 5))).states is None


def test_noise_initial_states_are_seeded_gaussians():
    model = HybridLM(ModelConfig(**SMALL))
    a = StatePassing(model, "noise", noise_std=0.5, seed=3).initial(4, torch.device("cpu"), torch.float32)
    b = StatePassing(model, "noise", noise_std=0.5, seed=3).initial(4, torch.device("cpu"), torch.float32)
    assert torch.equal(a[0]["ssm"], b[0]["ssm"]) and a[2] is None
    assert 0.4 < float(a[0]["ssm"].std()) < 0.6 and not a[0]["conv"].any()


def job(run_dir, shards, **train_section):
    return job_config_from_dict(synthetic.job_dict(
        run_dir, steps=STEPS,
        model={"vocab_size": 258, "d_model": 32, "layer_pattern": "M-M-", "mamba2": {"d_state": 16, "headdim": 16, "chunk_size": 16}},
        data={"path": str(shards), "seq_len": 32, "micro_batch_size": 2, "row_streams": True},
        eval={"max_batches": 1, "hooks": []}, train=train_section))


def test_config_rules(tmp_path):
    with pytest.raises(ConfigError, match="data.row_streams=true"):
        job_config_from_dict(synthetic.job_dict(tmp_path, model={"layer_pattern": "M-"}, train={"state_passing": "carry"}))
    with pytest.raises(ConfigError, match="Mamba-2"):
        job_config_from_dict(synthetic.job_dict(tmp_path, model={"layer_pattern": "A-"}, train={"state_passing": "noise"}))
    with pytest.raises(ConfigError, match="parallel.context_parallel: 2 is not supported with train.state_passing"):
        job_config_from_dict(synthetic.job_dict(tmp_path, model={"layer_pattern": "M-A-"}, train={"state_passing": "noise"},
                                                parallel={"context_parallel": 2}))


@pytest.mark.slow
def test_carry_resume_is_exact_and_changes_training(tmp_path):
    from hybrid_lm.data.writer import build_shards
    from hybrid_lm.train.checkpoint import load_model_state

    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus)
    shards = tmp_path / "shards"
    build_shards(str(corpus), shards, shard_tokens=1500, val_fraction=0.1, progress=False)
    straight = train(job(tmp_path / "a", shards, state_passing="carry"))
    first = train(job(tmp_path / "b", shards, state_passing="carry", stop_at=STEPS // 2))
    assert (first.checkpoint / "state_passing" / "rank-00000.safetensors").is_file()
    second = train(job(tmp_path / "b", shards, state_passing="carry"))
    assert {**first.losses, **second.losses} == straight.losses  # bitwise, carried states included
    a, b = load_model_state(straight.checkpoint), load_model_state(second.checkpoint)
    for name, tensor in a.state_dict.items():
        assert torch.equal(tensor, b.state_dict[name]), name
    plain = train(job(tmp_path / "c", shards))
    assert plain.losses[0] == straight.losses[0]  # the first batch starts from zero either way
    assert plain.losses[STEPS - 1] != straight.losses[STEPS - 1]  # later ones carry a state
