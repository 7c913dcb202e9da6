"""Training losses: the rectified-flow loss and MAISI-v2's region-specific contrastive loss.

Rectified flow (MONAI's `RFlowScheduler.add_noise`): x_t = (1 − t/T)·x0 + (t/T)·noise, and the
network regresses the velocity x0 − noise.

The region-specific contrastive loss makes the ControlNet follow small regions (tumors) that the flow
loss barely sees. The mask c is paired with a perturbed mask c' without the ROI, both pass through
ControlNet + UNet on the same noisy latent, and

    L_roi = −min(D_roi, δ),  D_roi = mean over the ROI of |v(c) − v(c')|     (push apart inside)
    L_bg  = mean over 1 − dilate(ROI) of
              paper:    |v(c) − v(c')|          (the two predictions agree outside the ROI)
              official: |v(c') − (x0 − noise)|  (the perturbed prediction is a good flow outside)
    L     = L_flow + λ (L_roi + L_bg),  λ = 0.01, δ = 2.

A constant δ pushes every lesion equally far: a faint hepatic lesion (−60 HU) is overdrawn long before
a lung nodule (+700 HU) reaches δ. With margin "target" (`lesion_margin`) each sample's δ is how far
its own lesion's latent lies from the surrounding tissue, mean over the ROI of |x0 − host|, host being
the per-channel mean of x0 in a one-voxel latent ring around the ROI, capped at the constant δ. The
push then stops where the real image stops; the true velocity gap at timestep fraction s is that
distance / s, so the margin is the gap at the noisiest step and an underestimate elsewhere (the flow
loss, not the push, sets the contrast there).

|v − v'| has no sign: a push that only asks for distance may darken a lesion the real image shows
bright (colon masses drawn as bowel gas). Margin "signed" also measures v − v' along
sign(x0 − host) — v(c) − v(c') = (x̂0(c) − x̂0(c')) / s on the same x_t, and x̂0(c') is host tissue —
so only moving towards the real lesion counts, up to the same margin.

The ROI is where c and c' differ (at image resolution, as in the official code); the background is
the complement of the ROI dilated by one voxel (3×3×3). Both are brought to latent resolution by
max-pooling — a latent voxel touched by the ROI counts as ROI, and counts as background only if its
whole image block is outside the dilated ROI — so a tumor smaller than one latent voxel still has
an ROI (the official nearest-neighbour resize can drop it). Each term is averaged per sample, then
over the batch, so a batch split across GPUs gives the same loss as one process (the official code
pools the batch; identical at its batch size of 1). An empty ROI gives zero for that sample.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import labels as L
from .masks import remove_tumors

BACKGROUND_TERMS = ("paper", "official")
MARGINS = ("constant", "target", "signed")
# Which predictions the ROI term moves: both (the paper) or only the one for the real mask, leaving
# the tumor-free prediction to the background term.
PUSHES = ("both", "mask")
PERTURBATIONS = ("host", "background")


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity a rectified-flow network regresses (MONAI's add_noise convention)."""
    return x0 - noise


