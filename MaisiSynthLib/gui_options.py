"""The Slicer module's generate options: presets, validation before running, worker params.

Kept out of the module file so that it is tested without Qt; nothing here imports torch.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .request import DEFAULTS, DEVICES, SOLVER_NAMES, field_problem

# (label, output size or None for the reference grid / "auto", spacing in mm or None)
GRID_PRESETS: list[tuple[str, tuple[int, int, int] | str | None, tuple[float, float, float] | None]] = [
    ("Reference grid", None, None),
    ("Nearest allowed size (auto)", "auto", None),
    ("512×512×256, 0.8×0.8×1.5 mm (official)", (512, 512, 256), (0.8, 0.8, 1.5)),
    ("256×256×256, 1.5 mm (official)", (256, 256, 256), (1.5, 1.5, 1.5)),
    ("128×128×64, 3×3×5 mm (demo model)", (128, 128, 64), (3.0, 3.0, 5.0)),
]
SOLVERS = SOLVER_NAMES  # the menus offer exactly what a request takes (request.py)
# The latent prior menu, label → the request's latent_prior_from (None: the model folder's own
# setting; 1: from the last step on, i.e. never applied), in menu order.
LATENT_PRIOR_CHOICES: dict[str, float | None] = {"model default": None, "off": 1.0}
# What Generate does with a chosen reference CT, menu label → mode: "auto" edits the CT (keeps it
# outside what the mask changed) when the change is local (`scene.edit_is_local`), "edit" always edits
# it, "new" draws a new CT on its grid.
EDIT_MODES: dict[str, str] = {
    "edit it where the mask changed (if local)": "auto",
    "edit it where the mask changed": "edit",
    "draw a new CT on its grid": "new",
}
# Spin boxes whose lowest value reads "model default" (Qt's specialValueText), spin box name in
# MaisiSynth.ui → (option, that value): at or below it the request leaves the option out, so the model
# folder's own setting applies (maisi_synth.json, its inference config), as on the command line.
MODEL_DEFAULT_SPINS: dict[str, tuple[str, float]] = {
    "stepsSpinBox": ("steps", 0),
    "cfgSpinBox": ("cfg_scale", -0.5),
    "maskGuidanceSpinBox": ("mask_guidance", 0.5),
}
PANEL_DEFAULTS = {option for option, _ in MODEL_DEFAULT_SPINS.values()}
# The panel's fixed menus: combo box name in MaisiSynth.ui → its items, in order.
MENUS: dict[str, list[str]] = {
    "editModeComboBox": list(EDIT_MODES),
    "gridPresetComboBox": [label for label, _, _ in GRID_PRESETS],
    "solverComboBox": list(SOLVERS),
    "deviceComboBox": list(DEVICES),
    "latentPriorComboBox": list(LATENT_PRIOR_CHOICES),
}
__all__ = [
    "DEVICES",
    "EDIT_MODES",
    "GRID_PRESETS",
    "LATENT_PRIOR_CHOICES",
    "MENUS",
    "MODEL_DEFAULT_SPINS",
    "SOLVERS",
    "GenerateOptions",
    "error_text",
    "failure_text",
    "from_spin_box",
]


@dataclass
class GenerateOptions:
    grid_preset: int = 0
    # None: the model folder's setting (the spin boxes' 'model default'); only what the user set is sent
    steps: int | None = None
    seed: int = DEFAULTS["seed"]
    cfg_scale: float | None = None  # 0: off
    solver: str = DEFAULTS["solver"]
    mask_guidance: float | None = None  # 1 (off) .. 10
    latent_prior: str = next(iter(LATENT_PRIOR_CHOICES))
    device: str = DEFAULTS["device"]
    model_dir: str = ""  # empty: the downloaded official weights, else the embedded demo model
    python: str = ""  # empty: Slicer's own Python
    server_url: str = ""  # set: use a remote `maisi-synth serve`
    token: str = ""
    edit_mode: str = next(iter(EDIT_MODES))  # a label of EDIT_MODES

    def wants_edit(self, local: bool) -> bool:
        """Whether Generate edits the reference CT rather than drawing a new one (with a CT chosen)."""
        mode = EDIT_MODES.get(self.edit_mode, "auto")
        return mode == "edit" or (mode == "auto" and local)

    def problems(self) -> list[str]:
        """Every option that would make the request fail, each with what to do; empty when fine."""
        out = []
        if not 0 <= self.grid_preset < len(GRID_PRESETS):
            out.append("choose an output grid preset")
        # The same rules as every front door (request.py); Qt spin boxes hold floats for whole numbers.
        for name, value in (
            ("steps", None if self.steps is None else _whole(self.steps)),
            ("seed", _whole(self.seed)),
            ("cfg_scale", None if self.cfg_scale is None else float(self.cfg_scale)),
            ("mask_guidance", None if self.mask_guidance is None else float(self.mask_guidance)),
            ("solver", self.solver),
        ):
            problem = field_problem(name, value) if value is not None else None
            if problem:
                out.append(problem + (" (or 'model default')" if name in PANEL_DEFAULTS else ""))
        if self.edit_mode not in EDIT_MODES:
            out.append(f"the reference CT's use must be one of {', '.join(EDIT_MODES)}")
        if self.latent_prior not in LATENT_PRIOR_CHOICES:
            out.append(f"latent prior must be one of {', '.join(LATENT_PRIOR_CHOICES)}")
        if self.device not in DEVICES:  # the menu's choices; a request would also take cuda:N
            out.append(f"device must be one of {', '.join(DEVICES)}")
        if self.server_url:
            url = urlparse(self.server_url)
            if url.scheme not in ("http", "https") or not url.netloc:
                out.append(f"the server URL '{self.server_url}' is not an http(s) address, e.g. http://gpu-host:8765")
            elif url.hostname not in ("127.0.0.1", "localhost", "::1") and not self.token:
                out.append("a remote server needs its token (the server refuses requests without it)")
        else:
            if self.model_dir and not Path(self.model_dir).expanduser().is_dir():
                out.append(f"model folder not found: {self.model_dir}")
            python = self.python_executable()
            if self.python and not (Path(python).is_file() or shutil.which(python)):
                out.append(
                    f"Python executable not found: {self.python} (give the full path of its python, e.g. "
                    "~/maisi-env/bin/python or C:\\maisi-env\\Scripts\\python.exe)"
                )
        return out

    def worker_params(self, mask: str, output: str, edit: dict | None = None) -> dict:
        """The `generate` params for the worker (a remote server chooses model and device itself).
        `edit`: the reference CT and original mask of an edit, which is on the CT's own grid."""
        _, size, spacing = GRID_PRESETS[self.grid_preset] if not edit else (None, None, None)
        params: dict = {
            "mask": mask,
            "output": output,
            "seed": int(self.seed),
            "solver": self.solver,
        }
        # absent: the model folder's sampling settings (maisi_synth.json), as on the command line
        if self.steps is not None:
            params["steps"] = int(self.steps)
        for name in ("cfg_scale", "mask_guidance"):
            if getattr(self, name) is not None:
                params[name] = float(getattr(self, name))
        if LATENT_PRIOR_CHOICES.get(self.latent_prior) is not None:
            params["latent_prior_from"] = LATENT_PRIOR_CHOICES[self.latent_prior]
        if size is not None:
            params["output_size"] = size if isinstance(size, str) else list(size)
        if spacing is not None:
            params["spacing"] = list(spacing)
        if edit:
            params.update(edit)
        if not self.server_url:
            params["device"] = self.device
            if self.model_dir:
                params["model_dir"] = self.model_dir
        return params

    def client_factory(self, base_env: dict | None = None) -> tuple:
        """(session key, factory) of the worker or server these options ask for (`client.ClientSession`
        starts it in the background). `base_env`: the environment a Python other than Slicer's starts
        from (Slicer's startup environment, not the launcher's)."""
        from .client import RemoteClient, WorkerClient

        if self.server_url:
            url, token = self.server_url, self.token or None
            return ("remote", url, self.token), lambda: RemoteClient(url, token=token)
        python, env = self.python_executable(), self.worker_env()
        return ("local", python, self.device), lambda: WorkerClient(python=python, env=env, base_env=base_env)

    def download_request(self, hf_token: str = "") -> tuple[GenerateOptions, dict]:
        """(options of the local worker that downloads, its `download` params): a download always runs
        in the local worker (a remote server's weights are the server's business); an empty token
        field leaves the worker's $HF_TOKEN or hub login to huggingface_hub."""
        local = GenerateOptions(**{**self.__dict__, "server_url": "", "token": ""})
        return local, ({"token": hf_token.strip()} if hf_token.strip() else {})

    def worker_env(self) -> dict:
        """Environment for a local worker: `device cpu` also hides GPUs from CUDA."""
        return {"CUDA_VISIBLE_DEVICES": "-1"} if self.device == "cpu" else {}

    def python_executable(self) -> str:
        """The worker's Python: the chosen one, else Slicer's own (PythonSlicer next to Slicer)."""
        if self.python:
            # "~/maisi-env/bin/python" is what the README tells users to type; no shell expands it here
            given = os.path.expanduser(self.python.strip())
            return shutil.which(given) or given
        here = Path(sys.executable)
        for name in ("PythonSlicer", "PythonSlicer.exe"):
            candidate = here.with_name(name)
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
        return sys.executable


