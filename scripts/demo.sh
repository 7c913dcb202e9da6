#!/usr/bin/env bash
# README command 1: set up, then generate a synthetic CT (+ PNG preview) from an example mask with the
# embedded demo model. Usage: scripts/demo.sh [mask] (default: the hepatic tumor example).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
mkdir -p out
MASK="${1:-Resources/examples/example_hepatic_tumor.nii.gz}"
.venv/bin/maisi-synth generate --mask "$MASK" --output out/demo_ct.nii.gz --preview out/demo_preview.png
