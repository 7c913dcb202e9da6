"""Image/label case sets on disk: a folder of `*_image.nii.gz` + `*_label.nii.gz` pairs or a MONAI datalist.

Training reads them, evaluation measures against them and `maisi-synth phantoms` writes them; no torch
here, so each can find the pairs without importing the others.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import OptionError


def find_pairs(cases: str | Path) -> list[tuple[str, Path, Path]]:
    """(name, image, label) from a folder of `*_image.nii.gz` + `*_label.nii.gz` or a MONAI datalist."""
    root = Path(cases)
    if root.is_file() and root.suffix == ".json":
        data = json.loads(root.read_text())
        entries = data.get("training", data) if isinstance(data, dict) else data
        pairs = []
        for entry in entries:
            image, label = root.parent / entry["image"], root.parent / entry["label"]
            pairs.append((Path(entry["image"]).name.split(".")[0], image, label))
    elif root.is_dir():
        pairs = []
        for image in sorted(root.glob("*_image.nii*")):
            label = image.with_name(image.name.replace("_image.", "_label."))
            if label.exists():
                pairs.append((image.name.split("_image.")[0], image, label))
    else:
        raise OptionError(
            f"training cases not found: {cases}",
            'point "cases" at a folder of *_image/*_label pairs or a datalist JSON',
        )
    if not pairs:
        raise OptionError(
            f"no image/label pairs in {cases}", "write cases with `maisi-synth phantoms` or a datalist JSON"
        )
    return pairs