def _whole(value):
    """A spin box's whole number as an int (3.0 → 3); anything else unchanged, for the check to refuse."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# Hints the engine words for the command line, said in terms of the module's controls.
_GUI_HINTS = {
    "bad-geometry": "choose the output grid 'Nearest allowed size (auto)' or another preset under Generation",
    "out-of-memory": "choose a smaller output grid preset, or use a remote GPU server (Generation → Remote server)",
    "worker-died": "check 'Worker Python' has torch and MONAI (see the log box and README → Use in 3D Slicer)",
    # downloads of the official weights: the command line's options are the module's fields here
    "missing-package": "install huggingface_hub into the worker Python: in Slicer's Python console "
    "slicer.util.pip_install('huggingface_hub'), for an external Worker Python <python> -m pip install huggingface_hub",
    "token-needed": "accept the license at https://huggingface.co/nvidia/NV-Generate-CT, create a read token at "
    "https://huggingface.co/settings/tokens and paste it into 'HF token'",
    "bad-token": "create a new read token at https://huggingface.co/settings/tokens and paste it into 'HF token'",
    "no-network": "check the internet connection (behind a proxy: set HTTPS_PROXY before starting Slicer), then "
    "press 'Get official weights' again: finished files are kept",
    "disk-full": "free some space (the weights take about 2.5 GB), then press 'Get official weights' again",
    "folder-in-use": "wait for the other download to finish, or move the folder named above out of the way",
}


def error_text(event: dict) -> str:
    """The message of a worker `error` event for a dialog: the problem, then what to do in the GUI."""
    message = event.get("message") or "the generation failed"
    hint = _GUI_HINTS.get(event.get("kind", ""), event.get("hint") or "")
    return f"{message}\n\nFix: {hint}" if hint else message


def failure_text(action: str, error: BaseException) -> tuple[str, bool]:
    """(dialog text, is a bug) for an exception raised by a GUI action: a user error shows its one
    line (problem and fix); anything else is a bug, shown briefly and logged with its traceback."""
    from .errors import MaisiSynthError

    if isinstance(error, MaisiSynthError):
        return f"{action}\n\n{error.one_line()}", False
    if isinstance(error, ValueError):
        return f"{action}\n\n{error}", False
    return f"{action}\n\n{type(error).__name__}: {error} (details in the Python console)", True


def from_spin_box(name: str, value: float) -> float | None:
    """A spin box's value as the option it sets (MODEL_DEFAULT_SPINS): None at its 'model default'."""
    _, model_default = MODEL_DEFAULT_SPINS[name]
    return None if float(value) <= model_default + 1e-9 else value
