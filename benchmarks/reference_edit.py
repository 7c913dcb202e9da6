"""Editing a reference CT, measured: exactness outside the edit, lesions, host tissue, seam, removal, time.

    .venv/bin/python benchmarks/reference_edit.py quality [--cases DIR] [--model-dir D] [--json out.json]
    .venv/bin/python benchmarks/reference_edit.py timing [--model-dir D] [--json out.json]

`quality`, on held-out image/label pairs (default: the 8 held-out torsos of docs/results.md, phantoms
from seed 1000, made on first use): in every case, `--per-case` lesions of each tumor type (2 by
default), each in its own edit, are inserted at random host voxels with sizes from the phantoms'
own ranges (bone lesions in vertebrae, as the phantoms'), the mask's own tumors kept; separately, each
tumor type the case holds is removed. Each edit redraws the changed voxels dilated by the edit
margin. Per tumor type:

- outside: max |Δ| between the output and the reference outside the edit region (must be 0);
- contrast: the inserted lesion's median minus its host organ's median in the output, against the same
  for the real lesions of that type in the reference, both averaged over the cases. The host organ is
  the organ the lesion sits in (for a bone lesion its vertebra, where `evaluate` takes every bone);
- shell: median of the host voxels within 5 mm of the inserted lesion minus the reference's host
  median (the lesion sits in this patient's organ, not in the model's average one);
- seam: mean |gradient| on the voxels of the blend band and the ring just outside the region, over
  mean |gradient| in the host organ more than 20 mm from the region, both on host voxels away from
  the organ's edge; printed beside the same ratio of the reference itself;
- removal: the removed tumor's former voxels' median minus the reference's host median (host voxels),
  and minus the median of the host voxels within 10 mm of it (the tissue right around it).

`timing`: one 20 mm hepatic lesion inserted against a full generation of the same case, on the
128×128×64 grid and on a grid with 8× the voxels at the same spacing (256×256×128, a wider field of
view); each measured in its own process with the models loaded first, so the time and the peak RSS
are those of the one call; `--repeat` processes each (3), the median reported.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from MaisiSynthLib import labels as L  # noqa: E402

TYPES = (L.HEPATIC_TUMOR, L.PANCREATIC_TUMOR, L.COLON_CANCER, L.LUNG_TUMOR, L.BONE_LESION)
LESION_DIAMETER_MM = 20.0
SHELL_MM = 5.0
FAR_MM = 20.0
HELDOUT = ROOT / "runs" / "results" / "heldout8"


def phantoms(folder: Path, count: int, seed: int, size: tuple[int, int, int], tumors: str = "all") -> Path:
    if len(list(folder.glob("*_label.nii.gz"))) != count:
        subprocess.run(
            [sys.executable, "-m", "MaisiSynthLib", "phantoms", "--count", str(count), "--out", str(folder),
             "--seed", str(seed), "--size", *map(str, size), "--spacing", "3", "3", "5", "--tumors", tumors],
            check=True, cwd=ROOT,
        )  # fmt: skip
    return folder


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, value = item.split("=", 1)
        out[key] = json.loads(value)
    return out


def gradient_magnitude(hu: np.ndarray, spacing) -> np.ndarray:
    return np.sqrt(sum(g**2 for g in np.gradient(hu.astype(np.float32), *spacing)))


def seam_ratio(out: np.ndarray, region: np.ndarray, host: np.ndarray, spacing, band_mm: float) -> float | None:
    from scipy import ndimage

    interior = ndimage.binary_erosion(host)
    depth = ndimage.distance_transform_edt(np.pad(region, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    band = (region & (depth <= band_mm + 0.5 * min(spacing))) | (ndimage.binary_dilation(region) & ~region)
    far = interior & (ndimage.distance_transform_edt(~region, sampling=spacing) > FAR_MM)
    at = band & interior
    if not at.any() or not far.any():
        return None
    g = gradient_magnitude(out, spacing)
    return float(g[at].mean() / g[far].mean())


def host_of(lesion: np.ndarray, host_labels: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The host organ of a lesion: the voxels of `labels` with the labels `host_labels` has at the
    lesion (the organ it was put into, or that replaces it when removed), tumors excepted. For a bone
    lesion this is its vertebra, not every bone of the body."""
    ids = [int(v) for v in np.unique(host_labels[lesion]) if v != 0 and not L.is_tumor(int(v))]
    return np.isin(labels, ids) & ~np.isin(labels, L.TUMORS)


