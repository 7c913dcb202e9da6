"""What the UNet and ControlNet loops share: where weights come from, cached latents, flow batches.

A stage reads the networks it builds on (the VAE for the UNet; VAE and UNet for the ControlNet) from
`base_model_dir` when set, else from the run's own model folder (where the earlier stages wrote
them), and always writes a complete official-format model folder: files it did not train are copied
from the base folder, so `<output_dir>/model` loads with `generate` after any stage.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import OptionError
from ..model_home import find_model_file
from ..models import (
    AUTOENCODER_FILE,
    CONFIG_NAME,
    CONTROLNET_FILE,
    PRIOR_FILE,
    SETTINGS_NAME,
    UNET_FILE,
    build_network,
    checkpoint_state_dict,
    load_autoencoder_weights,
    load_checkpoint,
    load_weights,
    network_kwargs,
    read_json,
    save_json,
)
from .data import Case, generator, mix_seed, name_key

WEIGHT_FILES = (AUTOENCODER_FILE, UNET_FILE, CONTROLNET_FILE)
# The sampling settings that need the folder's latent_prior.pt.
PRIOR_SETTINGS = ("latent_prior_from", "latent_prior_bone_from")


def find_weight(folder: str | Path | None, name: str) -> Path | None:
    """`name` in a flat or official-layout model folder, or None."""
    return None if folder is None else find_model_file(folder, name)


def source_folder(config: dict) -> Path:
    return Path(config["base_model_dir"] or config["model_dir"])


def require_weight(config: dict, name: str, stage: str, earlier: str) -> Path:
    path = find_weight(source_folder(config), name)
    if path is None:
        raise OptionError(
            f"the {stage} stage needs {name}, which is not in {source_folder(config)}",
            f"run `maisi-synth train {earlier}` first or set base_model_dir to a model folder that has it",
        )
    return path


def load_autoencoder(config: dict, network: dict, stage: str) -> torch.nn.Module:
    path = require_weight(config, AUTOENCODER_FILE, stage, "vae")
    autoencoder = build_network(network, "autoencoder_def", "cpu")
    load_autoencoder_weights(autoencoder, path)
    return without_splits(autoencoder).eval().requires_grad_(False)


def load_unet(config: dict, network: dict, stage: str) -> tuple[torch.nn.Module, float]:
    path = require_weight(config, UNET_FILE, stage, "unet")
    checkpoint = load_checkpoint(path)
    unet = build_network(network, "diffusion_unet_def", "cpu")
    load_weights(unet, checkpoint_state_dict(checkpoint, "unet_state_dict", path), path, "diffusion UNet")
    return unet, float(torch.as_tensor(checkpoint["scale_factor"]).float())


def complete_model_folder(config: dict, network: dict, keeps_encoder: bool = True) -> None:
    """Config, settings and the weights this run did not train, copied into the run's model folder.

    The folder's `maisi_synth.json` is the base folder's, then the folder's own, then the config's
    `model_settings`, each later one winning key by key, so that a setting only a model folder holds
    (the latent prior's) survives a stage trained from it or into it. The latent prior holds levels of
    the encoder's latents: it comes from the base folder only with the same VAE file, a stage that
    trains the encoder (`keeps_encoder=False`) drops it, and its settings go wherever the prior file
    is absent (the pipeline would refuse them).
    """
    model_dir = Path(config["model_dir"])
    base = config.get("base_model_dir")
    from_base = bool(base) and Path(base).resolve() != model_dir.resolve()
    # Files are found as the loader finds them (flat or official layout) and written flat. The
    # settings are read before anything is written: a broken file stops the stage here, not halfway.
    layers = [_settings_of(base) if from_base else {}, _settings_of(model_dir), config.get("model_settings") or {}]
    model_dir.mkdir(parents=True, exist_ok=True)
    save_json(network, model_dir / CONFIG_NAME)
    if from_base:
        for name in WEIGHT_FILES:
            source = find_weight(base, name)
            if source is not None and find_weight(model_dir, name) is None:
                shutil.copyfile(source, model_dir / name)
    prior = find_weight(model_dir, PRIOR_FILE)
    if prior is not None and not keeps_encoder:
        prior.unlink()
        prior = None
    base_prior = find_weight(base, PRIOR_FILE) if from_base else None
    if prior is None and keeps_encoder and base_prior is not None and _same_vae(base, model_dir):
        prior = model_dir / PRIOR_FILE
        shutil.copyfile(base_prior, prior)
    settings: dict = {}
    for layer in layers:
        settings = _merged(settings, layer)
    if prior is None and isinstance(settings.get("inference"), dict):
        for key in PRIOR_SETTINGS:
            settings["inference"].pop(key, None)
    if settings:
        save_json(settings, model_dir / SETTINGS_NAME)


def _settings_of(folder: str | Path) -> dict:
    """A model folder's maisi_synth.json, or {} when it has none (the loader's reader and messages)."""
    path = find_weight(folder, SETTINGS_NAME)
    return {} if path is None else read_json(path)


def _merged(lower: dict, upper: dict) -> dict:
    """`upper` over `lower`, dict values merged key by key, anything else replaced."""
    out = dict(lower)
    for key, value in upper.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def _same_vae(a: str | Path, b: str | Path) -> bool:
    vae_a, vae_b = find_weight(a, AUTOENCODER_FILE), find_weight(b, AUTOENCODER_FILE)
    return vae_a is not None and vae_b is not None and file_fingerprint(vae_a) == file_fingerprint(vae_b)


def without_splits(autoencoder: torch.nn.Module) -> torch.nn.Module:
    """Turn off MAISI's split convolutions (a memory trick for whole-body inference that changes no
    weights): on training patches they cut tensors smaller than their own padding and fail."""
    for sub in autoencoder.modules():
        if hasattr(sub, "num_splits"):
            sub.num_splits = 1
    return autoencoder


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The network inside DistributedDataParallel / AveragedModel wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


# ---------------------------------------------------------------------------------------------------
# Latents


def file_fingerprint(path: Path) -> str:
    """The first 12 hex digits of a file's SHA-256: what names a latent cache after the VAE file that
    encoded it, and tells two model folders' VAEs apart."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


