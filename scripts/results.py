"""Regenerate the tables and plots of docs/results.md (one command per experiment).

    .venv/bin/pip install -e .[results]            # matplotlib, for the plots
    .venv/bin/python scripts/results.py contrastive  # contrastive loss on vs off (ControlNet ablation)
    .venv/bin/python scripts/results.py steps        # quality vs sampling steps, Euler vs Heun
    .venv/bin/python scripts/results.py downstream   # tumor segmentation: real vs real + synthetic
    .venv/bin/python scripts/results.py fov          # chest-only coarse and abdomen-only held-out masks
    .venv/bin/python scripts/results.py guidance     # mask guidance scale and interval
    .venv/bin/python scripts/results.py edit         # editing a reference CT: inserted/removed lesions, time

Each writes docs/results/<experiment>.json and .png and rewrites its table in docs/results.md
(between `<!-- <experiment> -->` markers). To measure a candidate before shipping it, give its folder
and another output folder: `scripts/results.py downstream --model-dir runs/x/model --out runs/x/tables`
writes the JSON and plot there, prints the table and leaves docs/ alone (docs/ shows the shipped
demo model only). Experiments share their work folders under runs/results: run one at a time. Held-out cases are phantoms from seed 1000 (never used in
training), written to runs/results/heldout on first use. Everything runs on the CPU; wall times on
2 cores are in docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from MaisiSynthLib import labels as L  # noqa: E402
from MaisiSynthLib.evaluation import evaluate  # noqa: E402
from MaisiSynthLib.models import AUTOENCODER_FILE, CONFIG_NAME, PRIOR_FILE, SETTINGS_NAME, UNET_FILE  # noqa: E402

DEMO = ROOT / "Resources" / "models" / "demo"
RUNS = ROOT / "runs" / "results"
DOCS = ROOT / "docs"
OUT = DOCS / "results"
GRID = ["--size", "128", "128", "64", "--spacing", "3", "3", "5"]


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "MaisiSynthLib", *args], cwd=ROOT, check=True)


def phantoms(folder: Path, count: int, seed: int, *options: str) -> Path:
    """`count` phantom pairs from `seed` in `folder` (written once; deterministic by seed)."""
    if len(list(folder.glob("*_label.nii.gz"))) != count:
        shutil.rmtree(folder, ignore_errors=True)
        cli("phantoms", "--count", str(count), "--out", str(folder), "--seed", str(seed), *(options or GRID))
    return folder


def heldout(count: int) -> Path:
    return phantoms(RUNS / f"heldout{count}", count, 1000)


# Held-out masks of the kinds users bring (never trained on; the seeds are not training seeds). The
# chest set is coarse (body, lobes, bones, one lung tumor) on a grid the model never trained at.
FOV_SETS = {
    "torso, full mask": ("heldout", 1000, GRID),
    "chest only, coarse mask": (
        "chest_coarse",
        3000,
        ["--size", "144", "144", "64", "--spacing", "2.6", "2.6", "4.4", "--fov", "chest", "--coarse",
         "--tumors", "23"],
    ),
    "abdomen only, full mask": ("abdomen", 4000, ["--size", "128", "128", "48", "--spacing", "3", "3", "5",
                                                   "--fov", "abdomen"]),
}  # fmt: skip


def save_plot(fig, name: str, args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / f"{name}.png", dpi=110)


def write_result(name: str, data: dict, table: str, args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(data, indent=2, default=float) + "\n", encoding="utf-8")
    if not args.docs:  # a candidate model: its numbers go to --out only, docs/ keeps the shipped model's
        print(table.strip(), flush=True)
        log(f"wrote {args.out / name}.json for {args.model} (docs/results.md untouched)")
        return
    doc = DOCS / "results.md"
    text = doc.read_text(encoding="utf-8")
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{start}\n{table.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"docs/results.md has no {start} … {end} markers for the {name} table")
    doc.write_text(pattern.sub(lambda _: block, text), encoding="utf-8")
    log(f"wrote docs/results/{name}.json and the {name} table in docs/results.md")


def fmt(value, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------------
# Contrastive loss on vs off


def train_controlnet(base: Path, folder: Path, contrastive: bool, steps: int | None) -> Path:
    """A ControlNet on `base`'s VAE + UNet with its training settings (train.json), contrastive on or off."""
    model = folder / "model"
    if (model / "controlnet_3d_rflow-ct.pt").is_file():
        return model
    shutil.rmtree(folder, ignore_errors=True)
    model.mkdir(parents=True)
    for name in (AUTOENCODER_FILE, UNET_FILE, CONFIG_NAME, SETTINGS_NAME):
        shutil.copyfile(base / name, model / name)
    if (base / PRIOR_FILE).is_file():  # optional; without it the stage drops the settings that use it
        shutil.copyfile(base / PRIOR_FILE, model / PRIOR_FILE)
    overrides = [f"output_dir={folder}", f"model_dir={model}", f"controlnet.contrastive={str(contrastive).lower()}"]
    if steps is not None:
        overrides.append(f"controlnet.steps={steps}")
    args = ["train", "controlnet", "--config", str(base / "train.json"), "--quiet"]
    for item in overrides:
        args += ["--set", item]
    log(f"training the contrastive={'on' if contrastive else 'off'} ControlNet in {folder}")
    cli(*args)
    return model


