"""Batch synthesis: many masks × seeds (× mask edits) → image/label pairs in nnU-Net or MONAI layout.

    maisi-synth batch --masks DIR|LIST --seeds K --out DIR [--edit RULE ...] [--layout nnunet|monai]
    maisi-synth batch --reference-cts DIR --edit RULE ... --out DIR     # real CTs with edits
    torchrun --nproc_per_node G -m MaisiSynthLib batch ...      # the same work, sharded over ranks

With `--reference-cts` (a folder of *_image/*_label pairs, or a MONAI datalist: `cases.find_pairs`)
each output pair is a real CT with the edit rules applied to its label map and drawn into it
(`pipeline.edit_volume`): outside the changed voxels and their margin the image is the real one,
voxel for voxel; the manifest records each pair's edit region and crop.

Every pair goes through `pipeline.generate` (models loaded once per process). A pair is done when
its image and label files are in place *and* its line is in the manifest: files are renamed into
place first, the manifest line is appended after, so a killed run never lists a half-written pair,
and a re-run skips exactly the pairs whose manifest line and file hashes agree.

Edit rules (applied in order, random choices seeded by the pair's seed and mask):

    insert:<tumor>:<min>-<max>[:<count>]   e.g. insert:hepatic:10-30  (lesion diameter in mm)
    swap:<tumor>:<tumor>                    e.g. swap:lung:hepatic
    remove:<tumor>|all                      e.g. remove:all

Tumors by MAISI id or short name: hepatic, lung, pancreatic, colon, bone.

CPU results depend on the number of threads torch uses, so every process runs `threads` threads
(default 1 on the CPU): a sharded run then writes the same bytes as a single process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import __version__
from . import labels as L
from .errors import MaisiSynthError, OptionError
from .grid import spacing_of
from .lesions import EditRule, apply_rules, parse_rule
from .request import DEFAULTS, check_field, check_options

MANIFEST = "manifest.jsonl"
LABEL_MAP = "label_map.json"
LAYOUTS = ("nnunet", "monai")
MASK_SUFFIXES = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd")
# ---------------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class Job:
    case: str
    mask: Path
    seed: int
    image: Path | None = None  # the real CT the edit is drawn into (--reference-cts)


def find_masks(source: str | Path) -> list[Path]:
    """Masks from a folder (its *_label files if it holds image/label pairs) or a list file."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and p.name.lower().endswith(MASK_SUFFIXES))
        labels = [p for p in files if re.search(r"_label\.", p.name)]
        found = labels or files
    elif source.is_file():
        lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines()]
        found = [(source.parent / line) for line in lines if line and not line.startswith("#")]
    else:
        raise OptionError(f"masks not found: {source}", "pass a folder of masks or a text file listing them")
    if not found:
        raise OptionError(f"no masks in {source}", f"masks are {', '.join(MASK_SUFFIXES)} files")
    return found


def case_stem(mask: Path) -> str:
    name = mask.name
    for suffix in MASK_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    name = re.sub(r"_label$", "", name)
    return re.sub(r"[^A-Za-z0-9-]+", "-", name).strip("-") or "case"


def plan(masks: Sequence[Path], seeds: Sequence[int], images: Sequence[Path] | None = None) -> list[Job]:
    stems = [case_stem(m) for m in masks]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})
        raise OptionError(f"several masks give the same case name: {', '.join(dup)}", "rename them")
    images = list(images) if images is not None else [None] * len(masks)
    return [
        Job(f"{stem}_s{seed:03d}", mask, int(seed), image)
        for mask, stem, image in zip(masks, stems, images)
        for seed in seeds
    ]


