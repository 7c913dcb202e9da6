"""Tumor insertion: paint a lesion into a mask inside its host organ.

Used to make edited masks (the paper's tumor-inserted masks for downstream training) and by the
Slicer module's "insert tumor" action. A lesion is an ellipsoid around a centre, clipped to its host
shrunk by one voxel, so that host tissue encloses it as in a real organ and in the training phantoms.
The host region of a tumor type is the union of its candidate hosts (all lung lobes for a lung tumor,
all bones for a bone lesion), so a lesion may cross a lobe fissure as real ones do.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from . import labels as L
from .errors import MaskError


def host_region(labels: np.ndarray, tumor: int) -> np.ndarray:
    """Boolean map of the voxels that may host `tumor` (a MAISI tumor id)."""
    if int(tumor) not in L.TUMOR_HOSTS:
        names = ", ".join(f"{t} ({L.name_of(t)})" for t in L.TUMORS)
        raise MaskError(f"label {tumor} is not a tumor type", f"use one of: {names}")
    return np.isin(labels, L.TUMOR_HOSTS[int(tumor)])


def _core(host: np.ndarray) -> np.ndarray:
    core = ndimage.binary_erosion(host, structure=np.ones((3, 3, 3), bool), border_value=0)
    if not core.any():  # thin hosts on coarse grids: host tissue on the six faces is enough
        core = ndimage.binary_erosion(host, border_value=0)
    return core


def insert_tumor(
    labels: np.ndarray,
    tumor: int,
    centre: Sequence[float],
    radius_mm: float | Sequence[float],
    spacing: Sequence[float],
) -> np.ndarray:
    """A copy of `labels` with a lesion of type `tumor` centred at voxel `centre` (may be fractional).

    `radius_mm` is one radius or three semi-axes (x, y, z in mm). Only host voxels that are at least
    one voxel inside the host change; everything else is left as it was. Raises MaskError when the
    centre is not in the host or no host voxel would change.
    """
    labels = np.asarray(labels)
    return _insert(labels, tumor, centre, radius_mm, spacing, host_region(labels, tumor), None)


def _insert(
    labels: np.ndarray,
    tumor: int,
    centre: Sequence[float],
    radius_mm: float | Sequence[float],
    spacing: Sequence[float],
    host: np.ndarray,
    core: np.ndarray | None,
) -> np.ndarray:
    """insert_tumor with the host map (and its core, when the caller has it) already computed."""
    spacing = np.asarray(spacing, dtype=float)
    centre = np.asarray(centre, dtype=float)
    radii = np.broadcast_to(np.asarray(radius_mm, dtype=float), (3,))
    if centre.shape != (3,) or np.any(centre < 0) or np.any(centre > np.array(labels.shape) - 1):
        raise MaskError(f"tumor centre {tuple(centre)} is outside the mask {labels.shape}", "pick a voxel inside")
    if np.any(radii <= 0):
        raise MaskError(f"tumor radius must be positive, got {tuple(radii)} mm", "e.g. a radius of 10 mm")
    nearest = tuple(int(round(c)) for c in centre)
    if not host[nearest]:
        hosts = ", ".join(L.name_of(h) for h in L.TUMOR_HOSTS[int(tumor)])
        raise MaskError(
            f"the centre {nearest} is {L.name_of(int(labels[nearest]))}, not a host of {L.name_of(int(tumor))}",
            f"place it inside: {hosts}",
        )
    # Only the bounding box of the ellipsoid is touched: cheap on large masks.
    reach = np.ceil(radii / spacing).astype(int) + 1
    lo = np.maximum(np.floor(centre).astype(int) - reach, 0)
    hi = np.minimum(np.ceil(centre).astype(int) + reach + 1, labels.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
    inside = sum(((g - c) * s / r) ** 2 for g, c, s, r in zip(grids, centre, spacing, radii)) <= 1.0
    lesion = inside & (_core(host) if core is None else core)[box]
    if not lesion.any():
        raise MaskError(
            f"a {L.name_of(int(tumor))} of {tuple(radii)} mm at {nearest} leaves no voxel inside its host",
            "move the centre deeper into the organ or make the lesion larger",
        )
    out = labels.copy()
    out[box][lesion] = tumor
    return out


def random_tumor(
    labels: np.ndarray,
    tumor: int,
    radius_mm: float,
    spacing: Sequence[float],
    rng: np.random.Generator,
) -> np.ndarray:
    """`labels` with a lesion of `radius_mm` at a random host voxel at least the radius deep.

    Thin hosts take the deepest voxels they have (a smaller lesion, still enclosed by the host).
    """
    host = host_region(labels, tumor)
    if not host.any():
        raise MaskError(f"the mask has no host organ for a {L.name_of(int(tumor))}", "pick another tumor type")
    # The edge of the volume counts as outside: an organ cut by the field of view is not deep there
    # (the lesion is painted only inside the host's core, which stops one voxel short of the edge).
    depth = ndimage.distance_transform_edt(np.pad(host, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    core = _core(host)
    if core.any():
        depth = np.where(core, depth, 0.0)
    deep_enough = np.argwhere(depth >= min(radius_mm, 0.8 * float(depth.max())))
    centre = deep_enough[int(rng.integers(len(deep_enough)))]
    return _insert(np.asarray(labels), tumor, centre, radius_mm, spacing, host, core)