def contrastive(args) -> None:
    cases = heldout(args.cases)
    variants = {}
    if args.on:  # a ControlNet trained elsewhere with the same schedule as `--off`
        variants["on"] = args.on
    elif args.retrain:
        variants["on"] = train_controlnet(args.model, RUNS / "contrastive_on", True, args.steps)
    else:  # the shipped ControlNet was trained by scripts/train_demo.sh with exactly these settings
        variants["on"] = args.model
    variants["off"] = args.off or train_controlnet(args.model, RUNS / "contrastive_off", False, args.steps)
    data = {}
    for name, model in variants.items():
        log(f"evaluating contrastive {name} ({model}) on {cases}")
        data[name] = evaluate(model, cases, seed=args.seed, save_dir=RUNS / f"eval_contrastive_{name}")
        data[name].pop("cases")
    tumors = list(data["on"]["tumor_conspicuity_hu"])
    rows = [
        "| contrastive loss | ROI change inside tumors (HU) | background change (HU) | "
        + " | ".join(f"{t} conspicuity, synthetic / real (HU)" for t in tumors)
        + " |",
        "|---|---|---|" + "---|" * len(tumors),
    ]
    for name in ("on", "off"):
        s = data[name]
        cells = [
            f"{fmt(s['tumor_conspicuity_hu'][t]['synthetic'])} / {fmt(s['tumor_conspicuity_hu'][t]['real'])}"
            for t in tumors
        ]
        rows.append(
            f"| {name} | {fmt(s['roi_change_hu'])} | {fmt(s['background_change_hu'])} | " + " | ".join(cells) + " |"
        )
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].bar(["ROI on", "ROI off", "bg on", "bg off"], [
        data["on"]["roi_change_hu"], data["off"]["roi_change_hu"],
        data["on"]["background_change_hu"], data["off"]["background_change_hu"],
    ], color=["tab:red", "tab:gray", "tab:red", "tab:gray"])  # fmt: skip
    axes[0].set_ylabel("mean |CT(mask) − CT(tumor-free mask)| (HU)")
    x = np.arange(len(tumors))
    real = [data["on"]["tumor_conspicuity_hu"][t]["real"] for t in tumors]
    for offset, name, color in ((-0.27, "on", "tab:red"), (0.0, "off", "tab:gray")):
        axes[1].bar(x + offset, [data[name]["tumor_conspicuity_hu"][t]["synthetic"] for t in tumors], 0.27,
                    label=f"synthetic, contrastive {name}", color=color)  # fmt: skip
    axes[1].bar(x + 0.27, real, 0.27, label="real phantom", color="tab:blue")
    axes[1].set_xticks(x, [t.replace(" ", "\n", 1) for t in tumors], fontsize=7)
    axes[1].set_ylabel("tumor − host median HU")
    axes[1].axhline(0, color="black", lw=0.5)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    save_plot(fig, "contrastive", args)
    write_result("contrastive", data, "\n".join(rows), args)


# ---------------------------------------------------------------------------------------------------
# Quality vs steps


