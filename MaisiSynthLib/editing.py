"""Editing a reference CT: the geometry and the arithmetic of an edit, without the networks.

An edit keeps the user's own scan and redraws only a region around what changed in the mask (a tumor
inserted, removed or changed). `pipeline.edit_volume` runs the networks; this module decides what
they run on and puts the result back:

- `read_reference_ct` / `check_reference_ct`: the scan, refused unless it is a CT in HU (a label map,
  raw 0–4095 values without their rescale, NaN voxels) and on the mask's grid, voxel for voxel;
- `edit_region`: what is redrawn. By default every voxel whose label changed against the original
  mask or, without one, every tumor voxel of the edited mask, dilated by `edit_margin_mm` so the host
  tissue around a lesion is drawn with it. An explicit region (any nonzero voxel) replaces the rule;
- `plan_crop`: the model's grid around the region: its bounding box plus `CONTEXT_LATENT` latent
  voxels of context on each side, rounded up to the model's size step and kept inside the volume. Where
  the scan's spacing is in the model's range the crop is a block of the scan's own voxels; otherwise
  (a 0.8 mm clinical CT for a model trained at 3 mm) it is the nearest spacing the model takes, and
  the scan is resampled onto it (trilinear; labels nearest) and the drawn part back (trilinear);
- `composite`: the output is the reference, and inside the region the drawn HU blended in: the blend
  weight rises from 0 at the region's edge to 1 at `BLEND_BAND_MM` inside it, so outside the region
  the output is the reference bit for bit and no seam shows at its edge.

Everything that touches the whole volume here is a comparison, a min/max or a copy; distance
transforms, resampling and the networks see the region's box or the crop only, so an edit of a
512 × 512 × 300 scan costs about what an edit of a small one costs.

Arrays are handled in RAS order (the networks' order) through views of the scan's own arrays
(`CanonicalView`): nothing of the size of the volume is transposed or copied but the output itself.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from scipy import ndimage

from . import labels as L
from .errors import GeometryError, MaskError
from .grid import GridRules, spacing_of
from .volumes import Volume, read_volume

# The dilation of the changed voxels that is redrawn with them: the tissue a lesion touches (its
# rim, its blurred edge, the organ around it) has to be drawn with it, and the blend band at the
# region's edge has to lie beyond all that. A drawn lesion's edge is softer than its mask, and how far
# that shows depends on its contrast to the host: a soft-tissue lesion's fades within 10 mm, a lung
# nodule (about 700 HU above aerated lung) shows about 8 mm out, so with 10 mm its blend band fell on
# the nodule's edge (seam ratio 2.2) and 15 mm is needed there; 15 mm everywhere drew the other hosts
# less like the patient's and 20 mm drew weaker lesions (docs/results.md, section 6).
EDIT_MARGIN_MM = 10.0
WIDE_MARGIN_MM = 15.0
WIDE_MARGIN_TUMORS = (L.LUNG_TUMOR,)
# The band at the region's edge over which the drawn HU are blended into the reference.
BLEND_BAND_MM = 6.0
# When the sampler moves the drawn regions to the patient's latent levels (t/T; `reference_level_shift`)
PATIENT_LEVELS_AT = (0.6, 0.3)
# Latent voxels of real context the networks see on each side of the region.
CONTEXT_LATENT = 4
# A region larger than this share of the body is a new CT, not an edit.
MAX_REGION_SHARE = 0.5
# A CT in HU has air (about −1000 HU) around the body and in the lungs; its minimum is far below this.
AIR_BELOW_HU = -500.0
INT16 = np.iinfo(np.int16)


# ---------------------------------------------------------------------------------------------------
# How an edit is drawn


@dataclass(frozen=True)
class EditSettings:
    """The settings of an edit. A request carries the margin only; the rest are research options of
    the in-memory core (`pipeline.edit_volume`), their defaults what docs/results.md section 6 measured
    best on the held-out torsos."""

    edit_margin_mm: float | None = None  # None: EDIT_MARGIN_MM, WIDE_MARGIN_MM around lung tumors
    band_mm: float = BLEND_BAND_MM
    # t/T at which the drawn latent levels are moved to the patient's (at most two; empty: the model's
    # own latent prior instead, inside the region only)
    patient_levels: tuple = PATIENT_LEVELS_AT
    level_correction: bool = True  # `match_levels` on the drawn HU
    noise_match: bool = True  # `match_noise` on the drawn HU
    latent_blend: float = 0.0  # > 0: the latent voxels around the region held only partly (1 − this)
    harmonize: int = 0  # RePaint resampling jumps per step (sampling.LatentHold)
    context: int = CONTEXT_LATENT  # latent voxels of the scan the networks see around the region

    @classmethod
    def from_options(cls, options: dict) -> "EditSettings":
        """Settings from option values, each checked; unknown names are refused."""
        from .request import RequestError, check_field

        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise RequestError(f"unknown edit option(s): {', '.join(unknown)}", f"use {', '.join(EDIT_OPTIONS)}")
        values = dict(options)

        def number(name: str, low: float, high: float, whole: bool = False):
            value = values[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise RequestError(f"{name} must be a number from {low:g} to {high:g}, got {value!r}", "")
            if whole and int(value) != value:
                raise RequestError(f"{name} must be a whole number, got {value!r}", "")
            return int(value) if whole else float(value)

        if values.get("edit_margin_mm") is not None:
            values["edit_margin_mm"] = check_field("edit_margin_mm", values["edit_margin_mm"])
        for name, low, high, whole in (
            ("band_mm", 0, 50, False),
            ("latent_blend", 0, 1, False),
            ("harmonize", 0, 10, True),
            ("context", 1, 16, True),
        ):
            if name in values:
                values[name] = number(name, low, high, whole)
        for name in ("level_correction", "noise_match"):
            if name in values and not isinstance(values[name], bool):
                raise RequestError(f"{name} must be true or false, got {values[name]!r}", "")
        if "patient_levels" in values:
            at = values["patient_levels"]
            ok = (
                isinstance(at, (list, tuple))
                and len(at) <= 2
                and all(not isinstance(t, bool) and isinstance(t, (int, float)) and 0 < t < 1 for t in at)
            )
            if not ok or list(at) != sorted(at, reverse=True):
                raise RequestError(
                    f"patient_levels must be at most two decreasing t/T values in (0, 1), got {at!r}", "e.g. [0.6, 0.3]"
                )
            values["patient_levels"] = tuple(float(t) for t in at)
        return cls(**values)


EDIT_OPTIONS = tuple(f.name for f in fields(EditSettings))


# ---------------------------------------------------------------------------------------------------
# The reference CT


@dataclass
class ReferenceCT:
    """The user's scan in HU and its geometry (`hu` is int16 when the stored values are whole HU)."""

    hu: np.ndarray
    affine: np.ndarray
    source: str = ""
    volume: Volume | None = None  # what was read, to write the output in the same family

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.hu.shape)


