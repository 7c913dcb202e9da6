"""`generate(request) -> result`: the one path from a mask to a synthetic CT.

Two layers. `generate_volume(mask, options)` is the in-memory core: a validated mask (labels +
affine) in, the CT (int16 HU + affine, and the labels on the same grid) out; batch and evaluation
call it with masks they already hold. `edit_volume(reference, mask, options, original | region)`
is its twin for an edit of the user's own CT: the same conditioning, sampling and decoding on a crop
around the edit, the reference latent held outside it, the drawn HU blended into the scan
(`editing.py` holds the geometry and the arithmetic of an edit). `generate(request)` is the file
wrapper the CLI and the worker use: it checks the output paths, reads the input files, applies the
request's edit rules, runs one of the two cores and writes every output once.

The order is fixed so that bad input costs nothing: options, output paths, model folder and mask are
all checked before any network is loaded, and outputs are written only at the very end, all or none.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import labels as L
from .decoding import HU_MAX, HU_MIN, decode_latent, resample_intensities, to_hu
from .editing import (
    AIR_BELOW_HU,
    EDIT_OPTIONS,
    CanonicalView,
    EditSettings,
    ReferenceCT,
    blend_weight,
    check_region_size,
    composite,
    crop_body,
    describe_crop,
    edit_region,
    match_levels,
    match_noise,
    on_reference_grid,
    plan_crop,
    read_reference_ct,
)
from .errors import CancelledError, GeometryError, MaskError, ModelError, OptionError
from .grid import plan_output_grid, spacing_of
from .lesions import apply_rules, parse_rule
from .masks import Mask, binary_code, ensure_body, lost_labels, read_mask, remove_tumors, resample_labels
from .model_home import PRIOR_FILE, choose_model_dir
from .models import (
    MaisiModels,
    ModelFolder,
    compression_of,
    load_models,
    locate_model_folder,
    resolve_device,
    resolve_precision,
)
from .preview import render_preview
from .request import (
    DEFAULTS,
    FIELDS,
    INPUT_FIELDS,
    OUTPUT_FIELDS,
    STAGES,
    RequestError,
    _is_number,
    check_field,
    check_options,
    check_params,
)
from .sampling import Conditioning, LatentHold, sample_latent, spacing_condition
from .volumes import (
    atomic_paths,
    check_name_length,
    check_output_path,
    check_writable,
    format_of,
    from_canonical,
    is_same_file,
    read_volume,
    same_file_key,
    save_volume,
    to_canonical,
    write_error,
)

Progress = Callable[[dict], None]
__all__ = [
    "STAGES",
    "GenerateRequest",
    "GenerateResult",
    "SyntheticCT",
    "generate",
    "generate_volume",
    "edit_volume",
    "default_model_dir",
]
EDIT_ONLY = ("edit_margin_mm", "edits")
# The options of the in-memory core: every request field but the files it reads and writes and the
# mask edits (an in-memory caller edits its masks itself: `lesions.apply_rules`).
CORE_FIELDS = tuple(
    name for name in FIELDS if name not in INPUT_FIELDS and name not in OUTPUT_FIELDS and name not in EDIT_ONLY
)


@dataclass
class GenerateRequest:
    """What to generate. Sizes and spacings are in RAS order (x: left→right, y: posterior→anterior,
    z: inferior→superior), as the official pipeline orders them; `None` means the model's default."""

    # The fields, their defaults and their checks are `request.FIELDS`, `DEFAULTS` and `check_params`.
    mask: str | Path
    output: str | Path
    model_dir: str | Path | None = DEFAULTS["model_dir"]
    steps: int | None = DEFAULTS["steps"]
    seed: int = DEFAULTS["seed"]
    cfg_scale: float | None = DEFAULTS["cfg_scale"]
    # > 1 amplifies what the mask adds to the UNet's velocity (`sampling.velocity_model`); None: the model's
    mask_guidance: float | None = DEFAULTS["mask_guidance"]
    # < 1: move each region's latent level to the model's latent prior at t = this · T
    # (`latent_prior`); 1: off; None: the model's
    latent_prior_from: float | None = DEFAULTS["latent_prior_from"]
    solver: str = DEFAULTS["solver"]
    output_size: tuple[int, int, int] | str | None = DEFAULTS["output_size"]
    spacing: tuple[float, float, float] | None = DEFAULTS["spacing"]
    device: str = DEFAULTS["device"]
    precision: str = DEFAULTS["precision"]
    preview: str | Path | None = DEFAULTS["preview"]
    label_output: str | Path | None = DEFAULTS["label_output"]
    decode_window: tuple[int, int, int] | None = DEFAULTS["decode_window"]
    decode_overlap: float | None = DEFAULTS["decode_overlap"]
    # False: sample with the diffusion UNet alone (no ControlNet residuals); the mask then only gives
    # the grid, spacing and body crop. For engine checks and UNet-only models.
    controlnet: bool = DEFAULTS["controlnet"]
    # the CT modality class ("ct", "ct_wo_contrast", "ct_contrast"); None: the model's default
    modality: str | None = DEFAULTS["modality"]
    # An edit of the user's own CT: the scan, kept outside the edit region (`edit_volume`); the region
    # is what changed against `original_mask`, or `edit_region`, or the mask's tumors, widened by
    # `edit_margin_mm`. `edits`: rules applied to the mask first (`lesions.parse_rule`).
    reference_ct: str | Path | None = DEFAULTS["reference_ct"]
    original_mask: str | Path | None = DEFAULTS["original_mask"]
    edit_region: str | Path | None = DEFAULTS["edit_region"]
    edit_margin_mm: float | None = DEFAULTS["edit_margin_mm"]
    edits: tuple[str, ...] | list[str] | None = DEFAULTS["edits"]

    @classmethod
    def from_dict(cls, data: dict) -> "GenerateRequest":
        """A request from JSON-like data, every field type- and range-checked (`request.check_params`)."""
        return cls(**check_params(data))

    def params(self) -> dict:
        """The fields as `check_params` takes them (paths as strings)."""
        data = asdict(self)
        for key in ("model_dir", *INPUT_FIELDS, *OUTPUT_FIELDS):
            if data[key] is not None:
                data[key] = str(data[key])
        return data


