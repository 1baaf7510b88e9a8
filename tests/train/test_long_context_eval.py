"""The long_context eval hook (loss, state RMS and decay by position) and token-level passkey prompts."""
import torch

from hybrid_lm.data.tokenizer import Tokenizer
from hybrid_lm.models.config import Mamba2Config, ModelConfig
from hybrid_lm.models.hybrid import HybridLM
from hybrid_lm.train.evaluation import EvalConfig, EvalContext, passkey_prompt, passkey_prompt_ids, run_evals

T, FACTOR = 8, 4


def val_batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(3):
        ids = torch.randint(64, (2, T), generator=g)
        out.append({"input_ids": ids, "labels": torch.roll(ids, -1, 1), "doc_ids": torch.zeros_like(ids)})
    return out


def test_long_context_stats_by_position_match_the_decode_path():
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(vocab_size=64, d_model=32, layer_pattern="M-A-",
                                 mamba2=Mamba2Config(d_state=8, headdim=16, chunk_size=4))).eval()
    data = val_batches()
    ctx = EvalContext(make_val_loader=lambda: iter(data), device=torch.device("cpu"), step=0)
    scores = run_evals(model, EvalConfig(hooks=["long_context"], long_context_factor=FACTOR), ctx)
    ends = [T * (k + 1) for k in range(FACTOR)]
    assert all(f"long_loss@{p}" in scores for p in ends)
    stream = torch.cat([b["input_ids"].reshape(-1) for b in data])[:T * FACTOR]
    states = model.init_states(1)
    with torch.no_grad():
        for t in range(T * FACTOR):
            _, states = model.step(stream[t:t + 1], states)
            if t + 1 in ends:  # the step path's state norm at the same position, per head
                per_head = states[0]["ssm"].pow(2).mean(dim=(0, 2, 3)).sqrt()
                for h, value in enumerate(per_head.tolist()):
                    assert abs(scores[f"long_state_rms/L0M.h{h}@{t + 1}"] - value) <= 1e-4 * max(1.0, value)
    assert scores[f"long_state_rms/L2A@{ends[-1]}"] > 0  # the attention cache is reported too
    decays = [v for k, v in scores.items() if k.startswith("long_decay/L0M.h")]
    assert len(decays) == FACTOR * model.blocks[0].layer.nheads and all(0 < d < 1 for d in decays)


def test_passkey_prompt_is_exactly_length_tokens_for_bpe_and_bytes():
    texts = ["The grass is green. The sky is blue. The pass key is 123. What is the pass key?"] * 20
    bpe = Tokenizer.train(texts, vocab_size=300)
    ids, answer = passkey_prompt_ids(bpe, 200, 0.5, 54321)
    assert len(ids) == 200 and answer == "54321"
    text = bpe.decode(ids)
    assert "54321" in text and text.endswith("The pass key is ")
    byte_ids, _ = passkey_prompt_ids(Tokenizer.byte_level(), 200, 0.5, 54321)
    assert bytes(byte_ids) == passkey_prompt(200, 0.5, 54321)[0].encode()  # bytes: the old prompt exactly
