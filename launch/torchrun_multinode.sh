#!/usr/bin/env bash
# Several nodes with c10d rendezvous; run the same command on every node:
#   NNODES=2 NPROC=8 MASTER_ADDR=node0 MASTER_PORT=29500 RDZV_ID=r50-l1 \
#     bash launch/torchrun_multinode.sh configs/paper/resnet50_imagenet_l1.yaml output.dir=/shared/runs/r50
# NNODES may be elastic ("2:4"). NODE_RANK is optional (c10d assigns ranks); set it to pin the
# order of nodes. output.dir must be on a file system every node sees (rank 0 writes, every
# rank resumes from it). A failed worker restarts the whole group up to MAX_RESTARTS times,
# resuming from the newest checkpoint.
set -euo pipefail
: "${NNODES:?set NNODES (e.g. 2, or 2:4 for elastic)}"
: "${MASTER_ADDR:?set MASTER_ADDR (host of the rendezvous, usually the first node)}"
: "${MASTER_PORT:=29500}"
: "${RDZV_ID:=dprune}"
PYTHON=${PYTHON:-python}
node_rank=()
if [ -n "${NODE_RANK:-}" ]; then node_rank=(--node_rank "$NODE_RANK"); fi
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --nproc_per_node "${NPROC:-8}" ${node_rank[@]+"${node_rank[@]}"} \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID" \
  --max-restarts "${MAX_RESTARTS:-3}" ${TORCHRUN_ARGS:-} \
  -m distributed_prune run "$@"
