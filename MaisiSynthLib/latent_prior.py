"""Region levels of the latent: what the training latents hold, on average, for each label.

A small ControlNet draws the intensity of a region from the mask only while the latent is still mostly
noise (large t); there it predicts a value between the region's tissue and the tissues around it, and
the later steps restore detail, not level (Resources/models/demo/TRAINING.md: vertebrae come out at
~200 HU where the real ones are ~300). The latent prior corrects that level once, mid-trajectory:

- `fit_latent_prior` fits one latent vector per label to the posterior means μ of training cases, by
  least squares on the fraction of each latent voxel that the label covers (a latent voxel spans
  compression³ image voxels, and thin structures such as vertebrae fill few of them);
- at t = `latent_prior_from` · T the sampler takes its own one-step prediction x̂0, fits the same
  per-label vectors to x̂0 alone, and moves x̂0 by the difference between the prior's and its own,
  painted by the same fractions (`level_shift`). What x̂0 holds inside a region (texture, shape) is
  kept; only each region's mean moves. Tumors are left to the ControlNet: their contrast depends on
  the host organ's level in the case, which a label mean does not know.

The prior is `latent_prior.pt` in a model folder: a dict of tensors (loaded with weights_only=True),
label_means (256, C) in the UNet's scaled latent units and label_weight (256,), the fraction mass
each label had in the fit (0: never seen, never corrected).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from .errors import ModelError
from .labels import TUMOR_HOSTS
from .model_home import PRIOR_FILE  # noqa: F401 - re-exported

NUM_LABELS = 256  # MAISI label ids are 0..255 (the ControlNet's 8-bit code)
FORMAT_VERSION = 1
_RIDGE = 1e-6  # keeps the normal equations solvable when two labels always appear together


@dataclass
class LatentPrior:
    label_means: torch.Tensor  # (256, C) float32, scaled latent units
    label_weight: torch.Tensor  # (256,) float32, fraction mass in the fit
    compression: int

    def known(self, ids: torch.Tensor) -> torch.Tensor:
        return self.label_weight[ids] > 0


def label_fractions(labels: torch.Tensor, compression: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, fractions): the labels present in an (X, Y, Z) label volume and, per label, the fraction
    of each compression³ block it covers, (k, X/c, Y/c, Z/c) float32. Sizes must be multiples of c."""
    if labels.dim() != 3 or any(n % compression for n in labels.shape):
        raise ValueError(
            f"label volume {tuple(labels.shape)} is not 3-D with sizes that are multiples of {compression}"
        )
    labels = labels.long()
    if int(labels.min()) < 0 or int(labels.max()) >= NUM_LABELS:
        raise ValueError(f"label ids must be 0..{NUM_LABELS - 1}")
    ids, index = torch.unique(labels, return_inverse=True)
    c = compression
    nx, ny, nz = (n // c for n in labels.shape)
    bx = torch.arange(labels.shape[0]) // c
    by = torch.arange(labels.shape[1]) // c
    bz = torch.arange(labels.shape[2]) // c
    block = (bx[:, None, None] * ny + by[None, :, None]) * nz + bz[None, None, :]
    counts = torch.bincount((index * (nx * ny * nz) + block).reshape(-1), minlength=len(ids) * nx * ny * nz)
    return ids, (counts.float() / c**3).reshape(len(ids), nx, ny, nz)


def _normal_equations(fractions: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = fractions.reshape(fractions.shape[0], -1).double()
    y = latent.reshape(latent.shape[0], -1).double()
    return f @ f.T, f @ y.T


def _solve(ftf: torch.Tensor, fty: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(ftf.shape[0], dtype=ftf.dtype)
    return torch.linalg.solve(ftf + _RIDGE * eye, fty)


def region_levels(fractions: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """Per-label latent vectors (k, C) that, mixed by `fractions`, best fit `latent` (C, x, y, z)."""
    return _solve(*_normal_equations(fractions, latent)).float()


def fit_latent_prior(cases: Iterable[tuple[torch.Tensor, torch.Tensor]], compression: int) -> LatentPrior:
    """The prior from (labels (X, Y, Z), μ (C, X/c, Y/c, Z/c) in scaled latent units) pairs: one least
    squares fit over all cases together, so a label's vector is the one its voxels need on average."""
    ftf = fty = None
    for labels, latent in cases:
        ids, fractions = label_fractions(labels, compression)
        if fractions.shape[1:] != latent.shape[1:]:
            raise ValueError(
                f"latent {tuple(latent.shape)} does not match labels {tuple(labels.shape)} / {compression}"
            )
        a, b = _normal_equations(fractions, latent)
        if ftf is None:
            ftf = torch.zeros(NUM_LABELS, NUM_LABELS, dtype=torch.float64)
            fty = torch.zeros(NUM_LABELS, latent.shape[0], dtype=torch.float64)
        ftf[ids[:, None], ids[None, :]] += a
        fty[ids] += b
    if ftf is None:
        raise ValueError("no cases to fit the latent prior on")
    seen = (ftf.diagonal() > 0).nonzero()[:, 0]
    means = torch.zeros_like(fty)
    means[seen] = _solve(ftf[seen][:, seen], fty[seen])
    weight = torch.zeros(NUM_LABELS, dtype=torch.float64)
    weight[seen] = ftf[seen][:, seen].sum(1)  # Σ over voxels of the label's fraction
    return LatentPrior(means.float(), weight.float(), int(compression))


def level_shift(
    prior: LatentPrior, ids: torch.Tensor, fractions: torch.Tensor, x0: torch.Tensor, keep: Iterable[int] = ()
) -> torch.Tensor:
    """How far to move the predicted clean latent x0 (C, x, y, z) so that each region's level is the
    prior's: (prior − own) per-label vectors painted by `fractions`. Labels in `keep` and labels the
    prior never saw are not moved."""
    own = region_levels(fractions, x0.float().cpu())
    delta = prior.label_means[ids] - own
    moved = prior.known(ids) & ~torch.isin(ids, torch.tensor(sorted(set(keep)), dtype=torch.long))
    delta = delta * moved[:, None].float()
    shift = torch.einsum("kc,kxyz->cxyz", delta, fractions)
    return shift.to(device=x0.device, dtype=x0.dtype)


def save_latent_prior(prior: LatentPrior, path: str | Path) -> None:
    from .volumes import atomic_path

    data = {
        "label_means": prior.label_means.contiguous(),
        "label_weight": prior.label_weight.contiguous(),
        "compression": int(prior.compression),
        "format_version": FORMAT_VERSION,
    }
    with atomic_path(path) as tmp:
        torch.save(data, tmp)


def load_latent_prior(path: str | Path, channels: int, compression: int) -> LatentPrior:
    """Read and check a prior file against the model it belongs to (any other content is refused)."""
    from .models import load_checkpoint  # the one safe loader: weights_only, pickles refused

    path = Path(path)
    fix = "rebuild it with `maisi-synth fit-prior`, or delete it to sample without the prior"
    data = load_checkpoint(path)
    if not isinstance(data, dict):
        raise ModelError(f"{path.name} is not a dict of tensors", fix)
    means, weight = data.get("label_means"), data.get("label_weight")
    if not isinstance(means, torch.Tensor) or tuple(means.shape) != (NUM_LABELS, channels):
        raise ModelError(f"{path.name}: label_means must be a ({NUM_LABELS}, {channels}) tensor", fix)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (NUM_LABELS,):
        raise ModelError(f"{path.name}: label_weight must be a ({NUM_LABELS},) tensor", fix)
    if not means.is_floating_point() or not weight.is_floating_point():
        raise ModelError(f"{path.name}: label_means and label_weight must be floating point", fix)
    if not bool(torch.isfinite(means).all()) or not bool(torch.isfinite(weight).all()):
        raise ModelError(f"{path.name} holds non-finite values", fix)
    if data.get("compression") != compression or data.get("format_version") != FORMAT_VERSION:
        raise ModelError(
            f"{path.name} was fitted for compression {data.get('compression')!r} (format "
            f"{data.get('format_version')!r}); this model compresses by {compression}",
            fix,
        )
    return LatentPrior(means.float(), weight.float(), compression)


def fit_prior_for_model(models, cases: str | Path, progress=None, latents: str | Path | None = None) -> LatentPrior:
    """Fit the prior to every image/label pair of `cases`, in the UNet's scaled units (the units the
    sampler works in). The latents are the VAE's posterior means μ, or, with `latents`, the
    `<case name>.pt` files of a training run's latent cache (`<output_dir>/latents/<vae>-.../`, e.g.
    refined ones): the prior should hold what the UNet learnt from. Sizes must be multiples of the
    VAE's compression; a case the VAE cannot take, or a cached latent that is missing or does not
    fit its case, is refused before any encoding."""
    from .errors import OptionError
    from .training.data import load_cases

    c = models.compression
    loaded = load_cases(cases, size_multiple=c)
    if not loaded:
        raise OptionError(f"no image/label pairs in {cases}", "pass a folder of *_image/*_label NIfTI pairs")
    for case in loaded:  # before any encoding
        if int(case.labels.min()) < 0 or int(case.labels.max()) >= NUM_LABELS:
            raise OptionError(
                f"case {case.name} has label ids outside 0..{NUM_LABELS - 1}", "use MAISI label ids (0-255)"
            )
    scale = float(models.scale_factor)
    cached = None
    if latents is not None:
        cached = _cached_latents(Path(latents), loaded, models.folder.autoencoder_path, models.latent_channels, c)

    def pairs():
        for i, case in enumerate(loaded):
            if cached is not None:
                mu = cached[i]
            else:
                with torch.no_grad(), models.autocast():
                    mu = models.autoencoder.encode(case.image[None].to(models.device))[0][0]
            if progress is not None:
                progress(case.name)
            yield case.labels[0], mu.float().cpu() * scale

    return fit_latent_prior(pairs(), c)


def _cached_latents(folder: Path, cases: list, vae_path: Path, channels: int, compression: int) -> list[torch.Tensor]:
    """Each case's latent from `folder`, checked before the fit starts: the folder was encoded by the
    VAE file `vae_path`, and each latent is a finite tensor of its case's latent shape. Loaded with
    weights_only=True: a cache file is data, never code."""
    from .errors import OptionError
    from .training.common import file_fingerprint

    fix = "pass the latents folder of a run that trained on these cases with this model's VAE"
    if not folder.is_dir():
        raise OptionError(f"--latents {folder} is not a folder", fix)
    # A run names its latent cache after the VAE file that encoded it (training.common.cached_latents).
    vae = file_fingerprint(vae_path)
    if folder.name.split("-")[0] != vae:
        raise OptionError(
            f"--latents {folder} was not encoded by this model's VAE (its folder name does not start "
            f"with the VAE's fingerprint {vae})",
            f"pass <output_dir>/latents/{vae}-... of a run that used {vae_path.name} from this folder",
        )
    found = []
    for case in cases:
        path = folder / f"{case.name}.pt"
        if not path.is_file():
            raise OptionError(f"--latents {folder} has no latent for case {case.name} ({path.name})", fix)
        try:
            latent = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated file, a pickle with code: one message either way
            raise OptionError(f"cannot read the latent {path}: {type(exc).__name__}", fix) from None
        expected = (channels, *(n // compression for n in case.shape))
        if not isinstance(latent, torch.Tensor) or tuple(latent.shape) != expected:
            shape = list(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
            raise OptionError(f"the latent {path} is {shape}, not a tensor of shape {list(expected)}", fix)
        if not latent.is_floating_point() or not torch.isfinite(latent).all():
            raise OptionError(f"the latent {path} is not finite floating point", fix)
        found.append(latent)
    return found


def reference_level_shift(
    prior: LatentPrior | None,
    labels: torch.Tensor,
    compression: int,
    reference: torch.Tensor,
    free: torch.Tensor,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """For an edit of a reference CT: x̂0 (1, C, x, y, z) → the shift that gives each region drawn
    inside the edit (`free` > 0) the level the same label has in the reference's held latent.

    The patient's levels come from the reference latent where it is held (`free` == 0): there the
    labels are the scan's own. A label the held part does not show takes the model's prior level (if
    the model has a prior). A tumor takes its host's level in this patient plus the tumor − host
    difference of the model's prior: the lesion sits in this patient's organ with the contrast the
    model learnt; without a prior, tumors are left as drawn. Nothing moves outside the edit."""
    ids, fractions = label_fractions(labels, compression)
    free = free.reshape(fractions.shape[1:]).float().cpu()
    held = fractions * (free <= 0).float()
    mass = held.reshape(len(ids), -1).sum(1)
    patient = region_levels(held, reference.reshape(reference.shape[-4:]).float().cpu())
    seen = mass >= 1.0  # at least one latent voxel's worth of the label in the held part
    index = {int(k): i for i, k in enumerate(ids.tolist())}
    targets = torch.zeros_like(patient)
    moved = torch.zeros(len(ids), dtype=torch.bool)
    for i, label in enumerate(ids.tolist()):
        if label in TUMOR_HOSTS:
            hosts = [index[h] for h in TUMOR_HOSTS[label] if h in index and bool(seen[index[h]])]
            if not hosts or prior is None or not bool(prior.known(torch.tensor([label]))[0]):
                continue
            host = max(hosts, key=lambda j: float(mass[j]))
            if not bool(prior.known(ids[host : host + 1])[0]):
                continue
            targets[i] = patient[host] + prior.label_means[label] - prior.label_means[int(ids[host])]
            moved[i] = True
        elif bool(seen[i]):
            targets[i], moved[i] = patient[i], True
        elif prior is not None and bool(prior.known(ids[i : i + 1])[0]):
            targets[i], moved[i] = prior.label_means[label], True
    drawn = fractions * free

    def shift(x0: torch.Tensor) -> torch.Tensor:
        own = region_levels(drawn, x0[0].float().cpu())
        delta = (targets - own) * moved[:, None].float()
        out = torch.einsum("kc,kxyz->cxyz", delta, drawn)
        return out.to(device=x0.device, dtype=x0.dtype)[None]

    return shift
