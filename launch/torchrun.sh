#!/usr/bin/env bash
# One node, N processes:   launch/torchrun.sh NPROC CONFIG [key.sub=value ...]
#   launch/torchrun.sh 8 configs/tiny.yaml train.steps=2000
# The trainer picks NCCL when CUDA is available and gloo otherwise, so the same line runs on a
# GPU box and on a CPU laptop. Training restarts from the newest complete checkpoint when torchrun
# restarts it (train.resume=auto is the default). HYBRID_LM_ENTRY replaces the python module run
# by every rank (tests use it; default: the hybrid-lm CLI's train command).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NPROC CONFIG [key.sub=value ...]" >&2
  exit 2
fi
nproc=$1; shift
python=${PYTHON:-python3}
entry=${HYBRID_LM_ENTRY:-"hybrid_lm.cli train"}
port=${MASTER_PORT:-$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
# shellcheck disable=SC2086  # entry is "module [args]" on purpose
exec "$python" -m torch.distributed.run --nproc_per_node "$nproc" --master_addr 127.0.0.1 --master_port "$port" \
  --max-restarts "${MAX_RESTARTS:-0}" -m $entry "$@"
