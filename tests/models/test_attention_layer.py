"""Attention layer: KV-cache continuation, decode == forward, windows, packed documents, RoPE, backend choice."""
import pytest
import torch

from hybrid_lm.models.attention import Attention, flash
from hybrid_lm.models.attention.rope import apply_rope, rope_cos_sin

CASES = {"mha": dict(n_heads=4), "gqa": dict(n_heads=4, n_kv_heads=2), "gqa-window5": dict(n_heads=4, n_kv_heads=1, window=5),
         "window1": dict(n_heads=2, window=1)}


def make(case, seed=0):
    torch.manual_seed(seed)
    return Attention(32, **CASES[case]).double()


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("split", [1, 9], ids=["s1", "s9"])
def test_two_halves_via_cache(case, split):
    layer = make(case)
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    y, _ = layer(x)
    y1, s = layer(x[:, :split], return_state=True)
    y2, s = layer(x[:, split:], state=s, return_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=0, atol=1e-12)
    assert int(s["pos"][0]) == 20
    window = CASES[case].get("window")
    assert s["k"].size(2) == (20 if window is None else window - 1)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_step_equals_forward(case):
    layer = make(case)
    x = torch.randn(2, 15, 32, dtype=torch.float64)
    y, _ = layer(x)
    _, state = layer(x[:, :4], return_state=True)
    outs = []
    for t in range(4, 15):
        yt, state = layer.step(x[:, t], state)
        outs.append(yt)
    torch.testing.assert_close(torch.stack(outs, 1), y[:, 4:], rtol=0, atol=1e-12)


def test_window_limits_context():
    """With window W the output at t does not depend on tokens before t - W + 1."""
    layer = make("gqa-window5")
    x = torch.randn(1, 12, 32, dtype=torch.float64)
    x2 = x.clone()
    x2[:, :6] = torch.randn(1, 6, 32, dtype=torch.float64)
    y, _ = layer(x)
    y2, _ = layer(x2)
    torch.testing.assert_close(y[:, 10:], y2[:, 10:], rtol=0, atol=1e-12)
    assert (y[:, 6:10] - y2[:, 6:10]).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["gqa", "gqa-window5"], ids=["full", "window"])
@pytest.mark.parametrize("cut", [1, 7], ids=["doc-of-1", "doc-of-7"])
def test_packed_documents_equal_separate_runs(case, cut):
    layer = make(case)
    x = torch.randn(2, 18, 32, dtype=torch.float64)
    doc_ids = torch.tensor([[0] * cut + [1] * (18 - cut)] * 2)
    pos = torch.cat([torch.arange(cut), torch.arange(18 - cut)])[None].expand(2, 18)
    y, state = layer(x, doc_ids=doc_ids, position_ids=pos, return_state=True)
    ya, _ = layer(x[:, :cut])
    yb, sb = layer(x[:, cut:], return_state=True)
    torch.testing.assert_close(y, torch.cat([ya, yb], 1), rtol=0, atol=1e-12)
    # decoding after the packed row continues the last document only
    yn, _ = layer.step(x[:, 0], state)
    yn_ref, _ = layer.step(x[:, 0], sb)
    torch.testing.assert_close(yn, yn_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", ["gqa", "gqa-window5"], ids=["full", "window"])
def test_repeated_document_id_starts_a_new_document(case):
    """Ids [0]*5 + [1]*5 + [0]*5 are three documents: a document starts wherever the id changes."""
    layer = make(case)
    x = torch.randn(1, 15, 32, dtype=torch.float64)
    doc_ids = torch.tensor([[0] * 5 + [1] * 5 + [0] * 5])
    pos = torch.arange(5).repeat(3)[None]
    y, state = layer(x, doc_ids=doc_ids, position_ids=pos, return_state=True)
    parts = [layer(x[:, a:a + 5])[0] for a in (0, 5, 10)]
    torch.testing.assert_close(y, torch.cat(parts, 1), rtol=0, atol=1e-12)
    assert int(state["valid"].sum()) == min(5, CASES[case].get("window", 99) - 1)


@pytest.mark.parametrize("length", [24, 23, 11], ids=["T24-multiple", "T23-ragged", "T11-just-over-2W"])
@pytest.mark.parametrize("kv_heads", [4, 1], ids=["mha", "gqa"])
def test_blocked_window_equals_dense_mask(length, kv_heads):
    """The O(T * W) block path (cache-free, T > 2W) gives what the dense (T, T) mask gives."""
    from hybrid_lm.models.attention.window import blocked_window_attention

    torch.manual_seed(0)
    q = torch.randn(2, 4, length, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, kv_heads, length, 8, dtype=torch.float64).unbind(0)
    seg = torch.tensor([[0] * 3 + [1] * (length - 3), [0] * length])
    t = torch.arange(length)
    mask = (t[None, :] <= t[:, None]) & (t[:, None] - t[None, :] < 5) & (seg[:, :, None] == seg[:, None, :])
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=kv_heads != 4)
    torch.testing.assert_close(blocked_window_attention(q, k, v, seg, 5), dense, rtol=0, atol=1e-12)


