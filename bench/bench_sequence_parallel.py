"""Sequence parallelism: activation memory per rank at TP=2 with and without ``parallel.sequence_parallel``.

Run: ``python bench/bench_sequence_parallel.py`` (``--quick``: T=256). It spawns 2 gloo processes
(CPU, one intra-op thread each), builds the same seeded ``M-A-M-A-`` model on both, splits it with
``apply_tensor_parallel`` (and ``apply_sequence_parallel``), and measures one training forward +
backward (the engine's ``VocabParallelLoss``) per layout:

1. **Accounting of the activations kept for backward** during the forward
   (``torch.autograd.graph.saved_tensors_hooks``; each storage counted once, by its size;
   parameters left out), split by where they are saved: the *stream* (embedding, block norms'
   inputs, final norm, between the layers: what sequence parallelism splits), *inside* the blocks'
   layers (their activations on their head shard, unchanged by SP: each layer still reads the
   whole sequence) and the *head + loss*. Expected stream: per block the norm keeps its input and
   its (B, T, 1) rstd; plain TP keeps them for all T tokens on every rank, SP for T/N.
2. **Peak memory growth** of that forward + backward, the resident high-water mark
   (``bench/peak_memory.py``), max over the ranks, after a warm-up step.

What sequence parallelism does not shrink here: the gathered layer input g (B, T, D) that a layer's
column-parallel linears keep for their weight gradient. Megatron keeps only the T/N slice and
all-gathers it again in backward; ours keeps g (inside-layer figure).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

D_MODEL, VOCAB, BATCH = 256, 2048, 2


def _model() -> Any:
    from hybrid_lm.models.config import ModelConfig
    from hybrid_lm.models.hybrid import HybridLM
    from hybrid_lm.typed_config import from_dict

    torch.manual_seed(0)
    return HybridLM(from_dict(ModelConfig, dict(
        vocab_size=VOCAB, d_model=D_MODEL, layer_pattern="M-A-M-A-", attention=dict(n_heads=4),
        mamba2=dict(d_state=16, headdim=32, ngroups=2, chunk_size=64))))


def saved_bytes(model: Any, step: Any) -> dict[str, int]:
    """Bytes of the activations saved for backward during ``step()``'s forward (parameters left
    out), by where they were saved: "stream" (embedding to final norm, outside the layers),
    "inside" (in a block's layer), "head" (LM head and loss)."""
    where = ["stream"]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[str, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and key not in params and storage.nbytes():
            seen[key] = (where[-1], storage.nbytes())
        return t

    def enter(name: str) -> Any:
        return lambda *_: where.append(name)

    def leave(*_: Any) -> None:
        where.pop()

    hooks = [model.lm_head.register_forward_pre_hook(enter("head"))]  # the loss follows the head
    for block in model.blocks:
        hooks.append(block.layer.register_forward_pre_hook(enter("inside")))
        hooks.append(block.layer.register_forward_hook(leave))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    for h in hooks:
        h.remove()
    out = {"stream": 0, "inside": 0, "head": 0}
    for kind, size in seen.values():
        out[kind] += size
    return out


def measure(rank: int, seq: int, sequence_parallel: bool) -> dict[str, int]:
    from peak_memory import hwm_growth

    from hybrid_lm.train.process_groups import current_groups
    from hybrid_lm.train.sequence_parallel import apply_sequence_parallel
    from hybrid_lm.train.tensor_parallel import VocabParallelLoss, apply_tensor_parallel

    groups = current_groups()
    model = apply_tensor_parallel(_model(), groups)
    if sequence_parallel:
        apply_sequence_parallel(model, groups)
    loss = VocabParallelLoss(model)
    ids = torch.randint(0, VOCAB, (BATCH, seq), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, dims=1)

    def step() -> None:
        loss(model, ids, labels=labels).backward()

    step()
    model.zero_grad(set_to_none=False)  # gradients stay allocated: only activations grow below
    out = saved_bytes(model, step)
    out["peak"] = hwm_growth(step)
    return out


def _worker(rank: int, port: int, seq: int, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        from hybrid_lm.train.distributed import init_distributed
        from hybrid_lm.train.process_groups import init_process_groups

        init_distributed()
        init_process_groups(tensor_parallel=2)
        queue.put((rank, {mode: measure(rank, seq, mode == "sp") for mode in ("tp", "sp")}))
    except BaseException:  # noqa: BLE001 - the parent prints it
        queue.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="seq_len 256")
    args = parser.parse_args()
    seq = 256 if args.quick else args.seq_len
    # a fixed mmap threshold: glibc otherwise raises it when the warm-up step frees its blocks and
    # serves the measured step from the retained heap, so the high-water mark would not grow
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 16))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, port, seq, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=1800) for _ in range(2))
    for p in procs:
        p.join()
    for r, value in results.items():
        if isinstance(value, str):
            raise RuntimeError(f"rank {r}:\n{value}")
    stream = BATCH * seq * D_MODEL * 4
    print(f"M-A-M-A-, d_model {D_MODEL}, vocab {VOCAB}, B={BATCH}, T={seq}, fp32, TP=2 on 2 gloo ranks; "
          f"one (B, T, D) fp32 activation = {stream / 2**20:.2f} MiB")
    print(f"{'layout':>8} {'stream MiB':>11} {'(x B T D)':>10} {'inside layers MiB':>18} {'head+loss MiB':>14} "
          f"{'peak MiB':>9}")
    for mode in ("tp", "sp"):
        rows = [results[r][mode] for r in range(2)]
        stream_b, ins, head, peak = (max(r[k] for r in rows) for k in ("stream", "inside", "head", "peak"))
        print(f"{'TP' if mode == 'tp' else 'TP+SP':>8} {stream_b / 2**20:>11.2f} {stream_b / stream:>10.2f} "
              f"{ins / 2**20:>18.2f} {head / 2**20:>14.2f} {peak / 2**20:>9.1f}")

if __name__ == "__main__":
    main()
