"""The code that runs inside 3D Slicer, on the Pythons Slicer ships and as Windows sees it.

Slicer 5.8 bundles Python 3.9, Slicer 5.10 and 5.12 Python 3.12, with NumPy and SciPy but neither
torch, MONAI nor nibabel. Without a Slicer app here, the module's engine side is run the way Slicer
runs it: a fresh virtual environment of each Python with only NumPy and SciPy, importing what the
module imports and exercising the label and tumor logic; and the worker is started with the POSIX-only
modules (`resource`, `fcntl`) made unavailable, as on Windows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import save_nifti, torso_labels

from MaisiSynthLib.client import WorkerClient

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".compat-venvs"  # built once per machine (CI builds it on every clean clone)

IN_SLICER = r"""
import sys
for blocked in ("torch", "monai", "nibabel", "nrrd", "resource", "fcntl"):
    sys.modules[blocked] = None  # not in Slicer's Python (the last two: not on Windows)
import numpy as np
from MaisiSynthLib import client, errors, gui_options, gui_progress, jobs, labels as L, lesions, masks, request, scene
from MaisiSynthLib import download, model_home
assert L.id_for_name("liver tumor") == L.HEPATIC_TUMOR and L.id_for_name("lung_upper_lobe_left") == 28
labels = np.zeros((40, 40, 40), np.int16)
labels[5:35, 5:35, 5:35] = 200
labels[10:30, 10:30, 10:30] = 1
labels[18:22, 18:22, 18:22] = L.HEPATIC_TUMOR
free = masks.remove_tumors(labels)
assert (free[18:22, 18:22, 18:22] == 1).all() and not (free == L.HEPATIC_TUMOR).any()
inserted = lesions.insert_tumor(free, L.HEPATIC_TUMOR, (20.0, 20.0, 20.0), 12.0, (2.0, 2.0, 2.0))
assert (inserted == L.HEPATIC_TUMOR).sum() > 50 and ((inserted == L.HEPATIC_TUMOR) <= (free == 1)).all()
assert masks.coarsen_labels(labels)[20, 20, 20] == L.HEPATIC_TUMOR
request.check_params({"mask": "m.nrrd", "output": "o.nrrd", "steps": 30, "seed": 1})
assert "PYTHONHOME" not in client.worker_environment("/not/this/python", {"PYTHONHOME": "/slicer"})
import json, os, tempfile
os.environ["MAISI_SYNTH_HOME"] = tempfile.mkdtemp()
assert model_home.choose_model_dir().source == "demo"
weights = model_home.official_model_dir() / "models"
weights.mkdir(parents=True)
(weights / "w.pt").write_bytes(b"w")
manifest = {"format": 1, "repo": "nvidia/NV-Generate-CT", "commit": "c" * 40, "files": [{"path": "models/w.pt", "size": 1}]}
(weights.parent / model_home.MANIFEST_NAME).write_text(json.dumps(manifest))
assert model_home.choose_model_dir().source == "official"  # the module's default model, as the worker sees it
assert download.check_download_params({"token": "t"}) == {"token": "t"}
home = tempfile.mkdtemp()  # a Worker Python typed as the README says: ~/maisi-env/bin/python
os.environ["HOME"] = os.environ["USERPROFILE"] = home
exe = os.path.join(home, "maisi-env", "bin", "python")
os.makedirs(os.path.dirname(exe))
with open(exe, "w") as f:
    f.write("")
typed = gui_options.GenerateOptions(python="~/maisi-env/bin/python")
assert not [p for p in typed.problems() if "Python" in p], typed.problems()
assert typed.python_executable() == exe
assert any("Python executable not found" in p for p in gui_options.GenerateOptions(python="~/nothere/python").problems())
print("OK", sys.version_info[:2])
"""


def _python(version: str) -> str | None:
    found = subprocess.run(
        ["pyenv", "which", "python"], capture_output=True, text=True, env={**os.environ, "PYENV_VERSION": version}
    )
    return found.stdout.strip() if found.returncode == 0 and found.stdout.strip() else None


def _slicer_like_python(version: str) -> Path:
    """A venv of `version` with only what Slicer's Python has that we use (NumPy, SciPy)."""
    base = _python(version)
    if base is None:
        pytest.skip(f"Python {version} is not installed (pyenv)")
    venv = CACHE / version
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if not python.exists():
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        install = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "numpy", "scipy"],
            capture_output=True,
            text=True,
        )
        if install.returncode != 0:
            pytest.skip(f"cannot install NumPy/SciPy for Python {version}: {install.stderr[-300:]}")
    return python


