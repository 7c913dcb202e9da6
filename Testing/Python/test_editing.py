"""Editing a reference CT: the scan is kept outside the edit region, bit for bit, on every grid; bad
input is refused before any model loads. Real files, the real CLI (in a subprocess where the result
is checked, in-process for the refusals), tiny random MAISI networks."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import run_cli, write_scan
from scipy import ndimage

from MaisiSynthLib import cli
from MaisiSynthLib import labels as L
from MaisiSynthLib.editing import (
    EDIT_MARGIN_MM,
    CanonicalView,
    check_reference_ct,
    composite,
    edit_region,
    match_levels,
    match_noise,
    plan_crop,
)
from MaisiSynthLib.errors import MaskError
from MaisiSynthLib.grid import GridRules
from MaisiSynthLib.phantoms import make_phantom

SPACING = (6.0, 6.0, 8.0)


def phantom_affine(shape, spacing) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -np.array(spacing) * (np.array(shape) - 1) / 2
    return affine


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """A phantom CT (int16 HU) and its mask without tumors, 64 x 64 x 32 voxels of 6 x 6 x 8 mm."""
    return write_scan(tmp_path_factory.mktemp("scan"))


def far_from(changed: np.ndarray, spacing, mm: float) -> np.ndarray:
    """Voxels more than `mm` from every changed voxel (the test's own region rule, not the engine's)."""
    return ndimage.distance_transform_edt(~changed, sampling=spacing) > mm


def test_an_edit_keeps_the_reference_bit_for_bit_outside_the_region(scan, tiny_model, tmp_path):
    out, labels_out, preview = tmp_path / "edited.nii.gz", tmp_path / "edited_label.nii.gz", tmp_path / "p.png"
    result = run_cli(
        "generate", "--mask", str(scan / "mask.nii.gz"), "--reference-ct", str(scan / "ct.nii.gz"),
        "--edit", "insert:hepatic:30", "--output", str(out), "--label-output", str(labels_out),
        "--preview", str(preview), "--model-dir", str(tiny_model), "--steps", "3", "--device", "cpu", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    reference = nib.load(str(scan / "ct.nii.gz"))
    written = nib.load(str(out))
    assert written.get_data_dtype() == np.int16 and np.array_equal(written.affine, reference.affine)
    ct, ref = np.asanyarray(written.dataobj), np.asanyarray(reference.dataobj)
    original = np.asanyarray(nib.load(str(scan / "mask.nii.gz")).dataobj)
    edited = np.asanyarray(nib.load(str(labels_out)).dataobj)
    lesion = (edited == L.HEPATIC_TUMOR) & (original != L.HEPATIC_TUMOR)
    # the label output is the mask with one hepatic lesion added, nothing else changed
    assert lesion.sum() > 10 and np.array_equal(edited[~lesion], original[~lesion])
    outside = far_from(edited != original, SPACING, EDIT_MARGIN_MM + 1e-6)
    assert np.array_equal(ct[outside], ref[outside])  # the same int16 values, bit for bit
    assert np.abs(ct[lesion].astype(int) - ref[lesion]).max() > 0  # and the lesion was drawn
    data = json.loads(result.stdout)
    assert data["edit"]["region_voxels"] == int((~outside).sum()) and data["edit"]["crop_resampled"] is False
    assert data["edit"]["crop_shape"] and all(n % 16 == 0 for n in data["edit"]["crop_shape"])
    assert "edited the reference CT" in result.stderr and preview.stat().st_size > 1000


@pytest.fixture(scope="module")
def coarse_model(tiny_model, tmp_path_factory):
    """The tiny model with the demo model's spacing range (2.5-3.5 mm in-plane, 4-6 mm between slices)."""
    folder = tmp_path_factory.mktemp("coarse") / "model"
    shutil.copytree(tiny_model, folder)
    settings = json.loads((folder / "maisi_synth.json").read_text())
    settings["grid"].update(spacing_xy_mm=[2.5, 3.5], spacing_z_mm=[4.0, 6.0])
    (folder / "maisi_synth.json").write_text(json.dumps(settings))
    return folder


