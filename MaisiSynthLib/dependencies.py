"""What the worker's Python has and lacks: torch (and its CUDA), MONAI and the engine's other packages.

The Slicer module asks before its first Generate (or when the user presses "Check dependencies"):
`probe(python)` runs a short script in that interpreter, in a subprocess so a broken installation
cannot take Slicer down, and reports versions; `missing(report)` lists what to install and
`install_hint(...)` says how. Installing into Slicer's own Python is the module's job (PyTorch
Utils picks the right torch build for the GPU; pip for the rest), always after the user confirms.
No torch here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading

# Slicer's Python gets torch through the PyTorch extension's PyTorch Utils (the build for its GPU)
PYTORCH_EXTENSION_MISSING = (
    "The PyTorch extension is missing: install 'PyTorch' from the Extensions Manager, restart Slicer, "
    "then press Check dependencies again."
)
# MONAI 1.5's own lower bound for torch; PyTorch Utils gets it as its version requirement
TORCH_REQUIREMENT = ">=2.4.1"
# module name → pip requirement, for everything the worker imports (huggingface_hub: the official
# weights' download, which also runs in the worker)
REQUIREMENTS = {
    "torch": "torch" + TORCH_REQUIREMENT,
    "monai": "monai>=1.5",
    "einops": "einops",
    "numpy": "numpy",
    "scipy": "scipy",
    "nibabel": "nibabel",
    "nrrd": "pynrrd",
    "slicerio": "slicerio",
    "PIL": "pillow",
    "tqdm": "tqdm",
    "huggingface_hub": "huggingface_hub>=0.24",
}
# an installed package older than its requirement's lower bound counts as missing (pip upgrades it)
_MINIMUM = {
    name: tuple(int(part) for part in req.split(">=")[1].split("."))
    for name, req in REQUIREMENTS.items()
    if ">=" in req
}

_PROBE = r"""
import importlib, json, sys
report = {"python": sys.version.split()[0], "executable": sys.executable, "packages": {}}
for name in NAMES:
    try:
        module = importlib.import_module(name)
        report["packages"][name] = str(getattr(module, "__version__", "installed"))
    except Exception as exc:
        report["packages"][name] = None
try:
    import torch
    report["cuda"] = torch.version.cuda
    report["cuda_available"] = bool(torch.cuda.is_available())
    report["gpu"] = torch.cuda.get_device_name(0) if report["cuda_available"] else None
except Exception:
    report["cuda"] = report["cuda_available"] = report["gpu"] = None
print("MAISI-PROBE " + json.dumps(report))
"""


def probe(python: str, env: dict | None = None, timeout: float = 120.0) -> dict:
    """Versions of the worker's packages in `python`: {"python", "packages": {name: version or None},
    "cuda", "cuda_available", "gpu"}; {"error": ...} when the interpreter does not run."""
    code = _PROBE.replace("NAMES", repr(list(REQUIREMENTS)))
    kwargs = {"creationflags": getattr(subprocess, "CREATE_NO_WINDOW", 0)} if sys.platform == "win32" else {}
    try:
        result = subprocess.run(
            [os.path.expanduser(python), "-c", code],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            **kwargs,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"cannot run {python}: {exc}"}
    for line in result.stdout.splitlines():
        if line.startswith("MAISI-PROBE "):
            return json.loads(line[len("MAISI-PROBE ") :])
    tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": f"{python} exited with code {result.returncode}: {tail[0][:200]}"}


def missing(report: dict) -> list[str]:
    """pip requirements of the packages the report lacks (torch first: it decides the CUDA build)."""
    packages = report.get("packages", {})
    return [REQUIREMENTS[name] for name in REQUIREMENTS if _too_old(name, packages.get(name))]


def _too_old(name: str, version: str | None) -> bool:
    """Not installed, or older than the requirement's lower bound ("2.13.0+cpu" → (2, 13, 0))."""
    if version is None:
        return True
    parts = re.match(r"\d+(?:\.\d+)*", version)
    return bool(parts) and tuple(int(p) for p in parts.group(0).split(".")) < _MINIMUM.get(name, ())


def summary(report: dict) -> str:
    """One line for the module's log: Python, torch + CUDA, MONAI, and what is missing."""
    if "error" in report:
        return report["error"]
    packages = report["packages"]
    cuda = (
        f"CUDA {report['cuda']} ({report['gpu']})"
        if report.get("cuda_available")
        else ("CPU-only torch" if packages.get("torch") else "no torch")
    )
    text = (
        f"Python {report['python']}: torch {packages.get('torch') or '—'}, {cuda}, MONAI {packages.get('monai') or '—'}"
    )
    lacking = missing(report)
    return text + (f"; missing: {', '.join(lacking)}" if lacking else "; everything the worker needs is installed")


def install_hint(python: str, lacking: list[str]) -> str:
    """The commands that install `lacking` into an external worker Python, one per line, each the
    same in bash, cmd and PowerShell: no comments, every requirement in double quotes (">" would
    redirect), the interpreter quoted only when its path needs it. torch goes alone and first: its
    build must be chosen for the machine (`install_note`)."""
    exe = python if _plain(python) else f'"{python}"'
    torch = [r for r in lacking if r.startswith("torch")]
    rest = [r for r in lacking if not r.startswith("torch")]
    lines = [f"{exe} -m pip install " + " ".join(f'"{r}"' for r in group) for group in (torch, rest) if group]
    return "\n".join(lines)


def install_note(python: str, lacking: list[str]) -> str:
    """What to know before running `install_hint`'s commands (said beside them, not in them)."""
    notes = []
    if any(r.startswith("torch") for r in lacking):
        notes.append("For a GPU, install the CUDA build of torch that pytorch.org gives for your machine instead.")
    if not _plain(python):
        notes.append("In PowerShell, put & and a space before the quoted path.")
    return " ".join(notes)


def _plain(path: str) -> bool:
    """A path every shell takes unquoted (no spaces, no characters any of them treats specially)."""
    return bool(path) and all(c.isalnum() or c in "/\\:._-" for c in path)


class BackgroundProbe:
    """`probe` on a thread, for a GUI that must not wait for it (importing torch takes seconds, and
    the probe may take up to its timeout): start it, then read `report` (None until it is done) from
    the GUI's timer. `shown` and `offered` are the GUI's marks: the summary logged, the install offered.
    `quiet`: a check the user did not ask for (only logged unless something is missing at Generate)."""

    def __init__(self, python: str, env: dict | None = None, quiet: bool = False, timeout: float = 120.0):
        self.python, self.quiet = python, quiet
        self.report: dict | None = None
        self.shown = self.offered = False
        self._thread = threading.Thread(target=self._run, args=(env, timeout), daemon=True, name="maisi-synth-probe")
        self._thread.start()

    def _run(self, env: dict | None, timeout: float) -> None:
        try:
            self.report = probe(self.python, env=env, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - a report, never an exception on a thread
            self.report = {"error": f"cannot check {self.python}: {exc}"}

    @property
    def lacking(self) -> list[str]:
        """What to install, once the report is in (nothing while it runs or when the Python failed)."""
        report = self.report
        return missing(report) if report is not None and "error" not in report else []

    def wait(self, timeout: float | None = None) -> dict | None:
        self._thread.join(timeout)
        return self.report
