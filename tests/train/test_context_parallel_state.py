"""Context parallelism for the recurrent layers: Mamba-2's state passing and the memory
layers' relay equal one process on the whole sequence, in fp64.

One spawn of 4 gloo processes serves every case: CP=2 (two groups of 2 run the same case) and
CP=4, contiguous and zig-zag, with documents that cross slice boundaries, a document starting
exactly at a slice boundary and a one-token document. Checked per rank: the local outputs, the
gradient w.r.t. the local inputs (which for the relay only matches when the gradient of the
carried state travels back), the parameter gradients summed over the group, and the final state.
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed_utils import run_distributed

DT = torch.float64
T, B = 32, 2
DOCS = [[0] * 5 + [1] * 14 + [2] * 3 + [3] * 10,  # documents across the boundaries of 4- and 8-token slices
        [7] * 8 + [1] * 8 + [2] * 1 + [3] * 15]   # starts exactly at 8 and 16, a one-token document
LETTERS = ["M", "T", "G", "X", "C", "L", "D"]
#: the letters whose relay is the same code as T/G/X run two of the four layouts (test time)
FEWER = ("C", "L", "D")
#: whole stacks through the framework (attention CP): several CP layers in one backward, whose
#: collectives and relays must meet in the same order on every rank
STACKS = {"M-A-T-": 4, "G-M-X-": 2}  # pattern: how many of the four layouts it runs
#: letters also run under activation checkpointing (its recompute inside the backward replays what
#: the forward received instead of communicating: communicating again deadlocks the relay)
CHECKPOINTED = ("M", "G")
#: letters also run without document ids (nothing to gather or compare at the boundaries)
NO_DOCS = ("M", "T")


def _layer(letter: str):  # type: ignore[no-untyped-def]
    from hybrid_lm.models.common.registry import get_layer_spec
    from hybrid_lm.models.config import ModelConfig

    cfg = ModelConfig(d_model=16, layer_pattern=f"{letter}-", vocab_size=23)
    m = cfg.mamba2
    m.d_state, m.headdim, m.chunk_size, m.expand = 8, 8, 4, 2
    t = cfg.titans
    t.n_heads, t.chunk_size, t.segment_len, t.window, t.memory_expansion, t.n_persistent = 2, 2, 4, 6, 2, 2
    cfg.atlas.omega_window = 3
    torch.manual_seed(0)
    layer = get_layer_spec(letter).build(cfg, 0).to(DT)
    with torch.no_grad():  # the stack's init is not applied to a bare layer: give every weight a scale
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def _run(layer, x, doc_ids, weight):  # type: ignore[no-untyped-def]
    y, state = layer(x, doc_ids=doc_ids, return_state=True)
    (y * weight).sum().backward()
    return y, state


def _count_received_bytes() -> list[int]:
    """Wrap chain.py's gather / reduce-scatter to add up the bytes this rank receives from the
    others: (N-1)/N of the full buffer (the gathered output, the reduce-scattered input)."""
    import torch.distributed as dist

    from hybrid_lm.train.context_parallel import chain

    total = [0]

    def counting(fn):  # type: ignore[no-untyped-def]
        def run(out, inp, *args, group=None, **kwargs):  # type: ignore[no-untyped-def]
            full = out if out.numel() > inp.numel() else inp
            n = dist.get_world_size(group)
            total[0] += full.numel() * full.element_size() * (n - 1) // n
            return fn(out, inp, *args, group=group, **kwargs)
        return run

    chain._all_gather, chain._reduce_scatter = counting(chain._all_gather), counting(chain._reduce_scatter)
    return total


def _worker(rank: int, world: int) -> list[str]:
    import torch.distributed as dist
    from torch.utils.checkpoint import checkpoint

    import hybrid_lm.train.context_parallel.memory  # noqa: F401  (registers the relay)
    from hybrid_lm.train.context_parallel import ContextParallel, cp_forward_for
    from hybrid_lm.train.context_parallel.mamba2 import mamba2_context_parallel
    from hybrid_lm.train.context_parallel.memory import relay_context_parallel

    dist.init_process_group("gloo")
    received = _count_received_bytes()
    groups = {2: [dist.new_group([0, 1]), dist.new_group([2, 3])], 4: [dist.new_group([0, 1, 2, 3])]}
    g = torch.Generator().manual_seed(3)
    x_full = torch.randn(B, T, 16, generator=g, dtype=DT)
    weight = torch.randn(B, T, 16, generator=g, dtype=DT)
    doc_full = torch.tensor(DOCS)
    worst: list[str] = []
    for letter in LETTERS:
        refs = {}
        for with_docs in (True, False) if letter in NO_DOCS else (True,):
            ref_layer = _layer(letter)
            x_ref = x_full.clone().requires_grad_()
            y_ref, s_ref = _run(ref_layer, x_ref, doc_full if with_docs else None, weight)
            refs[with_docs] = (y_ref, s_ref, x_ref.grad, {k: p.grad for k, p in ref_layer.named_parameters()})
        for size in (2, 4):
            group = groups[size][rank // size if size == 2 else 0]
            layouts = [("contiguous", False, True), ("zigzag", False, True)]
            layouts += [("zigzag", True, True)] * (letter in CHECKPOINTED) + [("zigzag", False, False)] * (
                letter in NO_DOCS and size == 4)
            if letter in FEWER:
                layouts = [("contiguous", False, True)] if size == 2 else [("zigzag", False, True)]
            for layout, checkpointed, with_docs in layouts:
                y_ref, s_ref, dx_ref, grads_ref = refs[with_docs]
                docs = doc_full if with_docs else None
                cp = ContextParallel(group, dist.get_rank(group), size, T, layout)  # type: ignore[arg-type]
                idx = torch.cat([torch.arange(a, b) for a, b in cp.slices()])
                layer = _layer(letter)
                x = x_full[:, idx].clone().requires_grad_()
                fn = mamba2_context_parallel if letter == "M" else relay_context_parallel
                assert cp_forward_for(layer) is not None
                before = received[0]
                if checkpointed:
                    y = checkpoint(lambda x_: fn(layer, x_, doc_ids=docs[:, idx], cp=cp)[0], x,
                                   use_reentrant=False)
                    state = None
                else:
                    y, state = fn(layer, x, doc_ids=None if docs is None else docs[:, idx], cp=cp, return_state=True)
                middle = received[0]
                (y * weight[:, idx]).sum().backward()
                sent = (middle - before, received[0] - middle)
                errs = {"y": (y - y_ref[:, idx]).abs().max(), "dx": (x.grad - dx_ref[:, idx]).abs().max()}
                for k, p in layer.named_parameters():
                    dist.all_reduce(p.grad, group=group)
                    errs[f"d{k}"] = (p.grad - grads_ref[k]).abs().max()
                if letter == "M" and not checkpointed:
                    from hybrid_lm.train.context_parallel.mamba2 import communicated_bytes

                    formula = communicated_bytes(layer, B, cp, DT, documents=with_docs)  # the docstring's
                    if sent != formula:
                        errs[f"bytes {sent} vs {formula}"] = torch.tensor(float("inf"))
                if state is not None:
                    for k, v in state.items():
                        if v.dtype.is_floating_point and v.numel():
                            errs[k] = (v - s_ref[k].to(v.dtype)).abs().max()
                        elif not v.dtype.is_floating_point and not torch.equal(v, s_ref[k]):
                            errs[k] = torch.tensor(float("inf"))
                last_holder = size - 1 if layout == "contiguous" else 0
                has_state = not checkpointed and (letter == "M" or cp.rank == last_holder)
                if has_state != (state is not None):
                    errs["state returned"] = torch.tensor(float("inf"))
                key, err = max(((k, float(e.detach())) for k, e in errs.items()), key=lambda kv: kv[1])
                tag = " checkpointed" * checkpointed + " no documents" * (not with_docs)
                worst.append(f"{letter} CP={size} {layout}{tag} rank {rank}: max error {err:.1e} ({key})")
    for pattern, count in STACKS.items():
        for size in (2, 4):
            group = groups[size][rank // size if size == 2 else 0]
            for layout in ("contiguous", "zigzag") if count == 4 else ("zigzag" if size == 2 else "contiguous",):
                cp = ContextParallel(group, dist.get_rank(group), size, T, layout)  # type: ignore[arg-type]
                err, key = _stack_case(pattern, cp)
                worst.append(f"{pattern} CP={size} {layout} rank {rank}: max error {err:.1e} ({key})")
    return worst


def _stack_case(pattern: str, cp) -> tuple[float, str]:  # type: ignore[no-untyped-def]
    import torch.distributed as dist
    from hybrid_lm.models.config import ModelConfig
    from hybrid_lm.models.hybrid import HybridLM
    from hybrid_lm.train.context_parallel.apply import apply_context_parallel, slice_batch
    from hybrid_lm.train.context_parallel.attention import local_positions

    def model() -> HybridLM:
        cfg = ModelConfig(vocab_size=32, d_model=16, layer_pattern=pattern)
        cfg.attention.n_heads, cfg.mamba2.d_state, cfg.mamba2.headdim, cfg.mamba2.chunk_size = 2, 4, 8, 4
        t = cfg.titans
        t.n_heads, t.chunk_size, t.window, t.memory_expansion, t.n_persistent = 2, 2, 6, 2, 2
        torch.manual_seed(0)
        return HybridLM(cfg).to(DT)

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 32, (B, T), generator=g)
    weight = torch.randn(B, T, 32, generator=g, dtype=DT)
    docs = torch.tensor(DOCS)
    start = torch.ones_like(docs, dtype=torch.bool)
    start[:, 1:] = docs[:, 1:] != docs[:, :-1]
    t_idx = torch.arange(T).expand(B, T)
    positions = t_idx - torch.where(start, t_idx, torch.zeros_like(t_idx)).cummax(dim=1).values
    ref = model()
    logits_ref = ref(ids, doc_ids=docs, position_ids=positions).logits
    (logits_ref * weight).sum().backward()
    cp_model = model()
    runtime = apply_context_parallel(cp_model, cp)
    local = slice_batch({"input_ids": ids, "doc_ids": docs, "position_ids": positions}, cp)
    with runtime.sharded():
        logits = cp_model(local["input_ids"], doc_ids=local["doc_ids"], position_ids=local["position_ids"]).logits
    pos = local_positions(cp)
    (logits * weight[:, pos]).sum().backward()  # a loss in fp64 (ContextParallelLoss runs its CE in fp32)
    errs = {"logits": float((logits - logits_ref[:, pos]).detach().abs().max())}
    for (k, p), p_ref in zip(cp_model.named_parameters(), ref.parameters()):
        dist.all_reduce(p.grad, group=cp.group)
        errs[f"d{k}"] = float((p.grad - p_ref.grad).abs().max())
    key = max(errs, key=errs.__getitem__)
    return errs[key], key


@pytest.mark.distributed
def test_recurrent_layers_context_parallel_equal_one_process() -> None:
    """Every case within 1e-10 of one process (observed: up to 6e-14)."""
    lines = [line for per_rank in run_distributed(_worker, world_size=4) for line in per_rank]
    bad = [line for line in lines if float(line.split("max error ")[1].split()[0]) > 1e-10]
    cases = (4 * (len(LETTERS) - len(FEWER)) + 2 * len(FEWER) + 2 * len(CHECKPOINTED) + len(NO_DOCS)
             + sum(STACKS.values()))
    assert len(lines) == 4 * cases and not bad, "\n".join(bad)
