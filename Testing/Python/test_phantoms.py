"""Phantoms: every MAISI structure present, tumors inside their hosts, reference HU, determinism."""

from __future__ import annotations

import json
from importlib import resources

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from MaisiSynthLib.errors import OptionError
from MaisiSynthLib.phantoms import make_phantom, write_phantoms

from conftest import run_cli

REQUIRED = {
    "body": [200], "left lung upper lobe": [28], "left lung lower lobe": [29], "right lung upper lobe": [30],
    "right lung middle lobe": [31], "right lung lower lobe": [32], "pulmonary vessels": [119], "liver": [1],
    "hepatic vessel": [25], "spleen": [3], "right kidney": [5], "left kidney": [14], "pancreas": [4],
    "aorta": [6], "inferior vena cava": [7], "stomach": [12], "colon": [62],
    "vertebrae": list(range(33, 57)), "ribs": list(range(63, 87)),
    "hepatic tumor": [26], "lung tumor": [23], "pancreatic tumor": [24], "colon cancer": [27], "bone lesion": [128],
}
# Tumor → the structures that make up its host organ (an organ's own vessels lie inside it).
HOSTS = {26: [1, 25], 23: [28, 29, 30, 31, 32, 119], 24: [4], 27: [62], 128: list(range(33, 57))}
ORGANS = {"liver": [1], "spleen": [3], "pancreas": [4], "kidney": [5, 14], "lung": [28, 29, 30, 31, 32], "bone": list(range(33, 57))}


def _reference_ranges() -> dict:
    stats = json.loads(resources.files("MaisiSynthLib").joinpath("data/image_median_statistics_ct.json").read_text())
    return {k: (v["percentile_0_5"], v["percentile_99_5"]) for k, v in stats.items()}


@pytest.fixture(scope="module")
def twenty_cases(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    pairs = write_phantoms(out, 20, seed=7)
    cases = []
    for image_path, label_path in pairs:
        image, label = nib.load(str(image_path)), nib.load(str(label_path))
        cases.append((np.asanyarray(image.dataobj), np.asanyarray(label.dataobj), image, label))
    return cases


def test_twenty_cases_hold_every_structure_with_tumors_inside_their_hosts(twenty_cases):
    for index, (_, labels, image, label) in enumerate(twenty_cases):
        assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
        assert labels.shape == (128, 128, 64)
        np.testing.assert_allclose(np.diag(image.affine)[:3], (3.0, 3.0, 5.0))
        present = set(np.unique(labels).tolist())
        missing = [name for name, ids in REQUIRED.items() if not present & set(ids)]
        assert not missing, f"case {index}: missing {missing}"
        for tumor, hosts in HOSTS.items():
            lesion = labels == tumor
            # inside the host organ: within the holes-filled, 2-voxel-dilated host region
            region = ndimage.binary_fill_holes(ndimage.binary_dilation(np.isin(labels, hosts), iterations=2))
            assert region[lesion].all(), f"case {index}: tumor {tumor} leaves its host"


def test_organ_median_hu_is_inside_the_reference_range(twenty_cases):
    ranges = _reference_ranges()
    for index, (image, labels, *_) in enumerate(twenty_cases):
        for organ, ids in ORGANS.items():
            median = float(np.median(image[np.isin(labels, ids)]))
            lo, hi = ranges[organ]
            assert lo <= median <= hi, f"case {index}: {organ} median {median} outside [{lo}, {hi}]"
        assert (image[labels == 0] == -1000).all()


def test_tumors_differ_from_their_host_and_cases_differ_from_each_other(twenty_cases):
    for image, labels, *_ in twenty_cases:
        for tumor, hosts in HOSTS.items():
            host = np.isin(labels, [h for h in hosts if h not in (25, 119)])  # the organ without its vessels
            assert abs(np.median(image[labels == tumor]) - np.median(image[host])) >= 15
    labels = [case[1] for case in twenty_cases]
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            assert (labels[i] != labels[j]).mean() > 0.005, (i, j)


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path):
    a = write_phantoms(tmp_path / "a", 2, size=(64, 64, 32), spacing=(6, 6, 10), seed=3)
    b = write_phantoms(tmp_path / "b", 2, size=(64, 64, 32), spacing=(6, 6, 10), seed=3)
    c = write_phantoms(tmp_path / "c", 2, size=(64, 64, 32), spacing=(6, 6, 10), seed=4)
    for (ai, al), (bi, bl), (ci, _) in zip(a, b, c):
        assert ai.read_bytes() == bi.read_bytes() and al.read_bytes() == bl.read_bytes()
        assert ai.read_bytes() != ci.read_bytes()
    assert not list(tmp_path.rglob("*.partial*"))


def test_tumor_choice():
    assert not np.isin(make_phantom(1, tumors="none").labels, list(HOSTS)).any()
    only = make_phantom(1, tumors=[26])
    assert only.tumors == (26,) and set(np.unique(only.labels).tolist()) & set(HOSTS) == {26}
    assert set(make_phantom(2, tumors="random").tumors) <= set(HOSTS)


def test_any_grid_shows_the_same_anatomy():
    other = make_phantom(5, size=(96, 80, 48), spacing=(4.0, 4.5, 6.5))
    assert other.labels.shape == other.image.shape == (96, 80, 48)
    assert other.spacing == (4.0, 4.5, 6.5)
    assert {200, 1, 3, 28, 32} <= set(np.unique(other.labels).tolist())
    # the liver sits on the patient's right (+x in RAS) on every grid
    x = (np.arange(96) - 47.5) * 4.0
    assert x[np.nonzero(other.labels == 1)[0]].mean() > 20
    tiny = make_phantom(5, size=(32, 32, 16), spacing=(12, 12, 20))
    assert tiny.labels.shape == (32, 32, 16) and (tiny.labels == 200).any()


@pytest.mark.parametrize(
    "kwargs, word",
    [({"size": (0, 64, 64)}, "size"), ({"spacing": (3, -1, 3)}, "spacing"), ({"tumors": [99]}, "tumor"), ({"tumors": "some"}, "tumors")],
)
def test_bad_arguments_are_named(kwargs, word):
    with pytest.raises(OptionError, match=word):
        make_phantom(0, **kwargs)


def test_phantoms_command_writes_pairs_and_rejects_bad_input(tmp_path):
    result = run_cli("phantoms", "--count", "2", "--out", str(tmp_path / "p"), "--size", "48", "48", "32",
                     "--spacing", "8", "8", "10", "--tumors", "26,23")
    assert result.returncode == 0, result.stderr
    labels = nib.load(str(tmp_path / "p" / "case0001_label.nii.gz")).get_fdata()
    assert labels.shape == (48, 48, 32) and not np.isin(labels, [24, 27, 128]).any()
    bad = run_cli("phantoms", "--count", "2", "--out", str(tmp_path / "q"), "--tumors", "26,77")
    assert bad.returncode == 2 and "tumor" in bad.stderr and not (tmp_path / "q").exists()