def _hu_array(volume: Volume) -> np.ndarray:
    """The voxels in HU without a float64 copy of the volume: a NIfTI's slope and intercept are
    applied in integers when they map whole numbers to whole numbers (`read_volume(unscaled=True)`)."""
    raw = np.asarray(volume.array)
    slope, inter = volume.header.get("scaling", (1.0, 0.0))
    if slope == 1 and inter == 0:
        return raw
    if np.issubdtype(raw.dtype, np.integer) and float(slope).is_integer() and float(inter).is_integer():
        return raw.astype(np.int32) * int(slope) + int(inter)
    return raw.astype(np.float32) * np.float32(slope) + np.float32(inter)


def check_reference_ct(hu: np.ndarray, name: str = "reference CT") -> np.ndarray:
    """The scan as int16 HU (whole numbers in range) or float32; refuses what is not a CT in HU."""
    hu = np.asarray(hu)
    while hu.ndim > 3 and hu.shape[-1] == 1:
        hu = hu[..., 0]
    if hu.ndim != 3 or 0 in hu.shape:
        raise MaskError(
            f"{name} has shape {tuple(hu.shape)}; a CT is one 3-D volume", "pass the scan as a single 3-D image"
        )
    if hu.dtype == bool or not (np.issubdtype(hu.dtype, np.integer) or np.issubdtype(hu.dtype, np.floating)):
        raise MaskError(f"{name} has voxel type {hu.dtype}, not intensities", "pass the CT image itself")
    if np.issubdtype(hu.dtype, np.floating) and not np.isfinite(hu).all():
        raise MaskError(f"{name} contains NaN or infinite voxels", "fill them (e.g. with -1000 HU) and save it again")
    low, high = float(hu.min()), float(hu.max())
    if low >= 0:
        integral = np.issubdtype(hu.dtype, np.integer) or bool(np.array_equal(hu[::7], np.round(hu[::7])))
        if high <= 255 and integral:
            raise MaskError(
                f"{name} holds only whole numbers from {low:g} to {high:g}: it looks like a label map, not a CT",
                "pass the scan as --reference-ct and the segmentation as --mask",
            )
        raise MaskError(
            f"{name} is not in HU: its values run from {low:g} to {high:g}, with no air (about -1000 HU); it was "
            "probably stored without its rescale intercept",
            "apply the scan's rescale slope and intercept (often HU = value - 1024) and save it again",
        )
    if low > AIR_BELOW_HU:
        raise MaskError(
            f"{name} is not in HU: its lowest value is {low:g}, and a CT in HU has air at about -1000",
            "pass the scan in Hounsfield units (with its rescale slope and intercept applied)",
        )
    if np.issubdtype(hu.dtype, np.integer) or bool(np.array_equal(hu, np.round(hu))):
        if INT16.min <= low and high <= INT16.max:
            return hu.astype(np.int16, copy=False)
    return hu.astype(np.float32, copy=False)


