"""Eval hooks: losses against hand-computed CE, position buckets, reduction, registry, passkey."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.hybrid import HybridLM
from hybrid_lm.train.evaluation import (EvalConfig, EvalContext, eval_hooks, passkey_prompt, register_eval_hook,
                                        run_evals)
from hybrid_lm.typed_config import ConfigError, from_dict

CPU = torch.device("cpu")


def tiny_model() -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(ModelConfig(d_model=32, layer_pattern="--"))


def batches(n=3, b=2, t=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 258, (b, t), generator=g)
        labels = torch.randint(0, 258, (b, t), generator=g)
        labels[:, -3:] = -100
        out.append({"input_ids": ids, "labels": labels, "position_ids": torch.arange(t).expand(b, t),
                    "doc_ids": torch.zeros(b, t, dtype=torch.long)})
    return out


def ctx_for(data, **kw):
    return EvalContext(make_val_loader=lambda: iter(data), device=CPU, step=kw.pop("step", 0), **kw)


def test_val_loss_equals_hand_computed_cross_entropy():
    model, data = tiny_model(), batches()
    scores = run_evals(model, EvalConfig(hooks=["val_loss"]), ctx_for(data))
    with torch.no_grad():
        logits = torch.cat([model(b["input_ids"]).logits for b in data]).double()
    labels = torch.cat([b["labels"] for b in data])
    keep = labels != -100
    logp = logits.log_softmax(-1)[keep]
    expected = -logp.gather(-1, labels[keep][:, None]).mean().item()
    assert scores["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert scores["val_ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert model.training


def test_position_buckets_average_to_val_loss_when_weighted():
    model, data = tiny_model(), batches()
    scores = run_evals(model, EvalConfig(hooks=["val_loss", "position_loss"], position_buckets=4), ctx_for(data))
    buckets = {k: v for k, v in scores.items() if k.startswith("position_loss/")}
    assert list(buckets) == ["position_loss/0-3", "position_loss/4-7", "position_loss/8-11", "position_loss/12-15"]
    # the last bucket holds 1 labelled position of 4 per row (3 are -100): weight by token counts
    weights = [4, 4, 4, 1]
    weighted = sum(w * v for w, v in zip(weights, buckets.values())) / sum(weights)
    assert weighted == pytest.approx(scores["val_loss"], rel=1e-6)
    assert len(set(round(v, 6) for v in buckets.values())) == 4  # really per-bucket values


def test_reduce_is_applied_and_max_batches_respected():
    model, data = tiny_model(), batches(n=4)
    seen = []

    def two_identical_ranks(total, count):
        seen.append((total, count))
        return 2 * total, 2 * count

    cfg = EvalConfig(hooks=["val_loss"], max_batches=1)
    scores = run_evals(model, cfg, ctx_for(data, reduce=two_identical_ranks))
    assert len(seen) == 1 and seen[0][1] == (data[0]["labels"] != -100).sum().item()
    only_first = run_evals(model, EvalConfig(hooks=["val_loss"]), ctx_for(data[:1]))
    assert scores["val_loss"] == pytest.approx(only_first["val_loss"])
    # a reduce that adds another rank's (sum, count) changes the token-weighted mean accordingly
    other = run_evals(model, cfg, ctx_for(data, reduce=lambda s, c: (s + 10.0 * 5, c + 5)))
    n = seen[0][1]
    assert other["val_loss"] == pytest.approx((only_first["val_loss"] * n + 50.0) / (n + 5))


def test_unknown_hook_names_it_and_lists_known_ones():
    with pytest.raises(ConfigError, match=r"unknown hook 'nope' \(known: .*passkey.*val_loss"):
        run_evals(tiny_model(), EvalConfig(hooks=["nope"]), ctx_for([]))


def test_a_new_hook_plugs_in_by_name_and_train_mode_is_restored():
    @register_eval_hook("test_mode_probe")
    def probe(model, ctx, cfg):
        return {"probe/training": float(model.training), "probe/grad": float(torch.is_grad_enabled()),
                "probe/step": float(ctx.step)}

    assert "test_mode_probe" in eval_hooks()
    model = tiny_model()
    cfg = from_dict(EvalConfig, {"hooks": ["test_mode_probe"], "every": 5})
    assert run_evals(model, cfg, ctx_for([], step=7)) == {"probe/training": 0.0, "probe/grad": 0.0, "probe/step": 7.0}
    assert model.training
    model.eval()
    run_evals(model, cfg, ctx_for([]))
    assert not model.training


def test_config_validation():
    with pytest.raises(ConfigError, match="eval.position_buckets"):
        from_dict(EvalConfig, {"position_buckets": 0})
    with pytest.raises(ConfigError, match="eval.passkey_depths"):
        EvalConfig(passkey_depths=[1.5])


def test_passkey_prompt_layout():
    prompt, answer = passkey_prompt(300, 0.5, 12345)
    assert len(prompt) == 300 and prompt.count("12345") == 2 and answer == "12345"
    assert prompt.endswith("What is the pass key? The pass key is ")
    early, late = passkey_prompt(300, 0.0, 12345)[0], passkey_prompt(300, 1.0, 12345)[0]
    assert early.index("12345") < prompt.index("12345") < late.index("12345")
    with pytest.raises(ConfigError, match="passkey_lengths"):
        passkey_prompt(40, 0.5, 12345)


class InductionOracle(nn.Module):
    """Byte 'model' without generate(): predicts the byte that followed the latest earlier
    occurrence of the last 16 bytes (an ideal induction head), so it retrieves any pass key."""

    def __init__(self, vocab=256, k=16):
        super().__init__()
        self.vocab, self.k = vocab, k

    def forward(self, ids, **_):
        seq = bytes(ids[0].tolist()) if self.vocab >= 256 else b""
        logits = torch.zeros(1, ids.shape[1], self.vocab)
        ctx = seq[-self.k:]
        at = seq[:-1].rfind(ctx) if ctx else -1
        if at >= 0:
            logits[0, -1, seq[at + len(ctx)]] = 1.0
        return SimpleNamespace(logits=logits)


def test_passkey_scores_a_retrieving_model_perfectly():
    cfg = EvalConfig(hooks=["passkey"], passkey_lengths=[128, 300], passkey_depths=[0.0, 0.5, 1.0])
    scores = run_evals(InductionOracle(), cfg, ctx_for([], step=3))
    assert scores == {"passkey/128": 1.0, "passkey/300": 1.0}


def test_passkey_with_hybrid_lm_generate():
    scores = run_evals(tiny_model(), EvalConfig(hooks=["passkey"], passkey_lengths=[128], passkey_depths=[0.5]),
                       ctx_for([]))
    assert scores["passkey/128"] == 0.0  # an untrained model does not guess 5 digits


def test_passkey_needs_a_byte_level_vocab():
    with pytest.raises(ConfigError, match="byte-level.*vocab is 100"):
        run_evals(InductionOracle(vocab=100), EvalConfig(hooks=["passkey"]), ctx_for([]))
    with pytest.raises(ConfigError, match="vocab is 100"):
        run_evals(HybridLM(ModelConfig(vocab_size=100, d_model=32, layer_pattern="--")),
                  EvalConfig(hooks=["passkey"]), ctx_for([]))


# --- eval.plugins: hooks from the user's own modules -------------------------------------------

import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

from hybrid_lm.train import evaluation  # noqa: E402

PLUGIN = '''
from hybrid_lm.train.evaluation import register_eval_hook

@register_eval_hook("{hook}")
def my_hook(model, ctx, cfg):
    return {{"{hook}/step": float(ctx.step), "{hook}/params": float(sum(p.numel() for p in model.parameters()))}}
'''


PLUGIN_MODULES = ("user_evals_a", "user_evals_b", "user_evals_c", "user_evals_d", "broken_evals")


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """tmp_path on sys.path; the hook registry and the plugins' sys.modules entries are restored
    afterwards, so a plugin registered here is unknown to every other test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(evaluation, "_HOOKS", dict(evaluation._HOOKS))
    yield tmp_path
    for name in PLUGIN_MODULES:
        sys.modules.pop(name, None)