def job_rng(job: Job) -> np.random.Generator:
    """The random stream of a pair's edits: its seed and mask name, whatever rank runs it."""
    digest = hashlib.sha256(f"{job.mask.name}|{job.seed}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


# ---------------------------------------------------------------------------------------------------
# Layouts and label ids


def pair_paths(out: Path, layout: str, case: str) -> tuple[Path, Path]:
    if layout == "nnunet":
        return out / "imagesTr" / f"{case}_0000.nii.gz", out / "labelsTr" / f"{case}.nii.gz"
    return out / "images" / f"{case}.nii.gz", out / "labels" / f"{case}.nii.gz"


def label_map_for(spec: str, layout: str, masks: Sequence[Path], rules: Sequence[EditRule]) -> dict[int, int]:
    """MAISI id → written id. `all` keeps MAISI ids (MONAI) or numbers the ids that can occur 1..N
    (nnU-Net wants consecutive labels); a list (`liver,hepatic tumor,23`) numbers those 1..K and
    writes everything else as background."""
    from .volumes import read_volume

    if spec != "all":
        chosen = []
        for word in (w.strip() for w in spec.split(",") if w.strip()):
            label = int(word) if word.isdigit() else L.id_for_name(word)
            if label is None or label not in L.known_ids() or label == 0:
                raise OptionError(f"'{word}' in --labels is not a MAISI structure", "see `maisi-synth labels`")
            chosen.append(label)
        return {label: i for i, label in enumerate(dict.fromkeys(chosen), start=1)}
    if layout == "monai":
        return {}
    present: set[int] = set()
    for mask in masks:
        try:
            present |= {int(v) for v in np.unique(np.asarray(read_volume(mask, "mask").array))}
        except MaisiSynthError:
            continue  # reported as failed when its turn comes
    present |= {r.tumor for r in rules if r.kind == "insert"} | {r.to for r in rules if r.kind == "swap"}
    present.discard(0)
    return {label: i for i, label in enumerate(sorted(present), start=1)}


def remap(labels: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    if not mapping:
        return labels.astype(np.int16)
    lut = np.zeros(max(int(labels.max()), max(mapping)) + 1, dtype=np.int16)
    for source, target in mapping.items():
        lut[source] = target
    return lut[labels.astype(np.int64)]


def write_index(out: Path, layout: str, entries: list[dict], mapping: dict[int, int], name: str) -> Path:
    """nnU-Net's dataset.json or MONAI's datalist.json for the finished pairs (atomic)."""
    from .volumes import atomic_path

    ok = sorted((e for e in entries if e["status"] == "ok"), key=lambda e: e["case"])
    if layout == "nnunet":
        names = {"background": 0}
        for label, value in sorted(mapping.items(), key=lambda kv: kv[1]):
            names[L.name_of(label)] = value
        index = {
            "channel_names": {"0": "CT"},
            "labels": names,
            "numTraining": len(ok),
            "file_ending": ".nii.gz",
            "name": name,
            "description": "Synthetic CTs from MaisiSynth (MAISI-v2); provenance in manifest.jsonl",
            "overwrite_image_reader_writer": "NibabelIOWithReorient",
        }
        path = out / "dataset.json"
    else:
        index = {
            "name": name,
            "description": "Synthetic CTs from MaisiSynth (MAISI-v2); provenance in manifest.jsonl",
            "labels": {str(v): L.name_of(k) for k, v in mapping.items()} or "MAISI ids (maisi-synth labels)",
            "training": [{"image": e["image"], "label": e["label"]} for e in ok],
        }
        path = out / "datalist.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------
# Manifest


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _valid_entry(entry: object) -> bool:
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("case"), str)
        or entry.get("status") not in ("ok", "failed")
    ):
        return False
    if entry["status"] == "ok":
        return all(isinstance(entry.get(k), str) for k in ("image", "label", "image_sha256", "label_sha256"))
    return True


def read_manifest(out: Path) -> dict[str, dict]:
    """The last entry per case from the manifest and any per-rank parts. A torn last line (a kill
    while appending) is ignored; any other damaged line is an error naming the line, raised before
    any work is done."""
    entries: dict[str, dict] = {}
    for path in [out / MANIFEST, *sorted(out.glob("manifest.rank*.jsonl"))]:
        if not path.exists():
            continue
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise OptionError(
                f"cannot read {path}: {exc}", "delete it to redo every pair, or use a new --out"
            ) from None
        for number, line in enumerate(lines, start=1):
            try:
                entry = json.loads(line)
            except (json.JSONDecodeError, RecursionError, ValueError):
                entry = None
            if not _valid_entry(entry):
                if number == len(lines):
                    continue  # the line a killed run was appending
                raise OptionError(
                    f"{path.name} line {number} is damaged: {line[:60]!r}",
                    f"delete that line from {path} (its pair is then made again), or use a new --out",
                )
            entries[entry["case"]] = entry
    return entries


