"""Geometry: outputs keep the mask's grid, or take exactly the requested one."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import ras_affine, save_nifti, torso_labels

from MaisiSynthLib.errors import GeometryError
from MaisiSynthLib.grid import GridRules, auto_size, resolve_output_grid
from MaisiSynthLib.models import load_models
from MaisiSynthLib.pipeline import GenerateRequest, generate


@pytest.fixture(scope="module")
def models(tiny_model):
    return load_models(tiny_model, "cpu")


def test_permuted_axes_come_back_in_the_mask_orientation(tmp_path, models):
    """A mask stored z-first and flipped (as some exporters do) gets a CT voxel-aligned with it."""
    ras = torso_labels(64)
    stored = np.ascontiguousarray(np.transpose(ras, (2, 0, 1))[::-1])  # axes (z, x, y), z reversed
    affine = np.array([[0, 3.0, 0, -90], [0, 0, 3.0, -100], [-3.0, 0, 0, 95], [0, 0, 0, 1]])
    mask = save_nifti(tmp_path / "mask.nii.gz", stored, affine)
    result = generate(
        GenerateRequest(mask=mask, output=tmp_path / "ct.nii.gz", steps=2, label_output=tmp_path / "lab.nii.gz"),
        models=models,
    )
    img = nib.load(str(result.output))
    ct = np.asanyarray(img.dataobj)
    assert ct.shape == stored.shape
    np.testing.assert_array_equal(img.affine, nib.load(str(mask)).affine)
    assert (ct[stored == 0] == -1000).all()
    assert np.array_equal(np.asanyarray(nib.load(str(tmp_path / "lab.nii.gz")).dataobj), stored)


def test_requested_output_size_resamples_on_the_same_centre(tmp_path, models):
    mask = save_nifti(tmp_path / "mask.nii.gz", torso_labels(64), ras_affine((3.0, 3.0, 3.0)))
    out = tmp_path / "ct.nii.gz"
    result = generate(
        GenerateRequest(mask=mask, output=out, steps=2, output_size=(96, 96, 64), label_output=tmp_path / "lab.nii.gz"),
        models=models,
    )
    img = nib.load(str(out))
    assert img.shape == (96, 96, 64)
    assert result.spacing == pytest.approx((2.0, 2.0, 3.0))
    centre = lambda a, shape: a[:3, :3] @ ((np.array(shape) - 1) / 2) + a[:3, 3]  # noqa: E731
    np.testing.assert_allclose(centre(img.affine, img.shape), centre(ras_affine(), (64, 64, 64)), atol=1e-6)
    labels = np.asanyarray(nib.load(str(tmp_path / "lab.nii.gz")).dataobj)
    ct = np.asanyarray(img.dataobj)
    assert (ct[labels == 0] == -1000).all() and set(np.unique(labels)) <= set(np.unique(torso_labels(64)))


def test_requested_spacing_keeps_the_field_of_view():
    rules = GridRules(size_multiple=16, spacing_xy_mm=(0.5, 8.0), spacing_z_mm=(0.5, 8.0), min_fov_xy_mm=64)
    shape, affine = resolve_output_grid((64, 64, 64), ras_affine((3.0, 3.0, 3.0)), rules, spacing=(6.0, 6.0, 6.0))
    assert shape == (32, 32, 32)
    np.testing.assert_allclose(np.diag(affine)[:3], [6.0, 6.0, 6.0])


def test_auto_size_snaps_to_allowed_sizes_keeping_the_fov():
    rules = GridRules(size_multiple=32)
    shape, spacing = auto_size((250, 260, 100), (1.5, 1.5, 2.5), rules)
    assert shape == (256, 256, 96)
    assert spacing[0] == pytest.approx(250 * 1.5 / 256) and spacing[2] == pytest.approx(100 * 2.5 / 96)


def test_official_rules_refuse_a_small_field_of_view():
    with pytest.raises(GeometryError, match="field of view"):
        resolve_output_grid((128, 128, 64), ras_affine((1.5, 1.5, 2.0)), GridRules())
    shape, _ = resolve_output_grid((256, 256, 128), ras_affine((1.5, 1.5, 2.0)), GridRules())
    assert shape == (256, 256, 128)


def test_auto_size_brings_a_fine_scan_into_the_model_range_keeping_its_field_of_view():
    """A 512² chest CT of 0.7 mm for a 2.5–3.5 mm model: ~144 voxels of 2.5 mm, not 512 of 2.5 mm."""
    rules = GridRules(size_multiple=16, spacing_xy_mm=(2.5, 3.5), spacing_z_mm=(4.0, 6.0), min_fov_xy_mm=256)
    shape, spacing = auto_size((512, 512, 240), (0.7, 0.7, 1.25), rules)
    assert shape == (144, 144, 80)
    assert spacing[0] == pytest.approx(512 * 0.7 / 144, abs=0.02) and spacing[2] == 4.0
    assert abs(shape[0] * spacing[0] - 512 * 0.7) < 5 and abs(shape[2] * spacing[2] - 300) <= 20
