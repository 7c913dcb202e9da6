"""`maisi-synth`: the command line.

User errors end as one line on stderr ("error: <problem>. Fix: <hint>.") and exit status 2; an
interrupted run exits 130; neither leaves an output file behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .errors import CancelledError, MaisiSynthError, OptionError
from .request import CT_MODALITIES, DEFAULTS, OFFICIAL_STEPS, PRECISIONS, SOLVER_NAMES, STEPS_RANGE

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

# The request fields that are command-line options, as argparse keywords: generate, evaluate and
# batch take them from here, so a flag, its default and its choices are written once (request.py
# holds the defaults, names and ranges; `check_params` checks the values).
REQUEST_FLAGS: dict[str, dict] = {
    "model_dir": dict(
        help="model folder (default: $MAISI_SYNTH_MODEL_DIR, else the weights of `maisi-synth download`, "
        "else the embedded demo model)"
    ),
    "steps": dict(
        type=int,
        help=f"sampling steps, {STEPS_RANGE[0]}-{STEPS_RANGE[1]} (default: the model's, {OFFICIAL_STEPS})",
    ),
    "seed": dict(type=int, default=DEFAULTS["seed"], help="noise seed (default 0)"),
    "cfg_scale": dict(type=float, help="tumor classifier-free guidance scale; 0 = off (default: the model's)"),
    "mask_guidance": dict(
        type=float,
        help="mask guidance scale: > 1 amplifies what the mask adds to the UNet's velocity on the noisy half of "
        "the steps; 1 = off (default: the model's; the demo model's 1.5)",
    ),
    "latent_prior_from": dict(
        type=float,
        help="move each region's latent level to the model's latent prior (latent_prior.pt) once, at t = this "
        "x T; 1 = off (default: the model's; off unless its maisi_synth.json sets it)",
    ),
    "solver": dict(default=DEFAULTS["solver"], choices=SOLVER_NAMES, help="ODE step (euler = official)"),
    "device": dict(default=DEFAULTS["device"], help="auto, cpu or cuda[:N]"),
    "precision": dict(default=DEFAULTS["precision"], choices=PRECISIONS),
    "modality": dict(
        choices=CT_MODALITIES, help="CT modality class of the conditioning: contrast phase (default: the model's, ct)"
    ),
    "reference_ct": dict(
        help="edit this CT instead of drawing a new one: the scan (in HU, on the mask's grid) is kept outside "
        "the edit region, voxel for voxel"
    ),
    "original_mask": dict(help="with --reference-ct: the mask before the edit; the region is then what changed"),
    "edit_region": dict(help="with --reference-ct: the region to redraw (nonzero voxels), instead of the rule"),
    "edit_margin_mm": dict(
        type=float,
        help="with --reference-ct: how far the changed (or, without --original-mask, the tumor) voxels are widened "
        "into the region that is redrawn (default 10 mm, 15 mm around lung tumors)",
    ),
}
EDIT_RULE_HELP = "mask edit, repeatable: insert:hepatic:10-30[:count] (diameters in mm), swap:lung:hepatic, remove:all"


def add_request_options(parser: argparse.ArgumentParser, *fields: str) -> None:
    """Add the flags of these request fields (`--cfg-scale` for cfg_scale), in this order."""
    for name in fields:
        parser.add_argument("--" + name.replace("_", "-"), **REQUEST_FLAGS[name])


def _size(values: list[str]) -> tuple[int, int, int] | str:
    if values == ["auto"]:
        return "auto"
    try:
        sizes = tuple(int(v) for v in values)
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 1:
        raise OptionError(
            f"--output-size takes three positive whole numbers or 'auto', got {' '.join(values)}",
            "e.g. --output-size 256 256 128",
        )
    return sizes


def _triple(name: str, values: list[str] | None, kind=float):
    if values is None:
        return None
    try:
        parsed = tuple(kind(v) for v in values)
    except ValueError:
        parsed = ()
    if len(parsed) != 3 or min(parsed) <= 0:
        raise OptionError(f"{name} takes three positive numbers, got {' '.join(values)}", f"e.g. {name} 1.5 1.5 2")
    return parsed


# ---------------------------------------------------------------------------------------------------
# generate


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="mask → synthetic CT", description="Generate a synthetic CT from a MAISI mask.")
    p.add_argument("--mask", required=True, help="mask file: .nii, .nii.gz, .nrrd or Slicer .seg.nrrd")
    p.add_argument("--output", required=True, help="CT file to write: .nii.gz, .nii or .nrrd (int16 HU)")
    add_request_options(
        p, "model_dir", "steps", "seed", "cfg_scale", "mask_guidance", "latent_prior_from", "solver", "modality"
    )
    p.add_argument("--output-size", nargs="+", metavar="N", help="output voxels x y z (RAS order), or 'auto'")
    p.add_argument("--spacing", nargs=3, metavar="MM", help="output spacing x y z in mm")
    add_request_options(p, "device", "precision")
    p.add_argument("--preview", help="also write a PNG with three slices and the mask's contours")
    p.add_argument("--label-output", help="also write the mask on the output grid (label map)")
    p.add_argument("--decode-window", nargs=3, metavar="N", help="VAE sliding window in latent voxels")
    p.add_argument("--decode-overlap", type=float, help="sliding-window overlap in [0, 1)")
    edit = p.add_argument_group("editing a CT (keep the scan, redraw only what the mask changes)")
    edit.add_argument("--edit", action="append", default=[], metavar="RULE", help=EDIT_RULE_HELP)
    for name in ("reference_ct", "original_mask", "edit_region", "edit_margin_mm"):
        edit.add_argument("--" + name.replace("_", "-"), **REQUEST_FLAGS[name])
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_generate)


def _run_generate(args) -> int:
    from tqdm import tqdm

    from .pipeline import GenerateRequest, generate

    request = GenerateRequest(
        mask=args.mask,
        output=args.output,
        model_dir=args.model_dir,
        steps=args.steps,
        seed=args.seed,
        cfg_scale=args.cfg_scale,
        mask_guidance=args.mask_guidance,
        latent_prior_from=args.latent_prior_from,
        solver=args.solver,
        output_size=_size(args.output_size) if args.output_size else None,
        spacing=_triple("--spacing", args.spacing),
        device=args.device,
        precision=args.precision,
        preview=args.preview,
        label_output=args.label_output,
        decode_window=_triple("--decode-window", args.decode_window, int),
        decode_overlap=args.decode_overlap,
        modality=args.modality,
        reference_ct=args.reference_ct,
        original_mask=args.original_mask,
        edit_region=args.edit_region,
        edit_margin_mm=args.edit_margin_mm,
        edits=args.edit or None,
    )
    bar = None
    stage_started = {}
    done_words = {
        "load": "models ready",
        "encode-mask": "mask encoded",
        "encode-ct": "reference CT encoded",
        "sample": "sampled",
        "decode": "decoded",
        "composite": "edit blended into the reference CT",
    }

    def progress(event: dict) -> None:
        # A stage is announced when it has finished, so a failing stage prints nothing but its error.
        nonlocal bar
        if args.quiet:
            return
        stage = event["stage"]
        if stage not in stage_started:
            for previous in [s for s in stage_started if s in done_words and not stage_started[s][1]]:
                if bar is not None and previous == "sample":
                    bar.close()
                    bar = None
                print(f"[{event['elapsed']:7.1f} s] {done_words[previous]}", file=sys.stderr, flush=True)
                stage_started[previous] = (stage_started[previous][0], True)
            stage_started[stage] = (event["elapsed"], False)
        if stage == "sample" and "total" in event:
            if bar is None:
                bar = tqdm(total=event["total"], desc="sampling", unit="step", file=sys.stderr, leave=False)
            bar.n = event["i"]
            bar.refresh()

    try:
        result = generate(request, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        t = result.timings
        print(
            f"wrote {result.output} ({'x'.join(map(str, result.shape))}, spacing {result.spacing} mm, seed {result.seed})"
        )
        if result.preview:
            print(f"wrote {result.preview}")
        if result.label_output:
            print(f"wrote {result.label_output}")
        print(f"model: {result.model}")
        if result.edit:
            e = result.edit
            print(
                f"edit: {e['region_voxels']} voxels redrawn ({e['region_mm3'] / 1000:.1f} ml), crop "
                f"{'x'.join(map(str, e['crop_shape']))} at {' x '.join(f'{v:g}' for v in e['crop_spacing'])} mm"
                f"{' (resampled)' if e['crop_resampled'] else ''}; the rest of the CT is the reference's"
            )
        work = sum(t.get(stage, 0.0) for stage in ("encode-mask", "encode-ct", "sample", "decode", "composite"))
        print(
            f"{'edit' if result.edit else 'generation'} took {work:.1f} s "
            f"(sampling {t['sample']:.1f} s for {result.steps} {result.solver} steps, decoding {t['decode']:.1f} s; "
            f"model load {t['load']:.1f} s, total {t['total']:.1f} s) on {result.device}"
        )
    return 0


# ---------------------------------------------------------------------------------------------------
# info


def _add_info(sub) -> None:
    p = sub.add_parser(
        "info", help="describe a model folder", description="Print a model's config, sizes and memory needs."
    )
    p.add_argument("--model-dir", help="model folder (default: the downloaded official weights, else the demo model)")
    p.add_argument("--output-size", nargs=3, type=int, metavar="N", help="output size for the memory estimate")
    p.add_argument("--cfg", action="store_true", help="estimate memory with tumor CFG (doubles the batch)")
    p.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_run_info)


def model_info(model_dir, output_size=None, precision: str = "fp16", cfg: bool = False) -> dict:
    """A model folder's description, without loading its weights."""
    from .model_home import choose_model_dir
    from .models import compression_of, estimate_memory, locate_model_folder, network_kwargs, param_estimate

    choice = choose_model_dir(model_dir)
    folder = locate_model_folder(choice.path)
    config = folder.config
    networks = {}
    for key in ("autoencoder_def", "diffusion_unet_def", "controlnet_def"):
        target, kwargs = network_kwargs(config, key)
        networks[key] = {
            "class": target.rsplit(".", 1)[1],
            "num_channels": kwargs.get("num_channels"),
            "parameters": param_estimate(config, key),
        }
    _, scheduler = network_kwargs(config, "noise_scheduler")
    rules = folder.grid_rules()
    size = tuple(output_size or folder.settings.get("default_output_size", (256, 256, 256)))
    window = folder.inference["autoencoder_sliding_window_infer_size"]
    memory = estimate_memory(config, size, precision, cfg, window)
    c = compression_of(config)
    return {
        "name": folder.name,
        "folder": str(folder.root),
        "model": choice.describe(),
        "source": choice.source,
        "layout": "official" if folder.config_path.parent.name == "configs" else "flat",
        "config": str(folder.config_path),
        "weights": {p.name: round(p.stat().st_size / 2**20, 2) for p in folder.weight_files()},
        "networks": networks,
        "latent_channels": int(network_kwargs(config, "diffusion_unet_def")[1]["in_channels"]),
        "compression": c,
        "scheduler": scheduler,
        "inference_defaults": folder.inference,
        "grid_rules": rules.to_dict(),
        "memory_estimate": {
            "output_size": list(size),
            "latent_shape": [n // c for n in size],
            "precision": precision,
            "cfg": cfg,
            **{k: round(v / 2**30, 3) for k, v in memory.items()},
            "unit": "GiB",
        },
        "description": folder.settings.get("description", ""),
    }


def _run_info(args) -> int:
    info = model_info(args.model_dir, args.output_size, args.precision, args.cfg)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model        {info['name']}  ({info['layout']} layout, {info['folder']})")
    print(f"using        {info['model']}")
    if info["description"]:
        print(f"             {info['description']}")
    print(f"config       {info['config']}")
    for name, mb in info["weights"].items():
        print(f"weights      {name:<28} {mb:9.2f} MB")
    for net in info["networks"].values():
        print(
            f"network      {net['class']:<26} channels {net['num_channels']}  {net['parameters'] / 1e6:8.2f} M parameters"
        )
    s = info["scheduler"]
    print(
        f"scheduler    rectified flow, {s.get('num_train_timesteps', 1000)} train timesteps, "
        f"timestep shift {'on' if s.get('use_timestep_transform') else 'off'}"
    )
    d = info["inference_defaults"]
    print(
        f"defaults     {d['num_inference_steps']} steps, cfg {d['cfg_guidance_scale']}, mask guidance "
        f"{d['mask_guidance_scale']} (from t = {d['mask_guidance_from']} T), latent prior "
        f"at t = {d['latent_prior_from']} T (1: off), bone again at t = {d['latent_prior_bone_from']} T "
        f"(0: off), decode window "
        f"{d['autoencoder_sliding_window_infer_size']} (overlap {d['autoencoder_sliding_window_infer_overlap']})"
    )
    r = info["grid_rules"]
    print(
        f"grid         sizes multiple of {r['size_multiple']}; spacing x,y {r['spacing_xy_mm']} mm, z {r['spacing_z_mm']} mm; "
        f"in-plane FOV >= {r['min_fov_xy_mm']} mm"
    )
    m = info["memory_estimate"]
    print(
        f"memory       for {'x'.join(map(str, m['output_size']))} ({m['precision']}{', cfg' if m['cfg'] else ''}): "
        f"weights {m['weights']:.2f} GiB, sampling {m['sampling']:.2f} GiB, decoding {m['decoding']:.2f} GiB, "
        f"peak on device ~{m['peak_device']:.2f} GiB (rough estimate), output {m['output_on_cpu']:.2f} GiB on the CPU"
    )
    return 0


# ---------------------------------------------------------------------------------------------------
# labels


def _add_labels(sub) -> None:
    p = sub.add_parser("labels", help="list MAISI label ids and names")
    p.add_argument("--tumors", action="store_true", help="only tumors, with their host organs")
    p.set_defaults(run=_run_labels)


def _run_labels(args) -> int:
    from . import labels as L

    if args.tumors:
        for tumor, hosts in L.TUMOR_HOSTS.items():
            host = (
                L.name_of(hosts[0])
                if len(hosts) == 1
                else "majority neighbouring " + ("lung lobe" if hosts == L.LUNG_LOBES else "bone")
            )
            print(f"{tumor:4d}  {L.name_of(tumor):<26} host: {host}")
        return 0
    for label, name in sorted(L.label_names().items()):
        print(f"{label:4d}  {name}")
    return 0


# ---------------------------------------------------------------------------------------------------
# train, phantoms


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train the VAE, the diffusion UNet or the ControlNet",
        description="Train one stage into an official-format model folder (<output_dir>/model). "
        "Multi-process: torchrun --nproc_per_node G -m MaisiSynthLib train ...",
    )
    p.add_argument("stage", choices=["vae", "unet", "controlnet"])
    p.add_argument("--config", help="training config JSON (every key has a default)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set controlnet.contrastive=false (repeatable)",
    )
    p.add_argument("--cases", help="folder of *_image/*_label NIfTI pairs or a datalist JSON")
    p.add_argument("--network", help="official-format network config JSON")
    p.add_argument("--output-dir", help="run folder (model/, state/, logs/, latents/)")
    p.add_argument("--base-model-dir", help="start from this model folder's weights (fine-tuning)")
    p.add_argument("--steps", type=int, help="total optimiser steps of this stage")
    p.add_argument("--batch-size", type=int, help="cases per process per step")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--resume", action="store_true", help="continue from <output_dir>/state/<stage>.pt")
    p.add_argument("--stop-after", type=int, metavar="STEP", help="stop (with a checkpoint) at this step")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_train)


