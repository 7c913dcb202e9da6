"""How much HU the VAE alone loses: encode → decode held-out phantoms, per-organ median HU error.

This is the ceiling of any model built on the VAE: the diffusion model can at best reproduce a
latent the decoder turns into this. Prints a table (mean over cases) and, with --json, writes it.

    .venv/bin/python benchmarks/vae_reconstruction.py --cases runs/results/heldout8 [--model-dir D]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MaisiSynthLib.decoding import HU_MAX, HU_MIN  # noqa: E402
from MaisiSynthLib.evaluation import load_canonical, organ_medians, tumor_contrast  # noqa: E402
from MaisiSynthLib import labels as L  # noqa: E402
from MaisiSynthLib.models import load_models  # noqa: E402
from MaisiSynthLib.pipeline import default_model_dir  # noqa: E402
from MaisiSynthLib.training.data import find_pairs  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", required=True, help="folder of caseNNNN_image/_label.nii.gz pairs")
    parser.add_argument("--model-dir", default=str(default_model_dir()))
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    models = load_models(args.model_dir, "cpu")
    errors: dict[str, list[float]] = {}
    contrast: dict[str, list[tuple[float, float]]] = {}
    abs_err = []
    started = time.perf_counter()
    for name, image_path, label_path in find_pairs(args.cases):
        real = load_canonical(image_path)[0].astype(np.float32)
        labels = load_canonical(label_path)[0].astype(np.int16)
        x = torch.from_numpy((np.clip(real, HU_MIN, HU_MAX) - HU_MIN) / (HU_MAX - HU_MIN))[None, None]
        with torch.no_grad():
            z_mu, _ = models.autoencoder.encode(x)
            recon = models.autoencoder.decode(z_mu)[0, 0].clamp(0, 1).numpy() * (HU_MAX - HU_MIN) + HU_MIN
        recon[labels == 0] = HU_MIN
        body = labels > 0
        abs_err.append(float(np.abs(recon - np.clip(real, HU_MIN, HU_MAX))[body].mean()))
        synthetic, truth = organ_medians(recon, labels, real), organ_medians(real, labels, real)
        for organ, value in truth.items():
            if value is not None:
                errors.setdefault(organ, []).append(synthetic[organ] - value)
        c_real, c_recon = tumor_contrast(real, labels), tumor_contrast(recon, labels)
        for tumor, value in c_real.items():
            contrast.setdefault(L.name_of(tumor), []).append((value, c_recon[tumor]))
    result = {
        "model_dir": args.model_dir,
        "cases": args.cases,
        "mean_abs_error_in_body_hu": float(np.mean(abs_err)),
        "organ_median_error_hu": {k: float(np.mean(v)) for k, v in errors.items()},
        "organ_median_abs_error_hu": {k: float(np.mean(np.abs(v))) for k, v in errors.items()},
        "tumor_conspicuity_real_vs_reconstructed_hu": {
            k: [float(np.mean([a for a, _ in v])), float(np.mean([b for _, b in v]))] for k, v in contrast.items()
        },
        "seconds": time.perf_counter() - started,
    }
    print(
        f"VAE reconstruction ({len(abs_err)} cases): mean |error| in the body {result['mean_abs_error_in_body_hu']:.1f} HU"
    )
    print("organ        signed median error   |error|")
    for organ, value in result["organ_median_error_hu"].items():
        print(f"  {organ:<11} {value:+8.1f} HU {result['organ_median_abs_error_hu'][organ]:8.1f} HU")
    print("tumor conspicuity (real → reconstructed)")
    for name, (a, b) in result["tumor_conspicuity_real_vs_reconstructed_hu"].items():
        print(f"  {name:<40} {a:+7.1f} → {b:+7.1f} HU")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
