"""3D Slicer module: synthetic CT from a segmentation (MAISI-v2).

Placeholder until the module issue: the module registers and loads without torch; the engine
(MaisiSynthLib) runs in a background worker process, never inside Slicer's GUI thread.
"""

import slicer  # noqa: F401  (only inside Slicer)
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleWidget


class MaisiSynth(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MaisiSynth"
        self.parent.categories = ["Segmentation"]
        self.parent.contributors = ["MaisiSynth developers"]
        self.parent.helpText = "Generate a synthetic CT from a segmentation with MAISI-v2."
        self.parent.acknowledgementText = "Builds on MONAI's MAISI networks (NVIDIA, MONAI Consortium)."


class MaisiSynthWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