def test_an_edit_of_a_clinical_resolution_scan_is_drawn_at_the_models_spacing(coarse_model, tmp_path):
    """A 0.8 x 0.8 x 2 mm scan for a model that takes 2.5-3.5 mm: the crop is resampled and the
    drawn part resampled back; the rest of the scan is untouched. The scan is stored as dcm2niix
    often does, uint16 with a rescale intercept of -1024: the output holds the same HU."""
    phantom = make_phantom(4, (32, 32, 16), (6.0, 6.0, 8.0), "none")
    coarse = nib.Nifti1Image(phantom.image.astype(np.float32), phantom_affine((32, 32, 16), (6.0, 6.0, 8.0)))
    from nibabel.processing import resample_to_output

    fine_hu = np.rint(np.asanyarray(resample_to_output(coarse, (0.8, 0.8, 2.0), order=1, cval=-1000).dataobj))
    fine_labels = resample_to_output(
        nib.Nifti1Image(phantom.labels.astype(np.int16), coarse.affine), (0.8, 0.8, 2.0), order=0
    )
    affine = fine_labels.affine
    stored = nib.Nifti1Image((fine_hu + 1024).astype(np.uint16), affine)
    stored.header.set_slope_inter(1.0, -1024.0)
    nib.save(stored, str(tmp_path / "ct.nii.gz"))
    labels = np.asanyarray(fine_labels.dataobj).astype(np.int16)
    nib.save(nib.Nifti1Image(labels, affine), str(tmp_path / "mask.nii.gz"))
    out = tmp_path / "edited.nii.gz"
    args = ["--mask", str(tmp_path / "mask.nii.gz"), "--reference-ct", str(tmp_path / "ct.nii.gz")]
    args += ["--edit", "insert:hepatic:25", "--output", str(out), "--label-output", str(tmp_path / "l.nii.gz")]
    result = run_cli("generate", *args, "--model-dir", str(coarse_model), "--steps", "2", "--device", "cpu", "--json")
    assert result.returncode == 0, result.stderr
    edit = json.loads(result.stdout)["edit"]
    assert edit["crop_resampled"] is True and edit["crop_spacing"] == [2.5, 2.5, 4.0]
    ct = np.asanyarray(nib.load(str(out)).dataobj)
    edited = np.asanyarray(nib.load(str(tmp_path / "l.nii.gz")).dataobj)
    outside = far_from(edited != labels, (0.8, 0.8, 2.0), EDIT_MARGIN_MM + 1e-6)
    assert ct.dtype == np.int16 and ct.shape == fine_hu.shape
    assert np.array_equal(ct[outside], fine_hu[outside].astype(np.int16))
    assert np.abs(ct[~outside].astype(int) - fine_hu[~outside]).max() > 0


def write(path, array, affine):
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


def refusal_cases(scan, tmp_path):
    """(name, extra CLI args, the words the one line must hold) for each kind of bad input."""
    ct = np.asanyarray(nib.load(str(scan / "ct.nii.gz")).dataobj)
    mask = np.asanyarray(nib.load(str(scan / "mask.nii.gz")).dataobj)
    affine = nib.load(str(scan / "ct.nii.gz")).affine
    shifted = affine.copy()
    shifted[:3, 3] += 3.0  # half a voxel: not aligned with the CT
    coarse = affine.copy()
    coarse[:3, :3] *= 2
    nan_ct = ct.astype(np.float32)
    nan_ct[10, 10, 10] = np.nan
    with_tumor = mask.copy()
    with_tumor[30:34, 30:34, 14:16] = np.where(mask[30:34, 30:34, 14:16] == 1, 26, mask[30:34, 30:34, 14:16])
    good_ct, good_mask = str(scan / "ct.nii.gz"), str(scan / "mask.nii.gz")
    tumor_mask = write(tmp_path / "tumor.nii.gz", with_tumor, affine)
    return [
        ("grids differ", ["--mask", write(tmp_path / "m.nii.gz", mask[::2, ::2, ::2], coarse), "--reference-ct",
                          good_ct, "--edit", "insert:hepatic:20"], "not on the reference CT's grid"),
        ("0-4095", ["--mask", good_mask, "--reference-ct", write(tmp_path / "raw.nii.gz", (ct + 1024).astype(np.int16),
                    affine), "--edit", "insert:hepatic:20"], "not in HU"),
        ("label map", ["--mask", good_mask, "--reference-ct", good_mask, "--edit", "insert:hepatic:20"],
         "looks like a label map"),
        ("NaN", ["--mask", good_mask, "--reference-ct", write(tmp_path / "nan.nii.gz", nan_ct, affine),
                 "--edit", "insert:hepatic:20"], "NaN"),
        ("empty region", ["--mask", good_mask, "--reference-ct", good_ct], "no tumor"),
        ("no change", ["--mask", good_mask, "--reference-ct", good_ct, "--original-mask", good_mask],
         "nothing to edit"),
        ("most of the body", ["--mask", good_mask, "--reference-ct", good_ct, "--edit-region",
                              write(tmp_path / "all.nii.gz", np.ones_like(mask), affine)], "new CT, not an edit"),
        ("original elsewhere", ["--mask", tumor_mask, "--reference-ct", good_ct, "--original-mask",
                                write(tmp_path / "o.nii.gz", mask, shifted)], "original mask o.nii.gz is not on"),
        ("margin without CT", ["--mask", good_mask, "--edit-margin-mm", "5"], "--reference-ct"),
    ]  # fmt: skip


