"""scripts/results.py measuring a candidate model: its numbers go to --out, docs/ stays the shipped model's.

The script runs for real (a subprocess, real phantoms, a real evaluation) in a copy of the repository's
scripts/ and docs/, on the tiny random model, so nothing in the checkout is written.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def copy_of_scripts_and_docs(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copyfile(REPO / "scripts" / "results.py", root / "scripts" / "results.py")
    shutil.copytree(REPO / "docs", root / "docs")
    return root


def run_results(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(root / "scripts" / "results.py"), *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_candidate_model_is_measured_into_out_and_leaves_the_docs_alone(tmp_path, tiny_model):
    root = copy_of_scripts_and_docs(tmp_path)
    candidate = tmp_path / "model"
    shutil.copytree(tiny_model, candidate)
    settings = json.loads((candidate / "maisi_synth.json").read_text(encoding="utf-8"))
    settings["inference"] = {"num_inference_steps": 2}  # the model's own default: keeps 6 generations short
    (candidate / "maisi_synth.json").write_text(json.dumps(settings), encoding="utf-8")
    docs_before = (root / "docs" / "results.md").read_bytes()
    shipped_json = (root / "docs" / "results" / "fov.json").read_bytes()
    out = tmp_path / "candidate"

    done = run_results(root, "fov", "--cases", "1", "--model-dir", str(candidate), "--out", str(out))

    assert done.returncode == 0, done.stderr
    measured = json.loads((out / "fov.json").read_text(encoding="utf-8"))
    assert set(measured) == {"torso, full mask", "chest only, coarse mask", "abdomen only, full mask"}
    for summary in measured.values():
        assert summary["settings"]["model_dir"] == str(candidate.resolve())
    # the tiny random model draws noise, nothing like the shipped model's table
    assert measured["torso, full mask"]["organ_median_abs_error_hu"]["liver"] > 200
    assert "| chest only, coarse mask |" in done.stdout  # the table is printed instead of written
    assert (root / "docs" / "results.md").read_bytes() == docs_before
    assert (root / "docs" / "results" / "fov.json").read_bytes() == shipped_json


def test_another_model_without_out_or_a_folder_that_is_no_model_is_refused(tmp_path, tiny_model):
    root = copy_of_scripts_and_docs(tmp_path)
    docs_before = (root / "docs" / "results.md").read_bytes()

    no_out = run_results(root, "downstream", "--model-dir", str(tiny_model))
    not_a_model = run_results(root, "fov", "--model-dir", str(tmp_path), "--out", str(tmp_path / "x"))

    assert no_out.returncode == 2
    assert no_out.stderr.strip().splitlines() == [no_out.stderr.strip()]  # one line
    assert "needs --out" in no_out.stderr and "Fix:" in no_out.stderr
    assert not_a_model.returncode == 2
    assert "is not a model folder" in not_a_model.stderr and "controlnet_3d_rflow-ct.pt" in not_a_model.stderr
    assert not (tmp_path / "x").exists()
    assert not (root / "runs").exists()  # refused before any phantom was written
    assert (root / "docs" / "results.md").read_bytes() == docs_before
