"""`maisi-synth evaluate` on two tiny phantom cases, every number recomputed by hand from the files."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import run_cli
from scipy import ndimage

from MaisiSynthLib.evaluation import SliceFeatures, frechet_distance, slice_stack
from MaisiSynthLib.phantoms import write_phantoms


def _array(path):
    return np.asanyarray(nib.load(str(path)).dataobj).astype(np.float64)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("eval")
    write_phantoms(root / "cases", 2, size=(64, 64, 32), spacing=(6.0, 6.0, 8.0), seed=21, tumors=[26, 23])
    result = run_cli(
        "evaluate",
        "--model-dir",
        str(tiny_model),
        "--cases",
        str(root / "cases"),
        "--steps",
        "2",
        "--save-dir",
        str(root / "synthetic"),
        "--json",
        str(root / "eval.json"),
    )
    assert result.returncode == 0, result.stderr
    return root, json.loads((root / "eval.json").read_text()), result.stdout


def test_organ_errors_and_conspicuity_match_a_hand_computation(evaluated):
    root, summary, stdout = evaluated
    assert "organ" in stdout and "ROI sensitivity" in stdout
    liver_errors, fat_errors, contrast_syn, liver_real = [], [], [], []
    for case in summary["cases"]:
        name = case["name"]
        real = _array(root / "cases" / f"{name}_image.nii.gz")
        labels = _array(root / "cases" / f"{name}_label.nii.gz")
        synthetic = _array(root / "synthetic" / f"{name}_synthetic.nii.gz")
        liver = labels == 1
        expected = abs(np.median(synthetic[liver]) - np.median(real[liver]))
        assert case["organ_error"]["liver"] == pytest.approx(expected)
        lungs = np.isin(labels, [28, 29, 30, 31, 32])
        assert case["organ_synthetic"]["lung"] == pytest.approx(np.median(synthetic[lungs]))
        fat = (labels == 200) & (real < -50)
        assert case["organ_error"]["fat"] == pytest.approx(abs(np.median(synthetic[fat]) - np.median(real[fat])))
        # hepatic tumor conspicuity: tumor median minus liver median
        tumor = labels == 26
        assert case["contrast_real"]["26"] == pytest.approx(np.median(real[tumor]) - np.median(real[liver]))
        contrast_syn.append(np.median(synthetic[tumor]) - np.median(synthetic[liver]))
        assert case["contrast_synthetic"]["26"] == pytest.approx(contrast_syn[-1])
        liver_errors.append(expected)
        liver_real.append(np.median(real[liver]))
        fat_errors.append(case["organ_error"]["fat"])
    assert summary["organ_median_abs_error_hu"]["liver"] == pytest.approx(np.mean(liver_errors))
    assert summary["organ_median_abs_error_hu"]["fat"] == pytest.approx(np.mean(fat_errors))
    # the floor: drawing the liver at the cases' median HU; two cases sit half their gap from it
    assert liver_real[0] != liver_real[1]
    floor = summary["organ_error_floor_hu"]["liver"]
    assert floor == pytest.approx(abs(liver_real[0] - liver_real[1]) / 2)
    liver_line = next(line for line in stdout.splitlines() if line.strip().startswith("liver"))
    assert liver_line.split()[-1] == f"{floor:.1f}"
    assert summary["tumor_conspicuity_hu"]["hepatic tumor"]["synthetic"] == pytest.approx(np.mean(contrast_syn))


def test_roi_sensitivity_matches_a_hand_computation(evaluated):
    root, summary, _ = evaluated
    inside, outside = [], []
    for case in summary["cases"]:
        name = case["name"]
        labels = _array(root / "cases" / f"{name}_label.nii.gz")
        with_tumor = _array(root / "synthetic" / f"{name}_synthetic.nii.gz")
        without = _array(root / "synthetic" / f"{name}_synthetic_tumor_free.nii.gz")
        free_labels = _array(root / "synthetic" / f"{name}_label_tumor_free.nii.gz")
        assert not np.isin(free_labels, [23, 26]).any() and (free_labels[labels == 26] == 1).all()
        tumors = np.isin(labels, [23, 26])
        near = ndimage.binary_dilation(tumors, iterations=3)
        diff = np.abs(with_tumor - without)
        inside.append(diff[tumors].mean())
        outside.append(diff[(labels > 0) & ~near].mean())
        assert case["roi_change"] == pytest.approx(inside[-1])
        assert case["background_change"] == pytest.approx(outside[-1])
    assert summary["roi_change_hu"] == pytest.approx(np.mean(inside))
    assert summary["background_change_hu"] == pytest.approx(np.mean(outside))
    assert set(summary["slice_frechet"]) == {"sagittal", "coronal", "axial", "mean"}
    assert all(v >= 0 for v in summary["slice_frechet"].values())


def test_frechet_distance_of_gaussians_by_hand():
    # 1-D: (μ1 − μ2)² + σ1² + σ2² − 2 σ1 σ2 = 9 + 4 + 1 − 4 = 10
    assert frechet_distance(np.array([0.0]), np.array([[4.0]]), np.array([3.0]), np.array([[1.0]])) == pytest.approx(
        10.0
    )
    # diagonal 2-D: the sum of the per-axis terms
    d = frechet_distance(np.zeros(2), np.diag([1.0, 9.0]), np.array([1.0, 0.0]), np.diag([4.0, 1.0]))
    assert d == pytest.approx((1 + 1 + 4 - 4) + (0 + 9 + 1 - 6))
    same = np.array([[2.0, 0.5], [0.5, 1.0]])
    assert frechet_distance(np.ones(2), same, np.ones(2), same) == pytest.approx(0.0, abs=1e-9)


def test_slice_features_are_fixed_by_the_seed():
    volume = np.random.default_rng(0).uniform(-1000, 1000, (32, 32, 16))
    a = SliceFeatures(0)(slice_stack(volume, 2))
    b = SliceFeatures(0)(slice_stack(volume, 2))
    c = SliceFeatures(1)(slice_stack(volume, 2))
    assert a.shape == (8, 128) and np.array_equal(a.numpy(), b.numpy()) and not np.array_equal(a.numpy(), c.numpy())