def edit_once(models, reference, original, edited: np.ndarray, options: dict, margin: float | None):
    """(output HU, the edit region by the engine's rule, seconds) of one edit of `reference`."""
    from MaisiSynthLib.editing import edit_region
    from MaisiSynthLib.grid import spacing_of
    from MaisiSynthLib.masks import Mask
    from MaisiSynthLib.pipeline import edit_volume

    started = time.perf_counter()
    ct = edit_volume(reference, Mask(edited, original.affine), dict(options), original=original, models=models)
    seconds = time.perf_counter() - started
    region, _ = edit_region(edited, spacing_of(original.affine), original.labels, margin_mm=margin)
    return ct.hu, region, seconds


def mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def quality(args) -> dict:
    import nibabel as nib
    from scipy import ndimage

    from MaisiSynthLib.cases import find_pairs
    from MaisiSynthLib.editing import BLEND_BAND_MM, ReferenceCT, check_reference_ct
    from MaisiSynthLib.lesions import random_tumor
    from MaisiSynthLib.masks import Mask, remove_tumors
    from MaisiSynthLib.models import load_models
    from MaisiSynthLib.phantoms import TUMOR_RADII_MM, VERTEBRAE
    from MaisiSynthLib.pipeline import default_model_dir, generate_volume

    cases = Path(args.cases) if args.cases else phantoms(HELDOUT, 8, 1000, (128, 128, 64))
    model_dir = Path(args.model_dir) if args.model_dir else default_model_dir()
    models = load_models(model_dir, args.device)
    options = {"steps": args.steps, "seed": 0, **parse_set(args.set)}
    band = float(options.get("band_mm", BLEND_BAND_MM))
    margin = options.get("edit_margin_mm")  # None: the engine's rule
    rows = []
    for name, image_path, label_path in find_pairs(cases):
        image = nib.load(str(image_path))
        labels = np.asanyarray(nib.load(str(label_path)).dataobj).astype(np.int16)
        hu = check_reference_ct(np.asanyarray(image.dataobj))
        spacing = tuple(float(s) for s in image.header.get_zooms()[:3])
        reference = ReferenceCT(hu, image.affine)
        original = Mask(labels, image.affine)
        drawn_full = None
        if args.baseline:
            drawn_full = generate_volume(original, {"steps": args.steps, "seed": 0}, models=models).hu
        rng = np.random.default_rng([1000, int(sum(map(ord, name)))])

        for tumor in TYPES:
            real_row: dict = {}
            if (labels == tumor).any():
                real = labels == tumor
                real_host = host_of(real, remove_tumors(labels, (tumor,)), labels)
                host_median = float(np.median(hu[real_host]))
                real_row["real_contrast"] = float(np.median(hu[real]) - host_median)
                real_shell = (ndimage.distance_transform_edt(~real, sampling=spacing) <= SHELL_MM) & ~real & real_host
                real_row["real_shell"] = float(np.median(hu[real_shell]) - host_median) if real_shell.any() else None
                if drawn_full is not None and real_shell.any():  # where a full generation of the mask draws it
                    host_drawn = float(np.median(drawn_full[real_host]))
                    real_row["full_generation_shell"] = float(np.median(drawn_full[real_shell]) - host_drawn)
                # removal of the case's own tumors of this type
                removed = remove_tumors(labels, (tumor,))
                out, region, _ = edit_once(models, reference, original, removed, options, margin)
                host = host_of(real, removed, labels)
                real_row["removal_outside_max_abs"] = float(np.abs(out.astype(np.float64) - hu)[~region].max())
                real_row["removal"] = float(np.median(out[real]) - np.median(hu[host]))
                # the same against the host tissue right around the former tumor (a vertebral body is
                # brighter than its vertebra's median, which holds the thin posterior elements)
                around = (ndimage.distance_transform_edt(~real, sampling=spacing) <= 2 * SHELL_MM) & host
                real_row["removal_local"] = (
                    float(np.median(out[real]) - np.median(hu[around])) if around.any() else None
                )
            for k in range(args.per_case):  # insertions: each its own edit of the case, its own row
                low, high = TUMOR_RADII_MM[tumor]
                hosts = VERTEBRAE if tumor == L.BONE_LESION else None
                edited = random_tumor(labels, tumor, float(rng.uniform(low, high)), spacing, rng, hosts)
                out, region, seconds = edit_once(models, reference, original, edited, options, margin)
                lesion = (edited == tumor) & (labels != tumor)
                host = host_of(lesion, labels, edited)  # the organ the lesion was put into
                host_median = float(np.median(hu[host]))
                near = ndimage.distance_transform_edt(~lesion, sampling=spacing) <= SHELL_MM
                shell = near & ~lesion & host
                # the seam against the host tissue far from the edit: every host of the type (all bones, all lobes)
                hosts_all = np.isin(edited, L.TUMOR_HOSTS[tumor])
                row = {
                    "case": name,
                    "tumor": L.name_of(tumor),
                    **(real_row if k == 0 else {}),  # the case's real lesions and removal count once
                    "seconds": seconds,
                    "outside_max_abs": float(np.abs(out.astype(np.float64) - hu)[~region].max()),
                    "contrast": float(np.median(out[lesion]) - np.median(out[host])),
                    "shell": float(np.median(out[shell]) - host_median) if shell.any() else None,
                    "seam": seam_ratio(out, region, hosts_all, spacing, band),
                    "seam_reference": seam_ratio(hu, region, hosts_all, spacing, band),
                }
                rows.append(row)
                print(
                    f"{name} {row['tumor'][:16]:16s} contrast {row['contrast']:+6.0f} (real "
                    f"{row.get('real_contrast', float('nan')):+5.0f}) shell {row['shell'] or float('nan'):+5.0f} "
                    f"seam {row['seam'] or float('nan'):.2f} removal {row.get('removal', float('nan')):+5.0f} "
                    f"{seconds:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    summary = {}
    for tumor in TYPES:
        mine = [r for r in rows if r["tumor"] == L.name_of(tumor)]
        real = mean([r.get("real_contrast") for r in mine])
        drawn = mean([r["contrast"] for r in mine])
        summary[L.name_of(tumor)] = {
            "lesions": len(mine),
            "outside_max_abs_hu": max(
                [r["outside_max_abs"] for r in mine] + [r.get("removal_outside_max_abs", 0) for r in mine]
            ),
            "contrast_hu": drawn,
            "real_contrast_hu": real,
            "ratio": drawn / real if real else None,
            "shell_mean_abs_hu": mean([abs(r["shell"]) for r in mine if r["shell"] is not None]),
            "real_shell_hu": mean([abs(v) for r in mine if (v := r.get("real_shell")) is not None]),
            "full_generation_shell_hu": mean(
                [abs(v) for r in mine if (v := r.get("full_generation_shell")) is not None]
            ),
            "seam": mean([r["seam"] for r in mine]),
            "seam_reference": mean([r["seam_reference"] for r in mine]),
            "removal_mean_abs_hu": mean([abs(r["removal"]) for r in mine if "removal" in r]),
            "removal_local_mean_abs_hu": mean([abs(v) for r in mine if (v := r.get("removal_local")) is not None]),
            "seconds": mean([r["seconds"] for r in mine]),
        }
    settings = {"model_dir": str(model_dir), "cases": str(cases), "per_case": args.per_case, **options}
    return {"settings": settings, "rows": rows, "summary": summary}


def print_quality(data: dict) -> None:
    print(
        f"{'tumor type':<26} {'outside':>7} {'contrast':>8} {'real':>6} {'ratio':>6} {'shell':>6} {'real':>6} "
        f"{'full':>6} {'seam':>5} {'(ref)':>5} {'removal':>7} {'s':>5}"
    )

    def f(v, spec):
        return format(v, spec) if v is not None else "—"

    for name, s in data["summary"].items():
        print(
            f"{name:<26} {f(s['outside_max_abs_hu'], '7.0f')} {f(s['contrast_hu'], '+8.0f')} {f(s['real_contrast_hu'], '+6.0f')} "
            f"{f(s['ratio'], '6.2f')} {f(s['shell_mean_abs_hu'], '6.1f')} {f(s['real_shell_hu'], '6.1f')} "
            f"{f(s['full_generation_shell_hu'], '6.1f')} "
            f"{f(s['seam'], '5.2f')} {f(s['seam_reference'], '5.2f')} {f(s['removal_mean_abs_hu'], '7.1f')} {f(s['seconds'], '5.1f')}"
        )  # fmt: skip


TIMING_GRIDS = {"128x128x64": (128, 128, 64), "256x256x128": (256, 256, 128)}  # 8x the voxels, same spacing


def _one_timing(args) -> dict:
    """In this process: load the models, then time one full generation or one 20 mm insertion."""
    import nibabel as nib
    import torch

    from MaisiSynthLib.cases import find_pairs
    from MaisiSynthLib.editing import ReferenceCT, check_reference_ct
    from MaisiSynthLib.lesions import random_tumor
    from MaisiSynthLib.masks import Mask
    from MaisiSynthLib.models import load_models
    from MaisiSynthLib.pipeline import default_model_dir, edit_volume, generate_volume, peak_rss_mb

    torch.set_num_threads(args.threads)
    (_, image_path, label_path), *_ = find_pairs(args.case_dir)
    image = nib.load(str(image_path))
    labels = np.asanyarray(nib.load(str(label_path)).dataobj).astype(np.int16)
    hu = check_reference_ct(np.asanyarray(image.dataobj))
    models = load_models(Path(args.model_dir) if args.model_dir else default_model_dir(), args.device)
    rss_loaded = peak_rss_mb()
    spacing = tuple(float(s) for s in image.header.get_zooms()[:3])
    edited = random_tumor(labels, L.HEPATIC_TUMOR, LESION_DIAMETER_MM / 2, spacing, np.random.default_rng(0))
    if models.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(models.device)
    started = time.perf_counter()
    if args.kind == "generate":
        ct = generate_volume(Mask(edited, image.affine), {"seed": 0, "steps": args.steps}, models=models)
    else:
        ct = edit_volume(
            ReferenceCT(hu, image.affine), Mask(edited, image.affine), {"seed": 0, "steps": args.steps},
            original=Mask(labels, image.affine), models=models,
        )  # fmt: skip
    seconds = time.perf_counter() - started
    out = {
        "kind": args.kind,
        "shape": list(hu.shape),
        "seconds": seconds,
        "timings": ct.timings,
        "rss_after_load_mb": rss_loaded,
        "peak_rss_mb": peak_rss_mb(),
        "volume_mb": round(hu.nbytes / 2**20, 1),
        "device": str(models.device),
    }
    if models.device.type == "cuda":
        out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(models.device) / 2**20, 1)
    if ct.edit:
        out["crop_shape"] = ct.edit["crop_shape"]
    return out