def read_reference_ct(path: str | os.PathLike) -> ReferenceCT:
    """Read and check a reference CT file (NIfTI or NRRD, self-contained or with its data beside it)."""
    path = Path(path)
    volume = read_volume(path, "reference CT", unscaled=True)
    hu = check_reference_ct(_hu_array(volume), f"reference CT {path.name}")
    return ReferenceCT(hu=hu, affine=volume.affine, source=str(path), volume=volume)


def on_reference_grid(array: np.ndarray, affine: np.ndarray, ref: ReferenceCT, what: str, name: str) -> np.ndarray:
    """`array` (a mask or region) on the reference CT's grid: as it is when the grids are the same;
    placed into the CT's grid when it is a voxel-aligned block of it (a Slicer segmentation saved with
    its extent cropped to its segments); else refused with the fix."""
    tolerance = 1e-3 * min(spacing_of(ref.affine))
    if tuple(array.shape) == ref.shape and np.allclose(affine, ref.affine, rtol=0, atol=tolerance):
        return array
    offset = np.linalg.solve(ref.affine, np.asarray(affine, float)[:, 3])[:3]
    aligned = np.allclose(np.asarray(affine)[:3, :3], ref.affine[:3, :3], rtol=0, atol=tolerance) and np.allclose(
        offset, np.round(offset), rtol=0, atol=1e-3
    )
    if aligned:
        lo = np.round(offset).astype(int)
        hi = lo + np.array(array.shape)
        inner_lo, inner_hi = np.maximum(lo, 0), np.minimum(hi, ref.shape)
        if np.all(inner_hi > inner_lo):
            inside = tuple(slice(a - o, b - o) for a, b, o in zip(inner_lo, inner_hi, lo))
            kept = np.count_nonzero(array[inside])
            if kept == np.count_nonzero(array):  # nothing labelled falls outside the CT
                out = np.zeros(ref.shape, dtype=array.dtype)
                out[tuple(slice(a, b) for a, b in zip(inner_lo, inner_hi))] = array[inside]
                return out
    if tuple(array.shape) == ref.shape:
        detail = "the same size but another position or orientation"
    else:
        detail = f"{'x'.join(map(str, array.shape))} voxels against the CT's {'x'.join(map(str, ref.shape))}"
    raise GeometryError(
        f"the {what} {name} is not on the reference CT's grid ({detail})",
        f"resample the {what} onto the CT (in Slicer: export the segmentation with the CT as reference geometry)",
    )