LATENT_KINDS = ("sample", "mean", "refined")


@torch.no_grad()
def encode_case(
    autoencoder: torch.nn.Module,
    case: Case,
    seed: int,
    device: torch.device,
    kind: str = "sample",
    refinement: dict | None = None,
) -> torch.Tensor:
    """A case's latent: one posterior sample z = μ + σ·ε (ε from (seed, case name), so every run
    encodes alike), the posterior mean μ, or μ refined near the case's lesions (`refinement`: the
    keyword arguments of latent_refinement.refine_lesion_latents)."""
    image = case.image[None].to(device)
    z_mu, z_sigma = autoencoder.encode(image)
    if kind == "mean":
        return z_mu.float().cpu()[0]
    if kind == "refined":
        from ..latent_refinement import refine_lesion_latents

        labels = case.labels[0].numpy()
        return refine_lesion_latents(autoencoder, image, labels, z_mu.float(), **(refinement or {})).cpu()[0]
    eps = torch.randn(z_mu.shape, generator=generator(seed, name_key(case.name), 0x1A7E), dtype=torch.float32)
    return (z_mu.float().cpu() + z_sigma.float().cpu() * eps)[0]


def cached_latents(config: dict, ctx, cases: list[Case], autoencoder: torch.nn.Module) -> list[torch.Tensor]:
    """Latents of all cases, encoded once by the main process into `<output_dir>/latents/<vae hash>/`.

    Like the official `diff_model_create_training_data`, a latent is stored and reused every epoch;
    the folder is keyed by the VAE file so a retrained VAE re-encodes. `latents: "sample"` stores one
    posterior sample (the official recipe); `"mean"` stores μ. With a posterior whose σ is comparable
    to the spread of μ, a sample is mostly white noise the diffusion model cannot predict from
    anything, least of all from the mask; μ is all signal, and it is what the decoder is trained to
    decode best (every training sample lies around it). `"refined"` stores μ with the latent near
    each lesion optimised against the image (`latent_refinement` settings; minutes per case on a
    CPU, so the folder, keyed by those settings too, is filled case by case and a stopped run
    resumes where it stopped).
    """
    kind = config.get("latents", "sample")
    if kind not in LATENT_KINDS:
        raise OptionError(f"latents is {kind!r}", f"use one of {', '.join(LATENT_KINDS)}")
    vae_path = require_weight(config, AUTOENCODER_FILE, "latent", "vae")
    refinement = _refinement_settings(config) if kind == "refined" else None
    suffix = {"sample": "", "mean": "-mean"}.get(kind)
    if refinement is not None:
        settings = json.dumps(refinement, sort_keys=True).encode()
        suffix = "-refined-" + hashlib.sha256(settings).hexdigest()[:8]
    folder = Path(config["output_dir"]) / "latents" / (file_fingerprint(vae_path) + suffix)
    if ctx.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        autoencoder.to(ctx.device)
        for case in cases:
            path = folder / f"{case.name}.pt"
            if not path.exists():
                from ..volumes import atomic_path

                latent = encode_case(autoencoder, case, int(config["seed"]), ctx.device, kind, refinement)
                with atomic_path(path) as tmp:
                    torch.save(latent, tmp)
        autoencoder.cpu()
    ctx.barrier()
    return [torch.load(folder / f"{case.name}.pt", map_location="cpu", weights_only=True) for case in cases]


