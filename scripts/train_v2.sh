#!/usr/bin/env bash
# The recipe of the previous demo model (v2, shipped until issue 13; Resources/models/demo/TRAINING.md,
# section "Previous model (v2)"), kept for comparison. Writes phantoms, run state and the model under
# runs/demo/ (model in runs/demo/model). The phantom generator has changed since (habitus, organ
# heights, lungs that fill the chest), so this trains the v2 recipe on today's phantoms.
# Wall times go to runs/demo/timing.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
PY=.venv/bin/python
CONFIG=scripts/train_v2.json
MODEL=runs/demo/model
mkdir -p runs/demo
stamp() { echo "$1 $(date +%s)" >> runs/demo/timing.txt; }
: > runs/demo/timing.txt
stamp start
# 32 training phantoms (all five tumor types each) at the demo grid: 128×128×64 voxels, 3×3×5 mm.
$PY -m MaisiSynthLib phantoms --count 32 --out runs/demo/phantoms/train --size 128 128 64 --spacing 3 3 5 --seed 0
stamp phantoms
$PY -m MaisiSynthLib train vae --config "$CONFIG" --quiet "$@"
stamp vae
# The decoder alone on whole 128×128×64 volumes: GroupNorm statistics of 48³ patches differ from
# those of the whole volume the demo decodes, which shifts soft-tissue HU by ~40 (see TRAINING.md).
$PY -m MaisiSynthLib train vae --config "$CONFIG" --output-dir runs/demo/decoder --base-model-dir "$MODEL" \
    --set model_dir="$PWD/$MODEL" --set vae.decoder_only=true --set "vae.patch_size=[128,128,64]" --set vae.batch_size=1 \
    --set vae.steps=150 --set vae.lr=2e-4 --set vae.warmup_steps=10 --set vae.log_every=10 \
    --set vae.checkpoint_every=50 --quiet "$@"
stamp vae_decoder
for stage in unet controlnet; do
    $PY -m MaisiSynthLib train "$stage" --config "$CONFIG" --quiet "$@"
    stamp "$stage"
done
