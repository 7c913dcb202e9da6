"""How close synthetic CTs come to real ones, on held-out image/label pairs.

For every case the model generates a CT from the real label map and, with the same seed, from the
label map with each tumor replaced by its host organ. Measured:

- organ HU: median HU of each structure group in the synthetic vs the real CT (absolute error).
  Muscle is the labelled back muscles (autochthon 104/105); fat is the body-label voxels whose real
  HU is below −50 (subcutaneous and visceral fat have no MAISI label), the same voxels in both CTs.
  Three coarse regions serve masks with few structures (body, lobes, bones, a lesion): soft tissue
  is every body-label (200) voxel, bone every bone and costal cartilage, lung the lobes;
- organ HU floor: the phantoms (and patients) differ in organ HU for reasons a label map cannot show
  (enhancement, the random HU of each phantom organ), so no model that sees only the mask can beat,
  on average, drawing each organ at one HU in every case; the best such HU is the real cases' median
  and its error, mean |real − median(real)|, is reported as the floor next to each organ's error;
- tumor conspicuity: median(tumor) − median(host organ), synthetic vs real, per tumor type;
- ROI sensitivity: mean |CT(mask) − CT(mask without tumors)| inside the tumors, and the same over
  body voxels outside the tumors dilated by 3 voxels (background change) — how much the model
  follows the lesion, and how much else moves when it does;
- slice distance: a Fréchet distance between real and synthetic axial, coronal and sagittal slices
  in the feature space of a fixed, seeded random convolutional network (no download, so it is
  reproducible anywhere). Its absolute value has no meaning across feature extractors; it is for
  comparing models and settings (steps, solvers) on the same cases, lower is closer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from . import labels as L
from .cases import find_pairs
from .masks import remove_tumors
from .request import DEFAULTS, check_options
from .volumes import atomic_path, to_canonical

ORGAN_GROUPS: dict[str, tuple[int, ...]] = {
    "liver": (1,),
    "spleen": (3,),
    "kidneys": L.KIDNEYS,
    "pancreas": (4,),
    "lung": L.LUNG_LOBES,
    "muscle": (104, 105),
    "vertebrae": tuple(range(33, 57)),
    "soft tissue": (L.BODY,),
    "bone": L.BONES + (L.COSTAL_CARTILAGES,),
}
FAT_BELOW_HU = -50.0
BACKGROUND_DILATION = 3  # voxels around the tumors excluded from the background change


def median_of(image: np.ndarray, where: np.ndarray) -> float | None:
    return float(np.median(image[where])) if where.any() else None


def organ_medians(image: np.ndarray, labels: np.ndarray, real: np.ndarray) -> dict[str, float | None]:
    """Median HU per group; `real` defines the fat voxels (body label, real HU below −50)."""
    out = {name: median_of(image, np.isin(labels, ids)) for name, ids in ORGAN_GROUPS.items()}
    out["fat"] = median_of(image, (labels == L.BODY) & (real < FAT_BELOW_HU))
    return out


def tumor_contrast(image: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """median(tumor) − median(its host organ), per tumor id present (host: the tumor's host ids)."""
    out = {}
    for tumor, hosts in L.TUMOR_HOSTS.items():
        lesion = labels == tumor
        host = np.isin(labels, hosts)
        if lesion.any() and host.any():
            out[tumor] = float(np.median(image[lesion]) - np.median(image[host]))
    return out


def roi_sensitivity(ct: np.ndarray, ct_free: np.ndarray, labels: np.ndarray) -> tuple[float | None, float | None]:
    """(mean |Δ| inside the tumors, mean |Δ| over body voxels outside the dilated tumors)."""
    tumors = np.isin(labels, L.TUMORS)
    if not tumors.any():
        return None, None
    diff = np.abs(ct.astype(np.float64) - ct_free.astype(np.float64))
    near = ndimage.binary_dilation(tumors, iterations=BACKGROUND_DILATION)
    outside = (labels > 0) & ~near
    return float(diff[tumors].mean()), float(diff[outside].mean()) if outside.any() else None


# ---------------------------------------------------------------------------------------------------
# Slice distance


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), the Fréchet distance of two Gaussians."""
    # tr((Σ1 Σ2)^½) = Σ √eig(Σ1^½ Σ2 Σ1^½): symmetric eigenproblems, stable for singular covariances
    w, v = np.linalg.eigh(cov1)
    half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(half @ cov2 @ half), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2.0 * cross)


class SliceFeatures(torch.nn.Module):
    """A fixed random 2-D CNN (seeded): slice → 64 pooled features. Weights never change."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        channels = [1, 16, 32, 64]
        self.convs = torch.nn.ModuleList()
        for cin, cout in zip(channels[:-1], channels[1:]):
            conv = torch.nn.Conv2d(cin, cout, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / (cin * 9)) ** 0.5)
                conv.bias.zero_()
            self.convs.append(conv)
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        x = slices
        for conv in self.convs:
            x = torch.relu(conv(x))
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


