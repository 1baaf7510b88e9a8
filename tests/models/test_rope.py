"""One RoPE for the project (models/attention/rope.py). Attention ``A`` checks it against HF Llama
(test_attention_layer.py); the Titans attention uses the same code with fp64 angles, and must
rotate bit for bit as its own formula did before it shared the code."""
import pytest
import torch

from hybrid_lm.models.attention.rope import apply_rope, rope_cos_sin
from hybrid_lm.models.titans.attention import rope


def _titans_formula(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    d = x.size(-1)
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = positions.to(torch.float64)[:, None, :, None] * inv
    cos, sin = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_titans_rope_is_bitwise_its_fp64_formula(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 16, dtype=dtype)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [16381, 16382, 16383, 0, 1, 70000, 123457]])
    assert torch.equal(rope(x, positions, 10000.0), _titans_formula(x, positions, 10000.0))


def test_titans_rope_angles_are_fp64_not_fp32():
    # at large positions fp32 angles differ from fp64 ones: the Titans path must keep fp64
    x = torch.randn(1, 1, 2, 16, dtype=torch.float64)
    positions = torch.tensor([[100003, 1234567]])
    fp32 = apply_rope(x, *rope_cos_sin(positions, 16, 10000.0, x.dtype))
    assert not torch.equal(rope(x, positions, 10000.0), fp32)
