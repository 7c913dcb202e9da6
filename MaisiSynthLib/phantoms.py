"""Procedural torso CT phantoms with MAISI labels: training and test data we are free to ship.

The official MAISI weights and their training data cannot be downloaded here, so the demo model and
the tests learn from phantoms. A phantom is drawn in millimetres in a patient frame (NIfTI RAS world
coordinates: +x towards the patient's right, +y anterior, +z superior; origin at the torso centre) and then
rasterised onto the requested grid, so any size and spacing show the same anatomy, cropped by the
field of view. Shapes are ellipsoids, tubes and slabs warped by a smooth random displacement; sizes,
positions and intensities vary per seed. Organ intensities are drawn inside the central part of
MAISI's per-organ median HU range (`image_median_statistics_ct.json`), and the image gets
partial-volume blur and spatially correlated noise. Tumors are spheres intersected with their host
organ: hypodense in liver and pancreas (some with an enhancing rim), enhancing in
the colon, solid in the lung, lytic or sclerotic in bone.

Array axes follow the affine: axis 0 → x, axis 1 → y, axis 2 → z; the affine is diagonal (the
spacing) and centred on the origin. So index 0 of axis 0 is the patient's left side, index 0 of
axis 1 the back, and index 0 of axis 2 the bottom (pelvis); the lungs are at high axis-2 indices.
At the default grid (128 × 128 × 64 voxels of 3 × 3 × 5 mm, a 384 × 384 × 320 mm field of view) the
whole torso cross-section and every structure are inside; the torso runs on above and below.

A tumor replaces host voxels only where host tissue surrounds it; `Phantom.tumors` lists the
lesions actually placed, which on small or coarse grids may be fewer than asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable

import nibabel as nib
import numpy as np
from scipy import ndimage

from . import labels as L
from .errors import OptionError
from .volumes import gzip_bytes

TUMOR_CHOICES = (L.HEPATIC_TUMOR, L.LUNG_TUMOR, L.PANCREATIC_TUMOR, L.COLON_CANCER, L.BONE_LESION)
DEFAULT_SIZE = (128, 128, 64)
DEFAULT_SPACING = (3.0, 3.0, 5.0)

# Vertebrae from the top of the phantom (T1 at z ≈ +150 mm) down to L5 (z ≈ −150 mm).
VERTEBRAE = tuple(range(49, 32, -1))  # T1 (49) … T12 (38), L1 (37) … L5 (33)
LEFT_RIBS = tuple(range(63, 75))  # left rib 1 … 12
RIGHT_RIBS = tuple(range(75, 87))  # right rib 1 … 12
HEART, PULMONARY_VEIN, SPINAL_CORD, TRACHEA = 115, 119, 121, 57
LEFT_AUTOCHTHON, RIGHT_AUTOCHTHON = 104, 105
STERNUM, COSTAL_CARTILAGES = 122, 114
LEFT_SCAPULA, RIGHT_SCAPULA, LEFT_CLAVICLE, RIGHT_CLAVICLE = 89, 90, 91, 92

FAT_HU, MUSCLE_HU, AIR_HU = -100.0, 50.0, -1000.0


@dataclass
class Phantom:
    image: np.ndarray  # int16 HU, −1000 outside the body
    labels: np.ndarray  # uint8 MAISI ids
    affine: np.ndarray  # 4×4 voxel → RAS mm, diagonal (the spacing), origin at the grid centre
    seed: int
    tumors: tuple[int, ...]  # the tumor ids actually placed

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(self.affine[i, i]) for i in range(3))


def _organ_ranges() -> dict[str, tuple[float, float]]:
    text = resources.files("MaisiSynthLib").joinpath("data/image_median_statistics_ct.json").read_text()
    stats = json.loads(text)
    return {k: (float(v["percentile_0_5"]), float(v["percentile_99_5"])) for k, v in stats.items()}


def _median_hu(rng: np.random.Generator, organ: str) -> float:
    """A median HU in the middle 60% of the reference range, so noise and blur keep it inside."""
    lo, hi = _organ_ranges()[organ]
    return float(rng.uniform(lo + 0.2 * (hi - lo), hi - 0.2 * (hi - lo)))


class PhantomOptionError(OptionError, ValueError):
    """A bad argument to `make_phantom` / `write_phantoms`.

    An OptionError, so the CLI reports it as a one-line user error (exit status 2); a ValueError, so
    library callers can treat it like any other bad value.
    """


def _whole(value, name: str, example: str) -> int:
    """`value` as an int, refusing fractions, booleans and non-numbers instead of truncating them."""
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        number = int(value)
        if number != float(value):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise PhantomOptionError(f"phantom {name} must be a whole number, got {value!r}", example) from None
    return number


def _check_seed(seed) -> int:
    seed = _whole(seed, "seed", "e.g. seed=0")
    if seed < 0:  # numpy seeds are non-negative
        raise PhantomOptionError(f"phantom seed must be zero or more, got {seed}", "e.g. seed=0")
    return seed


def _check_centre(centre) -> tuple[float, float, float]:
    try:
        values = tuple(float(c) for c in centre)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(np.isfinite(values)):
        raise PhantomOptionError(
            f"phantom centre must be three numbers (mm), got {centre!r}", "e.g. centre=(0, 0, 80) for the chest"
        )
    return values


def _check_args(
    size, spacing, tumors
) -> tuple[tuple[int, int, int], tuple[float, float, float], tuple[int, ...] | str]:
    size_hint = "e.g. size=(128, 128, 64)"
    try:
        values = list(size)
    except TypeError:
        values = []
    if len(values) != 3:
        raise PhantomOptionError(f"phantom size must be three positive whole numbers, got {size!r}", size_hint)
    size = tuple(_whole(n, "size", size_hint) for n in values)
    if min(size) < 1:
        raise PhantomOptionError(f"phantom size must be three positive whole numbers, got {size!r}", size_hint)
    try:
        millimetres = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        millimetres = ()
    if len(millimetres) != 3 or not all(np.isfinite(millimetres)) or min(millimetres) <= 0:
        raise PhantomOptionError(
            f"phantom spacing must be three positive numbers (mm), got {spacing!r}", "e.g. spacing=(3, 3, 5)"
        )
    spacing = millimetres
    choices = ", ".join(map(str, TUMOR_CHOICES))
    if isinstance(tumors, str):
        if tumors not in ("all", "random", "none"):
            raise PhantomOptionError(
                f"tumors must be all, random, none or tumor ids, got '{tumors}'", "e.g. tumors=[26, 23]"
            )
        return size, spacing, tumors
    try:
        requested = list(tumors)
    except TypeError:
        raise PhantomOptionError(
            f"tumors must be all, random, none or a list of tumor ids, got {tumors!r}", "e.g. tumors=[26]"
        ) from None
    ids, bad = [], []
    for t in requested:
        try:
            tumor = _whole(t, "tumor id", "")
        except PhantomOptionError:
            tumor = None
        if tumor not in TUMOR_CHOICES:
            bad.append(t)
        elif tumor not in ids:  # a type is placed once; repeating it must not place two lesions
            ids.append(tumor)
    if bad:
        raise PhantomOptionError(f"tumors {bad} are not phantom tumor ids", f"use some of {choices}")
    return size, spacing, tuple(ids)


class _Frame:
    """World coordinates (mm) of every voxel, warped by a smooth random displacement.

    Shapes are evaluated only inside their bounding box (widened by the largest warp), which keeps a
    phantom with dozens of tubes and ellipsoids to about a second.
    """

    MAX_WARP_MM = 15.0

    def __init__(self, size, spacing, rng: np.random.Generator, centre=(0.0, 0.0, 0.0), scale=(1.0, 1.0, 1.0)) -> None:
        self.shape = tuple(size)
        # Anatomy is drawn in a standard body and scaled to this patient: a voxel's anatomical
        # coordinate is its world position (grid centred on `centre`) divided by the body's scale.
        self.axes = [((np.arange(n) - (n - 1) / 2.0) * s + c) / k for n, s, c, k in zip(size, spacing, centre, scale)]
        x, y, z = np.meshgrid(*self.axes, indexing="ij", sparse=True)
        # Low-frequency sinusoids: organs bend and shift together, like anatomy, not like noise.
        warped = []
        for base in (x, y, z):
            field = np.zeros(self.shape, np.float32)
            for _ in range(2):
                k = rng.uniform(0.004, 0.012, 3) * rng.choice([-1, 1], 3)
                phase = rng.uniform(0, 2 * np.pi)
                field += np.float32(rng.uniform(3.0, 7.0)) * np.sin(k[0] * x + k[1] * y + k[2] * z + phase).astype(
                    np.float32
                )
            warped.append((base + field).astype(np.float32))
        self.x, self.y, self.z = warped

    def box(self, lo, hi) -> tuple[slice, slice, slice]:
        """Index slices holding every voxel whose warped coordinates may lie in [lo, hi] (mm)."""
        out = []
        for axis, a, b in zip(self.axes, lo, hi):
            inside = np.nonzero((axis >= a - self.MAX_WARP_MM) & (axis <= b + self.MAX_WARP_MM))[0]
            out.append(slice(int(inside[0]), int(inside[-1]) + 1) if inside.size else slice(0, 0))
        return tuple(out)

    def full(self, coordinate: np.ndarray) -> np.ndarray:
        return np.broadcast_to(coordinate, self.shape)

    def ellipsoid(self, c, r) -> np.ndarray:
        out = np.zeros(self.shape, bool)
        box = self.box(np.subtract(c, r), np.add(c, r))
        x, y, z = self.x[box], self.y[box], self.z[box]
        out[box] = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1.0
        return out

    def tube(self, points: np.ndarray, radius: float) -> np.ndarray:
        """Voxels within `radius` mm of a polyline."""
        out = np.zeros(self.shape, bool)
        for a, b in zip(points[:-1], points[1:]):
            box = self.box(np.minimum(a, b) - radius, np.maximum(a, b) + radius)
            x, y, z = self.x[box], self.y[box], self.z[box]
            ab = b - a
            length2 = float(ab @ ab) or 1e-6
            t = np.clip(((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / length2, 0.0, 1.0)
            d2 = (x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2
            out[box] |= d2 <= radius**2
        return out


class _Canvas:
    """The label and HU arrays a phantom is painted on, with the warped frame and the random stream.

    Every painter below draws from `rng` (through `u`) in the order of its code, and make_phantom
    calls the painters in one fixed order: that keeps a seed's phantom the same byte for byte.
    """

    def __init__(self, f: _Frame, rng: np.random.Generator, size, spacing) -> None:
        self.f, self.rng, self.u = f, rng, rng.uniform
        self.size, self.spacing = size, spacing
        self.labels = np.zeros(size, np.uint8)
        self.hu = np.full(size, AIR_HU, np.float32)

    def paint(
        self, region: np.ndarray, label: int | None, value: float | None, where: np.ndarray | None = None
    ) -> None:
        region = np.broadcast_to(region, self.size)
        if where is not None:
            region = region & where
        if label is not None:
            self.labels[region] = label
        if value is not None:
            self.hu[region] = value


@dataclass
class _Wall:
    """The body wall's ellipses (semi-axes in mm) and masks, which the inner anatomy is placed by."""

    a: float
    b: float
    inner_a: float
    inner_b: float
    cavity_a: float
    cavity_b: float
    muscle_depth: float
    muscle_hu: float
    body: np.ndarray  # the whole body, full grid
    cavity: np.ndarray  # inside the muscle layer (may be a broadcast view)


