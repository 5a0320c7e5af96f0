#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv with the pinned versions.
#   bash launch/env.sh            # core: torch, torchvision, torch-pruning, ...
#   bash launch/env.sh --full     # + FFCV (with its apt packages), DeepSpeed, TensorBoard and the
#                                 #   ONNX exporter / runtime, for the tests
# Idempotent: a stamp keyed on the constraints and setup.py skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."
FULL=0
[ "${1:-}" = "--full" ] && FULL=1
PY=${PYTHON:-python3}
VENV=.venv
STAMP="$VENV/.dprune-stamp"
want="$(cat launch/constraints.txt setup.py | sha256sum | cut -c1-16)-full$FULL"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel
$PIP install -q -c launch/constraints.txt torch torchvision
EXTRAS="dev"
if [ "$FULL" = 1 ]; then
  if ! pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
      pkg-config libturbojpeg0-dev libopencv-dev build-essential >/dev/null
  fi
  # FFCV builds from source (isolated build); DeepSpeed installs as pure Python without its ops
  DS_BUILD_OPS=0 $PIP install -q -c launch/constraints.txt ffcv deepspeed
  EXTRAS="dev,tensorboard,export"
fi
# --no-build-isolation: setup.py sees the pinned torch and builds the optional csrc extension.
$PIP install -q -c launch/constraints.txt --no-build-isolation -e ".[$EXTRAS]"
echo "$want" > "$STAMP"
