#!/usr/bin/env bash
# The diffusion stages of the demo model on refined latents (TRAINING.md, "What ships (v3.5)"), from
# v3.4, the model scripts/train_v3.sh leaves in runs/v3/ship/model (BASE=<folder> to start elsewhere;
# the settings file maisi_synth.json comes from Resources/models/demo): its VAE stays, the latent voxels near each
# training lesion are optimised so the decoder draws the lesion (latents: refined), the UNet is tuned
# to them, the ControlNet is tuned in two stages from v3.4's and averaged as v3.4's was, and the
# latent prior is refitted to the same latents. Run state and weights go to runs/v3r/; the candidate
# model folder is runs/v3r/ship/model. Every stage is resumable: rerun with --resume (the refinement
# resumes case by case on its own). Wall times go to runs/v3r/timing.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
PY=.venv/bin/python
CONFIG=scripts/train_v3.json
DEMO=Resources/models/demo
BASE=${BASE:-runs/v3/ship/model}
RUN=runs/v3r
RESUME=("$@")
# refused before anything is written (no run folder, no timing line)
[ -f "$BASE/latent_prior.pt" ] || {
    echo "$BASE holds no v3.4 model: run scripts/train_v3.sh first, or set BASE=<model folder>" >&2
    exit 2
}
[ "$(ls runs/v3/phantoms/train 2>/dev/null | wc -l)" = 256 ] || {
    echo "runs/v3/phantoms/train is missing: make the training phantoms first (scripts/train_v3.sh, its first block)" >&2
    exit 2
}
mkdir -p "$RUN"
stamp() { echo "$1 $(date +%s)" >> "$RUN/timing.txt"; }
stamp start
REFINED=(--set latents=refined)

# 1. The UNet, tuned from the shipped one on refined latents (the v3.4 umu settings). Its first run
#    fills $RUN/latents/<vae>-refined-<settings>/ (about 3 min a 128x128x64 case on 2 cores), which
#    every later stage shares.
mkdir -p "$RUN/unet/base"
cp "$BASE/config_network_rflow.json" "$BASE/diff_unet_3d_rflow-ct.pt" "$BASE/autoencoder_v1.pt" "$RUN/unet/base/"
mkdir -p "$RUN/latents"
[ -e "$RUN/unet/latents" ] || ln -s "$PWD/$RUN/latents" "$RUN/unet/latents"
$PY -m MaisiSynthLib train unet --config "$CONFIG" --output-dir "$RUN/unet" --base-model-dir "$RUN/unet/base" \
    --set model_dir="$PWD/$RUN/unet/model" "${REFINED[@]}" --set unet.steps=1200 --set unet.lr=2e-4 \
    --set unet.lr_power=1.0 --set unet.warmup_steps=20 --set unet.checkpoint_every=200 --set unet.log_every=50 \
    --quiet "${RESUME[@]}"
stamp unet

# 2. The ControlNet: two 400-step stages from the shipped one with the new UNet, with the settings of
#    v3.4's stages h (cnsl2) and i (cnso), averaged as v3.4's soup was.
mkdir -p "$RUN/cnbase"
cp "$RUN/unet/model/config_network_rflow.json" "$RUN/unet/model/diff_unet_3d_rflow-ct.pt" \
    "$BASE/autoencoder_v1.pt" "$BASE/controlnet_3d_rflow-ct.pt" "$RUN/cnbase/"
SHORT=(--set controlnet.steps=400 --set controlnet.lr=3e-4 --set controlnet.warmup_steps=20)
SIGNED=(--set controlnet.contrastive_margin=signed --set controlnet.bone_weight=3 --set controlnet.contrastive_weight=0.05)
controlnet_stage() {  # controlnet_stage NAME --set ... : fine-tune the ControlNet of $RUN/cnbase in $RUN/NAME
    local name=$1; shift
    mkdir -p "$RUN/$name"
    [ -e "$RUN/$name/latents" ] || ln -s "$PWD/$RUN/latents" "$RUN/$name/latents"
    $PY -m MaisiSynthLib train controlnet --config "$CONFIG" --output-dir "$RUN/$name" --base-model-dir "$RUN/cnbase" \
        --set model_dir="$PWD/$RUN/$name/model" "${REFINED[@]}" "${SHORT[@]}" "${SIGNED[@]}" --quiet "$@" "${RESUME[@]}"
    stamp "controlnet_$name"
}
controlnet_stage cnh
controlnet_stage cni --set controlnet.organ_weight=3

# 3. The model folder: the shipped VAE and settings, the new UNet, the averaged ControlNet, and the
#    latent prior fitted to the refined latents (what the UNet learnt from).
mkdir -p "$RUN/ship/model"
cp "$BASE/autoencoder_v1.pt" "$DEMO/maisi_synth.json" "$RUN/unet/model/config_network_rflow.json" \
    "$RUN/unet/model/diff_unet_3d_rflow-ct.pt" "$RUN/ship/model/"
$PY -m MaisiSynthLib.training.averaging "$RUN/cnh/model/controlnet_3d_rflow-ct.pt" \
    "$RUN/cni/model/controlnet_3d_rflow-ct.pt" --weight 0.5 --out "$RUN/ship/model/controlnet_3d_rflow-ct.pt"
LATENTS=("$RUN"/latents/*-refined-*)
$PY -m MaisiSynthLib fit-prior --model-dir "$RUN/ship/model" --cases runs/v3/phantoms/train \
    --latents "${LATENTS[0]}" --quiet
stamp ship
