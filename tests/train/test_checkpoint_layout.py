"""The on-disk checkpoint contract without a model: markers, checksums, fallback, purge, latest."""
from pathlib import Path

import pytest

from hybrid_lm.train.checkpoint import layout


def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    ckpt = root / layout.step_dir_name(step)
    (ckpt / "ds").mkdir(parents=True)
    (ckpt / "ds" / "model.pt").write_bytes(bytes(range(256)) * 4)
    (ckpt / "trainer.json").write_text(f'{{"step": {step}}}')
    if complete:
        layout.write_marker(ckpt, {"step": step, "world_size": 1, "zero_stage": 0})
        layout.update_latest(root, ckpt)
    return ckpt


def test_verify_names_the_corrupted_file(tmp_path):
    ckpt = _fake_checkpoint(tmp_path, 10)
    assert layout.verify(ckpt)["step"] == 10
    target = ckpt / "ds" / "model.pt"
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(layout.CheckpointError, match=r"ds/model.pt: sha256 mismatch"):
        layout.verify(ckpt)


def test_truncated_file_and_missing_marker_are_rejected(tmp_path):
    ckpt = _fake_checkpoint(tmp_path, 10)
    (ckpt / "ds" / "model.pt").write_bytes(b"short")
    with pytest.raises(layout.CheckpointError, match="model.pt"):
        layout.verify(ckpt)
    unfinished = _fake_checkpoint(tmp_path, 20, complete=False)
    with pytest.raises(layout.CheckpointError, match="no COMPLETE.json"):
        layout.verify(unfinished)


def test_newest_complete_falls_back_and_reports(tmp_path, capsys):
    _fake_checkpoint(tmp_path, 10)
    newest = _fake_checkpoint(tmp_path, 20)
    (newest / "trainer.json").write_text('{"step": 21}')
    _fake_checkpoint(tmp_path, 30, complete=False)
    (tmp_path / "step-0000040.tmp").mkdir()
    assert layout.newest_complete(tmp_path).name == "step-0000010"
    err = capsys.readouterr().err
    assert "step-0000030" in err and "no COMPLETE.json" in err
    assert "step-0000020" in err and "trainer.json: sha256 mismatch" in err
    assert layout.resolve_checkpoint(tmp_path.parent / tmp_path.name).name == "step-0000010"


def test_purge_keeps_newest_complete_and_latest_points_to_it(tmp_path):
    for step in (10, 20, 30):
        _fake_checkpoint(tmp_path, step)
    _fake_checkpoint(tmp_path, 25, complete=False)
    (tmp_path / "step-0000040.tmp").mkdir()
    layout.purge(tmp_path, keep=0)  # asks for nothing, still keeps the newest complete
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step-0000030"]
    assert (tmp_path / "latest").read_text().strip() == "step-0000030"


def test_extra_unlisted_file_is_rejected(tmp_path):
    ckpt = _fake_checkpoint(tmp_path, 10)
    (ckpt / "intruder.bin").write_bytes(b"x")
    with pytest.raises(layout.CheckpointError, match="intruder.bin: file not listed"):
        layout.verify(ckpt)
