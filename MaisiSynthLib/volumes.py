"""Reading and writing 3-D volumes (NIfTI, NRRD) with their geometry, atomically.

Geometry travels with the data: every array read here carries its voxel → RAS-millimetre affine, and
every file written here gets the affine it is given. NRRD files store LPS coordinates; conversion to
and from RAS happens only in this module.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
from nibabel import orientations

from .errors import MaskError, OptionError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
NRRD_SUFFIXES = (".seg.nrrd", ".nrrd", ".nhdr")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SPACES = {
    "left-posterior-superior": _LPS_TO_RAS,
    "lps": _LPS_TO_RAS,
    "right-anterior-superior": np.eye(4),
    "ras": np.eye(4),
}


@dataclass
class Volume:
    """A 3-D array and its voxel → RAS affine; `header` keeps format details worth preserving."""

    array: np.ndarray
    affine: np.ndarray
    format: str = "nifti"
    header: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape[:3])

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(np.linalg.norm(self.affine[:3, i])) for i in range(3))


def format_of(path: str | os.PathLike) -> str:
    """'nifti', 'seg.nrrd' or 'nrrd' from the file name, or '' when unsupported."""
    name = str(path).lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(".seg.nrrd"):
        return "seg.nrrd"
    if name.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    return ""


def nrrd_affine(header: dict) -> np.ndarray:
    """Voxel → RAS affine from an NRRD header (space directions + origin, in LPS or RAS)."""
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space not in _SPACES:
        raise ValueError(f"NRRD space '{space}' is not supported (expected LPS or RAS)")
    ijk_to_space = np.eye(4)
    directions = header.get("space directions")
    if directions is not None:
        directions = np.asarray(directions, dtype=float)
        directions = directions[~np.isnan(directions).any(axis=1)]
        ijk_to_space[:3, :3] = directions[-3:].T
    elif header.get("spacings") is not None:
        ijk_to_space[:3, :3] = np.diag(np.asarray(header["spacings"], dtype=float)[-3:])
    if header.get("space origin") is not None:
        ijk_to_space[:3, 3] = np.asarray(header["space origin"], dtype=float)
    return _SPACES[space] @ ijk_to_space


def read_volume(path: str | os.PathLike, what: str = "volume") -> Volume:
    """Read a NIfTI or plain NRRD volume; raise MaskError with the reason when that is impossible.

    `what` names the file in messages ("mask", "reference CT").
    """
    path = Path(path)
    fmt = format_of(path)
    if not path.exists():
        raise MaskError(f"{what} file not found: {path}", "check the path (and the current folder)")
    if path.is_dir():
        raise MaskError(f"{what} {path} is a folder, not a file", "give the path of a .nii.gz or .nrrd file")
    if fmt not in ("nifti", "nrrd", "seg.nrrd"):
        raise MaskError(
            f"{what} {path.name} is not in a supported format", "use NIfTI (.nii, .nii.gz) or NRRD (.nrrd, .seg.nrrd)"
        )
    try:
        if fmt == "nifti":
            img = nib.load(str(path))
            array = np.asanyarray(img.dataobj)
            header = {"nifti_header": img.header.copy()}
            return Volume(array, np.array(img.affine, dtype=float), "nifti", header)
        import nrrd

        array, header = nrrd.read(str(path))
        return Volume(array, nrrd_affine(header), fmt, {"nrrd_header": header})
    except MaskError:
        raise
    except Exception as exc:  # every reader has its own exception types; all mean "not this format"
        kind = "NIfTI" if fmt == "nifti" else "NRRD"
        raise MaskError(
            f"cannot read {what} {path.name} as {kind}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            f"check that the file is a valid {kind} image (not truncated, not another format renamed)",
        ) from None


# ---------------------------------------------------------------------------------------------------
# Orientation: the networks work on RAS-ordered arrays, as the official pipeline (Orientationd "RAS").


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip axes so that the array is RAS-ordered; returns (array, affine)."""
    img = nib.Nifti1Image(np.asarray(array), affine)
    canonical = nib.as_closest_canonical(img)
    return np.asanyarray(canonical.dataobj), np.array(canonical.affine, dtype=float)


