#!/usr/bin/env bash
# Reproduce the embedded demo model (Resources/models/demo) from scratch on the CPU: the v3 recipe
# (scripts/train_v3.sh: phantoms → VAE in six stages → UNet on μ → ControlNet in nine stages → the
# VAE again in three → the UNet tuned to its μ → the ControlNet averaged from two stages → the
# decoder alone in two more → the latent prior: v3.4, in runs/v3/ship/model), then the diffusion stages
# again on latents refined near lesions (scripts/train_v3r.sh: v3.5, run state in runs/v3r/), and that
# final model folder copied into Resources/models/demo.
# `scripts/train_demo.sh --resume` continues every stage after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/train_v3.sh "$@"
scripts/train_v3r.sh "$@"
for name in config_network_rflow.json autoencoder_v1.pt diff_unet_3d_rflow-ct.pt controlnet_3d_rflow-ct.pt latent_prior.pt; do
    cp "runs/v3r/ship/model/$name" "Resources/models/demo/$name"
done
echo "wrote Resources/models/demo"
