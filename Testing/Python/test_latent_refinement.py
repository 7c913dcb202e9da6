"""Semi-amortised encoding (MaisiSynthLib.latent_refinement) on a real (tiny, random) MAISI VAE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from MaisiSynthLib.latent_refinement import decoder_reach, frozen_norm_statistics, refine_lesion_latents
from MaisiSynthLib.models import compression_of, load_models
from MaisiSynthLib.tiny_model import torso_mask_labels


@pytest.fixture(scope="module")
def autoencoder(tiny_model):
    models = load_models(tiny_model, "cpu")
    return models.autoencoder.eval(), compression_of(models.config)


def test_frozen_statistics_decode_a_box_as_the_whole_volume_does(autoencoder):
    """GroupNorm normalises over its whole input, so a box decoded alone differs from the same box in
    the whole decode; with the whole decode's statistics frozen, it matches beyond the decoder's
    reach from the cut edges. The GroupNorms are themselves again after the context."""
    ae, c = autoencoder
    latent = torch.randn((1, 4, 24, 24, 24), generator=torch.Generator().manual_seed(0))
    reach = decoder_reach(ae, 4, c)
    assert 0 < reach < 8 * c
    box = (slice(None), slice(None), slice(4, 20), slice(4, 20), slice(4, 20))
    inner = slice(4 * c + reach, 20 * c - reach)
    own = slice(reach, 16 * c - reach)
    assert inner.start < inner.stop
    with torch.no_grad():
        whole = ae.decode(latent)
        alone = ae.decode(latent[box])
        with frozen_norm_statistics(ae, latent):
            frozen = ae.decode(latent[box])
        after = ae.decode(latent)
    reference = whole[0, 0, inner, inner, inner]
    # at the reach a unit change moves the image by < 1e-4; the many latent voxels beyond it, by ~1e-3
    assert (frozen[0, 0, own, own, own] - reference).abs().max() < 2e-3
    assert (alone[0, 0, own, own, own] - reference).abs().max() > 1e-2
    assert torch.equal(after, whole)


def test_refinement_redraws_lesions_and_leaves_the_latent_elsewhere_at_mu(autoencoder):
    """A lesion the encoder missed (μ perturbed around it) is drawn closer to the image after
    refinement; latent voxels away from lesions stay μ exactly; the result is deterministic; the
    weights' requires_grad flags are as before; no lesion, no change."""
    ae, c = autoencoder
    labels = torso_mask_labels(32, tumor=26)
    lesion = labels == 26
    g = torch.Generator().manual_seed(1)
    truth = torch.randn((1, 4, 8, 8, 8), generator=g)
    with torch.no_grad():
        image = ae.decode(truth)
    near = torch.nn.functional.adaptive_max_pool3d(torch.from_numpy(lesion)[None, None].float(), (8, 8, 8))
    mu = truth + near * torch.randn(truth.shape, generator=g)  # the encoder's miss, at the lesion only
    flags = [p.requires_grad for p in ae.parameters()]
    refined = refine_lesion_latents(ae, image, labels, mu, iterations=10, lr=0.1, latent_margin=1)
    again = refine_lesion_latents(ae, image, labels, mu, iterations=10, lr=0.1, latent_margin=1)
    assert torch.equal(refined, again)
    assert [p.requires_grad for p in ae.parameters()] == flags

    free = torch.nn.functional.max_pool3d(near, 3, stride=1, padding=1) > 0
    assert torch.equal(refined[~free.expand_as(mu)], mu[~free.expand_as(mu)])
    assert not torch.equal(refined, mu)
    with torch.no_grad():
        error_mu = (ae.decode(mu) - image).abs()[0, 0][torch.from_numpy(lesion)].mean()
        error_refined = (ae.decode(refined) - image).abs()[0, 0][torch.from_numpy(lesion)].mean()
    assert error_refined < 0.7 * error_mu

    no_lesion = np.where(lesion, 1, labels).astype(np.int16)
    assert torch.equal(refine_lesion_latents(ae, image, no_lesion, mu, iterations=5), mu)