# ---------------------------------------------------------------------------------------------------
# Orientation: RAS-ordered views of the scan's own arrays


class CanonicalView:
    """The RAS-ordered view of arrays on one grid: an axis permutation and flips, no copies."""

    def __init__(self, affine: np.ndarray, shape: tuple[int, int, int]) -> None:
        from nibabel import orientations

        self.ornt = orientations.io_orientation(affine)
        self.affine = np.asarray(affine, float) @ orientations.inv_ornt_aff(self.ornt, shape)
        self.shape = self(np.broadcast_to(np.zeros((), np.uint8), tuple(shape))).shape

    def __call__(self, array: np.ndarray) -> np.ndarray:
        from nibabel import orientations

        return orientations.apply_orientation(array, self.ornt)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return spacing_of(self.affine)


# ---------------------------------------------------------------------------------------------------
# The region


def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(lo, hi) voxel bounds (hi exclusive) of the True voxels, or None."""
    axes = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != i))) for i in range(3)]
    if any(len(a) == 0 for a in axes):
        return None
    return np.array([a[0] for a in axes]), np.array([a[-1] + 1 for a in axes])


def _box(lo, hi) -> tuple[slice, slice, slice]:
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _is_tumor_lut() -> np.ndarray:
    lut = np.zeros(1 << 16, dtype=bool)
    lut[list(L.TUMORS)] = True
    return lut


def dilate_mm(seed: np.ndarray, spacing: tuple[float, ...], margin_mm: float) -> np.ndarray:
    """`seed` dilated by `margin_mm` (Euclidean, in mm), computed on its bounding box only."""
    bounds = _bbox(seed)
    if bounds is None or margin_mm <= 0:
        return seed.copy()
    reach = np.ceil(margin_mm / np.asarray(spacing)).astype(int) + 1
    lo = np.maximum(bounds[0] - reach, 0)
    hi = np.minimum(bounds[1] + reach, seed.shape)
    box = _box(lo, hi)
    near = ndimage.distance_transform_edt(~seed[box], sampling=spacing) <= margin_mm
    out = np.zeros(seed.shape, dtype=bool)
    out[box] = near
    return out


def edit_region(
    edited: np.ndarray,
    spacing: tuple[float, float, float],
    original: np.ndarray | None = None,
    explicit: np.ndarray | None = None,
    margin_mm: float | None = None,
) -> tuple[np.ndarray, str]:
    """The voxels an edit redraws, and in words how they were chosen.

    `explicit` (nonzero voxels) is taken as it is. Otherwise the changed voxels against `original`
    or, without it, the tumor voxels of `edited`, dilated by `margin_mm`; None: EDIT_MARGIN_MM, and
    WIDE_MARGIN_MM where the seed is (or was) a lung tumor. With an original mask the tumors it already
    holds are real ones in the scan and stay as they are; without one, every tumor of the edited mask
    is drawn anew (there is no telling the new ones from the real ones)."""
    if explicit is not None:
        region = np.asarray(explicit) != 0
        how = "the given edit region"
        if not region.any():
            raise MaskError("the edit region is empty (no nonzero voxel)", "paint the region to redraw")
        return region, how
    if original is not None:
        seed = edited != original
        what = "the voxels whose label changed"
        if not seed.any():
            raise MaskError(
                "the edited mask is the same as the original mask: there is nothing to edit",
                "insert, remove or change a tumor (e.g. --edit insert:hepatic:20), or pass --edit-region",
            )
    else:
        seed = _is_tumor_lut()[edited.astype(np.int64, copy=False) & 0xFFFF]
        what = "the tumor voxels of the mask"
        if not seed.any():
            raise MaskError(
                "the mask holds no tumor, so there is no edit region",
                "insert a tumor, pass --original-mask (to redraw what changed) or --edit-region",
            )
    if margin_mm is not None:
        return dilate_mm(seed, spacing, margin_mm), f"{what}, dilated by {margin_mm:g} mm"
    wide = seed & np.isin(edited, WIDE_MARGIN_TUMORS)
    if original is not None:
        wide |= seed & np.isin(original, WIDE_MARGIN_TUMORS)
    region = dilate_mm(seed & ~wide, spacing, EDIT_MARGIN_MM)
    if wide.any():
        region |= dilate_mm(wide, spacing, WIDE_MARGIN_MM)
        return region, f"{what}, dilated by {EDIT_MARGIN_MM:g} mm ({WIDE_MARGIN_MM:g} mm around lung tumors)"
    return region, f"{what}, dilated by {EDIT_MARGIN_MM:g} mm"


def check_region_size(region: np.ndarray, body: np.ndarray) -> None:
    """Refuse a region that covers most of the body: that is a new CT, which `generate` makes better."""
    inside = int(np.count_nonzero(region & body))
    total = max(int(np.count_nonzero(body)), 1)
    if inside > MAX_REGION_SHARE * total:
        raise MaskError(
            f"the edit region covers {100 * inside / total:.0f}% of the body: that is a new CT, not an edit",
            "generate a whole CT from the mask (leave out --reference-ct), or edit a smaller region",
        )


# ---------------------------------------------------------------------------------------------------
# The crop on the model's grid


@dataclass(frozen=True)
class EditCrop:
    """The grid the networks run on, as a map into the reference's RAS-ordered voxels.

    Model voxel j lies at reference voxel origin + step · j (per axis). `aligned`: step 1 and a whole
    origin, so the crop is a block of the scan's own voxels (padded with air where it passes the
    volume's edge); otherwise the scan is resampled onto it."""

    shape: tuple[int, int, int]
    affine: np.ndarray  # model voxel → RAS mm
    origin: np.ndarray  # (3,) reference (RAS-ordered) voxel coordinates of model voxel 0
    step: np.ndarray  # (3,) reference voxels per model voxel
    box: tuple[slice, slice, slice]  # the region's box in the reference's RAS-ordered voxels

    @property
    def aligned(self) -> bool:
        return bool(np.all(self.step == 1.0) and np.all(self.origin == np.round(self.origin)))

    @property
    def spacing(self) -> tuple[float, float, float]:
        return spacing_of(self.affine)

    def take(self, array: np.ndarray, order: int, fill: float) -> np.ndarray:
        """`array` (reference grid, RAS-ordered) on the crop: a copy of its block, or resampled."""
        full = np.array(array.shape)
        if self.aligned:
            lo = self.origin.astype(int)
            hi = lo + np.array(self.shape)
            out = np.full(self.shape, fill, dtype=array.dtype)
            src_lo, src_hi = np.maximum(lo, 0), np.minimum(hi, full)
            out[_box(src_lo - lo, src_hi - lo)] = array[_box(src_lo, src_hi)]
            return out
        far = self.origin + self.step * (np.array(self.shape) - 1)
        lo = np.clip(np.floor(self.origin).astype(int) - 1, 0, full)
        hi = np.clip(np.ceil(far).astype(int) + 2, 0, full)
        block = array[_box(lo, hi)]
        dtype = np.float32 if order > 0 else block.dtype
        return ndimage.affine_transform(
            block.astype(dtype, copy=False),
            self.step,
            offset=self.origin - lo,
            output_shape=self.shape,
            order=order,
            mode="constant",
            cval=fill,
        )

    def back(self, drawn: np.ndarray) -> np.ndarray:
        """`drawn` (on the crop) at the reference voxels of `box` (trilinear when resampled)."""
        lo = np.array([s.start for s in self.box])
        hi = np.array([s.stop for s in self.box])
        if self.aligned:
            start = lo - self.origin.astype(int)
            return drawn[_box(start, start + hi - lo)]
        return ndimage.affine_transform(
            drawn.astype(np.float32, copy=False),
            1.0 / self.step,
            offset=(lo - self.origin) / self.step,
            output_shape=tuple(int(n) for n in hi - lo),
            order=1,
            mode="nearest",
        )


