"""MaisiSynth: mask → synthetic CT inside 3D Slicer (widget + glue; the logic is in MaisiSynthLib).

Generation runs in a background worker process (`MaisiSynthLib.client`), never in Slicer's own
process: the GUI polls the worker's events from a timer and stays responsive. Nothing heavy is
imported at module load, so the module appears even when PyTorch is not installed.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ctk
import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


def _engine_on_path() -> None:
    """MaisiSynthLib: beside this file when installed, one folder up in a checkout (not at file scope)."""
    here = Path(__file__).resolve().parent
    found = [c for c in (here, here.parent) if (c / "MaisiSynthLib" / "__init__.py").exists()]
    if found and str(found[0]) not in sys.path:
        sys.path.insert(0, str(found[0]))


def _lib(name):
    """A MaisiSynthLib module, imported on first use (the module loads before torch is installed)."""
    return importlib.import_module(f"MaisiSynthLib.{name}")


POLL_MS = 100


class _UserAction:
    """Shows a failure once (a user error's one line; a bug's traceback goes to the log) and does not
    re-raise, so the code after the block always runs; `ok` says whether the block succeeded."""

    def __init__(self, message):
        self.message, self.ok = message, False

    def __enter__(self):
        qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
        return self

    def __exit__(self, kind, error, traceback):
        qt.QApplication.restoreOverrideCursor()
        self.ok = error is None
        if error is not None:
            text, bug = _lib("gui_options").failure_text(self.message, error)
            if bug:
                logging.error("MaisiSynth: %s", self.message, exc_info=(kind, error, traceback))
            slicer.util.errorDisplay(text)
        return True  # handled: never re-raised into Qt


class MaisiSynth(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        _engine_on_path()
        parent.title = "MaisiSynth"
        parent.categories = ["Segmentation"]
        parent.dependencies = ["Segmentations", "SegmentEditor"]
        parent.contributors = ["MaisiSynth developers"]
        parent.helpText = (
            "Turn a segmentation into a synthetic CT with MAISI-v2 (rectified-flow latent diffusion + ControlNet). "
            "Edit the mask, swap, remove or insert tumors, press Generate. The embedded demo model was trained on "
            "phantoms; press 'Get official weights' (NV-Generate-CT) for real work."
        )
        parent.acknowledgementText = "Built on MONAI's MAISI networks; MAISI-v2, arXiv 2508.05772."


class MaisiSynthWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.requestId = self.downloadId = self.probe = None
        self.timer = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        from MaisiSynthLib import labels as L
        from MaisiSynthLib.gui_options import MENUS

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MaisiSynth.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MaisiSynthLogic()

        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())
        # the module's own selectors drive the editor; two sets of selectors would drift apart
        self.ui.segmentEditorWidget.setSegmentationNodeSelectorVisible(False)
        self.ui.segmentEditorWidget.setSourceVolumeNodeSelectorVisible(False)
        self.ui.modelDirPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs  # a model is a folder, not a file
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        for name, items in MENUS.items():
            getattr(self.ui, name).addItems(items)
        for tumor in L.TUMORS:
            self.ui.tumorTypeComboBox.addItem(L.name_of(tumor), tumor)
        self.ui.mappingTable.setHorizontalHeaderLabels(["Segment", "MAISI label", "from"])
        self.ui.pythonPathLineEdit.currentPath = qt.QSettings().value("MaisiSynth/python", "")
        self.ui.modelDirPathLineEdit.currentPath = qt.QSettings().value("MaisiSynth/modelDir", "")
        self.ui.serverUrlLineEdit.text = qt.QSettings().value("MaisiSynth/serverUrl", "")

        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.ui.referenceVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onReferenceChanged)
        self.ui.refreshMappingButton.connect("clicked(bool)", self.updateMapping)
        self.ui.mappingTable.connect("cellChanged(int,int)", self.onMappingEdited)
        self.ui.swapTumorButton.connect("clicked(bool)", self.onSwapTumor)
        self.ui.removeTumorButton.connect("clicked(bool)", self.onRemoveTumor)
        self.ui.insertTumorButton.connect("clicked(bool)", self.onInsertTumor)
        self.ui.generateButton.connect("clicked(bool)", self.onGenerateOrCancel)
        self.ui.sideBySideButton.connect("clicked(bool)", self.onSideBySide)
        self.ui.fadeSlider.connect("valueChanged(double)", self.onFade)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.checkDependenciesButton.connect("clicked(bool)", self.onCheckDependencies)
        self.ui.downloadButton.connect("clicked(bool)", self.onDownloadOrCancel)

        self.timer = qt.QTimer()
        self.timer.connect("timeout()", self.onPoll)
        self.timer.start(POLL_MS)
        self.onSegmentationChanged(self.ui.segmentationSelector.currentNode())

    def enter(self):
        self.ui.segmentEditorWidget.installKeyboardShortcuts()
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())
        self.ui.segmentEditorWidget.updateEffectList()  # effects registered after setup (other extensions)
        if self.probe is None:  # once, in the background: a fresh install hears of it before Generate
            self.onCheckDependencies(quiet=True)

    def exit(self):
        # an effect left active would keep painting in the views after the user left the module
        self.ui.segmentEditorWidget.setActiveEffect(None)
        self.ui.segmentEditorWidget.uninstallKeyboardShortcuts()

    def onSceneStartClose(self, caller=None, event=None):
        self.logic.jobs.clear(cancel=self.logic.session.cancel)  # the worker and a download go on
        self.requestId, self.ui.generateButton.text = None, "Generate"

    def cleanup(self):
        self.removeObservers()
        if self.timer is not None:
            self.timer.stop()
        if self.logic is not None:
            self.logic.shutdown()

    # -- inputs and mapping -------------------------------------------------------------------------

    def onSegmentationChanged(self, node):
        self.ui.segmentEditorWidget.setSegmentationNode(node)
        S = slicer.vtkSegmentation
        events = (S.SegmentAdded, S.SegmentRemoved, S.SegmentModified)
        previous = getattr(self, "observedSegmentation", None)
        if previous is not None:  # only the segment observers: the scene-close observer stays
            for event in events:
                self.removeObserver(previous, event, self.onSegmentsChanged)
        self.observedSegmentation = node.GetSegmentation() if node is not None else None
        if self.observedSegmentation is not None:
            for event in events:
                self.addObserver(self.observedSegmentation, event, self.onSegmentsChanged)
        self.updateMapping()
        self.onReferenceChanged(self.ui.referenceVolumeSelector.currentNode())  # last: observers are in place

    def onSegmentsChanged(self, caller=None, event=None):
        self.updateMapping()

    def onReferenceChanged(self, node):
        segmentation = self.ui.segmentationSelector.currentNode()
        self.ui.segmentEditorWidget.setAutoShowSourceVolumeNode(node is not None)  # a canvas is not shown
        if node is None and segmentation is not None:
            with _UserAction("Cannot make a blank volume to paint on."):  # painting needs a source volume
                node = self.logic.canvasVolume(segmentation)
        elif segmentation is not None:
            with _UserAction("Cannot keep the segmentation before edits."):  # what an edit of this CT compares against
                _lib("scene").ensure_snapshot(slicer.mrmlScene, segmentation, node)
        self.ui.segmentEditorWidget.setSourceVolumeNode(node)

    def updateMapping(self):
        from MaisiSynthLib import labels as L
        from MaisiSynthLib import scene

        node = self.ui.segmentationSelector.currentNode()
        rows = scene.segment_labels(node) if node is not None else []
        table = self.ui.mappingTable
        table.blockSignals(True)
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, text in enumerate(
                [row.name, "" if row.label is None else f"{row.label} {L.name_of(row.label)}", row.source or "unmapped"]
            ):
                item = qt.QTableWidgetItem(text)
                item.setData(qt.Qt.UserRole, row.segment_id)
                if c != 1:
                    item.setFlags(item.flags() & ~qt.Qt.ItemIsEditable)
                if row.label is None:
                    item.setBackground(qt.QColor(255, 200, 200))
                table.setItem(r, c, item)
        table.blockSignals(False)
        unmapped = [row.name for row in rows if row.label is None]
        self.ui.unmappedLabel.text = (
            f"Not mapped (set a MAISI id or name in the 'MAISI label' column): {', '.join(unmapped)}"
            if unmapped
            else ""
        )
        self.updateGenerateButton(unmapped)
        self.ui.tumorSegmentComboBox.clear()
        for row in rows:
            if row.is_tumor:
                self.ui.tumorSegmentComboBox.addItem(row.name, row.segment_id)

    def updateGenerateButton(self, unmapped=()):
        """Generate only with a segmentation whose segments all map to MAISI labels (Cancel while running)."""
        if self.requestId is not None:
            self.ui.generateButton.enabled = True
            return
        missing = "" if self.ui.segmentationSelector.currentNode() else "Select a segmentation."
        missing = missing or (f"Map these segments first: {', '.join(unmapped)}" if unmapped else "")
        self.ui.generateButton.enabled = not missing
        self.ui.generateButton.toolTip = missing or "Generate a synthetic CT from this segmentation"

    def onMappingEdited(self, row, column):
        from MaisiSynthLib import labels as L
        from MaisiSynthLib import scene

        item = self.ui.mappingTable.item(row, column)
        text = item.text().strip()
        label = int(text.split()[0]) if text.split() and text.split()[0].isdigit() else L.id_for_name(text)
        with _UserAction("Cannot set this label."):
            if label is None:
                raise ValueError(f"'{text}' is not a MAISI id or structure name (see 'maisi-synth labels')")
            scene.set_segment_label(self.ui.segmentationSelector.currentNode(), item.data(qt.Qt.UserRole), label)
        self.updateMapping()

    # -- tumor tools ----------------------------------------------------------------------------------

    def _selectedTumor(self):
        return self.ui.tumorSegmentComboBox.currentData

    def _segmentationNode(self):
        return self.ui.segmentationSelector.currentNode()

    def _referenceNode(self):
        return self.ui.referenceVolumeSelector.currentNode()

    def onSwapTumor(self):
        with _UserAction("Cannot change the tumor type."):
            tumor = self.ui.tumorTypeComboBox.currentData
            self.logic.swapTumor(self._segmentationNode(), self._selectedTumor(), tumor, self._referenceNode())
        self.updateMapping()

    def onRemoveTumor(self):
        with _UserAction("Cannot remove the tumor."):
            self.logic.removeTumor(self._segmentationNode(), self._selectedTumor(), self._referenceNode())
        self.updateMapping()

    def onInsertTumor(self):
        with _UserAction("Cannot insert the lesion."):
            self.logic.insertTumor(
                self._segmentationNode(),
                self._referenceNode(),
                self.ui.tumorTypeComboBox.currentData,
                self.logic.lesionCentre(self.ui.lesionPointSelector.currentNode()),
                self.ui.lesionDiameterSpinBox.value,
            )
        self.updateMapping()

    # -- generate / cancel ----------------------------------------------------------------------------

    def options(self):
        from MaisiSynthLib.gui_options import GenerateOptions, from_spin_box

        return GenerateOptions(
            grid_preset=self.ui.gridPresetComboBox.currentIndex,
            steps=from_spin_box("stepsSpinBox", self.ui.stepsSpinBox.value),
            seed=self.ui.seedSpinBox.value,
            cfg_scale=from_spin_box("cfgSpinBox", self.ui.cfgSpinBox.value),
            solver=self.ui.solverComboBox.currentText,
            mask_guidance=from_spin_box("maskGuidanceSpinBox", self.ui.maskGuidanceSpinBox.value),
            latent_prior=self.ui.latentPriorComboBox.currentText,
            device=self.ui.deviceComboBox.currentText,
            model_dir=self.ui.modelDirPathLineEdit.currentPath,
            python=self.ui.pythonPathLineEdit.currentPath,
            server_url=self.ui.serverUrlLineEdit.text.strip(),
            token=self.ui.tokenLineEdit.text,
            edit_mode=self.ui.editModeComboBox.currentText,
        )

    def onGenerateOrCancel(self):
        if self.requestId is not None:
            self.logic.cancel(self.requestId)
            self.ui.statusLabel.text = "Cancelling…"
            return
        options = self.options()
        problems = options.problems()
        if not options.server_url and self.probe is not None and self.probe.lacking and not self.probe.offered:
            return self.onProbed(self.probe)  # offers the install (a fresh install: before "worker died")
        if problems:
            slicer.util.errorDisplay("Cannot generate yet:\n\n• " + "\n• ".join(problems))
            return
        saved = {"python": options.python, "modelDir": options.model_dir, "serverUrl": options.server_url}
        for key, value in saved.items():
            qt.QSettings().setValue(f"MaisiSynth/{key}", value)
        self.ui.logTextEdit.clear()
        with _UserAction("Cannot start the generation.") as action:
            self.requestId = self.logic.generate(self._segmentationNode(), self._referenceNode(), options, self.onEvent)
        if not action.ok:
            return
        self.workerReported = False
        self.ui.generateButton.text = "Cancel"
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = _lib("gui_progress").queued_status(self.logic.session.starting, self.downloadId)

    def onEvent(self, event):
        from MaisiSynthLib import gui_options, gui_progress

        client = self.logic.client
        if client is not None and not getattr(self, "workerReported", True):
            self.ui.logTextEdit.appendPlainText(gui_progress.worker_line(client.ready or {}))
            self.workerReported = True
        kind = event.get("type")
        if kind == "progress":
            self.ui.progressBar.value, self.ui.statusLabel.text = gui_progress.describe(event)
        elif kind == "log":
            self.ui.logTextEdit.appendPlainText(f"[{event.get('level', 'info')}] {event.get('message', '')}")
        elif kind in ("result", "error"):
            self.requestId, self.ui.generateButton.text = None, "Generate"
            self.ui.progressBar.value, self.ui.statusLabel.text = gui_progress.final_status(event)
            job = self.logic.jobs.end(event)  # an error's folder is removed now
            if kind == "result" and job is not None:
                with _UserAction("Cannot load the result.") as action:
                    self.ui.resultSelector.setCurrentNode(self.logic.loadResult(event, job))
                    self.onSideBySide()
                self.ui.statusLabel.text = self.ui.statusLabel.text if action.ok else "Failed to load the result"
            elif event.get("kind") != "cancelled":
                slicer.util.errorDisplay(gui_options.error_text(event))

    # -- official weights ---------------------------------------------------------------------------

    def onDownloadOrCancel(self):
        if self.downloadId is not None:
            return self.logic.cancel(self.downloadId)
        with _UserAction("Cannot start the download.") as action:
            self.downloadId = self.logic.download(self.options(), self.ui.hfTokenLineEdit.text, self.onDownloadEvent)
        self.ui.downloadButton.text = "Cancel download" if action.ok else self.ui.downloadButton.text

    def onDownloadEvent(self, event):
        from MaisiSynthLib import gui_options, gui_progress

        kind = event.get("type")
        if kind in ("progress", "result", "error"):
            self.ui.downloadProgressBar.value, self.ui.downloadStatusLabel.text = gui_progress.download_status(event)
        if kind in ("result", "error"):
            self.downloadId, self.ui.downloadButton.text = None, "Get official weights"
        if kind == "result":  # from now on Generate uses these weights
            self.ui.modelDirPathLineEdit.currentPath = event["model_dir"]
            qt.QSettings().setValue("MaisiSynth/modelDir", event["model_dir"])
        elif kind == "error" and event.get("kind") != "cancelled":
            slicer.util.errorDisplay(gui_options.error_text(event))

    # -- dependencies -------------------------------------------------------------------------------

    def onCheckDependencies(self, quiet=False):
        python = self.options().python_executable()  # probed on a thread; onPoll hands on the report
        self.probe = _lib("dependencies").BackgroundProbe(python, self.logic.workerBaseEnvironment(python), quiet)

    def onPoll(self):
        self.logic.poll()
        if self.probe is not None and self.probe.report is not None and not self.probe.shown:
            self.probe.shown = True
            self.ui.logTextEdit.appendPlainText(_lib("dependencies").summary(self.probe.report))
            if not self.probe.quiet:
                self.onProbed(self.probe)

    def onProbed(self, probe):
        dependencies, python, lacking, probe.offered = _lib("dependencies"), probe.python, probe.lacking, True
        if lacking and self.options().python:  # an external Python: the user installs there
            hint, note = dependencies.install_hint(python, lacking), dependencies.install_note(python, lacking)
            slicer.util.infoDisplay(f"Install the missing packages with:\n\n{hint}\n\n{note}".strip())
        elif lacking and slicer.util.confirmOkCancelDisplay(f"Install {', '.join(lacking)} into Slicer's Python?"):
            self.logic.installIntoSlicer(lacking)
            self.onCheckDependencies()  # again, in the background: what the install achieved

    # -- result ---------------------------------------------------------------------------------------

    def onSideBySide(self):
        result = self.ui.resultSelector.currentNode()
        self.logic.showSideBySide(self._referenceNode(), result, self._segmentationNode())
        self.onFade(self.ui.fadeSlider.value)

    def onFade(self, value):
        self.logic.setFade(self._referenceNode(), self.ui.resultSelector.currentNode(), value)

    def onExport(self):
        with _UserAction("Cannot export."):
            node, folder = self.ui.resultSelector.currentNode(), self.ui.exportDirPathLineEdit.currentPath
            image, label = self.logic.exportPair(node, self._segmentationNode(), folder)
            self.ui.logTextEdit.appendPlainText(f"exported {image} and {label}")


class MaisiSynthLogic(ScriptedLoadableModuleLogic):
    """Glue between the scene (MaisiSynthLib.scene), the worker client and Slicer's views."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.session = _lib("client").ClientSession()
        self.jobs = _lib("jobs").JobRecords()  # request id → what its end needs, its temporary folder

    # -- scene edits ----------------------------------------------------------------------------------

    @staticmethod
    def segmentEditorNode():
        """Its own Segment Editor node: sharing the Segment Editor module's would switch that module's state."""
        node = slicer.mrmlScene.GetSingletonNode("MaisiSynth", "vtkMRMLSegmentEditorNode")
        if node is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode", "MaisiSynth segment editor")
            node.SetSingletonTag("MaisiSynth")
        return node

    @staticmethod
    def canvasVolume(segmentation):
        return _lib("scene").canvas_volume(slicer.mrmlScene, segmentation)

    @contextlib.contextmanager
    def _grid(self, segmentation, reference):
        """The reference CT, else (removed afterwards) a label map on the segmentation's own geometry."""
        from MaisiSynthLib import scene

        if segmentation is None:
            raise ValueError("Select a segmentation first.")
        grid = reference if reference is not None else scene.reference_grid(slicer.mrmlScene, segmentation)
        try:
            yield grid
        finally:
            if reference is None:
                scene.discard(slicer.mrmlScene, grid)

    def swapTumor(self, segmentation, segmentId, tumor, reference=None):
        _lib("scene").swap_tumor(segmentation, segmentId, tumor, slicer.mrmlScene, reference)

    def removeTumor(self, segmentation, segmentId, reference):
        with self._grid(segmentation, reference) as grid:
            return _lib("scene").remove_tumor(slicer.mrmlScene, segmentation, segmentId, grid)

    def insertTumor(self, segmentation, reference, tumor, centreRas, diameterMm):
        with self._grid(segmentation, reference) as grid:
            return _lib("scene").insert_tumor(slicer.mrmlScene, segmentation, grid, tumor, centreRas, diameterMm)

    @staticmethod
    def lesionCentre(pointNode):
        """The first control point of a markup, else the crosshair (not the last mouse position)."""
        return _lib("scene").lesion_centre(slicer.mrmlScene, pointNode)

    # -- the worker -----------------------------------------------------------------------------------

    @staticmethod
    def workerBaseEnvironment(python):
        if not _lib("client").same_interpreter(python) and hasattr(slicer.util, "startupEnvironment"):
            return slicer.util.startupEnvironment()
        return None

    @staticmethod
    def installIntoSlicer(requirements):
        """torch through the PyTorch extension's PyTorch Utils (the build for this GPU), the rest with pip."""
        with _UserAction("Cannot install the packages."):
            from MaisiSynthLib.dependencies import PYTORCH_EXTENSION_MISSING, TORCH_REQUIREMENT

            if any(r.startswith("torch") for r in requirements):
                try:
                    import PyTorchUtils
                except ImportError:
                    raise ValueError(PYTORCH_EXTENSION_MISSING) from None
                if PyTorchUtils.PyTorchUtilsLogic().installTorch(torchVersionRequirement=TORCH_REQUIREMENT) is None:
                    raise ValueError("PyTorch was not installed (see the PyTorch Utils module)")
            rest = [r for r in requirements if not r.startswith("torch")]
            if rest:
                slicer.util.pip_install(" ".join(f'"{r}"' for r in rest))

    def generate(self, segmentation, reference, options, onEvent):
        """Write the request's files (a CT's edit, or a mask for a new CT), send it; the request id."""
        if segmentation is None:
            raise ValueError("Select a segmentation first.")
        folder = Path(tempfile.mkdtemp(prefix="MaisiSynth-"))
        try:
            params, region = _lib("scene").prepare_generate(slicer.mrmlScene, segmentation, reference, options, folder)
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        key, factory = options.client_factory(self.workerBaseEnvironment(options.python_executable()))
        inputName = (reference or segmentation).GetName()
        requestId = self.session.request(key, factory, params, onEvent)  # returns at once; see poll()
        referenceId = reference.GetID() if reference else None
        self.jobs.add(requestId, _lib("jobs").Job(inputName, referenceId, options.seed, region, folder))
        return requestId

    def download(self, options, hfToken, onEvent):
        """The official weights, fetched by the local worker in the background; returns the request id."""
        local, params = options.download_request(hfToken)
        key, factory = local.client_factory(self.workerBaseEnvironment(local.python_executable()))
        return self.session.request(key, factory, params, onEvent, kind="download")

    @property
    def client(self):
        return self.session.client if self.session.ready else None

    def poll(self):
        self.session.poll()

    def cancel(self, requestId):
        self.session.cancel(requestId)

    def shutdown(self):
        """Stop the local worker this module started; a remote server is left running (it may be shared)."""
        self.session.close()
        self.jobs.clear()

    def loadResult(self, event, job):
        reference = slicer.mrmlScene.GetNodeByID(job.reference_id) if job.reference_id else None
        try:
            adopt = _lib("scene").adopt_edit_result
            return adopt(slicer.mrmlScene, event["output"], job.input_name, job.seed, job.region, reference)
        finally:
            self.jobs.discard(job)

    # -- views ----------------------------------------------------------------------------------------

    def showSideBySide(self, reference, synthetic, segmentation):
        if synthetic is None:
            return
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
        _lib("scene").compare_side_by_side(slicer.mrmlScene, reference, synthetic, segmentation)
        slicer.util.resetSliceViews()

    def setFade(self, reference, synthetic, value):
        if reference is None or synthetic is None:
            return
        composite = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceCompositeNode()
        composite.SetForegroundVolumeID(synthetic.GetID())
        composite.SetForegroundOpacity(value)

    def exportPair(self, synthetic, segmentation, folder):
        if synthetic is None or segmentation is None or not folder:
            raise ValueError("Choose a synthetic CT, its segmentation and an export folder.")
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in synthetic.GetName())
        return _lib("scene").export_pair(slicer.mrmlScene, synthetic, segmentation, folder, stem)


