#!/usr/bin/env bash
# Install what is needed, then open napari with the sample data and the plugin's widgets.
# With no display it runs the same workflow on a virtual screen (Xvfb) and writes a
# screenshot and a summary to demo_output/ (or the folder given with --out).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
# shellcheck disable=SC1091
. "$ROOT/.venv/bin/activate"
cd "$ROOT"
if [ -n "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ] && [ "${LSMFM_HEADLESS:-0}" != 1 ]; then
  exec python -m napari_lsmfm.demo "$@"
fi
exec xvfb-run -a -s "-screen 0 1600x1000x24" python -m napari_lsmfm.demo --headless "$@"