def slice_stack(ct: np.ndarray, axis: int, every: int = 2) -> torch.Tensor:
    """Slices along `axis`, HU windowed to [−1000, 1000] → [0, 1], resized to 64×64."""
    moved = np.moveaxis(ct, axis, 0)[::every].astype(np.float32)
    x = torch.from_numpy(np.clip((moved + 1000.0) / 2000.0, 0.0, 1.0))[:, None]
    return torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)


def slice_distances(real: list[np.ndarray], synthetic: list[np.ndarray], seed: int = 0) -> dict[str, float]:
    """Fréchet distance per plane between real and synthetic slice features (all cases pooled)."""
    net = SliceFeatures(seed)
    out = {}
    for plane, axis in (("sagittal", 0), ("coronal", 1), ("axial", 2)):
        feats = []
        for volumes in (real, synthetic):
            f = torch.cat([net(slice_stack(v, axis)) for v in volumes]).double().numpy()
            feats.append((f.mean(0), np.cov(f, rowvar=False)))
        out[plane] = frechet_distance(feats[0][0], feats[0][1], feats[1][0], feats[1][1])
    out["mean"] = float(np.mean(list(out.values())))
    return out


# ---------------------------------------------------------------------------------------------------
# The evaluation run


@dataclass
class CaseResult:
    name: str
    organ_error: dict = field(default_factory=dict)  # group → |synthetic − real| median HU
    organ_signed_error: dict = field(default_factory=dict)  # group → synthetic − real median HU
    organ_real: dict = field(default_factory=dict)
    organ_synthetic: dict = field(default_factory=dict)
    contrast_real: dict = field(default_factory=dict)  # tumor id → HU
    contrast_synthetic: dict = field(default_factory=dict)
    roi_change: float | None = None
    background_change: float | None = None
    seconds: float = 0.0


def load_canonical(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(path))
    return to_canonical(np.asanyarray(image.dataobj), image.affine)


