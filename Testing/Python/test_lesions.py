"""Tumor insertion into masks (lesions.py)."""

import numpy as np
import pytest
from scipy import ndimage

from MaisiSynthLib import labels as L
from MaisiSynthLib.errors import MaskError
from MaisiSynthLib.lesions import insert_tumor, random_tumor
from MaisiSynthLib.masks import remove_tumors


def _liver_box() -> np.ndarray:
    labels = np.full((40, 40, 20), L.BODY, np.int16)
    labels[5:35, 5:35, 3:17] = 1  # liver
    labels[0, :, :] = 0
    return labels


def test_insert_tumor_paints_an_ellipsoid_inside_the_host():
    labels = _liver_box()
    out = insert_tumor(labels, L.HEPATIC_TUMOR, (20, 20, 10), 6.0, (2.0, 2.0, 3.0))
    lesion = out == L.HEPATIC_TUMOR
    # radius 6 mm = 3 voxels in x/y, 2 voxels in z: the voxel count of that ellipsoid
    grid = np.mgrid[-4:5, -4:5, -3:4]
    expected = int(((grid[0] * 2.0) ** 2 + (grid[1] * 2.0) ** 2 + (grid[2] * 3.0) ** 2 <= 36.0).sum())
    assert lesion.sum() == expected
    assert (out[~lesion] == labels[~lesion]).all()  # nothing else changed
    assert (labels[lesion] == 1).all()  # only liver became tumor
    assert labels.max() == 200 and (labels != L.HEPATIC_TUMOR).all()  # the input is not modified
    # removing it gives the original mask back
    assert (remove_tumors(out) == labels).all()


def test_insert_tumor_is_clipped_one_voxel_inside_the_host():
    labels = _liver_box()
    out = insert_tumor(labels, L.HEPATIC_TUMOR, (7, 20, 10), 10.0, (2.0, 2.0, 3.0))
    lesion = np.argwhere(out == L.HEPATIC_TUMOR)
    assert len(lesion) > 0
    assert lesion[:, 0].min() == 6  # the liver starts at x=5: that layer stays liver


def test_insert_tumor_refuses_a_centre_outside_the_host():
    labels = _liver_box()
    with pytest.raises(MaskError, match="not a host of"):
        insert_tumor(labels, L.HEPATIC_TUMOR, (2, 2, 2), 5.0, (2.0, 2.0, 3.0))
    with pytest.raises(MaskError, match="not a tumor type"):
        insert_tumor(labels, 1, (20, 20, 10), 5.0, (2.0, 2.0, 3.0))
    with pytest.raises(MaskError, match="outside the mask"):
        insert_tumor(labels, L.HEPATIC_TUMOR, (50, 20, 10), 5.0, (2.0, 2.0, 3.0))


def test_random_tumor_places_a_whole_lesion_deep_enough():
    labels = _liver_box()
    rng = np.random.default_rng(3)
    out = random_tumor(labels, L.HEPATIC_TUMOR, 6.0, (2.0, 2.0, 3.0), rng)
    lesion = out == L.HEPATIC_TUMOR
    full = (insert_tumor(labels, L.HEPATIC_TUMOR, (20, 20, 10), 6.0, (2.0, 2.0, 3.0)) == L.HEPATIC_TUMOR).sum()
    # at least the radius deep: at most the outer shell of the ellipsoid is clipped by the host's rim
    assert full // 2 < lesion.sum() <= full
    assert (labels[lesion] == 1).all()
    assert ndimage.label(lesion)[1] == 1
    with pytest.raises(MaskError, match="no host organ"):
        random_tumor(labels, L.LUNG_TUMOR, 6.0, (2.0, 2.0, 3.0), rng)


def test_random_tumor_treats_the_edge_of_the_volume_as_outside_the_host():
    # A vertebral column cut by the field of view: deepest at the top and bottom slices if the edge
    # of the volume were not the edge of the organ, and a lesion centred there has no host core.
    labels = np.full((30, 30, 12), L.BODY, np.int16)
    labels[10:20, 10:20, :] = 33  # a vertebra through every slice
    for seed in range(20):
        out = random_tumor(labels, L.BONE_LESION, 10.0, (3.0, 3.0, 5.0), np.random.default_rng(seed))
        lesion = np.argwhere(out == L.BONE_LESION)
        # radius 10 mm at 5 mm slices: a lesion centred deep enough spans at least 3 slices; one centred
        # on the first or last slice is cut to 2 (the edge slice is not host core)
        assert len(np.unique(lesion[:, 2])) >= 3, f"seed {seed}: lesion on slices {np.unique(lesion[:, 2])}"