@dataclass
class GenerateResult:
    output: Path
    preview: Path | None
    label_output: Path | None
    seed: int
    steps: int
    solver: str
    cfg_scale: float
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    model_dir: str
    device: str
    timings: dict = field(default_factory=dict)
    peak_memory: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    latent: torch.Tensor | None = None
    model: str = ""  # which model made it, in words (model_home.ModelChoice.describe)
    mask_guidance: float = 1.0
    latent_prior_from: float = 1.0
    edit: dict | None = None  # an edit of a reference CT: region, crop, time (SyntheticCT.edit)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("latent")
        for key in OUTPUT_FIELDS:
            data[key] = str(data[key]) if data[key] is not None else None
        return data


def default_model_dir() -> Path:
    """The model folder of a request that names none: $MAISI_SYNTH_MODEL_DIR, else the downloaded
    official weights once complete, else the embedded demo model (`model_home.choose_model_dir`)."""
    return choose_model_dir().path


def _model_settings(options: dict, folder: ModelFolder) -> dict:
    """The sampling settings: the (already checked) options, the model folder's defaults for the rest."""
    defaults = folder.inference
    steps = options["steps"] if options["steps"] is not None else int(defaults["num_inference_steps"])
    cfg = options["cfg_scale"] if options["cfg_scale"] is not None else float(defaults["cfg_guidance_scale"])
    guidance = options["mask_guidance"]
    if guidance is None:
        guidance = defaults["mask_guidance_scale"]
    guidance_from = defaults["mask_guidance_from"]
    bone_from = defaults["latent_prior_bone_from"]
    prior_from = options["latent_prior_from"]
    if prior_from is None:
        prior_from = defaults["latent_prior_from"]
    window = options["decode_window"] or [int(w) for w in defaults["autoencoder_sliding_window_infer_size"]]
    overlap = (
        options["decode_overlap"]
        if options["decode_overlap"] is not None
        else float(defaults["autoencoder_sliding_window_infer_overlap"])
    )
    # The request's own values passed check_params; what is checked here is what the model filled in.
    try:
        steps, cfg = check_field("steps", steps), check_field("cfg_scale", cfg)
        window, overlap = check_field("decode_window", list(window)), check_field("decode_overlap", overlap)
        guidance = check_field("mask_guidance", guidance)
        prior_from = check_field("latent_prior_from", prior_from)
        if not _is_number(guidance_from) or not 0 <= guidance_from <= 1:
            raise RequestError(f"mask_guidance_from must be a number from 0 to 1, got {guidance_from!r}", "e.g. 0.5")
        if not _is_number(bone_from) or not 0 <= bone_from < 1:
            raise RequestError(
                f"latent_prior_bone_from must be a number from 0 (off) to below 1, got {bone_from!r}", "e.g. 0.3"
            )
    except RequestError as exc:
        raise ModelError(
            f"the model's inference defaults are invalid: {exc.message}",
            f"fix {folder.root / 'maisi_synth.json'}, or pass the option explicitly",
        ) from None
    if prior_from < 1 and folder.prior_path is None:
        raise ModelError(
            f"latent_prior_from {prior_from:g} needs the model's latent prior, and {folder.root} has no {PRIOR_FILE}",
            f"fit one with `maisi-synth fit-prior --model-dir {folder.root} --cases DIR`, or pass "
            "--latent-prior-from 1 (off)",
        )
    return {
        "steps": steps,
        "cfg": cfg,
        "mask_guidance": guidance,
        "mask_guidance_from": float(guidance_from),
        "latent_prior_from": prior_from,
        "latent_prior_bone_from": float(bone_from),
        "window": window,
        "overlap": overlap,
    }


