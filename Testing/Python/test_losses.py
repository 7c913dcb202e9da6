"""Losses: hand-computed values for the flow loss and each term of the region-specific contrastive loss."""

from __future__ import annotations

import pytest
import torch

from MaisiSynthLib import labels as L
from MaisiSynthLib.losses import (
    flow_loss,
    flow_target,
    lesion_contrast,
    lesion_margin,
    perturb_mask,
    region_contrastive_loss,
    roi_masks,
)


def test_flow_target_follows_monais_add_noise():
    from monai.networks.schedulers import RFlowScheduler

    scheduler = RFlowScheduler(1000, use_discrete_timesteps=False)
    x0, noise = torch.randn(2, 4, 4, 4, 4), torch.randn(2, 4, 4, 4, 4)
    t = torch.tensor([250.0, 750.0])
    x_t = scheduler.add_noise(x0, noise, t)
    # moving x_t along the target velocity for time t/T lands on x0
    x_back = x_t + flow_target(x0, noise) * (t / 1000).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(x_back, x0)


def test_flow_loss_l1_l2_and_weights():
    x0 = torch.zeros(1, 1, 1, 1, 2)
    noise = torch.tensor([1.0, -2.0]).view(1, 1, 1, 1, 2)  # target velocity x0 - noise = [-1, 2]
    v = torch.tensor([0.0, 0.0]).view(1, 1, 1, 1, 2)
    assert flow_loss(v, x0, noise, "l1").item() == pytest.approx((1 + 2) / 2)
    assert flow_loss(v, x0, noise, "l2").item() == pytest.approx((1 + 4) / 2)
    w = torch.tensor([1.0, 3.0]).view(1, 1, 1, 1, 2)
    assert flow_loss(v, x0, noise, "l1", weights=w).item() == pytest.approx((1 + 6) / 2)


def _one_roi_case():
    """A 1-sample, 1-channel latent of 4 voxels in a row: voxel 0 is ROI, voxel 3 is background."""
    roi = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 1, 4)
    bg = torch.tensor([0.0, 0.0, 0.0, 1.0]).view(1, 1, 1, 1, 4)
    v = torch.tensor([0.5, 9.0, 9.0, 1.0]).view(1, 1, 1, 1, 4)
    v_p = torch.tensor([0.0, 0.0, 0.0, 0.25]).view(1, 1, 1, 1, 4)
    target = torch.tensor([7.0, 7.0, 7.0, 2.0]).view(1, 1, 1, 1, 4)
    return v, v_p, target, roi, bg


def test_roi_and_background_terms_by_hand():
    v, v_p, target, roi, bg = _one_roi_case()
    l_roi, l_bg = region_contrastive_loss(v, v_p, target, roi, bg, delta=2.0, background_term="paper")
    assert l_roi.item() == pytest.approx(-0.5)  # −|0.5 − 0|
    assert l_bg.item() == pytest.approx(0.75)  # |1 − 0.25|, voxels 1-2 (dilated ROI) ignored
    _, l_bg_official = region_contrastive_loss(v, v_p, target, roi, bg, delta=2.0, background_term="official")
    assert l_bg_official.item() == pytest.approx(1.75)  # |0.25 − 2|


def test_roi_term_is_capped_at_delta():
    v, v_p, target, roi, bg = _one_roi_case()
    v = v.clone()
    v[..., 0] = 5.0  # D_roi = 5 > δ
    v.requires_grad_(True)
    l_roi, _ = region_contrastive_loss(v, v_p, target, roi, bg, delta=2.0)
    assert l_roi.item() == pytest.approx(-2.0)
    l_roi.backward()
    assert torch.count_nonzero(v.grad) == 0  # beyond the cap there is nothing left to push


