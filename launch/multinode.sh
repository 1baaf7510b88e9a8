#!/usr/bin/env bash
# Several nodes: run this once on every node with the same NNODES and RDZV_ENDPOINT.
#   NNODES=2 NODE_RANK=0 NPROC=8 RDZV_ENDPOINT=node0:29500 launch/multinode.sh configs/tiny.yaml train.steps=20000
#   NNODES=2 NODE_RANK=1 NPROC=8 RDZV_ENDPOINT=node0:29500 launch/multinode.sh configs/tiny.yaml train.steps=20000
#
# Environment:
#   NNODES          number of nodes (required)
#   NODE_RANK       this node, 0..NNODES-1 (required); node 0 hosts the rendezvous store
#   RDZV_ENDPOINT   host:port of node 0, reachable from every node (required)
#   NPROC           processes per node (default: the visible GPUs, else 1)
#   RDZV_ID         job id shared by all nodes (default hybrid-lm); a different id for each job
#   MAX_RESTARTS    how often torchrun restarts the whole job after a worker or node fails (default 3);
#                   each restart re-forms the group and the trainer resumes from the newest complete
#                   checkpoint (train.resume=auto is the trainer's default)
#   LOCAL_ADDR      this node's address as the others should dial it (default: torchrun's own lookup)
#   TORCHRUN_ARGS   extra torchrun flags, e.g. "--signals-to-handle SIGTERM,SIGINT,SIGUSR1"
#   PYTHON          interpreter (default python3)
#   HYBRID_LM_ENTRY module (and leading arguments) every rank runs (default "hybrid_lm.cli train")
#   NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME   network interface on multi-homed nodes (e.g. ib0, eth0)
#   NCCL_DEBUG=INFO                          to see which transport NCCL picked
# The trainer picks NCCL when CUDA is available and gloo otherwise, so nothing here names a backend.
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${RDZV_ENDPOINT:?set RDZV_ENDPOINT (host:port of node 0)}"
python=${PYTHON:-python3}
entry=${HYBRID_LM_ENTRY:-"hybrid_lm.cli train"}
nproc=${NPROC:-$("$python" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
# The c10d rendezvous (rather than a static master address) lets torchrun re-form the group after a
# failure on any node. Naming the host explicitly keeps it right when several "nodes" share a machine.
is_host=$([ "$NODE_RANK" = 0 ] && echo 1 || echo 0)
# Workers otherwise share the agent's store, whose keys outlive a restart: the restarted ranks read
# the dead ranks' gloo/NCCL addresses and fail to connect. A fresh store per attempt avoids that.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
extra=()
if [ -n "${LOCAL_ADDR:-}" ]; then extra+=(--local-addr "$LOCAL_ADDR"); fi
# shellcheck disable=SC2086  # TORCHRUN_ARGS and entry are word lists on purpose
exec "$python" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$nproc" \
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-hybrid-lm}" \
  --rdzv-conf "is_host=$is_host" --max-restarts "${MAX_RESTARTS:-3}" "${extra[@]}" ${TORCHRUN_ARGS:-} \
  -m $entry "$@"