def test_bad_edit_input_is_one_line_exit_2_and_writes_nothing(scan, tiny_model, tmp_path, capsys):
    for name, args, words in refusal_cases(scan, tmp_path):
        before = sorted(p.name for p in tmp_path.iterdir())
        out = tmp_path / "out" / "ct.nii.gz"
        code = cli.main(["generate", *args, "--output", str(out), "--model-dir", str(tiny_model), "--steps", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, name
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], (name, err)
        assert not out.parent.exists() and sorted(p.name for p in tmp_path.iterdir()) == before, name


def test_the_region_is_what_changed_or_the_tumors_widened_by_the_margin():
    labels = np.full((20, 20, 20), 1, np.int16)
    edited = labels.copy()
    edited[9:11, 9:11, 9:11] = L.HEPATIC_TUMOR
    spacing = (2.0, 2.0, 2.0)
    region, how = edit_region(edited, spacing, original=labels, margin_mm=4.0)
    expected = ndimage.distance_transform_edt(edited == labels, sampling=spacing) <= 4.0
    assert np.array_equal(region, expected) and "changed" in how
    # with the original, a tumor it already holds is the scan's own and is not redrawn
    both = edited.copy()
    both[1:3, 1:3, 1:3] = L.HEPATIC_TUMOR
    with_real = labels.copy()
    with_real[1:3, 1:3, 1:3] = L.HEPATIC_TUMOR
    assert np.array_equal(edit_region(both, spacing, original=with_real, margin_mm=4.0)[0], expected)
    # without it, every tumor voxel is the seed
    assert edit_region(both, spacing, margin_mm=0.0)[0].sum() == 16
    explicit = np.zeros_like(labels)
    explicit[0, 0, 0] = 7
    assert edit_region(labels, spacing, explicit=explicit)[0].sum() == 1
    with pytest.raises(MaskError, match="no tumor"):
        edit_region(labels, spacing)


def test_the_crop_is_a_block_of_the_scan_in_the_models_sizes_around_the_region():
    affine = np.diag([3.0, 3.0, 5.0, 1.0])
    view = CanonicalView(affine, (128, 128, 64))
    region = np.zeros((128, 128, 64), bool)
    region[2:10, 60:70, 30:34] = True  # at the volume's edge in x
    crop = plan_crop(region, view, GridRules(size_multiple=16, spacing_xy_mm=(2.5, 3.5), spacing_z_mm=(4, 6)), 4)
    assert crop.aligned and all(n % 16 == 0 for n in crop.shape)
    lo = crop.origin.astype(int)
    assert lo[0] == 0 and np.all(lo >= 0) and np.all(lo + crop.shape <= (128, 128, 64))  # kept inside
    box = [(s.start, s.stop) for s in crop.box]
    assert all(a >= o + 0 and b <= o + n for (a, b), o, n in zip(box, lo, crop.shape))
    # a volume smaller than the crop: the whole axis, padded with air
    small = CanonicalView(affine, (20, 128, 8))
    crop = plan_crop(np.pad(np.ones((4, 4, 2), bool), ((8, 8), (62, 62), (3, 3))), small, GridRules(16), 4)
    hu = np.zeros((20, 128, 8), np.int16)
    taken = crop.take(hu, 0, -1000)
    assert taken.shape == crop.shape and (taken == -1000).any() and (taken == 0).sum() == 20 * crop.shape[1] * 8


def test_the_composite_is_the_reference_wherever_the_weight_is_zero():
    rng = np.random.default_rng(0)
    reference = rng.integers(-1024, 3000, (6, 6, 6)).astype(np.int16)
    drawn = rng.normal(0, 300, (6, 6, 6)).astype(np.float32)
    weight = np.zeros((6, 6, 6), np.float32)
    weight[2:4, 2:4, 2:4] = 0.5
    out = composite(reference, drawn, weight)
    assert out.dtype == np.int16 and np.array_equal(out[weight == 0], reference[weight == 0])
    inside = weight > 0
    assert np.array_equal(out[inside], np.rint(0.5 * reference[inside] + 0.5 * drawn[inside]).astype(np.int16))


def test_what_is_not_a_ct_in_hu_is_refused_and_whole_hu_stay_int16():
    assert check_reference_ct(np.array([[[-1000.0, 40.0]]])).dtype == np.int16
    assert check_reference_ct(np.array([[[-1000.5, 40.0]]])).dtype == np.float32
    for array, words in (
        (np.array([[[0, 2000, 4095]]], np.uint16), "not in HU"),
        (np.array([[[0, 1, 26]]], np.uint8), "label map"),
        (np.array([[[-100.0, 50.0]]]), "air"),
        (np.array([[[-1000.0, np.inf]]]), "NaN or infinite"),
    ):
        with pytest.raises(MaskError, match=words):
            check_reference_ct(array)


def test_a_segmentation_cropped_to_its_segments_is_placed_into_the_cts_grid(scan, tiny_model, tmp_path):
    """Slicer saves a segmentation with its extent cut to the painted voxels: a voxel-aligned block of
    the CT's grid. It is placed into the grid (background around it), not refused."""
    reference = nib.load(str(scan / "ct.nii.gz"))
    mask = np.asanyarray(nib.load(str(scan / "mask.nii.gz")).dataobj)
    inner = np.argwhere(mask > 0)
    lo, hi = inner.min(axis=0), inner.max(axis=0) + 1
    cropped = reference.affine.copy()
    cropped[:3, 3] = (reference.affine @ np.array([*lo, 1.0]))[:3]
    block = write(tmp_path / "block.nii.gz", mask[tuple(slice(a, b) for a, b in zip(lo, hi))], cropped)
    out, labels = tmp_path / "e.nii.gz", tmp_path / "e_label.nii.gz"
    code = cli.main(["generate", "--mask", block, "--reference-ct", str(scan / "ct.nii.gz"), "--edit",
                     "insert:hepatic:30", "--output", str(out), "--label-output", str(labels), "--model-dir",
                     str(tiny_model), "--steps", "1", "--quiet"])  # fmt: skip
    assert code == 0
    edited = np.asanyarray(nib.load(str(labels)).dataobj)
    assert edited.shape == mask.shape and np.array_equal(edited[edited != L.HEPATIC_TUMOR], mask[edited != 26])


def test_levels_move_to_the_patients_and_tumors_stay_as_drawn():
    labels = np.ones((12, 12, 12), np.int16)
    labels[:, 6:] = 5
    labels[3:5, 3:5, 3:5] = L.HEPATIC_TUMOR
    region = np.zeros(labels.shape, bool)
    region[1:11, 1:11, 1:11] = True
    reference = np.where(labels == 1, 60.0, 30.0).astype(np.float32)
    drawn = np.where(labels == 1, 100.0, 10.0).astype(np.float32)
    drawn[labels == L.HEPATIC_TUMOR] = 40.0
    kept = labels != L.HEPATIC_TUMOR
    out, offsets = match_levels(drawn, reference, labels, region, kept)
    assert offsets == {1: -40.0, 5: 20.0}
    assert np.all(out[region & (labels == 1)] == 60.0) and np.all(out[region & (labels == 5)] == 30.0)
    assert np.all(out[labels == L.HEPATIC_TUMOR] == 40.0) and np.all(out[~region] == drawn[~region])


def test_noise_is_added_only_where_the_drawn_hu_are_smoother_than_the_scan():
    rng = np.random.default_rng(1)
    scan = ndimage.gaussian_filter(rng.normal(0, 40, (40, 40, 20)), 0.6).astype(np.float32)
    body = np.ones(scan.shape, bool)
    region = np.zeros(scan.shape, bool)
    region[10:30, 10:30, 5:15] = True
    smooth = np.zeros_like(scan)
    out, added = match_noise(smooth, scan, body, region, seed=3)
    fine = lambda a: a - ndimage.gaussian_filter(a, 1.0)  # noqa: E731
    assert added > 5 and np.all(out[~region] == 0)
    assert 0.8 < fine(out)[region].std() / fine(scan)[~region].std() < 1.25  # the scan's grain, not more
    again, _ = match_noise(smooth, scan, body, region, seed=3)
    assert np.array_equal(out, again)  # seeded
    rough = scan * 1.3  # drawn HU with more grain than the scan get nothing
    same, none = match_noise(rough, scan, body, region, seed=3)
    assert none == 0.0 and same is rough


def test_every_solver_and_guidance_keeps_the_outside_and_a_seed_repeats(scan, tiny_model):
    from MaisiSynthLib.editing import read_reference_ct
    from MaisiSynthLib.lesions import random_tumor
    from MaisiSynthLib.masks import Mask, read_mask
    from MaisiSynthLib.models import load_models
    from MaisiSynthLib.pipeline import edit_volume

    models = load_models(tiny_model, "cpu")
    reference = read_reference_ct(scan / "ct.nii.gz")
    original = read_mask(scan / "mask.nii.gz")
    edited = random_tumor(original.labels, L.HEPATIC_TUMOR, 15.0, SPACING, np.random.default_rng(0))
    outside = far_from(edited != original.labels, SPACING, EDIT_MARGIN_MM + 1e-6)
    runs = {}
    for name, options in {
        "heun + cfg": {"solver": "heun", "cfg_scale": 2.0, "mask_guidance": 2.0},
        "euler": {},
        "euler again": {},
        "another seed": {"seed": 5},
    }.items():
        ct = edit_volume(reference, Mask(edited, original.affine), {"steps": 2, **options}, original=original,
                         models=models)  # fmt: skip
        assert np.array_equal(ct.hu[outside], reference.hu[outside]), name
        runs[name] = ct.hu
    assert np.array_equal(runs["euler"], runs["euler again"])
    assert not np.array_equal(runs["euler"], runs["another seed"]) and not np.array_equal(
        runs["euler"], runs["heun + cfg"]
    )


def test_edit_settings_are_checked_by_name_type_and_range():
    from MaisiSynthLib.editing import EditSettings
    from MaisiSynthLib.request import RequestError

    assert EditSettings.from_options({}) == EditSettings()
    assert EditSettings.from_options({"patient_levels": [0.7], "harmonize": 2}).patient_levels == (0.7,)
    for bad in ({"band": 3}, {"band_mm": -1}, {"harmonize": 1.5}, {"noise_match": 1}, {"patient_levels": [0.3, 0.6]},
                {"patient_levels": [0.6, 0.3, 0.1]}, {"edit_margin_mm": 500}, {"latent_blend": "0.5"}):  # fmt: skip
        with pytest.raises(RequestError):
            EditSettings.from_options(bad)


def test_by_default_a_lung_tumor_gets_the_wider_margin():
    from MaisiSynthLib.editing import WIDE_MARGIN_MM

    labels = np.full((40, 40, 20), 28, np.int16)  # lung lobe
    labels[:, 20:] = 1  # liver
    edited = labels.copy()
    edited[8:10, 8:10, 9:11] = L.LUNG_TUMOR
    edited[30:32, 30:32, 9:11] = L.HEPATIC_TUMOR
    spacing = (2.0, 2.0, 2.0)
    region, how = edit_region(edited, spacing, original=labels)
    lung = ndimage.distance_transform_edt(edited != L.LUNG_TUMOR, sampling=spacing) <= WIDE_MARGIN_MM
    liver = ndimage.distance_transform_edt(edited != L.HEPATIC_TUMOR, sampling=spacing) <= EDIT_MARGIN_MM
    assert np.array_equal(region, lung | liver) and "lung tumors" in how
    # a removed lung tumor (its voxels were one) as well
    healed, _ = edit_region(labels, spacing, original=edited)
    assert healed[lung].all() and healed.sum() == region.sum()