def flow_loss(
    v_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, kind: str = "l1", weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean L1 or L2 distance to the velocity x0 − noise, optionally voxel-weighted (weights broadcast)."""
    diff = v_pred.float() - flow_target(x0, noise).float()
    if kind == "l1":
        per_voxel = diff.abs()
    elif kind == "l2":
        per_voxel = diff.square()
    else:
        raise ValueError(f"flow loss must be 'l1' or 'l2', got {kind!r}")
    if weights is not None:
        per_voxel = per_voxel * weights
    return per_voxel.mean()


def perturb_mask(labels: torch.Tensor, mode: str = "host") -> torch.Tensor:
    """The perturbed condition c': every tumor replaced by its host organ (official) or by background.

    `labels` is (B, 1, X, Y, Z); the result has the same shape, dtype and device.
    """
    if mode not in PERTURBATIONS:
        raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {mode!r}")
    out = labels.clone()
    if mode == "background":
        out[torch.isin(labels, torch.tensor(L.TUMORS, device=labels.device))] = 0
        return out
    for b in range(labels.shape[0]):
        sample = labels[b, 0].cpu().numpy().astype(np.int16)
        out[b, 0] = torch.from_numpy(remove_tumors(sample).astype(np.int64)).to(labels.device, labels.dtype)
    return out


def roi_masks(
    labels: torch.Tensor, perturbed: torch.Tensor, latent_size: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ROI, background) at latent resolution, (B, 1, x, y, z) float 0/1, from image-resolution masks."""
    roi = (labels != perturbed).float()
    dilated = F.max_pool3d(roi, kernel_size=3, stride=1, padding=1)
    roi_latent = F.adaptive_max_pool3d(roi, latent_size)
    background = 1.0 - F.adaptive_max_pool3d(dilated, latent_size)
    return roi_latent, background


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of `values` (B, C, ...) over `mask` (B, 1, ...); 0 where the mask is empty."""
    mask = mask.expand_as(values)
    dims = tuple(range(1, values.ndim))
    total = (values * mask).sum(dim=dims)
    count = mask.sum(dim=dims)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def lesion_contrast(x0: torch.Tensor, roi: torch.Tensor) -> torch.Tensor:
    """x0 − host (B, C, ...): how the clean latent differs from the tissue around the ROI.

    `x0` is the clean latent (B, C, ...), `roi` the latent-resolution ROI (B, 1, ...) from `roi_masks`;
    host is x0's per-channel mean over the ROI dilated by one latent voxel, minus the ROI.
    """
    x0 = x0.float()
    ring = F.max_pool3d(roi, kernel_size=3, stride=1, padding=1) - roi
    dims = tuple(range(2, x0.ndim))
    host = (x0 * ring).sum(dim=dims) / ring.sum(dim=dims).clamp(min=1)  # (B, C)
    return x0 - host.reshape(*host.shape, *([1] * len(dims)))


def lesion_margin(contrast: torch.Tensor, roi: torch.Tensor, delta: float) -> torch.Tensor:
    """Per-sample δ (B,): mean over the ROI of |x0 − host| (`lesion_contrast`), capped at `delta`; 0
    where the ROI is empty."""
    return _masked_mean(contrast.abs(), roi).clamp(max=delta)


def region_contrastive_loss(
    v: torch.Tensor,
    v_perturbed: torch.Tensor,
    v_target: torch.Tensor,
    roi: torch.Tensor,
    background: torch.Tensor,
    delta: float | torch.Tensor = 2.0,
    background_term: str = "paper",
    direction: torch.Tensor | None = None,
    push: str = "both",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_roi, L_bg), each averaged over the batch; `delta` a number or one per sample (B,).

    With `direction` (±1 like v) the ROI term measures v − v' along it instead of |v − v'|. With
    `push="mask"` the ROI term moves v only (v' is a constant there).
    """
    if background_term not in BACKGROUND_TERMS:
        raise ValueError(f"background term must be one of {BACKGROUND_TERMS}, got {background_term!r}")
    if push not in PUSHES:
        raise ValueError(f"push must be one of {PUSHES}, got {push!r}")
    v, v_perturbed, v_target = v.float(), v_perturbed.float(), v_target.float()
    pushed = v_perturbed.detach() if push == "mask" else v_perturbed
    gap = (v - pushed).abs() if direction is None else (v - pushed) * direction
    d_roi = _masked_mean(gap, roi)
    l_roi = -torch.minimum(d_roi, torch.as_tensor(delta, dtype=d_roi.dtype, device=d_roi.device))
    if background_term == "paper":
        l_bg = _masked_mean((v - v_perturbed).abs(), background)
    else:
        l_bg = _masked_mean((v_perturbed - v_target).abs(), background)
    return l_roi.mean(), l_bg.mean()
