"""AdamW parameter groups on a real hybrid stack: which parameters decay and which do not."""
import pytest
import torch
from torch import nn

from hybrid_lm.models.hybrid import HybridLM
from hybrid_lm.models.config import ModelConfig
from hybrid_lm.train.optim import OptimConfig, build_optimizer, param_groups
from hybrid_lm.typed_config import from_dict

# every parameter of "M-A-" at d_model 32 that must not decay, spelled out rather than derived by
# the rule under test: the embedding (= tied LM head), every norm gain, the conv bias, the q/k/v/o
# biases, and Mamba-2's A_log, dt_bias and D
NO_DECAY = {
    "embed.weight", "final_norm.weight",
    *(f"blocks.{i}.norm.weight" for i in range(4)),
    "blocks.0.layer.norm.weight", "blocks.0.layer.conv1d.bias",
    "blocks.0.layer.A_log", "blocks.0.layer.dt_bias", "blocks.0.layer.D",
    *(f"blocks.2.layer.{p}_proj.bias" for p in "qkvo"),
}
# the matrices (and the depthwise conv kernel, a (C, 1, K) weight)
DECAY = {
    "blocks.0.layer.in_proj.weight", "blocks.0.layer.out_proj.weight", "blocks.0.layer.conv1d.weight",
    *(f"blocks.{i}.layer.{p}_proj.weight" for i in (1, 3) for p in ("gate", "up", "down")),
    *(f"blocks.2.layer.{p}_proj.weight" for p in "qkvo"),
}


def hybrid(**overrides) -> HybridLM:
    torch.manual_seed(0)
    cfg = {"d_model": 32, "layer_pattern": "M-A-", "attention": {"n_heads": 4, "bias": True},
           "mamba2": {"d_state": 16, "headdim": 16, "chunk_size": 16}, **overrides}
    return HybridLM(from_dict(ModelConfig, cfg))


def decay_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """name -> the weight_decay of the optimizer group holding that parameter."""
    wd_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    return {name: wd_of[id(p)] for name, p in model.named_parameters()}


def test_norms_biases_embeddings_and_ssm_params_do_not_decay_matrices_do():
    model = hybrid()
    wd = decay_by_name(model, build_optimizer(model, OptimConfig(weight_decay=0.1)))
    assert set(wd) == NO_DECAY | DECAY  # the lists above cover the whole model
    assert {n for n, v in wd.items() if v == 0.0} == NO_DECAY
    assert {n for n, v in wd.items() if v == 0.1} == DECAY


def test_untied_lm_head_is_a_matrix_and_decays():
    model = hybrid(tie_embeddings=False)
    wd = decay_by_name(model, build_optimizer(model, OptimConfig(weight_decay=0.05)))
    assert wd["lm_head.weight"] == 0.05 and wd["embed.weight"] == 0.0


def test_every_parameter_appears_exactly_once():
    model = hybrid()
    groups = param_groups(model, OptimConfig())
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert [g["name"] for g in groups] == ["decay", "no_decay"]


def test_decay_norms_biases_embeddings_puts_everything_in_the_decay_group():
    model = hybrid()
    wd = decay_by_name(model, build_optimizer(model, OptimConfig(weight_decay=0.1, decay_norms_biases_embeddings=True)))
    assert set(wd.values()) == {0.1}


def test_a_matrix_marked_no_weight_decay_is_respected():
    model = hybrid()
    model.blocks[2].layer.q_proj.weight._no_weight_decay = True  # how a layer opts a matrix out
    wd = decay_by_name(model, build_optimizer(model, OptimConfig(weight_decay=0.1)))
    assert wd["blocks.2.layer.q_proj.weight"] == 0.0 and wd["blocks.2.layer.k_proj.weight"] == 0.1


@pytest.mark.parametrize("name", ["blocks.0.layer.A_log", "blocks.0.layer.dt_bias", "blocks.0.layer.D"])
def test_mamba2_marks_its_ssm_parameters(name):
    assert getattr(dict(hybrid().named_parameters())[name], "_no_weight_decay", False)
