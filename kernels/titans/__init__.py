"""Neural long-term memory kernels (Titans / ATLAS): the chunked parallel update and its oracle.

* ``memory_mlp``  the memory network M_W as pure functions of its weights, with analytic
  per-token gradients of the inner (associative) loss.
* ``scan``        stable log-space segment sums that turn the momentum / decay recurrences into
  lower-triangular matmuls inside a chunk.
* ``chunked``     the training form: per chunk, all gradients at the chunk-start weights, two scans,
  per-token retrieval (read-after-write).
* ``reference``   the token-by-token loop with the same mini-batch rule; the test oracle only.
"""
from hybrid_lm.kernels.titans.chunked import chunked_memory_update, prepare_gates
from hybrid_lm.kernels.titans.memory_mlp import memory_dims, memory_forward, memory_grads

__all__ = ["chunked_memory_update", "prepare_gates", "memory_dims", "memory_forward", "memory_grads"]
