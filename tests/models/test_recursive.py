"""The relaxed recursive transformer (Bae et al., ICLR 2025): looping, per-loop LoRA, conversion, early exit.

fp32 throughout; "exact" comparisons allow 1e-5 where two computations sum in a different order
(a LoRA path added to a merged weight) and are bitwise where they run the same ops.
"""
import dataclasses

import pytest
import torch

from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.hybrid import HybridLM
from hybrid_lm.models.recursive.config import RecursionConfig
from hybrid_lm.models.recursive.convert import (convert_to_recursive, parameter_counts, pattern_unit,
                                                shared_block_pattern, svd_lora)
from hybrid_lm.models.recursive.early_exit import generate_with_early_exit
from hybrid_lm.typed_config import ConfigError, from_dict

SMALL = {"vocab_size": 97, "d_model": 32, "attention": {"n_heads": 4, "n_kv_heads": 2},
         "mamba2": {"d_state": 8, "headdim": 16, "chunk_size": 8}, "mlp": {"hidden_size": 48}}


def config(pattern: str, **recursion) -> ModelConfig:
    return from_dict(ModelConfig, {**SMALL, "layer_pattern": pattern, "recursion": recursion}, "model")


def randomised(model: HybridLM, seed: int = 0) -> HybridLM:
    """Every parameter perturbed (LoRA's zero B, norms of one), so nothing passes by being zero or one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def tokens(batch: int = 2, length: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="recursion.lora_rank"):
        config("A-", loops=1, lora_rank=4)
    with pytest.raises(ConfigError, match="recursion.exit_threshold"):
        config("A-", loops=2, exit_threshold=1.5)
    with pytest.raises(ConfigError, match="recursion.loops"):
        config("A-", loops=0)
    with pytest.raises(ValueError, match="lora_targets.*matches no linear"):
        HybridLM(config("A-", loops=2, lora_rank=2, lora_targets=["layer.nope"]))


def test_loops_equal_the_block_applied_by_hand_and_shared_gradients_sum_over_loops():
    looped = randomised(HybridLM(config("M-A-", loops=3)))
    unrolled = HybridLM(config("M-A-" * 3))
    state = looped.state_dict()
    n = len(looped.blocks)
    unrolled.load_state_dict({(f"blocks.{int(k.split('.')[1]) + loop * n}." + k.split(".", 2)[2]
                               if k.startswith("blocks.") else k): v
                              for loop in range(3) for k, v in state.items()})
    x = tokens()
    a, b = looped(x, labels=x).loss, unrolled(x, labels=x).loss
    assert torch.equal(looped(x).logits, unrolled(x).logits)
    a.backward()
    b.backward()
    for name, p in looped.blocks.named_parameters():
        i, rest = name.split(".", 1)
        total = sum(unrolled.blocks.get_parameter(f"{int(i) + loop * n}.{rest}").grad for loop in range(3))
        torch.testing.assert_close(p.grad, total, rtol=1e-5, atol=1e-7, msg=name)
    # each shared parameter appears once in the optimizer's view
    assert len(list(looped.parameters())) == len({id(p) for p in looped.parameters()})
    counts = parameter_counts(looped)
    assert counts["unique"] == looped.num_params()
    assert counts["unrolled"] == unrolled.num_params()


def test_looped_recurrent_layers_keep_one_state_per_loop_and_carry_it_across_calls():
    model = randomised(HybridLM(config("M-A-", loops=2, lora_rank=3)))
    x = tokens(length=37)
    whole = model(x, return_states=True)
    assert len(whole.states) == 2 * 4
    first = model(x[:, :20], return_states=True)
    second = model(x[:, 20:], states=first.states, return_states=True)
    torch.testing.assert_close(second.logits, whole.logits[:, 20:], rtol=1e-5, atol=1e-5)
    # the Mamba-2 states of the two loops are different recurrences
    assert not torch.allclose(whole.states[0]["ssm"], whole.states[4]["ssm"])


def test_flops_count_every_loop_and_the_lora_matmuls():
    plain, looped = HybridLM(config("M-A-")), HybridLM(config("M-A-", loops=2, lora_rank=4))
    head = 2.0 * 32 * 97
    lora = sum(2.0 * 4 * (m.in_features + m.out_features) for m in looped.modules() if hasattr(m, "lora_A"))
    assert looped.flops_per_token(64) == pytest.approx(2 * (plain.flops_per_token(64) - head + lora) + head)


def test_pattern_units_and_shared_blocks():
    assert pattern_unit("A-A-A-A-") == "A-" and pattern_unit("M-A-M-A-") == "M-A-" and pattern_unit("M-M-A-") == "M-M-A-"
    assert shared_block_pattern("A-" * 6, 2) == "A-" * 3
    assert shared_block_pattern("M-A-M-A-", 2) == "M-A-"
    with pytest.raises(ValueError, match="divide 1"):
        shared_block_pattern("M-M-A-", 2)


@pytest.mark.parametrize("method, picks", [("stepwise", [[0], [2], [4]]), ("lower", [[0], [1], [2]]),
                                           ("average", [[0, 3], [1, 4], [2, 5]])])
def test_init_methods_follow_the_spec(method, picks):
    """Six 'A-' units, two loops, three shared units: stepwise takes units 0, 2, 4 (fixed start,
    stride L); lower the first three; average the mean of units j and j + 3 (norms included)."""
    source_config = config("A-" * 6)
    source = randomised(HybridLM(source_config))
    target_config, state = convert_to_recursive(source_config, source.state_dict(), loops=2, method=method)
    assert target_config.layer_pattern == "A-" * 3 and target_config.recursion.loops == 2
    src = source.state_dict()
    for j, units in enumerate(picks):
        for offset in (0, 1):
            for key in [k for k in src if k.startswith(f"blocks.{offset}.")]:
                rest = key.split(".", 2)[2]
                expected = torch.stack([src[f"blocks.{2 * u + offset}.{rest}"].double() for u in units]).mean(0).float()
                assert torch.equal(state[f"blocks.{2 * j + offset}.{rest}"], expected), (method, j, rest)
    HybridLM(target_config).load_state_dict(state)  # strict: every key and shape of the target


def test_full_rank_svd_lora_reproduces_the_source_model():
    """Only linear maps get LoRA, so the tied units must agree elsewhere: a freshly initialised
    attention/MLP stack (norms all one) with every linear randomised is that case."""
    source_config = config("A-" * 4)
    source = HybridLM(source_config).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in source.named_parameters():
            if p.dim() == 2 and name.startswith("blocks."):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    x = tokens()
    for method in ("average", "stepwise"):
        target_config, state = convert_to_recursive(source_config, source.state_dict(), loops=2, method=method,
                                                    lora_rank=48)
        model = HybridLM(target_config).eval()
        model.load_state_dict(state)
        torch.testing.assert_close(model(x).logits, source(x).logits, rtol=0, atol=1e-4)
    rank0_config, rank0 = convert_to_recursive(source_config, source.state_dict(), loops=2, method="average")
    strict = HybridLM(rank0_config).eval()
    strict.load_state_dict(rank0)
    assert (strict(x).logits - source(x).logits).abs().max() > 1e-2  # LoRA is what closes the gap


def test_rank_r_lora_is_the_rank_r_truncation_of_the_residual():
    source_config = config("A-" * 4)
    source = randomised(HybridLM(source_config))
    rank = 5
    target_config, state = convert_to_recursive(source_config, source.state_dict(), loops=2, method="average",
                                                lora_rank=rank, lora_targets=["layer.q_proj", "layer.down_proj"])
    model = HybridLM(target_config)
    model.load_state_dict(state)
    adapted = sorted(k[: -len(".lora_A")] for k in state if k.endswith(".lora_A"))
    assert adapted == ["blocks.0.layer.q_proj", "blocks.1.layer.down_proj", "blocks.2.layer.q_proj",
                       "blocks.3.layer.down_proj"]
    src = source.state_dict()
    for key in adapted:
        b = int(key.split(".")[1])
        rest = key.split(".", 2)[2]
        shared = state[f"{key}.weight"]
        for loop in range(2):
            original = src[f"blocks.{b + loop * 4}.{rest}.weight"].double()
            u, s, vh = torch.linalg.svd(original - shared.double(), full_matrices=False)
            best = (u[:, :rank] * s[:rank]) @ vh[:rank]
            delta = state[f"{key}.lora_B"][loop].double() @ state[f"{key}.lora_A"][loop].double()
            torch.testing.assert_close(delta, best, rtol=0, atol=1e-5)
            assert torch.linalg.matrix_rank(delta) == rank


def test_svd_lora_pads_ranks_beyond_the_matrix():
    a, b = svd_lora(torch.randn(3, 5), 8)
    assert a.shape == (8, 5) and b.shape == (3, 8) and not a[3:].any() and not b[:, 3:].any()


def test_early_exit_never_is_the_full_model_and_always_is_the_one_loop_model():
    model = randomised(HybridLM(config("M-A-", loops=3, lora_rank=2)))
    x = tokens(length=12)
    full = model.generate(x, 8)
    never, loops_never = generate_with_early_exit(model, x, 8, threshold=None)
    assert torch.equal(never, full) and loops_never == [3] * 9
    always, loops_always = generate_with_early_exit(model, x, 8, threshold=0.0)
    assert loops_always == [1] * 9
    # the 1-loop model: loop 0's LoRA merged into the shared weights
    one = HybridLM(dataclasses.replace(model.config, recursion=RecursionConfig(loops=1))).eval()
    merged = {}
    for k, v in model.state_dict().items():
        if k.endswith((".lora_A", ".lora_B")):
            continue
        base = k[: -len(".weight")]
        if f"{base}.lora_A" in model.state_dict():
            v = v + model.state_dict()[f"{base}.lora_B"][0] @ model.state_dict()[f"{base}.lora_A"][0]
        merged[k] = v
    one.load_state_dict(merged)
    assert torch.equal(always, one.generate(x, 8))
    # through HybridLM.generate when the config asks for it
    model.config.recursion.exit_threshold = 0.0
    assert torch.equal(model.generate(x, 8), always)


def test_early_exit_at_a_middle_threshold_saves_loops_on_confident_tokens():
    """A threshold just above the uniform probability: some steps exit before the last loop."""
    model = randomised(HybridLM(config("A-", loops=4)))
    x = tokens(batch=1, length=6)
    _, some = generate_with_early_exit(model, x, 10, threshold=1.0 / 97 + 1e-3)
    assert all(1 <= n <= 4 for n in some) and sum(some) < 4 * 11
