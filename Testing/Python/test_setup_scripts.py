"""The set-up scripts: the demo installs the core package only; the tests get their extras.

The scripts run for real, in a copy of the repository's scripts, with `.venv/bin/python` and
`.venv/bin/maisi-synth` replaced by stubs that record how they were called (nothing is installed).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
STUB = '#!/bin/sh\necho "$(basename "$0") $*" >> "$(dirname "$0")/../../calls.log"\n'


@pytest.fixture
def checkout(tmp_path) -> Path:
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    shutil.copytree(REPO / "scripts", tmp_path / "scripts")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "maisi-synth"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    return tmp_path


def pip_installs(checkout: Path) -> list[str]:
    calls = (checkout / "calls.log").read_text().splitlines()
    return [c.split(" -e ", 1)[1] for c in calls if " -m pip install " in c and " -e " in c]


def test_the_demo_installs_the_core_package_and_no_test_extras(checkout):
    result = subprocess.run(["bash", "scripts/demo.sh"], cwd=checkout, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert pip_installs(checkout) == ["."]  # no [test], no [serve]: no pytest, slicer-core or VTK
    generate = [c for c in (checkout / "calls.log").read_text().splitlines() if c.startswith("maisi-synth ")]
    assert len(generate) == 1 and "--model-dir Resources/models/demo" in generate[0]


def test_the_test_command_installs_what_the_tests_need(checkout):
    result = subprocess.run(["bash", "scripts/test.sh", "-k", "x"], cwd=checkout, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert pip_installs(checkout) == [".[test,serve,download]"]
    calls = (checkout / "calls.log").read_text()
    assert "python -m ruff check ." in calls and "python -m pytest -q -k x" in calls
    assert calls.index("python -m ruff check .") < calls.index("python -m pytest")  # lint first, seconds not minutes


def test_test_only_packages_are_extras_not_core_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {re.split(r"[<>=!~ \[]", d)[0].lower() for d in project["dependencies"]}
    extras = project["optional-dependencies"]
    for extra in ("test", "serve", "download"):
        names = {re.split(r"[<>=!~ \[]", d)[0].lower() for d in extras[extra]}
        assert names and not names & core, (extra, names & core)
    assert any(d.startswith("huggingface_hub") for d in extras["download"])


def test_ci_fails_when_the_repository_outgrows_the_extensions_index(checkout):
    """The Index takes 100 MB with history; CI stops above 95 MB, before the tests. A small repository
    with a 2 MB incompressible file stands in, its limit lowered to 1 MB (and raised to 5 MB)."""
    if shutil.which("git") is None:
        pytest.skip("needs git")
    shutil.copytree(REPO / ".ci", checkout / ".ci")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    (checkout / "weights.bin").write_bytes(np.random.default_rng(0).bytes(2 << 20))
    for cmd in (["init", "-q"], ["add", "weights.bin", ".ci", "scripts"], ["commit", "-qm", "weights"]):
        subprocess.run([*git, *cmd], cwd=checkout, check=True, capture_output=True)
    over = subprocess.run(
        [".ci/run"], cwd=checkout, capture_output=True, text=True, env={**os.environ, "REPO_LIMIT_MB": "1"}
    )
    assert over.returncode != 0 and "over the 1 MB limit" in over.stderr
    assert not (checkout / "calls.log").exists()  # stopped before set-up and tests
    under = subprocess.run(
        [".ci/run"], cwd=checkout, capture_output=True, text=True, env={**os.environ, "REPO_LIMIT_MB": "5"}
    )
    assert under.returncode == 0, under.stderr
    assert (
        re.search(r"repository size: 2\.\d MB", under.stdout)
        and "python -m pytest -q" in (checkout / "calls.log").read_text()
    )