def write_plugin(folder, module, hook, body=PLUGIN):
    assert module in PLUGIN_MODULES  # so the fixture unloads it
    (folder / f"{module}.py").write_text(textwrap.dedent(body.format(hook=hook)))


def test_a_plugin_module_registers_its_hook_before_lookup(plugin_dir):
    write_plugin(plugin_dir, "user_evals_a", "user_probe")
    assert "user_probe" not in eval_hooks()
    model = tiny_model()
    cfg = from_dict(EvalConfig, {"hooks": ["val_loss", "user_probe"], "plugins": ["user_evals_a"]})
    scores = run_evals(model, cfg, ctx_for(batches(n=1), step=4))
    assert scores["user_probe/step"] == 4.0
    assert scores["user_probe/params"] == float(sum(p.numel() for p in model.parameters()))
    assert "val_loss" in scores


def test_a_missing_plugin_module_is_a_config_error_naming_it(plugin_dir):
    with pytest.raises(ConfigError, match=r"eval.plugins: cannot import 'no_such_evals_mod' \(ModuleNotFoundError.*PYTHONPATH"):
        run_evals(tiny_model(), EvalConfig(hooks=["val_loss"], plugins=["no_such_evals_mod"]), ctx_for([]))


def test_a_plugin_that_fails_on_import_is_a_config_error_with_its_cause(plugin_dir):
    (plugin_dir / "broken_evals.py").write_text("import missing_dependency_of_the_plugin\n")
    with pytest.raises(ConfigError, match=r"'broken_evals'.*missing_dependency_of_the_plugin"):
        run_evals(tiny_model(), EvalConfig(plugins=["broken_evals"]), ctx_for([]))