def test_rope_matches_hf_llama_rotary():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    rot = LlamaRotaryEmbedding(cfg)
    q, k = torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16)
    pos = torch.arange(3, 12)[None].expand(2, 9)
    cos_hf, sin_hf = rot(q, pos)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    cos, sin = rope_cos_sin(pos, 16, 500.0, q.dtype)
    torch.testing.assert_close(apply_rope(q, cos, sin), q_hf)
    torch.testing.assert_close(apply_rope(k, cos, sin), k_hf)


def test_parameter_names_and_residual_mark():
    layer = Attention(32, n_heads=4, n_kv_heads=2)
    assert {n for n, _ in layer.named_parameters()} == {f"{p}_proj.weight" for p in "qkvo"}
    assert layer.o_proj.weight._is_residual_projection


def _outputs(backend):
    torch.manual_seed(0)
    layer = Attention(32, n_heads=4, backend=backend)
    x = torch.randn(2, 6, 32)
    return layer, x


@pytest.mark.skipif(flash.HAVE_FLASH, reason="checks the behaviour without flash-attn installed")
def test_explicit_flash_backend_without_flash_attn_fails_loudly():
    layer, x = _outputs("flash")
    with pytest.raises(RuntimeError, match=r"attention.backend='flash' but flash-attn is not installed.*'auto'"):
        layer(x)
    with pytest.raises(RuntimeError, match="flash-attn is not installed"):  # decoding too: no silent SDPA
        layer.step(x[:, 0], layer.init_state(2, device=x.device, dtype=x.dtype))
    from hybrid_lm.models.hybrid import HybridLM
    from hybrid_lm.models.config import ModelConfig
    from hybrid_lm.typed_config import from_dict

    model = HybridLM(from_dict(ModelConfig, {"d_model": 32, "layer_pattern": "A-", "attention": {"backend": "flash"}}))
    with pytest.raises(RuntimeError, match="flash-attn is not installed"):
        model(torch.zeros(1, 4, dtype=torch.long))


def test_auto_backend_falls_back_to_sdpa_on_cpu(monkeypatch):
    for have_flash in (False, True):  # installed or not, CPU fp32 input takes the SDPA path
        monkeypatch.setattr(flash, "HAVE_FLASH", have_flash)
        auto, x = _outputs("auto")
        sdpa, _ = _outputs("sdpa")
        assert torch.equal(auto(x)[0], sdpa(x)[0])


def test_explicit_flash_backend_on_cpu_fp32_fails_even_when_installed(monkeypatch):
    monkeypatch.setattr(flash, "HAVE_FLASH", True)
    layer, x = _outputs("flash")
    with pytest.raises(RuntimeError, match=r"needs CUDA fp16/bf16 activations, got torch.float32 on cpu"):
        layer(x)