@dataclass
class _Chest:
    lung_x: float
    lung_c: float
    lung_base: float  # the diaphragm: the abdominal organs hang below it
    lungs: np.ndarray


def _paint_body_wall(c: _Canvas) -> _Wall:
    """Skin, subcutaneous fat, muscle; the cavity inside is visceral fat. All label 200."""
    f, u = c.f, c.u
    a, b = u(145, 185), u(105, 135)
    body = ((f.x / a) ** 2 + ((f.y - 5) / b) ** 2) <= 1.0
    fat_depth, muscle_depth = u(8, 30), u(8, 15)
    inner_a, inner_b = a - fat_depth, b - fat_depth
    cavity_a, cavity_b = inner_a - muscle_depth, inner_b - muscle_depth
    under_fat = ((f.x / inner_a) ** 2 + ((f.y - 5) / inner_b) ** 2) <= 1.0
    cavity = ((f.x / cavity_a) ** 2 + ((f.y - 5) / cavity_b) ** 2) <= 1.0
    fat_hu, muscle_hu = u(-110, -85), u(40, 60)
    c.paint(body, L.BODY, fat_hu)
    c.paint(under_fat, None, muscle_hu)
    c.paint(cavity, None, u(-100, -80))
    skin = body & ~(((f.x / (a - 2.5)) ** 2 + ((f.y - 5) / (b - 2.5)) ** 2) <= 1.0)
    c.paint(skin, None, 20.0)
    body = np.broadcast_to(body, c.size)
    return _Wall(a, b, inner_a, inner_b, cavity_a, cavity_b, muscle_depth, muscle_hu, body, cavity)


