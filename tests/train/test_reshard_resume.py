"""Model-parallel layouts and resuming across them (train/checkpoint/reshard.py): one run of 9 steps
continued from layout to layout, each segment's per-step losses and gradient norms those of the
uninterrupted one-process run.

    1 process (step 1) -> TP=2 x PP=2 (steps 2-4) -> DP=2 x TP=2, ZeRO-2 (5) -> DP=2 x PP=2, ZeRO-1 (6)
                               |                                      -> TP=2 x PP=2, ZeRO-1 (7)
                               +-> 1 process (steps 5-9)                      +-> 1 process (8-9)

The middle four run on 4 gloo ranks in one spawned group, the one-process runs in the test's own
process (a spawn costs tens of seconds of imports on a loaded 2-core machine). So TP=2 x PP=2
trains three steps like one process (and one more at ZeRO-1); TP1 -> TP2 and back, PP1 -> PP2 and
back, DP1 -> DP2 and back, TP2 x PP2 <-> TP1 x PP1 and ZeRO 0 -> 2 -> 1 -> 1 -> 0 are each crossed,
with weights, AdamW moments and step counts, trainer counters and the loader cursors (remapped by
SyntheticLoader when the data-parallel size changes) carried over; and the export of the TP x PP checkpoint is the
one-process model at the same step. The first TP x PP segment, and 3 more steps with an untied head,
compute the last stage's loss from the vocabulary-sharded logits: the logit all-gather is never
called in a training step (tensor_parallel._GatherLastDim counted). A Titans memory / ATLAS / Mamba-2 / MAC
model ("T-X-|M-C-") trains 3 steps at TP=2 x PP=2 like one process (issue 10's memory families). Every layout sees the same 4 sequences per step; 9 steps
schedule the LR of every segment alike. A segment's losses after its first step check the moments
it loaded (zeroing them on the ZeRO read or write side fails this test).

Tolerance: rel 1e-5 / abs 1e-6 on losses and norms, rtol 1e-4 / atol 1e-5 on exported weights,
the TP and PP parity tests' (test_tensor_parallel_training.py, test_pipeline.py): a row-parallel
projection sums two half-width matmuls in an all-reduce and the tied embedding's gradient is
summed between stages, another order of the same fp32 additions (~1e-7 relative per step), which
Adam's m / sqrt(v) can amplify for near-zero gradient entries, not to 1e-5 in a few steps. The
weights and moments themselves are moved exactly.
"""
import contextlib
import json
from pathlib import Path

import pytest
import torch

import synthetic

