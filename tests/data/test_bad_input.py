"""Bad shards are skipped and counted or raised by name; start-up problems fail with one clear message."""
from __future__ import annotations

import itertools
import json
import warnings

import numpy as np
import pytest

from hybrid_lm.data.errors import DataError
from hybrid_lm.data.loader import build_loader
from hybrid_lm.data.manifest import load_manifest
from hybrid_lm.data.writer import build_shards


@pytest.fixture
def broken(synthetic):
    path, _ = synthetic([40] * 60, shard_tokens=400)
    name = load_manifest(str(path))["splits"]["train"]["shards"][2]["name"]
    raw = (path / name).read_bytes()
    (path / name).write_bytes(raw[: len(raw) // 2 + 100])  # truncated mid-member
    return path, name


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_shard_is_skipped_and_counted(broken, cfg_for, workers):
    path, name = broken
    loader = build_loader(cfg_for(path, num_workers=workers), "train", 0, 1)
    n = loader.batches_per_epoch(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(itertools.islice(iter(loader), n))
    assert len(batches) == n  # the quota is kept (padding) so ranks stay in step
    assert loader.stats["bad_shards"] == 1 and loader.stats["bad_shard_names"] == [name]
    assert loader.stats["padded_rows"] > 0
    if workers == 0:  # worker processes' warnings go to their stderr
        assert any(name in str(w.message) for w in caught)


def test_truncated_shard_raises_when_asked(broken, cfg_for):
    path, name = broken
    loader = build_loader(cfg_for(path, bad_shard_policy="raise"), "train", 0, 1)
    with pytest.raises(DataError, match=name):
        list(itertools.islice(iter(loader), loader.batches_per_epoch(0)))


def test_corrupt_bytes_caught_by_checksum(synthetic, cfg_for):
    path, _ = synthetic([40] * 30, shard_tokens=400)
    entry = load_manifest(str(path))["splits"]["train"]["shards"][0]
    raw = bytearray((path / entry["name"]).read_bytes())
    raw[600] ^= 0xFF  # inside the first .npy payload: the tar still parses
    (path / entry["name"]).write_bytes(bytes(raw))
    loader = build_loader(cfg_for(path, verify_checksums=True, bad_shard_policy="raise"), "train", 0, 1)
    with pytest.raises(DataError, match=f"{entry['name']}.*sha256"):
        list(itertools.islice(iter(loader), loader.batches_per_epoch(0)))


def test_missing_manifest(tmp_path, cfg_for):
    with pytest.raises(DataError, match=f"no shard manifest at {tmp_path / 'manifest.json'}"):
        build_loader(cfg_for(tmp_path), "train", 0, 1)


def test_tokenizer_mismatch_names_both_values(synthetic, cfg_for):
    path, _ = synthetic([40] * 30, shard_tokens=400)
    with pytest.raises(DataError, match=r"manifest.json says vocab_size=258 .* expected_vocab_size=512"):
        build_loader(cfg_for(path, expected_vocab_size=512), "train", 0, 1)
    fp = load_manifest(str(path))["tokenizer"]["fingerprint"]
    with pytest.raises(DataError, match=f"fingerprint={fp} .*tokenizer_fingerprint=abc"):
        build_loader(cfg_for(path, tokenizer_fingerprint="abc"), "train", 0, 1)
    build_loader(cfg_for(path, expected_vocab_size=258, tokenizer_fingerprint=fp), "train", 0, 1)


def _swap_tokenizer(path):
    """Replace the shards' tokenizer.json by another tokenizer (a BPE over 270 ids)."""
    from hybrid_lm.data.tokenizer import Tokenizer

    other = Tokenizer.train(["def f(x): return x", "class A: pass"] * 20, vocab_size=270)
    other.save(path)
    return other


def test_swapped_tokenizer_json_fails_at_start_up(synthetic, cfg_for):
    # the default check: nothing in the config pins the tokenizer
    path, _ = synthetic([40] * 30, shard_tokens=400)
    recorded = load_manifest(str(path))["tokenizer"]["fingerprint"]
    other = _swap_tokenizer(path)
    expect = (rf"{path / 'manifest.json'} says .*fingerprint={recorded} vocab_size=258, but "
              rf"{path / 'tokenizer.json'} has fingerprint={other.fingerprint()} vocab_size={other.vocab_size}")
    for split in ("train", "val"):
        with pytest.raises(DataError, match=expect):
            build_loader(cfg_for(path), split, 0, 1)
    # pins add requirements, they do not excuse the file: matching pins still fail on it
    with pytest.raises(DataError, match=expect):
        build_loader(cfg_for(path, expected_vocab_size=258, tokenizer_fingerprint=recorded), "train", 0, 1)


def test_training_start_up_checks_the_tokenizer_file_before_the_model(synthetic):
    from hybrid_lm.models.config import ModelConfig
    from hybrid_lm.train.build import check_tokenizer_fits, tokenizer_file
    from hybrid_lm.data.config import DataConfig

    path, _ = synthetic([40] * 30, shard_tokens=400)
    tok = tokenizer_file(DataConfig(path=str(path)))
    check_tokenizer_fits(ModelConfig(vocab_size=258), tok)  # the shards' own tokenizer: fine
    _swap_tokenizer(path)
    with pytest.raises(DataError, match=r"tokenizer mismatch: .*manifest.json says .* but .*tokenizer.json has"):
        check_tokenizer_fits(ModelConfig(vocab_size=512), tok)


def test_without_a_tokenizer_file_the_manifest_vocab_must_fit_the_model(synthetic):
    from hybrid_lm.models.config import ModelConfig
    from hybrid_lm.train.build import check_tokenizer_fits
    from hybrid_lm.typed_config import ConfigError

    path, _ = synthetic([40] * 30, shard_tokens=400)
    (path / "tokenizer.json").unlink()
    check_tokenizer_fits(ModelConfig(vocab_size=258), None, data_dir=path)
    with pytest.raises(ConfigError, match=r"model.vocab_size: 200 is smaller than the tokenizer's 258 ids .*manifest.json"):
        check_tokenizer_fits(ModelConfig(vocab_size=200), None, data_dir=path)


def test_reserialized_tokenizer_json_is_the_same_tokenizer(synthetic, cfg_for):
    # only the bytes differ (indentation, key order): the canonical fingerprint still matches
    path, _ = synthetic([40] * 30, shard_tokens=400)
    tok_file = path / "tokenizer.json"
    data = json.loads(tok_file.read_text(encoding="utf-8"))
    tok_file.write_text(json.dumps(dict(reversed(list(data.items()))), indent=2), encoding="utf-8")
    assert build_loader(cfg_for(path), "train", 0, 1).batches_per_epoch(0) > 0


def test_missing_tokenizer_json_is_not_a_start_up_error(synthetic, cfg_for):
    # the loader needs only the manifest and shards; the pins still apply
    path, _ = synthetic([40] * 30, shard_tokens=400)
    (path / "tokenizer.json").unlink()
    build_loader(cfg_for(path), "train", 0, 1)
    with pytest.raises(DataError, match="expected_vocab_size=512"):
        build_loader(cfg_for(path, expected_vocab_size=512), "train", 0, 1)


def test_empty_corpus_and_too_small_split(tmp_path, synthetic, cfg_for):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no non-empty documents"):
        build_shards(str(tmp_path / "empty"), tmp_path / "out", progress=False)
    path, _ = synthetic([10] * 3, shard_tokens=400)
    with pytest.raises(DataError, match="one batch for each of 4 readers"):
        build_loader(cfg_for(path), "train", 0, 4)


def test_existing_output_needs_force(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"doc {i} " * 20}) for i in range(20)))
    out = tmp_path / "out"
    build_shards(str(corpus), out, progress=False, val_fraction=0.2)
    with pytest.raises(DataError, match="already exists"):
        build_shards(str(corpus), out, progress=False)
    m = build_shards(str(corpus), out, progress=False, force=True, shard_tokens=100)
    on_disk = sorted(p.name for p in out.glob("*.tar"))
    assert on_disk == sorted(s["name"] for sp in m["splits"].values() for s in sp["shards"])
    assert not list(out.glob(".tmp-*"))


def test_jsonl_line_that_is_not_utf8_is_refused_naming_file_and_line(tmp_path, capsys):
    """Like a line that is not JSON: the build stops with one line naming ``file:line`` (it used to
    die in the text decoder with a traceback, at a line number the decoder's read-ahead hid)."""
    from hybrid_lm.cli import main as cli_main

    corpus = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": f"doc {i} " * 20}).encode() for i in range(6)]
    lines[3] = b'{"text": "caf\xe9 au lait"}'  # latin-1, as some scrapes are
    corpus.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=r"c\.jsonl:4: not UTF-8 \(byte 0xe9 at column 14\)"):
        build_shards(str(corpus), tmp_path / "out", progress=False)
    assert cli_main(["data", "build", "--input", str(corpus), "--out", str(tmp_path / "out2"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "c.jsonl:4: not UTF-8" in err and "Traceback" not in err, err
    assert not (tmp_path / "out2" / "manifest.json").exists()
