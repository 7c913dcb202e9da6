"""The GPU readiness check (`benchmarks/gpu_check.py`) keeps working between GPU loans: it runs here
as a real process on the CPU with networks derived from the official config, and its JSON report
holds every number the GPU run will fill in."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
CPU = {"CUDA_VISIBLE_DEVICES": "-1", "PYTHONUNBUFFERED": "1"}


def run_check(tmp: Path, *args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--json", str(out), *args],
        env=dict(os.environ, **CPU),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.is_file(), done.stderr[-3000:]
    return done, json.loads(out.read_text(encoding="utf-8"))


def load_module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    # bf16 autocast: the CPU's reduced-precision path, so the correctness comparison compares
    # something (fp16, flash attention and float16 norms exist only on GPUs).
    return run_check(
        tmp_path_factory.mktemp("gpu_check"),
        "--sizes",
        "32",
        "--steps",
        "2",
        "--timed-steps",
        "1",
        "--precision",
        "bf16",
    )


def test_smoke_run_exits_cleanly_and_prints_the_table(smoke):
    done, report = smoke
    assert done.returncode == 0, done.stderr[-3000:]
    assert "s/step UNet" in done.stdout and "PASS" in done.stdout and "worker 32x32x32" in done.stdout
    assert report["schema"] == 1 and report["mode"] == "tiny" and report["device"]["type"] == "cpu"
    assert report["errors"] == [] and report["skipped"] == []
    assert all(positive(report["setup"][k]) for k in ("build_s", "save_s", "load_s"))
    assert all(positive(v) for v in report["setup"]["parameters_m"].values())


def test_fast_path_matches_float32_within_the_stated_bound(smoke):
    _, report = smoke
    c = report["correctness"]
    assert c["fast"]["precision"] == "bf16" and c["reference"]["precision"] == "fp32"
    # the reference's switches are read back from the modules inside the reference mode
    assert not (c["reference"]["flash_attention"] or c["reference"]["norm_float16"] or c["reference"]["tf32"])
    assert c["fast_image"]["nonfinite"] == 0 and c["reference_image"]["nonfinite"] == 0
    assert 0 < c["rel_mean"] <= c["bound_rel_mean"] == 0.1  # bf16 really changed something, a little
    assert 0 < c["hu_mean_abs"] <= c["hu_max_abs"] <= 2000
    for part in ("latent_diff", "decode_only", "tiling", "vs_whole_float32"):
        assert math.isfinite(c[part]["rel_mean"]) and c[part]["max"] >= c[part]["mean"] >= 0
    assert c["within_bound"] is True


def test_every_timing_and_memory_number_is_there(smoke):
    module = load_module()
    _, report = smoke
    (row,) = report["sizes"]
    assert row["size"] == [32, 32, 32] and row["latent"] == [8, 8, 8]
    for variant in ("unet", "unet_controlnet", "cfg"):
        assert positive(row["step"][variant]["s_per_step"]) and positive(row["step"][variant]["steps_total_est_s"])
    assert positive(row["sample"]["s"]) and row["sample"]["latent"]["nonfinite"] == 0
    assert positive(row["encode_mask_s"]) and positive(row["sample_cfg_est_s"])
    assert [d["preset"] for d in row["decode"]] and {d["preset"] for d in row["decode"]} == {"default", "24g", "80g"}
    for d in row["decode"]:
        assert positive(d["s"]) and positive(d["end_to_end_s"]) and positive(d["end_to_end_cfg_est_s"])
        assert d["image"]["nonfinite"] == 0
        # the budget's estimate of a decode's work counts the windows MONAI really decodes
        assert d["windows"] == module.count_windows(tuple(row["latent"]), tuple(d["window"]), d["overlap"])
    assert max(d["windows"] for d in row["decode"]) > 1  # the tiled decoder ran


def test_the_warm_worker_request_reuses_the_loaded_models(smoke):
    _, report = smoke
    cold, warm = report["worker"]["requests"]
    assert (cold["models"], warm["models"]) == ("loaded", "reused")
    assert positive(cold["timings"]["load"]) and warm["timings"]["load"] < cold["timings"]["load"]
    assert positive(warm["wall_s"])


def test_a_spent_budget_skips_the_sizes_and_the_worker_but_not_the_correctness_check(tmp_path):
    done, report = run_check(tmp_path, "--sizes", "32", "64", "--steps", "1", "--budget-s", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert report["sizes"] == [] and "worker" not in report
    skipped = [s["item"] for s in report["skipped"]]
    assert skipped == ["size 32x32x32", "size 64x64x64", "worker cold/warm requests"]
    assert all("budget" in s["reason"] for s in report["skipped"])
    assert "skipped size 64x64x64" in done.stdout
    assert report["correctness"]["within_bound"] is True


def test_tiny_networks_keep_the_official_structure():
    module = load_module()
    official = module.official_config()
    tiny = module.tiny_config(official)
    for key in ("autoencoder_def", "diffusion_unet_def", "controlnet_def"):
        assert tiny[key]["_target_"] == official[key]["_target_"]
        assert len(tiny[key]["num_channels"]) == len(official[key]["num_channels"])
        assert tiny[key]["num_channels"] < official[key]["num_channels"]
        for same in ("attention_levels", "num_res_blocks", "use_flash_attention", "norm_float16"):
            assert tiny[key].get(same) == official[key].get(same)
