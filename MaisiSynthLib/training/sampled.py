"""Latents the full model samples from the training masks: what the decoder meets at inference.

A decoder trained on posterior latents of real images decodes those well. The latents the UNet and
ControlNet sample from a mask lie elsewhere: what the diffusion stages cannot predict well (thin
bone, small lesions) comes out weaker than in any encoded image, and the decoder renders that as
faint. Training the decoder on (latent sampled from a case's mask, that case's image) pairs as well
teaches it to draw from such latents what the mask's image has. Only the decoder learns, so the
latent space, the UNet and the ControlNet stay as they are (`vae.decoder_only`).

Each case's latent is sampled once by the main process with the model folder's own inference
settings (seed from the run seed and the case name) and cached in
`<output_dir>/sampled_latents/<model fingerprint>-s<seed>-n<steps>/`, so a resumed run reuses them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from ..errors import OptionError
from ..models import AUTOENCODER_FILE, CONTROLNET_FILE, SETTINGS_NAME, UNET_FILE
from .common import file_fingerprint, find_weight
from .data import Case, mix_seed, name_key


def _model_fingerprint(model_dir: Path) -> str:
    parts = []
    for name in (AUTOENCODER_FILE, UNET_FILE, CONTROLNET_FILE, SETTINGS_NAME):
        path = find_weight(model_dir, name)
        if path is None and name != SETTINGS_NAME:
            raise OptionError(
                f"vae.sampled_latents_from: {model_dir} has no {name}",
                "point it at a complete model folder (VAE, UNet and ControlNet)",
            )
        parts.append(file_fingerprint(path) if path is not None else "-")
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:12]


def case_seed(seed: int, name: str) -> int:
    """The sampling seed of a case: from the run seed and the case name (not its position)."""
    return mix_seed(seed, name_key(name), 0x5A4D) % (2**31)


def _sample(models, case: Case, seed: int, steps: int | None) -> torch.Tensor:
    from ..masks import Mask, validate_labels
    from ..pipeline import generate_volume

    labels = validate_labels(case.labels[0].numpy().astype(np.int16), case.name)
    # The case arrays are RAS-ordered already: a diagonal affine keeps the latent on their grid.
    mask = Mask(labels=labels, affine=np.diag([*case.spacing, 1.0]), source=case.name)
    options = {"seed": case_seed(seed, case.name)}
    if steps is not None:
        options["steps"] = int(steps)
    return generate_volume(mask, options, models=models, keep_latent=True).latent[0].float()


def _check(latent: torch.Tensor, case: Case, channels: int, compression: int) -> torch.Tensor:
    expected = (channels, *(n // compression for n in case.shape))
    if tuple(latent.shape) != expected or not torch.isfinite(latent).all():
        raise OptionError(
            f"the latent sampled for case {case.name} has shape {list(latent.shape)}, not {list(expected)}: "
            "the model did not sample it on the case's own grid",
            "use cases on a grid the model samples directly (its maisi_synth.json grid rules), "
            "or delete <output_dir>/sampled_latents if it was written by another version",
        )
    return latent


def sampled_latents(config: dict, ctx, cases: list[Case], channels: int, compression: int) -> list[torch.Tensor]:
    """The sampled latent of every case, in the order of `cases` (float32, CPU)."""
    from ..models import load_models

    cfg = config["vae"]
    source = cfg["sampled_latents_from"]
    steps = cfg["sampled_steps"]
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise OptionError(f"vae.sampled_steps is {steps!r}", "give a whole number of steps ≥ 1, or null (the model's)")
    model_dir = Path(source)
    seed = int(config["seed"])
    tag = f"{_model_fingerprint(model_dir)}-s{seed}-n{steps or 'model'}"
    folder = Path(config["output_dir"]) / "sampled_latents" / tag
    if ctx.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        missing = [case for case in cases if not (folder / f"{case.name}.pt").exists()]
        if missing:
            from ..volumes import atomic_path

            models = load_models(model_dir, ctx.device)
            for case in missing:
                latent = _check(_sample(models, case, seed, steps).cpu(), case, channels, compression)
                with atomic_path(folder / f"{case.name}.pt") as tmp:
                    torch.save(latent, tmp)
            del models
    ctx.barrier()
    return [
        _check(
            torch.load(folder / f"{case.name}.pt", map_location="cpu", weights_only=True), case, channels, compression
        )
        for case in cases
    ]
