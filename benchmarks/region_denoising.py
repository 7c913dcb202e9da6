"""Where a model draws a region too faintly: its one-step latent prediction inside the region, by timestep.

    .venv/bin/python benchmarks/region_denoising.py --cases runs/results/heldout8 [--region vertebrae]
        [--model-dir Resources/models/demo] [--count 4] [--mask-guidance 1.5]

For each case, the real image is encoded as the training stages encode it (μ, `training.common.
encode_case`, times the UNet's scale factor) and noised to
t with seeded noise; the model (UNet + ControlNet on the case's own mask, with the given mask
guidance on every t) predicts the velocity v and hence x̂0 = x_t + t·v. Printed per timestep: the
mean of x̂0 and of μ over the latent voxels at least half inside the region, per latent channel.

Where x̂0 matches μ at small t but not at large t, the networks restore the region from what the
noisy latent still holds but cannot draw it from the mask alone, and a sampler, which takes its
intensities from the early steps, draws it faintly (Resources/models/demo/TRAINING.md, "After v3.2:
the ControlNet on the noisy half of the schedule": bone). Regions: the groups of `MaisiSynthLib.evaluation.ORGAN_GROUPS`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from MaisiSynthLib.cases import find_pairs  # noqa: E402
from MaisiSynthLib.errors import OptionError, tool_exit_status  # noqa: E402
from MaisiSynthLib.evaluation import ORGAN_GROUPS  # noqa: E402
from MaisiSynthLib.masks import binary_code  # noqa: E402
from MaisiSynthLib.models import load_models  # noqa: E402
from MaisiSynthLib.pipeline import default_model_dir  # noqa: E402
from MaisiSynthLib.sampling import Conditioning, spacing_condition, velocity_model  # noqa: E402
from MaisiSynthLib.training.common import encode_case  # noqa: E402
from MaisiSynthLib.training.data import load_case  # noqa: E402

TIMESTEPS = (0.95, 0.8, 0.6, 0.4, 0.2, 0.05)


def region_table(args: argparse.Namespace) -> str:
    """The printed table; an unreadable model or case folder raises a MaisiSynthError."""
    models = load_models(args.model_dir, "cpu")
    total = float(models.new_scheduler().num_train_timesteps)
    factor = models.compression
    predicted: dict[float, list[np.ndarray]] = {t: [] for t in TIMESTEPS}
    targets: list[np.ndarray] = []
    for index, pair in enumerate(find_pairs(args.cases)):
        if len(targets) >= args.count:
            break
        case = load_case(*pair)
        region = torch.from_numpy(np.isin(case.labels.numpy(), ORGAN_GROUPS[args.region])).float()[None]
        inside = F.avg_pool3d(region, factor)[0, 0] >= 0.5
        if not inside.any():
            print(f"{case.name}: no latent voxel is half {args.region}; skipped")
            continue
        mu = (encode_case(models.autoencoder, case, 0, models.device, kind="mean") * models.scale_factor)[None]
        cond = Conditioning(
            binary_code(case.labels[None]),
            spacing_condition(case.spacing),
            torch.tensor([1]),
            mask_guidance=args.mask_guidance,
            mask_guidance_from=0.0,
        )
        velocity = velocity_model(models, cond)
        noise = torch.randn(mu.shape, generator=torch.Generator().manual_seed(index))
        targets.append(mu[0][:, inside].mean(dim=1).numpy())
        for t in TIMESTEPS:
            noisy = (1 - t) * mu + t * noise
            x0 = noisy + t * velocity(noisy, torch.tensor(t * total))
            predicted[t].append(x0[0][:, inside].mean(dim=1).numpy())
    if not targets:
        raise OptionError(f"no case in {args.cases} has {args.region}", "pass cases that have it, or another --region")
    real = np.mean(targets, axis=0)
    lines = [
        f"{args.region}: one-step x̂0 vs μ, mean over its latent voxels, {len(targets)} cases, "
        f"mask guidance {args.mask_guidance:g} ({args.model_dir})",
        f"{'t / T':<8}" + "".join(f"{f'ch{c} x̂0 / μ':>18}" for c in range(len(real))),
    ]
    for t in TIMESTEPS:
        mean = np.mean(predicted[t], axis=0)
        lines.append(f"{t:<8.2f}" + "".join(f"{mean[c]:>+10.2f} / {real[c]:+5.2f}" for c in range(len(real))))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", required=True, help="folder of caseNNNN_image/_label.nii.gz pairs")
    parser.add_argument("--model-dir", default=str(default_model_dir()))
    parser.add_argument("--region", default="vertebrae", choices=sorted(ORGAN_GROUPS))
    parser.add_argument("--count", type=int, default=4, help="cases to use (the first N)")
    parser.add_argument("--mask-guidance", type=float, default=1.0, help="on every t; 1 = off")
    args = parser.parse_args()
    return tool_exit_status(lambda: region_table(args))


if __name__ == "__main__":
    raise SystemExit(main())
