#!/usr/bin/env bash
# Reproduce the embedded demo model (Resources/models/demo) from scratch on the CPU.
# Writes phantoms and the run state under runs/demo/; the weights land in Resources/models/demo/.
# Wall times go to runs/demo/timing.txt (see Resources/models/demo/TRAINING.md for ours).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
PY=.venv/bin/python
CONFIG=Resources/models/demo/train.json
mkdir -p runs/demo
stamp() { echo "$1 $(date +%s)" >> runs/demo/timing.txt; }
: > runs/demo/timing.txt
stamp start
# 32 training phantoms (all five tumor types each) at the demo grid: 128×128×64 voxels, 3×3×5 mm.
$PY -m MaisiSynthLib phantoms --count 32 --out runs/demo/phantoms/train --size 128 128 64 --spacing 3 3 5 --seed 0
stamp phantoms
for stage in vae unet controlnet; do
    $PY -m MaisiSynthLib train "$stage" --config "$CONFIG" --quiet "$@"
    stamp "$stage"
done
