"""Context parallelism in the training loop (``loop.build_engine``): 2 gloo ranks at
``parallel.context_parallel=2`` (one sequence split over both, data parallel 1) train like one
process: the same step losses, gradient norms and token counts for 3 steps through DeepSpeed.

The reference runs in the same spawn as plain data parallelism over the same 2 ranks with one row
each: the synthetic loader shards by global sample index, so 2 ranks x 1 row read exactly the one
process's 2-row batches, and with no ignored labels the mean of the two rows' means is the batch
mean (DP = one process is what the ZeRO parity tests hold). It runs first: DeepSpeed keeps the
first engine's mpu process-wide.

Rows hold three documents (one crossing the slice boundaries, one reusing an id) with positions
restarting per document, as the loader writes them. Tolerance: fp32, rel 1e-5 on losses and norms
(the one-process run sums the same token losses in another order, and an attention row's softmax
runs over another key layout); the checkpointed weights (``load_model_state``, what export and
eval read) at rtol 1e-4 / atol 1e-5, as the tensor-parallel tests: Adam's m / sqrt(v) turns tiny
gradient differences of near-zero entries into update differences of a fraction of lr.
"""
import json
from pathlib import Path

import pytest
import torch

import synthetic

pytestmark = pytest.mark.distributed

#: (pattern, layout, attention scheme, ZeRO stage): each run also covers one layout / scheme / stage
RUNS = [
    ("A-", "contiguous", "allgather", 0),
    ("M-A-", "zigzag", "ulysses", 2),  # Mamba-2's exact state passing (context_parallel/mamba2.py) with attention
    # the memory relay (context_parallel/memory.py) with MAG's window attention: its gradients must become
    # ready in the same order on both ranks for ZeRO-2's buckets, and its documents are segments (ids 0, 1, 0)
    ("G-", "contiguous", "allgather", 2),
]


def _with_documents(loader):
    """SyntheticLoader rows cut into documents [0, 5), [5, 20), [20, 32) with ids 0, 1, 0."""
    inner = iter(loader)

    def gen():
        for batch in inner:
            docs = batch["doc_ids"].clone()
            docs[:, 5:20] = 1
            pos = batch["position_ids"].clone()
            pos[:, 5:20] -= 5
            pos[:, 20:] -= 20
            yield {**batch, "doc_ids": docs, "position_ids": pos}

    class Loader:
        def __iter__(self):
            return gen()

        state_dict, load_state_dict = loader.state_dict, loader.load_state_dict

    return Loader()


def _factory(batch_size):
    base = synthetic.factory(batch_size=batch_size)
    return lambda split, rank, world: _with_documents(base(split, rank, world))


def _job(run_dir, cp, pattern, layout="contiguous", scheme="allgather", zero=0):
    job = synthetic.job_dict(run_dir, steps=3, zero_stage=zero, parallel={
        "context_parallel": cp, "context_parallel_layout": layout, "context_parallel_attention": scheme})
    if cp == 1:
        job["data"]["micro_batch_size"] = 1  # one row per rank: the data parallel reference (docstring)
    job["model"] = {"vocab_size": 64, "d_model": 32, "layer_pattern": pattern, "attention": {"n_heads": 4, "n_kv_heads": 2},
                    "mlp": {"hidden_size": 48}, "mamba2": {"d_state": 8, "headdim": 16, "chunk_size": 8}}
    return job


def _metric(run_dir, key):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def _worker(rank, world_size, root):
    from hybrid_lm.train.config import job_config_from_dict
    from hybrid_lm.train.loop import train

    from hybrid_lm.train.checkpoint import load_model_state

    def run(name, *args):
        run_dir = Path(root) / name
        job = _job(run_dir, *args)
        result = train(job_config_from_dict(job), make_loader=_factory(job["data"]["micro_batch_size"]))
        marker = json.loads((Path(result.checkpoint) / "COMPLETE.json").read_text())
        weights = load_model_state(result.checkpoint).state_dict if rank == 0 else {}
        return {"losses": result.losses, "layout": marker.get("layout"),
                "weights": {k: v.numpy() for k, v in weights.items()},
                "norms": _metric(run_dir, "train/grad_norm") if rank == 0 else None,
                "tokens": _metric(run_dir, "train/tokens") if rank == 0 else None}

    refs = {pattern: run(f"ref-{pattern}", 1, pattern) for pattern in dict.fromkeys(r[0] for r in RUNS)}
    return refs, [run(f"cp-{i}", 2, *r) for i, r in enumerate(RUNS)]


def test_two_context_parallel_ranks_train_like_one_process(tmp_path):
    from distributed_utils import run_distributed

    (refs, cp0), (_, cp1) = run_distributed(_worker, 2, args=(str(tmp_path),), timeout_s=600)
    for run, p0, p1 in zip(RUNS, cp0, cp1):
        ref = refs[run[0]]
        assert sorted(ref["losses"]) == [0, 1, 2]
        assert p0["losses"] == p1["losses"], run  # both CP ranks log the same global loss
        for step, loss in ref["losses"].items():
            assert p0["losses"][step] == pytest.approx(loss, rel=1e-5), (run, step)
        assert p0["norms"] == pytest.approx(ref["norms"], rel=1e-5), run
        assert p0["tokens"] == ref["tokens"] == [64, 128, 192], run  # one batch of 2 x 32 per step, counted once
        assert p0["layout"] == {"context_parallel": 2} and ref["layout"] is None, run
        # the checkpoint holds one copy of the weights, read like a data-parallel one (export, eval)
        assert p0["weights"].keys() == ref["weights"].keys()
        for name, value in ref["weights"].items():
            torch.testing.assert_close(torch.from_numpy(p0["weights"][name]), torch.from_numpy(value),
                                       rtol=1e-4, atol=1e-5, msg=lambda m: f"{run} {name}: {m}")
