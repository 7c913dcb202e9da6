"""The three training loops on tiny phantoms: CLI runs, overfitting, resume, torchrun DDP, and the
official-format model folder they write (loaded by the generation engine)."""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import run_cli

from MaisiSynthLib.models import AUTOENCODER_FILE, CONTROLNET_FILE, UNET_FILE, load_models
from MaisiSynthLib.phantoms import write_phantoms
from MaisiSynthLib.tiny_model import TINY_SETTINGS, tiny_config
from MaisiSynthLib.training import train
from MaisiSynthLib.training.config import load_config
from MaisiSynthLib.training.trainer import read_log

# 64×64×32 at 6×6×8 mm: a whole torso cross-section at a size the tiny networks train in seconds.
SIZE, SPACING = (64, 64, 32), (6.0, 6.0, 8.0)


def _config(root: Path, **stage_overrides) -> dict:
    config = {
        "network": tiny_config(),
        "cases": "cases",
        "output_dir": "run",
        "seed": 3,
        "model_settings": TINY_SETTINGS,
        "vae": {"patch_size": [32, 32, 32], "steps": 3, "log_every": 1, "lr": 1e-3},
        "unet": {"steps": 3, "log_every": 1, "lr": 1e-3},
        "controlnet": {"steps": 3, "log_every": 1, "lr": 1e-3},
    }
    for stage, values in stage_overrides.items():
        config[stage].update(values)
    return config


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Three phantom cases and a training config; the three stages run from the CLI, in order."""
    root = tmp_path_factory.mktemp("train")
    write_phantoms(root / "cases", 3, size=SIZE, spacing=SPACING, seed=11)
    # The UNet gets more steps: a ControlNet can only steer a UNet whose (zero-initialised) output
    # layers have learnt something.
    (root / "train.json").write_text(json.dumps(_config(root, unet={"steps": 40, "lr": 3e-3, "lr_power": 0.0})))
    for stage, steps in (("vae", 3), ("unet", 40), ("controlnet", 3)):
        result = run_cli("train", stage, "--config", str(root / "train.json"), "--quiet")
        assert result.returncode == 0, result.stderr
        assert f"{stage}: steps 0→{steps}" in result.stdout
    return root


def test_each_stage_runs_from_the_cli_and_writes_official_checkpoints(workspace):
    model = workspace / "run" / "model"
    for stage, steps in (("vae", 3), ("unet", 40), ("controlnet", 3)):
        rows = read_log(workspace / "run" / "logs" / f"{stage}.csv")
        assert [r["step"] for r in rows] == list(range(1, steps + 1))
        assert all(np.isfinite(r["loss"]) for r in rows)
    unet = torch.load(model / UNET_FILE, weights_only=True)
    assert set(unet) == {"epoch", "loss", "num_train_timesteps", "scale_factor", "unet_state_dict"}
    assert unet["epoch"] == 40 and 0.05 < float(unet["scale_factor"]) < 50
    controlnet = torch.load(model / CONTROLNET_FILE, weights_only=True)
    assert set(controlnet) == {"epoch", "loss", "controlnet_state_dict"}
    vae = torch.load(model / AUTOENCODER_FILE, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in vae.values()) and "encoder.blocks.0.conv.conv.weight" in vae
    # The ControlNet trained its own copy: its weights left the UNet's they started from.
    shared = [k for k in controlnet["controlnet_state_dict"] if k in unet["unet_state_dict"]]
    assert shared and any(
        not torch.equal(controlnet["controlnet_state_dict"][k], unet["unet_state_dict"][k]) for k in shared
    )


def test_trained_model_folder_loads_and_generates_a_ct(workspace, tmp_path):
    models = load_models(workspace / "run" / "model", device="cpu")
    assert (
        models.controlnet is not None
        and abs(
            float(models.scale_factor)
            - float(torch.load(workspace / "run" / "model" / UNET_FILE, weights_only=True)["scale_factor"])
        )
        < 1e-6
    )
    mask = workspace / "cases" / "case0000_label.nii.gz"
    out = tmp_path / "ct.nii.gz"
    result = run_cli(
        "generate",
        "--mask",
        str(mask),
        "--output",
        str(out),
        "--model-dir",
        str(workspace / "run" / "model"),
        "--steps",
        "3",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    ct = np.asanyarray(nib.load(str(out)).dataobj)
    labels = np.asanyarray(nib.load(str(mask)).dataobj)
    assert ct.shape == labels.shape and ct.dtype == np.int16
    assert (ct[labels == 0] == -1000).all() and ct.max() <= 1000


@pytest.mark.parametrize("stage", ["vae", "unet", "controlnet"])
def test_each_loop_overfits_a_fixed_batch(workspace, tmp_path, stage):
    """50 steps on one fixed batch (same data, noise and timesteps) must drive the loss down."""
    config = _config(
        tmp_path, **{stage: {"steps": 50, "fixed_batch": True, "checkpoint_every": 1000, "lr": 3e-3, "lr_power": 0.0}}
    )
    config.update(cases=str(workspace / "cases"), base_model_dir=str(workspace / "run" / "model"))
    (tmp_path / "train.json").write_text(json.dumps(config))
    if stage == "vae":
        # fine-tuning would start near the optimum; start this one from scratch
        config["base_model_dir"] = None
        (tmp_path / "train.json").write_text(json.dumps(config))
    train(stage, str(tmp_path / "train.json"), progress=False)
    rows = read_log(tmp_path / "run" / "logs" / f"{stage}.csv")
    key = "flow" if stage == "controlnet" else ("l1" if stage == "vae" else "loss")
    first = np.mean([r[key] for r in rows[:5]])
    last = np.mean([r[key] for r in rows[-5:]])
    if stage != "controlnet":
        assert last < 0.7 * first, (stage, first, last)
    else:
        # A ControlNet steers a frozen UNet through zero-initialised residuals: its loss falls slowly
        # but steadily (the batch is fixed, so every step is deterministic).
        values = [r[key] for r in rows]
        assert last < 0.97 * first, (first, last)
        assert np.mean(np.diff(values) < 0) > 0.9
        # the contrastive ROI term is active: the two predictions were pushed apart inside tumors
        assert rows[-1]["roi"] < 0 and rows[-1]["roi"] < rows[0]["roi"]


@pytest.mark.parametrize("stage", ["unet", "controlnet"])
def test_resume_continues_from_the_saved_step_exactly(workspace, tmp_path, stage):
    def run(out: str, **kwargs):
        config = _config(tmp_path, **{stage: {"steps": 6, "checkpoint_every": 3}})
        config.update(cases=str(workspace / "cases"), output_dir=out, base_model_dir=str(workspace / "run" / "model"))
        (tmp_path / f"{out}.json").write_text(json.dumps(config))
        return train(stage, str(tmp_path / f"{out}.json"), progress=False, **kwargs)

    run("straight")
    first = run("resumed", stop_after=3)
    assert (first["start"], first["end"]) == (0, 3)
    state = torch.load(tmp_path / "resumed" / "state" / f"{stage}.pt", weights_only=True)
    assert state["step"] == 3
    second = run("resumed", resume=True)
    assert (second["start"], second["end"]) == (3, 6)
    name, key = (UNET_FILE, "unet_state_dict") if stage == "unet" else (CONTROLNET_FILE, "controlnet_state_dict")
    a = torch.load(tmp_path / "straight" / "model" / name, weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model" / name, weights_only=True)
    assert a["epoch"] == b["epoch"] == 6
    for k in a[key]:
        assert torch.equal(a[key][k], b[key][k]), k
    steps = [r["step"] for r in read_log(tmp_path / "resumed" / "logs" / f"{stage}.csv")]
    assert steps == [1, 2, 3, 4, 5, 6]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_equal_one_process_with_twice_the_batch(workspace, tmp_path):
    config = _config(tmp_path, controlnet={"steps": 4, "lr": 1e-3})
    config.update(cases=str(workspace / "cases"), base_model_dir=str(workspace / "run" / "model"))
    path = tmp_path / "train.json"
    path.write_text(json.dumps(config))
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp = subprocess.run(
        [
            *torchrun,
            "-m",
            "MaisiSynthLib",
            "train",
            "controlnet",
            "--config",
            str(path),
            "--quiet",
            "--batch-size",
            "1",
            "--output-dir",
            str(tmp_path / "ddp"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr
    assert ddp.stdout.count("controlnet: steps 0→4") == 1  # only the main process reports
    single = run_cli(
        "train",
        "controlnet",
        "--config",
        str(path),
        "--quiet",
        "--batch-size",
        "2",
        "--output-dir",
        str(tmp_path / "one"),
    )
    assert single.returncode == 0, single.stderr

    def batches(folder: str, rank: int) -> list[tuple[int, int, str]]:
        lines = (tmp_path / folder / "logs" / f"controlnet_batches_rank{rank}.csv").read_text().split()[1:]
        return [(int(s), int(p), c) for s, p, c in (ln.split(",") for ln in lines)]

    rank0, rank1 = batches("ddp", 0), batches("ddp", 1)
    assert {p for _, p, _ in rank0} == {0} and {p for _, p, _ in rank1} == {1}
    assert [c for *_, c in rank0] != [c for *_, c in rank1]  # the ranks trained on different cases
    assert sorted(rank0 + rank1) == sorted(batches("one", 0))  # ...which together are the global batches

    a = torch.load(tmp_path / "ddp" / "model" / CONTROLNET_FILE, weights_only=True)["controlnet_state_dict"]
    b = torch.load(tmp_path / "one" / "model" / CONTROLNET_FILE, weights_only=True)["controlnet_state_dict"]
    start = torch.load(workspace / "run" / "model" / CONTROLNET_FILE, weights_only=True)["controlnet_state_dict"]
    update_ddp = torch.cat([(a[k] - start[k]).flatten().double() for k in start])
    update_one = torch.cat([(b[k] - start[k]).flatten().double() for k in start])
    # Equal up to float summation order (DDP averages two gradients; one process sums inside the
    # convolution's backward), which Adam's normalisation amplifies slightly on near-zero gradients.
    relative = float((update_ddp - update_one).norm() / update_one.norm())
    assert update_one.abs().max() > 1e-3 and relative < 1e-2, relative
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def test_training_errors_are_one_line_with_a_fix(workspace, tmp_path):
    config = _config(tmp_path)
    config.update(cases=str(workspace / "cases"))
    (tmp_path / "train.json").write_text(json.dumps(config))
    # the UNet stage without a VAE in the run's model folder
    result = run_cli("train", "unet", "--config", str(tmp_path / "train.json"), "--quiet")
    assert (
        result.returncode == 2
        and "needs autoencoder_v1.pt" in result.stderr
        and "maisi-synth train vae" in result.stderr
    )
    assert len(result.stderr.strip().splitlines()) == 1
    result = run_cli("train", "vae", "--config", str(tmp_path / "train.json"), "--set", "vae.stepz=3")
    assert result.returncode == 2 and "unknown training setting 'vae.stepz'" in result.stderr
    result = run_cli("train", "vae", "--config", str(tmp_path / "train.json"), "--set", "vae.patch_size=[30,32,32]")
    assert result.returncode == 2 and "patch_size" in result.stderr
    assert not (tmp_path / "run" / "model" / AUTOENCODER_FILE).exists()


def test_config_layers_defaults_file_overrides_and_flags(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"cases": "data", "vae": {"steps": 7}}))
    config = load_config(tmp_path / "c.json", ["vae.lr=0.5", "controlnet.contrastive=false"], **{"vae.steps": 9})
    assert config["vae"]["steps"] == 9 and config["vae"]["lr"] == 0.5 and config["controlnet"]["contrastive"] is False
    assert config["cases"] == str(tmp_path / "data")  # relative to the config file
    assert config["model_dir"] == str(Path(config["output_dir"]) / "model")
    assert config["controlnet"]["contrastive_weight"] == 0.01 and config["controlnet"]["contrastive_delta"] == 2.0


ENCODER_KEYS = ("encoder.", "quant_conv_mu.", "quant_conv_log_sigma.")
DECODER_KEYS = ("decoder.", "post_quant_conv.")


@pytest.mark.parametrize("half", ["decoder_only", "encoder_only"])
def test_training_one_half_of_the_vae_keeps_the_other_exactly(workspace, tmp_path, half):
    config = _config(tmp_path, vae={half: True, "patch_size": [64, 64, 32], "lr": 1e-2})
    config.update(cases=str(workspace / "cases"))
    (tmp_path / "train.json").write_text(json.dumps(config))
    # without a VAE to keep the other half of: one line naming the fix, nothing written
    result = run_cli("train", "vae", "--config", str(tmp_path / "train.json"), "--quiet")
    assert result.returncode == 2 and f"{half} needs an existing VAE" in result.stderr
    assert "base_model_dir" in result.stderr
    assert not (tmp_path / "run" / "model" / AUTOENCODER_FILE).exists()
    base = workspace / "run" / "model"
    if half == "encoder_only":  # both halves at once would train nothing: refused the same way
        both = ["--set", "vae.decoder_only=true", "--base-model-dir", str(base)]
        result = run_cli("train", "vae", "--config", str(tmp_path / "train.json"), *both, "--quiet")
        assert result.returncode == 2 and "excludes vae.decoder_only" in result.stderr
        assert not (tmp_path / "run" / "model" / AUTOENCODER_FILE).exists()
    result = run_cli("train", "vae", "--config", str(tmp_path / "train.json"), "--base-model-dir", str(base), "--quiet")
    assert result.returncode == 0, result.stderr
    before = torch.load(base / AUTOENCODER_FILE, weights_only=True)
    after = torch.load(tmp_path / "run" / "model" / AUTOENCODER_FILE, weights_only=True)
    kept, tuned = (ENCODER_KEYS, DECODER_KEYS) if half == "decoder_only" else (DECODER_KEYS, ENCODER_KEYS)
    kept = [k for k in before if k.startswith(kept)]
    tuned = [k for k in before if k.startswith(tuned)]
    assert kept and tuned
    assert all(torch.equal(before[k], after[k]) for k in kept)
    assert sum(not torch.equal(before[k], after[k]) for k in tuned) > len(tuned) // 2


def test_latent_anchor_holds_mu_away_from_lesions_only(workspace, tmp_path):
    """`anchor_weight`: L1 between μ and the starting encoder's μ, on latent voxels more than
    `anchor_margin` from a lesion; zero before training moves anything; refused without a base VAE."""
    from MaisiSynthLib.distributed import DistContext
    from MaisiSynthLib.errors import OptionError
    from MaisiSynthLib.training.vae import VaeStage

    def stage_with(**vae):
        config = load_config(None, [], cases=str(workspace / "cases"), output_dir=str(tmp_path / "run"))
        config.update(network=tiny_config(), base_model_dir=str(workspace / "run" / "model"))
        config["vae"].update(patch_size=[32, 32, 32], encoder_only=True, anchor_weight=0.5, **vae)
        return VaeStage(config, DistContext())

    stage = stage_with()
    stage.prepare()
    x, _, _, _, _, lesions = stage.batch(0)
    autoencoder = stage.trainable().autoencoder
    with torch.no_grad():
        z_mu, _ = autoencoder.encode(x)
        assert float(stage.anchor_term(x, z_mu, lesions)) == 0.0  # the encoder has not moved yet
        _, metrics = stage.loss(stage.trainable(), 0)
    assert metrics["anchor"] == 0.0
    # One lesion voxel at image (20, 20, 20): latent voxel (5, 5, 5) with the tiny model's 4x.
    lesions = torch.zeros_like(lesions)
    lesions[0, 0, 20, 20, 20] = True
    delta = torch.full_like(z_mu, 0.5)
    delta[0, :, 4:7, 4:7, 4:7] = 9.0  # the lesion's latent voxel and the one around it move a lot
    latent_voxels = z_mu[0, 0].numel()
    with torch.no_grad():
        held = float(stage.anchor_term(x, z_mu + delta, lesions))
        assert held == pytest.approx(0.5)  # the 27 latent voxels at and around the lesion are free
        stage.cfg["anchor_margin"] = 0  # now the 26 neighbours are held too, at their 9.0
        tight = float(stage.anchor_term(x, z_mu + delta, lesions))
        n = x.shape[0] * latent_voxels - 1
        assert tight == pytest.approx((0.5 * (n - 26) + 9.0 * 26) / n)
    for bad in ({"anchor_margin": -1}, {"anchor_margin": 1.5}):
        with pytest.raises(OptionError, match="anchor_margin"):
            stage_with(**bad).prepare()
    config = load_config(None, [], cases=str(workspace / "cases"), output_dir=str(tmp_path / "nobase"))
    config["network"] = tiny_config()
    config["vae"].update(patch_size=[32, 32, 32], anchor_weight=0.5)
    with pytest.raises(OptionError, match="needs that VAE"):
        VaeStage(config, DistContext()).prepare()
    # a real run: the first step's anchor is 0 (nothing moved yet), the second's is not
    config = _config(tmp_path, vae={"encoder_only": True, "anchor_weight": 0.5, "steps": 2, "lr": 1e-2})
    config.update(
        cases=str(workspace / "cases"), output_dir="anchored", base_model_dir=str(workspace / "run" / "model")
    )
    (tmp_path / "anchored.json").write_text(json.dumps(config))
    train("vae", str(tmp_path / "anchored.json"), progress=False)
    rows = read_log(tmp_path / "anchored" / "logs" / "vae.csv")
    assert rows[0]["anchor"] == 0.0 and rows[1]["anchor"] > 0.0


def test_lesion_patches_hold_a_lesion_and_leave_the_other_draws_alone(workspace, tmp_path):
    """`lesion_patch_share` 1: every patch of a case with lesions holds a lesion voxel; at 0 small
    patches mostly miss them. The ε and case draws do not change with it; bad shares are refused."""
    from MaisiSynthLib.distributed import DistContext
    from MaisiSynthLib.errors import OptionError
    from MaisiSynthLib.training.data import origin_around
    from MaisiSynthLib.training.vae import VaeStage

    def stage_with(share, patch=(16, 16, 16)):
        config = load_config(None, [], cases=str(workspace / "cases"), output_dir=str(tmp_path / "run"))
        config["network"] = tiny_config()
        config["vae"].update(patch_size=None if patch is None else list(patch), lesion_patch_share=share)
        stage = VaeStage(config, DistContext())
        stage.prepare()
        return stage

    around, anywhere = stage_with(1.0), stage_with(0.0)
    assert all(len(v) for v in around.lesion_voxels)  # every phantom here has lesions
    held = {"around": 0, "anywhere": 0}
    for step in range(12):
        a, b = around.batch(step), anywhere.batch(step)
        assert torch.equal(a[1], b[1]) and around.last_batch == anywhere.last_batch
        held["around"] += int(a[5].flatten(1).any(1).sum())
        held["anywhere"] += int(b[5].flatten(1).any(1).sum())
    assert held["around"] == 12 and held["anywhere"] < 6
    # the origin keeps the centre inside the patch and the patch inside the volume
    g = torch.Generator().manual_seed(0)
    for centre in ((0, 0, 0), (63, 63, 31), (30, 5, 20)):
        origin = origin_around((64, 64, 32), (16, 16, 16), centre, g)
        assert all(0 <= o <= n - 16 and o <= c < o + 16 for o, c, n in zip(origin, centre, (64, 64, 32)))
    for bad, message in ((1.5, "lesion_patch_share is 1.5"), (True, "lesion_patch_share is True")):
        with pytest.raises(OptionError, match=message):
            stage_with(bad)
    with pytest.raises(OptionError, match="needs vae.patch_size"):
        stage_with(0.5, patch=None)


def test_vae_region_weights_cover_bone_and_lesions_and_their_edge(workspace, tmp_path):
    from MaisiSynthLib.distributed import DistContext
    from MaisiSynthLib.training.vae import VaeStage

    config = load_config(None, [], cases=str(workspace / "cases"), output_dir=str(tmp_path / "run"))
    config["network"] = tiny_config()
    config["vae"].update(bone_weight=4.0, tumor_weight=6.0, patch_size=[32, 32, 32])
    stage = VaeStage(config, DistContext())
    stage.prepare()
    labels = torch.zeros((1, 8, 8, 8), dtype=torch.long)
    labels[0, 2, 2, 2] = 40  # a vertebra voxel
    labels[0, 6, 6, 6] = 26  # a hepatic tumor voxel
    labels[0, 6, 6, 5] = 1  # liver beside it
    weights = stage.region_weights(labels)[0]
    assert weights[2, 2, 2] == 4.0 and weights[3, 3, 3] == 4.0  # bone and its 26-neighbourhood
    assert weights[6, 6, 6] == 6.0 and weights[6, 6, 5] == 6.0  # lesion and the tissue touching it
    assert weights[0, 7, 0] == 1.0 and weights[4, 4, 4] == 1.0  # two voxels from either: 1
    assert weights.sum() == 1.0 * (512 - 27 - 27) + 4.0 * 27 + 6.0 * 27
    # without the ring: the labelled voxels only, so their neighbours weigh 1 again
    stage.cfg["region_ring"] = False
    weights = stage.region_weights(labels)[0]
    assert weights[2, 2, 2] == 4.0 and weights[3, 3, 3] == 1.0
    assert weights[6, 6, 6] == 6.0 and weights[6, 6, 5] == 1.0
    assert weights.sum() == 1.0 * 510 + 4.0 + 6.0


def test_whole_volume_vae_and_mean_latents(workspace, tmp_path):
    """`patch_size: null` trains on whole cases; `latents: mean` caches μ exactly, samples differ."""
    from MaisiSynthLib.training.common import encode_case
    from MaisiSynthLib.training.data import load_cases

    config = _config(tmp_path, vae={"patch_size": None, "steps": 2, "lr": 1e-4})
    config.update(cases=str(workspace / "cases"), base_model_dir=str(workspace / "run" / "model"))
    (tmp_path / "train.json").write_text(json.dumps(config))
    train("vae", str(tmp_path / "train.json"), progress=False)
    rows = read_log(tmp_path / "run" / "logs" / "vae.csv")
    assert len(rows) == 2 and all(r["sigma_mean"] > 0 and r["mu_std"] > 0 for r in rows)
    batches = (tmp_path / "run" / "logs" / "vae_batches_rank0.csv").read_text().split()[1:]
    assert len(batches) == 2  # one whole case per step at batch size 1

    model = workspace / "run" / "model"
    autoencoder = load_models(model, "cpu").autoencoder
    case = load_cases(workspace / "cases")[0]
    mean = encode_case(autoencoder, case, 0, torch.device("cpu"), "mean")
    with torch.no_grad():
        z_mu, _ = autoencoder.encode(case.image[None])
    assert torch.equal(mean, z_mu[0])
    sample = encode_case(autoencoder, case, 0, torch.device("cpu"), "sample")
    assert sample.shape == mean.shape and not torch.equal(sample, mean)

    unet = _config(tmp_path, unet={"steps": 1})
    unet.update(cases=str(workspace / "cases"), output_dir="meanrun", base_model_dir=str(model), latents="mean")
    (tmp_path / "unet.json").write_text(json.dumps(unet))
    train("unet", str(tmp_path / "unet.json"), progress=False)
    folders = list((tmp_path / "meanrun" / "latents").iterdir())
    assert len(folders) == 1 and folders[0].name.endswith("-mean")
    assert torch.allclose(torch.load(folders[0] / f"{case.name}.pt", weights_only=True), mean, atol=1e-5)
    unet["latents"] = "mode"
    (tmp_path / "unet.json").write_text(json.dumps(unet))
    result = run_cli("train", "unet", "--config", str(tmp_path / "unet.json"), "--quiet")
    assert result.returncode == 2 and "latents" in result.stderr and "mean" in result.stderr


def test_refined_latents_move_only_near_lesions_and_are_keyed_by_their_settings(workspace, tmp_path):
    """`latents: refined` caches μ with the latent near each lesion optimised (latent_refinement), in
    a folder named by the refinement settings; bad settings are one line and exit 2."""
    from MaisiSynthLib import labels as L
    from MaisiSynthLib.training.common import encode_case
    from MaisiSynthLib.training.data import load_cases

    model = workspace / "run" / "model"
    unet = _config(tmp_path, unet={"steps": 1})
    unet.update(cases=str(workspace / "cases"), output_dir="refrun", base_model_dir=str(model), latents="refined")
    unet["latent_refinement"] = {"iterations": 1, "lr": 0.1}
    (tmp_path / "unet.json").write_text(json.dumps(unet))
    train("unet", str(tmp_path / "unet.json"), progress=False)
    folders = list((tmp_path / "refrun" / "latents").iterdir())
    assert len(folders) == 1 and "-refined-" in folders[0].name
    autoencoder = load_models(model, "cpu").autoencoder
    case = load_cases(workspace / "cases")[0]
    mean = encode_case(autoencoder, case, 0, torch.device("cpu"), "mean")
    refined = torch.load(folders[0] / f"{case.name}.pt", weights_only=True)
    lesions = torch.isin(case.labels, torch.tensor(L.TUMORS)).float()[None]
    near = torch.nn.functional.max_pool3d(
        torch.nn.functional.adaptive_max_pool3d(lesions, tuple(mean.shape[1:])), 5, stride=1, padding=2
    )[0, 0].bool()
    assert near.any() and not near.all()
    assert torch.allclose(refined[:, ~near], mean[:, ~near], atol=1e-5)
    assert (refined[:, near] - mean[:, near]).abs().max() > 1e-3
    for bad in ('{"iterations": 0}', '{"bone_weight": "heavy"}', '{"lr": -1}'):
        result = run_cli(
            "train", "unet", "--config", str(tmp_path / "unet.json"), "--set", f"latent_refinement={bad}", "--quiet"
        )
        assert result.returncode == 2 and "latent_refinement" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) <= 2


def test_coarse_conditions_fold_structures_into_the_body_and_keep_lobes_bones_and_lesions(workspace, tmp_path):
    from MaisiSynthLib import labels as L
    from MaisiSynthLib.distributed import DistContext
    from MaisiSynthLib.masks import COARSE_KEEP
    from MaisiSynthLib.training.controlnet import ControlNetStage

    config = load_config(None, [], cases=str(workspace / "cases"), output_dir=str(tmp_path / "run"))
    config.update(network=tiny_config(), base_model_dir=str(workspace / "run" / "model"))
    config["controlnet"]["coarse_probability"] = 1.0
    stage = ControlNetStage(config, DistContext())
    stage.prepare()
    original = stage.cases[0].labels
    seen_partial = False
    for step in range(6):
        labels, perturbed = stage.condition(0, step, 0)
        again = stage.condition(0, step, 0)
        assert torch.equal(labels, again[0]) and torch.equal(perturbed, again[1])  # deterministic
        present = set(labels.unique().tolist())
        kept = set(original.unique().tolist()) & (set(L.LUNG_LOBES) | set(L.TUMORS) | set(L.BONES))
        assert kept and kept <= present and 200 in present and not present & {119, 25}
        folded = set(original.unique().tolist()) - present - {119, 25}
        assert folded  # some structures went into the body...
        seen_partial |= bool(present - set(COARSE_KEEP) - {0, 200})  # ...not always all of them
        assert ((labels == 200) | (labels == original) | (original == 119) | (original == 25)).all()
        # the perturbed mask has no lesion, and differs from the mask only where lesions were
        assert not torch.isin(perturbed, torch.tensor(L.TUMORS)).any()
        assert torch.equal(labels != perturbed, torch.isin(labels, torch.tensor(L.TUMORS)))
    assert seen_partial
    config["controlnet"]["coarse_probability"] = 0.0
    plain = ControlNetStage(config, DistContext())
    plain.prepare()
    assert torch.equal(plain.condition(0, 0, 0)[0], original)


def test_bf16_on_the_cpu_and_a_noise_free_posterior(workspace, tmp_path):
    """`cpu_bf16` trains under bfloat16 autocast (finite, close to float32, not equal to it);
    `posterior_noise: 0` trains the decoder on μ itself: the step's loss is that of decode(μ)."""
    from MaisiSynthLib.distributed import DistContext
    from MaisiSynthLib.training.vae import VaeStage

    runs = {}
    for name, settings in {"fp32": {}, "bf16": {"cpu_bf16": True}}.items():
        config = _config(tmp_path, vae={"steps": 2, "patch_size": [32, 32, 32], **settings})
        config.update(cases=str(workspace / "cases"), output_dir=name, base_model_dir=str(workspace / "run" / "model"))
        (tmp_path / f"{name}.json").write_text(json.dumps(config))
        train("vae", str(tmp_path / f"{name}.json"), progress=False)
        runs[name] = read_log(tmp_path / name / "logs" / "vae.csv")
    assert all(np.isfinite(r["loss"]) for r in runs["bf16"])
    first = runs["fp32"][0]["l1"]
    assert runs["bf16"][0]["l1"] != first and abs(runs["bf16"][0]["l1"] - first) < 0.05 * first + 1e-3

    for noise in (0.0, 1.0):
        config = load_config(None, [], cases=str(workspace / "cases"), output_dir=str(tmp_path / f"n{noise}"))
        config.update(network=tiny_config(), base_model_dir=str(workspace / "run" / "model"))
        config["vae"].update(patch_size=[32, 32, 32], posterior_noise=noise)
        stage = VaeStage(config, DistContext())
        stage.prepare()
        x, _, weights, z_fixed, _, _ = stage.batch(0)
        assert z_fixed is None  # no sampled latents unless vae.sampled_latents_from names a model
        autoencoder = stage.trainable().autoencoder.eval()
        with torch.no_grad():
            _, metrics = stage.loss(stage.trainable(), 0)
            z_mu, _ = autoencoder.encode(x)
            expected = float(((autoencoder.decode(z_mu) - x).abs() * weights).sum() / weights.sum())
        assert (metrics["l1"] == pytest.approx(expected, rel=1e-5)) == (noise == 0.0), (noise, metrics["l1"], expected)


