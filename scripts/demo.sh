#!/usr/bin/env bash
# README command 1: set up the core package only (no test or server extras), then generate a synthetic
# CT (+ PNG preview) from an example mask with the embedded demo model (named explicitly: once official
# weights are downloaded, a bare `generate` would use those). Usage: scripts/demo.sh [mask]
# (default: the hepatic tumor example).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
mkdir -p out
MASK="${1:-Resources/examples/example_hepatic_tumor.nii.gz}"
.venv/bin/maisi-synth generate --mask "$MASK" --output out/demo_ct.nii.gz --preview out/demo_preview.png \
    --model-dir Resources/models/demo