def _run_train(args) -> int:
    from .training import train

    stage = args.stage
    result = train(
        stage,
        args.config,
        args.overrides,
        resume=args.resume,
        stop_after=args.stop_after,
        progress=not args.quiet,
        cases=args.cases,
        network=args.network,
        output_dir=args.output_dir,
        base_model_dir=args.base_model_dir,
        seed=args.seed,
        device=args.device,
        **{f"{stage}.steps": args.steps, f"{stage}.batch_size": args.batch_size},
    )
    if result.get("is_main", True):
        print(f"{stage}: steps {result['start']}→{result['end']}, loss {result['loss']:.5f}, {result['seconds']:.1f} s")
    return 0


def _add_phantoms(sub) -> None:
    p = sub.add_parser(
        "phantoms",
        help="write procedural CT phantoms with MAISI labels",
        description="Write <prefix>NNNN_image.nii.gz / <prefix>NNNN_label.nii.gz pairs (deterministic by seed).",
    )
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--size", nargs=3, default=["128", "128", "64"], metavar="N", help="voxels x y z (default 128 128 64)"
    )
    p.add_argument("--spacing", nargs=3, default=["3", "3", "5"], metavar="MM", help="mm x y z (default 3 3 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tumors", default="all", help="all, random, none, or comma-separated tumor ids (e.g. 26,23)")
    p.add_argument(
        "--fov",
        default="torso",
        choices=("torso", "chest", "abdomen", "varied"),
        help="field of view: centred on the torso (default), chest-only, abdomen-only, or varied "
        "(any craniocaudal position, spacing ±15%%)",
    )
    p.add_argument(
        "--coarse", action="store_true", help="write coarse label maps: body, lung lobes, bones and tumors only"
    )
    p.add_argument("--prefix", default="case", help="file name prefix (default case: case0000_image.nii.gz)")
    p.set_defaults(run=_run_phantoms)


