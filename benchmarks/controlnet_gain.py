"""How much a ControlNet helps the UNet: velocity L1 on a fixed set of noisy latents, by timestep.

    .venv/bin/python benchmarks/controlnet_gain.py [--config Resources/models/demo/train.json]
        [--controlnet NAME=MODEL_DIR ...] [--samples 48]

The samples (case, noise, timestep) are drawn once from a fixed seed with the training code's own
batch builder, so every model sees the same ones. Printed per timestep quarter (t/1000 in [0, .25),
…): the UNet alone, then the UNet with each ControlNet. At large t the latent is mostly noise and
only the mask can say where the organs are, so a ControlNet that follows the mask lowers the error
most there; one that has learnt little leaves the UNet's numbers nearly unchanged. A model folder
that holds its own UNet as well (a joint fine-tune) is measured with that UNet. The last lines give
the noisiest quarter's error of each ControlNet as a multiple of the UNet's alone.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from MaisiSynthLib.distributed import DistContext  # noqa: E402
from MaisiSynthLib.masks import binary_code  # noqa: E402
from MaisiSynthLib.models import CONTROLNET_FILE, UNET_FILE, checkpoint_state_dict, load_checkpoint, load_weights  # noqa: E402
from MaisiSynthLib.training.common import find_weight, flow_batch  # noqa: E402
from MaisiSynthLib.training.config import load_config  # noqa: E402
from MaisiSynthLib.training.controlnet import ControlNetStage  # noqa: E402

BINS = 4


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "Resources" / "models" / "demo" / "train.json"))
    p.add_argument("--controlnet", action="append", default=[], metavar="NAME=DIR", help="model folder of a ControlNet")
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--seed", type=int, default=123)
    args = p.parse_args(argv)
    folders = [tuple(item.split("=", 1)) for item in args.controlnet] or [("model", str(Path(args.config).parent))]

    stage = ControlNetStage(load_config(args.config, []), DistContext())
    # the cases, their cached latents, the frozen UNet; the model folder is only read
    stage.prepare(write_model_folder=False)
    controlnets, unets = {}, {}
    base_unet = find_weight(stage.config["model_dir"], UNET_FILE)
    for name, folder in folders:
        net = copy.deepcopy(stage.module.controlnet)
        path = find_weight(folder, CONTROLNET_FILE)
        if path is None:
            p.error(f"no {CONTROLNET_FILE} in {folder}")
        load_weights(
            net, checkpoint_state_dict(load_checkpoint(path), "controlnet_state_dict", path), path, "ControlNet"
        )
        controlnets[name] = net.eval()
        # a ControlNet trained jointly with its UNet is measured with that UNet
        own = find_weight(folder, UNET_FILE)
        unets[name] = stage.unet
        if own is not None and (base_unet is None or own.resolve() != base_unet.resolve()):
            unet = copy.deepcopy(stage.unet)
            load_weights(
                unet, checkpoint_state_dict(load_checkpoint(own), "unet_state_dict", own), own, "diffusion UNet"
            )
            unets[name] = unet.eval()

    errors: dict[str, list[list[float]]] = {name: [[] for _ in range(BINS)] for name in ["UNet alone", *controlnets]}
    with torch.no_grad():
        for n in range(args.samples):
            local = [(0, n % len(stage.cases))]
            b = flow_batch(
                stage.scheduler,
                stage.latents,
                stage.cases,
                local,
                1,
                n,
                args.seed,
                stage.scale_factor,
                stage.modality,
                stage.device,
            )
            quarter = min(BINS - 1, int(float(b.timesteps[0]) * BINS / 1000))
            target = b.latents - b.noise
            common = dict(x=b.noisy, timesteps=b.timesteps, spacing_tensor=b.spacing, class_labels=b.modality)
            errors["UNet alone"][quarter].append(float((stage.unet(**common) - target).abs().mean()))
            control = binary_code(torch.stack([stage.cases[i].labels for i in b.cases]))
            for name, net in controlnets.items():
                down, mid = net(x=b.noisy, timesteps=b.timesteps, controlnet_cond=control, class_labels=b.modality)
                v = unets[name](**common, down_block_additional_residuals=down, mid_block_additional_residual=mid)
                errors[name][quarter].append(float((v - target).abs().mean()))

    header = "".join(f"  t∈[{q / BINS:.2f},{(q + 1) / BINS:.2f})" for q in range(BINS))
    print(f"{'velocity L1':<14}{header}       all")
    for name, bins in errors.items():
        cells = "".join(f"  {sum(b) / len(b):8.3f} (n={len(b):2d})" if b else f"  {'—':>15}" for b in bins)
        total = sum(sum(b) for b in bins) / max(1, sum(len(b) for b in bins))
        print(f"{name:<14}{cells}  {total:8.3f}")
    noisiest = errors["UNet alone"][BINS - 1]
    if noisiest:
        alone = sum(noisiest) / len(noisiest)
        for name in controlnets:
            last = errors[name][BINS - 1]
            print(f"noisiest quarter, {name}: {sum(last) / len(last) / alone:.3f} × the UNet alone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
