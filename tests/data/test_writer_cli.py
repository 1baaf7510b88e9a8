"""Shard writer determinism and the ``hybrid-lm data`` CLI end to end on a tiny stdlib slice."""
from __future__ import annotations

import io
import itertools
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from hybrid_lm.data.corpus import iter_documents
from hybrid_lm.data.loader import build_loader
from hybrid_lm.data.manifest import load_manifest
from hybrid_lm.data.tokenizer import Tokenizer
from hybrid_lm.data.writer import BATCH_PER_WORKER, build_shards, encode_parallel


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "hybrid_lm.cli", "data", *args], capture_output=True, text=True,
                          timeout=120)


def test_output_identical_for_any_worker_count(tmp_path):
    kw = dict(max_docs=40, shard_tokens=50_000, val_fraction=0.1, progress=False)
    a = build_shards("stdlib", tmp_path / "a", workers=1, **kw)
    b = build_shards("stdlib", tmp_path / "b", workers=2, **kw)
    assert a["splits"] == b["splits"]  # names, counts and sha256 of every shard


def test_encoding_reads_the_corpus_lazily():
    """The writer streams: before the first document comes back, at most two batches of texts
    have been read from the corpus, whatever its size (a list of all documents would not fit for a
    pretraining corpus), and the order is the input order."""
    tok = Tokenizer.from_spec("byte")
    for workers in (1, 2):
        read = []

        def corpus():
            for i in range(10 * 2 * BATCH_PER_WORKER):
                read.append(i)
                yield f"doc {i}"

        out = encode_parallel(tok, corpus(), workers)
        text, first = next(out)
        assert len(read) <= 2 * workers * BATCH_PER_WORKER  # two batches in flight at most
        assert text == tok.decode(first[:-1].tolist()) == "doc 0"
        assert [(t, tok.decode(ids[:-1].tolist())) for t, ids in itertools.islice(out, 3)] == [
            ("doc 1", "doc 1"), ("doc 2", "doc 2"), ("doc 3", "doc 3")]
        assert sum(1 for _ in out) == len(read) - 4 == 10 * 2 * BATCH_PER_WORKER - 4  # nothing lost at batch edges


def test_samples_hold_documents(tmp_path):
    m = build_shards("stdlib", tmp_path, max_docs=12, shard_tokens=10**9, val_fraction=0.0, progress=False)
    docs = list(iter_documents("stdlib", max_docs=12))
    tok = Tokenizer.load(tmp_path)
    entry = m["splits"]["train"]["shards"][0]
    with tarfile.open(tmp_path / entry["name"]) as tar:
        npys = [n for n in tar.getnames() if n.endswith(".tokens.npy")]
        key = npys[0][: -len(".tokens.npy")]
        tokens = np.load(io.BytesIO(tar.extractfile(npys[0]).read()))
        doc_id = int(tar.extractfile(f"{key}.doc_id").read())
        source = tar.extractfile(f"{key}.source").read().decode()
    assert tokens.dtype == np.uint16 and tokens[-1] == tok.eos_id
    assert tok.decode(tokens[:-1]) == docs[doc_id].text and source == docs[doc_id].source
    assert m["totals"]["docs"] == 12 and sum(entry["sample_tokens"]) == entry["tokens"]