def test_window_l1_sees_soft_tissue_contrast_the_plain_l1_hardly_does():
    from MaisiSynthLib.training.vae import window_l1

    to_unit = lambda hu: (torch.tensor(hu, dtype=torch.float32) + 1000.0) / 2000.0  # noqa: E731
    real = to_unit([40.0, 40.0, -900.0, 600.0])
    recon = to_unit([80.0, 40.0, -850.0, 600.0])  # 40 HU too bright in soft tissue, 50 HU in lung
    plain = float((recon - real).abs().mean())
    soft = float(window_l1(recon, real, [[-200, 200, 1.0]]))
    assert plain == pytest.approx((40 + 50) / 2000 / 4, rel=1e-4)
    assert soft == pytest.approx(40 / 400 / 4, rel=1e-4)  # the lung error is outside the window: not counted
    both = float(window_l1(recon, real, [[-200, 200, 1.0], [-1000, 0, 0.5]]))
    assert both == pytest.approx(soft + 0.5 * (50 / 1000 / 4), rel=1e-4)
    assert window_l1(recon, real, []) is None
    # weighted: the soft-tissue error sits on a voxel weighing 9, so it is 9 / 12 of the window's mean
    weights = torch.tensor([9.0, 1.0, 1.0, 1.0])
    weighted = float(window_l1(recon, real, [[-200, 200, 1.0]], weights))
    assert weighted == pytest.approx(9 * (40 / 400) / 12, rel=1e-4)


