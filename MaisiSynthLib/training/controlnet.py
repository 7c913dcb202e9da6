"""ControlNet training with the region-specific contrastive loss (MAISI-v2).

The ControlNet starts from the diffusion UNet's matching weights (the official `copy_model_state`
step) or from a base ControlNet when fine-tuning; the UNet is frozen. Each step predicts the velocity
for the mask c and, with the contrastive loss on, for the perturbed mask c' (tumors → host organs) on
the same noisy latents. Both go through one forward of a doubled batch: DistributedDataParallel
synchronises gradients of one forward per step, and one batch is also faster than two.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import OptionError
from ..losses import BACKGROUND_TERMS, PERTURBATIONS, flow_loss, perturb_mask, region_contrastive_loss, roi_masks
from ..masks import binary_code
from ..models import (
    CONTROLNET_FILE,
    _state_dict,
    build_network,
    build_scheduler,
    load_checkpoint,
    load_weights,
    save_controlnet,
    size_multiple_of,
)
from .common import (
    cached_latents,
    complete_model_folder,
    find_weight,
    flow_batch,
    load_autoencoder,
    load_unet,
    modality_of,
    unwrap,
)
from .config import network_config
from .data import BucketSampler, load_cases
from .trainer import Stage


class _ControlledVelocity(torch.nn.Module):
    """ControlNet residuals into the frozen UNet → velocity. Only the ControlNet is a submodule, so
    DistributedDataParallel, the optimiser and the trainer state see only its parameters."""

    def __init__(self, controlnet: torch.nn.Module, unet: torch.nn.Module) -> None:
        super().__init__()
        self.controlnet = controlnet
        self._unet = [unet]  # hidden from parameters() and state_dict()

    def forward(self, x, timesteps, control, spacing, class_labels=None):
        down, mid = self.controlnet(x=x, timesteps=timesteps, controlnet_cond=control, class_labels=class_labels)
        return self._unet[0](
            x=x,
            timesteps=timesteps,
            spacing_tensor=spacing,
            class_labels=class_labels,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        )


class ControlNetStage(Stage):
    name = "controlnet"

    def prepare(self) -> None:
        cfg = self.cfg
        if cfg["background_term"] not in BACKGROUND_TERMS:
            raise OptionError(
                f"controlnet.background_term is '{cfg['background_term']}'", f"use one of {BACKGROUND_TERMS}"
            )
        if cfg["perturbation"] not in PERTURBATIONS:
            raise OptionError(f"controlnet.perturbation is '{cfg['perturbation']}'", f"use one of {PERTURBATIONS}")
        self.network = network_config(self.config)
        self.seed = int(self.config["seed"])
        self.cases = load_cases(self.config["cases"], size_multiple_of(self.network))
        autoencoder = load_autoencoder(self.config, self.network, self.name)
        self.latents = cached_latents(self.config, self.ctx, self.cases, autoencoder)
        del autoencoder
        self.global_batch = int(cfg["batch_size"]) * self.ctx.world_size
        self.sampler = BucketSampler([c.shape for c in self.cases], self.global_batch, self.seed)
        self.scheduler = build_scheduler(self.network)
        self.modality = modality_of(self.network, cfg)
        unet, self.scale_factor = load_unet(self.config, self.network, self.name)
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        controlnet = build_network(self.network, "controlnet_def", "cpu")
        base = find_weight(self.config["base_model_dir"], CONTROLNET_FILE)
        if base is not None:  # fine-tune an existing ControlNet
            checkpoint = load_checkpoint(base)
            load_weights(controlnet, _state_dict(checkpoint, "controlnet_state_dict", base), base, "ControlNet")
        else:
            from monai.networks.utils import copy_model_state

            logging.getLogger("monai.networks.utils").setLevel(logging.WARNING)
            copy_model_state(controlnet, unet.state_dict(), inplace=True)
        self.module = _ControlledVelocity(controlnet, self.unet)
        self._perturbed: dict[int, torch.Tensor] = {}
        if self.ctx.is_main:
            complete_model_folder(self.config, self.network)

    def trainable(self) -> torch.nn.Module:
        return self.module

    def perturbed(self, index: int) -> torch.Tensor:
        if index not in self._perturbed:
            self._perturbed[index] = perturb_mask(self.cases[index].labels[None], self.cfg["perturbation"])[0]
        return self._perturbed[index]

    def loss(self, model: torch.nn.Module, step: int):
        cfg = self.cfg
        local = self.sampler.local(step, self.ctx.rank, int(cfg["batch_size"]))
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
        )
        labels = torch.stack([self.cases[i].labels for i in b.cases]).to(self.device)
        latent_size = tuple(b.latents.shape[2:])
        weights = None
        if float(cfg["tumor_weight"]) != 1.0:
            tumor = torch.isin(labels, torch.tensor(cfg["tumor_labels"], device=self.device)).float()
            weights = 1.0 + (float(cfg["tumor_weight"]) - 1.0) * F.adaptive_max_pool3d(tumor, latent_size)
        metrics: dict[str, float] = {}
        if not cfg["contrastive"]:
            v = model(b.noisy, b.timesteps, binary_code(labels), b.spacing, b.modality)
            loss = flow_loss(v, b.latents, b.noise, cfg["loss"], weights)
            metrics["flow"] = float(loss.detach())
            return loss, metrics
        perturbed = torch.stack([self.perturbed(i) for i in b.cases]).to(self.device)
        roi, background = roi_masks(labels, perturbed, latent_size)
        doubled = lambda t: torch.cat([t, t]) if t is not None else None  # noqa: E731
        v_both = model(
            doubled(b.noisy),
            doubled(b.timesteps),
            torch.cat([binary_code(labels), binary_code(perturbed)]),
            doubled(b.spacing),
            doubled(b.modality),
        )
        v, v_perturbed = v_both.chunk(2)
        flow = flow_loss(v, b.latents, b.noise, cfg["loss"], weights)
        l_roi, l_bg = region_contrastive_loss(
            v,
            v_perturbed,
            b.latents - b.noise,
            roi,
            background,
            float(cfg["contrastive_delta"]),
            cfg["background_term"],
        )
        loss = flow + float(cfg["contrastive_weight"]) * (l_roi + l_bg)
        metrics.update({"flow": float(flow.detach()), "roi": float(l_roi.detach()), "background": float(l_bg.detach())})
        return loss, metrics

    def save(self, module: torch.nn.Module, step: int, loss: float) -> None:
        path = Path(self.config["model_dir"]) / CONTROLNET_FILE
        save_controlnet(path, unwrap(module).controlnet, epoch=step, loss=loss)