def test_an_unknown_hook_despite_plugins_lists_the_known_names_including_the_plugins(plugin_dir):
    write_plugin(plugin_dir, "user_evals_b", "user_probe_b")
    with pytest.raises(ConfigError, match=r"unknown hook 'user_probe_typo' \(known: .*user_probe_b.*val_loss"):
        run_evals(tiny_model(), EvalConfig(hooks=["user_probe_typo"], plugins=["user_evals_b"]), ctx_for([]))
    with pytest.raises(ConfigError, match=r"needs its module in eval.plugins"):
        run_evals(tiny_model(), EvalConfig(hooks=["user_probe_typo"]), ctx_for([]))


def _job_yaml(folder, run_dir, **eval_section) -> str:
    import yaml

    import synthetic

    job = synthetic.job_dict(run_dir, steps=2, eval=eval_section)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path)


def test_hybrid_lm_train_validates_plugins_in_the_launcher(plugin_dir, capsys):
    from hybrid_lm.cli import main

    write_plugin(plugin_dir, "user_evals_c", "user_probe_c")
    good = _job_yaml(plugin_dir, plugin_dir / "run", hooks=["user_probe_c"], plugins=["user_evals_c"])
    assert main(["train", good, "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["eval"]["plugins"] == ["user_evals_c"]
    assert main(["train", good, "eval.plugins=[no_such_evals_mod]", "--print-config"]) == 2
    assert "config error: eval.plugins: cannot import 'no_such_evals_mod'" in capsys.readouterr().err
    assert main(["train", good, "eval.hooks=[user_probe_typo]", "--print-config"]) == 2
    assert re.search(r"unknown hook 'user_probe_typo' \(known: .*user_probe_c", capsys.readouterr().err)


def test_training_runs_a_plugin_hook_from_the_config(plugin_dir):
    import synthetic
    from hybrid_lm.train.config import load_job_config
    from hybrid_lm.train.loop import train

    write_plugin(plugin_dir, "user_evals_d", "user_probe_d")
    path = _job_yaml(plugin_dir, plugin_dir / "run", hooks=["user_probe_d"], plugins=["user_evals_d"])
    cfg = load_job_config(path)
    result = train(cfg, make_loader=synthetic.factory())
    # every=0: the one eval after the last step, with the hook the plugin registered
    assert result.evals == {2: {"user_probe_d/step": 2.0, "user_probe_d/params": float(HybridLM(cfg.model).num_params())}}


# --- when the trainer evaluates: eval.every, the final eval, train.eval_at_start ----------------

@pytest.fixture
def counting_hook(monkeypatch):
    """A hook 'count_calls' recording the step of every call (registry restored afterwards)."""
    monkeypatch.setattr(evaluation, "_HOOKS", dict(evaluation._HOOKS))
    calls = []

    @register_eval_hook("count_calls")
    def count(model, ctx, cfg):
        calls.append(ctx.step)
        return {"calls": float(len(calls))}

    return calls


def _train(run_dir, **sections):
    import synthetic
    from hybrid_lm.train.config import job_config_from_dict
    from hybrid_lm.train.loop import train

    return train(job_config_from_dict(synthetic.job_dict(run_dir, **sections)), make_loader=synthetic.factory())


@pytest.mark.parametrize("every, steps, at_start, expected", [
    (0, 3, False, [3]),            # 0: only when training ends
    (0, 3, True, [0, 3]),          # ... plus the 'before' number
    (2, 5, False, [2, 4, 5]),      # the last step is not a multiple: a final eval still runs
    (2, 4, True, [0, 2, 4]),       # the last step is a multiple: evaluated once, not twice
])
def test_eval_schedule(tmp_path, counting_hook, every, steps, at_start, expected):
    result = _train(tmp_path, steps=steps, eval={"every": every, "hooks": ["count_calls"]},
                    train={"eval_at_start": at_start})
    assert counting_hook == expected
    assert sorted(result.evals) == expected


def test_no_hooks_means_no_evals(tmp_path, counting_hook):
    result = _train(tmp_path, steps=4, eval={"every": 2, "hooks": []}, train={"eval_at_start": True})
    assert result.evals == {} and result.step == 4


def test_a_stopped_run_has_not_ended_its_resume_gets_the_final_eval(tmp_path, counting_hook):
    first = _train(tmp_path, steps=4, eval={"every": 0, "hooks": ["count_calls"]}, train={"stop_at": 2})
    assert first.stopped_by_signal and first.evals == {}
    second = _train(tmp_path, steps=4, eval={"every": 0, "hooks": ["count_calls"]})
    assert sorted(second.evals) == [4] and counting_hook == [4]


def test_a_failing_final_eval_keeps_the_final_checkpoint(tmp_path, monkeypatch):
    from hybrid_lm.train.checkpoint import load_model_state

    monkeypatch.setattr(evaluation, "_HOOKS", dict(evaluation._HOOKS))

    @register_eval_hook("explodes")
    def explodes(model, ctx, cfg):
        raise RuntimeError("eval blew up")

    with pytest.raises(RuntimeError, match="eval blew up"):
        _train(tmp_path, steps=3, eval={"every": 0, "hooks": ["explodes"]})
    assert load_model_state(tmp_path).step == 3