def steps(args) -> None:
    cases = heldout(args.cases)
    data = {}
    for solver in args.solvers:
        for n in args.steps:
            log(f"{solver}, {n} steps")
            started = time.perf_counter()
            s = evaluate(args.model, cases, steps=n, seed=args.seed, solver=solver, roi=False)
            s.pop("cases")
            s["seconds_per_case"] = (time.perf_counter() - started) / args.cases
            data[f"{solver}_{n}"] = s
    rows = [
        "| solver | steps | network evaluations | slice Fréchet distance (mean of 3 planes) | "
        "mean organ median HU error | seconds per case |",
        "|---|---|---|---|---|---|",
    ]
    evals = {"euler": 1, "heun": 2}
    for solver in args.solvers:
        for n in args.steps:
            s = data[f"{solver}_{n}"]
            frechet = float(np.mean(list(s["slice_frechet"].values())))
            organ = [v for v in s["organ_median_abs_error_hu"].values() if v is not None]
            s["slice_frechet_mean"] = frechet
            s["organ_error_mean"] = float(np.mean(organ))
            nfe = n * evals[solver]
            rows.append(
                f"| {solver} | {n} | {nfe} | {frechet:.3f} | {np.mean(organ):.1f} | {s['seconds_per_case']:.1f} |"
            )
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for solver in args.solvers:
        xs = list(args.steps)
        axes[0].plot(xs, [data[f"{solver}_{n}"]["slice_frechet_mean"] for n in xs], "o-", label=solver)
        axes[1].plot(xs, [data[f"{solver}_{n}"]["organ_error_mean"] for n in xs], "o-", label=solver)
    axes[0].set_ylabel("slice Fréchet distance (lower is closer)")
    axes[1].set_ylabel("mean organ median |HU error|")
    for ax in axes:
        ax.set_xlabel("sampling steps")
        ax.set_xscale("log")
        ax.set_xticks(args.steps, [str(n) for n in args.steps])
        ax.minorticks_off()
        ax.legend()
    fig.tight_layout()
    save_plot(fig, "steps", args)
    write_result("steps", data, "\n".join(rows), args)


# ---------------------------------------------------------------------------------------------------
# Downstream tumor segmentation


def random_lesions(labels: np.ndarray, spacing, rng: np.random.Generator) -> np.ndarray:
    """1-3 lesions of random types and sizes inserted into a tumor-free mask."""
    from MaisiSynthLib.lesions import random_tumor
    from MaisiSynthLib.phantoms import TUMOR_CHOICES

    radii = {L.HEPATIC_TUMOR: (6, 18), L.LUNG_TUMOR: (5, 12), L.PANCREATIC_TUMOR: (6, 10)}
    for tumor in rng.choice(TUMOR_CHOICES, size=int(rng.integers(1, 4)), replace=False):
        low, high = radii.get(int(tumor), (7, 12))
        labels = random_tumor(labels, int(tumor), float(rng.uniform(low, high)), spacing, rng)
    return labels


def edited_masks(real: Path, out: Path, per_case: int, seed: int) -> list[Path]:
    """Masks of the real cases with their tumors removed and new ones inserted elsewhere, each a
    random type and size (the paper's tumor-inserted masks)."""
    import nibabel as nib

    from MaisiSynthLib.masks import remove_tumors

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for label_path in sorted(real.glob("*_label.nii.gz")):
        nifti = nib.load(str(label_path))
        spacing = nifti.header.get_zooms()[:3]
        base = remove_tumors(np.asanyarray(nifti.dataobj).astype(np.int16))
        for k in range(per_case):
            labels = random_lesions(base, spacing, rng)
            path = out / f"{label_path.name.replace('_label.nii.gz', '')}_edit{k}_label.nii.gz"
            nib.save(nib.Nifti1Image(labels, nifti.affine), str(path))
            paths.append(path)
    return paths


def synthesize(masks: list[Path], folder: Path, model_dir: Path) -> Path:
    """CTs from the model in `model_dir` for `masks`, as *_image/*_label pairs in `folder`.

    Always drawn anew (≈ 10 s each): CTs left there by an earlier model would measure that model.
    """
    from MaisiSynthLib.models import load_models
    from MaisiSynthLib.pipeline import GenerateRequest, generate

    models = load_models(model_dir, "auto")
    for i, mask in enumerate(masks):
        name = mask.name.replace("_label.nii.gz", "")
        generate(
            GenerateRequest(mask=mask, output=folder / f"{name}_image.nii.gz", model_dir=model_dir, seed=i),
            models=models,
        )
    return folder


