"""Tensor parallelism per layer family: communication volume (measured vs formula) and step time.

Run: ``python bench/bench_tensor_parallel.py`` (``--quick`` for small shapes). It spawns 2
processes itself (gloo on CPU; NCCL and one GPU per rank when CUDA is there).

What it reports, for attention ``A``, SwiGLU ``-``, Mamba-2 ``M``, Titans memory ``T`` and the
embedding/LM head ("stack"), at TP = 1 and 2:

1. **Communication volume per token per layer, measured.** ``torch.distributed.all_reduce`` /
   ``all_gather`` (what megatron-core's mappings and our ``_GatherLastDim`` / partial-gradient hooks
   call) are wrapped during one forward + backward and every call's payload is added up: for an
   all-reduce the tensor's bytes, for an all-gather the gathered output's bytes. Each call is
   attributed to the block (or the embedding/head) that issued it: forward pre-hooks set the owner
   in the forward pass; in the backward pass an identity autograd node on each block's output sets
   it when the gradient reaches that block (a block's backward completes before the gradient
   reaches the block below, so the attribution is exact). Figures are bytes / (B*T tokens * layers
   of that family); both ranks must count the same (checked). Payload, not wire bytes: a ring
   all-reduce moves 2(N-1)/N of the payload per rank, an all-gather (N-1)/N of its output.
2. **The formula** (``b`` bytes per element, ``d`` = d_model, ``V`` = vocab, N = TP size > 1;
   0 at N = 1, where no collective is issued). Megatron: forward, one all-reduce of the (B, T, d)
   activations per row-parallel output; backward, one all-reduce of the input gradient per
   column-parallel *input* (``copy_to_tensor_model_parallel_region``). Megatron fuses q/k/v into one
   column-parallel linear and gate/up into one (``linear_fc1``), so 2 b d per token per layer for
   attention and MLP alike. Ours (``train/tensor_parallel.py`` and the plans in
   ``models/*/tp_plan.py``) wraps every column-parallel ``nn.Linear`` separately, so each one that
   reads the same input all-reduces its own copy of the input gradient:

   ====== ================================================ ==============================
   family forward / backward all-reduces of (B, T, d)      bytes per token per layer
   ====== ================================================ ==============================
   ``A``  1 (``o_proj``) / 3 (``q_proj``, ``k_proj``,       4 b d   (Megatron: 2 b d)
          ``v_proj``)
   ``-``  1 (``down_proj``) / 2 (``gate_proj``, ``up_proj``) 3 b d   (Megatron: 2 b d)
   ``M``  1 (``out_proj``) / 1 (fused ``in_proj``)          2 b d   (as Megatron's MambaMixer)
   ``T``  1 (``out_proj``) / 3 (``qkv``, ``gates``,         4 b d + b P / (B T)
          ``gate_proj``)
   stack embedding 1 all-reduce, logits 1 all-gather of     2 b d + b V
          (B, T, V) / head input gradient 1 all-reduce
   ====== ================================================ ==============================

   ``P`` = elements of the replicated per-head parameters whose gradients are summed over the
   ranks once per backward (``partial_grad`` in the plan: the memory's output RMSNorm weight,
   d_head, plus the polynomial coefficients when ATLAS features are on): a per-step constant, tiny
   per token. The stack's ``b V`` is the all-gathered full logits (megatron's vocab-parallel
   cross-entropy, which would avoid it, is not used yet: train/README.md, Tensor parallelism).
   Fusing q/k/v and gate/up (or one ``copy_to`` per distinct input) would bring ``A`` and ``-`` to
   Megatron's 2 b d. The "Megatron" column prints that layout: 2 b d per layer, and for the stack
   2 b d + 3 b (its vocab-parallel cross-entropy all-reduces three (B, T) fp32 tensors instead of
   gathering the logits).
3. **Step time TP=2 / TP=1 at equal global batch**: the same B sequences per step, one process
   with the full model (the other rank waits in a barrier) vs two processes holding half of it
   each, one intra-op thread per process; forward + backward + a ``torch.optim.AdamW`` step (no
   DeepSpeed, whose overhead is bench_engine.py's), the two layouts' steps alternating so that
   load from other jobs hits both alike; medians. Beside it, the part of the TP=2 step rank 0
   spent inside collectives (waiting for the other rank included). As elsewhere in bench/, only this ratio within
   one run holds on a shared CPU, not the absolute times.
4. **On a GPU** (CUDA present, 2 devices): the same steps in bf16 autocast on NCCL, plus tokens/s
   (B*T / median step) and MFU = 3 * flops_per_token * tokens/s / (N * peak) with the peaks of
   ``train/metrics.py`` (the loop's convention).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import time
import traceback
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.distributed as dist

FAMILIES = {"A": "attention", "-": "SwiGLU MLP", "M": "Mamba-2", "T": "Titans memory"}


def shapes(quick: bool, cuda: bool) -> dict[str, Any]:
    if cuda:
        return dict(d_model=1024, vocab=32768, batch=8, seq=2048, layers=4, steps=10, heads=16)
    if quick:
        return dict(d_model=128, vocab=512, batch=2, seq=128, layers=2, steps=5, heads=4)
    return dict(d_model=256, vocab=2048, batch=4, seq=256, layers=2, steps=9, heads=4)


def model_config(letter: str, s: dict[str, Any]) -> Any:
    from hybrid_lm.models.config import ModelConfig
    from hybrid_lm.typed_config import from_dict

    extra: dict[str, Any] = {}
    if letter == "A":
        extra["attention"] = dict(n_heads=s["heads"], n_kv_heads=s["heads"] // 2)
    elif letter == "M":  # ngroups 2: the common ngroups=1 cannot be split (models/mamba2/tp_plan.py)
        extra["mamba2"] = dict(d_state=16, headdim=32, ngroups=2, chunk_size=64)
    elif letter == "T":
        extra["titans"] = dict(n_heads=s["heads"], chunk_size=16, segment_len=64, window=64)
    return from_dict(ModelConfig, dict(vocab_size=s["vocab"], d_model=s["d_model"],
                                       layer_pattern=letter * s["layers"], **extra))


def formula_bytes_per_token(owner: str, model: Any, s: dict[str, Any], tp: int, elem: int) -> float:
    """The docstring's table: payload bytes per token per layer (owner = a letter or "stack")."""
    if tp == 1:
        return 0.0
    d, tokens = s["d_model"], s["batch"] * s["seq"]
    if owner == "stack":
        return elem * (2 * d + s["vocab"])
    if owner == "T":
        mem = model.blocks[0].layer
        p = mem.out_norm.weight.numel() + (mem.features.coeffs.numel() if mem.features is not None else 0)
        return elem * (4 * d + p / tokens)
    return elem * {"A": 4, "-": 3, "M": 2}[owner] * d