class OutputLock:
    """An exclusive lock on a batch output folder, held while a batch writes to it. The operating
    system drops it when the process ends, also after kill -9, so a killed run can be resumed."""

    NAME = ".maisi-synth.lock"

    def __init__(self, folder: Path) -> None:
        self.path = folder / self.NAME
        self.handle = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+b")
        try:
            if os.name == "nt":
                import msvcrt

                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self.handle = handle
        return True

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing the file releases the lock on every platform
            self.handle = None


def is_done(out: Path, entry: dict | None) -> bool:
    if not entry or entry.get("status") != "ok":
        return False
    for key in ("image", "label"):
        path = out / entry[key]
        if not path.is_file() or sha256_of(path) != entry.get(f"{key}_sha256"):
            return False
    return True


def append_line(path: Path, entry: dict) -> None:
    data = (json.dumps(entry, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)  # one write per line: lines of different processes do not interleave
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------
# Running


@dataclass
class BatchSettings:
    masks: str | None
    out: str
    seeds: int = 1
    seed_start: int = 0
    edits: list[str] = field(default_factory=list)
    layout: str = "nnunet"
    labels: str = "all"
    # the request fields every pair shares (request.DEFAULTS; checked by request.check_options)
    model_dir: str | None = DEFAULTS["model_dir"]
    steps: int | None = DEFAULTS["steps"]
    solver: str = DEFAULTS["solver"]
    cfg_scale: float | None = DEFAULTS["cfg_scale"]
    mask_guidance: float | None = DEFAULTS["mask_guidance"]
    latent_prior_from: float | None = DEFAULTS["latent_prior_from"]
    device: str = DEFAULTS["device"]
    threads: int | None = None
    name: str = "MaisiSynth"
    # real CTs to edit instead of masks to draw from: image/label pairs (cases.find_pairs)
    reference_cts: str | None = None
    edit_margin_mm: float | None = DEFAULTS["edit_margin_mm"]


def _model_provenance(model_dir: Path) -> dict:
    from .models import locate_model_folder

    folder = locate_model_folder(model_dir)
    # maisi_synth.json decides the grid and the sampling defaults (guidance, latent prior): two models
    # with the same weights but other settings draw other CTs, so the manifest must tell them apart.
    return {
        "model_dir": str(folder.root.resolve()),
        "model_name": folder.name,
        "weights_sha256": {p.name: sha256_of(p) for p in folder.weight_files()},
        "config_sha256": sha256_of(folder.config_path),
        "settings_sha256": sha256_of(folder.settings_path) if folder.settings_path else None,
        "model_inference": dict(folder.inference),
    }


def run_batch(settings: BatchSettings, progress: bool = True) -> dict:
    """Run (or resume) a batch; returns counts. Under torchrun each rank runs its share."""
    import torch

    from .distributed import setup, teardown
    from .model_home import choose_model_dir
    from .models import ModelCache

    if settings.layout not in LAYOUTS:
        raise OptionError(f"unknown layout '{settings.layout}'", f"use one of {', '.join(LAYOUTS)}")
    if settings.seeds < 1 or settings.seed_start < 0:
        raise OptionError("--seeds must be at least 1 and --seed-start at least 0", "e.g. --seeds 2")
    # the request options once, before any mask is read or model loaded, not once per failing pair
    check_options(
        model_dir=settings.model_dir,
        steps=settings.steps,
        solver=settings.solver,
        cfg_scale=settings.cfg_scale,
        mask_guidance=settings.mask_guidance,
        latent_prior_from=settings.latent_prior_from,
        device=settings.device,
    )
    if (settings.masks is None) == (settings.reference_cts is None):
        raise OptionError(
            "give either --masks or --reference-cts", "--masks to draw new CTs, --reference-cts to edit real ones"
        )
    if settings.edit_margin_mm is not None:
        if settings.reference_cts is None:
            raise OptionError("--edit-margin-mm applies only with --reference-cts", "leave it out, or edit real CTs")
        check_field("edit_margin_mm", settings.edit_margin_mm)
    rules = [parse_rule(r) for r in settings.edits]
    images = None
    if settings.reference_cts is not None:
        if not rules:
            raise OptionError(
                "--reference-cts needs at least one --edit rule: without one there is nothing to draw",
                "e.g. --edit insert:hepatic:10-30 --edit insert:lung:8-15",
            )
        from .cases import find_pairs

        pairs = find_pairs(settings.reference_cts)
        masks, images = [label for _, _, label in pairs], [image for _, image, _ in pairs]
    else:
        masks = find_masks(settings.masks)
    jobs = plan(masks, range(settings.seed_start, settings.seed_start + settings.seeds), images)
    out = Path(settings.out)
    choice = choose_model_dir(settings.model_dir)
    provenance = _model_provenance(choice.path)

    ctx = setup(settings.device)
    threads = settings.threads or (1 if ctx.device.type == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)
    lock = OutputLock(out)
    try:
        # One batch at a time per output folder: rank 0 holds the lock for the whole job.
        locked = ctx.agree(lock.acquire() if ctx.is_main else None)
        if not locked:
            raise OptionError(
                f"another batch is writing to {out}", "wait for it to finish, or give this one another --out"
            )
        # every rank checks, so that a refusal ends all of them rather than leaving some at a barrier
        mapping = label_map_for(settings.labels, settings.layout, masks, rules)
        record = {"layout": settings.layout, "labels": {str(k): v for k, v in mapping.items()}}
        saved = out / LABEL_MAP
        if saved.exists():
            try:
                previous = json.loads(saved.read_text(encoding="utf-8"))
            except (OSError, ValueError, RecursionError):
                raise OptionError(
                    f"{saved} is damaged", "delete it if the folder holds no pairs yet, or use a new --out"
                ) from None
            if previous != record:
                raise OptionError(
                    f"{out} was written with another layout or label map ({saved})",
                    "use a new --out folder, or the same --layout/--labels as before",
                )
        read_manifest(out)  # a damaged manifest is refused now, not after the work
        ctx.barrier()
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(record, indent=2) + "\n")
        ctx.barrier()
        finished = read_manifest(out)
        mine = [job for i, job in enumerate(jobs) if i % ctx.world_size == ctx.rank]
        todo = [job for job in mine if not is_done(out, finished.get(job.case))]
        part = out / (f"manifest.rank{ctx.rank}.jsonl" if ctx.world_size > 1 else MANIFEST)
        cache = ModelCache()
        device = str(ctx.device)

        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(
                total=len(mine),
                initial=len(mine) - len(todo),
                desc=f"rank {ctx.rank}",
                position=ctx.rank,
                unit="pair",
                leave=True,
            )
        failed = 0
        for job in todo:
            entry = _run_job(job, out, settings, rules, mapping, provenance, cache, device)
            entry["rank"] = ctx.rank
            append_line(part, entry)
            failed += entry["status"] != "ok"
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        ctx.barrier()
        if ctx.is_main:
            merged = read_manifest(out)
            lines = [json.dumps(merged[c], sort_keys=True) for c in sorted(merged)]
            from .volumes import atomic_path

            with atomic_path(out / MANIFEST) as tmp:
                tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            for rank_part in out.glob("manifest.rank*.jsonl"):
                rank_part.unlink()
            write_index(out, settings.layout, list(merged.values()), mapping, settings.name)
            shutil.rmtree(out / ".tmp", ignore_errors=True)
        ctx.barrier()
    finally:
        lock.release()
        teardown()
    entries = read_manifest(out)
    return {
        "pairs": len(jobs),
        "done": sum(e["status"] == "ok" for e in entries.values()),
        "failed": sum(e["status"] != "ok" for e in entries.values()),
        "ran_here": len(todo),
        "failed_here": failed,
        "model": choice.describe(),
    }