def test_target_margin_caps_each_lesions_push_at_its_own_latent_contrast(workspace, tmp_path):
    config = _config(tmp_path, controlnet={"steps": 3, "contrastive_margin": "target", "contrastive_delta": 5.0})
    config.update(cases=str(workspace / "cases"), output_dir="margin", base_model_dir=str(workspace / "run" / "model"))
    (tmp_path / "m.json").write_text(json.dumps(config))
    result = run_cli("train", "controlnet", "--config", str(tmp_path / "m.json"), "--quiet")
    assert result.returncode == 0, result.stderr
    rows = read_log(tmp_path / "margin" / "logs" / "controlnet.csv")
    margins = [r["margin"] for r in rows]
    assert max(margins) > 0 and all(0 <= m < 5.0 for m in margins)  # each phantom has lesions; not the cap
    assert all(-r["roi"] <= r["margin"] + 1e-6 for r in rows)  # the push never goes past the margin

    bad = run_cli(
        "train", "controlnet", "--config", str(tmp_path / "m.json"), "--set", "controlnet.contrastive_margin=tumor"
    )
    assert bad.returncode == 2 and "contrastive_margin" in bad.stderr and "target" in bad.stderr


def test_controlnet_flow_weights_on_lesions_and_bones_at_latent_resolution(tmp_path):
    from MaisiSynthLib import labels as L
    from MaisiSynthLib.distributed import DistContext
    from MaisiSynthLib.training.controlnet import ControlNetStage

    config = load_config(None, [], output_dir=str(tmp_path))
    stage = ControlNetStage(config, DistContext())
    labels = torch.ones(1, 1, 8, 8, 8, dtype=torch.long)  # liver; 4×4×4 image voxels per latent voxel
    assert stage.region_weights(labels, (2, 2, 2)) is None  # both weights 1: the plain flow loss
    labels[0, 0, 0, 0, 0] = L.HEPATIC_TUMOR  # one voxel is enough for its latent voxel
    labels[0, 0, 5, 5, 5] = 33  # a vertebra (C1)
    labels[0, 0, 1, 5, 1] = L.HEPATIC_TUMOR  # lesion and cartilage in the same latent voxel
    labels[0, 0, 2, 6, 2] = L.COSTAL_CARTILAGES
    stage.cfg.update(tumor_weight=3.0, bone_weight=2.0)
    weights = stage.region_weights(labels, (2, 2, 2))[0, 0]
    assert weights[0, 0, 0] == 3.0 and weights[1, 1, 1] == 2.0 and weights[0, 1, 0] == 3.0
    assert weights.sum() == 3.0 + 2.0 + 3.0 + 5 * 1.0
    labels[0, 0, 4:, :4, :4] = 3  # spleen fills one latent voxel, a kidney touches one with a vertebra
    labels[0, 0, 7, 7, 7] = 5
    stage.cfg.update(organ_weight=4.0, organ_labels=[3, 5])
    weights = stage.region_weights(labels, (2, 2, 2))[0, 0]
    assert weights[1, 0, 0] == 4.0 and weights[1, 1, 1] == 4.0  # the largest weight where two regions meet
    assert weights.sum() == 3.0 + 3.0 + 4.0 + 4.0 + 4 * 1.0  # lesions keep theirs; livers stay at 1


