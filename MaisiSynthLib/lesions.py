"""Tumor insertion: paint a lesion into a mask inside its host organ.

Used to make edited masks (the paper's tumor-inserted masks for downstream training) and by the
Slicer module's "insert tumor" action. A lesion is an ellipsoid around a centre, clipped to its host
shrunk by one voxel, so that host tissue encloses it as in a real organ and in the training phantoms.
The host region of a tumor type is the union of its candidate hosts (all lung lobes for a lung tumor,
all bones for a bone lesion), so a lesion may cross a lobe fissure as real ones do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from . import labels as L
from .errors import MaskError, OptionError


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
    hosts: Sequence[int] | None = None,
) -> np.ndarray:
    """`labels` with a lesion of `radius_mm` at a random host voxel at least the radius deep.

    Thin hosts take the deepest voxels they have (a smaller lesion, still enclosed by the host).
    `hosts` narrows the host labels (e.g. a bone lesion in vertebrae only); by default every host of
    the tumor type.
    """
    host = host_region(labels, tumor)
    if hosts is not None:
        host &= np.isin(labels, tuple(hosts))
    if not host.any():
        raise MaskError(f"the mask has no host organ for a {L.name_of(int(tumor))}", "pick another tumor type")
    # Depth and core on the host's bounding box only (the same numbers as on the whole volume, whose
    # other voxels are not host): a liver in a 512 x 512 x 300 scan is a fraction of it.
    nonzero = [np.flatnonzero(host.any(axis=tuple(a for a in range(3) if a != i))) for i in range(3)]
    box = tuple(slice(int(n[0]), int(n[-1]) + 1) for n in nonzero)
    # The edge of the volume counts as outside: an organ cut by the field of view is not deep there
    # (the lesion is painted only inside the host's core, which stops one voxel short of the edge).
    depth = ndimage.distance_transform_edt(np.pad(host[box], 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    core = np.zeros_like(host)
    core[box] = _core(host[box])
    if core.any():
        depth = np.where(core[box], depth, 0.0)
    deep_enough = np.argwhere(depth >= min(radius_mm, 0.8 * float(depth.max())))
    centre = deep_enough[int(rng.integers(len(deep_enough)))] + np.array([b.start for b in box])
    return _insert(np.asarray(labels), tumor, centre, radius_mm, spacing, host, core)


# ---------------------------------------------------------------------------------------------------
# Edit rules: the words batch and generate take for a mask edit
#
#     insert:<tumor>:<min>-<max>[:<count>]   e.g. insert:hepatic:10-30  (lesion diameter in mm)
#     swap:<tumor>:<tumor>                    e.g. swap:lung:hepatic
#     remove:<tumor>|all                      e.g. remove:all
#
# Tumors by MAISI id or short name: hepatic, lung, pancreatic, colon, bone.

TUMOR_SHORT = {
    "hepatic": L.HEPATIC_TUMOR,
    "liver": L.HEPATIC_TUMOR,
    "lung": L.LUNG_TUMOR,
    "pancreatic": L.PANCREATIC_TUMOR,
    "pancreas": L.PANCREATIC_TUMOR,
    "colon": L.COLON_CANCER,
    "bone": L.BONE_LESION,
}


@dataclass(frozen=True)
class EditRule:
    kind: str  # insert, swap, remove
    tumor: int | None = None  # None with remove: every tumor
    to: int | None = None  # swap target
    min_mm: float = 0.0
    max_mm: float = 0.0
    count: int = 1
    text: str = ""


def _tumor(word: str, rule: str) -> int:
    word = word.strip().lower()
    tumor = int(word) if word.isdigit() else TUMOR_SHORT.get(word, L.id_for_name(word))
    if tumor is None or not L.is_tumor(tumor):
        names = ", ".join(sorted(set(TUMOR_SHORT)))
        raise OptionError(
            f"'{word}' in edit rule '{rule}' is not a tumor type", f"use a MAISI tumor id or one of {names}"
        )
    return int(tumor)


def parse_rule(text: str) -> EditRule:
    parts = [p.strip() for p in text.split(":")]
    kind = parts[0].lower()
    usage = "use insert:<tumor>:<min>-<max>[:<count>], swap:<tumor>:<tumor> or remove:<tumor>|all"
    if kind == "insert" and len(parts) in (3, 4):
        sizes = re.fullmatch(r"(\d+(?:\.\d+)?)(?:-(\d+(?:\.\d+)?))?(?:mm)?", parts[2])
        count = parts[3] if len(parts) == 4 else "1"
        if not sizes or not count.isdigit() or int(count) < 1:
            raise OptionError(f"bad insert rule '{text}'", "e.g. insert:hepatic:10-30 (mm) or insert:lung:8-12:2")
        low = float(sizes.group(1))
        high = float(sizes.group(2) or low)
        if not 0 < low <= high:
            raise OptionError(f"bad lesion sizes in '{text}'", "give min-max diameters in mm with 0 < min <= max")
        return EditRule("insert", _tumor(parts[1], text), None, low, high, int(count), text)
    if kind == "swap" and len(parts) == 3:
        return EditRule("swap", _tumor(parts[1], text), _tumor(parts[2], text), text=text)
    if kind == "remove" and len(parts) == 2:
        return EditRule("remove", None if parts[1].lower() == "all" else _tumor(parts[1], text), text=text)
    raise OptionError(f"bad edit rule '{text}'", usage)


def apply_rules(
    labels: np.ndarray, spacing: Sequence[float], rules: Sequence[EditRule], rng: np.random.Generator
) -> tuple[np.ndarray, list[dict]]:
    """The edited label map and a record of what each rule did (for the manifest)."""
    from .masks import remove_tumors

    done = []
    for rule in rules:
        if rule.kind == "insert":
            for _ in range(rule.count):
                diameter = float(rng.uniform(rule.min_mm, rule.max_mm))
                before = labels == rule.tumor
                labels = random_tumor(labels, rule.tumor, diameter / 2.0, spacing, rng)
                added = (labels == rule.tumor) & ~before
                centre = np.argwhere(added).mean(axis=0) if added.any() else None
                done.append(
                    {
                        "rule": rule.text,
                        "inserted": L.name_of(rule.tumor),
                        "diameter_mm": round(diameter, 2),
                        "voxels": int(added.sum()),
                        "centre_voxel": None if centre is None else [round(float(c), 1) for c in centre],
                    }
                )
        elif rule.kind == "swap":
            where = labels == rule.tumor
            labels = labels.copy()
            labels[where] = rule.to
            done.append({"rule": rule.text, "swapped_voxels": int(where.sum())})
        else:
            tumors = (rule.tumor,) if rule.tumor is not None else None
            present = np.isin(labels, tumors or L.TUMORS)
            labels = remove_tumors(labels, tumors)
            done.append({"rule": rule.text, "removed_voxels": int(present.sum())})
    return labels, done