def timing(args) -> dict:
    """Each (grid, kind) in a fresh process, so that time and peak memory are the one call's."""
    runs = []
    for name, size in TIMING_GRIDS.items():
        folder = phantoms(ROOT / "runs" / "results" / f"edit_timing_{name}", 1, 1000, size, tumors="none")
        for kind in ("generate", "edit"):
            cmd = [sys.executable, __file__, "one-timing", "--case-dir", str(folder), "--kind", kind]
            cmd += ["--steps", str(args.steps), "--device", args.device, "--threads", str(args.threads)]
            if args.model_dir:
                cmd += ["--model-dir", args.model_dir]
            tries = []
            for _ in range(args.repeat):
                done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
                tries.append(json.loads(done.stdout.strip().splitlines()[-1]))
            # the median run (by time) stands for the kind; every run's time is kept
            run = {"grid": name, **sorted(tries, key=lambda r: r["seconds"])[len(tries) // 2]}
            run["all_seconds"] = [round(r["seconds"], 3) for r in tries]
            runs.append(run)
            print(f"{name} {kind}: {run['all_seconds']} s, peak RSS {run['peak_rss_mb']:.0f} MB", file=sys.stderr)
    by = {(r["grid"], r["kind"]): r for r in runs}
    small, large = TIMING_GRIDS
    summary = {
        "edit_over_generate_small": by[small, "edit"]["seconds"] / by[small, "generate"]["seconds"],
        "edit_large_over_small": by[large, "edit"]["seconds"] / by[small, "edit"]["seconds"],
        "generate_large_over_small": by[large, "generate"]["seconds"] / by[small, "generate"]["seconds"],
    }
    return {"settings": {"steps": args.steps, "device": args.device, "threads": args.threads}, "runs": runs,
            "summary": summary}  # fmt: skip


def print_timing(data: dict) -> None:
    print(f"{'grid':<12} {'kind':<9} {'seconds':>8} {'crop':>10} {'peak RSS MB':>12} {'volume MB':>10}")
    for r in data["runs"]:
        crop = "x".join(map(str, r.get("crop_shape", []))) or "—"
        print(
            f"{r['grid']:<12} {r['kind']:<9} {r['seconds']:8.2f} {crop:>10} {r['peak_rss_mb']:12.0f} {r['volume_mb']:10.1f}"
        )
    s = data["summary"]
    print(
        f"edit / full generation on the small grid: {s['edit_over_generate_small']:.2f}; 8x the voxels: edit "
        f"{s['edit_large_over_small']:.2f}x, full generation {s['generate_large_over_small']:.2f}x"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--cases")
    q.add_argument("--model-dir")
    q.add_argument("--device", default="cpu")
    q.add_argument("--steps", type=int, default=30)
    q.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="an edit option")
    q.add_argument("--per-case", type=int, default=2, help="lesions of each type inserted per case, one edit each")
    q.add_argument(
        "--baseline", action="store_true", help="also draw each mask as a full generation: its real lesions' shells"
    )
    q.add_argument("--json")
    t = sub.add_parser("timing")
    t.add_argument("--model-dir")
    t.add_argument("--device", default="cpu")
    t.add_argument("--steps", type=int, default=30)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--repeat", type=int, default=3, help="fresh processes per measurement; the median is reported")
    t.add_argument("--json")
    o = sub.add_parser("one-timing")  # one measurement, in its own process (used by `timing`)
    o.add_argument("--case-dir", required=True)
    o.add_argument("--kind", choices=["generate", "edit"], required=True)
    for name, default in (("--model-dir", None), ("--device", "cpu")):
        o.add_argument(name, default=default)
    o.add_argument("--steps", type=int, default=30)
    o.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.what == "one-timing":
        print(json.dumps(_one_timing(args)))
        return 0
    if args.what == "quality":
        data = quality(args)
        print_quality(data)
    else:
        data = timing(args)
        print_timing(data)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