def test_a_setting_of_the_wrong_kind_is_refused_before_anything_runs(tmp_path):
    from MaisiSynthLib.errors import OptionError

    for override, kind in (
        ("controlnet.bone_weight=heavy", "a number"),
        ("controlnet.steps=2.5", "a whole number"),
        ("controlnet.contrastive=1", "true or false"),
        ("controlnet.contrastive_margin=3", "a string"),
        ("controlnet.tumor_labels=26", "a list"),
        ('controlnet.organ_labels=[3, "5"]', "a whole number"),  # each label id, not only the list
        ("vae.patch_size=[64, 64, 32.5]", "a whole number"),
    ):
        with pytest.raises(OptionError) as refused:
            load_config(None, [override], output_dir=str(tmp_path))
        assert override.split("=")[0] in refused.value.message and refused.value.hint == f"give {kind}"
    config = load_config(None, ["controlnet.lr=1", "vae.patch_size=null"], output_dir=str(tmp_path))
    assert config["controlnet"]["lr"] == 1 and config["vae"]["patch_size"] is None  # an int is a number; null passes
    result = run_cli(
        "train", "controlnet", "--output-dir", str(tmp_path / "run"), "--set", "controlnet.bone_weight=heavy"
    )
    assert result.returncode == 2 and "controlnet.bone_weight" in result.stderr and "number" in result.stderr
    assert not (tmp_path / "run").exists()


