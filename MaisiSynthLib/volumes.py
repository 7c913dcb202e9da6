"""Reading and writing 3-D volumes (NIfTI, NRRD) with their geometry, atomically.

Geometry travels with the data: every array read here carries its voxel → RAS-millimetre affine, and
every file written here gets the affine it is given. NRRD files store LPS coordinates; conversion to
and from RAS happens only in this module.

nibabel and pynrrd are imported where they are used: 3D Slicer ships neither, and its process uses
only the atomic-file helpers here (scene.py writes volumes with Slicer's own storage nodes).
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

import numpy as np

from .errors import GeometryError, MaskError, OptionError
from .grid import spacing_of

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
        return spacing_of(self.affine)


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


# What a volume header may declare, checked before a voxel is read. 512 × 512 × 2048 voxels is far
# beyond any CT mask; a header that declares more is refused rather than allocated. Deflate (gzip)
# expands at most 1032:1, so compressed data shorter than 1/1032 of what the header declares cannot
# hold it: such a file (a "zip bomb", or a damaged one) is refused before it is decompressed.
MAX_VOXELS = 512 * 512 * 2048
MAX_EXPANSION = 1032
DETACHED_POLICIES = ("beside", "never")


def _declared_size_error(what: str, path: Path, shape, itemsize: int, compressed: bool, data: Path) -> None:
    voxels = int(np.prod([int(n) for n in shape], dtype=object))
    shown = "x".join(str(int(n)) for n in shape)
    if voxels > MAX_VOXELS:
        raise MaskError(
            f"{what} {path.name} declares {shown} voxels ({voxels / 1e6:.0f} million), more than the "
            f"{MAX_VOXELS / 1e6:.0f} million this tool reads",
            "crop or resample the volume (a CT mask is at most 512 x 512 x 2048 voxels)",
        )
    stored = data.stat().st_size
    if voxels * itemsize > stored * (MAX_EXPANSION if compressed else 1) + 4096:
        raise MaskError(
            f"{what} {path.name} declares {shown} voxels ({voxels * itemsize / 1e6:.1f} MB) but holds only "
            f"{stored} bytes of data: the header does not match the data",
            "re-save the volume from the program that made it (the file is damaged or forged)",
        )


def _check_data_file(what: str, path: Path, header: dict, detached: str) -> Path:
    """The file holding an NRRD's voxels: the file itself, or (local headers only) a regular file
    beside it named by a `data file` field. Never a path elsewhere, a list or a name pattern."""
    name = header.get("data file", header.get("datafile"))
    if name is None:
        return path
    if detached == "never":
        raise MaskError(
            f"{what} {path.name} is a detached header: its voxels are in another file ({str(name)[:60]!r})",
            "send a self-contained volume (.nii.gz, or .nrrd with its data inside)",
        )
    name = str(name).strip()
    target = path.parent / name
    if (
        name.upper().startswith("LIST")
        or "%" in name
        or Path(name).name != name
        or name in ("", ".", "..")
        or "\\" in name
        or target.is_symlink()
        or not target.is_file()
    ):
        raise MaskError(
            f"{what} {path.name} names its voxel data {name[:60]!r}, which is not a regular file in the same folder",
            "keep the .nhdr and its data file side by side (plain file name), or save a single .nrrd / .nii.gz",
        )
    return target


def check_volume_file(path: str | os.PathLike, what: str = "volume", detached: str = "beside") -> None:
    """Refuse, from the header alone, a volume that declares more voxels than this tool reads, whose
    data cannot hold what it declares, or that points at another file (`detached="never"`, for
    uploads), or at anything but a regular file beside it (`"beside"`, for local files)."""
    path = Path(path)
    fmt = format_of(path)
    try:
        if fmt == "nifti":
            import nibabel as nib

            img = nib.load(str(path))  # the header only; voxels stay on disk
            shape, itemsize = img.shape, img.get_data_dtype().itemsize
            _declared_size_error(what, path, shape, itemsize, str(path).lower().endswith(".gz"), path)
        elif fmt in ("nrrd", "seg.nrrd"):
            import nrrd

            header = nrrd.read_header(str(path))
            data = _check_data_file(what, path, header, detached)
            encoding = str(header.get("encoding", "raw")).lower()
            compressed = encoding in ("gzip", "gz", "bzip2", "bz2")
            sizes = header.get("sizes")
            if sizes is None:
                raise ValueError("no sizes field")
            _declared_size_error(what, path, list(sizes), 1, compressed, data)
    except MaskError:
        raise
    except Exception as exc:  # noqa: BLE001 - any header failure means "not a readable volume"
        kind = "NIfTI" if fmt == "nifti" else "NRRD"
        raise MaskError(
            f"cannot read {what} {path.name} as {kind}: {str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}",
            f"check that the file is a valid {kind} image (not truncated, not another format renamed)",
        ) from None


def read_volume(
    path: str | os.PathLike, what: str = "volume", detached: str = "beside", unscaled: bool = False
) -> Volume:
    """Read a NIfTI or plain NRRD volume; raise MaskError with the reason when that is impossible.

    `what` names the file in messages ("mask", "reference CT"); `detached` is the policy for NRRD
    headers that keep their voxels in another file (`check_volume_file`). `unscaled`: a NIfTI's stored
    values without its slope and intercept, which go to `header["scaling"]` (a scaled int16 CT would
    otherwise become a float64 copy eight times its size).
    """
    path = Path(path)
    fmt = format_of(path)
    if not path.exists():
        if path.is_symlink():
            try:
                path.resolve(strict=True)
            except RuntimeError:
                raise MaskError(f"{what} {path} is a symbolic link that loops", "point it at a real file") from None
            except OSError:
                pass
            raise MaskError(f"{what} {path} is a symbolic link to a missing file", "point it at a real file")
        raise MaskError(f"{what} file not found: {path}", "check the path (and the current folder)")
    if path.is_dir():
        raise MaskError(f"{what} {path} is a folder, not a file", "give the path of a .nii.gz or .nrrd file")
    if fmt not in ("nifti", "nrrd", "seg.nrrd"):
        raise MaskError(
            f"{what} {path.name} is not in a supported format", "use NIfTI (.nii, .nii.gz) or NRRD (.nrrd, .seg.nrrd)"
        )
    check_volume_file(path, what, detached)
    try:
        if fmt == "nifti":
            import nibabel as nib

            img = nib.load(str(path))
            check_affine(img.affine, what, path.name)
            header = {"nifti_header": img.header.copy()}
            if unscaled:
                array = np.asanyarray(img.dataobj.get_unscaled())
                header["scaling"] = (float(img.dataobj.slope), float(img.dataobj.inter))
            else:
                array = np.asanyarray(img.dataobj)
            return Volume(array, np.array(img.affine, dtype=float), "nifti", header)
        import nrrd

        header = nrrd.read_header(str(path))
        affine = nrrd_affine(header)
        check_affine(affine, what, path.name)
        array, header = nrrd.read(str(path))
        return Volume(array, affine, fmt, {"nrrd_header": header})
    except (MaskError, GeometryError):
        raise
    except Exception as exc:  # every reader has its own exception types; all mean "not this format"
        kind = "NIfTI" if fmt == "nifti" else "NRRD"
        raise MaskError(
            f"cannot read {what} {path.name} as {kind}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            f"check that the file is a valid {kind} image (not truncated, not another format renamed)",
        ) from None


def check_affine(affine: np.ndarray, what: str, name: str) -> None:
    """Refuse a voxel → world matrix that cannot place voxels: NaN, a zero-length or parallel axis."""
    columns = np.asarray(affine, dtype=float)[:3, :3]
    if not np.isfinite(np.asarray(affine, dtype=float)).all():
        raise GeometryError(
            f"{what} {name} has NaN or infinite numbers in its geometry", "re-save it with a valid header"
        )
    norms = np.linalg.norm(columns, axis=0)
    if (norms < 1e-6).any():
        raise GeometryError(
            f"{what} {name} has a zero voxel size along axis {int(np.argmin(norms))}",
            "re-save it with its real spacing",
        )
    if abs(np.linalg.det(columns / norms)) < 1e-3:
        raise GeometryError(f"{what} {name} has parallel voxel axes", "re-save it with a valid orientation")


def same_file_key(path: str | os.PathLike) -> str:
    """A path with `..`, symlinks and (on Windows) case folded away, to compare file names."""
    return os.path.normcase(os.path.realpath(os.fspath(path)))


def is_same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two names reach the same file (also through hard links, when both exist)."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return same_file_key(a) == same_file_key(b)


# ---------------------------------------------------------------------------------------------------
# Orientation: the networks work on RAS-ordered arrays, as the official pipeline (Orientationd "RAS").


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip axes so that the array is RAS-ordered; returns (array, affine)."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(array), affine)
    canonical = nib.as_closest_canonical(img)
    return np.asanyarray(canonical.dataobj), np.array(canonical.affine, dtype=float)


def from_canonical(
    array: np.ndarray, canonical_affine: np.ndarray, target_affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Bring a RAS-ordered array back to the axis order/directions of `target_affine`."""
    import nibabel as nib
    from nibabel import orientations

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
    check_name_length(path)
    check_writable(path)
    return fmt


