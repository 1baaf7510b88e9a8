"""kernels/ssd/carry.py: an initial state's contribution, added afterwards, equals running the
chunked scan from that state (outputs and final state, with documents), in fp64."""
import pytest
import torch

from hybrid_lm.kernels.ssd import ssd_chunked
from hybrid_lm.kernels.ssd.carry import carried_decay, carried_output

DOCS = {
    "one-doc": None,
    "docs": [[0] * 9 + [1] * 20 + [2] * 8, [5] * 37],
    "starts-at-0": [[3] * 37, [1] * 1 + [2] * 36],
}


@pytest.mark.parametrize("docs", list(DOCS.values()), ids=list(DOCS))
def test_zero_state_plus_carried_term_equals_scan_from_state(docs):
    g = torch.Generator().manual_seed(0)
    b, length, heads, hdim, groups, n = 2, 37, 4, 3, 2, 5
    x = torch.randn(b, length, heads, hdim, generator=g, dtype=torch.float64)
    dt = torch.nn.functional.softplus(torch.randn(b, length, heads, generator=g, dtype=torch.float64) - 1)
    A = -torch.rand(heads, generator=g, dtype=torch.float64) - 0.1
    B = torch.randn(b, length, groups, n, generator=g, dtype=torch.float64)
    C = torch.randn(b, length, groups, n, generator=g, dtype=torch.float64)
    s0 = torch.randn(b, heads, hdim, n, generator=g, dtype=torch.float64)
    doc_ids = None if docs is None else torch.tensor(docs)
    y, final = ssd_chunked(x, dt, A, B, C, 8, initial_state=s0, doc_ids=doc_ids, return_final_state=True)
    y0, final0 = ssd_chunked(x, dt, A, B, C, 8, doc_ids=doc_ids, return_final_state=True)
    through, total = carried_decay(dt, A, doc_ids)
    torch.testing.assert_close(y0 + carried_output(C, through, s0), y, rtol=0, atol=1e-12)
    torch.testing.assert_close(final0 + total[..., None, None] * s0, final, rtol=0, atol=1e-12)
    if doc_ids is not None:  # a row that starts a document inside the call carries nothing past it
        inside = (doc_ids[:, 1:] != doc_ids[:, :-1]).any(dim=1)
        assert ((total == 0).all(dim=1) == inside).all()