def _run_phantoms(args) -> int:
    from tqdm import tqdm

    from .phantoms import write_phantoms

    size = _triple("--size", args.size, int)
    spacing = _triple("--spacing", args.spacing)
    tumors = args.tumors
    if tumors not in ("all", "random", "none"):
        try:
            tumors = [int(t) for t in tumors.split(",") if t.strip()]
        except ValueError:
            raise OptionError(
                f"--tumors takes all, random, none or ids, got '{args.tumors}'", "e.g. --tumors 26,23"
            ) from None
    bar = tqdm(total=args.count, desc="phantoms", unit="case", file=sys.stderr)
    pairs = write_phantoms(
        args.out,
        args.count,
        size,
        spacing,
        args.seed,
        tumors,
        progress=lambda: bar.update(1),
        fov=args.fov,
        coarse=args.coarse,
        prefix=args.prefix,
    )
    bar.close()
    print(f"wrote {len(pairs)} image/label pairs to {args.out}")
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="measure synthetic CTs against held-out real image/label pairs",
        description="Generate a CT from every held-out label map and compare it with the real image "
        "(organ HU, tumor conspicuity, ROI sensitivity, slice Fréchet distance).",
    )
    add_request_options(p, "model_dir")
    p.add_argument("--cases", required=True, help="folder of *_image/*_label NIfTI pairs or a datalist JSON")
    add_request_options(p, "steps", "seed", "solver", "mask_guidance", "latent_prior_from", "device")
    p.add_argument("--json", dest="json_out", help="write the full results here (default: <cases>/evaluation.json)")
    p.add_argument("--save-dir", help="keep the synthetic CTs here")
    p.add_argument("--no-roi", action="store_true", help="skip the tumor-free generations (halves the time)")
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args) -> int:
    from tqdm import tqdm

    from .cases import find_pairs
    from .evaluation import evaluate, format_table, write_json

    total = len(find_pairs(args.cases))
    bar = tqdm(total=total, desc="evaluate", unit="case", file=sys.stderr)
    summary = evaluate(
        args.model_dir,
        args.cases,
        args.steps,
        args.seed,
        args.solver,
        args.device,
        args.save_dir,
        roi=not args.no_roi,
        progress=lambda name: bar.update(1),
        mask_guidance=args.mask_guidance,
        latent_prior_from=args.latent_prior_from,
    )
    bar.close()
    cases = Path(args.cases)
    out = Path(args.json_out) if args.json_out else (cases if cases.is_dir() else cases.parent) / "evaluation.json"
    write_json(summary, out)
    print(format_table(summary))
    print(f"model: {summary['settings']['using']}")
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------------------------------------------
# download


