#!/usr/bin/env bash
# Install what is needed, then run the whole test suite headless (Xvfb via pytest-xvfb).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
# shellcheck disable=SC1091
. "$ROOT/.venv/bin/activate"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
python -m pytest "$@"
