#!/usr/bin/env bash
# DeepSpeed's launcher over the hosts of a hostfile (passwordless ssh + pdsh between nodes; see
# launch/hostfile.example). Run on the first node:
#   HOSTFILE=hosts bash launch/deepspeed_hostfile.sh configs/paper/resnet50_imagenet_l1.yaml \
#     output.dir=/shared/runs/r50-ds dist.deepspeed_config=configs/deepspeed/zero1_bf16.json train.amp=bf16
# Without a hostfile DeepSpeed uses the local node only (NUM_GPUS limits the processes; on CPU
# set DS_ACCELERATOR=cpu and NUM_GPUS=2: each "GPU" is a process).
# --module runs `python -m distributed_prune`; --no_local_rank because the pipeline reads
# LOCAL_RANK from the environment (our CLI takes no --local_rank argument).
set -euo pipefail
DEEPSPEED=${DEEPSPEED:-deepspeed}
args=(--no_local_rank --module)
if [ -f "${HOSTFILE:-hostfile}" ]; then args=(--hostfile "${HOSTFILE:-hostfile}" "${args[@]}"); fi
if [ -n "${NUM_GPUS:-}" ]; then args=(--num_gpus "$NUM_GPUS" "${args[@]}"); fi
if [ -n "${MASTER_PORT:-}" ]; then args=(--master_port "$MASTER_PORT" "${args[@]}"); fi
exec "$DEEPSPEED" "${args[@]}" ${DEEPSPEED_ARGS:-} distributed_prune run "$@" dist.engine=deepspeed
