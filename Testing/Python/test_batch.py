"""`maisi-synth batch` as curators run it: real processes, a tiny model, real files, torchrun on gloo."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import assert_kept_outside, run_cli, save_nifti, torso_labels, write_scan

from MaisiSynthLib import labels as L
from MaisiSynthLib.errors import OptionError
from MaisiSynthLib.lesions import EditRule, apply_rules, parse_rule

RULE = "insert:hepatic:6-12"


@pytest.fixture
def masks(tmp_path) -> Path:
    folder = tmp_path / "masks"
    folder.mkdir()
    save_nifti(folder / "a.nii.gz", torso_labels(tumor=None))
    save_nifti(folder / "b.nii.gz", torso_labels(tumor=26))
    save_nifti(folder / "c.nii.gz", torso_labels(tumor=None, body=False))
    return folder


def batch(masks, out, model, *extra, timeout=600):
    args = ["batch", "--masks", str(masks), "--seeds", "2", "--out", str(out), "--model-dir", str(model)]
    return run_cli(*args, "--steps", "2", "--device", "cpu", "--quiet", *extra, timeout=timeout)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_rules_parse_and_refuse_nonsense():
    assert parse_rule("insert:hepatic:10-30") == EditRule("insert", 26, None, 10.0, 30.0, 1, "insert:hepatic:10-30")
    assert parse_rule("insert:23:8:2").count == 2 and parse_rule("insert:23:8:2").min_mm == 8.0
    swap = parse_rule("swap:lung:hepatic")
    assert (swap.tumor, swap.to) == (L.LUNG_TUMOR, L.HEPATIC_TUMOR)
    assert parse_rule("remove:all").tumor is None
    for bad in ("insert:liverish:10-30", "insert:hepatic:30-10", "grow:hepatic", "swap:lung", "insert:hepatic:x"):
        with pytest.raises(OptionError):
            parse_rule(bad)


def test_edits_are_recorded_and_follow_the_rules():
    labels = torso_labels(tumor=23)
    spacing = (3.0, 3.0, 3.0)
    rng = np.random.default_rng(0)
    rules = [parse_rule("swap:lung:hepatic"), parse_rule("remove:hepatic"), parse_rule("insert:hepatic:6-9")]
    edited, done = apply_rules(labels, spacing, rules, rng)
    healed, _ = apply_rules(labels, spacing, rules[:2], np.random.default_rng(0))
    assert done[0]["swapped_voxels"] == (labels == 23).sum() > 0
    assert done[1]["removed_voxels"] == done[0]["swapped_voxels"] and not (healed == 26).any()
    lesion = edited == L.HEPATIC_TUMOR
    assert lesion.sum() == done[2]["voxels"] > 0 and (healed[lesion] == 1).all()  # inside the liver
    assert np.array_equal(edited[~lesion], healed[~lesion])
    assert 6 <= done[2]["diameter_mm"] <= 9


def test_three_masks_two_seeds_in_nnunet_layout(masks, tiny_model, tmp_path):
    out = tmp_path / "Dataset501_Synth"
    result = batch(masks, out, tiny_model, "--edit", RULE)
    assert result.returncode == 0, result.stderr
    assert "6 of 6 pairs done, 0 failed" in result.stdout
    images = sorted((out / "imagesTr").glob("*.nii.gz"))
    labels = sorted((out / "labelsTr").glob("*.nii.gz"))
    assert [p.name for p in images] == [f"{m}_s{s:03d}_0000.nii.gz" for m in "abc" for s in (0, 1)]
    assert [p.name for p in labels] == [f"{m}_s{s:03d}.nii.gz" for m in "abc" for s in (0, 1)]
    dataset = json.loads((out / "dataset.json").read_text())
    # what nnU-Net v2 documents for dataset.json and raw data
    assert dataset["channel_names"] == {"0": "CT"} and dataset["file_ending"] == ".nii.gz"
    assert dataset["numTraining"] == 6
    values = sorted(dataset["labels"].values())
    assert values == list(range(len(values))) and dataset["labels"]["background"] == 0
    tumor_value = dataset["labels"][L.name_of(L.HEPATIC_TUMOR)]
    for image, label in zip(images, labels):
        img, lab = nib.load(image), nib.load(label)
        assert img.shape == lab.shape and np.allclose(img.affine, lab.affine)
        found = set(np.unique(np.asarray(lab.dataobj)).tolist())
        assert found <= set(values) and tumor_value in found  # every pair got its inserted tumor
        assert np.asarray(img.dataobj).dtype == np.int16
    entries = manifest(out)
    assert len(entries) == 6 and all(e["status"] == "ok" for e in entries)
    weights = {p.name: digest(p) for p in tiny_model.glob("*.pt")}
    settings = digest(tiny_model / "maisi_synth.json")  # the grid and sampling defaults decide the CT too
    for e in entries:
        assert e["weights_sha256"] == weights and e["seed"] in (0, 1) and e["edits"][0]["rule"] == RULE
        assert e["settings_sha256"] == settings and e["model_inference"]["latent_prior_bone_from"] == 0.0
        assert e["image_sha256"] == digest(out / e["image"]) and e["maisi_synth"] and e["timings"]["sample"] > 0
        assert e["source_mask_sha256"] == digest(Path(e["source_mask"]))
    # seeds differ, and the same seed on another mask draws another lesion
    assert digest(images[0]) != digest(images[1])
    assert not list(out.glob("manifest.rank*")) and not (out / ".tmp").exists()


def test_nnunet_accepts_the_dataset(masks, tiny_model, tmp_path):
    verify = pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity")
    out = tmp_path / "Dataset502_Synth"
    assert batch(masks, out, tiny_model, "--edit", RULE, "--seeds", "1").returncode == 0
    verify.verify_dataset_integrity(str(out), num_processes=1)


def test_monai_datalist_loads(masks, tiny_model, tmp_path):
    from monai.data import load_decathlon_datalist

    out = tmp_path / "monai"
    result = batch(masks, out, tiny_model, "--layout", "monai", "--labels", "liver,hepatic tumor", "--edit", RULE)
    assert result.returncode == 0, result.stderr
    items = load_decathlon_datalist(str(out / "datalist.json"), True, "training", base_dir=str(out))
    assert len(items) == 6
    for item in items:
        assert Path(item["image"]).is_file() and Path(item["label"]).is_file()
        assert set(np.unique(np.asarray(nib.load(item["label"]).dataobj)).tolist()) <= {0, 1, 2}
    assert 2 in np.unique(np.asarray(nib.load(items[0]["label"]).dataobj))


def test_bad_masks_are_reported_and_the_batch_goes_on(masks, tiny_model, tmp_path):
    (masks / "broken.nii.gz").write_bytes(b"this is not a nifti")
    bad_labels = torso_labels(tumor=None)
    bad_labels[0, 0, 0] = 250  # not a MAISI id
    save_nifti(masks / "strange.nii.gz", bad_labels)
    out = tmp_path / "out"
    result = batch(masks, out, tiny_model, "--seeds", "1", "--layout", "monai")
    assert result.returncode == 1
    entries = {e["case"]: e for e in manifest(out)}
    assert entries["broken_s000"]["status"] == "failed" and entries["broken_s000"]["error_kind"] == "bad-mask"
    assert "250" in entries["strange_s000"]["reason"] and "Fix:" in entries["strange_s000"]["reason"]
    assert sum(e["status"] == "ok" for e in entries.values()) == 3
    assert len(json.loads((out / "datalist.json").read_text())["training"]) == 3
    assert not list((out / "images").glob("broken*"))


def test_a_killed_run_resumes_without_redoing_finished_pairs(masks, tiny_model, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "MaisiSynthLib", "batch", "--masks", str(masks), "--seeds", "2", "--out", str(out)]
    cmd += ["--model-dir", str(tiny_model), "--steps", "2", "--device", "cpu", "--quiet", "--edit", RULE]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        done = (out / "manifest.jsonl").read_text().count("\n") if (out / "manifest.jsonl").exists() else 0
        if done >= 2 or process.poll() is not None:
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    first = manifest(out)
    assert 2 <= len(first) < 6, "the run should have been killed halfway"
    kept = {e["case"]: (out / e["image"]).stat().st_mtime_ns for e in first}
    result = batch(masks, out, tiny_model, "--edit", RULE)
    assert result.returncode == 0, result.stderr
    assert f"({6 - len(first)} generated now)" in result.stdout
    entries = {e["case"]: e for e in manifest(out)}
    assert len(entries) == 6 and all(e["status"] == "ok" for e in entries.values())
    for case, mtime in kept.items():  # finished pairs were not written again
        assert (out / entries[case]["image"]).stat().st_mtime_ns == mtime
    # a pair whose file was damaged is redone
    victim = out / entries["a_s000"]["label"]
    victim.write_bytes(b"damaged")
    assert "(1 generated now)" in batch(masks, out, tiny_model, "--edit", RULE).stdout
    assert digest(victim) == entries["a_s000"]["label_sha256"]


def test_torchrun_two_processes_write_the_same_bytes(masks, tiny_model, tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert batch(masks, single, tiny_model, "--edit", RULE).returncode == 0
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "MaisiSynthLib",
    ]
    cmd += ["batch"]
    cmd += ["--masks", str(masks), "--seeds", "2", "--out", str(sharded), "--model-dir", str(tiny_model)]
    cmd += ["--steps", "2", "--device", "cpu", "--quiet", "--edit", RULE]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    files = lambda root: sorted(p.relative_to(root) for p in root.rglob("*.nii.gz"))  # noqa: E731
    assert files(single) == files(sharded) and len(files(single)) == 12
    for rel in files(single):
        assert digest(single / rel) == digest(sharded / rel), rel
    assert (single / "dataset.json").read_text() == (sharded / "dataset.json").read_text()
    ranks = {e["rank"] for e in manifest(sharded)}
    assert ranks == {0, 1} and len(manifest(sharded)) == 6 and not list(sharded.glob("manifest.rank*"))


def test_one_batch_per_output_folder_and_damaged_records_are_refused_before_any_work(masks, tiny_model, tmp_path):
    from MaisiSynthLib.batch import OutputLock

    out = tmp_path / "out"
    holder = OutputLock(out)
    assert holder.acquire()  # another batch is running on this folder
    try:
        result = batch(masks, out, tiny_model, "--seeds", "1")
    finally:
        holder.release()
    assert result.returncode == 2 and "another batch is writing to" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (out / "manifest.jsonl").exists()

    assert batch(masks, out, tiny_model, "--seeds", "1").returncode == 0
    lines = (out / "manifest.jsonl").read_text().splitlines()
    (out / "manifest.jsonl").write_text("\n".join([lines[0], '{"case": 7, "garbled', *lines[1:]]) + "\n")
    started = time.monotonic()
    result = batch(masks, out, tiny_model, "--seeds", "2")
    assert result.returncode == 2 and "manifest.jsonl line 2 is damaged" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not list(out.glob("imagesTr/*_s001*"))
    (out / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    (out / "label_map.json").write_text('{"layout": "nnunet", "labels": ')
    result = batch(masks, out, tiny_model, "--seeds", "2")
    assert result.returncode == 2 and "label_map.json is damaged" in result.stderr
    assert not list(out.glob("imagesTr/*_s001*")) and time.monotonic() - started < 120


def test_reference_cts_become_edited_real_cts_with_their_label_maps(tiny_model, tmp_path):
    cases = tmp_path / "real"
    for i in range(2):
        write_scan(cases, seed=10 + i)
        (cases / "ct.nii.gz").rename(cases / f"p{i}_image.nii.gz")
        (cases / "mask.nii.gz").rename(cases / f"p{i}_label.nii.gz")
    out = tmp_path / "dataset"
    args = ["batch", "--reference-cts", str(cases), "--edit", "insert:hepatic:25-30", "--out", str(out)]
    result = run_cli(*args, "--model-dir", str(tiny_model), "--steps", "2", "--layout", "monai", "--quiet")
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(e["case"] for e in entries) == ["p0_s000", "p1_s000"]
    for e in entries:
        assert e["status"] == "ok" and e["source_image"].endswith("_image.nii.gz") and e["source_image_sha256"]
        assert (
            e["edit"]["region_voxels"] > 0 and e["edit"]["crop_shape"] and e["edits"][0]["inserted"] == "hepatic tumor"
        )
        labels = np.asanyarray(nib.load(str(out / e["label"])).dataobj)
        original = np.asanyarray(nib.load(e["source_mask"]).dataobj)
        assert_kept_outside(out / e["image"], Path(e["source_image"]), labels, original)
    # nothing to edit without a rule
    refused = run_cli(
        "batch", "--reference-cts", str(cases), "--out", str(tmp_path / "none"), "--model-dir", str(tiny_model)
    )
    assert refused.returncode == 2 and "needs at least one --edit rule" in refused.stderr
    assert not (tmp_path / "none").exists()
