"""MaisiSynth engine: MAISI-v2 mask → synthetic CT (no Slicer or Qt imports).

Heavy modules (torch, MONAI) load lazily so that `import MaisiSynthLib` stays cheap, e.g. inside
Slicer before PyTorch is installed.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
