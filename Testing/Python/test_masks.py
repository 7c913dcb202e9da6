"""Masks: reading (NIfTI, NRRD, Slicer .seg.nrrd), validation, body envelope, tumors, encoding."""

from __future__ import annotations

import nrrd
import numpy as np
import pytest
import slicerio
import torch
from conftest import ras_affine, save_nifti, torso_labels

from MaisiSynthLib import labels as L
from MaisiSynthLib.errors import MaskError
from MaisiSynthLib.masks import binary_code, ensure_body, read_mask, remove_tumors, resample_labels, validate_labels
from MaisiSynthLib.volumes import from_canonical, to_canonical


def test_nifti_mask_keeps_labels_and_affine(tmp_path):
    labels = torso_labels(32)
    affine = ras_affine((2.0, 2.5, 3.0), (10.0, -20.0, 30.0))
    mask = read_mask(save_nifti(tmp_path / "m.nii.gz", labels, affine))
    assert np.array_equal(mask.labels, labels)
    np.testing.assert_allclose(mask.affine, affine)
    assert mask.spacing == pytest.approx((2.0, 2.5, 3.0))


def test_nrrd_mask_converts_lps_to_ras(tmp_path):
    labels = torso_labels(32)
    header = {
        "space": "left-posterior-superior",
        "space directions": np.diag([2.0, 2.5, 3.0]),
        "space origin": np.array([10.0, 20.0, 30.0]),
    }
    nrrd.write(str(tmp_path / "m.nrrd"), labels, header)
    mask = read_mask(tmp_path / "m.nrrd")
    assert np.array_equal(mask.labels, labels)
    # LPS (10, 20, 30) is RAS (-10, -20, 30); LPS +x (left) is RAS −x.
    np.testing.assert_allclose(mask.affine[:3, 3], [-10.0, -20.0, 30.0])
    np.testing.assert_allclose(mask.affine[:3, :3], np.diag([-2.0, -2.5, 3.0]))


def test_slicer_segmentation_maps_names_and_keeps_tumor_over_host(tmp_path):
    shape = (24, 24, 24)
    seg = slicerio.create_segmentation(shape, np.diag([-2.0, -2.0, 2.0, 1.0]))
    body = np.zeros(shape, bool)
    body[2:22, 2:22, 2:22] = True
    liver = np.zeros(shape, bool)
    liver[6:16, 6:16, 6:16] = True
    tumor = np.zeros(shape, bool)
    tumor[9:12, 9:12, 9:12] = True
    slicerio.add_segment(seg, tumor, {"id": "t", "name": "liver tumor"})  # a common alias
    slicerio.add_segment(seg, liver, {"id": "l", "name": "Liver"})  # overlaps the tumor → second layer
    slicerio.add_segment(seg, body, {"id": "b", "name": "body"})
    slicerio.write_segmentation(str(tmp_path / "s.seg.nrrd"), seg)
    mask = read_mask(tmp_path / "s.seg.nrrd")
    assert mask.labels[10, 10, 10] == L.HEPATIC_TUMOR
    assert mask.labels[7, 7, 7] == 1
    assert mask.labels[3, 3, 3] == L.BODY and mask.labels[0, 0, 0] == 0
    assert (mask.labels == L.HEPATIC_TUMOR).sum() == tumor.sum()
    np.testing.assert_allclose(mask.affine[:3, :3], np.diag([2.0, 2.0, 2.0]))  # LPS −2 → RAS +2
    # the overlap is not resolved silently: a note says which segment won where
    assert len(mask.notes) == 1 and "'Liver' and 'liver tumor' overlap in 27 voxels" in mask.notes[0]
    assert "'liver tumor' (hepatic tumor) was kept" in mask.notes[0]