def _add_fit_prior(sub) -> None:
    p = sub.add_parser(
        "fit-prior",
        help="fit a model's latent prior (per-label latent levels) to image/label pairs",
        description="Encode image/label pairs with the model's VAE and fit one latent vector per label "
        "(latent_prior.py); written to the model folder's latent_prior.pt unless --output says otherwise. "
        "Sampling uses it with --latent-prior-from (or the model's inference setting latent_prior_from).",
    )
    add_request_options(p, "model_dir")
    p.add_argument("--cases", required=True, help="folder of *_image/*_label NIfTI pairs or a datalist JSON")
    p.add_argument("--output", help="where to write the prior (default: <model folder>/latent_prior.pt)")
    p.add_argument(
        "--latents",
        help="fit to a training run's cached latents (<output_dir>/latents/<vae>-.../, e.g. refined ones) "
        "instead of encoding μ: the latents the UNet learnt from. Must come from this model's VAE",
    )
    add_request_options(p, "device")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_fit_prior)


def _run_fit_prior(args) -> int:
    from tqdm import tqdm

    from .cases import find_pairs
    from .latent_prior import PRIOR_FILE, fit_prior_for_model, save_latent_prior
    from .model_home import choose_model_dir
    from .models import load_models, locate_model_folder
    from .request import check_options

    check_options(model_dir=args.model_dir, device=args.device)
    folder = locate_model_folder(choose_model_dir(args.model_dir).path, require_controlnet=False)
    folder.prior_path = None  # the prior being replaced is not read (it may be the broken one)
    out = Path(args.output) if args.output else folder.root / PRIOR_FILE
    if out.suffix != ".pt":
        raise OptionError(f"--output {out} does not end in .pt", "write the prior to a .pt file")
    total = len(find_pairs(args.cases))
    models = load_models(folder, args.device, "fp32")
    desc = "read" if args.latents is not None else "encode"
    bar = tqdm(total=total, desc=desc, unit="case", file=sys.stderr, disable=args.quiet)
    prior = fit_prior_for_model(models, args.cases, progress=lambda name: bar.update(1), latents=args.latents)
    bar.close()
    save_latent_prior(prior, out)
    seen = int((prior.label_weight > 0).sum())
    print(f"wrote {out}: latent levels of {seen} labels from {total} cases")
    return 0


