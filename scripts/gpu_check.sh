#!/usr/bin/env bash
# The GPU readiness check as one command on a lent GPU machine (README, "Performance"):
# installs the carried wheels (scripts/gpu_wheels.sh made them; never torch, which the machine has),
# runs benchmarks/gpu_check.py on this working tree, and leaves gpu_check.json + gpu_check.log in
# $OUT (the folder a device run brings back) or in out/. Extra arguments go to the check, e.g.
#     scripts/gpu_check.sh --sizes 256 512 --budget-s 300
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
SITE="${MAISI_GPU_SITE:-/tmp/maisi-gpu-site}"
if [ -d wheelhouse ] && ls wheelhouse/*.whl >/dev/null 2>&1; then
    # --target + PYTHONPATH: nothing in the machine's own environment is replaced; --no-deps: the
    # wheels' dependencies (numpy, torch, packaging, ...) are the machine's.
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$SITE" wheelhouse/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
# MaisiSynthLib is imported from this working tree (the code the check travelled with), so nothing
# needs building on a machine without a registry.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c "import torch, monai, nibabel" 2>/dev/null; then
    echo "torch, MONAI or nibabel missing: run scripts/gpu_wheels.sh where pip works and carry wheelhouse/" >&2
    exit 2
fi
OUTDIR="${OUT:-out}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
set -o pipefail
"$PYTHON" benchmarks/gpu_check.py --device "${MAISI_GPU_DEVICE:-cuda}" --json "$OUTDIR/gpu_check.json" "$@" 2>&1 \
    | tee "$OUTDIR/gpu_check.log"