@pytest.mark.slow
def test_cli_build_inspect_and_train_loader(tmp_path):
    out = tmp_path / "shards"
    r = _cli("build", "--input", "stdlib", "--out", str(out), "--max-docs", "30", "--shard-tokens", "40000",
             "--val-fraction", "0.2", "--workers", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["tokenizer"]["vocab_size"] == 258 and m["totals"]["docs"] == 30
    assert m["splits"]["train"]["docs"] + m["splits"]["val"]["docs"] == 30 and m["splits"]["val"]["docs"] > 0
    r = _cli("inspect", str(out))
    assert r.returncode == 0 and "checksums: OK" in r.stdout, r.stdout + r.stderr
    # refuses to overwrite without --force, in one line naming the file
    r = _cli("build", "--out", str(out), "--max-docs", "5", "--quiet")
    assert r.returncode == 1 and "manifest.json already exists" in r.stderr and "Traceback" not in r.stderr
    # what the training engine does with it
    from hybrid_lm.data.config import DataConfig
    from hybrid_lm.data.loader import tokenizer_path

    cfg = DataConfig(path=str(out), seq_len=64, micro_batch_size=4, expected_vocab_size=258)
    assert tokenizer_path(cfg).is_file()
    batch = next(iter(build_loader(cfg, "train", 0, 1)))
    assert batch["input_ids"].shape == (4, 64) and int(batch["input_ids"].max()) < 258
    # a corrupted shard is reported by inspect
    shard = out / m["splits"]["train"]["shards"][0]["name"]
    shard.write_bytes(shard.read_bytes()[:-1024])
    r = _cli("inspect", str(out))
    assert r.returncode == 1 and shard.name in r.stdout


@pytest.mark.slow
def test_cli_bpe_from_jsonl(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) for i in range(200)))
    out = tmp_path / "bpe"
    r = _cli("build", "--input", str(corpus), "--out", str(out), "--tokenizer", "bpe", "--vocab-size", "300",
             "--val-fraction", "0.1", "--quiet")
    assert r.returncode == 0, r.stderr
    m = load_manifest(str(out))
    tok = Tokenizer.load(out)
    assert m["tokenizer"]["fingerprint"] == tok.fingerprint() and m["tokenizer"]["vocab_size"] == tok.vocab_size
    # reusing the saved tokenizer.json gives the same tokens
    r = _cli("build", "--input", str(corpus), "--out", str(tmp_path / "again"), "--tokenizer",
             str(out / "tokenizer.json"), "--val-fraction", "0.1", "--quiet")
    assert r.returncode == 0, r.stderr
    assert load_manifest(str(tmp_path / "again"))["splits"] == m["splits"]


def test_glob_and_folder_inputs(tmp_path):
    (tmp_path / "txt" / "sub").mkdir(parents=True)
    (tmp_path / "txt" / "b.txt").write_text("second")
    (tmp_path / "txt" / "sub" / "a.txt").write_text("first ✓")
    (tmp_path / "txt" / "bin.dat").write_bytes(b"\x00\x01binary")
    docs = list(iter_documents(str(tmp_path / "txt")))
    assert [d.source for d in docs] == ["b.txt", "sub/a.txt"]
    assert [d.text for d in iter_documents(str(tmp_path / "txt" / "**" / "*.txt"))] == ["second", "first ✓"]
    assert len(list(iter_documents("stdlib", max_bytes=1))) == 1


def test_pipe_urls_read_like_local_files(tmp_path, synthetic, cfg_for):
    path, _ = synthetic([30] * 50, shard_tokens=300)
    local = list(itertools.islice(iter(build_loader(cfg_for(path), "train", 0, 1)), 6))
    piped = list(itertools.islice(iter(build_loader(cfg_for(f"pipe:cat {path}"), "train", 0, 1)), 6))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(local, piped) for k in a)


@pytest.mark.parametrize("docs, fraction, advice", [
    (5, 0.01, "--val-fraction 0.5"),  # 5 documents: 1% of them rounds to none
    (5, 0.0, "eval.hooks=[]"),
])
def test_empty_val_split_is_reported_at_build_time(tmp_path, capsys, docs, fraction, advice):
    """Every eval reads the val split, so an empty one must be said at build time, with what to
    change, not discovered by the first eval of a training run."""
    from hybrid_lm.cli import main as cli_main
    from hybrid_lm.data.errors import DataWarning

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"doc {i} " * 20}) for i in range(docs)))
    with pytest.warns(DataWarning, match=rf"the val split is empty \({docs} documents, val_fraction={fraction}\)"):
        m = build_shards(str(corpus), tmp_path / "api", val_fraction=fraction, progress=False)
    assert m["splits"]["val"]["docs"] == 0
    assert cli_main(["data", "build", "--input", str(corpus), "--out", str(tmp_path / "cli"),
                     "--val-fraction", str(fraction), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("hybrid-lm data: WARNING: ") and advice in err and err.count("\n") == 1, err


def test_no_warning_when_the_val_split_has_documents(tmp_path):
    import warnings

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"doc {i} " * 20}) for i in range(40)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = build_shards(str(corpus), tmp_path / "out", val_fraction=0.5, progress=False)
    assert m["splits"]["val"]["docs"] > 0