def from_canonical(
    array: np.ndarray, canonical_affine: np.ndarray, target_affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Bring a RAS-ordered array back to the axis order/directions of `target_affine`."""
    back = orientations.ornt_transform(
        orientations.io_orientation(canonical_affine), orientations.io_orientation(target_affine)
    )
    img = nib.Nifti1Image(np.asarray(array), canonical_affine).as_reoriented(back)
    return np.asanyarray(img.dataobj), np.array(img.affine, dtype=float)


# ---------------------------------------------------------------------------------------------------
# Writing


def check_writable(path: str | os.PathLike) -> None:
    """Refuse an output path whose folder cannot be created or written, before any work is done."""
    parent = Path(path).absolute().parent
    existing = next((p for p in [parent, *parent.parents] if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
        raise OptionError(f"cannot write to {parent}", "choose an output folder you can write to")
    if Path(path).is_dir():
        raise OptionError(f"output {path} is a folder", "give a file name such as ct.nii.gz")


def check_output_path(path: str | os.PathLike, kinds: tuple[str, ...] = ("nifti", "nrrd")) -> str:
    """Validate a volume output path before any work is done; returns its format."""
    fmt = format_of(path)
    if fmt not in kinds:
        wanted = " or ".join({"nifti": "*.nii.gz, *.nii", "nrrd": "*.nrrd", "seg.nrrd": "*.seg.nrrd"}[k] for k in kinds)
        raise OptionError(f"cannot write {Path(path).name}: unsupported output format", f"name the output {wanted}")
    check_writable(path)
    return fmt


def _temp_beside(path: Path) -> Path:
    # Keep the real suffix last: writers pick the format (and gzip) from the file name.
    name = path.name.lower()
    suffix = "".join(path.suffixes[-2:]) if name.endswith((".nii.gz", ".seg.nrrd")) else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{suffix}", dir=path.parent)
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """Yield temporary paths beside `paths`; rename them onto `paths` only if the block succeeds.

    Several outputs of one request (CT, preview, label) are committed together: either all appear or
    none does.
    """
    targets = [Path(p) for p in paths]
    temps: list[Path] = []
    try:
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            temps.append(_temp_beside(target))
        yield temps
        umask = os.umask(0)
        os.umask(umask)
        for tmp, target in zip(temps, targets):
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; outputs are ordinary files
            os.replace(tmp, target)
    finally:
        for tmp in temps:
            if tmp.exists():
                tmp.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """One-file form of `atomic_paths`."""
    with atomic_paths(path) as (tmp,):
        yield tmp


def write_volume(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, like: Volume | None = None) -> Path:
    """Write `array` with `affine` (voxel → RAS) as NIfTI or NRRD, chosen by the file name; atomic."""
    with atomic_path(path) as tmp:
        save_volume(tmp, array, affine, like)
    return Path(path)


def gzip_bytes(raw: bytes, level: int = 1) -> bytes:
    """gzip with a zero timestamp and no file name: the same volume always gives the same bytes
    (resumed and sharded batch runs compare files by hash). Level 1, as nibabel: CTs are large."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, filename="", compresslevel=level) as gz:
        gz.write(raw)
    return out.getvalue()


def save_volume(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, like: Volume | None = None) -> None:
    """Write `array` with `affine` to exactly `path` (not atomic: callers write to a temp path).

    `like` is the volume the output was made from: its NIfTI header codes are kept so that viewers
    treat both files the same way.
    """
    fmt = format_of(path)
    if fmt == "nifti":
        header = None
        if like is not None and "nifti_header" in like.header:
            header = like.header["nifti_header"].copy()
            header.set_data_dtype(array.dtype)
        img = nib.Nifti1Image(array, affine, header=header)
        if header is None:
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
        else:
            img.header.set_slope_inter(1.0, 0.0)
            img.set_qform(affine, code=int(header["qform_code"]) or 1)
            img.set_sform(affine, code=int(header["sform_code"]) or 1)
        if str(path).lower().endswith(".gz"):
            Path(path).write_bytes(gzip_bytes(img.to_bytes()))
        else:
            nib.save(img, str(path))
    elif fmt in ("nrrd", "seg.nrrd"):
        import nrrd

        lps = _LPS_TO_RAS @ affine  # the LPS ↔ RAS flip is its own inverse
        header = {
            "space": "left-posterior-superior",
            "space directions": lps[:3, :3].T,
            "space origin": lps[:3, 3],
            "kinds": ["domain", "domain", "domain"],
            "encoding": "gzip",
        }
        nrrd.write(str(path), np.asarray(array), header, compression_level=1)
    else:
        raise OptionError(f"cannot write {Path(path).name}: unsupported format", "use .nii.gz, .nii or .nrrd")
