#!/usr/bin/env bash
# The test suite, from a fresh clone: sets up .venv (with FFCV and DeepSpeed) and runs pytest.
# Pytest's exit status 5 (no test collected) is a failure here.
set -uo pipefail
cd "$(dirname "$0")/.."
bash launch/env.sh --full || exit 1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
.venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
rc=$?
if [ "$rc" = 5 ]; then
  echo "launch/test.sh: pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
