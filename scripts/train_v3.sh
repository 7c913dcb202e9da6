#!/usr/bin/env bash
# Train the demo model v3 (what Resources/models/demo ships since issue 13; scripts/train_demo.sh
# runs this and copies the result there) from scratch on the CPU. Phantoms, run state and weights go
# to runs/v3/: the first VAE and UNet in runs/v3/model, the final model folder in runs/v3/soup/model.
# Every stage is resumable: rerun this script with --resume after an interruption (each training
# command continues from its last checkpoint). Wall times go to runs/v3/timing.txt (ours are in
# Resources/models/demo/TRAINING.md).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
PY=.venv/bin/python
CONFIG=scripts/train_v3.json
MODEL=runs/v3/model
RUN=runs/v3
mkdir -p "$RUN"
stamp() { echo "$1 $(date +%s)" >> "$RUN/timing.txt"; }
stamp start

# Training phantoms (README "Training"): whole torsos on the demo grid, plus fields of view as users
# bring them (any craniocaudal position, spacing ±15 %, chest-only), with random tumor sets.
D="$RUN/phantoms/train"
if [ "$(ls "$D" 2>/dev/null | wc -l)" != 256 ]; then
    P="$PY -m MaisiSynthLib phantoms --out $D"
    $P --count 48 --size 128 128 64 --spacing 3 3 5 --seed 0 --prefix torso
    $P --count 24 --size 128 128 64 --spacing 3 3 5 --seed 1 --fov varied --tumors random --prefix var64_
    $P --count 24 --size 128 128 48 --spacing 3 3 5 --seed 2 --fov varied --tumors random --prefix var48_
    $P --count 16 --size 128 128 32 --spacing 3 3 5 --seed 3 --fov varied --tumors random --prefix var32_
    $P --count 16 --size 128 128 48 --spacing 3 3 5 --seed 4 --fov chest --tumors random --prefix chest48_
fi
stamp phantoms

# 1. The VAE, in six stages, each from the weights of the one before (TRAINING.md says why):
#    a. random 64x64x32 patches, the first half of a 4000-step schedule;
#    b. full-width 128x128x32 slabs, then c./d. whole volumes: GroupNorm statistics of a small patch
#       and of a whole volume differ, and the decoder must be calibrated on what it will decode;
#    e. patches again with an L1 through soft-tissue and bone HU windows and KL 1e-10 (KL 1e-8 over
#       whole volumes pulls every organ towards the mean), f. whole volumes with the same loss.
vae() {  # vae NAME STOP-AFTER(or "") --set ... : one fine-tuning stage in $RUN/vae_NAME
    local name=$1 stop=$2; shift 2
    $PY -m MaisiSynthLib train vae --config "$CONFIG" --output-dir "$RUN/vae_$name" --base-model-dir "$MODEL" \
        --set model_dir="$PWD/$MODEL" ${stop:+--stop-after "$stop"} --quiet "$@" "${RESUME[@]}"
    stamp "vae_$name"
}
RESUME=("$@")
$PY -m MaisiSynthLib train vae --config "$CONFIG" --stop-after 2000 --quiet "$@"
stamp vae_patches
WHOLE=(--set vae.patch_size=null --set vae.batch_size=1 --set vae.lr=1e-4 --set vae.warmup_steps=10
       --set vae.log_every=10 --set vae.checkpoint_every=50)
WINDOWS=(--set vae.kl_weight=1e-10 --set "vae.windows=[[-200,200,1.0],[0,1000,0.5]]" --set vae.cpu_bf16=true)
vae slab "" --set seed=1 --set "vae.patch_size=[128,128,32]" --set vae.batch_size=1 --set vae.steps=300 \
    --set vae.lr=2e-4 --set vae.warmup_steps=20 --set vae.log_every=20 --set vae.checkpoint_every=50
vae whole 100 --set seed=2 "${WHOLE[@]}" --set vae.steps=300 --set vae.bone_weight=5 --set vae.tumor_weight=5
vae whole2 100 --set seed=3 "${WHOLE[@]}" --set vae.steps=400 --set vae.cpu_bf16=true
vae windows "" --set seed=4 "${WINDOWS[@]}" --set vae.steps=1200 --set vae.lr=3e-4 --set vae.warmup_steps=20 \
    --set vae.checkpoint_every=200
vae final "" --set seed=5 "${WHOLE[@]}" "${WINDOWS[@]}" --set vae.steps=150