def _paint_back_muscles(c: _Canvas, wall: _Wall) -> float:
    """The autochthonous muscles beside the spine; returns the spine's y (mm), which they define."""
    spine_y = -wall.cavity_b + c.u(18, 26)
    for label, side in ((RIGHT_AUTOCHTHON, 1), (LEFT_AUTOCHTHON, -1)):
        c.paint(
            c.f.ellipsoid((side * 38, spine_y - 22, 0), (24, 20, 400)), label, wall.muscle_hu + c.u(-5, 5), wall.body
        )
    return spine_y


def _paint_lungs(c: _Canvas, wall: _Wall) -> _Chest:
    """Lungs fill the upper chest cavity, split into lobes by oblique planes, with pulmonary vessels.

    The heart, great vessels and spine carve the mediastinum out of them later. Aerated lung is
    about −850 HU in adults.
    """
    f, u, size = c.f, c.u, c.size
    lung_hu = u(-900, -790)
    lung_top = u(140, 180)
    lung_base = u(-25, 30)  # the diaphragm: the abdominal organs hang below it
    lung_c = (lung_top + lung_base) / 2
    lung_rz = (lung_top - lung_base) / 2
    lung_x = wall.cavity_a * u(0.5, 0.58)
    lung_rx = (wall.cavity_a - lung_x) * u(0.85, 0.98) + u(0, 12)
    lung_ry = wall.cavity_b * u(0.75, 0.92)
    lungs = np.zeros(size, bool)
    for side in (1, -1):  # +1 right, −1 left
        lung = f.full(f.ellipsoid((side * lung_x, -5, lung_c), (lung_rx, lung_ry, lung_rz))) & np.broadcast_to(
            wall.cavity, size
        )
        fissure = f.z - lung_c - 0.6 * (f.y + 5) + u(-10, 10)  # oblique fissure: upper lobe above and in front
        upper = f.full(fissure > 0)
        if side == 1:
            horizontal = f.full(f.z > lung_c + u(-5, 10))
            c.paint(lung & upper & horizontal, 30, lung_hu)
            c.paint(lung & upper & ~horizontal, 31, lung_hu)
            c.paint(lung & ~upper, 32, lung_hu)
        else:
            c.paint(lung & upper, 28, lung_hu)
            c.paint(lung & ~upper, 29, lung_hu)
        lungs |= lung
    # Pulmonary vessels: branches from each hilum towards the periphery.
    for side in (1, -1):
        hilum = np.array([side * (lung_x - 25), 0.0, lung_c])
        for _ in range(5):
            direction = np.array([side * u(0.3, 1.0), u(-1, 1), u(-1, 1)])
            direction /= np.linalg.norm(direction)
            mid = hilum + direction * u(25, 40)
            end = mid + (direction + c.rng.normal(0, 0.3, 3)) * u(20, 35)
            c.paint(f.tube(np.stack([hilum, mid, end]), u(2.5, 4.0)), PULMONARY_VEIN, u(30, 50), lungs)
    return _Chest(lung_x, lung_c, lung_base, lungs)


