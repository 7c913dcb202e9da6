"""Phantoms: every MAISI structure present, tumors inside their hosts, reference HU, determinism."""

from __future__ import annotations

import json
from importlib import resources

import nibabel as nib
import numpy as np
import pytest
from conftest import run_cli
from scipy import ndimage

from MaisiSynthLib.errors import OptionError
from MaisiSynthLib.phantoms import PhantomOptionError, make_phantom, write_phantoms

REQUIRED = {
    "body": [200],
    "left lung upper lobe": [28],
    "left lung lower lobe": [29],
    "right lung upper lobe": [30],
    "right lung middle lobe": [31],
    "right lung lower lobe": [32],
    "pulmonary vessels": [119],
    "liver": [1],
    "hepatic vessel": [25],
    "spleen": [3],
    "right kidney": [5],
    "left kidney": [14],
    "pancreas": [4],
    "aorta": [6],
    "inferior vena cava": [7],
    "stomach": [12],
    "colon": [62],
    "vertebrae": list(range(33, 57)),
    "ribs": list(range(63, 87)),
    "hepatic tumor": [26],
    "lung tumor": [23],
    "pancreatic tumor": [24],
    "colon cancer": [27],
    "bone lesion": [128],
}
# Tumor → the structures that make up its host organ (an organ's own vessels lie inside it).
HOSTS = {26: [1, 25], 23: [28, 29, 30, 31, 32, 119], 24: [4], 27: [62], 128: list(range(33, 57))}
ORGANS = {
    "liver": [1],
    "spleen": [3],
    "pancreas": [4],
    "kidney": [5, 14],
    "lung": [28, 29, 30, 31, 32],
    "bone": list(range(33, 57)),
}


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
            # inside the host organ: within the holes-filled, 2-voxel-dilated host region (the lesion
            # replaces host voxels, so a plain dilation cannot reach the middle of a large one)
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
        contrast = {}
        for tumor, hosts in HOSTS.items():
            host = np.isin(labels, [h for h in hosts if h not in (25, 119)])  # the organ without its vessels
            contrast[tumor] = np.median(image[labels == tumor]) - np.median(image[host])
        # hypodense liver and pancreatic lesions (small pancreatic ones lose contrast to partial volume),
        # enhancing colon cancer, solid nodules in aerated lung, lytic or sclerotic bone lesions
        assert contrast[26] <= -20 and contrast[24] <= -8 and contrast[27] >= 20
        assert contrast[23] >= 200 and abs(contrast[128]) >= 15
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


@pytest.mark.parametrize("seed", [0, 11])
def test_a_tumor_takes_only_voxels_of_its_host(seed):
    # Tumors are placed after all organs, so the tumor-free phantom of the same seed is the same
    # anatomy: every tumor voxel must have been a host voxel there, and nothing else may change.
    with_tumors, without = make_phantom(seed, tumors="all"), make_phantom(seed, tumors="none")
    assert with_tumors.tumors == tuple(HOSTS) and without.tumors == ()
    lesions = np.isin(with_tumors.labels, list(HOSTS))
    np.testing.assert_array_equal(with_tumors.labels[~lesions], without.labels[~lesions])
    for tumor, hosts in HOSTS.items():
        lesion = with_tumors.labels == tumor
        organ = [h for h in hosts if h not in (25, 119)]  # not into the organ's vessels either
        assert lesion.any() and np.isin(without.labels[lesion], organ).all(), tumor
    # host tissue (not the edge of the field of view) surrounds every lesion
    border = np.ones(lesions.shape, bool)
    border[1:-1, 1:-1, 1:-1] = False
    assert not (lesions & border).any()


def test_tumor_choice():
    assert not np.isin(make_phantom(1, tumors="none").labels, list(HOSTS)).any()
    only = make_phantom(1, tumors=[26])
    assert only.tumors == (26,) and set(np.unique(only.labels).tolist()) & set(HOSTS) == {26}
    assert make_phantom(1, tumors=[26, 26]).tumors == (26,)  # a repeated id places one lesion
    assert make_phantom(1, tumors=[]).tumors == ()
    chosen = [make_phantom(seed, size=(48, 48, 32), spacing=(8, 8, 10), tumors="random").tumors for seed in range(6)]
    assert all(1 <= len(t) and set(t) <= set(HOSTS) for t in chosen)
    assert len(set(chosen)) > 1  # the choice depends on the seed
    again = make_phantom(3, size=(48, 48, 32), spacing=(8, 8, 10), tumors="random")
    assert again.tumors == chosen[3]


