"""HMT (models/hmt/): the forward pass against the backbone run by hand, recurrence across calls,
truncated BPTT, document isolation, memory search and the config checks."""
from __future__ import annotations

import pytest
import torch

from hybrid_lm.models.config import ModelConfig
from hybrid_lm.models.hmt.model import HMTLM
from hybrid_lm.typed_config import ConfigError, from_dict

V = 40


def make(pattern: str = "A-M-", seed: int = 0, **hmt) -> HMTLM:
    torch.manual_seed(seed)
    opts = dict(segment_length=10, sensory_tokens=2, cache_size=3, bptt_depth=2)
    opts.update(hmt)
    cfg = from_dict(ModelConfig, {"vocab_size": V, "d_model": 32, "layer_pattern": pattern, "attention": {"n_heads": 2},
                                  "mamba2": {"headdim": 16, "d_state": 8, "chunk_size": 4}, "hmt": opts}, "model")
    return HMTLM(cfg).eval()


def backbone_logits(model: HMTLM, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain backbone on one embedding sequence (L, D) -> (logits (L, V), hidden (L, D))."""
    pos = torch.arange(embeds.shape[0])[None]
    hidden, _ = model.backbone.hidden_states(embeds[None], position_ids=pos)
    return model.backbone.lm_head(hidden)[0], hidden[0]


def test_first_two_segments_equal_the_backbone_on_the_spec_inputs():
    model = make(sensory_tokens=2)  # text_length 6
    ids = torch.randint(0, V, (1, 12))
    out = model(ids).logits[0]
    e = model.backbone.embed(ids[0])
    m0 = model.memory_init[None]
    logits1, hidden1 = backbone_logits(model, torch.cat([m0, e[:6], m0]))  # [m_init ; X ; m], no sensory
    torch.testing.assert_close(out[:6], logits1[1:-1])
    # one cached embedding: the recall is that embedding exactly, then [P ; sensory ; X ; P]
    p = hidden1[-1:]
    logits2, _ = backbone_logits(model, torch.cat([p, e[4:6], e[6:12], p]))
    torch.testing.assert_close(out[6:], logits2[3:-1])


def test_disabled_memory_is_the_backbone():
    """Spec property 1: one segment holding the whole sequence, no sensory tokens: the text logits are
    the backbone's on [m_init ; X ; m_init] (the backbone is causal, so the trailing token changes nothing)."""
    model = make(segment_length=20, sensory_tokens=0)
    ids = torch.randint(0, V, (2, 18))
    e = model.backbone.embed(ids)
    m0 = model.memory_init.expand(2, 1, -1)
    hidden, _ = model.backbone.hidden_states(torch.cat([m0, e], 1))
    torch.testing.assert_close(model(ids).logits, model.backbone.lm_head(hidden)[:, 1:])


@pytest.mark.parametrize("pattern,carry", [("A-M-", False), ("M-A-", True)], ids=["paper", "carry-mamba-state"])
def test_segments_one_call_at_a_time_equal_one_call(pattern, carry):
    model = make(pattern, carry_backbone_state=carry)
    ids = torch.randint(0, V, (2, 6 * 5 + 3))  # a short last segment too
    whole = model(ids).logits
    state, parts = None, []
    for a in range(0, ids.shape[1], 6):
        out = model(ids[:, a:a + 6], states=state, return_states=True)
        state, parts = out.states, parts + [out.logits]
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=1e-5, atol=1e-5)
    # the carried state matters: a call without it differs
    assert not torch.allclose(model(ids[:, 24:30]).logits, whole[:, 24:30], atol=1e-4)


def test_carried_backbone_state_changes_the_outputs():
    ids = torch.randint(0, V, (1, 24))
    on, off = make("M-", carry_backbone_state=True), make("M-", carry_backbone_state=False)
    assert torch.equal(on(ids[:, :6]).logits, off(ids[:, :6]).logits)
    assert not torch.allclose(on(ids).logits[:, 6:], off(ids).logits[:, 6:], atol=1e-4)


