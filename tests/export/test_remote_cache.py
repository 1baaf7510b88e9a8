"""Remote-code generation carries the layers' states (HybridLMCache) like ``HybridLM.generate``:
greedy tokens equal ours and the uncached path's, and every decode step feeds the model one token."""
import pytest
import torch
from export_helpers import prompt, save_tiny

from hybrid_lm.export.api import export_checkpoint


def _load(tmp_path, case):
    from transformers import AutoModelForCausalLM

    src, model = save_tiny(tmp_path, case)
    hf = AutoModelForCausalLM.from_pretrained(export_checkpoint(src, tmp_path / "hf"), trust_remote_code=True).eval()
    hf.generation_config.eos_token_id = None  # a random model may emit eos; ours never stops early
    return hf, model


def _input_lengths(hf):
    """The sequence length of every forward call of ``hf``, appended as they happen."""
    seen = []
    hf.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["input_ids"] if "input_ids" in kwargs else args[0]).shape[1]),
        with_kwargs=True)
    return seen


@pytest.mark.parametrize("case", ["remote_titans", "remote_window", "remote_atlas"])
def test_cached_generation_equals_ours_one_token_per_step(tmp_path, case):
    hf, model = _load(tmp_path, case)
    seen = _input_lengths(hf)
    x, n = prompt(), 12
    cached = hf.generate(x, do_sample=False, max_new_tokens=n)
    assert seen == [x.shape[1]] + [1] * (n - 1)  # the prompt once, then one new token per step
    seen.clear()
    uncached = hf.generate(x, do_sample=False, max_new_tokens=n, use_cache=False)
    assert seen == list(range(x.shape[1], x.shape[1] + n))  # the whole prefix every step
    ours = model.generate(x, n)
    assert torch.equal(cached, ours)
    assert torch.equal(uncached, ours)


def test_cache_continues_a_forward_call(tmp_path):
    # forward(prefix, use_cache=True), then forward(rest, cache=...) gives the logits of one call
    # over the whole sequence: several new tokens at once, then one
    from transformers.modeling_outputs import CausalLMOutputWithPast

    field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    hf, model = _load(tmp_path, "remote_titans")
    x = prompt(length=13)
    with torch.no_grad():
        full = model(x).logits
        first = hf(x[:, :5], use_cache=True)
        cache = getattr(first, field)
        assert cache.get_seq_length() == 5
        second = hf(x[:, 5:12], **{field: cache})
        third = hf(x[:, 12:], **{field: cache})
        assert hf(x).__getattribute__(field) is None  # a plain call builds no states
    assert cache.get_seq_length() == 13
    got = torch.cat([first.logits, second.logits, third.logits], dim=1)
    torch.testing.assert_close(got, full, rtol=0, atol=1e-5)


def test_cached_generation_from_left_padded_prompts(tmp_path):
    hf, model = _load(tmp_path, "remote_titans")
    long, short = prompt(batch=1, length=12, seed=2), prompt(batch=1, length=8, seed=3)
    padded = torch.cat([torch.cat([torch.full((1, 4), 257), short], dim=1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones_like(short)], dim=1),
                      torch.ones_like(long)])
    n = 10
    cached = hf.generate(padded, attention_mask=mask, do_sample=False, max_new_tokens=n)
    uncached = hf.generate(padded, attention_mask=mask, do_sample=False, max_new_tokens=n, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[0, 12:], model.generate(short, n)[0, 8:])
    assert torch.equal(cached[1, 12:], model.generate(long, n)[0, 12:])


def test_beam_search_reorders_the_states(tmp_path):
    hf, _ = _load(tmp_path, "remote_window")
    x = prompt()
    kw = dict(do_sample=False, max_new_tokens=8, num_beams=3, num_return_sequences=2)
    assert torch.equal(hf.generate(x, **kw), hf.generate(x, use_cache=False, **kw))
