"""Output grids: which sizes, spacings and fields of view a model accepts, and how to build a grid.

A grid is a voxel shape plus a 4×4 voxel → RAS-millimetre affine. The rules come from the model: the
size must be a multiple of the VAE compression times the UNet's down-sampling, and spacing and field
of view must be in the ranges the official MAISI code accepts (a model folder may narrow or widen them
in its `maisi_synth.json`, as the demo model does for its small volumes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import GeometryError

# The official `check_input_ct`: in-plane spacing 0.5–3 mm, slice spacing 0.5–5 mm, in-plane FOV ≥ 256 mm.
OFFICIAL_SPACING_XY_MM = (0.5, 3.0)
OFFICIAL_SPACING_Z_MM = (0.5, 5.0)
OFFICIAL_MIN_FOV_XY_MM = 256.0
# Sizes the official models were trained at; others work but are off the validated set.
OFFICIAL_SIZES_XY = (256, 384, 512)
OFFICIAL_SIZES_Z = (128, 256, 384, 512, 640, 768)


@dataclass(frozen=True)
class GridRules:
    size_multiple: int = 32
    spacing_xy_mm: tuple[float, float] = OFFICIAL_SPACING_XY_MM
    spacing_z_mm: tuple[float, float] = OFFICIAL_SPACING_Z_MM
    min_fov_xy_mm: float = OFFICIAL_MIN_FOV_XY_MM
    min_size: int = 0
    validated_sizes: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict, size_multiple: int) -> "GridRules":
        return cls(
            size_multiple=int(data.get("size_multiple", size_multiple)),
            spacing_xy_mm=tuple(data.get("spacing_xy_mm", OFFICIAL_SPACING_XY_MM)),
            spacing_z_mm=tuple(data.get("spacing_z_mm", OFFICIAL_SPACING_Z_MM)),
            min_fov_xy_mm=float(data.get("min_fov_xy_mm", OFFICIAL_MIN_FOV_XY_MM)),
            min_size=int(data.get("min_size", 0)),
        )

    def to_dict(self) -> dict:
        return {
            "size_multiple": self.size_multiple,
            "spacing_xy_mm": list(self.spacing_xy_mm),
            "spacing_z_mm": list(self.spacing_z_mm),
            "min_fov_xy_mm": self.min_fov_xy_mm,
            "min_size": self.min_size,
        }


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size along each array axis (column norms, so oblique grids are measured right)."""
    return tuple(float(np.linalg.norm(affine[:3, i])) for i in range(3))


# The largest output grid generated: twice the official maximum (512 × 512 × 768), checked before any
# array of that size is made (the mask code alone takes 32 bytes a voxel).
MAX_OUTPUT_VOXELS = 512 * 512 * 1024


def check_grid(shape: tuple[int, ...], spacing: tuple[float, ...], rules: GridRules) -> None:
    """Raise GeometryError if a canonical (RAS-ordered) grid is outside the model's rules."""
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise GeometryError(f"spacing {tuple(spacing)} is not three positive numbers", "pass e.g. --spacing 1.5 1.5 2")
    voxels = math.prod(int(n) for n in shape)
    if voxels > MAX_OUTPUT_VOXELS:
        raise GeometryError(
            f"output grid {'x'.join(map(str, shape))} has {voxels / 1e6:.0f} million voxels, more than the "
            f"{MAX_OUTPUT_VOXELS / 1e6:.0f} million this tool generates",
            "choose a smaller --output-size or a larger --spacing",
        )
    m = rules.size_multiple
    bad = [n for n in shape if n % m or n < max(m, rules.min_size)]
    if bad:
        suggestion = " ".join(str(max(m, rules.min_size, int(round(n / m)) * m)) for n in shape)
        raise GeometryError(
            f"output size {'x'.join(map(str, shape))} is not allowed: every axis must be a multiple of "
            f"{m} (at least {max(m, rules.min_size)}) for this model",
            f"pass --output-size {suggestion} (or --output-size auto)",
        )
    lo, hi = rules.spacing_xy_mm
    zlo, zhi = rules.spacing_z_mm
    sx, sy, sz = spacing
    if not (lo - 1e-6 <= sx <= hi + 1e-6 and lo - 1e-6 <= sy <= hi + 1e-6):
        raise GeometryError(
            f"in-plane spacing {sx:.3g} x {sy:.3g} mm is outside the model's range {lo}-{hi} mm",
            f"pass --output-size auto (the nearest grid the model accepts, same field of view), or --spacing "
            f"with in-plane values in {lo}-{hi} mm (e.g. --spacing {min(max(sx, lo), hi):.3g} "
            f"{min(max(sy, lo), hi):.3g} {min(max(sz, zlo), zhi):.3g})",
        )
    if not zlo - 1e-6 <= sz <= zhi + 1e-6:
        raise GeometryError(
            f"slice spacing {sz:.3g} mm is outside the model's range {zlo}-{zhi} mm",
            f"pass --output-size auto (the nearest grid the model accepts, same field of view), or --spacing "
            f"with a slice spacing in {zlo}-{zhi} mm",
        )
    fov = min(shape[0] * sx, shape[1] * sy)
    if fov < rules.min_fov_xy_mm - 1e-3:
        raise GeometryError(
            f"in-plane field of view {shape[0] * sx:.0f} x {shape[1] * sy:.0f} mm is below the model's "
            f"minimum of {rules.min_fov_xy_mm:.0f} mm",
            "use a mask that covers the whole body cross-section, or a larger --spacing/--output-size",
        )