@pytest.mark.parametrize("version", ["3.9", "3.12"])
def test_the_in_slicer_code_runs_on_slicers_pythons_without_torch_or_nibabel(version):
    python = _slicer_like_python(version)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run([str(python), "-c", IN_SLICER], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("OK")
    # every module compiles on that Python (the ones with torch are imported in the worker only)
    files = [str(p) for p in (REPO / "MaisiSynthLib").rglob("*.py")] + [str(REPO / "MaisiSynth" / "MaisiSynth.py")]
    compiled = subprocess.run([str(python), "-m", "py_compile", *files], capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stderr


def test_the_worker_generates_without_posix_only_modules(tmp_path, tiny_model):
    """`resource` and `fcntl` do not exist on Windows: the worker must start and generate without them."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nsys.modules['resource'] = None\nsys.modules['fcntl'] = None\n"
    )
    mask = save_nifti(tmp_path / "mask.nii.gz", torso_labels())
    client = WorkerClient(
        env={"CUDA_VISIBLE_DEVICES": "-1", "PYTHONPATH": str(blocker)}, worker_args=["--device", "cpu"]
    )
    client.start()
    try:
        end = client.wait(
            client.generate(
                {"mask": str(mask), "output": str(tmp_path / "ct.nii.gz"), "model_dir": str(tiny_model), "steps": 2}
            ),
            180,
        )
    finally:
        client.shutdown()
    assert end["type"] == "result", json.dumps(end)[:500]
    assert (tmp_path / "ct.nii.gz").exists() and "process_rss_mb" in end["peak_memory"]
    assert sys.platform == "win32" or client.returncode == 0


def test_the_dependency_check_names_what_the_worker_python_lacks(tmp_path):
    from MaisiSynthLib import dependencies

    full = dependencies.probe(sys.executable)
    assert full["packages"]["torch"] and full["packages"]["monai"] and dependencies.missing(full) == []
    assert "everything the worker needs" in dependencies.summary(full) and "CPU-only torch" in dependencies.summary(
        full
    )
    bare = _python("3.12") or _python("3.9")
    if bare is None:
        pytest.skip("no second Python")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    report = dependencies.probe(bare, env=env)
    lacking = dependencies.missing(report)
    assert lacking[0] == "torch>=2.4.1" and "monai>=1.5" in lacking  # torch first: it decides the CUDA build
    assert "huggingface_hub>=0.24" in lacking  # the official weights' download runs in the worker too
    hint = dependencies.install_hint(bare, lacking)
    assert hint.splitlines()[0] == f'{bare} -m pip install "torch>=2.4.1"' and '"monai>=1.5"' in hint
    assert "error" in dependencies.probe(str(tmp_path / "no-python"))
    # an installed package older than the lower bound is listed too (pip then upgrades it)
    old = {**full, "packages": {**full["packages"], "torch": "2.3.1+cpu", "monai": "1.4.0"}}
    assert dependencies.missing(old) == ["torch>=2.4.1", "monai>=1.5"]


def test_the_dependency_probe_runs_off_the_gui_thread():
    """Importing torch in the probed Python takes seconds: the module starts the probe and reads its
    report from its timer, so neither "Check dependencies" nor the first visit freezes Slicer."""
    from MaisiSynthLib import dependencies

    started = time.monotonic()
    background = dependencies.BackgroundProbe(sys.executable)
    assert time.monotonic() - started < 0.2 and background.report is None and background.lacking == []
    report = background.wait(120)
    assert report is not None and report["packages"]["torch"] and background.lacking == []
    assert report["packages"] == dependencies.probe(sys.executable)["packages"]
    bare = _python("3.12") or _python("3.9")
    if bare is not None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        lacking = dependencies.BackgroundProbe(bare, env, quiet=True)
        lacking.wait(120)
        assert lacking.quiet and lacking.lacking[0] == "torch>=2.4.1"
    broken = dependencies.BackgroundProbe("/no/such/python")
    assert "error" in broken.wait(30) and broken.lacking == []


def test_the_install_hint_runs_as_pasted(tmp_path):
    """The hint is pasted into bash, cmd or PowerShell as it is: no comment (cmd has none), every
    requirement quoted (an unquoted ">" redirects in all three), the interpreter quoted only when its
    path has a space. Run here through bash, with a stand-in Python that records its arguments."""
    import shutil

    from MaisiSynthLib import dependencies

    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    lacking = ["torch>=2.4.1", "monai>=1.5", "huggingface_hub>=0.24"]
    for folder in ("plain", "with space"):
        python = tmp_path / folder / "python"
        python.parent.mkdir()
        python.write_text('#!/bin/sh\nprintf "%s|" "$@" >> "$(dirname "$0")/argv"; echo >> "$(dirname "$0")/argv"\n')
        python.chmod(0o755)
        hint = dependencies.install_hint(str(python), lacking)
        assert "#" not in hint and ">" not in hint.replace(">=", "")
        ran = subprocess.run(["bash", "-c", hint], cwd=tmp_path, capture_output=True, text=True, timeout=30)
        assert ran.returncode == 0, ran.stderr
        calls = (python.parent / "argv").read_text().splitlines()
        assert calls == ["-m|pip|install|torch>=2.4.1|", "-m|pip|install|monai>=1.5|huggingface_hub>=0.24|"]
        assert not list(tmp_path.glob("=*"))  # nothing redirected into a file named "=2.4.1"
        note = dependencies.install_note(str(python), lacking)
        assert "CUDA" in note and (("PowerShell" in note) == (folder == "with space"))


def test_the_engine_installs_into_slicer_58s_python(tmp_path):
    """Slicer 5.8 bundles Python 3.9: `pip install` of the engine must not be refused there (the
    worker's torch and MONAI come from the PyTorch extension and pip; --no-deps leaves them out here).
    The package is built from a copy, so the checkout gets no build/ or egg-info."""
    import shutil

    base = _python("3.9")
    if base is None:
        pytest.skip("Python 3.9 is not installed (pyenv)")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "MaisiSynthLib", source / "MaisiSynthLib", ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "PIP_REQUIRE_VIRTUALENV"}
    installed = subprocess.run(
        [base, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(source)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    if installed.returncode != 0 and "requires a different Python" not in installed.stderr:
        pytest.skip(f"pip could not build the package here: {installed.stderr[-300:]}")
    assert installed.returncode == 0, installed.stderr[-1000:]
    # what Slicer's side imports, from the installed copy, on the Slicer-like 3.9
    python = _slicer_like_python("3.9")
    code = "import MaisiSynthLib.gui_options as g, MaisiSynthLib.scene; print(g.__file__)"
    ran = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**env, "PYTHONPATH": str(site)}, timeout=120)  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert Path(ran.stdout.strip()).is_relative_to(site)