# 2. The diffusion UNet and 3. the ControlNet, on the posterior means of the final VAE.
# The UNet was stopped at step 4000 of its 6000-step schedule (session time). The ControlNet ran 600
# steps, then a second 3000-step schedule (lr 1e-3, cosine) from those weights into $RUN/cn3000: its
# model folder has the VAE and UNet copied in from $MODEL.
$PY -m MaisiSynthLib train unet --config "$CONFIG" --stop-after 4000 --quiet "$@"
stamp unet
$PY -m MaisiSynthLib train controlnet --config "$CONFIG" --quiet "$@"
stamp controlnet
# controlnet_stage NAME BASE --set ... : fine-tune the ControlNet of model folder BASE in $RUN/NAME
# (same VAE, so its cached latents are shared).
controlnet_stage() {
    local name=$1 base=$2; shift 2
    mkdir -p "$RUN/$name"
    [ -e "$RUN/$name/latents" ] || ln -s "$PWD/$RUN/latents" "$RUN/$name/latents"
    $PY -m MaisiSynthLib train controlnet --config "$CONFIG" --output-dir "$RUN/$name" --base-model-dir "$base" \
        --set model_dir="$PWD/$RUN/$name/model" --quiet "$@" "${RESUME[@]}"
    stamp "controlnet_$name"
}
controlnet_stage cn3000 "$MODEL" --set controlnet.steps=3000
# With δ = 2 that ControlNet overdraws lesions (hepatic −354 HU against a real −58; colon lesions as
# air): 400 more steps with δ = 0.25 (already exceeded, so the ROI push stops and the flow loss sets
# the contrast), lr 3e-4; lung nodules and bone lesions come out faint, colon lesions dark.
SHORT=(--set controlnet.steps=400 --set controlnet.lr=3e-4 --set controlnet.warmup_steps=20)
controlnet_stage cnd "$RUN/cn3000/model" "${SHORT[@]}" --set controlnet.contrastive_delta=0.25
# Then 400-step stages with a margin per lesion (losses.py): "target" stops each lesion's push at its
# own latent contrast; "signed" counts only the push towards the real lesion (colon lesions were drawn
# dark); the flow loss ×3 on bones; and λ = 0.05, safe once the push cannot go past the real lesion,
# twice (lung nodules and colon lesions were still getting stronger); then the flow loss ×3 also on
# spleen, pancreas and kidneys (the spleen was drawn 45 HU too dark).
controlnet_stage cnt "$RUN/cnd/model" "${SHORT[@]}" --set controlnet.contrastive_margin=target
controlnet_stage cns "$RUN/cnt/model" "${SHORT[@]}" --set controlnet.contrastive_margin=signed
controlnet_stage cnsb "$RUN/cns/model" "${SHORT[@]}" --set controlnet.contrastive_margin=signed \
    --set controlnet.bone_weight=3
SIGNED=(--set controlnet.contrastive_margin=signed --set controlnet.bone_weight=3 --set controlnet.contrastive_weight=0.05)
controlnet_stage cnsl "$RUN/cnsb/model" "${SHORT[@]}" "${SIGNED[@]}"
controlnet_stage cnsl2 "$RUN/cnsl/model" "${SHORT[@]}" "${SIGNED[@]}"
controlnet_stage cnso "$RUN/cnsl2/model" "${SHORT[@]}" "${SIGNED[@]}" --set controlnet.organ_weight=3

# 4. The VAE again, encoder too (TRAINING.md, "The whole route"): three whole-volume stages from the
#    final VAE, each in its own run folder: bone and lesion voxels ×10 in the L1 and the bone window at
#    full weight (vbone, vbone2), then the posterior noise scaled to 0.25, lesions ×20 and an average
#    of the weights (vmu). Its μ moves by 11 % of its spread, so 5. the UNet is tuned to it (umu), and
#    6. the ControlNet is the mean of the weights of stages h (cnsl2) and i (cnso): every ControlNet
#    step on the new μ traded the pancreatic lesions away, while h draws them strongly and i draws
#    colon lesions and the spleen, so their midpoint keeps both. $RUN/soup/model ships.
vae_stage() {  # vae_stage NAME BASE --set ... : the whole VAE of model folder BASE, in $RUN/NAME
    local name=$1 base=$2; shift 2
    $PY -m MaisiSynthLib train vae --config "$CONFIG" --output-dir "$RUN/$name" --base-model-dir "$base" \
        --set model_dir="$PWD/$RUN/$name/model" --quiet "${WHOLE[@]}" --set vae.kl_weight=1e-10 \
        --set vae.cpu_bf16=true "$@" "${RESUME[@]}"
    stamp "$name"
}
BONE=(--set vae.bone_weight=10 --set vae.tumor_weight=10 --set "vae.windows=[[-200,200,1.0],[0,1000,1.0]]")
vae_stage vbone "$RUN/cnso/model" --set seed=7 --set vae.steps=150 --set vae.lr=1e-4 "${BONE[@]}"
vae_stage vbone2 "$RUN/vbone/model" --set seed=8 --set vae.steps=300 --set vae.lr=2e-4 --set vae.lr_power=1.0 \
    "${BONE[@]}"