def test_any_grid_shows_the_same_anatomy():
    other = make_phantom(5, size=(96, 80, 48), spacing=(4.0, 4.5, 6.5))
    assert other.labels.shape == other.image.shape == (96, 80, 48)
    assert other.spacing == (4.0, 4.5, 6.5)
    np.testing.assert_allclose(other.affine[:3, 3], [-47.5 * 4.0, -39.5 * 4.5, -23.5 * 6.5])  # centred
    assert {200, 1, 3, 28, 32} <= set(np.unique(other.labels).tolist())
    # the liver sits on the patient's right (+x in RAS) on every grid
    x = (np.arange(96) - 47.5) * 4.0
    assert x[np.nonzero(other.labels == 1)[0]].mean() > 20
    # the lungs are at the top (high z), the colon low
    z = lambda ids: np.nonzero(np.isin(other.labels, ids))[2].mean()  # noqa: E731
    assert z([28, 29, 30, 31, 32]) > z([1]) > z([62])
    for size, spacing in [((32, 32, 16), (12, 12, 20)), ((1, 1, 1), (3, 3, 5)), ((8, 8, 8), (50, 50, 50))]:
        tiny = make_phantom(5, size=size, spacing=spacing)
        assert tiny.labels.shape == tiny.image.shape == size and (tiny.labels > 0).any()
        assert tiny.image.min() > -1024 and tiny.image.max() < 3071  # noise and blur stay bounded
        # a lesion is placed only where host tissue is left around it
        for tumor in tiny.tumors:
            assert np.isin(tiny.labels, [h for h in HOSTS[tumor] if h not in (25, 119)]).any(), (size, tumor)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"size": (0, 64, 64)}, "size"),
        ({"size": (64, 64)}, "size"),
        ({"size": (64.5, 64, 32)}, "size"),
        ({"spacing": (3, -1, 3)}, "spacing"),
        ({"spacing": (3, float("nan"), 3)}, "spacing"),
        ({"tumors": [99]}, "tumor"),
        ({"tumors": ["liver"]}, "tumor"),
        ({"tumors": 26}, "tumors"),
        ({"tumors": "some"}, "tumors"),
        ({"seed": -1}, "seed"),
        ({"count": 0}, "count"),
        ({"count": 1.5}, "count"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, word):
    out = tmp_path / "out"
    with pytest.raises(PhantomOptionError, match=word) as caught:
        write_phantoms(out, **{"count": 1, **kwargs})
    # a user error for the CLI, a ValueError for library callers; and nothing is written
    assert isinstance(caught.value, OptionError) and isinstance(caught.value, ValueError)
    assert not out.exists()
    if "count" not in kwargs:
        with pytest.raises(PhantomOptionError, match=word):
            make_phantom(**{"seed": 0, **kwargs})


def test_phantoms_command_writes_pairs_and_rejects_bad_input(tmp_path):
    result = run_cli(
        "phantoms",
        "--count",
        "2",
        "--out",
        str(tmp_path / "p"),
        "--size",
        "48",
        "48",
        "32",
        "--spacing",
        "8",
        "8",
        "10",
        "--tumors",
        "26,23",
    )
    assert result.returncode == 0, result.stderr
    labels = nib.load(str(tmp_path / "p" / "case0001_label.nii.gz")).get_fdata()
    assert labels.shape == (48, 48, 32) and not np.isin(labels, [24, 27, 128]).any()
    bad = run_cli("phantoms", "--count", "2", "--out", str(tmp_path / "q"), "--tumors", "26,77")
    assert bad.returncode == 2 and "tumor" in bad.stderr and not (tmp_path / "q").exists()


def test_fields_of_view_and_coarse_masks(tmp_path):
    """A chest field of view is the same patient seen higher up; coarse masks keep body, lobes,
    bones and lesions, with the pulmonary vessels inside their lobe."""
    torso = make_phantom(8, size=(64, 64, 40), spacing=(6.0, 6.0, 8.0), tumors="none")
    chest = make_phantom(8, size=(64, 64, 40), spacing=(6.0, 6.0, 8.0), tumors="none", centre=(0, 0, 120))
    np.testing.assert_allclose(chest.affine[:3, 3], [-31.5 * 6, -31.5 * 6, 120 - 19.5 * 8])
    # the same anatomy: slices at the same height (z = 120 + 8 k) hold the same labels
    np.testing.assert_array_equal(chest.labels[:, :, 4], torso.labels[:, :, 19])
    assert (torso.labels == 62).any() and not (chest.labels == 62).any()  # the colon is below the chest
    with pytest.raises(PhantomOptionError, match="centre"):
        make_phantom(8, centre=(0, 0))

    pairs = write_phantoms(tmp_path / "c", 2, (64, 64, 32), (6, 6, 8), seed=5, fov="chest", coarse=True, prefix="chest")
    assert [p.name for p, _ in pairs] == ["chest0000_image.nii.gz", "chest0001_image.nii.gz"]
    keep = {0, 200, 28, 29, 30, 31, 32, 114, 23, 24, 26, 27, 128, 116, 117} | set(range(33, 57)) | set(range(63, 98))
    for image_path, label_path in pairs:
        labels = np.asanyarray(nib.load(str(label_path)).dataobj)
        assert set(np.unique(labels).tolist()) <= keep | {120, 122, 127}
        assert np.isin(labels, [28, 29, 30, 31, 32]).any() and (labels == 200).any()
        assert 55 <= nib.load(str(image_path)).affine[2, 3] + 15.5 * 8 <= 95  # the grid is centred on the chest
    seen = write_phantoms(tmp_path / "v", 4, (32, 32, 16), (12, 12, 16), seed=5, fov="varied")
    spacings = [tuple(np.round(nib.load(str(p)).header.get_zooms(), 3)) for p, _ in seen]
    assert len(set(spacings)) == 4 and all(10.1 <= s[0] == s[1] <= 13.9 and 13.5 <= s[2] <= 18.5 for s in spacings)
    with pytest.raises(PhantomOptionError, match="field of view"):
        write_phantoms(tmp_path / "x", 1, fov="legs")
    assert not (tmp_path / "x").exists()
