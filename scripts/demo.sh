#!/usr/bin/env bash
# README command 1: set up, then generate a synthetic CT from an example mask with the embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
mkdir -p out
MODEL=Resources/models/demo
MASK="${1:-Resources/examples/example_hepatic_tumor.nii.gz}"
if [ ! -f "$MODEL/config_network_rflow.json" ] || [ ! -f "$MASK" ]; then
    echo "note: no trained demo model/example yet: checking the engine with a tiny untrained model (noise, not anatomy)" >&2
    .venv/bin/python - <<'PY'
from pathlib import Path
import nibabel as nib
from MaisiSynthLib.tiny_model import make_tiny_model_folder, torso_mask_labels, torso_mask_affine
make_tiny_model_folder("out/tiny-random-model")
nib.save(nib.Nifti1Image(torso_mask_labels(64), torso_mask_affine()), "out/tiny_torso_mask.nii.gz")
PY
    MODEL=out/tiny-random-model
    MASK=out/tiny_torso_mask.nii.gz
fi
.venv/bin/maisi-synth generate --mask "$MASK" --model-dir "$MODEL" --output out/demo_ct.nii.gz --preview out/demo_preview.png
