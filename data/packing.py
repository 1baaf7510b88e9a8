"""Packing a token stream into fixed-length rows: the batch contract of the training engine.

A batch is a dict of int64 tensors, each (B, T):

* ``input_ids``    the tokens, documents packed back to back (each ends with eos);
* ``labels``       the next token of the *same* document, else -100 (the eos of a document, whose
                   next token starts another document, and padding). A row's last token is
                   labelled with the first token of the next row when that continues the same
                   document: the model sees no more context than usual, and no target is wasted;
* ``position_ids`` offset from the start of the token's segment, where a segment starts at each
                   document start *and at column 0*: a document that continues from the previous
                   row restarts at 0, because the row cannot attend to the part it does not hold
                   and positions stay < T (safe for bounded position tables);
* ``doc_ids``      row-local segment index (0, 1, 2, ...), incremented at every segment start,
                   so tokens of different documents never share an id within a row. Padding forms
                   its own final segment.

Padding (``pad_id``, label -100) only appears when a reader runs out of tokens before its batch
quota (the validation split's last batch, or after a skipped bad shard).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

IGNORE = -100


def pack_rows(pieces: Sequence[tuple[np.ndarray, bool]], lookahead: Optional[tuple[int, bool]],
              batch: int, seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Build one (B, T) batch from consecutive stream pieces.

    pieces: ``(tokens (n,), starts_document)`` in stream order, ``sum(n) <= B*T``; a piece is part
    of one document and ``starts_document`` says whether its first token is that document's first.
    lookahead: ``(token, starts_document)`` of the next stream token after the batch, or None.
    """
    n = batch * seq_len
    flat = np.full(n + 1, pad_id, dtype=np.int64)
    # doc_start marks a document's first token; the extra slot holds the lookahead token
    doc_start = np.zeros(n + 1, dtype=bool)
    is_pad = np.ones(n + 1, dtype=bool)
    pos = 0
    for tokens, starts in pieces:
        k = len(tokens)
        flat[pos:pos + k] = tokens
        is_pad[pos:pos + k] = False
        doc_start[pos] = starts
        pos += k
    if pos < n:
        doc_start[pos] = True  # padding is one segment of its own
    elif lookahead is not None:
        flat[n], doc_start[n], is_pad[n] = lookahead[0], lookahead[1], False

    labels = flat[1:].copy()
    labels[doc_start[1:] | is_pad[1:] | is_pad[:-1]] = IGNORE
    ids = flat[:n].reshape(batch, seq_len)
    seg_start = doc_start[:n].reshape(batch, seq_len).copy()
    seg_start[:, 0] = True
    cols = np.broadcast_to(np.arange(seq_len), (batch, seq_len))
    last_start = np.maximum.accumulate(np.where(seg_start, cols, 0), axis=1)
    return {
        "input_ids": torch.from_numpy(ids.copy()),
        "labels": torch.from_numpy(labels.reshape(batch, seq_len)),
        "position_ids": torch.from_numpy((cols - last_start).astype(np.int64)),
        "doc_ids": torch.from_numpy(np.cumsum(seg_start, axis=1, dtype=np.int64) - 1),
    }