#: attention + MLP twice, tied head; 2 heads and the MLP split over 2 TP ranks, one pair per stage
MODEL = {"vocab_size": 64, "d_model": 32, "attention": {"n_heads": 2}, "mlp": {"hidden_size": 32}}
#: Titans memory (T) and ATLAS (X) on the first stage, Mamba-2 (M) and MAC (C) on the last, 1
#: memory head and 1 Mamba-2 group per TP rank; the tiny settings of test_tensor_parallel*.py
MEMORY = {"titans": {"n_heads": 2, "chunk_size": 4, "segment_len": 8, "window": 8, "n_persistent": 2,
                     "memory_expansion": 2},
          "atlas": {"omega_window": 2, "poly_degree": 2, "poly_form": "monomial", "optimizer": "momentum"},
          "mamba2": {"d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 8}}
MEMORY_PATTERN = "T-X-|M-C-"
LAYOUTS = {  # name: (parallel section, gradient accumulation, ZeRO stage): 4 sequences of micro-batch 2 per step
    "one": ({}, 2, 0),
    "tp2xpp2": ({"tensor_parallel": 2, "pipeline_parallel": 2, "pipeline_micro_batches": 2}, 1, 0),
    "tp2xpp2z1": ({"tensor_parallel": 2, "pipeline_parallel": 2, "pipeline_micro_batches": 2}, 1, 1),
    "dp2xtp2": ({"tensor_parallel": 2}, 1, 2),
    "dp2xpp2": ({"pipeline_parallel": 2, "pipeline_micro_batches": 1}, 1, 1),
}


def _run(root, name, layout, every=0, model=None, pattern="A-|A-", **train_extra):
    from hybrid_lm.train.config import job_config_from_dict
    from hybrid_lm.train.loop import train

    parallel, gas, zero = LAYOUTS[layout]
    # checkpoints only where a segment stops (and every 4 steps for the straight run: the export check)
    job = synthetic.job_dict(Path(root) / name, steps=9, gas=gas, zero_stage=zero, parallel=dict(parallel), train=train_extra,
                             checkpoint={"every": every, "keep": 3}, eval={"hooks": []})
    job["model"] = dict(MODEL, layer_pattern=pattern if "pp" in layout else pattern.replace("|", ""), **(model or {}))
    result = train(job_config_from_dict(job), make_loader=synthetic.factory())
    rows = [json.loads(line) for line in (Path(root) / name / "metrics.jsonl").read_text().splitlines()]
    return {"losses": result.losses, "tokens": result.state.tokens, "ckpt": str(result.checkpoint),
            "norms": {r["step"] - 1: r["train/grad_norm"] for r in rows if "train/grad_norm" in r}}


@contextlib.contextmanager
def _counting_logit_gathers():
    """Records the shapes of the TP logit all-gathers inside and outside the engine's training
    step, and of the logits the vocab-parallel loss gets."""
    from hybrid_lm.train import pipeline_engine
    from hybrid_lm.train import tensor_parallel as tpm

    counts = {"in_step": [], "outside": [], "loss_logits": []}
    real_gather, real_loss = tpm._GatherLastDim, tpm.vocab_parallel_loss
    real_step = pipeline_engine.PipelineEngine.forward_backward
    in_step = [False]

    class CountingGather:
        @staticmethod
        def apply(x, group):
            counts["in_step" if in_step[0] else "outside"].append(tuple(x.shape))
            return real_gather.apply(x, group)

    def spy_loss(logits, labels):
        counts["loss_logits"].append(tuple(logits.shape))
        return real_loss(logits, labels)

    def step(self, *args, **kwargs):
        in_step[0] = True
        try:
            return real_step(self, *args, **kwargs)
        finally:
            in_step[0] = False

    tpm._GatherLastDim, tpm.vocab_parallel_loss = CountingGather, spy_loss
    pipeline_engine.PipelineEngine.forward_backward = step
    try:
        yield counts
    finally:
        tpm._GatherLastDim, tpm.vocab_parallel_loss = real_gather, real_loss
        pipeline_engine.PipelineEngine.forward_backward = real_step


def _four_ranks(rank, world_size, root, start):
    from hybrid_lm.train.checkpoint import load_model_state
    from hybrid_lm.train.process_groups import DeepSpeedMPU, current_groups, destroy_process_groups

    with _counting_logit_gathers() as counts:
        out = {"tpxpp": _run(root, "tpxpp", "tp2xpp2", resume=start, stop_at=4)}
    out["gathers"] = counts
    mpu = DeepSpeedMPU(current_groups())
    out["mpu"] = (mpu.get_tensor_model_parallel_rank(), mpu.get_pipeline_model_parallel_rank(),
                  mpu.get_pipeline_model_parallel_world_size(), mpu.get_model_parallel_rank(),
                  mpu.get_model_parallel_world_size(), mpu.get_data_parallel_world_size())
    destroy_process_groups()  # megatron's groups are per degrees; one training per process does not need this
    out["dptp"] = _run(root, "dptp", "dp2xtp2", resume=out["tpxpp"]["ckpt"], stop_at=5)
    destroy_process_groups()
    out["dppp"] = _run(root, "dppp", "dp2xpp2", resume=out["dptp"]["ckpt"], stop_at=6)
    destroy_process_groups()
    out["tpxpp1"] = _run(root, "tpxpp1", "tp2xpp2z1", resume=out["dppp"]["ckpt"], stop_at=7)
    if rank == 0:
        out["weights"] = {k: v.numpy() for k, v in load_model_state(out["tpxpp"]["ckpt"]).state_dict.items()}
    destroy_process_groups()
    with _counting_logit_gathers() as counts:  # an untied head: a VocabParallelHead layer on the last stage
        out["untied"] = _run(root, "untied", "tp2xpp2", model={"tie_embeddings": False}, stop_at=3)
    out["untied_gathers"] = counts
    destroy_process_groups()
    out["memory"] = _run(root, "memory", "tp2xpp2", model=MEMORY, pattern=MEMORY_PATTERN, stop_at=3)
    return out


@pytest.mark.distributed
def test_runs_continue_across_tensor_pipeline_and_data_parallel_layouts(tmp_path):
    from distributed_utils import run_distributed

    from hybrid_lm.train.checkpoint import load_model_state

    ref = _run(tmp_path, "straight", "one", every=4)
    start = _run(tmp_path, "start", "one", stop_at=1)
    four = run_distributed(_four_ranks, 4, args=(str(tmp_path), start["ckpt"]), timeout_s=600)
    untied = _run(tmp_path, "untied1", "one", model={"tie_embeddings": False}, stop_at=3)
    memory = _run(tmp_path, "memory1", "one", model=MEMORY, pattern=MEMORY_PATTERN, stop_at=3)
    back = {"from_tpxpp": _run(tmp_path, "back1", "one", resume=four[0]["tpxpp"]["ckpt"]),
            "from_tpxpp1": _run(tmp_path, "back2", "one", resume=four[0]["tpxpp1"]["ckpt"])}
    assert sorted(ref["losses"]) == list(range(9)) and ref["losses"][8] < ref["losses"][0]
    assert ref["norms"][0] > 1.0  # clipping (grad_clip 1.0) acts
    segments = {"start": (start, [0]), "tpxpp": (four[0]["tpxpp"], [1, 2, 3]), "dptp": (four[0]["dptp"], [4]),
                "dppp": (four[0]["dppp"], [5]), "tpxpp1": (four[0]["tpxpp1"], [6]),
                "from_tpxpp": (back["from_tpxpp"], [4, 5, 6, 7, 8]), "from_tpxpp1": (back["from_tpxpp1"], [7, 8])}
    for name, (seg, steps) in segments.items():
        assert sorted(seg["losses"]) == steps, name
        for step in steps:
            assert seg["losses"][step] == pytest.approx(ref["losses"][step], rel=1e-5, abs=1e-6), (name, step)
            assert seg["norms"][step] == pytest.approx(ref["norms"][step], rel=1e-5), (name, step)
    # DeepSpeed's model-parallel group is tensor x pipeline: rank = stage * 2 + TP rank, as its grid says
    assert [r["mpu"] for r in four] == [(r % 2, r // 2, 2, r, 4, 1) for r in range(4)]
    # TP x PP: the last stage (ranks 2, 3) computes the loss from its (B, T, V/2) logits, 2 micro-batches
    # a step for 3 steps; the full logits are never gathered in the training step
    assert [r["gathers"]["in_step"] for r in four] == [[]] * 4
    assert [r["gathers"]["loss_logits"] for r in four] == [[]] * 2 + [[(2, 32, MODEL["vocab_size"] // 2)] * 6] * 2
    assert [r["untied_gathers"]["in_step"] for r in four] == [[]] * 4
    assert [len(r["untied_gathers"]["loss_logits"]) for r in four] == [0, 0, 6, 6]
    assert sorted(untied["losses"]) == [0, 1, 2] and untied["losses"] != {s: ref["losses"][s] for s in range(3)}
    for r in four:
        for step in range(3):
            assert r["untied"]["losses"][step] == pytest.approx(untied["losses"][step], rel=1e-5, abs=1e-6), step
    # the recurrent families (Titans, ATLAS, Mamba-2, MAC) at TP=2 x PP=2: losses and clipping norms of one process
    assert sorted(memory["losses"]) == [0, 1, 2] and memory["losses"][2] < memory["losses"][0]
    for r in four:
        for step in range(3):
            assert r["memory"]["losses"][step] == pytest.approx(memory["losses"][step], rel=1e-5, abs=1e-6), step
            assert r["memory"]["norms"][step] == pytest.approx(memory["norms"][step], rel=1e-5), step
    marker = json.loads((Path(four[0]["memory"]["ckpt"]) / "COMPLETE.json").read_text())
    assert marker["layout"] == {"pipeline_parallel": 2, "pipeline_stages": MEMORY_PATTERN, "tensor_parallel": 2}
    for key in ("tpxpp", "dptp", "dppp", "tpxpp1"):  # every rank logs the same global loss
        assert all(r[key]["losses"] == four[0][key]["losses"] for r in four), key
    # tokens: each pipeline's and TP group's losses counted once; the counters carry over
    assert four[0]["tpxpp"]["tokens"] == 4 * 128 and back["from_tpxpp1"]["tokens"] == 9 * 128
    marker = json.loads((Path(four[0]["tpxpp"]["ckpt"]) / "COMPLETE.json").read_text())
    assert marker["layout"] == {"pipeline_parallel": 2, "pipeline_stages": "A-|A-", "tensor_parallel": 2}
    # export of TP x PP: every (stage, TP rank)'s layer files re-assembled into the one-process model
    one = load_model_state(Path(ref["ckpt"]).with_name("step-0000004")).state_dict
    assert four[0]["weights"].keys() == one.keys()
    for name, value in one.items():
        torch.testing.assert_close(torch.from_numpy(four[0]["weights"][name]), value,
                                   rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_a_data_parallel_size_change_needs_a_loader_that_remaps_its_cursors():
    from hybrid_lm.train.checkpoint import CheckpointError
    from hybrid_lm.train.checkpoint.reshard import loader_state

    class ShardLoader:  # like data/loader.py's: no remap_state_dicts
        pass

    saved = [{"cursor": 3}, {"cursor": 3}]  # two old data ranks, after 3 batches each
    with pytest.raises(CheckpointError, match="saved with 2 data-parallel ranks; ShardLoader cannot remap"):
        loader_state(ShardLoader(), saved)
    assert loader_state(ShardLoader(), {"cursor": 3}) == {"cursor": 3}  # same size: this data rank's own
    assert loader_state(synthetic.SyntheticLoader("train", 0, 1), saved) == {"cursor": 6}
    assert loader_state(synthetic.SyntheticLoader("train", 1, 3), [{"cursor": 3}] * 2) == {"cursor": 2}