def test_validation_cases_log_what_each_checkpoint_draws(workspace, tmp_path):
    """With `validation_cases`, each ControlNet checkpoint generates the held-out cases from the model
    folder just saved and logs per-organ HU errors and lesion conspicuity; resume redoes rows."""
    import csv

    from MaisiSynthLib.errors import OptionError
    from MaisiSynthLib.evaluation import evaluate

    held_out = tmp_path / "held_out"
    write_phantoms(held_out, 1, size=SIZE, spacing=SPACING, seed=1001, tumors="all")

    def run(out: str, cases: object = str(held_out), **kwargs):
        config = _config(tmp_path, controlnet={"steps": 2, "checkpoint_every": 1, "validate_steps": 2})
        config.update(
            cases=str(workspace / "cases"),
            output_dir=out,
            base_model_dir=str(workspace / "run" / "model"),
            validation_cases=cases,
        )
        (tmp_path / f"{out}.json").write_text(json.dumps(config))
        return train("controlnet", str(tmp_path / f"{out}.json"), progress=False, **kwargs)

    def rows(out: str) -> list[dict]:
        with (tmp_path / out / "logs" / "validation.csv").open(newline="") as f:
            return list(csv.DictReader(f))

    run("val", stop_after=1)
    assert [r["step"] for r in rows("val")] == ["1"]
    state = tmp_path / "val" / "state" / "controlnet.pt"
    at_step_1 = state.read_bytes()
    run("val", resume=True)
    assert [r["step"] for r in rows("val")] == ["1", "2"]
    state.write_bytes(at_step_1)  # as if interrupted after the step-2 row but before its state was kept
    run("val", resume=True)
    logged = rows("val")
    assert [r["step"] for r in logged] == ["1", "2"]  # step 2 redone, its row replaced, not repeated
    # the last row measures the saved model exactly as `maisi-synth evaluate` does at those settings
    summary = evaluate(tmp_path / "val" / "model", held_out, steps=2, seed=3, device="cpu", roi=False)
    for organ, error in summary["organ_median_abs_error_hu"].items():
        if error is not None:
            assert float(logged[-1][f"{organ} |error| HU"]) == pytest.approx(error, rel=1e-4), organ
    assert float(logged[-1]["liver error HU"]) == pytest.approx(
        summary["organ_median_signed_error_hu"]["liver"], rel=1e-4
    )
    tumor, c = next(iter(summary["tumor_conspicuity_hu"].items()))
    assert float(logged[-1][f"{tumor} synthetic/real"]) == pytest.approx(c["ratio"], rel=1e-4)
    # a folder without cases, or a number where the folder goes, is refused before the first step
    for bad, words in ((str(tmp_path / "nowhere"), "not found"), (5, "validation_cases")):
        with pytest.raises(OptionError) as refused:
            run(f"bad{words[:3]}", cases=bad)
        assert words in refused.value.message
        assert not (tmp_path / f"bad{words[:3]}" / "state").exists()