def _check_outputs(request: GenerateRequest) -> None:
    """The output paths: distinct, none an input, writable, of a format we write."""
    outputs = [Path(request.output)] + [Path(p) for p in (request.preview, request.label_output) if p]
    for path in outputs:
        check_name_length(path)
    if len({same_file_key(p) for p in outputs}) != len(outputs):
        raise OptionError("the output, preview and label paths must differ", "give each output its own file name")
    for name in INPUT_FIELDS:
        source = getattr(request, name)
        if source is not None and any(is_same_file(source, p) for p in outputs):
            what = "input mask" if name == "mask" else name.replace("_", " ")
            raise OptionError(f"an output path is the {what} itself", "write the outputs to new files")
    check_output_path(request.output)
    if request.label_output:
        check_output_path(request.label_output)
    if request.preview:
        if not str(request.preview).lower().endswith(".png"):
            raise OptionError(f"preview {request.preview} must be a .png file", "name the preview e.g. preview.png")
        check_writable(request.preview)


def peak_rss_mb() -> float | None:
    """The process's peak resident memory in MB (POSIX `resource`, Windows process counters)."""
    try:
        import resource  # POSIX only

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    except ImportError:
        pass
    try:
        import ctypes
        from ctypes import wintypes

        class Counters(ctypes.Structure):
            _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD)] + [
                (name, ctypes.c_size_t)
                for name in (
                    "PeakWorkingSetSize",
                    "WorkingSetSize",
                    "QuotaPeakPagedPoolUsage",
                    "QuotaPagedPoolUsage",
                    "QuotaPeakNonPagedPoolUsage",
                    "QuotaNonPagedPoolUsage",
                    "PagefileUsage",
                    "PeakPagefileUsage",
                )
            ]

        counters = Counters()
        counters.cb = ctypes.sizeof(Counters)
        process = ctypes.windll.kernel32.GetCurrentProcess()
        if ctypes.windll.psapi.GetProcessMemoryInfo(process, ctypes.byref(counters), counters.cb):
            return round(counters.PeakWorkingSetSize / 2**20, 1)
    except (AttributeError, OSError, ValueError):
        pass
    return None


def _cancel_check(cancel) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    return cancel


class _Stages:
    """Stage timing and progress in one place: `with stages("decode"):` reports the stage and adds
    its duration to `timings` (only when it succeeds: a failed stage has no time)."""

    def __init__(self, progress: Progress | None, started: float | None = None) -> None:
        self.progress = progress
        self.started = time.perf_counter() if started is None else started
        self.timings: dict[str, float] = {}

    def report(self, stage: str, **extra) -> None:
        if self.progress is not None:
            self.progress({"stage": stage, "elapsed": round(time.perf_counter() - self.started, 3), **extra})

    @contextmanager
    def __call__(self, stage: str, report: bool = True):
        t = time.perf_counter()
        if report:
            self.report(stage)
        yield
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t


# (model folder, device, precision) → models: lets a long-lived caller (the worker) reuse loaded
# networks while `generate` still checks every cheap input before anything is loaded.
ModelProvider = Callable[[ModelFolder, torch.device, str], MaisiModels]


@dataclass
class _Engine:
    """The model a request runs on, resolved before anything loads."""

    folder: ModelFolder
    choice: object  # model_home.ModelChoice
    device: torch.device
    models: MaisiModels | None
    provider: ModelProvider | None


def _resolve_engine(options: dict, models: MaisiModels | ModelProvider | None) -> _Engine:
    """The model folder, device and (if given) loaded models of a request; loads nothing."""
    provider = models if models is not None and not isinstance(models, MaisiModels) else None
    if provider is not None:
        models = None
    if models is None:
        choice = choose_model_dir(options["model_dir"])
        folder = locate_model_folder(choice.path, require_controlnet=options["controlnet"])
        device = resolve_device(options["device"])
        resolve_precision(options["precision"], device)
    else:
        folder = models.folder
        choice = choose_model_dir(folder.root)
        device = models.device
        if options["controlnet"] and models.controlnet is None:
            raise ModelError(
                f"the model in {folder.root} has no ControlNet", "use a model folder with controlnet_3d_rflow-ct.pt"
            )
    return _Engine(folder, choice, device, models, provider)


@dataclass
class SyntheticCT:
    """What the in-memory core makes: the CT and the mask on the same grid, with their geometry.

    `hu` and `labels` are in the mask's own axis order, on the mask's grid (or on the requested output
    grid); `affine` is the mask's own affine, bit for bit, when the grid is the mask's.
    """

    hu: np.ndarray  # int16 HU in [-1000, 1000], -1000 outside the body
    labels: np.ndarray  # int16 MAISI ids (body added where the mask had none)
    affine: np.ndarray  # voxel → RAS mm of both
    seed: int
    steps: int
    solver: str
    cfg_scale: float
    model_dir: str
    device: str
    model: str  # which model made it, in words (model_home.ModelChoice.describe)
    mask_guidance: float = 1.0
    latent_prior_from: float = 1.0  # 1: the latent prior was not used
    timings: dict = field(default_factory=dict)
    peak_memory: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    latent: torch.Tensor | None = None
    # RAS-ordered HU, labels and spacing (and the point to slice through), as the preview renders them
    canonical: tuple | None = field(default=None, repr=False)
    # an edit of a reference CT: what was redrawn (region voxels, crop, time); None for a new CT
    edit: dict | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.hu.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(round(s, 6) for s in spacing_of(self.affine))

    def preview(self):
        """The preview PNG's image (three slices with the mask's contours)."""
        return render_preview(*self.canonical)