def _add_download(sub) -> None:
    from .model_home import OFFICIAL_REPO, official_model_dir

    p = sub.add_parser(
        "download",
        help=f"fetch the official MAISI-v2 weights ({OFFICIAL_REPO}) into a model folder",
        description=f"Download the official MAISI-v2 rflow-ct weights ({OFFICIAL_REPO} on the Hugging Face Hub) "
        "into a model folder: by default the per-user folder that generate, info, batch, evaluate, the worker, the "
        "server and the Slicer module use when no --model-dir is given. An interrupted download resumes, every "
        "file's size and SHA-256 is checked, and running it again verifies and repairs the folder. "
        "Needs huggingface_hub: pip install 'maisi-synth[download]'.",
    )
    p.add_argument("--dest", help=f"model folder to write (default: {official_model_dir()}, see $MAISI_SYNTH_HOME)")
    p.add_argument("--revision", default="main", help="branch, tag or commit of the hub repository (default: main)")
    p.add_argument(
        "--token",
        help="Hugging Face token, for a gated repository (default: $HF_TOKEN or the login of `hf auth login`; "
        "prefer those: a command-line argument is visible to other users of the machine)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_download)


def _run_download(args) -> int:
    from tqdm import tqdm

    from .download import download

    bar = None

    def progress(event: dict) -> None:
        nonlocal bar
        if args.quiet:
            return
        if event["stage"] == "download":
            if bar is None and event["done"] == 0:
                return  # no bar before the first byte: a refusal then prints its one line and nothing else
            if bar is None:
                bar = tqdm(
                    total=event["total"], unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False
                )
            bar.set_description(event["file"], refresh=False)
            bar.n = event["bytes"]
            bar.refresh()
        elif event["stage"] == "verify":
            tqdm.write(f"verifying {event['file']}", file=sys.stderr)

    try:
        result = download(args.dest, args.revision, args.token or None, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0

    def size(n: int) -> str:
        return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"

    print(f"official weights {result.repo} at revision {result.commit[:12]} ({result.revision}) in {result.model_dir}")
    repaired = f"; replaced {', '.join(result.repaired)}" if result.repaired else ""
    print(
        f"{len(result.files)} files, {size(result.total_bytes)}, all verified; "
        f"downloaded now: {size(result.downloaded_bytes)}{repaired}"
    )
    if not result.default_location:
        print(f"use them with --model-dir {result.model_dir}")
    elif os.environ.get("MAISI_SYNTH_MODEL_DIR"):
        print("note: $MAISI_SYNTH_MODEL_DIR is set and is used before these weights; unset it to use them")
    else:
        print("generate, info, batch, evaluate, the worker, the server and the Slicer module use them from now on")
    return 0


# ---------------------------------------------------------------------------------------------------
# worker / serve


def _add_worker(sub) -> None:
    p = sub.add_parser(
        "worker",
        help="background worker: JSON-line requests on stdin, events on stdout",
        description="Keep models loaded and serve generate requests as JSON lines (see MaisiSynthLib/worker.py).",
    )
    p.add_argument("--device", default="auto", help="default device of the requests: auto, cpu or cuda[:N]")
    p.add_argument("--model-dir", help="default model folder of the requests (default: as `generate`)")
    p.set_defaults(run=_run_worker)


def _run_worker(args) -> int:
    from .worker import serve_stdio

    return serve_stdio(args.device, args.model_dir)


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="the worker over HTTP, for a remote GPU machine",
        description="Serve generate requests over HTTP (mask upload, progress, result download). "
        "Bound to localhost by default; any other address needs a token ($MAISI_SYNTH_TOKEN or --token-file).",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--model-dir", help="the model folder every request uses (default: as `generate`)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--token-file", help="file holding the token clients must send (else $MAISI_SYNTH_TOKEN)")
    p.add_argument("--max-upload-mb", type=float, default=512.0, help="largest mask upload accepted (default 512)")
    p.add_argument(
        "--workdir", help="folder under which this run keeps uploads and results (default: the system temp folder)"
    )
    p.add_argument(
        "--upload-timeout", type=float, default=60.0, help="seconds an upload may send nothing before it is dropped"
    )
    p.add_argument("--upload-ttl", type=float, default=3600.0, help="seconds an unused upload is kept (default 3600)")
    p.set_defaults(run=_run_serve)


def _run_serve(args) -> int:
    from .serve import run_server

    token = None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise OptionError(
                f"cannot read the token file {args.token_file}: {exc.strerror}", "give a readable file"
            ) from None
        if not token:
            raise OptionError(f"the token file {args.token_file} is empty", "write a long random token into it")
    elif os.environ.get("MAISI_SYNTH_TOKEN"):
        token = os.environ["MAISI_SYNTH_TOKEN"]
    return run_server(
        host=args.host,
        port=args.port,
        token=token,
        model_dir=args.model_dir,
        device=args.device,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        workdir=args.workdir,
        upload_timeout=args.upload_timeout,
        upload_ttl=args.upload_ttl,
    )


# ---------------------------------------------------------------------------------------------------
# batch


def _add_batch(sub) -> None:
    p = sub.add_parser(
        "batch",
        help="many masks × seeds → image/label pairs (nnU-Net or MONAI layout), resumable, torchrun-sharded",
        description="Generate synthetic image/label pairs for training. Re-running the same command skips "
        "finished pairs; under `torchrun --nproc_per_node G -m MaisiSynthLib batch ...` the ranks share the work.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--masks", help="folder of masks (its *_label files if it holds pairs) or a list file")
    source.add_argument(
        "--reference-cts",
        help="folder of real *_image/*_label pairs (or a MONAI datalist): each output is the real CT with the "
        "--edit rules drawn into it, the rest of the scan kept voxel for voxel",
    )
    p.add_argument("--seeds", type=int, default=1, help="seeds per mask (default 1)")
    p.add_argument("--seed-start", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--out", required=True, help="output folder (the dataset)")
    p.add_argument("--edit", action="append", default=[], metavar="RULE", help=EDIT_RULE_HELP)
    p.add_argument("--edit-margin-mm", **REQUEST_FLAGS["edit_margin_mm"])
    p.add_argument("--layout", default="nnunet", choices=["nnunet", "monai"])
    p.add_argument("--labels", default="all", help="'all' or a comma list of MAISI names/ids to keep (numbered 1..K)")
    p.add_argument("--name", default="MaisiSynth", help="dataset name in dataset.json / datalist.json")
    add_request_options(p, "model_dir", "steps", "solver", "cfg_scale", "mask_guidance", "latent_prior_from", "device")
    p.add_argument("--threads", type=int, help="torch threads per process (default 1 on the CPU, for identical bytes)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_run_batch)


def _run_batch(args) -> int:
    from .batch import BatchSettings, run_batch

    counts = run_batch(
        BatchSettings(
            masks=args.masks,
            out=args.out,
            seeds=args.seeds,
            seed_start=args.seed_start,
            edits=args.edit,
            layout=args.layout,
            labels=args.labels,
            model_dir=args.model_dir,
            steps=args.steps,
            solver=args.solver,
            cfg_scale=args.cfg_scale,
            mask_guidance=args.mask_guidance,
            latent_prior_from=args.latent_prior_from,
            device=args.device,
            threads=args.threads,
            name=args.name,
            reference_cts=args.reference_cts,
            edit_margin_mm=args.edit_margin_mm,
        ),
        progress=not args.quiet,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"{counts['done']} of {counts['pairs']} pairs done, {counts['failed']} failed "
            f"({counts['ran_here']} generated now); manifest: {Path(args.out) / 'manifest.jsonl'}"
        )
        print(f"model: {counts['model']}")
    return 0 if counts["failed"] == 0 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maisi-synth", description="Mask → synthetic CT (MAISI-v2).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_info(sub)
    _add_labels(sub)
    _add_train(sub)
    _add_phantoms(sub)
    _add_evaluate(sub)
    _add_fit_prior(sub)
    _add_worker(sub)
    _add_serve(sub)
    _add_batch(sub)
    _add_download(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.run(args)
    except CancelledError:
        print("cancelled; no output written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MaisiSynthError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if args.command == "download":  # a download keeps what it fetched
            print("interrupted; run the same command again to resume", file=sys.stderr)
        else:
            print("interrupted; no output written", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
