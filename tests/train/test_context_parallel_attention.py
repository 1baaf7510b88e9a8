"""Context-parallel attention (``train/context_parallel/attention.py``) equals one process.

One spawn of 4 gloo ranks runs every case: CP=4 over all ranks and CP=2 over {0, 1} and {2, 3}
(two CP groups side by side, as with data x context parallel). Each rank builds the same seeded
fp64 ``Attention`` (GQA 4 query / 2 kv heads), runs the whole sequence on its own as the
reference, then its slice through the CP forward; the output at its positions, the gradient of
its input slice and the parameter gradients summed over the CP group must equal the reference
at 1e-10. Rows hold several documents, one crossing every slice boundary and one id reused
([.., 0, 1, 1, 0]) so that only the global segment index keeps them apart; position_ids restart
at each document as the loader writes them.
"""
from __future__ import annotations

import pytest
import torch

from distributed_utils import run_distributed

pytestmark = pytest.mark.distributed

B, T, D, H, KV = 2, 24, 32, 4, 2  # T divisible by 2 * 4 slices (zig-zag at CP=4)
TOL = 1e-10


def _doc_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """doc_ids (B, T) with documents crossing slice boundaries and a reused id; positions per document."""
    doc_ids = torch.zeros(B, T, dtype=torch.long)
    doc_ids[0, 5:17] = 1  # crosses the CP=2 boundary at 12 and the CP=4 ones at 6 and 12
    doc_ids[0, 17:] = 0  # a new document reusing id 0
    doc_ids[1, 9:] = 3
    change = torch.ones(B, T, dtype=torch.bool)
    change[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    idx = torch.arange(T).expand(B, T)
    start = torch.where(change, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return doc_ids, idx - start


def _case(cp, window, docs: bool, scheme: str) -> dict:
    from hybrid_lm.models.attention.layer import Attention
    from hybrid_lm.train.context_parallel.attention import attention_forward, local_positions

    torch.manual_seed(0)
    layer = Attention(D, H, n_kv_heads=KV, window=window).double()
    x = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(B, T, D, dtype=torch.float64)
    doc_ids, positions = _doc_batch() if docs else (None, None)
    ref, _ = layer(x, doc_ids=doc_ids, position_ids=positions)
    (ref * weight).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()

    pos = local_positions(cp)
    x_local = x.detach()[:, pos].clone().requires_grad_(True)
    y = attention_forward(scheme)(layer, x_local, doc_ids=None if doc_ids is None else doc_ids[:, pos],
                                  position_ids=None if positions is None else positions[:, pos], cp=cp)
    (y * weight[:, pos]).sum().backward()
    errors = {"out": float((y - ref[:, pos]).abs().max()), "x.grad": float((x_local.grad - x.grad[:, pos]).abs().max())}
    for n, p in layer.named_parameters():
        g = p.grad.clone()
        torch.distributed.all_reduce(g, group=cp.group)
        errors[n] = float((g - ref_grads[n]).abs().max())
    return errors


def _run(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from hybrid_lm.train.context_parallel import ContextParallel

    dist.init_process_group("gloo", rank=rank, world_size=world)
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    results = {}
    for size in (2, 4):
        group = pairs[rank // 2] if size == 2 else dist.group.WORLD
        for layout in ("contiguous", "zigzag"):
            cp = ContextParallel(group=group, rank=rank % size, size=size, seq_len=T, layout=layout)
            for window in (None, 5):
                for scheme in ("allgather", "ulysses"):
                    results[(size, layout, window, scheme)] = _case(cp, window, True, scheme)
            results[(size, layout, None, "allgather", "no docs")] = _case(cp, None, False, "allgather")
            results[(size, layout, None, "ulysses", "no docs")] = _case(cp, None, False, "ulysses")
    return results


def test_cp_attention_equals_one_process() -> None:
    for rank, results in enumerate(run_distributed(_run, world_size=4)):
        for case, errors in results.items():
            worst = max(errors, key=errors.get)
            assert errors[worst] < TOL, f"rank {rank} case {case}: {worst} off by {errors[worst]:.3e}"
