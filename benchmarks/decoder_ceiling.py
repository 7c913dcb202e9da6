"""What the decoder can draw, given the best latent: is a lost lesion the encoder's fault or the decoder's?

For each held-out case, a box around its lesions of the chosen kinds is encoded (μ), then the latent
alone is optimised (Adam, decoder frozen) to reproduce the real box: an L1 with the lesion voxels
weighted. Printed per lesion: real contrast (lesion − host median HU), decode(μ), decode(optimised
latent), and how far the latent had to move (RMS, as a share of μ's spread). If the optimised
latent draws the lesion and μ does not, the decoder can draw it and the encoder is what a better
VAE-alone number needs; if neither does, the decoder is the limit.

    .venv/bin/python benchmarks/decoder_ceiling.py --cases runs/results/heldout8 [--model-dir D]
        [--tumors 26 23] [--iterations 60] [--lesion-weight 20]

One to two minutes per case on 2 CPU cores at the defaults (13 min for the held-out 8).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vae_reconstruction import to_hu, to_unit  # noqa: E402  (this folder: the same HU scaling)

from MaisiSynthLib import labels as L  # noqa: E402
from MaisiSynthLib.cases import find_pairs  # noqa: E402
from MaisiSynthLib.evaluation import load_canonical, tumor_contrast  # noqa: E402
from MaisiSynthLib.models import compression_of, load_models  # noqa: E402
from MaisiSynthLib.pipeline import default_model_dir  # noqa: E402

MARGIN = 24  # voxels of context around the lesions: the decoder's receptive field reaches that far


def lesion_box(labels: np.ndarray, tumors: tuple[int, ...], c: int) -> tuple[slice, ...]:
    """A box around the lesions with MARGIN voxels of context, on whole latent voxels."""
    where = np.argwhere(np.isin(labels, tumors))
    lo = [max(0, (int(a) - MARGIN) // c * c) for a in where.min(0)]
    hi = [min(n // c * c, -(-(int(b) + MARGIN + 1) // c) * c) for b, n in zip(where.max(0), labels.shape)]
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", required=True, help="folder of caseNNNN_image/_label.nii.gz pairs")
    parser.add_argument("--model-dir", default=str(default_model_dir()))
    parser.add_argument("--tumors", type=int, nargs="+", default=[L.HEPATIC_TUMOR, L.LUNG_TUMOR])
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--lesion-weight", type=float, default=20.0)
    parser.add_argument("--lr", type=float, default=0.02)
    args = parser.parse_args()
    torch.manual_seed(0)
    models = load_models(args.model_dir, "cpu")
    autoencoder = models.autoencoder.eval().requires_grad_(False)
    c = compression_of(models.config)
    tumors = tuple(args.tumors)
    rows: dict[int, list[tuple[float, float, float]]] = {}
    started = time.perf_counter()

    def decode_hu(z: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return to_hu(autoencoder.decode(z))

    for name, image_path, label_path in find_pairs(args.cases):
        labels = load_canonical(label_path)[0].astype(np.int16)
        if not np.isin(labels, tumors).any():
            continue
        box = lesion_box(labels, tumors, c)
        labels = labels[box]
        real = load_canonical(image_path)[0].astype(np.float32)[box]
        x = to_unit(real)
        with torch.no_grad():
            mu = autoencoder.encode(x)[0]
        weight = torch.ones_like(x)
        weight[0, 0][torch.from_numpy(np.isin(labels, L.TUMORS))] = args.lesion_weight
        z = mu.clone().requires_grad_(True)
        optimiser = torch.optim.Adam([z], lr=args.lr)
        for _ in range(args.iterations):
            optimiser.zero_grad()
            loss = ((autoencoder.decode(z) - x).abs() * weight).sum() / weight.sum()
            loss.backward()
            optimiser.step()
        z = z.detach()
        move = float((z - mu).pow(2).mean().sqrt() / mu.std())
        truth, from_mu, from_best = (tumor_contrast(v, labels) for v in (real, decode_hu(mu), decode_hu(z)))
        for tumor in tumors:
            if tumor in truth and tumor in from_mu:
                rows.setdefault(tumor, []).append((truth[tumor], from_mu[tumor], from_best[tumor]))
                print(
                    f"{name} {L.name_of(tumor):<24} real {truth[tumor]:+7.1f}  decode(μ) {from_mu[tumor]:+7.1f}  "
                    f"decode(best) {from_best[tumor]:+7.1f} HU  latent moved {move:.2f} of μ's spread",
                    flush=True,
                )
    print(f"mean over cases ({time.perf_counter() - started:.0f} s):")
    for tumor, values in rows.items():
        real, from_mu, from_best = np.mean(values, axis=0)
        print(f"  {L.name_of(tumor):<24} decode(μ) {from_mu / real:.2f}×  decode(best latent) {from_best / real:.2f}×")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