def _paint_airway_and_heart(c: _Canvas, wall: _Wall, chest: _Chest, spine_y: float) -> None:
    """The trachea down the midline to the carina, main bronchi to each hilum (air); the heart."""
    f, u = c.f, c.u
    carina = np.array([0.0, spine_y + u(40, 55), chest.lung_c + u(5, 20)])
    trachea = f.tube(np.array([[0.0, carina[1] + 5, 400.0], carina]), u(7, 10))
    for side in (1, -1):
        trachea |= f.tube(np.stack([carina, [side * (chest.lung_x - 30), 0.0, chest.lung_c]]), u(4, 6))
    c.paint(trachea & wall.body, TRACHEA, AIR_HU + u(0, 60))
    heart = f.full(
        f.ellipsoid((u(-25, -10), u(15, 30), chest.lung_base + u(35, 50)), (u(50, 60), u(40, 50), u(40, 50)))
    )
    c.paint(heart & wall.body, HEART, u(30, 50))


@dataclass
class _Skeleton:
    bone_hu: float
    top: float  # the top of T1 (mm)
    ribs_a: float  # the ribs' ellipse (semi-axes, mm)
    ribs_b: float
    rib_ends: list  # (side, front end) of the true ribs, where the costal cartilages start


def _paint_spine_and_ribs(c: _Canvas, wall: _Wall, spine_y: float) -> _Skeleton:
    """Vertebral bodies with discs and the spinal canal; ribs at the thoracic levels; the spinal cord."""
    f, u, size, body = c.f, c.u, c.size, wall.body
    bone_hu = _median_hu(c.rng, "bone")
    level_height = u(16.5, 19.0)
    top = u(150, 165)
    ribs_a, ribs_b = wall.inner_a - wall.muscle_depth / 2, wall.inner_b - wall.muscle_depth / 2
    rib_ends = []  # front ends of the ribs, where the costal cartilages start
    for i, label in enumerate(VERTEBRAE):
        z_hi = top - i * level_height
        z_lo = z_hi - level_height + 4.0  # 4 mm disc
        radius = 11.0 + 0.5 * i
        box = f.box((-radius, spine_y - 1.9 * radius, z_lo), (radius, spine_y + radius, z_hi))
        x, y, z = f.x[box], f.y[box], f.z[box]
        in_level = (z <= z_hi) & (z >= z_lo)
        body_disc = ((x / radius) ** 2 + ((y - spine_y) / (0.8 * radius)) ** 2) <= 1.0
        arch = (np.abs(x) <= 0.9 * radius) & (y < spine_y - 0.6 * radius) & (y > spine_y - 1.9 * radius)
        canal = ((x / 6.0) ** 2 + ((y - (spine_y - 1.25 * radius)) / 5.0) ** 2) <= 1.0
        vertebra = np.zeros(size, bool)
        vertebra[box] = in_level & (body_disc | (arch & ~canal))
        vertebra &= body
        c.paint(vertebra, label, bone_hu + u(-15, 15))
        if i < 12:  # thoracic: a rib pair along the body wall, sloping down towards the front
            z_rib = (z_hi + z_lo) / 2
            for ribs, side in ((RIGHT_RIBS, 1), (LEFT_RIBS, -1)):
                angles = np.linspace(-0.45 * np.pi, u(0.15, 0.35) * np.pi, 8)
                pts = np.stack(
                    [
                        side * ribs_a * np.cos(angles),
                        5 + ribs_b * np.sin(angles),
                        z_rib - 30 * (angles + 0.45 * np.pi) / np.pi,
                    ],
                    1,
                )
                pts[0] = (side * 0.9 * radius, spine_y, z_rib)
                c.paint(f.tube(pts, u(3.5, 4.5)) & body, ribs[i], bone_hu + u(-25, 5))
                if i < 7:  # true ribs reach the sternum through their cartilage
                    rib_ends.append((side, pts[-1]))
    c.paint(f.tube(np.array([[0, spine_y - 16, -400], [0, spine_y - 16, 400]]), 5.0) & body, SPINAL_CORD, u(25, 40))
    return _Skeleton(bone_hu, top, ribs_a, ribs_b, rib_ends)


