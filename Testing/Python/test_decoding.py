"""Decoding: sliding-window VAE decode against whole-latent decode, and the HU mapping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from MaisiSynthLib.decoding import decode_latent, to_hu
from MaisiSynthLib.errors import CancelledError
from MaisiSynthLib.models import load_models


@pytest.fixture(scope="module")
def models(tiny_model):
    return load_models(tiny_model, "cpu")


def smooth_latent(shape, seed=0):
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return F.avg_pool3d(F.pad(z, (1, 1, 1, 1, 1, 1), mode="replicate"), 3, 1)


def test_sliding_window_matches_whole_decode_within_tolerance(models):
    """Stated tolerance, for 16³-latent windows at 50% overlap on a 32×32×24 latent and a random tiny VAE:
    mean |Δ| ≤ 0.25 × the whole decode's standard deviation (and ≤ 0.025 in VAE units, i.e. 50 HU),
    99th percentile ≤ 0.15, correlation ≥ 0.93, mean shift ≤ 0.01. What remains is the VAE's group
    norms seeing one window instead of the volume, as in the official sliding-window decode."""
    z = smooth_latent((1, 4, 32, 32, 24))
    windows = []
    whole = decode_latent(models, z, window=(64, 64, 64))
    tiled = decode_latent(models, z, window=(16, 16, 16), overlap=0.5, progress=windows.append)
    assert whole.shape == tiled.shape == (1, 1, 128, 128, 96)
    assert len(windows) == 3 * 3 * 2  # the tiled path really ran, window by window
    diff = (tiled - whole).abs().flatten()
    assert diff.mean().item() <= min(0.025, 0.25 * whole.std().item())
    assert diff.quantile(0.99).item() <= 0.15
    assert torch.corrcoef(torch.stack([tiled.flatten(), whole.flatten()]))[0, 1].item() >= 0.93
    assert abs(tiled.mean().item() - whole.mean().item()) <= 0.01


def test_latent_no_larger_than_the_window_is_decoded_whole(models):
    z = smooth_latent((1, 4, 16, 16, 8))
    direct = models.autoencoder.decode_stage_2_outputs(z / models.scale_factor)
    assert torch.equal(decode_latent(models, z, window=(16, 16, 16)), direct)


def test_cancel_between_windows(models):
    z = smooth_latent((1, 4, 32, 32, 24))
    seen = []
    with pytest.raises(CancelledError):
        decode_latent(
            models, z, window=(16, 16, 16), overlap=0.5, progress=seen.append, cancelled=lambda: len(seen) >= 2
        )
    assert len(seen) == 2


def test_hu_mapping_clips_and_crops_to_the_body():
    image = torch.tensor([-0.5, 0.0, 0.25, 0.5, 1.0, 1.7, 0.9]).view(1, 1, 7, 1, 1)
    labels = np.array([1, 1, 1, 200, 1, 1, 0]).reshape(7, 1, 1)
    hu = to_hu(image, labels)
    assert hu.dtype == np.int16
    assert hu.ravel().tolist() == [-1000, -1000, -500, 0, 1000, 1000, -1000]
