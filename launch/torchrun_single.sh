#!/usr/bin/env bash
# One node, NPROC processes (one per GPU; on CPU they use gloo):
#   NPROC=8 bash launch/torchrun_single.sh configs/paper/resnet56_cifar10_l1_step0.01.yaml output.dir=runs/r56
#   NPROC=2 bash launch/torchrun_single.sh configs/debug_cpu.yaml output.dir=runs/debug2
# Extra torchrun options (e.g. --max-restarts 3) go in TORCHRUN_ARGS. The run resumes from its
# newest checkpoint after a restart.
set -euo pipefail
PYTHON=${PYTHON:-python}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "${NPROC:-8}" \
  ${TORCHRUN_ARGS:-} -m distributed_prune run "$@"