def model_spacing(spacing: tuple[float, float, float], rules: GridRules) -> tuple[float, float, float]:
    """The spacing the model generates at for a scan of `spacing`: the scan's own where the model
    takes it, else the nearest end of the model's range (the finest grid it takes)."""
    lo, hi = rules.spacing_xy_mm
    zlo, zhi = rules.spacing_z_mm
    sx, sy, sz = spacing

    def clip(value: float, a: float, b: float) -> float:
        return value if a - 1e-6 <= value <= b + 1e-6 else float(min(max(value, a), b))

    return clip(sx, lo, hi), clip(sy, lo, hi), clip(sz, zlo, zhi)


def plan_crop(
    region_c: np.ndarray, view: CanonicalView, rules: GridRules, compression: int, context: int = CONTEXT_LATENT
) -> EditCrop:
    """The crop for a region given on the reference's RAS-ordered grid (`region_c`, a view is fine)."""
    bounds = _bbox(region_c)
    if bounds is None:
        raise MaskError("the edit region is empty", "paint the region to redraw")
    lo_r, hi_r = bounds
    full = np.array(view.shape)
    spacing = np.array(view.spacing)
    target = np.array(model_spacing(tuple(spacing), rules))
    step = np.where(np.isclose(target, spacing, rtol=0, atol=1e-6), 1.0, target / spacing)
    m = max(rules.size_multiple, rules.min_size)
    # The region's extent in model voxels plus the context on each side, rounded up to the size step;
    # up to half a latent voxel of the context on each side may go rather than round up a whole step
    # (a 20 mm lesion's region plus 4 latent voxels a side is 49 voxels: 48 sees 3.9 latent voxels a
    # side at 0.56x the work of 64).
    extent = (hi_r - lo_r) / step
    size = np.maximum(np.ceil((extent + 2 * context * compression - compression) / m).astype(int) * m, m)
    centre = (lo_r + hi_r - 1) / 2.0
    origin = centre - step * (size - 1) / 2.0
    reach = step * (size - 1)
    inside = reach <= full - 1
    origin = np.where(inside, np.clip(origin, 0, full - 1 - reach), (full - 1 - reach) / 2.0)
    origin = np.where(step == 1.0, np.round(origin), origin)
    affine = np.array(view.affine, dtype=float)
    crop_affine = np.eye(4)
    crop_affine[:3, :3] = affine[:3, :3] * step
    crop_affine[:3, 3] = affine[:3, :3] @ origin + affine[:3, 3]
    return EditCrop(tuple(int(n) for n in size), crop_affine, origin, step, _box(lo_r, hi_r))


