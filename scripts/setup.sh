#!/usr/bin/env bash
# Create .venv with the CPU build of torch and MaisiSynth (editable) — idempotent.
# Usage: scripts/setup.sh [EXTRAS], e.g. scripts/setup.sh test,serve,download (default: none, the core
# package, which is all `generate` needs; scripts/test.sh asks for what the tests need).
# torch is installed first and pinned to the local CPU wheel: a bare `torch` requirement would pull a
# multi-GB CUDA build. Set MAISI_TORCH to choose another torch (e.g. a CUDA build on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH="${MAISI_TORCH:-torch==2.13.0}"
EXTRAS="${1:-}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "$TORCH"
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${EXTRAS:+[$EXTRAS]}"
.venv/bin/python -c "import torch, monai, MaisiSynthLib; print(f'ready: torch {torch.__version__}, MONAI {monai.__version__}, MaisiSynth {MaisiSynthLib.__version__}')"