def inserted(free: Path, out: Path, model_dir: Path, seed: int) -> Path:
    """Real tumor-free cases, each with 1-3 lesions inserted by an edit of its CT (the scan kept
    outside the lesions and their margin): *_image/*_label pairs in `out`, drawn anew every time."""
    import nibabel as nib

    from MaisiSynthLib.cases import find_pairs
    from MaisiSynthLib.editing import ReferenceCT, check_reference_ct
    from MaisiSynthLib.masks import Mask
    from MaisiSynthLib.models import load_models
    from MaisiSynthLib.pipeline import edit_volume

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    models = load_models(model_dir, "auto")
    rng = np.random.default_rng(seed)
    for i, (name, image_path, label_path) in enumerate(find_pairs(free)):
        image, nifti = nib.load(str(image_path)), nib.load(str(label_path))
        labels = np.asanyarray(nifti.dataobj).astype(np.int16)
        edited = random_lesions(labels, nifti.header.get_zooms()[:3], rng)
        reference = ReferenceCT(check_reference_ct(np.asanyarray(image.dataobj)), image.affine)
        ct = edit_volume(reference, Mask(edited, image.affine), {"seed": i}, original=Mask(labels, image.affine),
                         models=models)  # fmt: skip
        nib.save(nib.Nifti1Image(ct.hu, image.affine), str(out / f"{name}_image.nii.gz"))
        nib.save(nib.Nifti1Image(edited, image.affine), str(out / f"{name}_label.nii.gz"))
    return out