def _run_job(job, out, settings, rules, mapping, provenance, cache, device) -> dict:
    from .masks import Mask, read_mask, validate_labels
    from .pipeline import edit_volume, generate_volume
    from .volumes import nifti_gz_bytes, nifti_volume

    image_path, label_path = pair_paths(out, settings.layout, job.case)
    tmp = out / ".tmp" / job.case
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    entry: dict = {
        "case": job.case,
        "source_mask": str(job.mask),
        **({"source_image": str(job.image)} if job.image is not None else {}),
        "seed": job.seed,
        "edits": [],
        "steps": settings.steps,
        "solver": settings.solver,
        "maisi_synth": __version__,
        **provenance,
    }
    started = time.perf_counter()
    try:
        entry["source_mask_sha256"] = sha256_of(job.mask) if job.mask.is_file() else None
        source = read_mask(job.mask)
        spacing = np.array(spacing_of(source.affine))
        labels, entry["edits"] = apply_rules(source.labels, spacing, rules, job_rng(job))
        labels = validate_labels(labels, job.mask.name)
        # The edited mask stays in memory; the CT gets the NIfTI header a mask file written from it has.
        mask = Mask(labels, source.affine, str(job.mask), nifti_volume(labels, source.affine), source.notes)
        reference = None
        if job.image is not None:
            from .editing import read_reference_ct

            entry["source_image_sha256"] = sha256_of(job.image)
            reference = read_reference_ct(job.image)
            mask.volume = reference.volume  # the edited CT keeps the real one's header
        options = dict(
            model_dir=provenance["model_dir"],
            steps=settings.steps,
            seed=job.seed,
            cfg_scale=settings.cfg_scale,
            mask_guidance=settings.mask_guidance,
            latent_prior_from=settings.latent_prior_from,
            solver=settings.solver,
            device=device,
        )
        if reference is None:
            result = generate_volume(mask, options, models=cache.get)
        else:
            if settings.edit_margin_mm is not None:
                options["edit_margin_mm"] = settings.edit_margin_mm
            result = edit_volume(reference, mask, options, original=source, models=cache.get)
            entry["edit"] = result.edit
        # Each output written once, to a temp name renamed into place below; hashed from its bytes.
        t = time.perf_counter()
        image_bytes = nifti_gz_bytes(result.hu, result.affine, mask.volume)
        label_bytes = nifti_gz_bytes(remap(result.labels, mapping), result.affine)
        (tmp / "image.nii.gz").write_bytes(image_bytes)
        (tmp / "label.nii.gz").write_bytes(label_bytes)
        image_path.parent.mkdir(parents=True, exist_ok=True)
        label_path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / "image.nii.gz", image_path)
        os.replace(tmp / "label.nii.gz", label_path)
        timings = {**result.timings, "write": time.perf_counter() - t}
        entry.update(
            status="ok",
            image=image_path.relative_to(out).as_posix(),
            label=label_path.relative_to(out).as_posix(),
            image_sha256=hashlib.sha256(image_bytes).hexdigest(),
            label_sha256=hashlib.sha256(label_bytes).hexdigest(),
            steps=result.steps,
            cfg_scale=result.cfg_scale,
            mask_guidance=result.mask_guidance,
            latent_prior_from=result.latent_prior_from,
            shape=list(result.shape),
            spacing=list(result.spacing),
            device=result.device,
            timings={k: round(v, 3) for k, v in timings.items()},
            notes=result.notes,
        )
    except MaisiSynthError as exc:
        entry.update(status="failed", error_kind=exc.kind, reason=exc.one_line())
    except Exception as exc:  # noqa: BLE001 - one bad pair must not stop a long batch
        entry.update(status="failed", error_kind="internal", reason=f"{type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    entry["seconds"] = round(time.perf_counter() - started, 3)
    entry["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return entry
