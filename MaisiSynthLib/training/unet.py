"""Rectified-flow diffusion UNet training on VAE latents, with spacing and modality conditioning.

As the official `diff_model_train`: latents are encoded once by the trained VAE and scaled by
`scale_factor = 1 / std` of the first batch (kept from the base UNet when fine-tuning), timesteps
come from `RFlowScheduler.sample_timesteps`, the target is the velocity x0 − noise, and the loss is L1.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..losses import flow_loss
from ..models import UNET_FILE, build_network, build_scheduler, network_kwargs, save_unet, size_multiple_of
from .common import (
    cached_latents,
    complete_model_folder,
    find_weight,
    first_batch_scale_factor,
    flow_batch,
    load_autoencoder,
    load_unet,
    modality_of,
    unwrap,
)
from .config import network_config
from .data import BucketSampler, load_cases
from .trainer import Stage


class UnetStage(Stage):
    name = "unet"

    def prepare(self) -> None:
        self.network = network_config(self.config)
        self.seed = int(self.config["seed"])
        self.cases = load_cases(self.config["cases"], size_multiple_of(self.network))
        autoencoder = load_autoencoder(self.config, self.network, self.name)
        self.latents = cached_latents(self.config, self.ctx, self.cases, autoencoder)
        del autoencoder
        self.global_batch = int(self.cfg["batch_size"]) * self.ctx.world_size
        self.sampler = BucketSampler([c.shape for c in self.cases], self.global_batch, self.seed)
        self.scheduler = build_scheduler(self.network)
        self.modality = modality_of(self.network, self.cfg)
        if find_weight(self.config["base_model_dir"], UNET_FILE) is not None:  # fine-tune
            self.unet, self.scale_factor = load_unet(self.config, self.network, self.name)
        else:
            self.unet = build_network(self.network, "diffusion_unet_def", "cpu")
            self.scale_factor = first_batch_scale_factor(self.latents, self.sampler.batch(0))
        if self.ctx.is_main:
            complete_model_folder(self.config, self.network)

    def trainable(self) -> torch.nn.Module:
        return self.unet

    def loss(self, model: torch.nn.Module, step: int):
        local = self.sampler.local(step, self.ctx.rank, int(self.cfg["batch_size"]))
        self.last_batch = [(pos, self.cases[i].name) for pos, i in local]
        b = flow_batch(
            self.scheduler,
            self.latents,
            self.cases,
            local,
            self.global_batch,
            step,
            self.seed,
            self.scale_factor,
            self.modality,
            self.device,
            float(self.cfg["timestep_floor"]),
        )
        v = model(x=b.noisy, timesteps=b.timesteps, spacing_tensor=b.spacing, class_labels=b.modality)
        loss = flow_loss(v, b.latents, b.noise, self.cfg["loss"])
        return loss, {"t_mean": float(b.timesteps.float().mean())}

    def save(self, module: torch.nn.Module, step: int, loss: float) -> None:
        timesteps = int(network_kwargs(self.network, "noise_scheduler")[1].get("num_train_timesteps", 1000))
        path = Path(self.config["model_dir"]) / UNET_FILE
        save_unet(path, unwrap(module), self.scale_factor, timesteps, epoch=step, loss=loss)

    def extra_state(self) -> dict:
        return {"scale_factor": self.scale_factor}

    def load_extra_state(self, state: dict) -> None:
        self.scale_factor = float(state.get("scale_factor", self.scale_factor))
