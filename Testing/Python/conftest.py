"""Shared fixtures: tiny random MAISI models in the official format, and small synthetic masks."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from MaisiSynthLib.tiny_model import make_tiny_model_folder, torso_mask_labels

REPO = Path(__file__).resolve().parents[2]

# Official weights a developer downloaded must not become the tests' default model: every test (and
# every process it starts) sees an empty per-user folder unless it sets its own.
os.environ["MAISI_SYNTH_HOME"] = tempfile.mkdtemp(prefix="maisi-synth-home-")
os.environ.pop("MAISI_SYNTH_MODEL_DIR", None)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "flat", seed=1)


@pytest.fixture(scope="session")
def tiny_model_official(tmp_path_factory) -> Path:
    return make_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "official", seed=2, layout="official")


def torso_labels(n: int = 64, tumor: int | None = 26, body: bool = True) -> np.ndarray:
    return torso_mask_labels(n, tumor, body)


def ras_affine(spacing=(3.0, 3.0, 3.0), origin=(-96.0, -96.0, -96.0)) -> np.ndarray:
    affine = np.diag(list(spacing) + [1.0])
    affine[:3, 3] = origin
    return affine


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(array, ras_affine() if affine is None else affine), str(path))
    return path


@pytest.fixture
def torso_mask(tmp_path) -> Path:
    return save_nifti(tmp_path / "mask.nii.gz", torso_labels())


def run_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run `maisi-synth` as users do: a real process, its real stdout/stderr and exit status."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "MaisiSynthLib", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_same_as_cli(out: Path, mask: Path, model: Path, seed: int, steps: int = 3) -> None:
    """`out` (written by the worker or server) equals what `maisi-synth generate` writes on the CPU."""
    cli_out = out.with_name("cli-" + out.name)
    args = ["--mask", str(mask), "--output", str(cli_out), "--model-dir", str(model), "--steps", str(steps)]
    result = run_cli(
        "generate", *args, "--seed", str(seed), "--device", "cpu", "--quiet", env={"CUDA_VISIBLE_DEVICES": "-1"}
    )
    assert result.returncode == 0, result.stderr
    ours, theirs = nib.load(out), nib.load(cli_out)
    assert np.array_equal(ours.get_fdata(), theirs.get_fdata()) and np.array_equal(ours.affine, theirs.affine)
    assert np.ptp(ours.get_fdata()) > 0


def act_at_step(client, request_id: str, step: int, action, timeout: float = 180) -> tuple[dict, list[dict]]:
    """Wait for a worker/server request, calling `action()` once when sampling reports step `step`;
    returns (its result or error event, every event of the request)."""
    seen: list[dict] = []
    acted = False

    def on_event(event: dict) -> None:
        nonlocal acted
        seen.append(event)
        if not acted and event["type"] == "progress" and event.get("stage") == "sample" and event.get("i") == step:
            acted = True
            action()

    client._callbacks[request_id] = on_event
    return client.wait(request_id, timeout), seen


def sample_steps(events: list[dict]) -> list[int]:
    return [e["i"] for e in events if e["type"] == "progress" and e.get("stage") == "sample"]


def write_scan(folder: Path, seed: int = 3, shape=(64, 64, 32), spacing=(6.0, 6.0, 8.0), name: str = "") -> Path:
    """A phantom CT (int16 HU, `<name>ct.nii.gz`) and its mask without tumors (`<name>mask.nii.gz`):
    a reference CT to edit, as the user's own scan and segmentation."""
    from MaisiSynthLib.phantoms import make_phantom

    phantom = make_phantom(seed, shape, spacing, "none")
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -np.array(spacing) * (np.array(shape) - 1) / 2
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(phantom.image, affine), str(folder / f"{name}ct.nii.gz"))
    nib.save(nib.Nifti1Image(phantom.labels.astype(np.int16), affine), str(folder / f"{name}mask.nii.gz"))
    return folder


def assert_kept_outside(
    edited_ct: Path, reference_ct: Path, edited_labels: np.ndarray, original: np.ndarray, margin_mm: float = 15.0
) -> None:
    """Every voxel more than the margin from a changed label is the reference's, value for value
    (the test's own region rule, not the engine's), and something inside was drawn."""
    from scipy import ndimage

    ref = nib.load(str(reference_ct))
    ct = np.asanyarray(nib.load(str(edited_ct)).dataobj)
    hu = np.asanyarray(ref.dataobj)
    spacing = ref.header.get_zooms()[:3]
    changed = edited_labels != original
    assert changed.any()
    outside = ndimage.distance_transform_edt(~changed, sampling=spacing) > margin_mm + 1e-6
    assert ct.dtype == hu.dtype and np.array_equal(ct[outside], hu[outside])
    assert np.abs(ct[changed].astype(int) - hu[changed]).max() > 0