def test_lesion_margin_is_the_lesions_distance_from_its_ring_by_hand():
    """Two samples, two channels, five latent voxels in a row; the ROI is voxel 2 (sample 0) or empty."""
    x0 = torch.tensor(
        [
            [[1.0, 1.0, 3.0, 3.0, 9.0], [0.0, 2.0, -1.0, 0.0, 9.0]],
            [[5.0, 5.0, 5.0, 5.0, 5.0], [5.0, 5.0, 5.0, 5.0, 5.0]],
        ]
    ).view(2, 2, 1, 1, 5)
    roi = torch.tensor([[0.0, 0, 1, 0, 0], [0.0, 0, 0, 0, 0]]).view(2, 1, 1, 1, 5)
    contrast = lesion_contrast(x0, roi)
    margin = lesion_margin(contrast, roi, delta=10.0)
    # ring = voxels 1 and 3 (voxel 4 is two away): host = (2, 1); |3 − 2| and |−1 − 1| → mean 1.5
    torch.testing.assert_close(margin, torch.tensor([1.5, 0.0]))
    torch.testing.assert_close(lesion_margin(contrast, roi, delta=1.0), torch.tensor([1.0, 0.0]))


def test_roi_term_takes_one_delta_per_sample():
    """Sample 0 is capped at its own δ = 0.25 (no push left), sample 1 is below its δ = 2 (pushed)."""
    roi = torch.ones(2, 1, 1, 1, 2)
    v = torch.full((2, 1, 1, 1, 2), 0.5, requires_grad=True)
    zero = torch.zeros_like(v)
    l_roi, _ = region_contrastive_loss(v, zero, zero, roi, torch.zeros_like(roi), delta=torch.tensor([0.25, 2.0]))
    assert l_roi.item() == pytest.approx(-(0.25 + 0.5) / 2)
    (grad,) = torch.autograd.grad(l_roi, v)
    assert grad[0].abs().max() == 0 and grad[1].abs().min() > 0


def test_signed_roi_term_only_counts_moving_towards_the_lesion():
    """v − v' = (+0.5, −0.5) in a 2-voxel ROI; the real lesion is brighter in both voxels."""
    roi = torch.ones(1, 1, 1, 1, 2)
    v = torch.tensor([0.5, -0.5]).view(1, 1, 1, 1, 2).requires_grad_(True)
    zero = torch.zeros_like(v)
    x0 = torch.tensor([3.0, 3.0]).view(1, 1, 1, 1, 2)  # no ring: host 0, so x0 − host = x0
    direction = torch.sign(lesion_contrast(x0, roi))
    unsigned, _ = region_contrastive_loss(v, zero, zero, roi, torch.zeros_like(roi), delta=2.0)
    signed, _ = region_contrastive_loss(v, zero, zero, roi, torch.zeros_like(roi), delta=2.0, direction=direction)
    assert unsigned.item() == pytest.approx(-0.5) and signed.item() == pytest.approx(0.0)  # the darkening cancels
    (grad,) = torch.autograd.grad(signed, v)
    assert (grad < 0).all()  # descending the loss raises both voxels, the one drawn darker too


def test_empty_roi_gives_zero_and_no_gradient():
    v, v_p, target, _, bg = _one_roi_case()
    v.requires_grad_(True)
    l_roi, _ = region_contrastive_loss(v, v_p, target, torch.zeros_like(bg), bg)
    assert l_roi.item() == 0.0
    l_roi.backward()
    assert torch.count_nonzero(v.grad) == 0


def test_terms_are_averaged_per_sample():
    """Sample 0: ROI of 1 voxel with |Δ| = 1; sample 1: ROI of 3 voxels with |Δ| = 0.5 → mean(1, 0.5)."""
    roi = torch.tensor([[1.0, 0, 0, 0], [1.0, 1, 1, 0]]).view(2, 1, 1, 1, 4)
    v = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0.5, 0]]).view(2, 1, 1, 1, 4)
    zero = torch.zeros_like(v)
    l_roi, _ = region_contrastive_loss(v, zero, zero, roi, torch.zeros_like(roi))
    assert l_roi.item() == pytest.approx(-(1.0 + 0.5) / 2)


