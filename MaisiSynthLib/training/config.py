"""Training configuration: a JSON file, stage defaults, and `--set key=value` overrides.

A training config names the network config (official format, path or inline), the cases, the output
folder, and one section per stage:

    {
      "network": "config_network_rflow.json",
      "cases": "phantoms/train",
      "output_dir": "runs/demo",
      "seed": 0,
      "vae": {"steps": 2000, "batch_size": 2, "lr": 1e-4, "patch_size": [64, 64, 64]},
      "unet": {"steps": 6000, "batch_size": 4, "lr": 1e-4},
      "controlnet": {"steps": 4000, "contrastive": true}
    }

Relative paths are relative to the config file. Every key has a default below.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from ..errors import OptionError
from ..model_home import CONFIG_NAME, find_model_file

COMMON = {
    "steps": 100,
    "batch_size": 1,  # per process; the global batch is batch_size × processes
    "lr": 1e-4,
    "weight_decay": 0.0,
    "warmup_steps": 0,
    "lr_power": 2.0,  # polynomial decay to 0 over `steps`, as the official scripts
    "grad_clip": 0.0,
    "ema_decay": 0.0,  # > 0 saves an exponential moving average of the weights
    "amp": True,  # float16 autocast + grad scaling on GPUs; ignored on the CPU
    "cpu_bf16": False,  # bfloat16 autocast on the CPU (faster where the CPU has bf16 units)
    "checkpoint_every": 500,
    "log_every": 10,
    "fixed_batch": False,  # train on step 0's batch (data, noise, timesteps) every step: an overfit check
}

DEFAULTS: dict[str, Any] = {
    "network": None,
    "cases": None,
    "output_dir": "runs/maisi",
    "model_dir": None,  # default <output_dir>/model
    "base_model_dir": None,  # take the VAE/UNet this stage needs from another model folder
    # Held-out caseNNNN_image/_label pairs: each ControlNet checkpoint generates them and logs per-organ
    # HU errors and lesion conspicuity to logs/validation.csv (training.validation); null: off.
    "validation_cases": None,
    "model_settings": {},  # written as maisi_synth.json beside the config
    "seed": 0,
    "device": "auto",
    # What the UNet and ControlNet learn from: one posterior sample per case ("sample", the official
    # recipe) or the posterior mean ("mean"); see training.common.cached_latents.
    "latents": "sample",
    # `latents: "refined"`: μ with the latent voxels near each lesion optimised against the image
    # (MaisiSynthLib.latent_refinement), for an encoder that passes too little of a small lesion
    "latent_refinement": {
        "iterations": 40,
        "lr": 0.02,
        "lesion_weight": 20.0,
        "bone_weight": 20.0,  # bone lesions sit in bone: weighted too, the bone keeps its HU
        "latent_margin": 2,  # free latent voxels around a lesion's own
        "bf16": True,  # bfloat16 autocast for the decodes (CPU and CUDA)
    },
    "vae": {
        **COMMON,
        "patch_size": [64, 64, 64],  # null: whole volumes, batched by shape
        "kl_weight": 1e-6,
        "bone_weight": 1.0,  # L1 weight on bone voxels (and the voxel around them)
        "tumor_weight": 1.0,  # L1 weight on lesion voxels (and the voxel around them)
        # false: the bone/tumor weights on those voxels only, not the one-voxel ring around them, so a
        # voxel the latent leaves uncertain is tipped towards bone/lesion (see training.vae)
        "region_ring": True,
        # Scale of the posterior sample's noise in training (z = μ + s·σ·ε): 1 is the official VAE; 0
        # trains the decoder on μ itself, the latent the diffusion stages learn and generate.
        "posterior_noise": 1.0,
        # Extra L1 terms through HU windows, [[lo, hi, weight], ...], e.g. [[-200, 200, 1]] for soft
        # tissue contrast (see training.vae.window_l1); none by default (the official loss).
        "windows": [],
        "weighted_windows": False,  # true: the window terms use the bone/tumor weights too
        "perceptual_weight": 0.0,  # needs LPIPS weights (a download); off by default
        "adversarial_weight": 0.0,
        "adversarial_start": 0,
        "discriminator_lr": 1e-4,
        # Train only the decoder (with base_model_dir): the encoder, hence the latents and any UNet
        # trained on them, stay exactly as they were. Used to fine-tune on the inference-size volume.
        "decoder_only": False,
        # Train only the encoder (with base_model_dir): the decoder, hence every image the full model
        # generates, stays exactly as it was; the latents move, so a UNet trained later learns them.
        "encoder_only": False,
        # > 0 (with base_model_dir): L1 between μ and the base VAE's μ on latent voxels farther than
        # anchor_margin from a lesion, so a heavy lesion weight moves the lesion's latent only
        "anchor_weight": 0.0,
        "anchor_margin": 1,
        # Share of patches cut around a lesion voxel (a random one of the case's) instead of anywhere:
        # a lesion is a few hundred of a million voxels, so a random patch rarely holds one
        "lesion_patch_share": 0.0,
        # Decoder calibration on the diffusion's own latents (training.sampled; needs decoder_only and
        # whole volumes): a model folder whose UNet + ControlNet sample a latent from each training
        # mask; that share of samples decodes the sampled latent against the case's image.
        "sampled_latents_from": None,
        "sampled_fraction": 0.5,
        "sampled_steps": None,  # sampler steps of those latents (null: the model's)
    },
    "unet": {
        **COMMON,
        "loss": "l1",  # l1 (official) or l2, to the velocity x0 − noise
        "modality": 1,
        "timestep_floor": 0.0,  # > 0: train on t in [floor · T, T] only (see common.flow_batch)
    },
    "controlnet": {
        **COMMON,
        "lr": 1e-5,
        "loss": "l1",
        "modality": 1,
        "contrastive": True,  # the region-specific contrastive loss
        "contrastive_weight": 0.01,  # λ
        "contrastive_delta": 2.0,  # δ
        "contrastive_margin": "constant",  # constant: δ; target: the lesion's latent contrast ≤ δ; signed: + its sign
        "contrastive_push": "both",  # both: v and v' pushed apart (paper); mask: v only, v' left alone
        "background_term": "paper",  # paper: v(c) ≈ v(c') outside; official: v(c') ≈ x0 − noise outside
        "perturbation": "host",  # host: tumor → host organ (official); background: tumor → 0
        "tumor_weight": 1.0,  # > 1 weights the flow loss inside tumors (latent resolution)
        "tumor_labels": [23, 24, 26, 27, 128],
        "bone_weight": 1.0,  # > 1 weights the flow loss on bones and costal cartilages (latent resolution)
        "organ_weight": 1.0,  # > 1 weights the flow loss on the organs in organ_labels (latent resolution)
        "organ_labels": [3, 4, 5, 14],  # spleen, pancreas, kidneys: small organs the ControlNet draws too faintly
        "coarse_probability": 0.0,  # share of samples whose mask is coarsened (see training.controlnet)
        "unet_lr": 0.0,  # > 0: fine-tune the UNet jointly at this learning rate (0: frozen, official)
        "zero_init_scale": 0.0,  # > 0: small random weights instead of zeros in the output convolutions
        "validate_steps": 10,  # Euler steps of the validation CTs (with validation_cases)
        "timestep_floor": 0.0,  # > 0: train on t in [floor · T, T] only (see common.flow_batch)
    },
}


_PATH_KEYS = ("network", "cases", "output_dir", "model_dir", "base_model_dir", "validation_cases")
_STAGE_PATH_KEYS = (("vae", "sampled_latents_from"),)


def _merge(base: dict, update: dict, path: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        where = f"{path}{key}"
        if key not in base:
            raise OptionError(f"unknown training setting '{where}'", f"use one of: {', '.join(sorted(base))}")
        if isinstance(base[key], dict) and base[key] and isinstance(value, dict):
            out[key] = _merge(base[key], value, f"{where}.")
        else:
            out[key] = _check_type(where, base[key], value)
    return out


def _check_type(where: str, default: Any, value: Any) -> Any:
    """`value` if it has the default's kind (an int where a float goes). null passes: some settings
    take it as "none" (`vae.patch_size: null` trains on whole volumes), and any where the default is."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif isinstance(default, float):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        ok, kind = (
            isinstance(value, type(default)),
            {str: "a string", list: "a list", dict: "an object"}.get(type(default), type(default).__name__),
        )
    if not ok:
        raise OptionError(f"training setting '{where}' is {json.dumps(value, default=str)}", f"give {kind}")
    if isinstance(default, list) and default:
        # label ids and patch sizes: every item of the default's kind (["3"] is not label 3)
        for i, item in enumerate(value):
            _check_type(f"{where}[{i}]", default[0], item)
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """`vae.steps=200` → (["vae", "steps"], 200); values are JSON when they parse, else strings."""
    if "=" not in text:
        raise OptionError(f"--set takes key=value, got '{text}'", "e.g. --set controlnet.contrastive=false")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def load_config(path: str | Path | None, overrides: list[str] | None = None, **direct: Any) -> dict:
    """Defaults ← config file ← `--set` overrides ← direct keyword overrides (CLI flags)."""
    data: dict = {}
    base_dir = Path.cwd()
    if path is not None:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise OptionError(f"training config not found: {path}", "check the --config path") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise OptionError(f"cannot read training config {path}: {exc}", "fix the JSON") from None
        base_dir = path.resolve().parent
    config = _merge(DEFAULTS, data)
    for text in overrides or []:
        keys, value = parse_override(text)
        nested = {keys[-1]: value}
        for key in reversed(keys[:-1]):
            nested = {key: nested}
        config = _merge(DEFAULTS, _deep_update(config, nested))
    for key, value in direct.items():
        if value is not None:
            if key in _PATH_KEYS and not Path(value).is_absolute():
                value = str(Path.cwd() / value)  # a path given on the command line is relative to the cwd
            config = _merge(DEFAULTS, _deep_update(config, _nest(key, value)))
    for section, key in [(config, k) for k in _PATH_KEYS] + [(config[s], k) for s, k in _STAGE_PATH_KEYS]:
        value = section.get(key)
        if isinstance(value, str) and not Path(value).is_absolute():
            section[key] = str(base_dir / value)
    if config["model_dir"] is None:
        config["model_dir"] = str(Path(config["output_dir"]) / "model")
    for stage in ("unet", "controlnet"):
        floor = config[stage]["timestep_floor"]
        if not 0.0 <= floor < 1.0:
            raise OptionError(f"{stage}.timestep_floor is {floor!r}", "give a share of T in [0, 1), e.g. 0.5")
    return config


def _nest(dotted: str, value: Any) -> dict:
    keys = dotted.split(".")
    nested: Any = value
    for key in reversed(keys):
        nested = {key: nested}
    return nested


def _deep_update(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and out.get(key):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = value
    return out


def network_config(config: dict) -> dict:
    """The official-format network config a training config names (path or inline)."""
    network = config["network"]
    if network is None:
        found = find_model_file(config["model_dir"], CONFIG_NAME)
        if found is not None:
            return json.loads(found.read_text())
        raise OptionError("the training config names no network", 'set "network" to an official-format config JSON')
    if isinstance(network, dict):
        return network
    try:
        return json.loads(Path(network).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OptionError(f"network config not found: {network}", 'check "network" in the training config') from None