def test_segmentation_with_unknown_segment_names_is_refused(tmp_path):
    seg = slicerio.create_segmentation((8, 8, 8), np.eye(4))
    region = np.zeros((8, 8, 8), bool)
    region[2:5, 2:5, 2:5] = True
    slicerio.add_segment(seg, region, {"id": "x", "name": "Segment_1"})
    slicerio.write_segmentation(str(tmp_path / "s.seg.nrrd"), seg)
    with pytest.raises(MaskError, match="'Segment_1' have no MAISI label"):
        read_mask(tmp_path / "s.seg.nrrd")


@pytest.mark.parametrize(
    "name, label",
    [
        ("liver", 1),
        ("kidney_right", 5),
        ("lung_upper_lobe_left", 28),
        ("rib_left_1", 63),
        ("vertebrae_L5", 33),
        ("urinary_bladder", 15),
        ("Hepatic Tumor", 26),
        ("iliac_artery_left", 58),
        ("lung", None),
        ("Segment_1", None),
    ],
)
def test_names_and_totalsegmentator_aliases(name, label):
    assert L.id_for_name(name) == label


def test_validation_accepts_whole_number_floats_and_refuses_fractions():
    labels = torso_labels(16).astype(np.float32)
    assert validate_labels(labels).dtype == np.int16
    labels[3, 3, 3] = 0.5
    with pytest.raises(MaskError, match="non-integer values"):
        validate_labels(labels)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((8, 8, 8, 2), np.int16), "4 dimensions"),
        (np.zeros((8, 8), np.int16), "2 dimensions"),
        (np.zeros((8, 8, 8), np.int16), "empty"),
        (np.full((8, 8, 8), 2, np.int16), "2 that are not MAISI labels"),  # a dummy slot
        (np.full((8, 8, 8), 300, np.int16), "300"),
    ],
)
def test_validation_errors(array, message):
    with pytest.raises(MaskError, match=message):
        validate_labels(array)


def test_trailing_singleton_dimension_is_squeezed():
    assert validate_labels(torso_labels(8)[..., None]).shape == (8, 8, 8)


def test_body_envelope_rule():
    labels = torso_labels(48, body=False)
    out, added = ensure_body(labels, (3.0, 3.0, 3.0))
    assert added
    organs = labels > 0
    assert np.array_equal(out[organs], labels[organs])  # organs untouched
    body = out == L.BODY
    assert body.any() and not (body & organs).any()
    # the envelope fills the gap between liver and spleen in the slice through both...
    z = 21
    assert out[24, 24, z] == L.BODY  # midline between the two organs at that height
    # ...but does not reach the corners of the field of view
    assert out[0, 0, z] == 0 and out[47, 47, z] == 0
    again, added_again = ensure_body(out, (3.0, 3.0, 3.0))
    assert not added_again and np.array_equal(again, out)


def test_remove_tumors_fixed_hosts():
    labels = torso_labels(48, tumor=26)
    out = remove_tumors(labels)
    tumor = labels == L.HEPATIC_TUMOR
    assert tumor.any() and (out[tumor] == 1).all()
    assert np.array_equal(out[~tumor], labels[~tumor])


def test_remove_tumors_lung_majority_per_lesion():
    labels = np.zeros((30, 12, 12), np.int16)
    labels[:15] = 30  # right upper lobe
    labels[15:] = 28  # left upper lobe
    labels[3:6, 4:7, 4:7] = L.LUNG_TUMOR  # inside lobe 30
    labels[20:23, 4:7, 4:7] = L.LUNG_TUMOR  # inside lobe 28
    labels[13:16, 4:7, 4:7] = L.LUNG_TUMOR  # straddles the fissure, more lobe 30 around it
    labels[16, 4:7, 4:7] = 30
    out = remove_tumors(labels)
    assert (out[3:6, 4:7, 4:7] == 30).all()
    assert (out[20:23, 4:7, 4:7] == 28).all()
    assert (out[13:16, 4:7, 4:7] == 30).all()


def test_remove_tumors_without_any_host_falls_back_to_body():
    labels = np.full((10, 10, 10), L.BODY, np.int16)
    labels[4:6, 4:6, 4:6] = L.LUNG_TUMOR
    assert (remove_tumors(labels)[4:6, 4:6, 4:6] == L.BODY).all()


