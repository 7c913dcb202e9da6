"""VAE decoding of latents into HU volumes, whole or by sliding window.

A latent larger than the window (counted in latent voxels, as the official
`autoencoder_sliding_window_infer_size`) is decoded window by window with MONAI's
`SlidingWindowInferer`, Gaussian-blended, windows on the device and the stitched image on the CPU;
peak device memory then depends on the window, not on the volume.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .errors import CancelledError
from .models import MaisiModels

HU_MIN, HU_MAX = -1000.0, 1000.0


class _ScaledDecoder(torch.nn.Module):
    """latent → image in [0, 1]-ish: the VAE decoder applied to latent / scale_factor."""

    def __init__(self, models: MaisiModels, on_window: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.models = models
        self.on_window = on_window

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.on_window is not None:
            self.on_window()
        with self.models.autocast():
            return self.models.autoencoder.decode_stage_2_outputs(z / self.models.scale_factor).float()


def decode_latent(
    models: MaisiModels,
    latent: torch.Tensor,
    window: tuple[int, int, int] | list[int] = (48, 48, 48),
    overlap: float = 0.6666,
    progress: Callable[[int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Decode a (1, C, x, y, z) latent to a (1, 1, X, Y, Z) float32 CPU image (VAE output range).

    The whole latent is decoded at once when it is no larger than the window (the official rule);
    otherwise windows of at most `window` latent voxels per axis are decoded and blended.
    """
    count = [0]

    def on_window() -> None:
        if cancelled is not None and cancelled():
            raise CancelledError()
        count[0] += 1
        if progress is not None:
            progress(count[0])

    decoder = _ScaledDecoder(models, on_window)
    latent = latent.to(models.device)
    with torch.no_grad():
        if latent[0:1, 0:1].numel() <= math.prod(window):
            return decoder(latent).cpu()
        from monai.inferers import SlidingWindowInferer

        roi = [min(int(w), int(n)) for w, n in zip(window, latent.shape[2:])]
        inferer = SlidingWindowInferer(
            roi_size=roi,
            sw_batch_size=1,
            overlap=overlap,
            mode="gaussian",
            sw_device=models.device,
            device=torch.device("cpu"),
            progress=False,
        )
        return inferer(inputs=latent, network=decoder)


def to_hu(image: torch.Tensor | np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(1, 1, X, Y, Z) VAE output → int16 HU (X, Y, Z): clip to [0, 1], map to [-1000, 1000], background
    (label 0) = -1000."""
    image = image[0, 0].cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    hu = np.clip(image, 0.0, 1.0) * (HU_MAX - HU_MIN) + HU_MIN
    hu[labels == 0] = HU_MIN
    return np.rint(hu).astype(np.int16)


def resample_intensities(
    hu: np.ndarray, affine: np.ndarray, shape: tuple[int, int, int], target_affine: np.ndarray
) -> np.ndarray:
    """Trilinear resampling of an int16 HU volume onto another grid (outside the source: -1000)."""
    import nibabel as nib
    from nibabel.processing import resample_from_to

    image = nib.Nifti1Image(hu.astype(np.float32), affine)
    out = resample_from_to(image, (tuple(shape), target_affine), order=1, mode="constant", cval=HU_MIN)
    return np.rint(np.clip(np.asanyarray(out.dataobj), HU_MIN, HU_MAX)).astype(np.int16)