def _refinement_settings(config: dict) -> dict:
    settings = dict(config.get("latent_refinement") or {})
    checks = {
        "iterations": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "lr": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
        "lesion_weight": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1,
        "bone_weight": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1,
        "latent_margin": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "bf16": lambda v: isinstance(v, bool),
    }
    for key, value in settings.items():
        if key not in checks or not checks[key](value):
            raise OptionError(
                f"latent_refinement.{key} is {value!r}",
                "iterations an integer >= 1, lr > 0, lesion_weight and bone_weight >= 1, latent_margin an integer >= 0, bf16 true/false",
            )
    return settings


def first_batch_scale_factor(latents: list[torch.Tensor], batch: list[int]) -> float:
    """`scale_factor = 1 / std` of the first global batch's latents, as the official UNet training."""
    stacked = torch.stack([latents[i] for i in batch]).float()
    return float(1.0 / stacked.std())


# ---------------------------------------------------------------------------------------------------
# One flow-matching batch


@dataclass
class FlowBatch:
    latents: torch.Tensor  # (B, C, x, y, z), scaled
    noise: torch.Tensor
    timesteps: torch.Tensor  # (B,)
    noisy: torch.Tensor
    spacing: torch.Tensor  # (B, 3), mm × 100
    modality: torch.Tensor | None  # (B,) long
    cases: list[int]


def flow_batch(
    scheduler,
    latents: list[torch.Tensor],
    cases: list[Case],
    local: list[tuple[int, int]],
    global_batch: int,
    step: int,
    seed: int,
    scale_factor: float,
    modality: int | None,
    device: torch.device,
    timestep_floor: float = 0.0,
) -> FlowBatch:
    """This process's slice of step `step`: noise per (seed, step, position), timesteps drawn for the
    whole global batch with `RFlowScheduler.sample_timesteps` and sliced, so any process count sees
    the same samples. `timestep_floor` > 0 maps them linearly onto [floor · T, T]: a fine-tune of the
    noisy half alone, where a sample's intensities are decided (the same draws, only moved)."""
    indices = [i for _, i in local]
    x0 = torch.stack([latents[i] for i in indices]).float() * scale_factor
    noise = torch.stack([torch.randn(x0.shape[1:], generator=generator(seed, step, pos, 0x401)) for pos, _ in local])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(seed, step, 0x715))
        every = scheduler.sample_timesteps(torch.empty((global_batch, 1, *x0.shape[2:])))
    if timestep_floor > 0:
        total = float(scheduler.num_train_timesteps)
        every = timestep_floor * total + (1.0 - timestep_floor) * every
    timesteps = every[[pos for pos, _ in local]]
    noisy = scheduler.add_noise(original_samples=x0, noise=noise, timesteps=timesteps)
    spacing = torch.tensor([list(cases[i].spacing) for i in indices], dtype=torch.float32) * 1e2
    labels = torch.full((len(indices),), int(modality), dtype=torch.long) if modality is not None else None
    to = lambda t: t.to(device) if t is not None else None  # noqa: E731
    return FlowBatch(to(x0), to(noise), to(timesteps), to(noisy), to(spacing), to(labels), indices)


def modality_of(network: dict, cfg: dict) -> int | None:
    """The modality class label when the UNet takes one (num_class_embeds set), else None."""
    _, unet = network_kwargs(network, "diffusion_unet_def")
    return int(cfg["modality"]) if unet.get("num_class_embeds") else None