class MaisiSynthTest(ScriptedLoadableModuleTest):
    """Runs the real flow inside Slicer: example mask → worker (CPU, demo model) → result volume."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_generate_from_example()

    def test_generate_from_example(self):
        from MaisiSynthLib.gui_options import GenerateOptions

        scene, dependencies, python = _lib("scene"), _lib("dependencies"), GenerateOptions().python_executable()
        lacking = [r for r in dependencies.missing(dependencies.probe(python)) if r.startswith(("torch", "monai"))]
        if lacking:  # a build's Python without them cannot run the worker: say so, do not hang or fail
            return self.delayDisplay(f"Skipped: the worker Python {python} lacks {', '.join(lacking)}")
        here = Path(__file__).resolve().parent  # the example: one up in a checkout, beside when installed
        example = next(p / "Resources/examples/example_hepatic_tumor.nii.gz" for p in (here.parent, here)
                       if (p / "Resources/examples/example_hepatic_tumor.nii.gz").exists())  # fmt: skip
        labelmap = slicer.util.loadLabelVolume(str(example))  # Slicer's own reader (Slicer ships no NIfTI package)
        mask = scene.array_from_volume(labelmap)
        segmentation = scene.import_labels(slicer.mrmlScene, mask, scene.ijk_to_ras(labelmap), "example")
        self.delayDisplay("Generating (CPU, 3 steps)")
        logic, events, deadline = MaisiSynthLogic(), [], time.monotonic() + 600
        try:
            logic.generate(segmentation, None, GenerateOptions(steps=3, device="cpu"), events.append)
            while not any(e.get("type") in ("result", "error") for e in events):
                self.assertLess(time.monotonic(), deadline, "no result from the worker within 10 minutes")
                logic.poll()
                slicer.app.processEvents()
                time.sleep(0.02)
            self.assertEqual(events[-1]["type"], "result", events[-1])
            volume = logic.loadResult(events[-1], logic.jobs.end(events[-1]))
            self.assertEqual(volume.GetImageData().GetDimensions(), tuple(mask.shape))
            self.assertTrue(abs(scene.array_from_volume(volume)).max() <= 1000)  # HU of a CT
        finally:
            logic.shutdown()  # the worker stops whatever happened
        self.delayDisplay("Test passed")
