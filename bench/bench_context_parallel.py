"""Context parallelism: peak activation memory per rank at CP = 1, 2, 4, and the bytes one attention
layer communicates, measured from the collectives vs the formula.

Run: ``python bench/bench_context_parallel.py`` (``--quick`` for a short sequence). It spawns 1, 2
and 4 gloo processes itself (CPU; one intra-op thread each).

1. **Peak activation memory per rank** for one training forward + backward of a fixed sequence
   (``--seq-len``, default 4096; B = 1; an ``A-A-`` stack, d_model 128, 4 query / 2 kv heads,
   packed documents of 512 tokens) through ``apply_context_parallel`` + ``ContextParallelLoss``
   (the trainer's path), after one warm-up step. The figure is the growth of the process's
   resident high-water mark (``bench/peak_memory.py``: every CPU allocation, freed intermediates
   included), max over the ranks; CP = 1 is the plain model on the whole sequence. On a GPU it
   would be ``torch.cuda.max_memory_allocated``; this script measures the CPU path only.
   Expected: activations scale with T/N except the all-gathered K/V (2 KV d T per attention layer)
   and, for the all-gather scheme, the (T/N) x T masked score rows, so the ratio falls short of
   1/N by those terms.
2. **Communicated bytes per attention layer and rank** (forward, backward), for both schemes
   (``train/context_parallel/attention.py``), with ``e`` = 4 bytes (fp32), B rows, T tokens, N
   ranks, H query / KV kv-heads of dim d, 8 = one int64 document id:

   ========== =============================================== ========================================
   scheme     forward                                         backward
   ========== =============================================== ========================================
   allgather  (N-1)/N * B*T * (2*KV*d*e + 8)                   (N-1)/N * B*T * 2*KV*d*e (reduce-scatter)
   ulysses    (N-1)/N * B*(T/N)*d*e * (2H + 2KV') +           (N-1)/N * B*(T/N)*d*e * (2H + 2KV')
              (N-1)/N * B*T*8                                  (KV' = KV if N | KV else H)
   ========== =============================================== ========================================

   Measured: ``dist.all_gather_single`` / ``reduce_scatter_single`` / ``all_to_all_single`` (and
   their pre-2.13 names) are wrapped while one layer runs its CP forward, then its backward; each
   call adds the bytes this rank receives: (N-1)/N of the gathered (or scattered) buffer, the
   part that comes from (or goes to) the other ranks.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

D_MODEL, HEADS, KV_HEADS, DOC_LEN, VOCAB = 128, 4, 2, 512, 256
COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_single", "reduce_scatter_tensor",
               "all_to_all_single")


def formula(scheme: str, n: int, batch: int, seq: int, elem: int = 4) -> tuple[float, float]:
    """(forward, backward) bytes per attention layer and rank (module docstring)."""
    d = D_MODEL // HEADS
    frac = (n - 1) / n
    if scheme == "allgather":
        kv = batch * seq * 2 * KV_HEADS * d * elem
        return frac * (kv + batch * seq * 8), frac * kv
    kv_heads = KV_HEADS if KV_HEADS % n == 0 else HEADS
    moved = frac * batch * (seq // n) * d * elem * (2 * HEADS + 2 * kv_heads)
    return moved + frac * batch * seq * 8, moved


class Counter:
    def __init__(self) -> None:
        self.bytes = 0

    @contextmanager
    def counting(self) -> Iterator[None]:
        saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

        def wrap(name: str, fn: Any) -> Any:
            def call(output: torch.Tensor, input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                group = kwargs.get("group")
                n = dist.get_world_size(group)
                whole = output if name.startswith("all_gather") else input  # the N-part buffer
                self.bytes += whole.numel() * whole.element_size() * (n - 1) // n
                return fn(output, input, *args, **kwargs)
            return call

        for name, fn in saved.items():
            setattr(dist, name, wrap(name, fn))
        try:
            yield
        finally:
            for name, fn in saved.items():
                setattr(dist, name, fn)


def _docs(batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.arange(seq)
    return (t // DOC_LEN).expand(batch, seq).contiguous(), (t % DOC_LEN).expand(batch, seq).contiguous()


def _model(seq: int) -> Any:
    from hybrid_lm.models.config import ModelConfig
    from hybrid_lm.models.hybrid import HybridLM
    from hybrid_lm.typed_config import from_dict

    torch.manual_seed(0)
    return HybridLM(from_dict(ModelConfig, dict(vocab_size=VOCAB, d_model=D_MODEL, layer_pattern="A-A-",
                                                attention=dict(n_heads=HEADS, n_kv_heads=KV_HEADS))))


def peak_memory(rank: int, n: int, seq: int, scheme: str) -> int:
    from peak_memory import hwm_growth

    from hybrid_lm.train.context_parallel import ContextParallel
    from hybrid_lm.train.context_parallel.apply import ContextParallelLoss, apply_context_parallel

    model = _model(seq)
    batch = 1
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))
    doc_ids, pos = _docs(batch, seq)
    if n == 1:
        def step() -> None:
            model(ids, labels=ids, doc_ids=doc_ids, position_ids=pos).loss.backward()
    else:
        runtime = apply_context_parallel(model, ContextParallel(dist.group.WORLD, rank, n, seq, "zigzag"), attention=scheme)
        loss = ContextParallelLoss(runtime)

        def step() -> None:
            loss(model, ids, labels=ids, doc_ids=doc_ids, position_ids=pos).backward()
    step()
    model.zero_grad(set_to_none=False)  # gradients stay allocated: only activations grow below
    return hwm_growth(step)


def layer_bytes(rank: int, n: int, seq: int, scheme: str) -> tuple[int, int]:
    from hybrid_lm.models.attention.layer import Attention
    from hybrid_lm.train.context_parallel import ContextParallel
    from hybrid_lm.train.context_parallel.attention import attention_forward, local_positions

    cp = ContextParallel(dist.group.WORLD, rank, n, seq, "zigzag")
    layer = Attention(D_MODEL, HEADS, n_kv_heads=KV_HEADS)
    local = local_positions(cp)
    doc_ids, pos = _docs(1, seq)
    x = torch.randn(1, len(local), D_MODEL, requires_grad=True)
    fwd, bwd = Counter(), Counter()
    with fwd.counting():
        y = attention_forward(scheme)(layer, x, doc_ids=doc_ids[:, local], position_ids=pos[:, local], cp=cp)
    with bwd.counting():
        y.sum().backward()
    return fwd.bytes, bwd.bytes


def _worker(rank: int, n: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=n)
        out: dict[str, Any] = {}
        for scheme in ("allgather", "ulysses"):
            if n > 1 or scheme == "allgather":
                out[f"peak/{scheme}"] = peak_memory(rank, n, args.seq_len, scheme)
            if n > 1:
                out[f"bytes/{scheme}"] = layer_bytes(rank, n, args.seq_len, scheme)
        queue.put((rank, out))
    except BaseException:  # noqa: BLE001 - the parent prints it
        queue.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(n: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, n, port, args, queue)) for r in range(n)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=1800) for _ in range(n))
    for p in procs:
        p.join()
    for r, value in results.items():
        if isinstance(value, str):
            raise RuntimeError(f"CP={n} rank {r}:\n{value}")
    return [results[r] for r in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--quick", action="store_true", help="seq_len 1024")
    args = parser.parse_args()
    if args.quick:
        args.seq_len = 1024
    seq = args.seq_len
    print(f"A-A- stack, d_model {D_MODEL}, {HEADS} heads / {KV_HEADS} kv, B=1, T={seq}, documents of {DOC_LEN}, "
          f"zigzag layout, fp32, gloo on CPU")
    results = {n: run(n, args) for n in (1, 2, 4)}
    base = max(r["peak/allgather"] for r in results[1])
    print("\npeak activation memory per rank (max over ranks), forward + backward")
    print(f"{'CP':>3} {'scheme':>10} {'MiB':>9} {'vs CP=1':>8} {'1/N':>6}")
    for n, ranks in results.items():
        for scheme in ("allgather", "ulysses"):
            key = f"peak/{scheme}"
            if key in ranks[0]:
                peak = max(r[key] for r in ranks)
                label = scheme if n > 1 else "(none)"
                print(f"{n:>3} {label:>10} {peak / 2**20:>9.1f} {peak / base:>8.2f} {1 / n:>6.2f}")
    print("\nbytes per attention layer and rank: measured (max over ranks) vs formula")
    print(f"{'CP':>3} {'scheme':>10} {'fwd measured':>13} {'fwd formula':>12} {'bwd measured':>13} {'bwd formula':>12}")
    ok = True
    for n, ranks in results.items():
        for scheme in ("allgather", "ulysses"):
            key = f"bytes/{scheme}"
            if key not in ranks[0]:
                continue
            fwd, bwd = max(r[key][0] for r in ranks), max(r[key][1] for r in ranks)
            f_fwd, f_bwd = formula(scheme, n, 1, seq)
            ok &= fwd == f_fwd and bwd == f_bwd
            print(f"{n:>3} {scheme:>10} {fwd:>13,} {f_fwd:>12,.0f} {bwd:>13,} {f_bwd:>12,.0f}")
    print("\nmeasured == formula" if ok else "\nMISMATCH between measured bytes and the formula")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
