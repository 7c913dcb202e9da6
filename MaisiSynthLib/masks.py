"""MAISI masks: reading, validation, body envelope, tumor removal, resampling and ControlNet encoding.

A mask is a 3-D integer label map with MAISI ids (see `labels`). Everything here works on numpy
arrays plus an affine, except the encoding, which produces the ControlNet's torch input.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from . import labels as L
from .errors import MaskError
from .grid import spacing_of
from .volumes import Volume, check_affine, check_volume_file, format_of, read_volume

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Body envelope rule (used when a mask has no body label 200): in each axial slice, the convex hull of
# all labelled voxels, widened in-plane by BODY_MARGIN_MM for the subcutaneous tissue outside the
# outermost labelled structure; background voxels inside become body. Per axial slice because a torso
# cross-section is close to convex, while the body along z is not (shoulders, neck). With a full
# TotalSegmentator-style mask (ribs, muscles) this follows the true outline within about the margin;
# with a few organs only, it is a loose envelope around them. A reference CT gives a better body.
BODY_MARGIN_MM = 10.0


@dataclass
class Mask:
    """A validated MAISI label map and its geometry."""

    labels: np.ndarray  # int16, 3-D
    affine: np.ndarray  # voxel → RAS mm
    source: str = ""
    volume: Volume | None = None  # what was read, to write outputs in the same family
    notes: list[str] = field(default_factory=list)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return spacing_of(self.affine)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.labels.shape)


# ---------------------------------------------------------------------------------------------------
# Reading


def _segmentation_to_labels(path: Path) -> Volume:
    """A Slicer .seg.nrrd → one MAISI label map, segments mapped by name.

    Overlapping segments are resolved by specificity: body first, then organs, then tumors, so that a
    tumor painted over its host organ stays a tumor.
    """
    import slicerio

    check_volume_file(path, "segmentation")  # slicerio reads with pynrrd: same limits as any NRRD
    try:
        seg = slicerio.read_segmentation(str(path))
    except Exception as exc:
        raise MaskError(
            f"cannot read {path.name} as a Slicer segmentation: {exc}",
            "save the segmentation from Slicer as .seg.nrrd, or export a labelmap",
        ) from None
    segments = seg.get("segments", [])
    mapped, unmapped = [], []
    for segment in segments:
        name = segment.get("name", segment.get("id", ""))
        label = L.id_for_name(name)
        (mapped if label is not None else unmapped).append((segment, name, label))
    if unmapped:
        names = ", ".join(f"'{n}'" for _, n, _ in unmapped[:8])
        raise MaskError(
            f"{path.name}: segment(s) {names} have no MAISI label",
            "rename them to MAISI structure names (e.g. 'liver', 'hepatic tumor', 'body') or export a "
            "labelmap with MAISI ids",
        )
    voxels = seg["voxels"]
    out = np.zeros(voxels.shape[-3:], dtype=np.int16)

    def rank(item):
        label = item[2]
        return 0 if label == L.BODY else (2 if L.is_tumor(label) else 1)

    owner = np.full(out.shape, -1, dtype=np.int32)  # which segment painted each voxel last
    notes = []
    ordered = sorted(mapped, key=rank)
    for index, (segment, name, label) in enumerate(ordered):
        where = slicerio.segment_mask(seg, segment)
        taken = where & (owner >= 0) & (out != label)
        if taken.any():
            for other in np.unique(owner[taken]):
                other_name, other_label = ordered[other][1], ordered[other][2]
                if other_label == L.BODY:
                    continue  # every structure lies inside the body: not a conflict
                count = int((taken & (owner == other)).sum())
                notes.append(
                    f"segments '{other_name}' and '{name}' overlap in {count} voxels; '{name}' "
                    f"({L.name_of(label)}) was kept there ({'lesions' if L.is_tumor(label) else 'organs'} win over "
                    f"{'organs' if L.is_tumor(label) else 'the body'}, else the later segment)"
                )
        out[where] = label
        owner[where] = index
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(seg["ijkToLPS"], dtype=float)
    check_affine(affine, "segmentation", path.name)
    return Volume(out, affine, "seg.nrrd", {"notes": notes})


def _is_segmentation_header(header: dict) -> bool:
    return any(str(k).startswith("Segment0_") for k in header) or "Segmentation_MasterRepresentation" in header


def read_mask(path: str | os.PathLike) -> Mask:
    """Read and validate a mask file (NIfTI, NRRD labelmap or Slicer .seg.nrrd)."""
    path = Path(path)
    if format_of(path) == "seg.nrrd" and path.is_file():
        volume = _segmentation_to_labels(path)
    else:
        volume = read_volume(path, "mask")
        if volume.format == "nrrd" and _is_segmentation_header(volume.header.get("nrrd_header", {})):
            volume = _segmentation_to_labels(path)
    labels = validate_labels(volume.array, path.name)
    return Mask(
        labels=labels, affine=volume.affine, source=str(path), volume=volume, notes=list(volume.header.get("notes", []))
    )


def validate_labels(array: np.ndarray, name: str = "mask") -> np.ndarray:
    """Check that `array` is a 3-D MAISI label map; return it as int16.

    Float arrays are accepted when every value is a whole number (many tools store labels as float);
    fractional values mean a probability map or an intensity image, which is refused.
    """
    array = np.asarray(array)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and 0 in array.shape:
        raise MaskError(
            f"{name} has no voxels (shape {tuple(array.shape)})", "save a mask with at least one voxel along each axis"
        )
    if array.ndim != 3:
        raise MaskError(
            f"{name} has {array.ndim} dimensions (shape {tuple(array.shape)}); a mask must be a 3-D label map",
            "save a single 3-D labelmap (not a time series, multi-channel or 2-D image)",
        )
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise MaskError(f"{name} has voxel type {array.dtype}, not integer labels", "save the mask with integer labels")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise MaskError(f"{name} contains NaN or infinite values", "save the mask with integer labels")
        if not np.array_equal(array, np.round(array)):
            fractional = np.unique(array[array != np.round(array)])[:5]
            raise MaskError(
                f"{name} holds non-integer values ({', '.join(f'{v:g}' for v in fractional)}...): a label map "
                "must contain whole-number MAISI ids",
                "threshold or argmax the probability map and save it as an integer labelmap",
            )
    values = np.unique(array)
    unknown = [int(v) for v in values if int(v) not in L.known_ids()]
    if unknown:
        shown = ", ".join(str(v) for v in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise MaskError(
            f"{name} contains label id(s) {shown} that are not MAISI labels",
            "remap the labels to MAISI ids (1-132, body 200; see `maisi-synth labels`)",
        )
    if values.size == 1 and int(values[0]) == 0:
        raise MaskError(f"{name} is empty (every voxel is background)", "paint at least the body or one organ")
    return array.astype(np.int16)


# ---------------------------------------------------------------------------------------------------
# Body envelope


def _slice_hull(inside: np.ndarray) -> np.ndarray:
    """Filled convex hull of the True pixels of a 2-D mask (the pixels themselves if degenerate)."""
    from scipy.spatial import ConvexHull, QhullError

    points = np.argwhere(inside)
    if len(points) < 3:
        return inside
    try:
        hull = ConvexHull(points)
    except QhullError:  # all points on a line
        return inside
    lo, hi = points.min(axis=0), points.max(axis=0) + 1
    rows, cols = np.mgrid[lo[0] : hi[0], lo[1] : hi[1]]
    coords = np.stack([rows.ravel(), cols.ravel()])
    within = np.all(hull.equations[:, :2] @ coords + hull.equations[:, 2:3] <= 1e-9, axis=0)
    out = inside.copy()
    out[lo[0] : hi[0], lo[1] : hi[1]] |= within.reshape(rows.shape)
    return out


def body_envelope(
    labels: np.ndarray, spacing: tuple[float, float, float], margin_mm: float = BODY_MARGIN_MM
) -> np.ndarray:
    """The documented body rule: per axial slice, convex hull of the labels widened by `margin_mm`."""
    inside = labels > 0
    envelope = np.zeros_like(inside)
    for z in np.flatnonzero(inside.any(axis=(0, 1))):
        hull = _slice_hull(inside[:, :, z])
        if margin_mm > 0:
            hull = ndimage.distance_transform_edt(~hull, sampling=spacing[:2]) <= margin_mm
        envelope[:, :, z] = hull
    return envelope


def ensure_body(labels: np.ndarray, spacing: tuple[float, float, float]) -> tuple[np.ndarray, bool]:
    """Add body (200) by the envelope rule if the mask has none; returns (labels, added)."""
    if (labels == L.BODY).any():
        return labels, False
    out = labels.copy()
    out[body_envelope(labels, spacing) & (labels == 0)] = L.BODY
    return out, True


# ---------------------------------------------------------------------------------------------------
# Tumors


def _majority_host(region: np.ndarray, lesion: np.ndarray, labels: np.ndarray, hosts: tuple[int, ...]) -> int:
    """The host label most frequent in the one-voxel shell around `lesion` (a boolean map of `region`).

    Falls back to the most frequent host in the whole volume, then to body: a lesion drawn where no
    host exists is still removed.
    """
    shell = ndimage.binary_dilation(lesion, structure=np.ones((3, 3, 3), bool)) & ~lesion
    around = region[shell]
    around = around[np.isin(around, hosts)]
    if around.size == 0:
        around = labels[np.isin(labels, hosts)]
    if around.size == 0:
        return L.BODY
    values, counts = np.unique(around, return_counts=True)
    return int(values[np.argmax(counts)])


def remove_tumors(labels: np.ndarray, tumors: tuple[int, ...] | None = None) -> np.ndarray:
    """Replace each tumor by its host organ (the mask a tumor-free patient would have).

    Fixed hosts (liver, pancreas, colon, kidneys) are substituted directly; lung tumors and bone
    lesions take the majority host in their neighbourhood, one decision per connected lesion.
    """
    out = labels.copy()
    for tumor in tumors or L.TUMORS:
        hosts = L.TUMOR_HOSTS[tumor]
        where = labels == tumor
        if not where.any():
            continue
        if len(hosts) == 1:
            out[where] = hosts[0]
            continue
        components, count = ndimage.label(where)
        for index, box in enumerate(ndimage.find_objects(components), start=1):
            box = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in box)
            lesion = components[box] == index
            out[box][lesion] = _majority_host(labels[box], lesion, labels, hosts)
    return out


# ---------------------------------------------------------------------------------------------------
# Coarse masks

# Vessels that coarse segmentations count as part of their organ (lobe masks include the pulmonary
# vessels, liver masks the hepatic ones).
VESSEL_PARENTS: dict[int, tuple[int, ...]] = {119: L.LUNG_LOBES, 25: (1,)}
# What a coarse chest mask from a real scan typically holds besides the body: lobes, bones (costal
# cartilages included) and lesions.
COARSE_KEEP: tuple[int, ...] = L.LUNG_LOBES + L.BONES + (L.COSTAL_CARTILAGES,) + L.TUMORS


def merge_vessels(labels: np.ndarray) -> np.ndarray:
    """Vessel voxels relabelled as the nearest voxel of their parent organ (where the organ exists)."""
    out = labels.copy()
    for vessel, parents in VESSEL_PARENTS.items():
        where = labels == vessel
        organ = np.isin(labels, parents)
        if not where.any() or not organ.any():
            continue
        _, nearest = ndimage.distance_transform_edt(~organ, return_indices=True)
        out[where] = labels[tuple(index[where] for index in nearest)]
    return out


def coarsen_labels(labels: np.ndarray, keep: tuple[int, ...] = COARSE_KEEP) -> np.ndarray:
    """The mask a coarse segmentation would give: vessels merged into their organs, every structure
    not in `keep` folded into the body (200); background stays background."""
    merged = merge_vessels(labels)
    fold = (merged > 0) & ~np.isin(merged, tuple(keep))
    merged[fold] = L.BODY
    return merged


# ---------------------------------------------------------------------------------------------------
# Resampling and encoding


def resample_labels(
    labels: np.ndarray, affine: np.ndarray, shape: tuple[int, int, int], target_affine: np.ndarray
) -> np.ndarray:
    """Nearest-neighbour resampling of a label map onto another grid (outside → background)."""
    if tuple(shape) == labels.shape and np.allclose(affine, target_affine, atol=1e-6):
        return labels
    import nibabel as nib
    from nibabel.processing import resample_from_to

    img = nib.Nifti1Image(labels.astype(np.int16), affine)
    out = resample_from_to(img, (tuple(shape), target_affine), order=0, mode="constant", cval=0)
    return np.asanyarray(out.dataobj).astype(np.int16)


def lost_labels(before: np.ndarray, after: np.ndarray) -> list[int]:
    """Labels present before resampling and gone after (a lesion smaller than the new voxels)."""
    return sorted(set(np.unique(before).tolist()) - set(np.unique(after).tolist()) - {0})


def binary_code(labels: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """The ControlNet input: bit k of every label id as channel k, (B, 1, X, Y, Z) → (B, bits, X, Y, Z).

    Labels above 255 do not fit the official 8-bit code; MAISI ids stop at 200.
    """
    import torch  # here, so that mask editing (e.g. inside Slicer) works without torch

    shifts = torch.arange(bits, device=labels.device, dtype=torch.long).view(1, bits, 1, 1, 1)
    return ((labels.long() >> shifts) & 1).to(torch.float32)