def test_controlnet_gain_benchmark_measures_a_model_folder_and_leaves_it_unchanged(workspace, tmp_path):
    """The benchmark reads a model through the ControlNet stage; the stage writes its model folder's
    settings when it trains, which on a shipped folder would replace sampling settings the training
    config does not hold (it once dropped the demo model's latent prior settings)."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(workspace / "run" / "model", model)
    settings = json.loads((model / "maisi_synth.json").read_text())
    settings["inference"] = {"latent_prior_bone_from": 0.3}  # a setting only the shipped folder has
    (model / "maisi_synth.json").write_text(json.dumps(settings))
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    config = json.loads((workspace / "train.json").read_text())
    config.update(cases=str(workspace / "cases"), output_dir=str(tmp_path / "run"), model_dir=str(model))
    (tmp_path / "gain.json").write_text(json.dumps(config))
    result = subprocess.run(
        [sys.executable, "benchmarks/controlnet_gain.py", "--config", str(tmp_path / "gain.json"),
         "--controlnet", f"tiny={model}", "--samples", "8"],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith(("UNet", "tiny"))}
    assert set(rows) == {"UNet", "tiny"}

    # The tiny ControlNet's output convolutions started at zero and 3 Adam steps moved them by ~1e-3
    # each: it adds almost nothing, so each of its bins is the UNet's alone to within a percent (the
    # exact digits differ between CPUs), and so is the ratio the benchmark prints
    def numbers(row: str) -> list[float]:
        return [float(x) for x in re.findall(r"(?<![=\d.])\d+\.\d+", row)]

    unet, tiny = numbers(rows["UNet"]), numbers(rows["tiny"])
    assert len(unet) == len(tiny) >= 2 and unet == pytest.approx(tiny, rel=0.01)
    ratio = re.search(r"noisiest quarter, tiny: (\d+\.\d+) × the UNet alone", result.stdout)
    assert ratio and 0.99 <= float(ratio.group(1)) <= 1.01
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


def test_a_stage_from_a_model_folder_keeps_its_latent_prior_only_with_its_encoder(workspace, tmp_path):
    """Sampling settings that only a model folder holds (the latent prior's) survive a stage trained
    from it, with the prior file, as long as the encoder that prior was fitted on stays; a stage that
    retrains the encoder drops both (the pipeline refuses prior settings without the file)."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(workspace / "run" / "model", base)
    result = run_cli("fit-prior", "--model-dir", str(base), "--cases", str(workspace / "cases"), "--quiet")
    assert result.returncode == 0, result.stderr
    settings = json.loads((base / "maisi_synth.json").read_text())
    settings["name"] = "the base's name"
    settings["inference"] = {"latent_prior_from": 0.6, "latent_prior_bone_from": 0.3, "num_inference_steps": 7}
    (base / "maisi_synth.json").write_text(json.dumps(settings))
    config = tmp_path / "train.json"
    train = json.loads((workspace / "train.json").read_text())
    train["model_settings"] = {**TINY_SETTINGS, "inference": {"num_inference_steps": 5}}
    config.write_text(json.dumps(train))

    def stage(name: str, out: str, *extra: str) -> Path:
        result = run_cli(
            "train", name, "--config", str(config), "--base-model-dir", str(base), "--set",
            f"cases={workspace / 'cases'}", "--set", f"output_dir={tmp_path / out}", "--set",
            f"model_dir={tmp_path / out / 'model'}", f"--set={name}.steps=1", *extra, "--quiet",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return tmp_path / out / "model"

    # a base folder whose settings are not a JSON object: one line, and no run folder is written
    good = (base / "maisi_synth.json").read_text()
    (base / "maisi_synth.json").write_text("[1, 2]")
    result = run_cli(
        "train", "controlnet", "--config", str(config), "--base-model-dir", str(base), "--set",
        f"cases={workspace / 'cases'}", "--set", f"output_dir={tmp_path / 'bad'}", "--set",
        f"model_dir={tmp_path / 'bad' / 'model'}", "--set=controlnet.steps=1", "--quiet",
    )  # fmt: skip
    assert result.returncode == 2 and "maisi_synth.json is not a JSON object" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad" / "model").exists()
    (base / "maisi_synth.json").write_text(good)
    model = stage("controlnet", "cn")
    assert (model / "latent_prior.pt").read_bytes() == (base / "latent_prior.pt").read_bytes()
    kept = json.loads((model / "maisi_synth.json").read_text())
    # the config's settings win where they speak (its name and its inference keys), the folder's stay
    assert kept["name"] == TINY_SETTINGS["name"] != settings["name"]
    assert kept["inference"]["latent_prior_from"] == 0.6 and kept["inference"]["latent_prior_bone_from"] == 0.3
    assert kept["inference"]["num_inference_steps"] == 5
    assert load_models(model, device="cpu").latent_prior is not None
    # a decoder-only VAE stage keeps the encoder, so the prior stays; the whole VAE, trained into a
    # folder that holds a prior, drops it
    decoder = stage("vae", "dec", "--set", "vae.decoder_only=true")
    assert (decoder / "latent_prior.pt").exists()
    shutil.copytree(model, tmp_path / "whole" / "model")
    whole = stage("vae", "whole")
    dropped = json.loads((whole / "maisi_synth.json").read_text())["inference"]
    assert not (whole / "latent_prior.pt").exists()
    assert "latent_prior_from" not in dropped and "latent_prior_bone_from" not in dropped
    assert load_models(whole, device="cpu").latent_prior is None


def test_averaged_controlnet_is_the_weighted_mean_and_loads(tmp_path):
    from MaisiSynthLib.tiny_model import make_tiny_model_folder

    first = make_tiny_model_folder(tmp_path / "first", seed=1)
    second = make_tiny_model_folder(tmp_path / "second", seed=3)
    mixed = make_tiny_model_folder(tmp_path / "mixed", seed=5)
    (mixed / CONTROLNET_FILE).unlink()
    command = [sys.executable, "-m", "MaisiSynthLib.training.averaging", str(first / CONTROLNET_FILE)]
    result = subprocess.run(
        [*command, str(second / CONTROLNET_FILE), "--weight", "0.25", "--out", str(mixed / CONTROLNET_FILE)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    a, b, m = (torch.load(f / CONTROLNET_FILE, weights_only=True) for f in (first, second, mixed))
    key = "controlnet_state_dict"
    floats = [k for k, t in a[key].items() if t.is_floating_point()]
    assert floats and any(not torch.equal(a[key][k], b[key][k]) for k in floats)
    for k in floats:
        torch.testing.assert_close(m[key][k], 0.25 * a[key][k] + 0.75 * b[key][k])
    assert m["epoch"] == a["epoch"]
    # the averaged ControlNet is a working model folder's ControlNet
    models = load_models(mixed, "cpu")
    assert torch.equal(models.controlnet.state_dict()[floats[0]], m[key][floats[0]])

    # a UNet is not a ControlNet; a weight outside [0, 1] is refused; nothing is written either time
    out = tmp_path / "refused.pt"
    for second_file, weight in ((first / UNET_FILE, "0.5"), (second / CONTROLNET_FILE, "1.5")):
        result = subprocess.run(
            [*command, str(second_file), "--weight", weight, "--out", str(out)], capture_output=True, text=True
        )
        assert result.returncode == 2 and "Fix:" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not out.exists() and not list(tmp_path.glob("refused*"))
    assert (
        "different networks"
        in subprocess.run([*command, str(first / UNET_FILE), "--out", str(out)], capture_output=True, text=True).stderr
    )


def test_grown_vae_keeps_the_latents_and_trains(workspace, tmp_path):
    """A VAE grown wider and deeper encodes and decodes as the original (so the UNet and ControlNet
    trained on its latents still fit), and `train vae` fine-tunes it in place of the original."""
    from MaisiSynthLib.tiny_model import make_tiny_model_folder

    small = make_tiny_model_folder(tmp_path / "small", seed=2)
    grown = tmp_path / "grown"
    command = [sys.executable, "-m", "MaisiSynthLib.training.growing", str(small)]
    result = subprocess.run(
        [*command, "--factor", "2", "--res-blocks", "2", "1", "2", "--out", str(grown)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    network = json.loads((grown / "config_network_rflow.json").read_text())["autoencoder_def"]
    assert network["num_channels"] == [16, 16, 32] and network["norm_num_groups"] == 8
    assert network["num_res_blocks"] == [2, 1, 2]
    for name in (UNET_FILE, CONTROLNET_FILE):  # the diffusion stages are the original's, byte for byte
        assert (grown / name).read_bytes() == (small / name).read_bytes()
    a, b = load_models(small, "cpu").autoencoder, load_models(grown, "cpu").autoencoder
    assert sum(p.numel() for p in b.parameters()) > 3 * sum(p.numel() for p in a.parameters())
    x = torch.from_numpy(np.asanyarray(nib.load(str(workspace / "cases" / "case0000_image.nii.gz")).dataobj))
    x = ((x.float().clamp(-1000, 1000) + 1000) / 2000)[None, None]
    with torch.no_grad():
        (mu_a, sigma_a), (mu_b, sigma_b) = a.encode(x), b.encode(x)
        torch.testing.assert_close(mu_b, mu_a, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sigma_b, sigma_a, atol=1e-4, rtol=1e-4)
        image_a, image_b = a.decode(mu_a), b.decode(mu_a)
        torch.testing.assert_close(image_b, image_a, atol=1e-4, rtol=1e-4)
        assert (image_b - image_a).abs().max() < 1e-4 < image_a.std()

    # fine-tuning the grown VAE moves the new weights (a new block is the identity only at the start)
    config = _config(tmp_path, vae={"patch_size": [32, 32, 32], "lr": 1e-2, "steps": 2})
    config.update(cases=str(workspace / "cases"), network=str(grown / "config_network_rflow.json"))
    (tmp_path / "train.json").write_text(json.dumps(config))
    result = run_cli(
        "train", "vae", "--config", str(tmp_path / "train.json"), "--base-model-dir", str(grown), "--quiet"
    )
    assert result.returncode == 0, result.stderr
    before = torch.load(grown / AUTOENCODER_FILE, weights_only=True)
    after = torch.load(tmp_path / "run" / "model" / AUTOENCODER_FILE, weights_only=True)
    new_block = [k for k in before if k.startswith("decoder.blocks.2.conv2.")]  # the lowest level's added block
    assert new_block and all(before[k].abs().max() == 0 for k in new_block)
    assert all(after[k].abs().max() > 0 for k in new_block)

    # nothing to grow, fewer blocks than now, or a folder that is not empty: one line, nothing written
    for args, words in (
        (["--factor", "1"], "nothing to grow"),
        (["--res-blocks", "0", "1", "1"], "--res-blocks"),
        (["--factor", "2", "--out", str(small)], "not an empty folder"),
    ):
        out = [] if "--out" in args else ["--out", str(tmp_path / "refused")]
        result = subprocess.run([*command, *args, *out], capture_output=True, text=True)
        assert result.returncode == 2 and words in result.stderr and "Fix:" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "refused").exists()
    assert sorted(p.name for p in small.iterdir()) == sorted(p.name for p in grown.iterdir())


def test_decoder_learns_to_decode_the_latents_the_model_samples(workspace, tmp_path):
    """vae.sampled_latents_from: the full model samples one latent from each training mask (cached in
    the run folder, exactly what `generate_volume` gives with that case's seed), and the decoder alone
    learns to decode it towards the case's image; the encoder, hence the latent space, stays."""
    from MaisiSynthLib.masks import Mask
    from MaisiSynthLib.pipeline import generate_volume
    from MaisiSynthLib.training.data import load_cases
    from MaisiSynthLib.training.sampled import case_seed

    model = workspace / "run" / "model"
    vae = {"patch_size": None, "steps": 8, "lr": 3e-3, "decoder_only": True, "fixed_batch": True}
    vae.update(sampled_latents_from=str(model), sampled_fraction=1.0, sampled_steps=2)
    config = _config(tmp_path, vae=vae)
    config.update(cases=str(workspace / "cases"))
    (tmp_path / "train.json").write_text(json.dumps(config))
    result = run_cli(
        "train", "vae", "--config", str(tmp_path / "train.json"), "--base-model-dir", str(model), "--quiet"
    )
    assert result.returncode == 0, result.stderr

    cases = {c.name: c for c in load_cases(workspace / "cases")}
    cached = {p.stem: torch.load(p, weights_only=True) for p in (tmp_path / "run" / "sampled_latents").glob("*/*.pt")}
    assert sorted(cached) == sorted(cases)
    with open(tmp_path / "run" / "logs" / "vae_batches_rank0.csv", newline="") as f:
        first = next(csv.DictReader(f))["case"]  # fixed_batch: the same case every step
    case = cases[first]
    models = load_models(model, "cpu")
    mask = Mask(labels=case.labels[0].numpy().astype(np.int16), affine=np.diag([*case.spacing, 1.0]))
    options = {"seed": case_seed(3, case.name), "steps": 2}
    direct = generate_volume(mask, options, models=models, keep_latent=True).latent[0]
    assert direct.shape == (4, *(n // 4 for n in case.shape)) and torch.equal(cached[first], direct)
    assert all(r["sampled"] == 1.0 for r in read_log(tmp_path / "run" / "logs" / "vae.csv"))

    before = models.autoencoder
    after = load_models(tmp_path / "run" / "model", "cpu").autoencoder
    with torch.no_grad():
        error = [(a.decode(cached[first][None]) - case.image[None]).abs().mean() for a in (before, after)]
        # the latent space stays: the encoder is the base model's, to the bit
        torch.testing.assert_close(
            after.encode(case.image[None])[0], before.encode(case.image[None])[0], rtol=0, atol=0
        )
    assert error[1] < 0.9 * error[0]

    # the encoder would move away from the sampled latents' space; a share outside (0, 1]: one line, no model
    for override, words in (({"decoder_only": False}, "decoder_only"), ({"sampled_fraction": 0.0}, "sampled_fraction")):
        bad = _config(tmp_path, vae={**vae, **override})
        bad.update(cases=str(workspace / "cases"), output_dir="refused")
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        result = run_cli(
            "train", "vae", "--config", str(tmp_path / "bad.json"), "--base-model-dir", str(model), "--quiet"
        )
        assert result.returncode == 2 and words in result.stderr and "Fix:" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "refused" / "model").exists()


def test_timestep_floor_moves_the_same_draws_onto_the_noisy_part_of_the_schedule(tmp_path):
    from MaisiSynthLib.errors import OptionError
    from MaisiSynthLib.models import build_scheduler
    from MaisiSynthLib.training.common import flow_batch
    from MaisiSynthLib.training.data import Case

    scheduler = build_scheduler(tiny_config())
    total = float(scheduler.num_train_timesteps)
    latent = torch.randn(4, 8, 8, 4)
    case = Case("a", torch.zeros(1, 32, 32, 16), torch.zeros(1, 32, 32, 16, dtype=torch.long), (6.0, 6.0, 8.0))
    local = [(0, 0), (1, 0), (2, 0), (3, 0)]
    lowest = total
    for step in range(5):
        batches = [
            flow_batch(scheduler, [latent], [case], local, 4, step, 7, 1.0, None, torch.device("cpu"), floor)
            for floor in (0.0, 0.5)
        ]
        plain, high = (b.timesteps.float() for b in batches)
        lowest = min(lowest, float(plain.min()))
        assert (high >= 0.5 * total).all() and (high < total).all()
        assert torch.allclose(high, 0.5 * total + 0.5 * plain)  # the same draws, moved
        assert torch.equal(batches[0].noise, batches[1].noise)
        # the noisy input follows the moved timestep: x_t = (1 - t/T) x0 + t/T noise
        w = (high / total).view(-1, 1, 1, 1, 1)
        assert torch.allclose(batches[1].noisy, (1 - w) * batches[1].latents + w * batches[1].noise, atol=1e-5)
    assert lowest < 0.5 * total  # without the floor, some draws fall in the data half
    for value in ("1.0", "-0.1"):
        with pytest.raises(OptionError) as refused:
            load_config(None, [f"controlnet.timestep_floor={value}"], output_dir=str(tmp_path))
        assert "controlnet.timestep_floor" in refused.value.message and "[0, 1)" in refused.value.hint
    result = run_cli("train", "unet", "--output-dir", str(tmp_path / "run"), "--set", "unet.timestep_floor=1")
    assert result.returncode == 2 and "unet.timestep_floor" in result.stderr
    assert not (tmp_path / "run").exists()
