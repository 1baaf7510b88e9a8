#!/usr/bin/env bash
# One node, N processes:   launch/torchrun.sh NPROC CONFIG [key.sub=value ...]
#   launch/torchrun.sh 8 configs/tiny.yaml train.steps=2000
# The trainer picks NCCL when CUDA is available and gloo otherwise, so the same line runs on a GPU
# box and on a CPU laptop. With MAX_RESTARTS > 0 torchrun restarts failed workers and the trainer
# resumes from the newest complete checkpoint (train.resume=auto is its default).
# --standalone: a private c10d rendezvous on a free local port, so several jobs can share a node.
# Environment: MAX_RESTARTS (default 0), TORCHRUN_ARGS (extra
# torchrun flags), PYTHON (default python3), HYBRID_LM_ENTRY (module and leading arguments every
# rank runs; default "hybrid_lm.cli train", since hybrid_lm.train.cli has no __main__ of its own).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NPROC CONFIG [key.sub=value ...]" >&2
  exit 2
fi
nproc=$1; shift
python=${PYTHON:-python3}
entry=${HYBRID_LM_ENTRY:-"hybrid_lm.cli train"}
# Workers otherwise share the agent's store, whose keys outlive a restart: the restarted ranks read
# the dead ranks' gloo/NCCL addresses and fail to connect. A fresh store per attempt avoids that.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# shellcheck disable=SC2086  # TORCHRUN_ARGS and entry are word lists on purpose
exec "$python" -m torch.distributed.run --standalone --nproc-per-node "$nproc" \
  --max-restarts "${MAX_RESTARTS:-0}" ${TORCHRUN_ARGS:-} -m $entry "$@"