def evaluate(
    model_dir: str | Path | None,
    cases: str | Path,
    steps: int | None = DEFAULTS["steps"],
    seed: int = DEFAULTS["seed"],
    solver: str = DEFAULTS["solver"],
    device: str = DEFAULTS["device"],
    save_dir: str | Path | None = None,
    roi: bool = True,
    progress: Callable[[str], None] | None = None,
    mask_guidance: float | None = None,
    latent_prior_from: float | None = None,
) -> dict:
    """Generate a CT for every held-out case and measure it against the real one (see module doc)."""
    import time

    from .masks import Mask, read_mask, validate_labels
    from .model_home import choose_model_dir
    from .models import load_models, locate_model_folder
    from .pipeline import generate_volume
    from .volumes import nifti_volume, save_volume

    # the request options once, before the model loads (each case's request is checked again)
    shared = dict(
        steps=steps,
        seed=seed,
        solver=solver,
        device=device,
        mask_guidance=mask_guidance,
        latent_prior_from=latent_prior_from,
    )
    check_options(model_dir=None if model_dir is None else str(model_dir), **shared)
    choice = choose_model_dir(model_dir)
    folder = locate_model_folder(choice.path)
    models = load_models(folder, device)
    pairs = find_pairs(cases)
    # CTs are kept only when asked for; the measures use the arrays in memory, never a file read back
    work = Path(save_dir) if save_dir else None
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
    options = dict(model_dir=str(folder.root), **shared)

    def keep(path: Path, array: np.ndarray, affine: np.ndarray, like) -> None:
        with atomic_path(path) as tmp:
            save_volume(tmp, array, affine, like)

    results: list[CaseResult] = []
    reals, synthetics = [], []
    for name, image_path, label_path in pairs:
        started = time.perf_counter()
        real, _ = load_canonical(image_path)
        mask = read_mask(label_path)
        labels, _ = to_canonical(mask.labels, mask.affine)
        labels = labels.astype(np.int16)
        ct = generate_volume(mask, options, models=models)
        synthetic, _ = to_canonical(ct.hu, ct.affine)
        if work is not None:
            keep(work / f"{name}_synthetic.nii.gz", ct.hu, ct.affine, mask.volume)
        result = CaseResult(name)
        result.organ_real = organ_medians(real, labels, real)
        result.organ_synthetic = organ_medians(synthetic, labels, real)
        result.organ_error = {
            k: abs(result.organ_synthetic[k] - v)
            for k, v in result.organ_real.items()
            if v is not None and result.organ_synthetic[k] is not None
        }
        result.organ_signed_error = {
            k: result.organ_synthetic[k] - v
            for k, v in result.organ_real.items()
            if v is not None and result.organ_synthetic[k] is not None
        }
        result.contrast_real = tumor_contrast(real, labels)
        result.contrast_synthetic = tumor_contrast(synthetic, labels)
        if roi and np.isin(labels, L.TUMORS).any():
            free = validate_labels(remove_tumors(mask.labels), label_path.name)
            # the header a label file saved by nibabel has (how the tumor-free mask was kept before)
            free_mask = Mask(free, mask.affine, str(label_path), nifti_volume(free, mask.affine, codes=False))
            free_ct = generate_volume(free_mask, options, models=models)
            ct_free, _ = to_canonical(free_ct.hu, free_ct.affine)
            if work is not None:
                with atomic_path(work / f"{name}_label_tumor_free.nii.gz") as tmp:
                    nib.save(nib.Nifti1Image(free, mask.affine), str(tmp))
                keep(work / f"{name}_synthetic_tumor_free.nii.gz", free_ct.hu, free_ct.affine, free_mask.volume)
            result.roi_change, result.background_change = roi_sensitivity(synthetic, ct_free, labels)
        result.seconds = time.perf_counter() - started
        results.append(result)
        reals.append(real)
        synthetics.append(synthetic)
        if progress is not None:
            progress(name)
    summary = summarize(results)
    summary["slice_frechet"] = slice_distances(reals, synthetics) if len(pairs) else {}
    summary["settings"] = {
        "model": folder.name,
        "model_dir": str(folder.root),
        "using": choice.describe(),
        "cases": str(cases),
        "steps": steps,
        "seed": seed,
        "solver": solver,
        "mask_guidance": mask_guidance,  # None: the model's
        "latent_prior_from": latent_prior_from,  # None: the model's
    }
    summary["cases"] = [r.__dict__ for r in results]
    return summary


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarize(results: list[CaseResult]) -> dict:
    groups = list(ORGAN_GROUPS) + ["fat"]
    organ = {g: _mean([r.organ_error.get(g) for r in results]) for g in groups}
    signed = {g: _mean([r.organ_signed_error.get(g) for r in results]) for g in groups}
    floor = {}
    for g in groups:
        real = [r.organ_real[g] for r in results if g in r.organ_error]
        floor[g] = float(np.mean(np.abs(np.array(real) - np.median(real)))) if real else None
    tumors = sorted({t for r in results for t in r.contrast_real})
    contrast = {}
    for t in tumors:
        real = _mean([r.contrast_real.get(t) for r in results])
        synthetic = _mean([r.contrast_synthetic.get(t) for r in results])
        contrast[L.name_of(t)] = {"real": real, "synthetic": synthetic, "ratio": synthetic / real if real else None}
    return {
        "organ_median_abs_error_hu": organ,
        "organ_median_signed_error_hu": signed,
        "organ_error_floor_hu": floor,
        "tumor_conspicuity_hu": contrast,
        "roi_change_hu": _mean([r.roi_change for r in results]),
        "background_change_hu": _mean([r.background_change for r in results]),
    }


def format_table(summary: dict) -> str:
    lines = ["organ          |median HU error|   signed   floor (one HU for every case)"]
    signed = summary.get("organ_median_signed_error_hu", {})
    floor = summary.get("organ_error_floor_hu", {})
    for group, value in summary["organ_median_abs_error_hu"].items():
        if value is None:
            continue
        f = floor.get(group)
        lines.append(
            f"  {group:<13} {value:7.1f}         {signed.get(group, 0.0):+7.1f}  {'' if f is None else f'{f:7.1f}'}"
        )
    lines.append("tumor conspicuity (tumor − host median HU)   real   synthetic   ratio")
    for name, c in summary["tumor_conspicuity_hu"].items():
        ratio = "—" if c["ratio"] is None else f"{c['ratio']:.2f}"
        lines.append(f"  {name:<40} {c['real']:7.1f} {c['synthetic']:9.1f} {ratio:>7}")
    fmt = lambda v: "—" if v is None else f"{v:.1f} HU"  # noqa: E731
    lines.append(
        f"ROI sensitivity: inside tumors {fmt(summary['roi_change_hu'])}, background {fmt(summary['background_change_hu'])}"
    )
    if summary.get("slice_frechet"):
        f = summary["slice_frechet"]
        lines.append("slice Fréchet distance: " + ", ".join(f"{k} {v:.3f}" for k, v in f.items()))
    return "\n".join(lines)


def write_json(summary: dict, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2, default=float) + "\n", encoding="utf-8")
