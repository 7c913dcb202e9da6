#!/usr/bin/env bash
# Prepare, on this machine, the wheels a lent GPU machine lacks, into wheelhouse/ (git-ignored).
#
# The lent machine (Python 3.12, x86_64) has torch with CUDA, numpy, scipy, pillow, einops,
# packaging, typing-extensions and requests, but no MONAI, nibabel, pynrrd or slicerio, and it
# cannot reach a package registry. These four are pure Python (py3-none-any), so the platform
# flags only tell pip which machine to resolve for; --no-deps because every dependency they have
# (numpy, torch, packaging, typing-extensions, requests) is already there and must not be replaced,
# torch above all. The versions are those the test suite runs with; override with WHEELS="...".
#
#     scripts/gpu_wheels.sh                 # then carry "wheelhouse" in the device run (README)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
WHEELS="${WHEELS:-monai==1.6.1 nibabel==5.4.2 pynrrd==1.1.3 slicerio==1.4.0}"
LIMIT_MB=16  # far under the 64 MiB a device run may carry in all, working tree included

rm -rf wheelhouse
mkdir -p wheelhouse
# shellcheck disable=SC2086  # WHEELS is a list of requirement specifiers
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --dest wheelhouse $WHEELS
ls -l wheelhouse
size_kb=$(du -sk wheelhouse | cut -f1)
echo "wheelhouse: $(ls wheelhouse/*.whl | wc -l) wheels, $((size_kb / 1024)) MiB (limit ${LIMIT_MB} MiB)"
if [ "$size_kb" -gt $((LIMIT_MB * 1024)) ]; then
    echo "wheelhouse is larger than ${LIMIT_MB} MiB: a device run carries at most 64 MiB in all" >&2
    exit 1
fi