def load_pairs(folder: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    from MaisiSynthLib.cases import find_pairs
    from MaisiSynthLib.evaluation import load_canonical

    pairs = []
    for _, image_path, label_path in find_pairs(folder):
        image = load_canonical(image_path)[0].astype(np.float32)
        labels = load_canonical(label_path)[0].astype(np.int16)
        pairs.append((np.clip((image + 1000.0) / 2000.0, 0.0, 1.0), np.isin(labels, L.TUMORS)))
    return pairs


def train_segmenter(pairs, steps: int, seed: int):
    """A small MONAI 3-D UNet for tumor vs rest, on 64×64×32 patches, half of them centred on a tumor."""
    import torch
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = UNet(3, 1, 2, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1)
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    patch = np.array([64, 64, 32])
    for _ in range(steps):
        xs, ys = [], []
        for _ in range(2):
            image, tumor = pairs[int(rng.integers(len(pairs)))]
            shape = np.array(image.shape)
            if rng.random() < 0.5 and tumor.any():
                centre = np.argwhere(tumor)[int(rng.integers(int(tumor.sum())))]
            else:
                centre = rng.integers(0, shape)
            lo = np.clip(centre - patch // 2, 0, shape - patch)
            box = tuple(slice(a, a + p) for a, p in zip(lo, patch))
            xs.append(image[box])
            ys.append(tumor[box])
        x = torch.from_numpy(np.stack(xs))[:, None]
        y = torch.from_numpy(np.stack(ys).astype(np.int64))[:, None]
        loss = loss_fn(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def dice_scores(net, pairs) -> list[float]:
    import torch

    scores = []
    with torch.no_grad():
        for image, tumor in pairs:
            pred = net(torch.from_numpy(image)[None, None]).argmax(1)[0].numpy().astype(bool)
            scores.append(2.0 * float((pred & tumor).sum()) / max(1.0, float(pred.sum() + tumor.sum())))
    return scores


def downstream(args) -> None:
    import torch

    torch.set_num_threads(torch.get_num_threads())
    real_dir = phantoms(RUNS / f"downstream_real{args.real}", args.real, 2000)
    masks = edited_masks(real_dir, RUNS / "downstream_edited_masks", args.synthetic // args.real, args.seed)
    synthetic_dir = synthesize(masks, RUNS / "downstream_edited_masks", args.model)
    free_dir = phantoms(RUNS / f"downstream_free{args.free}", args.free, 5000, *GRID, "--tumors", "none")
    inserted_dir = inserted(free_dir, RUNS / "downstream_inserted", args.model, args.seed)
    test = load_pairs(heldout(args.cases))
    real = load_pairs(real_dir)
    synthetic = load_pairs(synthetic_dir)
    edited = load_pairs(inserted_dir)
    arms = {
        "real": real,
        "real + synthetic": real + synthetic,
        "real + tumor-free real with inserted tumors": real + edited,
    }
    data = {"settings": vars(args).copy(), "runs": []}
    for key in ("run", "model", "out", "docs") + (("model_dir",) if args.docs else ()):
        data["settings"].pop(key, None)
    if not args.docs:
        data["settings"]["model_dir"] = str(args.model)
    for seed in args.seeds:
        for name, train in arms.items():
            log(f"segmenter on {name} ({len(train)} cases), seed {seed}")
            scores = dice_scores(train_segmenter(train, args.train_steps, seed), test)
            data["runs"].append({"data": name, "seed": seed, "dice": scores, "mean_dice": float(np.mean(scores))})
    rows = [
        "| training data | cases | tumor Dice per seed | mean ± sd over seeds |",
        "|---|---|---|---|",
    ]
    summary = {}
    for name, train in arms.items():
        count = len(train)
        means = [r["mean_dice"] for r in data["runs"] if r["data"] == name]
        summary[name] = means
        rows.append(
            f"| {name} | {count} | {', '.join(f'{m:.3f}' for m in means)} | "
            f"{np.mean(means):.3f} ± {np.std(means, ddof=1) if len(means) > 1 else 0.0:.3f} |"
        )
    data["summary"] = summary
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, means in enumerate(summary.values()):
        ax.scatter([i] * len(means), means, color="black", zorder=3)
        ax.bar(i, np.mean(means), color=["tab:blue", "tab:red", "tab:green"][i], alpha=0.6)
    ax.set_xticks(
        range(len(summary)), [f"{k.replace(' with ', chr(10) + 'with ')}\n({len(arms[k])} cases)" for k in summary]
    )
    ax.set_ylabel("tumor Dice on held-out phantoms")
    fig.tight_layout()
    save_plot(fig, "downstream", args)
    write_result("downstream", data, "\n".join(rows), args)


# ---------------------------------------------------------------------------------------------------
# Fields of view and coarse masks


def fov(args) -> None:
    columns = ["lung", "soft tissue", "bone", "liver", "kidneys", "vertebrae"]
    data = {}
    for name, (folder, seed, options) in FOV_SETS.items():
        cases = phantoms(RUNS / f"{folder}{args.cases}", args.cases, seed, *options)
        log(f"evaluating {name} ({cases})")
        summary = evaluate(args.model, cases, seed=args.seed, save_dir=RUNS / f"eval_fov_{folder}")
        summary.pop("cases")
        data[name] = summary
    tumors = sorted({t for s in data.values() for t in s["tumor_conspicuity_hu"]})
    rows = [
        "| masks | " + " | ".join(f"{c} |error|" for c in columns) + " | "
        + " | ".join(f"{t} conspicuity, synthetic / real" for t in tumors) + " | ROI / background change |",
        "|---|" + "---|" * (len(columns) + len(tumors) + 1),
    ]  # fmt: skip
    for name, s in data.items():
        organ = [fmt(s["organ_median_abs_error_hu"].get(c)) for c in columns]
        contrast = []
        for t in tumors:
            c = s["tumor_conspicuity_hu"].get(t)
            contrast.append("—" if c is None else f"{fmt(c['synthetic'])} / {fmt(c['real'])}")
        roi = f"{fmt(s['roi_change_hu'])} / {fmt(s['background_change_hu'])}"
        rows.append(f"| {name} | " + " | ".join(organ + contrast) + f" | {roi} |")
    # what no mask-only model beats on these cases: each organ at the real cases' median HU
    for name, s in data.items():
        floor = [fmt(s["organ_error_floor_hu"].get(c)) for c in columns]
        rows.append(f"| floor, {name} | " + " | ".join(floor + ["—"] * (len(tumors) + 1)) + " |")
    write_result("fov", data, "\n".join(rows), args)


# ---------------------------------------------------------------------------------------------------
# Mask guidance


def model_variant(model_dir: Path, folder: Path, guidance_from: float) -> Path:
    """A copy of `model_dir` with another `mask_guidance_from` (a model setting, not a request field)."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(model_dir, folder)
    settings = json.loads((folder / SETTINGS_NAME).read_text(encoding="utf-8"))
    settings.setdefault("inference", {})["mask_guidance_from"] = guidance_from
    (folder / SETTINGS_NAME).write_text(json.dumps(settings, indent=2), encoding="utf-8")
    return folder


def guidance(args) -> None:
    """Chosen on the validation torsos (seed 5000), reported on the held-out ones (seed 1000)."""
    organs = ["liver", "spleen", "kidneys", "pancreas", "lung", "muscle", "fat", "vertebrae"]
    sets = {
        "validation (4 torsos, seed 5000)": (phantoms(RUNS / "validation4", 4, 5000), False),
        "held-out (8 torsos, seed 1000)": (heldout(args.cases), True),
    }
    data: dict = {}
    rows = [
        "| cases | scale | from t/T | " + " | ".join(f"{o} |error|" for o in organs)
        + " | spleen / kidneys signed | tumors: lung / pancreatic / hepatic / colon / bone, synthetic ÷ real"
        + " | ROI / background | slice Fréchet | s per case |",
        "|---|---|---|" + "---|" * (len(organs) + 5),
    ]  # fmt: skip
    for set_name, (cases, roi) in sets.items():
        for scale, start in args.variants:
            model = model_variant(args.model, RUNS / f"guidance_from{start}", start)
            log(f"{set_name}: mask guidance {scale} from t = {start} T")
            t0 = time.perf_counter()
            s = evaluate(model, cases, seed=args.seed, roi=roi, mask_guidance=scale)
            seconds = (time.perf_counter() - t0) / len(s["cases"])
            s.pop("cases")
            s["seconds_per_case"] = seconds
            data[f"{set_name}, {scale}, {start}"] = s
            err, signed = s["organ_median_abs_error_hu"], s["organ_median_signed_error_hu"]
            ratios = []
            for t in ("lung tumor", "pancreatic tumor", "hepatic tumor", "colon cancer primaries", "bone lesion"):
                c = s["tumor_conspicuity_hu"].get(t)
                ratios.append("—" if c is None or not c["real"] else f"{c['synthetic'] / c['real']:.2f}")
            roi_text = f"{fmt(s['roi_change_hu'])} / {fmt(s['background_change_hu'])}" if roi else "—"
            rows.append(
                f"| {set_name} | {scale:g} | {start:g} | " + " | ".join(fmt(err.get(o)) for o in organs)
                + f" | {fmt(signed.get('spleen'))} / {fmt(signed.get('kidneys'))} | " + " / ".join(ratios)
                + f" | {roi_text} | {fmt(s['slice_frechet'].get('mean'), 4)} | {seconds:.1f} |"
            )  # fmt: skip
    write_result("guidance", data, "\n".join(rows), args)


# ---------------------------------------------------------------------------------------------------
# Editing a reference CT

# What else was tried, each against the shipped settings (editing.EditSettings), on the same edits
EDIT_VARIANTS = {
    "shipped": {},
    "margin 10 mm for every tumor type": {"edit_margin_mm": 10},
    "margin 15 mm for every tumor type": {"edit_margin_mm": 15},
    "margin 20 mm for every tumor type": {"edit_margin_mm": 20},
    "patient latent levels once (0.6 T)": {"patient_levels": [0.6]},
    "no image-space level correction": {"level_correction": False},
    "no patient levels (latent or image; the model's prior inside the region)": {
        "patient_levels": [],
        "level_correction": False,
    },
    "no noise matching": {"noise_match": False},
    "softer latent blend (ring held at 0.5)": {"latent_blend": 0.5},
    "RePaint harmonisation (1 jump per step)": {"harmonize": 1},
}


def benchmark(*args: str) -> dict:
    """benchmarks/reference_edit.py with these arguments; its JSON."""
    target = RUNS / "edit_benchmark.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reference_edit.py"), *args, "--json", str(target)],
                   cwd=ROOT, check=True)  # fmt: skip
    return json.loads(target.read_text())


def edit(args) -> None:
    """The held-out torsos with lesions inserted and removed (benchmarks/reference_edit.py quality),
    each variant of EDIT_VARIANTS, and the time of one insertion against a full generation."""
    data: dict = {"variants": {}}
    cases = str(heldout(8))
    log("edit timing")  # first: the other runs must not share the machine with it
    data["timing"] = benchmark("timing", "--model-dir", str(args.model), "--threads", str(args.threads))
    for name, options in EDIT_VARIANTS.items():
        if name != "shipped" and not args.variants:
            continue
        log(f"edit quality: {name}")
        sets = [f"--set={key}={json.dumps(value)}" for key, value in options.items()]
        sets += ["--baseline"] if name == "shipped" else []
        data["variants"][name] = benchmark("quality", "--cases", cases, "--model-dir", str(args.model), *sets)
    write_result("edit", data, edit_table(data), args)


def _contrast_ratio(result: dict, tumor: str) -> str:
    """Drawn ÷ real contrast; for bone lesions, which the phantoms make lytic or sclerotic at random
    (the mask cannot say which), the ratio of the mean magnitudes, marked |·|."""
    summary = result["summary"][tumor]
    if tumor != L.name_of(L.BONE_LESION):
        return fmt(summary["ratio"], 2)
    rows = [r for r in result["rows"] if r["tumor"] == tumor]
    drawn = np.mean([abs(r["contrast"]) for r in rows])
    real = np.mean([abs(r["real_contrast"]) for r in rows if r.get("real_contrast") is not None])
    return f"\\|{drawn / real:.2f}\\|"


def edit_table(data: dict) -> str:
    shipped_result = data["variants"]["shipped"]
    shipped = shipped_result["summary"]
    rows = [
        "| tumor type | outside max \\|Δ\\| HU | inserted contrast HU | real HU | ratio | host shell \\|Δ\\| HU "
        "(real lesions: in the scan / in a full generation) | seam ratio (the scan's) | removal \\|Δ\\| HU: "
        "host median (host within 10 mm) | s per edit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for tumor, r in shipped.items():
        rows.append(
            f"| {tumor} | {fmt(r['outside_max_abs_hu'], 0)} | {fmt(r['contrast_hu'], 0)} | {fmt(r['real_contrast_hu'], 0)} "
            f"| {_contrast_ratio(shipped_result, tumor)} | {fmt(r['shell_mean_abs_hu'])} ({fmt(r['real_shell_hu'])} / "
            f"{fmt(r.get('full_generation_shell_hu'))}) "
            f"| {fmt(r['seam'], 2)} ({fmt(r['seam_reference'], 2)}) | {fmt(r['removal_mean_abs_hu'])} "
            f"({fmt(r['removal_local_mean_abs_hu'])}) | {fmt(r['seconds'])} |"
        )  # fmt: skip
    if len(data["variants"]) > 1:
        rows += ["", "| variant | contrast ratio: hepatic / pancreatic / colon / lung / bone | shell \\|Δ\\| HU, mean "
                 "| seam ratio, mean | removal \\|Δ\\| HU, mean |", "|---|---|---|---|---|"]  # fmt: skip
        for name, result in data["variants"].items():
            summary = list(result["summary"].values())
            ratios = " / ".join(_contrast_ratio(result, tumor) for tumor in result["summary"])
            means = [
                fmt(float(np.mean([r[key] for r in summary if r[key] is not None])))
                for key in ("shell_mean_abs_hu", "seam", "removal_mean_abs_hu")
            ]
            rows.append(f"| {name} | {ratios} | {' | '.join(means)} |")
    t = data["timing"]
    rows += ["", "| grid | full generation s | one 20 mm lesion inserted s | crop | peak RSS MB: generation / edit |",
             "|---|---|---|---|---|"]  # fmt: skip
    by = {(r["grid"], r["kind"]): r for r in t["runs"]}
    for grid in dict.fromkeys(r["grid"] for r in t["runs"]):
        g, e = by[grid, "generate"], by[grid, "edit"]
        rows.append(f"| {grid} | {g['seconds']:.1f} | {e['seconds']:.1f} | {'x'.join(map(str, e['crop_shape']))} "
                    f"| {g['peak_rss_mb']:.0f} / {e['peak_rss_mb']:.0f} |")  # fmt: skip
    s = t["summary"]
    rows.append(
        f"\nInsertion ÷ full generation on 128×128×64: {s['edit_over_generate_small']:.2f}; with 8× the voxels "
        f"the insertion takes {s['edit_large_over_small']:.2f}× as long, a full generation "
        f"{s['generate_large_over_small']:.2f}×."
    )
    return "\n".join(rows)


def edit_table_only(args) -> None:
    """The edit table again from its JSON (after a change of layout; nothing is measured)."""
    data = json.loads((args.out / "edit.json").read_text(encoding="utf-8"))
    write_result("edit", data, edit_table(data), args)


def resolve_target(args) -> None:
    """Which model to measure and where its numbers go. Only the demo model with the default output
    rewrites docs/: a candidate measured here must not overwrite the shipped model's tables."""
    from MaisiSynthLib.models import CONTROLNET_FILE

    args.model = (args.model_dir or DEMO).resolve()
    missing = [n for n in (AUTOENCODER_FILE, UNET_FILE, CONTROLNET_FILE, CONFIG_NAME) if not (args.model / n).is_file()]
    if missing:
        raise ValueError(
            f"{args.model} is not a model folder (no {', '.join(missing)}). Fix: give --model-dir a folder "
            "written by `maisi-synth train` or Resources/models/demo"
        )
    if args.model_dir is not None and args.model != DEMO.resolve() and args.out is None:
        raise ValueError(
            "--model-dir other than the demo needs --out DIR. Fix: add e.g. --out runs/results/candidate "
            "(docs/ only ever shows the shipped demo model)"
        )
    args.docs = args.out is None
    args.out = (args.out or OUT).resolve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = argparse.ArgumentParser(add_help=False)
    target.add_argument(
        "--model-dir", type=Path, help="measure this model folder instead of the demo (needs --out; docs/ untouched)"
    )
    target.add_argument("--out", type=Path, help="folder for the JSON and plot (default: docs/results)")
    sub = parser.add_subparsers(dest="experiment", required=True)
    p = sub.add_parser("contrastive", parents=[target], help="ControlNet trained with vs without the contrastive loss")
    p.add_argument("--cases", type=int, default=8, help="held-out phantoms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="ControlNet training steps (default: the demo's)")
    p.add_argument(
        "--retrain", action="store_true", help="also retrain the contrastive ControlNet (else the shipped one)"
    )
    p.add_argument(
        "--on", type=Path, help="model folder of an already trained contrastive ControlNet (instead of the shipped one)"
    )
    p.add_argument(
        "--off", type=Path, help="model folder of an already trained ControlNet without the loss (skip training it)"
    )
    p.set_defaults(run=contrastive)
    p = sub.add_parser("steps", parents=[target], help="slice Fréchet distance and organ HU error vs sampling steps")
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 30, 50])
    p.add_argument("--solvers", nargs="+", default=["euler", "heun"])
    p.set_defaults(run=steps)
    p = sub.add_parser(
        "downstream", parents=[target], help="tumor segmentation trained on real vs real + synthetic phantoms"
    )
    p.add_argument("--real", type=int, default=4, help="real phantoms for training (seed 2000)")
    p.add_argument("--synthetic", type=int, default=8, help="synthetic cases from edited real masks")
    p.add_argument(
        "--free", type=int, default=8, help="tumor-free real phantoms (seed 5000) given inserted tumors by an edit"
    )
    p.add_argument("--cases", type=int, default=8, help="held-out test phantoms")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0, help="seed of the mask edits")
    p.set_defaults(run=downstream)
    p = sub.add_parser("edit", parents=[target], help="editing a reference CT: lesions inserted and removed, time")
    p.add_argument("--no-variants", dest="variants", action="store_false", help="only the shipped settings")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the timing runs")
    p.add_argument("--table-only", action="store_true", help="rewrite the table from the JSON, measure nothing")
    p.set_defaults(run=edit)
    p = sub.add_parser("fov", parents=[target], help="held-out masks of other kinds: chest-only coarse, abdomen-only")
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=fov)
    p = sub.add_parser(
        "guidance", parents=[target], help="mask guidance: scale and interval, validation and held-out torsos"
    )
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--variants",
        type=lambda text: tuple(float(v) for v in text.split(":")),
        nargs="+",
        default=[(1.0, 0.5), (1.5, 0.5), (2.0, 0.5), (3.0, 0.5), (2.0, 0.0)],
        metavar="SCALE:FROM",
        help="mask guidance scale and the t/T it starts from",
    )
    p.set_defaults(run=guidance)
    args = parser.parse_args(argv)
    try:
        resolve_target(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if getattr(args, "table_only", False):
        edit_table_only(args)
        return 0
    args.run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
