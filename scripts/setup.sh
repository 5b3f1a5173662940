#!/usr/bin/env bash
# Install everything napari-lsmfm needs into ./.venv (idempotent; called by demo.sh and test.sh).
#  1. Debian/Ubuntu libraries Qt and Xvfb need (when run as root with apt-get),
#  2. a virtual environment,
#  3. torch: the CUDA build when an NVIDIA GPU is present (or a torch already installed
#     is kept), otherwise a CPU build - never several GB of CUDA packages on a CPU machine,
#  4. the plugin itself, editable, with its Qt binding and test extras.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LSMFM_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
log() { printf '[setup] %s\n' "$*" >&2; }

SYSTEM_PACKAGES="xvfb xauth libgl1 libegl1 libgl1-mesa-dri libxkbcommon-x11-0 libxcb-cursor0
 libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-render-util0 libxcb-randr0 libxcb-shape0
 libxcb-xinerama0 libxcb-xfixes0 libdbus-1-3 libfontconfig1"
if command -v dpkg >/dev/null 2>&1; then
  missing=""
  for p in $SYSTEM_PACKAGES; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      log "installing system libraries:$missing"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
    else
      log "missing system libraries:$missing (run as root, or: sudo apt-get install$missing)"
    fi
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    log "NVIDIA GPU found: installing torch with CUDA"
    pip install -q torch
  elif pip install -q --no-index --no-deps torch >/dev/null 2>&1; then
    # A local CPU wheel in pip's find-links (as on our CI machines); then its dependencies.
    ver=$(python -c "import importlib.metadata as m; print(m.version('torch'))")
    log "installed torch $ver from a local wheel"
    pip install -q "torch==$ver" 2> >(grep -v "^WARNING: Location" >&2)
  else
    log "no GPU: installing the CPU build of torch"
    pip install -q torch --index-url https://download.pytorch.org/whl/cpu \
      --extra-index-url https://pypi.org/simple
  fi
fi

# Reinstall the plugin only when its dependencies changed.
stamp="$VENV/.lsmfm-installed"
want=$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  torch_pin=$(python -c "import importlib.metadata as m; print(m.version('torch'))")
  log "installing napari-lsmfm (torch $torch_pin kept)"
  pip install -q -e "$ROOT[dev]" --constraint <(echo "torch==$torch_pin") \
    2> >(grep -v "^WARNING: Location" >&2)
  python -c "import napari_lsmfm, napari, torch, monai" || { log "install failed"; exit 1; }
  echo "$want" > "$stamp"
fi
log "ready: $VENV"