def test_gradients_stay_in_their_regions():
    """The ROI term moves predictions only inside the ROI; the background term only outside the dilated ROI."""
    labels = torch.full((1, 1, 16, 16, 16), 1, dtype=torch.long)  # liver
    labels[0, 0, 6:9, 6:9, 6:9] = L.HEPATIC_TUMOR
    perturbed = perturb_mask(labels)
    roi, bg = roi_masks(labels, perturbed, (4, 4, 4))
    v = torch.randn(1, 4, 4, 4, 4, requires_grad=True)
    v_p = torch.randn(1, 4, 4, 4, 4, requires_grad=True)
    target = torch.randn(1, 4, 4, 4, 4)
    l_roi, _ = region_contrastive_loss(v, v_p, target, roi, bg, delta=100.0)
    grad_v, grad_vp = torch.autograd.grad(l_roi, (v, v_p))
    outside_roi = (roi == 0).expand_as(grad_v)
    assert grad_v[~outside_roi].abs().min() > 0 and grad_v[outside_roi].abs().max() == 0
    assert grad_vp[outside_roi].abs().max() == 0
    _, l_bg = region_contrastive_loss(v, v_p, target, roi, bg, background_term="paper")
    grad_v, grad_vp = torch.autograd.grad(l_bg, (v, v_p))
    in_bg = (bg == 1).expand_as(grad_v)
    assert grad_v[in_bg].abs().min() > 0 and grad_v[~in_bg].abs().max() == 0
    assert grad_vp[~in_bg].abs().max() == 0


def test_mask_push_moves_only_the_prediction_for_the_real_mask():
    """push="mask": the ROI term has the same value, but no gradient reaches v' (the tumor-free
    prediction), while the background term still ties v' to v outside."""
    labels = torch.full((1, 1, 16, 16, 16), 1, dtype=torch.long)
    labels[0, 0, 6:9, 6:9, 6:9] = L.HEPATIC_TUMOR
    roi, bg = roi_masks(labels, perturb_mask(labels), (4, 4, 4))
    v = torch.randn(1, 4, 4, 4, 4, requires_grad=True)
    v_p = torch.randn(1, 4, 4, 4, 4, requires_grad=True)
    target = torch.randn(1, 4, 4, 4, 4)
    both, _ = region_contrastive_loss(v, v_p, target, roi, bg, delta=100.0)
    mask_only, l_bg = region_contrastive_loss(v, v_p, target, roi, bg, delta=100.0, push="mask")
    assert mask_only.item() == pytest.approx(both.item())
    grad_v, grad_vp = torch.autograd.grad(mask_only, (v, v_p), allow_unused=True)
    assert grad_v.abs().max() > 0 and (grad_vp is None or grad_vp.abs().max() == 0)
    assert torch.autograd.grad(both, v_p)[0].abs().max() > 0
    assert torch.autograd.grad(l_bg, v_p)[0].abs().max() > 0
    with pytest.raises(ValueError, match="push"):
        region_contrastive_loss(v, v_p, target, roi, bg, push="tumor")


def test_roi_masks_at_latent_resolution():
    labels = torch.full((1, 1, 16, 16, 16), 1, dtype=torch.long)
    labels[0, 0, 5, 5, 5] = L.HEPATIC_TUMOR  # one image voxel: smaller than a latent voxel
    roi, bg = roi_masks(labels, perturb_mask(labels), (4, 4, 4))
    assert roi.sum().item() == 1 and roi[0, 0, 1, 1, 1] == 1  # image voxel 5 lies in latent block 1
    # dilated ROI spans image voxels 4..6 → latent block 1 only; everything else is background
    assert bg.sum().item() == 63 and bg[0, 0, 1, 1, 1] == 0
    labels[0, 0, 5, 5, 7] = L.HEPATIC_TUMOR  # dilation reaches image voxel 8 → latent block 2 leaves bg
    _, bg = roi_masks(labels, perturb_mask(labels), (4, 4, 4))
    assert bg[0, 0, 1, 1, 2] == 0


def test_perturbations():
    labels = torch.full((1, 1, 8, 8, 8), 30, dtype=torch.long)  # right upper lobe
    labels[0, 0, 2:4, 2:4, 2:4] = L.LUNG_TUMOR
    host = perturb_mask(labels, "host")
    assert (host == 30).all()
    background = perturb_mask(labels, "background")
    assert (background[labels == L.LUNG_TUMOR] == 0).all() and (background[labels != L.LUNG_TUMOR] == 30).all()
    with pytest.raises(ValueError):
        perturb_mask(labels, "bogus")
