"""Slicer-scene helpers: segmentations ↔ MAISI label maps, tumor edits on segments, result volumes.

Only `slicer.vtk*` classes and an explicit `scene` argument, never `slicer.app`, `slicer.modules` or
Qt: this runs in the desktop app and, for the tests, on the `slicer-core` wheel. Arrays cross the
boundary in MaisiSynthLib's convention: numpy (x, y, z) = (I, J, K) with the IJK→RAS matrix as the
affine, so the engine's functions (`masks`, `lesions`) do the label work.

Which MAISI id a segment stands for is decided, in this order, by the segment's `MaisiSynth.label`
tag (set when the user corrects the mapping table or edits a tumor), its terminology entry, its name
(MAISI, TotalSegmentator or common names: `labels.id_for_name`), and the label value of a segment
imported from a MAISI label map. Unmapped segments are reported, never guessed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from . import labels as L
from .errors import MaskError, OptionError

LABEL_TAG = "MaisiSynth.label"


def _slicer():
    import slicer  # the app's module, or the slicer-core wheel's

    return slicer


def ensure_segmentation_converters() -> None:
    """Register the labelmap ↔ surface converter rules when nothing has (the slicer-core wheel
    without the app); the desktop app registers them at start-up."""
    slicer = _slicer()
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if factory.GetConverterRules():
        return
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


# ---------------------------------------------------------------------------------------------------
# Volumes ↔ numpy


def ijk_to_ras(volume_node) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return _numpy_matrix(matrix)


def _numpy_matrix(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def array_from_volume(volume_node) -> np.ndarray:
    """Voxels as an (I, J, K) numpy array (a copy)."""
    from vtk.util import numpy_support

    image = volume_node.GetImageData()
    if image is None:
        raise MaskError(f"volume '{volume_node.GetName()}' has no image data", "load or create the volume first")
    dims = image.GetDimensions()
    flat = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return flat.reshape(dims[::-1]).transpose(2, 1, 0).copy()


def set_volume_array(volume_node, array: np.ndarray, affine: np.ndarray) -> None:
    """Fill a volume node from an (I, J, K) array and its IJK→RAS matrix."""
    import vtk
    from vtk.util import numpy_support

    data = np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0))
    image = vtk.vtkImageData()
    image.SetDimensions(*array.shape)
    scalars = numpy_support.numpy_to_vtk(data.ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    volume_node.SetIJKToRASMatrix(_vtk_matrix(affine))
    volume_node.SetAndObserveImageData(image)


def _vtk_matrix(affine: np.ndarray):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(affine[r, c]))
    return matrix


def discard(scene, node) -> None:
    """Remove a temporary node and what was made for it: its display and storage nodes, and its
    colour table when no other node uses that table (segment exports create one per label map)."""
    if node is None or scene.GetNodeByID(node.GetID()) is None:
        return
    dependents = []
    for i in range(node.GetNumberOfDisplayNodes() if hasattr(node, "GetNumberOfDisplayNodes") else 0):
        display = node.GetNthDisplayNode(i)
        if display is not None:
            dependents.append(display)
            color = display.GetColorNode() if hasattr(display, "GetColorNode") else None
            if color is not None and not color.GetSingletonTag() and _users_of(scene, color) <= {display.GetID()}:
                dependents.append(color)
    storage = node.GetStorageNode() if hasattr(node, "GetStorageNode") else None
    if storage is not None:
        dependents.append(storage)
    scene.RemoveNode(node)
    for dependent in dependents:
        if scene.GetNodeByID(dependent.GetID()) is not None:
            scene.RemoveNode(dependent)


def _users_of(scene, target) -> set[str]:
    """IDs of the nodes that reference `target`."""
    users = set()
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        for r in range(node.GetNumberOfNodeReferenceRoles()):
            role = node.GetNthNodeReferenceRole(r)
            for k in range(node.GetNumberOfNodeReferences(role)):
                if node.GetNthNodeReferenceID(role, k) == target.GetID():
                    users.add(node.GetID())
    return users


def _labelmap_node(scene, array: np.ndarray, affine: np.ndarray, name: str):
    """A (temporary) label map node holding `array` on the grid `affine`; callers remove it."""
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName(name))
    set_volume_array(node, np.asarray(array).astype(np.int16), affine)
    return node


# ---------------------------------------------------------------------------------------------------
# Segment → MAISI id


@dataclass
class SegmentLabel:
    segment_id: str
    name: str
    label: int | None  # MAISI id, None when unmapped
    source: str  # tag, terminology, name, value or "" (unmapped)

    @property
    def is_tumor(self) -> bool:
        return self.label is not None and L.is_tumor(self.label)


def _tag(segment, key: str) -> str | None:
    import vtk

    value = vtk.reference("")
    return str(value) if segment.GetTag(key, value) else None


def _terminology_names(segment) -> list[str]:
    """Candidate names from a segment's terminology entry: "<modifier> <type>", then "<type>".

    The entry is `context~category~type~type modifier~anatomic context~region~region modifier`, each
    coded part `scheme^code^meaning` (e.g. `…~SCT^64033007^Kidney~SCT^24028007^Right~…`)."""
    entry = _tag(segment, segment.GetTerminologyEntryTagName()) or ""
    fields = entry.split("~")
    if len(fields) < 4:
        return []

    def meaning(field: str) -> str:
        return field.split("^")[2].strip() if field.count("^") >= 2 else ""

    kind, modifier = meaning(fields[2]), meaning(fields[3])
    return [f"{modifier} {kind}"] * bool(modifier and kind) + [kind] * bool(kind)


def segment_labels(segmentation_node) -> list[SegmentLabel]:
    """The MAISI id of every segment, with where it came from (see the module docstring)."""
    segmentation = segmentation_node.GetSegmentation()
    out = []
    for i in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(i)
        segment = segmentation.GetSegment(segment_id)
        name = segment.GetName()
        label, source = None, ""
        tag = _tag(segment, LABEL_TAG)
        if tag and tag.isdigit() and int(tag) in L.known_ids():
            label, source = int(tag), "tag"
        if label is None:
            for candidate in _terminology_names(segment):
                if L.id_for_name(candidate) is not None:
                    label, source = L.id_for_name(candidate), "terminology"
                    break
        if label is None and L.id_for_name(name) is not None:
            label, source = L.id_for_name(name), "name"
        if label is None:
            value = segment.GetLabelValue()
            # segments imported from a MAISI label map are called "Label_<id>" or by number
            if name in (f"Label_{value}", str(value)) and value in L.known_ids() and value != 0:
                label, source = int(value), "value"
        out.append(SegmentLabel(segment_id, name, label, source))
    return out


def set_segment_label(segmentation_node, segment_id: str, label: int, rename: bool = False) -> None:
    """Fix a segment's MAISI id (the user's correction in the mapping table, or a tumor edit)."""
    if int(label) not in L.known_ids() or int(label) == 0:
        raise MaskError(f"{label} is not a MAISI label id", "pick an id from `maisi-synth labels`")
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise MaskError(f"no segment '{segment_id}'", "choose a segment of the segmentation")
    segment.SetTag(LABEL_TAG, str(int(label)))
    if rename:
        segment.SetName(L.name_of(label))


# ---------------------------------------------------------------------------------------------------
# Segmentation ↔ MAISI label map


def export_labels(scene, segmentation_node, reference_volume) -> tuple[np.ndarray, np.ndarray]:
    """All mapped segments as one MAISI label array on the reference grid: (labels (I,J,K), affine).

    Where segments overlap, the later segment wins (Slicer's rule); so tumors listed after their
    host organ sit inside it, as painted. Raises MaskError when a segment is unmapped.
    """
    slicer = _slicer()
    import vtk

    mapping = segment_labels(segmentation_node)
    unmapped = [s.name for s in mapping if s.label is None]
    if unmapped:
        raise MaskError(
            f"segment(s) without a MAISI label: {', '.join(unmapped)}",
            "set their label in the mapping table, rename them to a MAISI structure, or delete them",
        )
    if not mapping:
        raise MaskError("the segmentation has no segments", "paint or load the organs first")
    ensure_segmentation_converters()
    ids = vtk.vtkStringArray()
    for s in mapping:
        ids.InsertNextValue(s.segment_id)
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName("maisi export"))
    try:
        # Without a colour table the n-th listed segment gets value n; fixed MAISI ids come from the
        # lookup below, which (unlike matching colour names) allows several segments per id.
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, node, reference_volume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
        )
        if not ok:
            raise MaskError("Slicer could not export the segmentation to a label map", "check the reference volume")
        order = array_from_volume(node)
        affine = ijk_to_ras(node)
    finally:
        discard(scene, node)
    lookup = np.zeros(len(mapping) + 1, dtype=np.int16)
    lookup[1:] = [s.label for s in mapping]
    return lookup[order], affine


def import_labels(scene, labels: np.ndarray, affine: np.ndarray, name: str = "MAISI mask"):
    """A segmentation node from a MAISI label array: one segment per id, MAISI names and colours."""
    slicer = _slicer()

    ensure_segmentation_converters()
    node = _labelmap_node(scene, labels, affine, "maisi import")
    try:
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
        segmentation_node.CreateDefaultDisplayNodes()
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(node, segmentation_node):
            raise MaskError("Slicer could not import the label map", "check the label file")
    finally:
        discard(scene, node)
    segmentation = segmentation_node.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        value = int(segment.GetLabelValue())
        segment.SetName(L.name_of(value))
        segment.SetColor(*label_color(value))
        segment.SetTag(LABEL_TAG, str(value))
    return segmentation_node


label_color = L.label_color  # one colour table for segments and the preview (labels.py)


# ---------------------------------------------------------------------------------------------------
# Tumor edits on segments


def _write_segment(scene, segmentation_node, reference, segment_id: str, mask: np.ndarray) -> None:
    slicer = _slicer()

    node = _labelmap_node(scene, mask, ijk_to_ras(reference), "maisi segment")
    try:
        image = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(node)
        slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            image, segmentation_node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE
        )
    finally:
        discard(scene, node)


def _segment_for(segmentation_node, label: int) -> str | None:
    for s in segment_labels(segmentation_node):
        if s.label == label:
            return s.segment_id
    return None


def swap_tumor(segmentation_node, segment_id: str, tumor: int, scene=None, reference_volume=None) -> None:
    """Make a tumor segment another tumor type (e.g. lung → hepatic); its voxels do not change. With
    the scene and a reference CT, the segmentation before the change is kept first (`take_snapshot`)."""
    if scene is not None and reference_volume is not None:
        _keep_before_edits(scene, segmentation_node, reference_volume)
    current = {s.segment_id: s for s in segment_labels(segmentation_node)}.get(segment_id)
    if current is None or not current.is_tumor:
        raise MaskError(
            "the selected segment is not a tumor", "select a tumor segment (see `maisi-synth labels --tumors`)"
        )
    if not L.is_tumor(tumor):
        raise MaskError(f"{tumor} ({L.name_of(tumor)}) is not a tumor type", "pick a tumor type")
    set_segment_label(segmentation_node, segment_id, tumor, rename=True)
    segmentation_node.GetSegmentation().GetSegment(segment_id).SetColor(*label_color(tumor))


def remove_tumor(scene, segmentation_node, segment_id: str, reference_volume) -> list[int]:
    """Delete a tumor segment and give its voxels to the surrounding host organ(s) (each voxel the
    majority host around it, as `masks.remove_tumors`); returns the host ids that grew."""
    from .masks import remove_tumors

    current = {s.segment_id: s for s in segment_labels(segmentation_node)}.get(segment_id)
    if current is None or not current.is_tumor:
        raise MaskError("the selected segment is not a tumor", "select a tumor segment")
    _keep_before_edits(scene, segmentation_node, reference_volume)
    labels, _ = export_labels(scene, segmentation_node, reference_volume)
    lesion = labels == current.label
    healed = remove_tumors(labels, (current.label,))
    grown = sorted(int(h) for h in np.unique(healed[lesion]) if h != 0)
    segmentation_node.GetSegmentation().RemoveSegment(segment_id)
    for host in grown:
        host_segment = _segment_for(segmentation_node, host)
        if host_segment is None:
            host_segment = segmentation_node.GetSegmentation().AddEmptySegment("", L.name_of(host), label_color(host))
            set_segment_label(segmentation_node, host_segment, host)
        _write_segment(scene, segmentation_node, reference_volume, host_segment, healed == host)
    return grown


def insert_tumor(
    scene,
    segmentation_node,
    reference_volume,
    tumor: int,
    centre_ras: Sequence[float],
    diameter_mm: float,
) -> str:
    """Paint a new lesion of `diameter_mm` centred at a RAS point (crosshair or markup), only inside
    the tumor type's host organ; returns the new segment's id. MaskError if the point is not in a
    valid host."""
    from . import lesions
    from .grid import spacing_of

    if not diameter_mm or diameter_mm <= 0:
        raise MaskError(f"lesion diameter must be positive, got {diameter_mm} mm", "enter e.g. 15 mm")
    _keep_before_edits(scene, segmentation_node, reference_volume)
    labels, affine = export_labels(scene, segmentation_node, reference_volume)
    centre = (np.linalg.inv(affine) @ np.array([*centre_ras, 1.0]))[:3]
    spacing = np.array(spacing_of(affine))
    edited = lesions.insert_tumor(labels, tumor, centre, diameter_mm / 2.0, spacing)
    lesion = (edited == tumor) & (labels != tumor)
    for host in sorted(int(h) for h in np.unique(labels[lesion])):  # hosts give the voxels up
        host_segment = _segment_for(segmentation_node, host)
        if host_segment is not None:
            _write_segment(scene, segmentation_node, reference_volume, host_segment, (labels == host) & ~lesion)
    name = f"{L.name_of(tumor)} {diameter_mm:g} mm"
    segment_id = segmentation_node.GetSegmentation().AddEmptySegment("", name, label_color(tumor))
    set_segment_label(segmentation_node, segment_id, tumor)
    _write_segment(scene, segmentation_node, reference_volume, segment_id, lesion)
    return segment_id


# ---------------------------------------------------------------------------------------------------
# Edits of a reference CT: what the segmentation was before, and what changed since
#
# Editing the user's own scan needs the mask before the edit: the engine redraws what changed (plus a
# margin) and keeps the rest of the CT. The tumor tools keep it themselves before their first change;
# the module keeps it when a segmentation and a reference CT are chosen, so hand-painted edits count
# too. It is a hidden label map on the reference grid, referenced from the segmentation node.

SNAPSHOT_ROLE = "MaisiSynthBeforeEdits"


def _snapshot_node(scene, segmentation_node, reference_volume):
    node = segmentation_node.GetNodeReference(SNAPSHOT_ROLE)
    if node is None or node.GetImageData() is None or reference_volume is None:
        return None
    if array_from_volume(node).shape != tuple(reference_volume.GetImageData().GetDimensions()) or not np.allclose(
        ijk_to_ras(node), ijk_to_ras(reference_volume), atol=1e-4
    ):
        return None  # kept for another reference grid: not this CT's
    return node


def take_snapshot(scene, segmentation_node, reference_volume):
    """Keep the segmentation as it is now (on the reference CT's grid) as the mask before the edits."""
    labels, affine = export_labels(scene, segmentation_node, reference_volume)
    old = segmentation_node.GetNodeReference(SNAPSHOT_ROLE)
    node = _labelmap_node(scene, labels, affine, f"{segmentation_node.GetName()} before edits")
    node.SetHideFromEditors(True)
    node.SetSaveWithScene(False)
    segmentation_node.SetNodeReferenceID(SNAPSHOT_ROLE, node.GetID())
    if old is not None:
        discard(scene, old)
    return node


def ensure_snapshot(scene, segmentation_node, reference_volume):
    """The kept mask for this reference CT, taken now if there is none yet."""
    return _snapshot_node(scene, segmentation_node, reference_volume) or take_snapshot(
        scene, segmentation_node, reference_volume
    )


def _keep_before_edits(scene, segmentation_node, grid) -> None:
    """The tumor tools' first step: keep the segmentation before they change it, when `grid` is a CT
    (a label map grid stands for "no reference CT": there is no scan to edit)."""
    if not grid.IsA("vtkMRMLLabelMapVolumeNode"):
        ensure_snapshot(scene, segmentation_node, grid)


def snapshot_labels(scene, segmentation_node, reference_volume) -> np.ndarray | None:
    """The mask before the edits, on the reference CT's grid, or None when none was kept for it."""
    node = _snapshot_node(scene, segmentation_node, reference_volume)
    return None if node is None else array_from_volume(node)


def edit_region_of(scene, segmentation_node, reference_volume, margin_mm: float | None = None):
    """(region, edited labels, labels before): the voxels an edit of the reference CT would redraw,
    by the engine's own rule (`editing.edit_region`); region None when nothing was kept or changed."""
    from .editing import edit_region
    from .grid import spacing_of

    before = snapshot_labels(scene, segmentation_node, reference_volume)
    labels, affine = export_labels(scene, segmentation_node, reference_volume)
    if before is None or np.array_equal(before, labels):
        return None, labels, before
    region, _ = edit_region(labels, spacing_of(affine), original=before, margin_mm=margin_mm)
    return region, labels, before


def edit_is_local(region: np.ndarray | None, labels: np.ndarray) -> bool:
    """Whether an edit can keep the reference CT: something changed, and not most of the body."""
    from .editing import MAX_REGION_SHARE

    if region is None:
        return False
    body = labels > 0
    return bool(region.any()) and int(np.count_nonzero(region & body)) <= MAX_REGION_SHARE * max(
        1, int(np.count_nonzero(body))
    )


def write_edit_inputs(
    scene, reference_volume, labels: np.ndarray, before: np.ndarray, folder: str | os.PathLike
) -> dict:
    """The files of an edit request besides the mask: the reference CT and the mask before the edits
    (uncompressed NRRD on the CT's grid); returns the request fields naming them, the mask's too."""
    folder = Path(folder)
    affine = ijk_to_ras(reference_volume)
    paths = {"mask": folder / "mask.nrrd", "original_mask": folder / "original.nrrd"}
    for key, array in (("mask", labels), ("original_mask", before)):
        node = _labelmap_node(scene, array, affine, "maisi edit input")
        try:
            write_nrrd(scene, node, paths[key])
        finally:
            discard(scene, node)
    paths["reference_ct"] = write_nrrd(scene, reference_volume, folder / "reference_ct.nrrd")
    return {key: str(path) for key, path in paths.items()}


def prepare_generate(scene, segmentation_node, reference_volume, options, folder: str | os.PathLike):
    """(worker params, edit region or None) of a Generate press, its files written to `folder`: an
    edit of the reference CT when `options.wants_edit` says so for this change, else a new CT from the
    mask on the reference grid (the segmentation's own without a CT). `options`: gui_options.GenerateOptions."""
    folder = Path(folder)
    output = str(folder / "synthetic.nrrd")
    if reference_volume is not None:
        region, labels, before = edit_region_of(scene, segmentation_node, reference_volume)
        if options.wants_edit(edit_is_local(region, labels)):
            if region is None:
                raise MaskError(
                    "nothing in the segmentation changed since it was chosen with this CT, so there is nothing to edit",
                    "insert, remove or change a tumor first, or choose 'draw a new CT on its grid'",
                )
            inputs = write_edit_inputs(scene, reference_volume, labels, before, folder)
            return options.worker_params(inputs.pop("mask"), output, edit=inputs), region
    grid = reference_volume if reference_volume is not None else reference_grid(scene, segmentation_node)
    try:
        mask = write_label_input(scene, segmentation_node, grid, folder / "mask.nrrd")
    finally:
        if reference_volume is None:
            discard(scene, grid)
    return options.worker_params(str(mask), output), None


def adopt_edit_result(scene, path: str | os.PathLike, input_name: str, seed: int, region, reference_volume):
    """A worker's output in the scene: '<CT> synthetic (seed N)', or for an edit '<CT> edited
    (seed N)' with the edit region outlined beside it."""
    if region is None:
        return adopt_result(scene, path, result_name(input_name, seed), reference_volume)
    volume = adopt_result(scene, path, edited_name(input_name, seed), reference_volume)
    show_edit_region(scene, region, reference_volume, f"{input_name} edit region (seed {seed})")
    return volume


def show_edit_region(scene, region: np.ndarray, reference_volume, name: str):
    """The edit region as a segmentation drawn as an outline only (what was redrawn), beside the CT."""
    ensure_segmentation_converters()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    segment_id = node.GetSegmentation().AddEmptySegment("edit region", "edit region", (1.0, 0.85, 0.1))
    _write_segment(scene, node, reference_volume, segment_id, region.astype(np.uint8))
    display = node.GetDisplayNode()
    display.SetVisibility2DFill(False)
    display.SetVisibility2DOutline(True)
    place_in_study(scene, node, reference_volume)
    return node


def edited_name(input_name: str, seed: int) -> str:
    return f"{input_name} edited (seed {seed})"


# ---------------------------------------------------------------------------------------------------
# Files and result volumes


def write_nrrd(scene, volume_node, path: str | os.PathLike) -> Path:
    """Write a volume as uncompressed NRRD (what the worker reads fastest), atomically."""
    from .volumes import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        _write_node(scene, volume_node, tmp, shown=path, storage_class="vtkMRMLNRRDStorageNode", compress=False)
    return path


def write_label_input(scene, segmentation_node, reference_volume, path: str | os.PathLike) -> Path:
    """The worker's input: the segmentation as a MAISI label map on the reference grid (NRRD)."""
    labels, affine = export_labels(scene, segmentation_node, reference_volume)
    node = _labelmap_node(scene, labels, affine, "maisi input")
    try:
        return write_nrrd(scene, node, path)
    finally:
        discard(scene, node)


def window_level_of(volume_node) -> tuple[float, float] | None:
    display = volume_node.GetDisplayNode() if volume_node is not None else None
    if display is None or not hasattr(display, "GetWindow"):
        return None
    return float(display.GetWindow()), float(display.GetLevel())


CT_SOFT_TISSUE = (400.0, 40.0)


def load_result(scene, path: str | os.PathLike, name: str, reference_volume=None):
    """Load a synthetic CT as a new scalar volume named `name`, its window/level equal to the
    reference CT's (soft-tissue window without one)."""
    path = Path(path)
    if not path.exists():
        raise MaskError(f"result file not found: {path}", "generate again")
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    volume.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(volume):
        scene.RemoveNode(volume)
        scene.RemoveNode(storage)
        raise MaskError(f"Slicer could not read {path}", "check the file")
    volume.CreateDefaultDisplayNodes()
    window, level = window_level_of(reference_volume) or CT_SOFT_TISSUE
    display = volume.GetDisplayNode()
    display.SetAutoWindowLevel(0)
    display.SetWindowLevel(window, level)
    return volume


def result_name(input_name: str, seed: int) -> str:
    return f"{input_name} synthetic (seed {seed})"


def _write_node(
    scene,
    node,
    path: Path,
    shown: Path | None = None,
    storage_class: str = "vtkMRMLVolumeArchetypeStorageNode",
    compress: bool = True,
) -> None:
    """Write a volume node with a temporary storage node of Slicer's own (format from the file
    name); `shown` is the name the user knows when `path` is a temporary file."""
    storage = scene.AddNewNodeByClass(storage_class)
    try:
        storage.SetFileName(str(path))
        storage.SetUseCompression(int(compress))
        if not storage.WriteData(node):
            raise MaskError(f"Slicer could not write {(shown or path).name}", "check that the folder is writable")
    finally:
        scene.RemoveNode(storage)


def export_pair(scene, ct_volume, segmentation_node, folder: str | os.PathLike, stem: str) -> tuple[Path, Path]:
    """Write `<stem>_image.nii.gz` (the synthetic CT) and `<stem>_label.nii.gz` (its MAISI mask on the
    CT's grid) for training-data use; both or neither. Written by Slicer's storage nodes: nothing
    here needs a package Slicer does not ship."""
    from .volumes import atomic_paths

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labels, affine = export_labels(scene, segmentation_node, ct_volume)
    if not np.allclose(affine, ijk_to_ras(ct_volume), atol=1e-4):
        raise MaskError("the label map does not share the CT's grid", "export from the reference grid")
    image_path, label_path = folder / f"{stem}_image.nii.gz", folder / f"{stem}_label.nii.gz"
    label_node = _labelmap_node(scene, labels, affine, "maisi export label")
    try:
        with atomic_paths(image_path, label_path) as (image_tmp, label_tmp):
            _write_node(scene, ct_volume, image_tmp)
            _write_node(scene, label_node, label_tmp)
    finally:
        discard(scene, label_node)
    return image_path, label_path


def reference_grid(scene, segmentation_node):
    """A label map node on the segmentation's own reference geometry, for when there is no reference
    CT (the caller removes it when done)."""
    slicer = _slicer()

    ensure_segmentation_converters()
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName("maisi grid"))
    ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportAllSegmentsToLabelmapNode(
        segmentation_node, node, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
    )
    image = node.GetImageData()
    # a segmentation without segments or reference geometry: the export fails and leaves no scalars
    if not ok or image is None or image.GetPointData().GetScalars() is None:
        discard(scene, node)
        raise MaskError("the segmentation has no geometry to generate on", "select a reference CT")
    return node


def place_in_study(scene, node, reference_volume) -> None:
    """Put `node` in the same subject-hierarchy folder (patient/study) as the reference volume."""
    slicer = _slicer()

    if reference_volume is None or not hasattr(slicer, "vtkMRMLSubjectHierarchyNode"):
        return
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return
    parent = hierarchy.GetItemParent(hierarchy.GetItemByDataNode(reference_volume))
    if not parent:
        return
    item = hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.SetItemParent(item, parent)
    else:  # the app's subject-hierarchy plugins add items for new nodes; bare MRML does not
        hierarchy.CreateItem(parent, node)


# ---------------------------------------------------------------------------------------------------
# Views: where a lesion goes, and the synthetic CT beside its reference


def crosshair_ras(scene) -> list[float]:
    """The crosshair position (RAS mm): where the user last placed it with Shift or a click, and it
    stays there when the mouse leaves the view (unlike the cursor position)."""
    node = scene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
    if node is None:
        raise OptionError("the scene has no crosshair", "place a markup point for the lesion centre")
    return [float(v) for v in node.GetCrosshairRAS()]


def lesion_centre(scene, point_node=None) -> list[float]:
    """The first control point of a markup, else the crosshair."""
    if point_node is not None and point_node.GetNumberOfControlPoints() > 0:
        position = [0.0, 0.0, 0.0]
        point_node.GetNthControlPointPositionWorld(0, position)
        return [float(v) for v in position]
    return crosshair_ras(scene)


def _view_nodes(scene, layout_name: str):
    slice_node = composite = None
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        if node.IsA("vtkMRMLSliceNode") and node.GetLayoutName() == layout_name:
            slice_node = node
        elif node.IsA("vtkMRMLSliceCompositeNode") and node.GetLayoutName() == layout_name:
            composite = node
    if slice_node is None or composite is None:
        raise OptionError(f"the scene has no {layout_name} slice view", "use a layout with the Red and Yellow views")
    return slice_node, composite


def compare_side_by_side(scene, reference, synthetic, segmentation=None) -> None:
    """Side-by-side layout: the reference (synthetic faded over it) in Red, the synthetic in Yellow,
    both axial (a layout's default orientation applies only to views it creates, so Yellow may still
    be sagittal from before) and linked, the mask as an outline on both."""
    slicer = _slicer()

    layout = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    if layout is not None:
        layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
    views = [_view_nodes(scene, name) for name in ("Red", "Yellow")]
    for slice_node, _ in views:
        if not slice_node.SetOrientation("Axial"):
            slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
            slice_node.AddSliceOrientationPreset(
                "Axial", scene.GetDefaultNodeByClass("vtkMRMLSliceNode").GetSliceOrientationPreset("Axial")
            )
            slice_node.SetOrientation("Axial")
    (_, left), (_, right) = views
    left.SetBackgroundVolumeID(reference.GetID() if reference is not None else synthetic.GetID())
    left.SetForegroundVolumeID(synthetic.GetID() if reference is not None else None)
    right.SetBackgroundVolumeID(synthetic.GetID())
    right.SetForegroundVolumeID(None)
    for composite in (left, right):
        composite.SetLinkedControl(True)
        composite.SetHotLinkedControl(True)
    if segmentation is not None and segmentation.GetDisplayNode() is not None:
        display = segmentation.GetDisplayNode()
        display.SetVisibility2DFill(False)  # outline only, on both views
        display.SetVisibility2DOutline(True)


# A new, blank segmentation with no reference CT has no grid: its canvas is the official 1.5 mm grid
# (256³, 38 cm across, centred on the origin), on which the mask is painted and then generated.
BLANK_CANVAS_SHAPE = (256, 256, 256)
BLANK_CANVAS_SPACING = 1.5
CANVAS_ROLE = "MaisiSynth.Canvas"


def canvas_volume(scene, segmentation_node, name: str = "MaisiSynth canvas"):
    """A blank scalar volume (-1000 HU) to paint on: the Segment Editor paints only with a source
    volume, and a mask loaded alone has none. On the segmentation's own geometry, or for a blank
    segmentation (no segments, no geometry) on BLANK_CANVAS_*, which then becomes its geometry. One
    canvas per scene, reused while the geometry holds, never saved with the scene."""
    geometry = segmentation_geometry(segmentation_node)
    blank = geometry is None
    if geometry is not None:
        shape, affine = geometry
    else:
        shape = BLANK_CANVAS_SHAPE
        affine = np.diag([-BLANK_CANVAS_SPACING, -BLANK_CANVAS_SPACING, BLANK_CANVAS_SPACING, 1.0])
        affine[:3, 3] = -affine[:3, :3] @ (np.array(shape) - 1) / 2
    node = None
    for existing in _canvases(scene):
        image = existing.GetImageData()
        fits = image is not None and tuple(image.GetDimensions()) == tuple(shape)
        if node is None and fits and np.allclose(ijk_to_ras(existing), affine, atol=1e-4):
            node = existing
        else:
            discard(scene, existing)  # another geometry's canvas: it would only pile up
    if node is None:
        node = _blank_volume(scene, name, shape, affine)
        node.SetAttribute(CANVAS_ROLE, "1")
        node.SetSaveWithScene(False)
    if blank:  # the grid the user paints on, and later generates on
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(node)
    return node


def _blank_volume(scene, name: str, shape: tuple[int, int, int], affine: np.ndarray):
    """A -1000 HU int16 volume, made cheaply for the GUI thread (no transposed copy, and a display
    node with a fixed soft-tissue window: the automatic one scans every voxel, a second on 512²×200)."""
    import vtk
    from vtk.util import numpy_support

    image = vtk.vtkImageData()
    image.SetDimensions(*shape)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = -1000
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(_vtk_matrix(affine))
    node.SetAndObserveImageData(image)
    display = scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
    display.SetAutoWindowLevel(False)
    display.SetWindowLevel(400, 40)
    display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
    node.SetAndObserveDisplayNodeID(display.GetID())
    return node


def segmentation_geometry(segmentation_node) -> tuple[tuple[int, int, int], np.ndarray] | None:
    """The segmentation's reference grid, (shape (I,J,K), IJK→RAS affine), read from its geometry
    parameter without exporting a voxel (an export of a 512×512×200 mask took seconds on the GUI
    thread); None when it has none (a new, empty segmentation)."""
    slicer = _slicer()
    import vtk

    converter = slicer.vtkSegmentationConverter
    text = segmentation_node.GetSegmentation().GetConversionParameter(
        converter.GetReferenceImageGeometryParameterName()
    )
    image = slicer.vtkOrientedImageData()
    if not text or not converter.DeserializeImageGeometry(text, image, False):
        return None
    extent = image.GetExtent()
    shape = tuple(int(extent[2 * i + 1] - extent[2 * i] + 1) for i in range(3))
    if min(shape) < 1:
        return None
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    affine = _numpy_matrix(matrix)
    affine[:3, 3] += affine[:3, :3] @ np.array(extent[::2], float)  # voxel (0,0,0) is the extent's start
    return shape, affine


def _canvases(scene) -> list:
    found = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    nodes = [found.GetItemAsObject(i) for i in range(found.GetNumberOfItems())]
    return [n for n in nodes if n.GetAttribute(CANVAS_ROLE)]


def adopt_result(scene, path: str | os.PathLike, name: str, reference_volume=None):
    """Load a worker's output as a volume beside the reference and forget its temporary file (and
    folder): the scene keeps the data, and saving the scene writes it anew."""
    path = Path(path)
    volume = load_result(scene, path, name, reference_volume)
    place_in_study(scene, volume, reference_volume)
    storage = volume.GetStorageNode()
    volume.SetAndObserveStorageNodeID(None)
    if storage is not None:
        scene.RemoveNode(storage)
    for leftover in path.parent.iterdir():
        leftover.unlink()
    path.parent.rmdir()
    return volume