def test_binary_code_is_the_8_bit_label_code():
    labels = torch.tensor([0, 1, 26, 128, 200, 255]).view(1, 1, 6, 1, 1)
    code = binary_code(labels)
    assert code.shape == (1, 8, 6, 1, 1)
    decoded = sum(code[0, k, :, 0, 0] * 2**k for k in range(8))
    assert decoded.tolist() == [0, 1, 26, 128, 200, 255]


def test_nearest_neighbour_resampling_keeps_label_values():
    labels = torso_labels(32)
    affine = ras_affine((2.0, 2.0, 2.0))
    target = ras_affine((4.0, 4.0, 4.0), origin=(-95.0, -95.0, -95.0))
    out = resample_labels(labels, affine, (16, 16, 16), target)
    assert out.shape == (16, 16, 16)
    assert set(np.unique(out)) <= set(np.unique(labels))
    # the output voxel (i, j, k) sits at world 4*i - 95 = input voxel (4*i + 1) / 2
    assert out[8, 8, 8] == labels[16, 16, 16]


def test_canonical_round_trip_of_a_permuted_flipped_grid():
    labels = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    affine = np.array([[0, 0, -2.0, 10], [3.0, 0, 0, -5], [0, -1.5, 0, 7], [0, 0, 0, 1]])
    ras, ras_aff = to_canonical(labels, affine)
    assert ras.shape == (6, 4, 5)
    assert np.allclose(np.abs(np.diag(ras_aff[:3, :3])), [2.0, 3.0, 1.5]) and (np.diag(ras_aff[:3, :3]) > 0).all()
    back, back_aff = from_canonical(ras, ras_aff, affine)
    assert np.array_equal(back, labels)
    np.testing.assert_allclose(back_aff, affine, atol=1e-9)
    # the same voxel is at the same world point in both
    ijk = np.array([1, 2, 3, 1])
    world = affine @ ijk
    ras_ijk = np.rint(np.linalg.solve(ras_aff, world)).astype(int)
    assert ras[tuple(ras_ijk[:3])] == labels[1, 2, 3]


def test_coarse_masks_merge_vessels_into_their_organ_and_fold_the_rest_into_the_body():
    from MaisiSynthLib.masks import coarsen_labels, merge_vessels

    labels = np.zeros((10, 4, 4), np.int16)
    labels[1:9] = 200
    labels[1:4] = 28  # left upper lobe
    labels[5:8] = 32  # right lower lobe
    labels[4, 1, 1] = 119  # a pulmonary vessel between them, nearer ...
    labels[4, 2, 2] = 119
    labels[3, 0, 0] = 119  # ... and one inside the upper lobe
    labels[8] = 1  # liver, with a hepatic vessel and a tumor
    labels[8, 0, 0] = 25
    labels[8, 3, 3] = 26
    labels[2, 2, 2] = 23  # lung tumor
    labels[6, 0, 0] = 40  # a vertebra
    merged = merge_vessels(labels)
    assert not np.isin(merged, [119, 25]).any()
    assert merged[3, 0, 0] == 28 and merged[8, 0, 0] == 1
    assert merged[4, 1, 1] in (28, 32) and merged[4, 2, 2] in (28, 32)
    np.testing.assert_array_equal(
        merged[labels != 119][labels[labels != 119] != 25], labels[(labels != 119) & (labels != 25)]
    )
    coarse = coarsen_labels(labels)
    assert set(np.unique(coarse).tolist()) == {0, 200, 28, 32, 23, 26, 40}
    assert (coarse[8][labels[8] == 1] == 200).all() and coarse[8, 3, 3] == 26  # liver folded, its tumor kept
    assert (coarse[labels == 0] == 0).all()
    only_lungs = coarsen_labels(labels, keep=(28, 32))
    assert set(np.unique(only_lungs).tolist()) == {0, 200, 28, 32}
