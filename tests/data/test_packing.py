"""The batch contract: boundaries, position ids, labels and segment ids."""
from __future__ import annotations

import numpy as np
import torch

from hybrid_lm.data.packing import IGNORE, pack_rows

PAD = 257


def test_boundaries_positions_labels_segments():
    # doc A = 1..5 (given in two pieces), doc B = 10..14 continues into the next batch; B = 2, T = 5
    a, b = np.array([1, 2, 3, 4, 5]), np.array([10, 11, 12, 13, 14])
    out = pack_rows([(a[:3], True), (a[3:], False), (b, True)], (15, False), batch=2, seq_len=5, pad_id=PAD)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5], [10, 11, 12, 13, 14]]
    # row 0 is one doc; its last token's next token (10) starts doc B -> -100
    assert out["labels"][0].tolist() == [2, 3, 4, 5, IGNORE]
    # row 1 ends mid-document: the last label is the lookahead token of the same document
    assert out["labels"][1].tolist() == [11, 12, 13, 14, 15]
    for k in ("input_ids", "labels", "position_ids", "doc_ids"):
        assert out[k].dtype == torch.int64 and out[k].shape == (2, 5)
    # a lookahead that starts a new document is not a label
    out = pack_rows([(a, True), (b, True)], (20, True), batch=2, seq_len=5, pad_id=PAD)
    assert out["labels"][1, -1].item() == IGNORE


def test_position_ids_restart_and_segments_change():
    pieces = [(np.array([5, 6, 256]), False), (np.array([7, 8, 9, 256]), True), (np.array([1, 2, 3]), True)]
    out = pack_rows(pieces, (4, False), batch=2, seq_len=5, pad_id=PAD)
    ids, pos, seg, lab = (out[k].tolist() for k in ("input_ids", "position_ids", "doc_ids", "labels"))
    assert ids == [[5, 6, 256, 7, 8], [9, 256, 1, 2, 3]]
    # row 1 starts mid-document: positions restart at 0 at the row start (documented rule)
    assert pos == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert seg == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]
    assert lab == [[6, 256, IGNORE, 8, 9], [256, IGNORE, 2, 3, 4]]
    # no label ever points into a different segment of the same row
    for r in range(2):
        for t in range(4):
            if lab[r][t] != IGNORE:
                assert seg[r][t] == seg[r][t + 1] and lab[r][t] == ids[r][t + 1]


def test_padding_is_ignored_and_own_segment():
    out = pack_rows([(np.array([1, 2, 256]), True)], None, batch=1, seq_len=6, pad_id=PAD)
    assert out["input_ids"].tolist() == [[1, 2, 256, PAD, PAD, PAD]]
    assert out["labels"].tolist() == [[2, 256, IGNORE, IGNORE, IGNORE, IGNORE]]
    assert out["doc_ids"].tolist() == [[0, 0, 0, 1, 1, 1]]


def test_end_of_stream_last_label_ignored():
    out = pack_rows([(np.array([1, 2, 3, 4]), True)], None, batch=1, seq_len=4, pad_id=PAD)
    assert out["labels"].tolist() == [[2, 3, 4, IGNORE]]