# ---------------------------------------------------------------------------------------------------
# Composite


def blend_weight(region_box: np.ndarray, spacing: tuple[float, ...], band_mm: float = BLEND_BAND_MM) -> np.ndarray:
    """Per voxel of the region's box: 0 outside the region, rising to 1 at `band_mm` inside its edge."""
    if band_mm <= 0:
        return region_box.astype(np.float32)
    padded = np.pad(region_box, 1)
    depth = ndimage.distance_transform_edt(padded, sampling=spacing)[1:-1, 1:-1, 1:-1]
    half = 0.5 * min(spacing)  # the edge voxel's centre lies half a voxel inside the edge
    return np.clip((depth - half) / band_mm, 0.0, 1.0).astype(np.float32) * region_box


def composite(reference_box: np.ndarray, drawn_box: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """reference + weight · (drawn − reference), in the reference's dtype (int16 HU rounded)."""
    mixed = reference_box.astype(np.float32) + weight * (drawn_box.astype(np.float32) - reference_box)
    if np.issubdtype(reference_box.dtype, np.integer):
        info = np.iinfo(reference_box.dtype)
        mixed = np.clip(np.rint(mixed), info.min, info.max)
    out = mixed.astype(reference_box.dtype)
    keep = weight <= 0
    out[keep] = reference_box[keep]  # bit for bit where nothing is drawn
    return out


# Fewer voxels than this of a label in the region say too little of its level to correct it by.
MIN_LEVEL_VOXELS = 20


def match_levels(
    drawn: np.ndarray, reference: np.ndarray, labels: np.ndarray, region: np.ndarray, kept: np.ndarray
) -> tuple[np.ndarray, dict[int, float]]:
    """The drawn HU with each label's level moved to the patient's: per label, the median of the scan
    minus the median of the drawn HU over that label's `kept` voxels in the region (voxels whose label
    the edit did not change, where the scan shows this patient's tissue of that label). Tumors are
    left as drawn: their level was set against this patient's host in the latent already
    (`latent_prior.reference_level_shift`). A label with too few such voxels is not moved. Returns
    (corrected HU, label → offset)."""
    offsets: dict[int, float] = {}
    inside = region & kept
    for label in np.unique(labels[region]).tolist():
        if label == 0 or label in L.TUMOR_HOSTS:
            continue
        where = inside & (labels == label)
        if np.count_nonzero(where) >= MIN_LEVEL_VOXELS:
            offsets[int(label)] = float(np.median(reference[where]) - np.median(drawn[where]))
    out = drawn.astype(np.float32, copy=True)
    for label, offset in offsets.items():
        out[region & (labels == label)] += offset
    return out, offsets


def _fine(image: np.ndarray) -> np.ndarray:
    """What a one-voxel Gaussian removes: the scan's noise and finest texture."""
    return image - ndimage.gaussian_filter(image, 1.0)


def _spread(values: np.ndarray) -> float:
    """A robust standard deviation (1.4826 × the median absolute value of a zero-centred residual)."""
    return 1.4826 * float(np.median(np.abs(values))) if values.size else 0.0


def match_noise(
    drawn: np.ndarray, reference: np.ndarray, body: np.ndarray, region: np.ndarray, seed: int
) -> tuple[np.ndarray, float]:
    """The drawn HU with fine noise added where they are smoother than the scan around them.

    A crop drawn at a model's coarser spacing and resampled onto a 0.7 mm scan has none of the scan's
    noise, and would show as a smooth patch. The scan's fine-texture spread is measured on body voxels
    outside the region, the drawn HU's inside it; the missing part is added as seeded Gaussian noise of
    the same grain inside the region. Returns (HU, the added spread in HU; 0 when none was missing)."""
    outside, inside = body & ~region, body & region
    if np.count_nonzero(outside) < MIN_LEVEL_VOXELS or not inside.any():
        return drawn, 0.0
    scan = _spread(_fine(reference.astype(np.float32))[outside])
    own = _spread(_fine(drawn.astype(np.float32))[inside])
    missing = float(np.sqrt(max(scan * scan - own * own, 0.0)))
    if missing < 1.0:
        return drawn, 0.0
    noise = np.random.default_rng(seed).standard_normal(drawn.shape).astype(np.float32)
    noise = ndimage.gaussian_filter(noise, 0.6)
    noise *= missing / max(_spread(_fine(noise)), 1e-6)
    return np.where(inside, drawn + noise, drawn).astype(np.float32), missing


def crop_body(labels: np.ndarray, hu: np.ndarray) -> np.ndarray:
    """Body (200) on the crop where the mask has no label but the scan has tissue: the scan's own
    outline, better than the envelope rule a mask alone gets (`masks.ensure_body`)."""
    out = labels.copy()
    out[(labels == 0) & (hu > AIR_BELOW_HU)] = L.BODY
    return out


def describe_crop(crop: EditCrop) -> str:
    shape = "x".join(map(str, crop.shape))
    spacing = " x ".join(f"{s:.3g}" for s in crop.spacing)
    how = "the scan's own voxels" if crop.aligned else "resampled from the scan"
    return f"{shape} voxels of {spacing} mm ({how})"


def region_share(region: np.ndarray) -> float:
    return float(np.count_nonzero(region)) / max(1, math.prod(region.shape))