def _paint_chest_wall_bones(c: _Canvas, wall: _Wall, chest: _Chest, bones: _Skeleton) -> None:
    """Front and top of the chest: sternum, costal cartilages, clavicles; shoulder blades behind."""
    f, u, body, bone_hu = c.f, c.u, wall.body, bones.bone_hu
    front = 5 + bones.ribs_b
    sternum_top, sternum_bottom = bones.top - u(5, 20), chest.lung_base + u(10, 30)
    sternum = f.ellipsoid(
        (0.0, front - 2, (sternum_top + sternum_bottom) / 2),
        (u(11, 15), u(5, 7), max(10.0, (sternum_top - sternum_bottom) / 2)),
    )
    c.paint(sternum & body, STERNUM, bone_hu + u(-60, -20))
    cartilage_hu = u(80, 160)
    for side, end in bones.rib_ends:
        joint = np.array([side * 12.0, front - 2, min(max(end[2] + u(0, 15), sternum_bottom), sternum_top)])
        c.paint(f.tube(np.stack([end, joint]), u(3.0, 4.0)) & body & ~f.full(sternum), COSTAL_CARTILAGES, cartilage_hu)
    a = wall.a
    for label, side in ((RIGHT_CLAVICLE, 1), (LEFT_CLAVICLE, -1)):
        path = np.array(
            [[side * 15.0, front - 5, sternum_top + 5], [side * 0.5 * a, front - 15, sternum_top + 12],
             [side * 0.85 * a, 0.0, sternum_top + u(15, 25)]]
        )  # fmt: skip
        c.paint(f.tube(path, u(6, 8)) & body, label, bone_hu + u(-10, 30))
    for label, side in ((RIGHT_SCAPULA, 1), (LEFT_SCAPULA, -1)):
        blade = f.ellipsoid(
            (side * 0.55 * bones.ribs_a, 5 - bones.ribs_b - u(12, 18), bones.top - u(45, 65)),
            (u(35, 45), u(4, 6), u(55, 70)),
        )
        c.paint(blade & body & ~chest.lungs, label, bone_hu + u(-20, 30))


def _paint_great_vessels(c: _Canvas, wall: _Wall, chest: _Chest, spine_y: float) -> None:
    """Aorta (6) and inferior vena cava (7) in front of the spine."""
    f, u = c.f, c.u
    aorta_r = u(10, 13)
    c.paint(
        f.tube(np.array([[u(-20, -10), spine_y + 20, -110], [u(-18, -8), spine_y + 22, 200]]), aorta_r) & wall.body,
        6,
        u(150, 200),
    )
    c.paint(
        f.tube(np.array([[u(15, 25), spine_y + 25, -110], [u(18, 28), spine_y + 35, chest.lung_base + 20]]), u(9, 12))
        & wall.body,
        7,
        u(100, 150),
    )


def _paint_liver(c: _Canvas, soft: np.ndarray, lung_base: float) -> None:
    """The liver with its hepatic vessels (brighter than the parenchyma)."""
    f, u = c.f, c.u
    liver_hu = _median_hu(c.rng, "liver")
    liver = f.full(f.ellipsoid((u(50, 70), u(0, 20), lung_base - u(15, 25)), (u(70, 85), u(70, 85), u(55, 70)))) & soft
    c.paint(liver, 1, liver_hu)
    hv_points = np.array([[u(20, 30), u(0, 10), lung_base - 15]])
    for _ in range(4):
        end = hv_points[0] + np.array([u(10, 60), u(-40, 40), u(-40, 20)])
        c.paint(f.tube(np.stack([hv_points[0], end]), u(3, 4.5)), 25, liver_hu + u(50, 90), liver)


def _paint_spleen_and_stomach(c: _Canvas, soft: np.ndarray, lung_base: float) -> None:
    """The spleen, then the stomach around what the liver and spleen leave, with a gas cap in front."""
    f, u, labels = c.f, c.u, c.labels
    spleen = f.full(f.ellipsoid((u(-95, -80), u(-40, -20), lung_base - u(15, 30)), (u(28, 36), u(38, 48), u(40, 50))))
    c.paint(spleen & soft & (labels != 1), 3, _median_hu(c.rng, "spleen"))
    stomach = (
        f.full(f.ellipsoid((u(-50, -35), u(30, 50), lung_base - u(15, 30)), (u(35, 45), u(25, 35), u(35, 45)))) & soft
    )
    stomach &= ~np.isin(labels, (1, 3))
    c.paint(stomach, 12, u(20, 40))
    gas = stomach & f.full(f.y > np.percentile(f.full(f.y)[stomach], 80) if stomach.any() else False)
    c.paint(gas, None, -900.0)


