"""Shared fixtures: tiny random MAISI models in the official format, and small synthetic masks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from MaisiSynthLib.tiny_model import make_tiny_model_folder, torso_mask_labels

REPO = Path(__file__).resolve().parents[2]


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
