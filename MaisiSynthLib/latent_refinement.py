"""Semi-amortised encoding: the encoder's μ, then the latent around each lesion refined against the image.

The demo VAE's encoder passes only about 0.6 of a small lesion's contrast (a lesion a few latent
voxels wide is drawn part-way to its surroundings), while the frozen decoder draws the lesion at its
full contrast from a latent found by optimisation (benchmarks/decoder_ceiling.py). This module finds
that latent for the lesions of an image whose label map is known (training data): the latent voxels
within `latent_margin` of a lesion are optimised (Adam on an L1 with lesion and bone voxels weighted) and
every other latent voxel stays μ, so what the diffusion stages learnt from μ elsewhere still holds.

The decoder normalises with GroupNorm over the whole volume, so a box decoded alone is normalised by
the box's own statistics and a latent optimised that way decodes differently in the whole volume
(measured: lesions right, livers 33–46 HU off). The box is therefore decoded with the statistics of
the whole volume's decode of μ, frozen (`frozen_norm_statistics`): inside the box the decode then
matches the whole-volume decode, at the cost of a box. A lesion moves the whole volume's statistics
by a negligible share, which is what freezing them assumes.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from . import labels as L


@contextlib.contextmanager
def frozen_norm_statistics(autoencoder: torch.nn.Module, latent: torch.Tensor) -> Iterator[None]:
    """Within the context, every GroupNorm of the decoder normalises with the per-group mean and
    variance it saw when decoding `latent` (one no-grad pass on entry) instead of its input's own."""
    norms = [m for m in autoencoder.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(module: torch.nn.GroupNorm, inputs: tuple[torch.Tensor, ...], _output) -> None:
        x = inputs[0].float()
        grouped = x.reshape(x.shape[0], module.num_groups, -1)
        stats[id(module)] = (grouped.mean(-1), grouped.var(-1, unbiased=False))

    hooks = [m.register_forward_hook(record) for m in norms]
    try:
        with torch.no_grad():
            autoencoder.decode(latent)
    finally:
        for hook in hooks:
            hook.remove()

    def frozen(module: torch.nn.GroupNorm):
        mean, var = stats[id(module)]

        def forward(x: torch.Tensor) -> torch.Tensor:
            n, c = x.shape[:2]
            grouped = x.float().reshape(n, module.num_groups, -1)
            out = (grouped - mean[..., None]) / torch.sqrt(var[..., None] + module.eps)
            out = out.reshape(x.shape)
            if module.affine:
                shape = (1, c) + (1,) * (x.ndim - 2)
                out = out * module.weight.view(shape) + module.bias.view(shape)
            return out

        return forward

    for module in norms:
        module.forward = frozen(module)  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        for module in norms:
            del module.forward


def decoder_reach(autoencoder: torch.nn.Module, channels: int, compression: int) -> int:
    """Image voxels beyond its own block that a latent voxel's change reaches in the decode (where a
    unit change moves the image by more than 1e-4 of its range, ~0.2 HU), with frozen statistics."""
    side = 16
    while True:
        latent = torch.randn((1, channels, side, side, side), generator=torch.Generator().manual_seed(0))
        moved = latent.clone()
        moved[:, :, side // 2, side // 2, side // 2] += 1.0
        with torch.no_grad(), frozen_norm_statistics(autoencoder, latent):
            change = (autoencoder.decode(moved) - autoencoder.decode(latent)).abs()[0, 0]
        where = torch.nonzero(change > 1e-4)
        block = side // 2 * compression
        reach = int(max(block - int(where.min()), int(where.max()) - (block + compression - 1)))
        if reach < block - compression:  # not cut off by the probe's own border
            return reach
        side *= 2


def _merged(boxes: list[list[list[int]]]) -> list[list[list[int]]]:
    """Boxes ([[lo, hi] per axis]) with every overlapping pair replaced by their bounding box."""
    boxes = [b for b in boxes]
    merged = True
    while merged:
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                if all(a[k][0] < b[k][1] and b[k][0] < a[k][1] for k in range(3)):
                    boxes[i] = [[min(a[k][0], b[k][0]), max(a[k][1], b[k][1])] for k in range(3)]
                    del boxes[j]
                    merged = True
                    break
            if merged:
                break
    return boxes


def lesion_boxes(lesions: np.ndarray, compression: int, margin: int) -> list[tuple[slice, ...]]:
    """Image boxes on whole latent voxels around the connected lesions, `margin` image voxels wider
    on every side (clipped to the volume), overlapping boxes merged."""
    components, _ = ndimage.label(lesions)
    boxes = []
    for found in ndimage.find_objects(components):
        if found is not None:
            boxes.append(
                [
                    [max(0, (s.start - margin) // compression * compression),
                     min(n // compression * compression, -(-(s.stop + margin) // compression) * compression)]
                    for s, n in zip(found, lesions.shape)
                ]
            )  # fmt: skip
    return [tuple(slice(lo, hi) for lo, hi in box) for box in _merged(boxes)]


def refine_lesion_latents(
    autoencoder: torch.nn.Module,
    image: torch.Tensor,
    labels: np.ndarray,
    mu: torch.Tensor,
    *,
    tumors: Sequence[int] = L.TUMORS,
    iterations: int = 40,
    lr: float = 0.02,
    lesion_weight: float = 20.0,
    bone_weight: float = 20.0,
    latent_margin: int = 2,
    bf16: bool = False,
) -> torch.Tensor:
    """μ with the latent voxels near each lesion optimised so the decoder draws the image there.

    `image` is the VAE's (1, 1, X, Y, Z) input, `labels` its (X, Y, Z) label map, `mu` the encoder's
    (1, C, x, y, z) posterior mean; a volume without lesions gets μ back unchanged. Bone voxels are
    weighted too (`bone_weight`): bone lesions sit in vertebrae, and with the lesion alone weighted
    the free latent voxels around one trade the vertebra's HU for it (measured: vertebrae 5 HU darker). Each box holds
    the free latent voxels (`latent_margin` around a lesion's), the image they reach, and the reach
    again, so the L1 sees every voxel they change, decoded as in the whole volume. Deterministic for
    the same inputs on the same device.
    """
    compression = image.shape[2] // mu.shape[2]
    lesions = np.isin(labels, tuple(tumors))
    refined = mu.detach().clone()
    if not lesions.any() or iterations <= 0:
        return refined
    # Only the latent is optimised: the weights' own flags are lowered for the while (and restored).
    trainable = [p for p in autoencoder.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            bone = np.isin(labels, L.BONE_REGION)
            return _refine(autoencoder, image, lesions, bone, refined, compression, iterations, lr, lesion_weight,
                           bone_weight, latent_margin, bf16)  # fmt: skip
    finally:
        for p in trainable:
            p.requires_grad_(True)


def _refine(
    autoencoder: torch.nn.Module,
    image: torch.Tensor,
    lesions: np.ndarray,
    bone: np.ndarray,
    refined: torch.Tensor,
    compression: int,
    iterations: int,
    lr: float,
    lesion_weight: float,
    bone_weight: float,
    latent_margin: int,
    bf16: bool,
) -> torch.Tensor:
    reach = decoder_reach(autoencoder, refined.shape[1], compression)
    changed = latent_margin * compression + reach  # image voxels around a lesion its free latents move
    with frozen_norm_statistics(autoencoder, refined):
        for box in lesion_boxes(lesions, compression, changed + reach):
            latent_box = tuple(slice(s.start // compression, s.stop // compression) for s in box)
            index = (slice(None), slice(None)) + latent_box
            target = image[(slice(None), slice(None)) + box]
            inside = torch.from_numpy(lesions[box]).to(target.device)
            weight = torch.ones_like(target)
            weight[0, 0][torch.from_numpy(bone[box]).to(target.device)] = bone_weight
            weight[0, 0][inside] = lesion_weight
            # A cut edge (not the volume's own border) decodes without what lies beyond it, so the L1
            # leaves the reach next to it out.
            for axis, (s, n) in enumerate(zip(box, lesions.shape)):
                view = weight[0, 0].movedim(axis, 0)
                if s.start > 0:
                    view[:reach] = 0
                if s.stop < n:
                    view[max(0, view.shape[0] - reach) :] = 0
            # the latent voxels a lesion touches and `latent_margin` around them are free; the rest is μ
            near = F.adaptive_max_pool3d(inside[None, None].float(), tuple(s.stop - s.start for s in latent_box))
            if latent_margin:
                near = F.max_pool3d(near, 2 * latent_margin + 1, stride=1, padding=latent_margin)
            start = refined[index].clone()
            delta = torch.zeros_like(start, requires_grad=True)
            optimiser = torch.optim.Adam([delta], lr=lr)
            for _ in range(iterations):
                optimiser.zero_grad()
                with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=bf16):
                    drawn = autoencoder.decode(start + delta * near).float()
                loss = ((drawn - target).abs() * weight).sum() / weight.sum()
                loss.backward()
                optimiser.step()
            refined[index] = (start + delta.detach() * near).to(refined.dtype)
    return refined
