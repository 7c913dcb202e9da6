"""Which model folder a request uses when it names none, and where downloaded official weights live.

Every front door (CLI generate / info / batch / evaluate, the worker, the HTTP server, the Slicer
module) resolves the model folder the same way, first match wins:

1. an explicit folder (`--model-dir`, a request's `model_dir`, the module's *Model folder* field);
2. `$MAISI_SYNTH_MODEL_DIR`;
3. the official MAISI-v2 weights that `maisi-synth download` put into the per-user folder
   (`official_model_dir()`), but only once its manifest says the download finished: a folder
   without the manifest, or whose listed files are missing or of another size, is never used;
4. the embedded demo model (`Resources/models/demo`).

`ModelChoice.describe()` is the one line that tells users which of these they got.

The per-user folder is `$MAISI_SYNTH_HOME` when set, else the platform's cache folder, written by
hand rather than with platformdirs (Slicer's Python does not ship it): `%LOCALAPPDATA%` on Windows,
`~/Library/Caches` on macOS, `$XDG_CACHE_HOME` or `~/.cache` elsewhere.

No torch and no huggingface_hub here: the Slicer process imports this module (Python 3.9 and up,
on Windows too), and `models.py` takes its file names from here.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

# File names of a model folder (official names; models.py finds them flat or in configs/ + models/).
CONFIG_NAME = "config_network_rflow.json"
INFER_CONFIG_NAME = "config_infer.json"
SETTINGS_NAME = "maisi_synth.json"
AUTOENCODER_FILE = "autoencoder_v1.pt"
UNET_FILE = "diff_unet_3d_rflow-ct.pt"
CONTROLNET_FILE = "controlnet_3d_rflow-ct.pt"
PRIOR_FILE = "latent_prior.pt"  # MaisiSynth's own (latent_prior.py): per-label latent levels, optional


def find_model_file(folder: PathLike, name: str) -> Optional[Path]:
    """`name` in a model folder, flat or in the official layout (configs/*.json, models/*.pt); None if
    absent. The one place that knows where a model folder keeps its files."""
    root = Path(folder)
    official = root / ("configs" if name.endswith(".json") else "models") / name
    for candidate in (root / name, official):
        if candidate.is_file():
            return candidate
    return None


OFFICIAL_REPO = "nvidia/NV-Generate-CT"
OFFICIAL_FOLDER_NAME = "NV-Generate-CT"
# Written last by a download, removed first when one changes the folder (download.py).
MANIFEST_NAME = "maisi_synth_download.json"
MANIFEST_FORMAT = 1

HOME_VARIABLE = "MAISI_SYNTH_HOME"
MODEL_DIR_VARIABLE = "MAISI_SYNTH_MODEL_DIR"
APP_FOLDER = "maisi-synth"

PathLike = Union[str, os.PathLike]


def user_cache_dir() -> Path:
    """The per-user folder MaisiSynth keeps downloads in (`$MAISI_SYNTH_HOME` overrides it)."""
    override = os.environ.get(HOME_VARIABLE, "").strip()
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA", "").strip()
        return (Path(base) if base else Path.home() / "AppData" / "Local") / APP_FOLDER
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / APP_FOLDER
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    # the XDG spec says a relative value is invalid and must be ignored
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / APP_FOLDER


def official_model_dir() -> Path:
    """Where `maisi-synth download` puts the official weights unless told otherwise (`--dest`)."""
    return user_cache_dir() / OFFICIAL_FOLDER_NAME


def demo_model_dir() -> Path:
    """The embedded demo model (a source checkout and the Slicer extension both keep it here)."""
    return Path(__file__).resolve().parent.parent / "Resources" / "models" / "demo"


def read_manifest(folder: PathLike) -> Optional[dict]:
    """The download manifest of `folder` if the download it describes is complete, else None.

    Complete: the manifest parses, is of a known format, and every file it lists exists with the
    size it records. Sizes, not hashes: this runs before every generation, and hashing gigabytes
    there would cost seconds; `maisi-synth download` re-hashes when run again.
    """
    path = Path(folder) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None
    entries = manifest.get("files")
    if not isinstance(entries, list) or not entries:
        return None
    for entry in entries + list(manifest.get("configs") or []):
        if not (isinstance(entry, dict) and isinstance(entry.get("path"), str) and isinstance(entry.get("size"), int)):
            return None
        file = Path(folder) / entry["path"]
        try:
            if not file.is_file() or file.stat().st_size != entry["size"]:
                return None
        except OSError:
            return None
    return manifest


@dataclass(frozen=True)
class ModelChoice:
    """A resolved model folder and why it was chosen: "given", "environment", "official" or "demo"."""

    path: Path
    source: str
    manifest: Optional[dict] = None

    def describe(self) -> str:
        """One line for the output: which model, from where."""
        if self.manifest is not None:
            repo, commit = self.manifest.get("repo", OFFICIAL_REPO), str(self.manifest.get("commit", "?"))[:12]
            return f"official MAISI-v2 weights {repo} (revision {commit}) in {self.path}"
        if _same_folder(self.path, demo_model_dir()):
            return (
                f"embedded demo model in {self.path} (trained on phantoms, not for real work; "
                "`maisi-synth download` gets the official weights)"
            )
        if self.source == "environment":
            return f"model folder {self.path} (from ${MODEL_DIR_VARIABLE})"
        return f"model folder {self.path}"

    def to_dict(self) -> dict:
        return {"path": str(self.path), "source": self.source, "description": self.describe()}


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def choose_model_dir(explicit: Optional[PathLike] = None) -> ModelChoice:
    """The model folder a request uses (see the module docstring for the order)."""
    if explicit:
        path = Path(explicit).expanduser()
        return ModelChoice(path, "given", read_manifest(path))
    from_env = os.environ.get(MODEL_DIR_VARIABLE, "").strip()
    if from_env:
        path = Path(from_env).expanduser()
        return ModelChoice(path, "environment", read_manifest(path))
    official = official_model_dir()
    manifest = read_manifest(official)
    if manifest is not None:
        return ModelChoice(official, "official", manifest)
    return ModelChoice(demo_model_dir(), "demo")