def _segment_grads(model: HMTLM, ids: torch.Tensor, segment: int, length: int) -> list[float]:
    """|d loss(segment) / d token embeddings| summed over each segment."""
    seen = {}

    def keep(_, __, out):
        out.retain_grad()
        seen["emb"] = out

    handle = model.backbone.embed.register_forward_hook(keep)
    try:
        logits = model(ids).logits
    finally:
        handle.remove()
    logits[0, segment * length:(segment + 1) * length].float().logsumexp(-1).sum().backward()
    g = seen["emb"].grad[0].abs().sum(-1)
    return [float(g[i * length:(i + 1) * length].sum()) for i in range(ids.shape[1] // length)]


@pytest.mark.parametrize("depth", [2, 3])
def test_gradients_reach_exactly_bptt_depth_segments(depth):
    model = make("A-", bptt_depth=depth, sensory_tokens=2)  # text_length 6
    ids = torch.randint(0, V, (1, 6 * 6))
    for seg in range(6):
        grads = _segment_grads(model, ids, seg, 6)
        model.zero_grad()
        first = seg - seg % depth  # the first segment of its gradient window
        assert all(g == 0 for g in grads[:first]), (seg, grads)
        assert all(g > 0 for g in grads[first:seg + 1]), (seg, grads)
        assert all(g == 0 for g in grads[seg + 1:]), (seg, grads)


def test_loss_of_the_third_segment_trains_every_hmt_weight():
    """Spec property 4: with bptt_depth 3, segment 3's loss reaches T, W_q, W_k and m_init."""
    model = make("A-", bptt_depth=3)
    ids = torch.randint(0, V, (1, 18))
    logits = model(ids).logits
    torch.nn.functional.cross_entropy(logits[0, 12:17], ids[0, 13:18]).backward()
    for p in (model.summary_prompt, model.recall_q.weight, model.recall_k.weight, model.memory_init):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_documents_in_a_packed_row_run_alone():
    model = make("M-A-", carry_backbone_state=True)
    ids = torch.randint(0, V, (1, 40))
    doc = torch.zeros(1, 40, dtype=torch.long)
    doc[0, 17:] = 1
    doc[0, 30:] = 2
    state = model(torch.randint(0, V, (1, 12)), return_states=True).states
    packed = model(ids, doc_ids=doc, states=state).logits
    # the first document continues the state; the others start empty
    torch.testing.assert_close(packed[:, :17], model(ids[:, :17], states=state).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, 17:30], model(ids[:, 17:30]).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, 30:], model(ids[:, 30:]).logits, rtol=1e-5, atol=1e-5)
    # a returned state belongs to the row's last document
    out = model(ids, doc_ids=doc, return_states=True).states
    alone = model(ids[:, 30:], return_states=True).states
    torch.testing.assert_close(out.cache[0], alone.cache[0])


def test_recall_is_a_convex_combination_and_the_cache_is_fifo():
    model = make(cache_size=3)
    cache = torch.randn(2, 4, 32)
    valid = torch.tensor([[True, False, False, False], [True, True, True, False]])
    recalled = model.recall(torch.randn(2, 32), cache * valid[..., None], valid)
    assert torch.equal(recalled[0], cache[0, 0])  # one entry: exactly that embedding
    ids = torch.randint(0, V, (1, 6 * 5))
    caches = []
    state = None
    for a in range(0, 30, 6):
        state = model(ids[:, a:a + 6], states=state, return_states=True).states
        caches.append(state.cache[0])
    assert [c.shape[0] for c in caches] == [1, 2, 3, 3, 3]
    torch.testing.assert_close(caches[4][:2], caches[3][1:])


def test_stage_one_passes_the_previous_memory_embedding():
    model = make(memory_search=False)
    ids = torch.randint(0, V, (1, 18))
    first = model(ids[:, :6], return_states=True).states
    second = model(ids[:, 6:12], states=first, return_states=True).states
    e = model.backbone.embed(ids[0])
    p = first.cache[0][-1:]
    _, hidden = backbone_logits(model, torch.cat([p, e[4:6], e[6:12], p]))
    torch.testing.assert_close(second.cache[0][-1], hidden[-1])


@pytest.mark.parametrize("hmt,key", [
    ({"segment_length": 10, "sensory_tokens": 5}, "model.hmt.sensory_tokens"),
    ({"bptt_depth": 0}, "model.hmt.bptt_depth"),
    ({"summary_fraction": 1.5}, "model.hmt.summary_fraction"),
    ({"cache_size": 0}, "model.hmt.cache_size"),
    ({"segment_len": 8}, "model.hmt.segment_len"),
])
def test_bad_hmt_values_fail_naming_the_key(hmt, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict(ModelConfig, {"d_model": 32, "layer_pattern": "A-", "hmt": hmt}, "model")


@pytest.mark.parametrize("pattern,carry", [("A-M-", False), ("M-A-", True)], ids=["paper", "carry-mamba-state"])
def test_generation_decodes_the_open_segment_as_forward_does(pattern, carry):
    """Greedy generation equals re-running ``forward`` on the text so far and taking the argmax at
    the end, token by token, as long as every segment's memory token is recalled from the tokens
    it has when it opens: here with summary_fraction 0 (the summary reads no text tokens)."""
    model = make(pattern, carry_backbone_state=carry, summary_fraction=0.0)
    for prompt_len in (1, 6, 9):
        ids = torch.randint(0, V, (2, prompt_len))
        out = model.generate(ids, 15)
        assert out.shape == (2, prompt_len + 15) and torch.equal(out[:, :prompt_len], ids)
        for t in range(prompt_len, prompt_len + 15):
            assert torch.equal(model(out[:, :t]).logits[:, -1].argmax(-1), out[:, t]), (prompt_len, t)


def test_generation_opens_a_segment_with_its_first_tokens_summary():
    """With the default summary fraction, the first generated token is forward's argmax at the
    prompt's last token (the open segment's memory token is recalled from the prompt's part)."""
    model = make("A-")
    ids = torch.randint(0, V, (1, 16))  # two closed segments, the third open with 4 tokens
    out = model.generate(ids, 1)
    assert torch.equal(out[:, -1], model(ids).logits[:, -1].argmax(-1))


def test_export_takes_remote_code_and_refuses_native_targets():
    from hybrid_lm.export.adapters import select
    from hybrid_lm.models.model_dir import ExportError

    config = make("A-A-").config  # a Llama-shaped backbone: natively exportable without hmt
    assert select(config).name == "remote"
    with pytest.raises(ExportError, match=r"llama: no transformers class runs HMT's segment recurrence \(model\.hmt\)"):
        select(config, "native")