vae_stage vmu "$RUN/vbone2/model" --set seed=11 --set vae.steps=300 --set vae.lr=1e-4 --set vae.lr_power=1.0 \
    --set vae.posterior_noise=0.25 --set vae.ema_decay=0.98 --set vae.bone_weight=10 --set vae.tumor_weight=20 \
    --set "vae.windows=[[-200,200,2.0],[0,1000,1.0]]"
mkdir -p "$RUN/umu/base" "$RUN/soup/model"
cp "$RUN/cnso/model/config_network_rflow.json" "$RUN/cnso/model/diff_unet_3d_rflow-ct.pt" "$RUN/vmu/model/autoencoder_v1.pt" \
    "$RUN/umu/base/"
[ -e "$RUN/umu/latents" ] || ln -s "$PWD/$RUN/latents" "$RUN/umu/latents"
$PY -m MaisiSynthLib train unet --config "$CONFIG" --output-dir "$RUN/umu" --base-model-dir "$RUN/umu/base" \
    --set model_dir="$PWD/$RUN/umu/model" --set unet.steps=1200 --set unet.lr=2e-4 --set unet.lr_power=1.0 \
    --set unet.warmup_steps=20 --set unet.checkpoint_every=200 --set unet.log_every=50 --quiet "${RESUME[@]}"
stamp unet_umu
for name in config_network_rflow.json autoencoder_v1.pt diff_unet_3d_rflow-ct.pt; do
    cp "$RUN/umu/model/$name" "$RUN/soup/model/$name"
done
$PY -m MaisiSynthLib.training.averaging "$RUN/cnsl2/model/controlnet_3d_rflow-ct.pt" \
    "$RUN/cnso/model/controlnet_3d_rflow-ct.pt" --weight 0.5 --out "$RUN/soup/model/controlnet_3d_rflow-ct.pt"
stamp soup

# 7. The decoder alone, twice (TRAINING.md, "What ships (v3.2)"): the bone and lesion weights of the L1
#    on the labelled voxels only (vae.region_ring=false; with the one-voxel ring they also hold the
#    surrounding tissue, so voxels the latent leaves uncertain go to the tissue's HU), bone x10 and
#    lesions x20 (dring), then bone x20 and lesions x60 at half the learning rate (dring2). The encoder
#    is frozen, so the UNet and the ControlNet are unchanged. $RUN/ship/model ships.
DECODER=(--set vae.decoder_only=true --set vae.region_ring=false --set vae.steps=200 --set vae.lr_power=1.0
         --set vae.posterior_noise=0.25 --set "vae.windows=[[-200,200,2.0],[0,1000,1.0]]")
vae_stage dring "$RUN/soup/model" --set seed=21 --set vae.lr=2e-4 --set vae.bone_weight=10 --set vae.tumor_weight=20 \
    "${DECODER[@]}"
vae_stage dring2 "$RUN/dring/model" --set seed=22 --set vae.lr=1e-4 --set vae.bone_weight=20 --set vae.tumor_weight=60 \
    "${DECODER[@]}"
mkdir -p "$RUN/ship/model"
cp "$RUN/soup/model/"*.pt "$RUN/soup/model/config_network_rflow.json" "$RUN/ship/model/"
cp "$RUN/dring2/model/autoencoder_v1.pt" "$RUN/ship/model/"
stamp ship

# 8. The latent prior (TRAINING.md, "What ships (v3.3)"): one latent vector per label, fitted to the
#    posterior means of the training phantoms under the final VAE. No weight changes; the sampler
#    moves each region's level to it once, at t = 0.6 T, and bone's once more at t = 0.3 T
#    (latent_prior_from, latent_prior_bone_from in the demo folder's maisi_synth.json; v3.4).
$PY -m MaisiSynthLib fit-prior --model-dir "$RUN/ship/model" --cases "$RUN/phantoms/train" --quiet
stamp prior
