#!/usr/bin/env bash
# Several nodes: run this once on every node, with the same RDZV_ENDPOINT.
#   NNODES=2 NODE_RANK=0 NPROC=8 RDZV_ENDPOINT=head-node:29500 launch/multinode.sh configs/tiny.yaml
#   NNODES=2 NODE_RANK=1 NPROC=8 RDZV_ENDPOINT=head-node:29500 launch/multinode.sh configs/tiny.yaml
# Environment:
#   NNODES, NODE_RANK, NPROC (processes per node), RDZV_ENDPOINT (host:port of node 0),
#   RDZV_ID (job id shared by all nodes, default hybrid-lm), MAX_RESTARTS (torchrun brings failed
#   workers back this many times; each restart resumes from the newest complete checkpoint),
#   NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME to pin the network interface on multi-homed nodes.
# Backend: NCCL when CUDA is available, gloo otherwise (chosen by the trainer).
# HYBRID_LM_ENTRY replaces the module every rank runs (default: "hybrid_lm.cli train").
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${RDZV_ENDPOINT:?set RDZV_ENDPOINT (host:port of node 0)}"
python=${PYTHON:-python3}
entry=${HYBRID_LM_ENTRY:-"hybrid_lm.cli train"}
# Static rendezvous: node 0 hosts the store at RDZV_ENDPOINT; ranks are ordered by NODE_RANK,
# which keeps data sharding (by global rank) identical across restarts.
host=${RDZV_ENDPOINT%:*}
port=${RDZV_ENDPOINT##*:}
# shellcheck disable=SC2086
exec "$python" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "${NPROC:-1}" \
  --master_addr "$host" --master_port "$port" --max-restarts "${MAX_RESTARTS:-0}" -m $entry "$@"
