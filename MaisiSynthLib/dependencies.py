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
import subprocess
import sys

# module name → pip requirement, for everything the worker imports
REQUIREMENTS = {
    "torch": "torch",
    "monai": "monai>=1.5",
    "einops": "einops",
    "numpy": "numpy",
    "scipy": "scipy",
    "nibabel": "nibabel",
    "nrrd": "pynrrd",
    "slicerio": "slicerio",
    "PIL": "pillow",
    "tqdm": "tqdm",
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
    return [REQUIREMENTS[name] for name in REQUIREMENTS if packages.get(name) is None]


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
    """The command that installs `lacking` into an external worker Python (torch first, alone: the
    CUDA build must be chosen for the machine, see pytorch.org)."""
    rest = [r for r in lacking if r != "torch"]
    lines = []
    if "torch" in lacking:
        lines.append(f'"{python}" -m pip install torch   # or the CUDA build for your GPU, see pytorch.org')
    if rest:
        lines.append(f'"{python}" -m pip install ' + " ".join(f'"{r}"' for r in rest))
    return "\n".join(lines)