MAX_NAME_BYTES = 255  # the longest file name common file systems take


def check_name_length(path: str | os.PathLike) -> None:
    name = Path(path).name
    if len(os.fsencode(name)) > MAX_NAME_BYTES:
        raise OptionError(
            f"the output name {name[:40]}... is {len(os.fsencode(name))} bytes, longer than file systems allow",
            f"use a name of at most {MAX_NAME_BYTES} bytes",
        )


def write_error(exc: OSError, folder: Path) -> OptionError:
    """A failed write as a user error: a full disk or a quota is not a bug."""
    import errno

    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return OptionError(f"no space left on the disk of {folder}", "free some space or write the output elsewhere")
    return OptionError(f"cannot write to {folder}: {exc.strerror or exc}", "choose an output folder you can write to")


def _temp_beside(path: Path) -> Path:
    # Keep the real suffix last: writers pick the format (and gzip) from the file name.
    name = path.name.lower()
    suffix = "".join(path.suffixes[-2:]) if name.endswith((".nii.gz", ".seg.nrrd")) else path.suffix
    # A short stem: the temporary name must fit the file system's limit whenever the final one does.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:48]}.", suffix=f".partial{suffix}", dir=path.parent)
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


def nifti_volume(array: np.ndarray, affine: np.ndarray, codes: bool = True) -> Volume:
    """`array` as the NIfTI Volume that writing it and reading it back would give, without the file.

    Outputs made from an in-memory mask then get the header codes a mask file written by
    `save_volume` (`codes=True`: qform and sform code 1) or by plain nibabel (`codes=False`) has.
    """
    import nibabel as nib

    image = nib.Nifti1Image(array, affine)
    if codes:
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
    image.update_header()
    return Volume(array, np.array(image.affine, dtype=float), "nifti", {"nifti_header": image.header.copy()})


def _nifti_image(array: np.ndarray, affine: np.ndarray, like: Volume | None):
    """A NIfTI image of `array`, with the header codes of `like` (if it was read from a NIfTI)."""
    import nibabel as nib

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
    return img


def nifti_gz_bytes(array: np.ndarray, affine: np.ndarray, like: Volume | None = None) -> bytes:
    """The bytes `save_volume` writes to a .nii.gz: a caller can hash what it writes without reading it back."""
    return gzip_bytes(_nifti_image(array, affine, like).to_bytes())


def save_volume(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, like: Volume | None = None) -> None:
    """Write `array` with `affine` to exactly `path` (not atomic: callers write to a temp path).

    `like` is the volume the output was made from: its NIfTI header codes are kept so that viewers
    treat both files the same way.
    """
    fmt = format_of(path)
    if fmt == "nifti":
        import nibabel as nib

        if str(path).lower().endswith(".gz"):
            Path(path).write_bytes(nifti_gz_bytes(array, affine, like))
        else:
            nib.save(_nifti_image(array, affine, like), str(path))
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
