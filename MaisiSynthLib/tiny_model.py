"""Tiny MAISI-architecture models with random weights, for tests and engine checks.

Same classes and config format as the official model, a few thousand times fewer parameters. The
weights are random everywhere, including the layers MONAI initialises to zero (the UNet's output
convolution, the ControlNet's zero convolutions), so that every path of the sampler changes the
result and a test comparing two implementations can see a difference.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from .models import build_network, save_model_folder

_MAISI = "monai.apps.generation.maisi.networks"

TINY_CONFIG: dict = {
    "spatial_dims": 3,
    "image_channels": 1,
    "latent_channels": 4,
    "include_body_region": False,
    "autoencoder_def": {
        "_target_": f"{_MAISI}.autoencoderkl_maisi.AutoencoderKlMaisi",
        "spatial_dims": "@spatial_dims",
        "in_channels": "@image_channels",
        "out_channels": "@image_channels",
        "latent_channels": "@latent_channels",
        "num_channels": [8, 8, 16],
        "num_res_blocks": [1, 1, 1],
        "norm_num_groups": 4,
        "norm_eps": 1e-06,
        "attention_levels": [False, False, False],
        "with_encoder_nonlocal_attn": False,
        "with_decoder_nonlocal_attn": False,
        "use_checkpointing": False,
        "use_convtranspose": False,
        "norm_float16": True,
        "num_splits": 2,
        "dim_split": 1,
    },
    "diffusion_unet_def": {
        "_target_": f"{_MAISI}.diffusion_model_unet_maisi.DiffusionModelUNetMaisi",
        "spatial_dims": "@spatial_dims",
        "in_channels": "@latent_channels",
        "out_channels": "@latent_channels",
        "num_channels": [8, 16, 16],
        "attention_levels": [False, False, True],
        "num_head_channels": [0, 0, 8],
        "num_res_blocks": 1,
        "norm_num_groups": 8,
        "use_flash_attention": False,
        "include_top_region_index_input": "@include_body_region",
        "include_bottom_region_index_input": "@include_body_region",
        "include_spacing_input": True,
        "num_class_embeds": 128,
        "resblock_updown": True,
        "include_fc": True,
    },
    "controlnet_def": {
        "_target_": f"{_MAISI}.controlnet_maisi.ControlNetMaisi",
        "spatial_dims": "@spatial_dims",
        "in_channels": "@latent_channels",
        "num_channels": [8, 16, 16],
        "attention_levels": [False, False, True],
        "num_head_channels": [0, 0, 8],
        "num_res_blocks": 1,
        "norm_num_groups": 8,
        "use_flash_attention": False,
        "conditioning_embedding_in_channels": 8,
        "conditioning_embedding_num_channels": [8, 8, 8],
        "num_class_embeds": 128,
        "resblock_updown": True,
        "include_fc": True,
    },
    "noise_scheduler": {
        "_target_": "monai.networks.schedulers.rectified_flow.RFlowScheduler",
        "num_train_timesteps": 1000,
        "use_discrete_timesteps": False,
        "use_timestep_transform": True,
        "sample_method": "uniform",
        "scale": 1.4,
    },
}

# Small volumes at coarse spacing: relax the official FOV/spacing floor so 64³ test masks are valid.
TINY_SETTINGS = {
    "name": "tiny-random",
    "description": "random weights, for tests only",
    "grid": {"spacing_xy_mm": [0.5, 8.0], "spacing_z_mm": [0.5, 8.0], "min_fov_xy_mm": 64},
}


def tiny_config() -> dict:
    return copy.deepcopy(TINY_CONFIG)


def randomize(module: torch.nn.Module, generator: torch.Generator, std: float = 0.2) -> torch.nn.Module:
    """Overwrite every parameter with random values (norm weights around 1, the rest around 0)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            param.copy_(1.0 + noise if "norm" in name and name.endswith("weight") else noise)
    return module


def make_tiny_model_folder(
    root: str | Path,
    seed: int = 0,
    layout: str = "flat",
    with_controlnet: bool = True,
    scale_factor: float = 0.9,
    config: dict | None = None,
) -> Path:
    """Write a tiny random model folder in the official format; returns its path."""
    config = config or tiny_config()
    generator = torch.Generator().manual_seed(seed)
    autoencoder = randomize(build_network(config, "autoencoder_def"), generator, std=0.1)
    unet = randomize(build_network(config, "diffusion_unet_def"), generator)
    controlnet = randomize(build_network(config, "controlnet_def"), generator) if with_controlnet else None
    return save_model_folder(
        root, config, autoencoder, unet, controlnet, scale_factor, layout=layout, settings=TINY_SETTINGS
    )


def torso_mask_labels(n: int = 64, tumor: int | None = 26, body: bool = True) -> np.ndarray:
    """A crude torso mask, (n, n, n) RAS-ordered: elliptic body, liver (patient right, high x), spleen,
    kidneys, two upper lung lobes and optionally a hepatic (26) or lung (23) tumor."""
    x, y, z = np.mgrid[:n, :n, :n].astype(np.float32) / n

    def ball(cx, cy, cz, rx, ry, rz):
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1

    lab = np.zeros((n, n, n), np.int16)
    if body:
        lab[((x - 0.5) / 0.45) ** 2 + ((y - 0.5) / 0.32) ** 2 <= 1] = 200
    lab[ball(0.68, 0.5, 0.45, 0.16, 0.14, 0.18)] = 1
    lab[ball(0.3, 0.45, 0.45, 0.07, 0.07, 0.1)] = 3
    lab[ball(0.62, 0.32, 0.35, 0.05, 0.05, 0.08)] = 5
    lab[ball(0.38, 0.32, 0.35, 0.05, 0.05, 0.08)] = 14
    lab[ball(0.68, 0.5, 0.82, 0.13, 0.14, 0.12)] = 30
    lab[ball(0.32, 0.5, 0.82, 0.13, 0.14, 0.12)] = 28
    if tumor == 26:
        lab[ball(0.7, 0.5, 0.45, 0.05, 0.05, 0.05)] = 26
    elif tumor == 23:
        lab[ball(0.68, 0.5, 0.82, 0.04, 0.04, 0.04)] = 23
    return lab


def torso_mask_affine(n: int = 64, spacing: float = 3.0) -> np.ndarray:
    """RAS affine of `torso_mask_labels`, centred on the origin."""
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (n - 1) / 2
    return affine