def generate_volume(
    mask: Mask,
    options: dict | None = None,
    models: MaisiModels | ModelProvider | None = None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | threading.Event | None = None,
    keep_latent: bool = False,
) -> SyntheticCT:
    """Mask in memory → CT in memory: the core `generate` wraps, for callers that hold the mask.

    `mask`: a validated label map and its affine (`masks.read_mask`, or `masks.Mask(validate_labels(
    array), affine)`). `options`: any request fields but the files (`CORE_FIELDS`), checked as every
    request is; the rest take their defaults. `models`, `progress` and `cancel` as in `generate`.
    """
    unknown = sorted(set(options or {}) - set(CORE_FIELDS))
    if unknown:
        raise RequestError(f"not options of an in-memory generation: {', '.join(unknown)}", "pass only CORE_FIELDS")
    opts = {**DEFAULTS, **check_options(**(options or {}))}
    engine = _resolve_engine(opts, models)
    settings = _model_settings(opts, engine.folder)
    return _synthesize(mask, opts, engine, settings, _Stages(progress), _cancel_check(cancel), keep_latent)


def _level_prior(
    models: MaisiModels, labels: torch.Tensor
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """x̂0 → the latent prior's level shift for this mask, on every label and on bone labels only
    (tumors are never moved; the label fractions are computed once).

    The bone-only shift also leaves every latent voxel that holds a tumor voxel where it is: a bone
    lesion is mostly bone in its latent voxels, and brightening those with the vertebra drew bone
    lesions 3.2x the real contrast on the held-out phantoms (2.6x when left, 2.4x with no bone shift)."""
    from .latent_prior import label_fractions, level_shift

    if models.latent_prior is None:
        raise ModelError(
            f"latent_prior_from < 1 needs the model's latent prior; these models were loaded without {PRIOR_FILE}",
            "reload the model folder, or pass --latent-prior-from 1 (off)",
        )
    ids, fractions = label_fractions(labels, models.compression)
    not_bone = set(ids.tolist()) - set(L.BONE_REGION)
    tumor_free = (fractions[torch.isin(ids, torch.tensor(L.TUMORS))].sum(0) == 0).to(fractions.dtype)
    prior = models.latent_prior

    def bone_shift(x0: torch.Tensor) -> torch.Tensor:
        shift = level_shift(prior, ids, fractions, x0[0], (*L.TUMORS, *not_bone))
        return (shift * tumor_free.to(device=shift.device, dtype=shift.dtype))[None]

    return lambda x0: level_shift(prior, ids, fractions, x0[0], L.TUMORS)[None], bone_shift


def _load(engine: _Engine, opts: dict, stages: _Stages) -> MaisiModels:
    """The request's models: loaded now, from the caller's provider, or the caller's own."""
    with stages("load"):
        if engine.provider is not None:
            models = engine.provider(engine.folder, engine.device, opts["precision"])
        elif engine.models is None:
            models = load_models(engine.folder, engine.device, opts["precision"])
        else:
            models = engine.models
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    return models


def _peak_memory(device: torch.device) -> dict:
    peak = {"process_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        peak["cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


def _run_fields(
    opts: dict,
    settings: dict,
    engine: _Engine,
    mask_guidance: float,
    latent_prior_from: float,
    stages: _Stages,
    notes: list[str],
    latent: torch.Tensor,
    keep_latent: bool,
) -> dict:
    """What a SyntheticCT says of the run that made it, a new CT's or an edit's."""
    return dict(
        seed=opts["seed"],
        steps=settings["steps"],
        solver=opts["solver"],
        cfg_scale=settings["cfg"],
        model_dir=str(engine.folder.root),
        device=str(engine.device),
        model=engine.choice.describe(),
        mask_guidance=mask_guidance,
        latent_prior_from=latent_prior_from,
        timings=stages.timings,
        peak_memory=_peak_memory(engine.device),
        notes=notes,
        latent=latent.cpu() if keep_latent else None,
    )


def _conditioning(
    models: MaisiModels,
    labels: np.ndarray,
    spacing: tuple[float, float, float],
    opts: dict,
    settings: dict,
    folder: ModelFolder,
    device: torch.device,
) -> Conditioning:
    """What the velocity model needs for a RAS-ordered label map on the generation grid: the mask
    code (and its tumor-free twin for CFG), spacing, modality, mask guidance and the latent prior."""
    labels_t = torch.from_numpy(labels.astype(np.int64))[None, None]
    control = binary_code(labels_t).to(device) if opts["controlnet"] else None
    uncond = None
    if settings["cfg"] > 0 and control is not None:
        uncond = binary_code(torch.from_numpy(remove_tumors(labels).astype(np.int64))[None, None]).to(device)
    modality_id = L.modality_id(opts["modality"]) if opts["modality"] else int(folder.inference.get("modality", 1))
    modality = torch.tensor([modality_id], dtype=torch.long, device=device)
    cond = Conditioning(
        control,
        spacing_condition(spacing),
        modality,
        settings["cfg"],
        uncond,
        mask_guidance=settings["mask_guidance"] if control is not None else 1.0,
        mask_guidance_from=settings["mask_guidance_from"],
    )
    if settings["latent_prior_from"] < 1 and control is not None:
        cond.level_prior, bone_prior = _level_prior(models, labels_t[0, 0])
        cond.prior_from = settings["latent_prior_from"]
        if settings["latent_prior_bone_from"] > 0:
            cond.bone_prior, cond.bone_prior_from = bone_prior, settings["latent_prior_bone_from"]
    return cond


def _sample(
    models: MaisiModels,
    cond: Conditioning,
    latent_shape: tuple[int, ...],
    opts: dict,
    settings: dict,
    stages: _Stages,
    check_cancel: Callable[[], None],
    hold: LatentHold | None = None,
) -> torch.Tensor:
    """The sampling stage: progress per step, cancel between steps."""

    def on_step(info: dict) -> None:
        stages.report("sample", i=info["i"] + 1, total=info["total"])
        check_cancel()

    with stages("sample", report=False):
        check_cancel()
        stages.report("sample", i=0, total=settings["steps"])
        return sample_latent(
            models, cond, latent_shape, opts["seed"], settings["steps"], opts["solver"], on_step, hold=hold
        )


def _synthesize(
    mask: Mask,
    opts: dict,
    engine: _Engine,
    settings: dict,
    stages: _Stages,
    cancelled: Callable[[], bool],
    keep_latent: bool,
) -> SyntheticCT:
    notes: list[str] = list(mask.notes)
    folder, device = engine.folder, engine.device

    def check_cancel() -> None:
        if cancelled():
            raise CancelledError()

    # 1. The output grid (cheap, before any model loads; a grid the model cannot take is refused here).
    with stages("read-mask", report=False):
        rules = folder.grid_rules()
        labels_c, affine_c = to_canonical(mask.labels, mask.affine)
        plan = plan_output_grid(labels_c.shape, affine_c, rules, opts["output_size"], opts["spacing"])
        shape, affine = plan.shape, plan.affine
        spacing = spacing_of(affine)
        if plan.back == "crop":
            labels = np.zeros(shape, dtype=labels_c.dtype)  # background around the mask
            labels[plan.crop] = labels_c
            notes.append(
                f"the mask's grid {'x'.join(map(str, labels_c.shape))} was padded with background to "
                f"{'x'.join(map(str, shape))} (sizes this model takes) and the CT cropped back to the mask's grid"
            )
        else:
            labels = resample_labels(labels_c, affine_c, shape, affine)
        if plan.back == "resample":
            notes.append(
                f"the mask's spacing {' x '.join(f'{v:.3g}' for v in spacing_of(affine_c))} mm is outside this "
                f"model's range: the CT was generated on {'x'.join(map(str, shape))} voxels of "
                f"{' x '.join(f'{v:.3g}' for v in spacing)} mm and resampled onto the mask's grid"
            )
        gone = lost_labels(labels_c, labels)
        if gone:
            notes.append(
                "resampling to the output grid removed label(s) "
                + ", ".join(f"{g} ({L.name_of(g)})" for g in gone)
                + ": they are smaller than one output voxel"
            )
        labels, added = ensure_body(labels, spacing)
        if added:
            notes.append("the mask had no body label (200); it was added around the organs (see masks.ensure_body)")
    check_cancel()

    # 2. Models (reused when the caller passes them, as the worker does).
    models = _load(engine, opts, stages)

    # 3. Conditioning, 4. sampling.
    with stages("encode-mask"):
        cond = _conditioning(models, labels, spacing, opts, settings, folder, device)
    latent = _sample(models, cond, models.latent_shape(shape), opts, settings, stages, check_cancel)
    guidance_used = float(cond.mask_guidance)
    prior_used = float(cond.prior_from) if cond.level_prior is not None else 1.0
    del cond

    # 5. Decoding, then back onto the mask's grid.
    with stages("decode"):
        image = decode_latent(
            models,
            latent,
            settings["window"],
            settings["overlap"],
            lambda n: stages.report("decode", window=n),
            cancelled,
        )
        hu = to_hu(image, labels)
        del image
        if plan.back != "none":
            labels_mask, _ = ensure_body(labels_c, spacing_of(affine_c))
            if plan.back == "crop":
                hu = hu[plan.crop]
            else:
                hu = resample_intensities(hu, affine, labels_c.shape, affine_c)
            hu = np.where(labels_mask > 0, hu, HU_MIN).astype(hu.dtype)
            labels, affine, spacing = labels_mask, affine_c, spacing_of(affine_c)
    check_cancel()

    # 6. The mask's own axis order and, on its grid, its own affine.
    hu_out, affine_out = from_canonical(hu, affine, mask.affine)
    if hu_out.shape == mask.shape and np.allclose(affine_out, mask.affine, atol=1e-4):
        affine_out = mask.affine  # the mask's own grid: keep its affine bit for bit
    labels_out, _ = from_canonical(labels, affine, mask.affine)
    return SyntheticCT(
        hu=hu_out,
        labels=labels_out.astype(np.int16),
        affine=affine_out,
        **_run_fields(opts, settings, engine, guidance_used, prior_used, stages, notes, latent, keep_latent),
        canonical=(hu, labels, spacing),
    )


def edit_volume(
    reference: ReferenceCT,
    mask: Mask,
    options: dict | None = None,
    original: Mask | None = None,
    region: np.ndarray | None = None,
    models: MaisiModels | ModelProvider | None = None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | threading.Event | None = None,
    keep_latent: bool = False,
) -> SyntheticCT:
    """A reference CT with the edit of `mask` drawn in: the in-memory core of an edit.

    `reference`: the scan in HU (`editing.read_reference_ct`, or `ReferenceCT(hu, affine)` after
    `editing.check_reference_ct`); `mask`: the edited label map on the scan's grid; `original`: the
    mask before the edit (the region is then what changed), or `region`: the voxels to redraw
    (nonzero). `options` as in `generate_volume` (output_size and spacing excepted: an edit is on the
    scan's grid), plus the edit's (`editing.EditSettings`: the margin, and research options). Outside
    the region the result is the reference, voxel for voxel and value for value.
    """
    options = dict(options or {})
    edit = EditSettings.from_options({key: options.pop(key) for key in EDIT_OPTIONS if key in options})
    unknown = sorted(set(options) - set(CORE_FIELDS))
    if unknown:
        raise RequestError(
            f"not options of an in-memory edit: {', '.join(unknown)}", "pass only CORE_FIELDS and EDIT_OPTIONS"
        )
    opts = {**DEFAULTS, **check_options(**options)}
    engine = _resolve_engine(opts, models)
    settings = _model_settings(opts, engine.folder)
    return _edit(reference, mask, original, region, opts, edit, engine, settings, _Stages(progress),
                 _cancel_check(cancel), keep_latent)  # fmt: skip


def _edit(
    reference: ReferenceCT,
    mask: Mask,
    original: Mask | None,
    explicit: np.ndarray | None,
    opts: dict,
    edit: EditSettings,
    engine: _Engine,
    settings: dict,
    stages: _Stages,
    cancelled: Callable[[], bool],
    keep_latent: bool,
) -> SyntheticCT:
    started = time.perf_counter()
    folder, device = engine.folder, engine.device
    notes: list[str] = list(mask.notes)

    def check_cancel() -> None:
        if cancelled():
            raise CancelledError()

    if opts["output_size"] is not None or opts["spacing"] is not None:
        raise OptionError("an edit is written on the reference CT's own grid", "leave out --output-size and --spacing")
    # 1. Everything cheap, before any model loads: grids, the region, the crop.
    with stages("read-mask", report=False):
        mask = _on_grid(mask, reference, "mask")
        original = None if original is None else _on_grid(original, reference, "original mask")
        if explicit is not None and tuple(explicit.shape) != reference.shape:
            raise GeometryError(
                f"the edit region has {'x'.join(map(str, explicit.shape))} voxels, the reference CT "
                f"{'x'.join(map(str, reference.shape))}",
                "give the region on the CT's grid",
            )
        view = CanonicalView(reference.affine, reference.shape)
        region, how = edit_region(
            mask.labels,
            spacing_of(reference.affine),
            None if original is None else original.labels,
            explicit,
            edit.edit_margin_mm,
        )
        check_region_size(region, (mask.labels > 0) | (reference.hu > AIR_BELOW_HU))
        region_c, hu_c, labels_c = view(region), view(reference.hu), view(mask.labels)
        crop = plan_crop(region_c, view, folder.grid_rules(), compression_of(folder.config), edit.context)
        has_body = bool((mask.labels == L.BODY).any())
    check_cancel()

    models = _load(engine, opts, stages)
    c = models.compression

    # 2. The crop: the scan encoded, the edited mask as conditioning, the region's latent footprint.
    with stages("encode-mask"):
        hu_crop = crop.take(hu_c, 1, HU_MIN).astype(np.float32, copy=False)
        labels_crop = crop.take(labels_c, 0, 0)
        if not has_body:
            labels_crop = crop_body(labels_crop, hu_crop)
        cond = _conditioning(models, labels_crop, crop.spacing, opts, settings, folder, device)
    with stages("encode-ct"):
        drawn_crop = crop.take(region_c, 1, 0.0) > 0 if not crop.aligned else crop.take(region_c, 0, False)
        image = torch.from_numpy(np.clip((hu_crop - HU_MIN) / (HU_MAX - HU_MIN), 0.0, 1.0))[None, None]
        with torch.no_grad(), models.autocast():
            mu = models.autoencoder.encode(image.to(device))[0]  # the posterior mean: no sampling noise
        reference_latent = mu.float() * models.scale_factor
        free = torch.nn.functional.max_pool3d(
            torch.from_numpy(drawn_crop.astype(np.float32))[None, None], kernel_size=c, stride=c
        ).to(device)
        if edit.latent_blend > 0:  # the ring of latent voxels around the footprint held only partly
            ring = torch.nn.functional.max_pool3d(free, 3, 1, 1) - free
            free = free + edit.latent_blend * ring
        if edit.patient_levels:
            from .latent_prior import reference_level_shift

            patient = reference_level_shift(
                models.latent_prior, torch.from_numpy(labels_crop.astype(np.int64)), c, reference_latent, free
            )
            # the sampler's two level steps (sampling.sample_latent), both the patient's here
            cond.level_prior, cond.prior_from = patient, edit.patient_levels[0]
            cond.bone_prior, cond.bone_prior_from = (
                (patient, edit.patient_levels[1]) if len(edit.patient_levels) > 1 else (None, 0.0)
            )
        else:
            if cond.level_prior is not None:  # the model's prior, moving levels inside the edit only
                cond.level_prior = _inside(cond.level_prior, free)
            if cond.bone_prior is not None:
                cond.bone_prior = _inside(cond.bone_prior, free)
        # the timestep shift of a full generation of the scan: the crop is part of that image
        scan_latent = tuple(int(round(n * s / t)) // c for n, s, t in zip(view.shape, view.spacing, crop.spacing))
        hold = LatentHold(reference_latent, free, edit.harmonize, scan_latent)
        del image, mu
    check_cancel()

    # 3. Sampling with the reference held outside the region.
    latent = _sample(models, cond, tuple(reference_latent.shape), opts, settings, stages, check_cancel, hold)
    guidance_used = float(cond.mask_guidance)
    prior_used = float(cond.prior_from) if cond.level_prior is not None else 1.0
    del cond, hold

    # 4. Decoding the crop, 5. the drawn HU blended into the scan inside the region.
    with stages("decode"):
        decoded = decode_latent(
            models, latent, settings["window"], settings["overlap"], lambda n: stages.report("decode", window=n),
            cancelled,
        )  # fmt: skip
        drawn = np.clip(decoded[0, 0].numpy(), 0.0, 1.0) * (HU_MAX - HU_MIN) + HU_MIN
        drawn[labels_crop == 0] = HU_MIN
        del decoded
    check_cancel()
    with stages("composite"):
        box = crop.box
        weight = blend_weight(region_c[box], view.spacing, edit.band_mm)
        weight[(labels_c[box] == 0) & (hu_c[box] <= AIR_BELOW_HU)] = 0.0  # air outside the body stays the scan's
        drawn_box = crop.back(drawn)
        if edit.level_correction:
            if original is not None:
                kept = view(original.labels)[box] == labels_c[box]
            else:
                kept = ~np.isin(labels_c[box], L.TUMORS)
            drawn_box, _ = match_levels(drawn_box, hu_c[box], labels_c[box], region_c[box], kept)
        if edit.noise_match:
            body_box = (labels_c[box] > 0) | (hu_c[box] > AIR_BELOW_HU)
            drawn_box, added = match_noise(drawn_box, hu_c[box], body_box, region_c[box], opts["seed"])
            if added:
                notes.append(f"the drawn region was smoother than the scan: {added:.0f} HU of fine noise added")
        hu = reference.hu.copy()
        view(hu)[box] = composite(hu_c[box], drawn_box, weight)
    region_voxels = int(np.count_nonzero(region))
    seconds = time.perf_counter() - started
    record = {
        "region": how,
        "region_voxels": region_voxels,
        "region_mm3": round(region_voxels * float(np.prod(spacing_of(reference.affine))), 1),
        "crop_shape": list(crop.shape),
        "crop_spacing": [round(v, 6) for v in crop.spacing],
        "crop_resampled": not crop.aligned,
        "seconds": round(seconds, 3),
    }
    notes.append(
        f"edited the reference CT in {seconds:.1f} s: {region_voxels} voxels redrawn ({how}) on a crop of "
        f"{describe_crop(crop)}; the rest of the scan is unchanged"
    )
    labels_out = mask.labels.astype(np.int16, copy=False)
    return SyntheticCT(
        hu=hu,
        labels=labels_out,
        affine=reference.affine,
        **_run_fields(opts, settings, engine, guidance_used, prior_used, stages, notes, latent, keep_latent),
        # the preview slices through the middle of the edit
        canonical=(view(hu), view(labels_out), view.spacing, tuple((s.start + s.stop) // 2 for s in box)),
        edit=record,
    )


def _on_grid(mask: Mask, reference: ReferenceCT, what: str) -> Mask:
    """The mask on the reference CT's grid (`editing.on_reference_grid`)."""
    labels = on_reference_grid(mask.labels, mask.affine, reference, what, Path(mask.source).name or what)
    if labels is mask.labels:
        return mask
    note = f"the {what} covered part of the CT's grid; it was placed into it (no label outside)"
    return Mask(labels, reference.affine, mask.source, mask.volume, [*mask.notes, note])


def _apply_edit_rules(mask: Mask, rules: tuple[str, ...], seed: int) -> Mask:
    """The mask with the edit rules applied, random choices drawn from the request's seed."""
    parsed = [parse_rule(rule) for rule in rules]
    labels, done = apply_rules(mask.labels, mask.spacing, parsed, np.random.default_rng(seed))
    said = "; ".join(
        ", ".join(f"{k} {v}" for k, v in entry.items() if k not in ("rule",)) + f" ({entry['rule']})" for entry in done
    )
    return Mask(labels, mask.affine, mask.source, mask.volume, [*mask.notes, f"mask edited: {said}"])


def read_edit_region(path: str | Path, reference: ReferenceCT) -> np.ndarray:
    """An edit region file (nonzero voxels) on the reference CT's grid."""
    volume = read_volume(path, "edit region")
    array = np.asarray(volume.array)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise MaskError(f"edit region {Path(path).name} contains NaN voxels", "save it as a 0/1 label map")
    return on_reference_grid(array != 0, volume.affine, reference, "edit region", Path(path).name)


def _inside(
    shift: Callable[[torch.Tensor], torch.Tensor], free: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x0: shift(x0) * free


def generate(
    request: GenerateRequest,
    models: MaisiModels | ModelProvider | None = None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | threading.Event | None = None,
    keep_latent: bool = False,
) -> GenerateResult:
    """Mask file → CT file (+ optional preview PNG and label map on the output grid).

    `models`: loaded models, a ModelProvider called once the inputs have passed their checks, or None
    (load from `request.model_dir`). `progress` receives {"stage", "elapsed", ...} dicts (sampling adds
    "i" and "total"); `cancel` is polled between sampling steps and decoding windows and raises
    CancelledError, leaving no file.
    """
    stages = _Stages(progress)
    cancelled = _cancel_check(cancel)

    # 1. Everything cheap first: options, output paths, the model folder's files, device, the inputs.
    checked = check_params(request.params())  # the same type and range rules as every other front door
    opts = {**DEFAULTS, **{name: checked[name] for name in CORE_FIELDS if name in checked}}
    engine = _resolve_engine(opts, models)
    settings = _model_settings(opts, engine.folder)
    _check_outputs(request)
    with stages("read-mask", report=False):
        mask = read_mask(request.mask)
        original = read_mask(request.original_mask) if request.original_mask else None
        if checked.get("edits"):
            before = mask
            mask = _apply_edit_rules(mask, checked["edits"], opts["seed"])
            if original is None and request.edit_region is None:
                original = before  # the region is then what the rules changed
        reference = read_reference_ct(request.reference_ct) if request.reference_ct else None
        region = None
        if request.edit_region:
            region = read_edit_region(request.edit_region, reference)

    # 2. The core: grid, models, conditioning, sampling, decoding (and, for an edit, the composite).
    if reference is None:
        ct = _synthesize(mask, opts, engine, settings, stages, cancelled, keep_latent)
    else:
        margin = checked.get("edit_margin_mm")
        edit = EditSettings() if margin is None else EditSettings(edit_margin_mm=margin)
        ct = _edit(reference, mask, original, region, opts, edit, engine, settings, stages, cancelled, keep_latent)

    # 3. Writing, all outputs at once.
    with stages("write"):
        source = reference.volume if reference is not None else mask.volume
        like = source if format_of(request.output) == "nifti" else None
        label_like = mask.volume if format_of(request.label_output or "") == "nifti" else None
        paths = [Path(request.output)] + [Path(p) for p in (request.preview, request.label_output) if p]
        try:
            with atomic_paths(*paths) as temps:
                save_volume(temps[0], ct.hu, ct.affine, like)
                rest = iter(temps[1:])
                if request.preview:
                    ct.preview().save(next(rest), format="PNG")
                if request.label_output:
                    save_volume(next(rest), ct.labels, ct.affine, label_like)
        except OSError as exc:
            raise write_error(exc, Path(request.output).parent) from None
    stages.timings["total"] = time.perf_counter() - stages.started

    return GenerateResult(
        output=Path(request.output),
        preview=Path(request.preview) if request.preview else None,
        label_output=Path(request.label_output) if request.label_output else None,
        seed=ct.seed,
        steps=ct.steps,
        solver=ct.solver,
        cfg_scale=ct.cfg_scale,
        shape=ct.shape,
        spacing=ct.spacing,
        model_dir=ct.model_dir,
        device=ct.device,
        timings={k: round(v, 3) for k, v in stages.timings.items()},
        peak_memory=ct.peak_memory,
        notes=ct.notes,
        latent=ct.latent,
        model=ct.model,
        mask_guidance=ct.mask_guidance,
        latent_prior_from=ct.latent_prior_from,
        edit=ct.edit,
    )