def megatron_bytes_per_token(owner: str, s: dict[str, Any], tp: int, elem: int) -> float:
    """Megatron's layout for comparison: fused qkv and fc1, so 2 b d for every family; the
    stack with its vocab-parallel cross-entropy (no gathered logits: 3 all-reduces of (B, T)
    floats, max, sum-exp and target logit) instead of the b V all-gather."""
    if tp == 1:
        return 0.0
    return elem * (2 * s["d_model"] + (3 if owner == "stack" else 0))


class _Owner(torch.autograd.Function):
    """Identity; its backward names the block whose gradient the next collectives belong to."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counter: "CommCounter", owner: str) -> torch.Tensor:  # type: ignore[override]
        ctx.counter, ctx.owner = counter, owner
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        ctx.counter.owner = ctx.owner
        return grad, None, None


class CommCounter:
    """Payload bytes of every all-reduce / all-gather, by the module that issued it."""

    def __init__(self) -> None:
        self.owner = "?"
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.seconds = 0.0  # wall time inside the collectives (waiting for the other rank included)

    def add(self, nbytes: int) -> None:
        self.bytes[self.owner] = self.bytes.get(self.owner, 0) + nbytes
        self.calls[self.owner] = self.calls.get(self.owner, 0) + 1

    def attach(self, model: Any) -> list[Any]:
        def set_owner(owner: str) -> Any:
            def pre(module: Any, args: Any) -> None:
                self.owner = owner
            return pre

        def tag_output(owner: str) -> Any:
            def post(module: Any, args: Any, out: Any) -> Any:
                if isinstance(out, tuple):  # a block: (x, state)
                    return (_Owner.apply(out[0], self, owner), *out[1:])
                return _Owner.apply(out, self, owner)
            return post

        handles = [model.embed.register_forward_pre_hook(set_owner("stack")),
                   model.lm_head.register_forward_pre_hook(set_owner("stack")),
                   model.lm_head.register_forward_hook(tag_output("stack"))]
        for block in model.blocks:
            handles += [block.register_forward_pre_hook(set_owner(block.letter)),
                        block.register_forward_hook(tag_output(block.letter))]
        return handles

    @contextmanager
    def counting(self) -> Iterator[None]:
        real_reduce, real_gather = dist.all_reduce, dist.all_gather

        def all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.add(tensor.numel() * tensor.element_size())
            t0 = time.perf_counter()
            try:
                return real_reduce(tensor, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        def all_gather(out: list[torch.Tensor], tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.add(sum(t.numel() * t.element_size() for t in out))
            t0 = time.perf_counter()
            try:
                return real_gather(out, tensor, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        dist.all_reduce, dist.all_gather = all_reduce, all_gather  # megatron calls torch.distributed.all_reduce
        try:
            yield
        finally:
            dist.all_reduce, dist.all_gather = real_reduce, real_gather


def batch(s: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=g)
    return {"input_ids": ids.to(device), "labels": torch.roll(ids, -1, dims=1).to(device)}


def measure_comm(model: Any, inputs: dict[str, torch.Tensor]) -> tuple[dict[str, int], dict[str, int]]:
    """(bytes, calls) by owner over one forward + backward."""
    counter = CommCounter()
    handles = counter.attach(model)
    with counter.counting():
        model(**inputs).loss.backward()
    for h in handles:
        h.remove()
    model.zero_grad(set_to_none=True)
    return counter.bytes, counter.calls


def make_step(model: Any, inputs: dict[str, torch.Tensor], cuda: bool) -> Any:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
    return step


def run_family(letter: str, s: dict[str, Any], groups: Any, device: torch.device, cuda: bool) -> dict[str, Any]:
    import copy

    from hybrid_lm.models.hybrid import HybridLM
    from hybrid_lm.train.tensor_parallel import apply_tensor_parallel

    rank = dist.get_rank()
    torch.manual_seed(0)
    full = HybridLM(model_config(letter, s))
    split = apply_tensor_parallel(copy.deepcopy(full), groups).to(device)
    full = full.to(device)
    inputs = batch(s, device)
    out: dict[str, Any] = {"flops_per_token": full.flops_per_token(s["seq"])}
    out["comm"], out["calls"] = {}, {}
    out["comm"][2], out["calls"][2] = measure_comm(split, inputs)
    if rank == 0:
        out["comm"][1], out["calls"][1] = measure_comm(full, inputs)
    elem = out["elem"] = next(full.parameters()).element_size()
    out["formula"] = {tp: {o: formula_bytes_per_token(o, full, s, tp, elem) for o in (letter, "stack")} for tp in (1, 2)}

    full_step, split_step = make_step(full, inputs, cuda), make_step(split, inputs, cuda)
    times: dict[int, list[float]] = {1: [], 2: []}
    in_comm: list[float] = []
    timer = CommCounter()
    for i in range(s["steps"] + 2):  # the first two of each: warm-up
        dist.barrier()
        if rank == 0:
            t0 = time.perf_counter()
            full_step()
            times[1].append(time.perf_counter() - t0)
        dist.barrier()  # rank 1 waits here while rank 0 runs the 1-process step
        timer.seconds = 0.0
        t0 = time.perf_counter()
        with timer.counting():
            split_step()
        dist.barrier()
        times[2].append(time.perf_counter() - t0)
        in_comm.append(timer.seconds)
    out["time"] = {tp: statistics.median(t[2:]) for tp, t in times.items() if t}
    out["in_comm"] = statistics.median(in_comm[2:])
    return out


def worker(rank: int, world: int, port: int, quick: bool, queue: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    try:
        from hybrid_lm.train.distributed import init_distributed
        from hybrid_lm.train.process_groups import init_process_groups

        info = init_distributed()
        groups = init_process_groups(tensor_parallel=world)
        cuda = info.device.type == "cuda"
        s = shapes(quick, cuda)
        results = {letter: run_family(letter, s, groups, info.device, cuda) for letter in FAMILIES}
        queue.put((rank, True, {"shapes": s, "cuda": cuda, "device": str(info.device), "results": results}))
    except BaseException:  # noqa: BLE001 - the parent prints it
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(world: int, quick: bool) -> list[dict[str, Any]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, world, port, quick, queue)) for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    for _ in range(world):
        rank, ok, value = queue.get(timeout=3600)
        if not ok:
            for p in procs:
                p.kill()
            raise SystemExit(f"rank {rank} failed:\n{value}")
        out[rank] = value
    for p in procs:
        p.join()
    return [out[r] for r in range(world)]


def report(ranks: list[dict[str, Any]]) -> None:
    first = ranks[0]
    s, cuda = first["shapes"], first["cuda"]
    tokens = s["batch"] * s["seq"]
    print(f"shapes {s}; {'bf16 autocast, NCCL, ' + first['device'] if cuda else 'fp32, gloo, CPU, 1 thread/process'}")
    print("\ncommunication per token per layer (payload bytes; measured in one forward + backward)")
    print(f"{'family':<16} {'TP':>2} {'measured':>10} {'formula':>10} {'Megatron':>9} {'calls/layer':>11}")
    stack_seen: set[float] = set()
    for letter, name in FAMILIES.items():
        res = first["results"][letter]
        for other in ranks[1:]:
            if other["results"][letter]["comm"][2] != res["comm"][2]:
                raise SystemExit(f"{name}: ranks counted different bytes: {res['comm'][2]} vs {other['results'][letter]['comm'][2]}")
        for tp in (1, 2):
            comm = res["comm"][tp]
            unknown = set(comm) - {letter, "stack"}
            if unknown:
                raise SystemExit(f"{name} TP={tp}: collectives not attributed to a layer: {unknown}")
            rows = [(f"{letter} {name}", letter, s["layers"])]
            if tp == 2 or letter == "A":
                rows.append(("stack (emb+head)", "stack", 1))
            for label, owner, n in rows:
                measured = comm.get(owner, 0) / (tokens * n)
                formula = res["formula"][tp][owner]
                if owner == "stack":
                    if tp == 2 and measured in stack_seen:
                        continue  # same in every family's model: print it once
                    stack_seen.add(measured)
                flag = "" if abs(measured - formula) <= 1e-9 * max(formula, 1) else "  MISMATCH"
                megatron = megatron_bytes_per_token(owner, s, tp, res["elem"])
                calls = res["calls"][tp].get(owner, 0) / n
                print(f"{label:<16} {tp:>2} {measured:10.1f} {formula:10.1f} {megatron:9.1f} {calls:11g}{flag}")
    print("\nstep time (forward + backward + AdamW), equal global batch; medians")
    header = f"{'family':<16} {'TP=1 ms':>9} {'TP=2 ms':>9} {'TP2/TP1':>8} {'TP=2 in comm':>13}"
    if cuda:
        header += f" {'tok/s TP1':>10} {'tok/s TP2':>10} {'MFU TP1':>8} {'MFU TP2':>8}"
    print(header)
    for letter, name in FAMILIES.items():
        res = first["results"][letter]
        t1, t2 = res["time"][1], res["time"][2]
        line = (f"{letter + ' ' + name:<16} {t1 * 1e3:9.1f} {t2 * 1e3:9.1f} {t2 / t1:8.2f} "
                f"{res['in_comm'] * 1e3:10.1f} ms")
        if cuda:
            from hybrid_lm.train.metrics import mfu, peak_flops

            peak = peak_flops(torch.device("cuda", 0))
            train_flops = 3 * res["flops_per_token"]
            rates = {tp: tokens / res["time"][tp] for tp in (1, 2)}
            mfus = {tp: mfu(train_flops, rates[tp] / tp, peak) for tp in (1, 2)}
            line += f" {rates[1]:10.0f} {rates[2]:10.0f}" + "".join(
                f" {m:8.3f}" if m is not None else f" {'n/a':>8}" for m in mfus.values())
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small CPU shapes (a smoke run)")
    args = parser.parse_args()
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        raise SystemExit(f"bench_tensor_parallel: TP=2 needs 2 GPUs, found {torch.cuda.device_count()} "
                         "(CUDA_VISIBLE_DEVICES= runs the CPU path)")
    report(spawn(2, args.quick))


if __name__ == "__main__":
    main()