def grid_affine(
    affine: np.ndarray, shape: tuple[int, int, int], new_shape: tuple[int, int, int], new_spacing: tuple[float, ...]
) -> np.ndarray:
    """Affine of a grid with the same directions and centre as (affine, shape), new size and spacing."""
    directions = affine[:3, :3] / np.array(spacing_of(affine))
    centre = affine[:3, :3] @ ((np.array(shape) - 1) / 2.0) + affine[:3, 3]
    out = np.eye(4)
    out[:3, :3] = directions * np.array(new_spacing, dtype=float)
    out[:3, 3] = centre - out[:3, :3] @ ((np.array(new_shape) - 1) / 2.0)
    return out


def auto_size(
    shape: tuple[int, ...], spacing: tuple[float, ...], rules: GridRules
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The allowed grid closest to (shape, spacing) that keeps the field of view.

    Per axis: the spacing is brought into the model's range, the size that then covers the FOV is
    snapped to the nearest allowed size, and the spacing is chosen to keep the FOV (clipped into the
    range again). A 512-voxel axis of 0.7 mm for a model that takes 2–4 mm becomes ~180 voxels of
    2 mm, not 512 voxels of 2 mm (a field of view three times the patient).
    """
    m = rules.size_multiple
    ranges = (rules.spacing_xy_mm, rules.spacing_xy_mm, rules.spacing_z_mm)
    new_shape, new_spacing = [], []
    for n, s, (lo, hi) in zip(shape, spacing, ranges):
        fov = n * s
        lo_n = max(m, rules.min_size, int(math.ceil(fov / hi / m)) * m)
        size = max(lo_n, int(round(fov / min(max(s, lo), hi) / m)) * m)
        new_shape.append(size)
        new_spacing.append(float(min(max(fov / size, lo), hi)))
    return tuple(new_shape), tuple(new_spacing)


def resolve_output_grid(
    shape: tuple[int, int, int],
    affine: np.ndarray,
    rules: GridRules,
    output_size: tuple[int, int, int] | str | None = None,
    spacing: tuple[float, float, float] | None = None,
) -> tuple[tuple[int, int, int], np.ndarray]:
    """The output grid for a canonical mask grid and the user's --output-size / --spacing.

    With neither, the mask's own grid. With a spacing only, the size that keeps the FOV. With a size
    only, the spacing that keeps the FOV. `auto` snaps to the closest allowed grid. The grid is then
    checked against the model's rules.
    """
    in_spacing = spacing_of(affine)
    if output_size == "auto":
        new_shape, new_spacing = auto_size(shape, spacing or in_spacing, rules)
        if spacing is not None:
            new_spacing = tuple(float(s) for s in spacing)
    elif output_size is not None:
        new_shape = tuple(int(n) for n in output_size)
        new_spacing = (
            tuple(float(s) for s in spacing)
            if spacing is not None
            else tuple(n * s / m for n, s, m in zip(shape, in_spacing, new_shape))
        )
    elif spacing is not None:
        new_spacing = tuple(float(s) for s in spacing)
        new_shape = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, in_spacing, new_spacing))
    else:
        new_shape, new_spacing = tuple(shape), in_spacing
    if len(new_shape) != 3 or min(new_shape) < 1 or len(new_spacing) != 3 or min(new_spacing) <= 0:
        raise GeometryError(
            f"output size {new_shape} / spacing {new_spacing} is not a 3-D grid",
            "give three positive numbers to --output-size and --spacing",
        )
    check_grid(new_shape, new_spacing, rules)
    if new_shape == tuple(shape) and np.allclose(new_spacing, in_spacing, rtol=0, atol=1e-6):
        return tuple(shape), np.array(affine, dtype=float)
    return new_shape, grid_affine(affine, shape, new_shape, new_spacing)


@dataclass(frozen=True)
class GridPlan:
    """Where a CT is generated and how it returns to the mask's grid.

    `back` is "none" (generated on the output grid itself), "crop" (the mask's grid padded with
    background to sizes the model takes; `crop` cuts the CT back) or "resample" (the mask's spacing
    is outside the model's range: generated on the nearest grid the model takes, then resampled onto
    the mask's grid).
    """

    shape: tuple[int, int, int]  # the grid the model generates on (canonical, RAS-ordered)
    affine: np.ndarray
    back: str = "none"
    crop: tuple[slice, slice, slice] | None = None


def _spacing_allowed(spacing: tuple[float, ...], rules: GridRules) -> bool:
    lo, hi = rules.spacing_xy_mm
    zlo, zhi = rules.spacing_z_mm
    sx, sy, sz = spacing
    return lo - 1e-6 <= sx <= hi + 1e-6 and lo - 1e-6 <= sy <= hi + 1e-6 and zlo - 1e-6 <= sz <= zhi + 1e-6


def plan_output_grid(
    shape: tuple[int, int, int],
    affine: np.ndarray,
    rules: GridRules,
    output_size: tuple[int, int, int] | str | None = None,
    spacing: tuple[float, float, float] | None = None,
) -> GridPlan:
    """The grid to generate on for a canonical mask grid and the user's --output-size / --spacing.

    An explicit size or spacing is taken as the output grid (`resolve_output_grid`). Without either,
    the CT comes back on the mask's own grid: a size the model does not take is padded with
    background and cropped back (voxel-aligned with the mask), and a spacing outside the model's
    range is generated on the nearest grid the model takes and resampled back.
    """
    if output_size is not None or spacing is not None:
        new_shape, new_affine = resolve_output_grid(shape, affine, rules, output_size, spacing)
        return GridPlan(tuple(new_shape), new_affine)
    in_spacing = spacing_of(affine)
    if not all(math.isfinite(s) and s > 0 for s in in_spacing):
        raise GeometryError(f"the mask's spacing {in_spacing} is not three positive numbers", "re-save the mask")
    if not _spacing_allowed(in_spacing, rules):
        new_shape, new_spacing = auto_size(shape, in_spacing, rules)
        check_grid(new_shape, new_spacing, rules)
        return GridPlan(tuple(new_shape), grid_affine(affine, shape, new_shape, new_spacing), "resample")
    m = rules.size_multiple
    padded = tuple(max(m, rules.min_size, int(math.ceil(n / m)) * m) for n in shape)
    if padded == tuple(shape):
        check_grid(shape, in_spacing, rules)
        return GridPlan(tuple(shape), np.array(affine, dtype=float))
    check_grid(padded, in_spacing, rules)
    before = [(p - n) // 2 for p, n in zip(padded, shape)]
    padded_affine = np.array(affine, dtype=float)
    padded_affine[:3, 3] = affine[:3, 3] - affine[:3, :3] @ np.array(before, dtype=float)
    crop = tuple(slice(b, b + n) for b, n in zip(before, shape))
    return GridPlan(padded, padded_affine, "crop", crop)
