"""scene.py against real MRML: the slicer-core wheel (no Qt, no mocks)."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from MaisiSynthLib import labels as L  # noqa: E402
from MaisiSynthLib import scene as S  # noqa: E402
from MaisiSynthLib.errors import MaskError  # noqa: E402

SHAPE = (48, 48, 32)
# LPS-style axes as DICOM-derived volumes have: I → right-to-left, J → anterior-to-posterior
AFFINE = np.array([[-2.0, 0, 0, 50.0], [0, -2.0, 0, 40.0], [0, 0, 3.0, -30.0], [0, 0, 0, 1]])


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    yield s
    s.Clear(1)


@pytest.fixture
def reference(scene):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "reference CT")
    S.set_volume_array(node, np.full(SHAPE, -1000, np.int16), AFFINE)
    node.CreateDefaultDisplayNodes()
    node.GetDisplayNode().SetAutoWindowLevel(0)
    node.GetDisplayNode().SetWindowLevel(350, 50)
    return node


def box(lo, hi) -> np.ndarray:
    m = np.zeros(SHAPE, bool)
    m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return m


LIVER = box((4, 4, 4), (24, 24, 20))
KIDNEY = box((30, 6, 6), (38, 14, 14))
LUNG = box((4, 26, 4), (40, 38, 20))
NODULE = box((20, 30, 10), (24, 34, 13))  # inside the lung


def painted(scene, reference, segments: list[tuple[str, np.ndarray]]):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "painted")
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    S.ensure_segmentation_converters()
    for name, mask in segments:
        sid = node.GetSegmentation().AddEmptySegment("", name, (1, 0, 0))
        S._write_segment(scene, node, reference, sid, mask)
    return node


def ids_by_name(node) -> dict[str, str]:
    seg = node.GetSegmentation()
    return {seg.GetNthSegment(i).GetName(): seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())}


def test_three_segments_export_with_maisi_ids_on_the_reference_grid(scene, reference):
    # a MAISI name, a TotalSegmentator name and a common alias
    node = painted(scene, reference, [("liver", LIVER), ("kidney_right", KIDNEY), ("Lung nodule", NODULE)])
    mapping = {s.name: (s.label, s.source) for s in S.segment_labels(node)}
    assert mapping == {"liver": (1, "name"), "kidney_right": (5, "name"), "Lung nodule": (23, "name")}
    labels, affine = S.export_labels(scene, node, reference)
    assert labels.shape == SHAPE and np.allclose(affine, AFFINE)
    assert np.array_equal(labels == 1, LIVER) and np.array_equal(labels == 5, KIDNEY)
    assert np.array_equal(labels == 23, NODULE)
    assert set(np.unique(labels)) == {0, 1, 5, 23}


def test_unmapped_segments_are_named_in_the_error(scene, reference):
    node = painted(scene, reference, [("liver", LIVER), ("my blob", KIDNEY)])
    assert [s.name for s in S.segment_labels(node) if s.label is None] == ["my blob"]
    with pytest.raises(MaskError, match="my blob"):
        S.export_labels(scene, node, reference)
    S.set_segment_label(node, ids_by_name(node)["my blob"], 3)  # the user's correction: spleen
    labels, _ = S.export_labels(scene, node, reference)
    assert np.array_equal(labels == 3, KIDNEY)


def test_swapping_a_lung_tumor_to_hepatic_changes_only_that_label(scene, reference):
    node = painted(scene, reference, [("liver", LIVER), ("left lung upper lobe", LUNG), ("lung tumor", NODULE)])
    before, _ = S.export_labels(scene, node, reference)
    S.swap_tumor(node, ids_by_name(node)["lung tumor"], L.HEPATIC_TUMOR)
    after, _ = S.export_labels(scene, node, reference)
    assert (after == L.HEPATIC_TUMOR).sum() == (before == L.LUNG_TUMOR).sum() == NODULE.sum()
    assert not (after == L.LUNG_TUMOR).any()
    assert np.array_equal(after != before, NODULE)
    assert "hepatic tumor" in ids_by_name(node)
    with pytest.raises(MaskError, match="not a tumor"):
        S.swap_tumor(node, ids_by_name(node)["liver"], L.HEPATIC_TUMOR)


def test_removing_a_tumor_gives_its_host_organ(scene, reference):
    node = painted(scene, reference, [("left lung upper lobe", LUNG), ("lung tumor", NODULE)])
    grown = S.remove_tumor(scene, node, ids_by_name(node)["lung tumor"], reference)
    labels, _ = S.export_labels(scene, node, reference)
    assert grown == [28] and "lung tumor" not in ids_by_name(node)
    assert np.array_equal(labels == 28, LUNG) and not (labels == L.LUNG_TUMOR).any()


def test_inserting_a_lesion_of_a_given_diameter_inside_its_host(scene, reference):
    node = painted(scene, reference, [("liver", LIVER), ("kidney_right", KIDNEY)])
    centre_ijk = np.array([14.0, 14.0, 12.0])
    centre_ras = (AFFINE @ np.array([*centre_ijk, 1.0]))[:3]
    sid = S.insert_tumor(scene, node, reference, L.HEPATIC_TUMOR, centre_ras, diameter_mm=12.0)
    labels, _ = S.export_labels(scene, node, reference)
    lesion = labels == L.HEPATIC_TUMOR
    assert lesion.any() and not (lesion & ~LIVER).any()
    xs, ys, zs = np.nonzero(lesion)
    # 12 mm across: 6 voxels at 2 mm in-plane, 4 at 3 mm, each ±1 voxel
    assert abs((xs.max() - xs.min() + 1) - 6) <= 1 and abs((ys.max() - ys.min() + 1) - 6) <= 1
    assert abs((zs.max() - zs.min() + 1) - 4) <= 1
    assert np.array_equal((labels == 1) | lesion, LIVER)  # the host gave the voxels up, nothing else moved
    assert np.array_equal(labels == 5, KIDNEY)
    assert dict((s.segment_id, s.label) for s in S.segment_labels(node))[sid] == L.HEPATIC_TUMOR
    kidney_ras = (AFFINE @ np.array([34.0, 10.0, 10.0, 1.0]))[:3]
    with pytest.raises(MaskError, match="right kidney, not a host of hepatic tumor"):
        S.insert_tumor(scene, node, reference, L.HEPATIC_TUMOR, kidney_ras, diameter_mm=8.0)
    assert np.array_equal(S.export_labels(scene, node, reference)[0], labels)  # the failed insert changed nothing


def test_labels_round_trip_through_a_segmentation_with_maisi_names(scene, reference):
    labels = np.zeros(SHAPE, np.int16)
    labels[LIVER], labels[KIDNEY], labels[NODULE] = 1, 5, 23
    node = S.import_labels(scene, labels, AFFINE)
    assert {s.name for s in S.segment_labels(node)} == {L.name_of(1), L.name_of(5), L.name_of(23)}
    assert all(s.source == "tag" for s in S.segment_labels(node))
    back, affine = S.export_labels(scene, node, reference)
    assert np.array_equal(back, labels) and np.allclose(affine, AFFINE)


def test_a_generated_ct_loads_with_the_reference_geometry(scene, reference, tiny_model, tmp_path):
    from MaisiSynthLib.pipeline import GenerateRequest, generate

    labels = np.zeros(SHAPE, np.int16)
    labels[box((2, 2, 2), (46, 46, 30))] = 200
    labels[LIVER], labels[KIDNEY] = 1, 5
    node = S.import_labels(scene, labels, AFFINE)
    mask_path = S.write_label_input(scene, node, reference, tmp_path / "input.nrrd")
    assert mask_path.read_bytes()[:4] == b"NRRD" and b"encoding: raw" in mask_path.read_bytes()[:2000]
    generate(
        GenerateRequest(
            mask=str(mask_path), output=str(tmp_path / "ct.nrrd"), model_dir=str(tiny_model), steps=2, device="cpu"
        )
    )
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "patient")
    study = hierarchy.CreateStudyItem(patient, "study")
    hierarchy.CreateItem(study, reference)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(reference)) == study
    ct = S.load_result(scene, tmp_path / "ct.nrrd", S.result_name("reference CT", 0), reference)
    S.place_in_study(scene, ct, reference)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(ct)) == study
    assert ct.GetName() == "reference CT synthetic (seed 0)"
    assert ct.GetImageData().GetDimensions() == reference.GetImageData().GetDimensions()
    assert np.allclose(S.ijk_to_ras(ct), S.ijk_to_ras(reference), atol=1e-5)
    assert S.window_level_of(ct) == (350.0, 50.0)
    values = S.array_from_volume(ct)
    assert values.min() >= -1000 and values.max() <= 1000 and np.all(values[labels == 0] == -1000)
    image, label = S.export_pair(scene, ct, node, tmp_path / "pairs", "case0")
    import nibabel as nib

    assert np.array_equal(np.asarray(nib.load(label).dataobj), labels)
    assert np.allclose(nib.load(image).affine, AFFINE) and np.array_equal(np.asarray(nib.load(image).dataobj), values)


def test_without_a_reference_ct_the_segmentation_geometry_is_the_grid(scene, reference):
    node = painted(scene, reference, [("liver", LIVER)])
    grid = S.reference_grid(scene, node)
    assert grid.GetImageData().GetDimensions() == SHAPE
    assert np.allclose(S.ijk_to_ras(grid), AFFINE)
    labels, _ = S.export_labels(scene, node, grid)
    assert np.array_equal(labels == 1, LIVER)


def test_terminology_entries_map_segments(scene, reference):
    node = painted(scene, reference, [("Segment_1", KIDNEY), ("Segment_2", LIVER)])
    ids = ids_by_name(node)
    context = "Segmentation category and type - 3D Slicer General Anatomy list"
    anatomy = "SCT^123037004^Anatomical Structure"
    segment = node.GetSegmentation().GetSegment(ids["Segment_1"])
    segment.SetTag(
        segment.GetTerminologyEntryTagName(), f"{context}~{anatomy}~SCT^64033007^Kidney~SCT^24028007^Right~~^^~^^"
    )
    segment = node.GetSegmentation().GetSegment(ids["Segment_2"])
    segment.SetTag(segment.GetTerminologyEntryTagName(), f"{context}~{anatomy}~SCT^10200004^Liver~^^~~^^~^^")
    mapping = {s.name: (s.label, s.source) for s in S.segment_labels(node)}
    assert mapping == {"Segment_1": (5, "terminology"), "Segment_2": (1, "terminology")}


def _app_views(scene):
    """The MRML nodes Slicer's application creates for its views (layout, Red/Yellow, crosshair);
    Yellow starts sagittal, as in the default layout."""
    layout = slicer.vtkMRMLLayoutNode()
    scene.AddNode(layout)
    for name in ("Red", "Yellow"):
        view = slicer.vtkMRMLSliceNode()
        view.SetLayoutName(name)
        view.SetSingletonTag(name)
        scene.AddNode(view)
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(name)
        composite.SetSingletonTag(name)
        scene.AddNode(composite)
    crosshair = slicer.vtkMRMLCrosshairNode()
    scene.AddNode(crosshair)
    return layout, crosshair


def _census(scene) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i in range(scene.GetNumberOfNodes()):
        name = scene.GetNthNode(i).GetClassName()
        counts[name] = counts.get(name, 0) + 1
    counts.pop("vtkMRMLSubjectHierarchyNode", None)  # the scene's singleton, made on first use
    return counts


def test_export_compare_and_insert_leave_only_what_the_user_asked_for(scene, reference, tmp_path):
    layout, crosshair = _app_views(scene)
    seg = painted(scene, reference, [("liver", LIVER), ("right lung upper lobe", LUNG)])
    seg.CreateDefaultDisplayNodes()
    before = _census(scene)
    S.export_labels(scene, seg, reference)
    S.write_label_input(scene, seg, reference, tmp_path / "mask.nrrd")
    assert _census(scene) == before  # no label maps, display nodes or colour tables left behind

    # the lesion goes to the crosshair (where the user put it), not to the last mouse position
    centre = S.ijk_to_ras(reference) @ np.array([30, 32, 12, 1.0])
    crosshair.SetCrosshairRAS(*centre[:3])
    crosshair.SetCursorPositionRAS([0.0, 0.0, 0.0])
    placed = S.lesion_centre(scene)
    np.testing.assert_allclose(placed, centre[:3])
    S.insert_tumor(scene, seg, reference, L.LUNG_TUMOR, placed, 8.0)
    labels, _ = S.export_labels(scene, seg, reference)
    assert labels[30, 32, 12] == L.LUNG_TUMOR
    added = {k: v - before.get(k, 0) for k, v in _census(scene).items() if v != before.get(k, 0)}
    # the lesion is a segment of the user's segmentation; besides, only the segmentation before the
    # edit, kept for an edit of this CT: hidden from the node menus and never saved with the scene
    assert added == {"vtkMRMLLabelMapVolumeNode": 1}
    kept = seg.GetNodeReference(S.SNAPSHOT_ROLE)
    assert kept.GetHideFromEditors() and not kept.GetSaveWithScene()
    assert (S.snapshot_labels(scene, seg, reference) != L.LUNG_TUMOR).all()

    synthetic = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "synthetic")
    S.set_volume_array(synthetic, np.zeros(SHAPE, np.int16), AFFINE)
    yellow = scene.GetNodeByID("vtkMRMLSliceNodeYellow")
    with_compare = _census(scene)
    S.compare_side_by_side(scene, reference, synthetic, seg)
    assert layout.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView
    for name in ("Red", "Yellow"):
        assert scene.GetNodeByID(f"vtkMRMLSliceNode{name}").GetOrientation() == "Axial"
        composite = scene.GetNodeByID(f"vtkMRMLSliceCompositeNode{name}")
        assert composite.GetLinkedControl() and composite.GetHotLinkedControl()
    assert scene.GetNodeByID("vtkMRMLSliceCompositeNodeRed").GetBackgroundVolumeID() == reference.GetID()
    assert scene.GetNodeByID("vtkMRMLSliceCompositeNodeYellow").GetBackgroundVolumeID() == synthetic.GetID()
    assert yellow.GetOrientation() == "Axial" and _census(scene) == with_compare


def test_a_mask_alone_gets_one_canvas_to_paint_on(scene, reference):
    seg = painted(scene, reference, [("liver", LIVER)])
    canvas = S.canvas_volume(scene, seg)
    assert canvas.IsA("vtkMRMLScalarVolumeNode") and S.array_from_volume(canvas).shape == SHAPE
    np.testing.assert_allclose(S.ijk_to_ras(canvas), AFFINE, atol=1e-4)
    assert (S.array_from_volume(canvas) == -1000).all()
    count = scene.GetNumberOfNodes()
    assert S.canvas_volume(scene, seg) is canvas and scene.GetNumberOfNodes() == count  # reused, nothing left over


def test_a_blank_segmentation_without_a_reference_ct_gets_a_canvas_and_can_be_painted(scene, reference):
    """A radiologist who starts from a new, empty segmentation (no segments, no geometry, no CT):
    Slicer's export fails and leaves a volume without scalars, which used to raise out of the
    module's selector slot. Now the canvas is the blank grid and becomes the segmentation's geometry,
    a stroke painted on it exports as labels, and switching segmentations keeps a single canvas
    that is never saved with the scene."""
    blank = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    canvas = S.canvas_volume(scene, blank)
    shape, spacing = S.BLANK_CANVAS_SHAPE, S.BLANK_CANVAS_SPACING
    assert S.array_from_volume(canvas).shape == shape and not canvas.GetSaveWithScene()
    np.testing.assert_allclose(np.abs(np.diag(S.ijk_to_ras(canvas))[:3]), spacing)
    centre = S.ijk_to_ras(canvas) @ np.r_[(np.array(shape) - 1) / 2, 1.0]
    np.testing.assert_allclose(centre[:3], 0, atol=1e-6)  # around the origin
    # a stroke: a liver ball painted on the canvas, as the Segment Editor's Paint effect writes it
    stroke = np.zeros(shape, bool)
    stroke[100:140, 90:150, 110:150] = True
    sid = blank.GetSegmentation().AddEmptySegment("", "liver", (1, 0, 0))
    S.ensure_segmentation_converters()
    S._write_segment(scene, blank, canvas, sid, stroke)
    labels, affine = S.export_labels(scene, blank, None)  # no reference CT: the segmentation's own grid
    ras = affine @ np.r_[np.argwhere(labels == L.id_for_name("liver")).mean(0), 1.0]
    expected = S.ijk_to_ras(canvas) @ np.r_[np.argwhere(stroke).mean(0), 1.0]
    np.testing.assert_allclose(ras[:3], expected[:3], atol=spacing)
    assert (labels == L.id_for_name("liver")).sum() == stroke.sum()
    # switching to a mask with its own grid and back: one canvas at a time, not one more per switch
    other = painted(scene, reference, [("liver", LIVER)])
    for node in (other, blank, other, blank):
        S.canvas_volume(scene, node)
        assert len(S._canvases(scene)) == 1


def test_an_edit_of_the_reference_ct_from_the_tumor_tools_through_a_real_worker(scene, tiny_model, tmp_path):
    """The module's edit flow on real MRML: the segmentation is kept before the first tumor tool
    changes it, the region is what changed, the inputs go to a real worker, and the result comes back
    as '<CT> edited (seed N)' that is the scan itself outside the region, with the region outlined."""
    from MaisiSynthLib.client import WorkerClient
    from MaisiSynthLib.gui_options import EDIT_MODES, GenerateOptions
    from MaisiSynthLib.phantoms import make_phantom

    phantom = make_phantom(5, (64, 64, 32), (6.0, 6.0, 8.0), "none")
    affine = np.array([[-6.0, 0, 0, 190.0], [0, -6.0, 0, 180.0], [0, 0, 8.0, -120.0], [0, 0, 0, 1]])  # LPS-like
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "patient CT")
    S.set_volume_array(ct, phantom.image, affine)
    segmentation = S.import_labels(scene, phantom.labels.astype(np.int16), affine)
    assert S.snapshot_labels(scene, segmentation, ct) is None
    assert S.edit_region_of(scene, segmentation, ct)[0] is None  # nothing kept, nothing to edit
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(phantom.labels == 1)
    liver = np.unravel_index(int(np.argmax(depth)), depth.shape)  # the liver's deepest voxel
    centre = (affine @ np.array([*liver, 1.0]))[:3]
    S.insert_tumor(scene, segmentation, ct, L.HEPATIC_TUMOR, centre, diameter_mm=30.0)
    before = S.snapshot_labels(scene, segmentation, ct)
    assert np.array_equal(before, phantom.labels)  # kept before the insert changed anything
    region, labels, _ = S.edit_region_of(scene, segmentation, ct)
    lesion = (labels == L.HEPATIC_TUMOR) & (before != L.HEPATIC_TUMOR)
    assert lesion.sum() > 20 and region[lesion].all() and S.edit_is_local(region, labels)
    # the request the module's Generate sends (mode "if local"), through a real worker process
    options = GenerateOptions(steps=2, seed=7, device="cpu", model_dir=str(tiny_model))
    folder = tmp_path / "request"
    folder.mkdir()
    params, sent_region = S.prepare_generate(scene, segmentation, ct, options, folder)
    assert np.array_equal(sent_region, region) and "output_size" not in params
    assert {"mask", "original_mask", "reference_ct"} <= set(params) and params["seed"] == 7
    client = WorkerClient(env={"CUDA_VISIBLE_DEVICES": "-1"}, worker_args=["--device", "cpu"])
    client.start()
    try:
        end = client.wait(client.generate(params), 180)
    finally:
        client.shutdown()
    assert end["type"] == "result" and end["edit"]["region_voxels"] == int(region.sum()), end
    result = S.adopt_edit_result(scene, end["output"], ct.GetName(), 7, sent_region, ct)
    assert result.GetName() == "patient CT edited (seed 7)" and not folder.exists()
    values = S.array_from_volume(result)
    assert np.allclose(S.ijk_to_ras(result), affine, atol=1e-5)
    assert np.array_equal(values[~region], phantom.image[~region]) and (values[lesion] != phantom.image[lesion]).any()
    outline = scene.GetFirstNodeByName("patient CT edit region (seed 7)")
    assert outline is not None and outline.GetSegmentation().GetNumberOfSegments() == 1
    assert not outline.GetDisplayNode().GetVisibility2DFill() and outline.GetDisplayNode().GetVisibility2DOutline()
    # "draw a new CT on its grid": the plain request, no edit fields
    new = GenerateOptions(steps=2, edit_mode=list(EDIT_MODES)[2])
    params, none = S.prepare_generate(scene, segmentation, ct, new, tmp_path)
    assert none is None and "reference_ct" not in params and "original_mask" not in params


def test_a_hand_painted_lesion_counts_from_the_kept_segmentation(scene, reference):
    node = painted(scene, reference, [("liver", LIVER)])
    S.take_snapshot(scene, node, reference)  # what the module does when the segmentation and CT are chosen
    lesion = box((10, 10, 10), (14, 14, 13))
    sid = node.GetSegmentation().AddEmptySegment("", "liver tumor", (1, 1, 0))
    S._write_segment(scene, node, reference, sid, lesion)  # a Segment Editor stroke
    region, labels, before = S.edit_region_of(scene, node, reference, margin_mm=0.0)
    assert np.array_equal(region, lesion) and np.array_equal(before == 1, LIVER)
    assert labels[lesion].tolist() == [L.HEPATIC_TUMOR] * int(lesion.sum())
    # a kept mask belongs to its CT's grid: another grid has none
    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "other CT")
    S.set_volume_array(other, np.zeros((24, 24, 16), np.int16), AFFINE)
    assert S.snapshot_labels(scene, node, other) is None