def _paint_kidneys(c: _Canvas, soft: np.ndarray, lung_base: float, spine_y: float) -> None:
    f, u = c.f, c.u
    kidney_hu = _median_hu(c.rng, "kidney")
    kidney_z = lung_base - u(65, 85)
    for label, side in ((5, 1), (14, -1)):
        kidney = f.full(
            f.ellipsoid((side * u(55, 70), spine_y + u(8, 16), kidney_z + u(-8, 8)), (u(22, 28), u(20, 25), u(40, 50)))
        )
        c.paint(kidney & soft & ~np.isin(c.labels, (1, 3)), label, kidney_hu + u(-10, 10))


def _paint_pancreas(c: _Canvas, soft: np.ndarray, lung_base: float, spine_y: float) -> None:
    u = c.u
    pancreas_hu = _median_hu(c.rng, "pancreas")
    p_z = lung_base - u(45, 60)
    pancreas_path = np.array(
        [
            [u(-75, -60), spine_y + 35, p_z + u(5, 15)],
            [u(-20, 0), spine_y + u(45, 55), p_z],
            [u(20, 30), spine_y + u(40, 50), p_z - u(0, 10)],
        ]
    )
    pancreas = c.f.tube(pancreas_path, u(11, 15)) & soft & ~np.isin(c.labels, (1, 3, 5, 12, 14))
    c.paint(pancreas, 4, pancreas_hu)


def _paint_colon(c: _Canvas, soft: np.ndarray, lung_base: float) -> None:
    """The colon's frame around the abdomen, with gas pockets about 8 mm across."""
    u = c.u
    colon_r = u(15, 19)
    cz = lung_base - u(95, 115)
    colon_path = np.array(
        [
            [u(75, 90), u(-10, 10), cz - 75],
            [u(75, 90), u(0, 15), cz],
            [u(20, 40), u(45, 60), cz + u(-5, 10)],
            [u(-40, -20), u(45, 60), cz + u(-5, 10)],
            [u(-90, -75), u(0, 15), cz],
            [u(-90, -75), u(-10, 10), cz - 75],
        ]
    )
    colon = c.f.tube(colon_path, colon_r) & soft & ~np.isin(c.labels, (1, 3, 4, 5, 12, 14))
    c.paint(colon, 62, u(10, 40))
    # Gas pockets: blobs wherever smoothed noise is high.
    blobs = ndimage.gaussian_filter(c.rng.standard_normal(c.size).astype(np.float32), 8.0 / np.array(c.spacing))
    pockets = colon & (blobs > 1.2 * float(blobs.std()))
    c.paint(pockets, None, -850.0)


TUMOR_RADII_MM = {
    L.HEPATIC_TUMOR: (10, 22),
    L.LUNG_TUMOR: (7, 14),
    L.PANCREATIC_TUMOR: (8, 12),
    L.COLON_CANCER: (10, 15),
    L.BONE_LESION: (8, 12),
}


