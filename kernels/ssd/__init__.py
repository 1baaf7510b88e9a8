"""Mamba-2 SSD kernels: the chunked PyTorch form and its sequential oracle.

* ``chunked.ssd_chunked``       training/prefill form, linear in L, documents via explicit masks.
* ``reference.ssd_sequential``  token-by-token recurrence; tests and benchmarks only.

The mamba_ssm Triton kernels are used from ``models/mamba2`` when installed and on CUDA.
"""
from hybrid_lm.kernels.ssd.chunked import segsum, ssd_chunked
from hybrid_lm.kernels.ssd.reference import segment_index, ssd_sequential

__all__ = ["segsum", "ssd_chunked", "segment_index", "ssd_sequential"]