def _paint_tumors(c: _Canvas, wanted: list[int], anatomical_spacing: np.ndarray) -> list[int]:
    """Spheres inside their host, hypo- or hyper-dense, some with a rim; returns the ids placed.

    Sizes are in the standard body's millimetres, like every other shape.
    """
    f, u, rng, size, labels, hu = c.f, c.u, c.rng, c.size, c.labels, c.hu
    placed = []
    hosts = {
        L.HEPATIC_TUMOR: labels == 1,
        L.LUNG_TUMOR: np.isin(labels, L.LUNG_LOBES),
        L.PANCREATIC_TUMOR: labels == 4,
        L.COLON_CANCER: labels == 62,
        L.BONE_LESION: np.isin(labels, VERTEBRAE),
    }
    for tumor in wanted:
        host = hosts[tumor]
        # The host shrunk by one voxel: the lesion is clipped to it, so host tissue encloses the lesion
        # (the sphere lives in warped coordinates, the depth below in grid ones), and it stays off the
        # edge of the field of view, where the organ may go on unseen. A host without such a core
        # (absent, or a sliver on a tiny grid) gets no lesion: one that replaced its whole visible
        # host would not be inside it.
        core = ndimage.binary_erosion(host, structure=np.ones((3, 3, 3), bool), border_value=0)
        if not core.any():  # thin organs on coarse grids: host tissue on the six faces is enough
            core = ndimage.binary_erosion(host, border_value=0)
        if not core.any():
            continue
        # The centre is at least the radius deep in the host (smaller lesions in thin organs).
        depth = ndimage.distance_transform_edt(host, sampling=anatomical_spacing)
        # at least two voxels across on coarse grids, so partial volume leaves the lesion visible
        radius = min(max(u(*TUMOR_RADII_MM[tumor]), 2.0 * max(c.spacing)), 0.8 * float(depth.max()))
        inside = np.argwhere(depth >= radius)
        centre_index = inside[int(rng.integers(len(inside)))]
        centre = [float(np.broadcast_to(v, size)[tuple(centre_index)]) for v in (f.x, f.y, f.z)]
        sphere = f.ellipsoid(centre, (radius, radius * u(0.8, 1.2), radius * u(0.8, 1.2))) & core
        if not sphere.any():
            # Only on coarse grids with thin or cropped organs: the deepest core voxel.
            sphere = np.zeros(size, bool)
            sphere[np.unravel_index(int(np.argmax(np.where(core, depth, -1.0))), size)] = True
        host_hu = float(np.median(hu[host]))
        if tumor == L.LUNG_TUMOR:
            value = u(-10, 40)  # solid nodule in aerated lung
        elif tumor == L.BONE_LESION:
            value = host_hu + rng.choice([-1, 1]) * u(150, 250)  # lytic or sclerotic
        elif tumor == L.COLON_CANCER:
            value = host_hu + u(40, 90)  # enhancing wall mass
        elif tumor == L.PANCREATIC_TUMOR:
            value = host_hu - u(50, 90)  # small: partial volume with nearby vessels takes some contrast
        else:
            value = host_hu - u(40, 90)  # hypodense, as liver metastases and pancreatic cancer in venous phase
        c.paint(sphere, tumor, value)
        if tumor == L.COLON_CANCER:  # a wall mass pushes the bowel gas away from itself
            near = ndimage.binary_dilation(sphere, iterations=2) & host & (c.hu < host_hu - 300)
            c.paint(near, None, host_hu)
        # An enhancing rim around a hypodense core, on lesions big enough to have a core.
        rim = sphere & ~ndimage.binary_erosion(sphere)
        if rng.random() < 0.5 and tumor != L.LUNG_TUMOR and value < host_hu and rim.sum() < 0.3 * sphere.sum():
            c.paint(rim, None, host_hu + u(20, 50))
        placed.append(tumor)
    return placed


def _scanner_image(c: _Canvas, body: np.ndarray) -> np.ndarray:
    """Partial-volume edges and correlated noise on the painted HU; air outside the body stays −1000."""
    sigma_vox = 0.5
    hu = ndimage.gaussian_filter(c.hu, sigma_vox)
    noise = ndimage.gaussian_filter(c.rng.standard_normal(c.size).astype(np.float32), 1.0)
    noise_hu, noise_std = c.u(10, 18), float(noise.std())
    # A one-voxel grid has no spread to normalise; scaling its single value would blow it up.
    noise *= noise_hu / noise_std if noise_std > 1e-6 else 0.0
    hu = np.where(body, hu + noise, AIR_HU)
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16)


def _wanted_tumors(tumors: str | tuple[int, ...], rng: np.random.Generator) -> list[int]:
    if tumors == "all":
        return list(TUMOR_CHOICES)
    if tumors == "none":
        return []
    if tumors == "random":
        return [t for t in TUMOR_CHOICES if rng.random() < 0.5] or [
            TUMOR_CHOICES[int(rng.integers(len(TUMOR_CHOICES)))]
        ]
    return list(tumors)


def make_phantom(
    seed: int,
    size: Iterable[int] = DEFAULT_SIZE,
    spacing: Iterable[float] = DEFAULT_SPACING,
    tumors: str | Iterable[int] = "all",
    centre: Iterable[float] = (0.0, 0.0, 0.0),
) -> Phantom:
    """One torso phantom; the same (seed, size, spacing, tumors, centre) always gives the same arrays.

    `centre` is the world position (mm) of the grid centre: (0, 0, 0) centres the field of view on
    the torso; another z shows a chest-only or abdomen-only field of view of the same patient.

    The painters run in a fixed order, each drawing from the one random stream: reordering them (or
    the draws inside one) changes every phantom, so the order below is part of the contract.
    Later painters overwrite earlier ones where they overlap, and the abdominal organs are confined
    to `soft` tissue, so they never override the lungs, the great vessels or bone.
    """
    seed = _check_seed(seed)
    size, spacing, tumors = _check_args(size, spacing, tumors)
    grid_centre = _check_centre(centre)
    rng = np.random.default_rng(seed)
    wanted = _wanted_tumors(tumors, rng)
    # Habitus: the standard body is scaled per patient (small to large adults, short to tall trunks),
    # so sizes and heights vary together as they do in people.
    scale_xy, scale_z = rng.uniform(0.85, 1.15), rng.uniform(0.9, 1.1)
    c = _Canvas(_Frame(size, spacing, rng, grid_centre, (scale_xy, scale_xy, scale_z)), rng, size, spacing)

    wall = _paint_body_wall(c)
    spine_y = _paint_back_muscles(c, wall)
    chest = _paint_lungs(c, wall)
    _paint_airway_and_heart(c, wall, chest, spine_y)
    bones = _paint_spine_and_ribs(c, wall, spine_y)
    _paint_chest_wall_bones(c, wall, chest, bones)
    _paint_great_vessels(c, wall, chest, spine_y)
    soft = wall.body & ~chest.lungs & ~np.isin(c.labels, (6, 7, TRACHEA) + VERTEBRAE + LEFT_RIBS + RIGHT_RIBS)
    _paint_liver(c, soft, chest.lung_base)
    _paint_spleen_and_stomach(c, soft, chest.lung_base)
    _paint_kidneys(c, soft, chest.lung_base, spine_y)
    _paint_pancreas(c, soft, chest.lung_base, spine_y)
    _paint_colon(c, soft, chest.lung_base)
    placed = _paint_tumors(c, wanted, np.array(spacing) / np.array([scale_xy, scale_xy, scale_z]))
    image = _scanner_image(c, wall.body)

    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [g - (n - 1) / 2.0 * s for n, s, g in zip(size, spacing, grid_centre)]
    return Phantom(image=image, labels=c.labels, affine=affine, seed=seed, tumors=tuple(placed))


def case_seed(seed: int, index: int) -> int:
    """The seed of case `index` of a set written with `seed` (independent streams per case)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    """A .nii.gz with a zero gzip timestamp, so the same phantom always gives the same bytes."""
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return gzip_bytes(image.to_bytes(), level=9)


FIELDS_OF_VIEW = ("torso", "chest", "abdomen", "varied")


def field_of_view(
    kind: str, rng: np.random.Generator, spacing: tuple[float, float, float]
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(spacing, grid centre in mm) of a case's field of view.

    torso: the grid centred on the torso (every structure inside at the default grid); chest / abdomen:
    the grid centred on the chest (lung apices to the upper abdomen) or the abdomen, the patient a
    little off-centre in-plane, as in real scans; varied: any craniocaudal position, in-plane and
    slice spacing scaled by up to ±15 % (so the same voxel count covers more or less of the body).
    """
    if kind not in FIELDS_OF_VIEW:
        raise PhantomOptionError(
            f"field of view must be one of {', '.join(FIELDS_OF_VIEW)}, got {kind!r}", "e.g. chest"
        )
    if kind == "torso":
        return spacing, (0.0, 0.0, 0.0)
    shift = tuple(float(v) for v in rng.uniform(-12, 12, 2))
    if kind == "chest":
        return spacing, (*shift, float(rng.uniform(55, 95)))
    if kind == "abdomen":
        return spacing, (*shift, float(rng.uniform(-110, -60)))
    in_plane, slices = rng.uniform(0.85, 1.15, 2)
    varied = (spacing[0] * in_plane, spacing[1] * in_plane, spacing[2] * slices)
    return tuple(float(v) for v in varied), (*shift, float(rng.uniform(-110, 100)))


def write_phantoms(
    out_dir: str | Path,
    count: int,
    size: Iterable[int] = DEFAULT_SIZE,
    spacing: Iterable[float] = DEFAULT_SPACING,
    seed: int = 0,
    tumors: str | Iterable[int] = "all",
    progress: Callable[[], None] | None = None,
    fov: str = "torso",
    coarse: bool = False,
    prefix: str = "case",
) -> list[tuple[Path, Path]]:
    """Write `<prefix>NNNN_image.nii.gz` (int16 HU) + `<prefix>NNNN_label.nii.gz` (uint8) pairs, atomically.

    `fov` places each case's field of view (`field_of_view`); `coarse` writes the label map a coarse
    segmentation would give (lobes, bones, lesions and body: `masks.coarsen_labels`).
    """
    from .masks import coarsen_labels
    from .volumes import atomic_paths

    if _whole(count, "count", "e.g. count=20") < 1:
        raise PhantomOptionError(f"phantom count must be at least 1, got {count!r}", "e.g. count=20")
    seed = _check_seed(seed)
    size, spacing, tumors = _check_args(size, spacing, tumors)
    field_of_view(fov, np.random.default_rng(0), spacing)  # refuse a bad kind before writing anything
    if not isinstance(prefix, str) or not prefix.replace("_", "").replace("-", "").isalnum():
        raise PhantomOptionError(f"phantom prefix must be letters, digits, - or _, got {prefix!r}", "e.g. chest")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs = []
    for index in range(int(count)):
        case = case_seed(seed, index)
        case_spacing, centre = field_of_view(fov, np.random.default_rng([case, 0xF0F]), spacing)
        phantom = make_phantom(case, size, case_spacing, tumors, centre)
        labels = coarsen_labels(phantom.labels).astype(np.uint8) if coarse else phantom.labels
        image_path, label_path = out / f"{prefix}{index:04d}_image.nii.gz", out / f"{prefix}{index:04d}_label.nii.gz"
        with atomic_paths(image_path, label_path) as (image_tmp, label_tmp):
            Path(image_tmp).write_bytes(nifti_bytes(phantom.image, phantom.affine))
            Path(label_tmp).write_bytes(nifti_bytes(labels, phantom.affine))
        pairs.append((image_path, label_path))
        if progress is not None:
            progress()
    return pairs
