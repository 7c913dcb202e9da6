"""ControlNet training with the region-specific contrastive loss (MAISI-v2).

The ControlNet starts from the diffusion UNet's matching weights (the official `copy_model_state`
step) or from a base ControlNet when fine-tuning; the UNet is frozen. Each step predicts the velocity
for the mask c and, with the contrastive loss on, for the perturbed mask c' (tumors → host organs) on
the same noisy latents. Both go through one forward of a doubled batch: DistributedDataParallel
synchronises gradients of one forward per step, and one batch is also faster than two.

Coarse masks (`coarse_probability` > 0): users bring masks from other tools, often with a few
structures only (body, lobes, bones, a lesion). With that probability a training sample's mask is
coarsened as such a segmentation would be (vessels merged into their organ) and each structure
outside `masks.COARSE_KEEP` is folded into the body with a probability drawn per sample, so the
ControlNet learns to draw plausible anatomy where the mask says only "body", and to draw what the
mask does say wherever it says it. The image is untouched.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import labels as L
from ..errors import OptionError
from ..losses import (
    BACKGROUND_TERMS,
    MARGINS,
    PERTURBATIONS,
    PUSHES,
    flow_loss,
    lesion_contrast,
    lesion_margin,
    perturb_mask,
    region_contrastive_loss,
    roi_masks,
)
from ..masks import COARSE_KEEP, binary_code, merge_vessels
from ..models import (
    CONTROLNET_FILE,
    UNET_FILE,
    build_network,
    build_scheduler,
    checkpoint_state_dict,
    load_checkpoint,
    load_weights,
    network_kwargs,
    save_controlnet,
    save_unet,
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
from .data import BucketSampler, generator, load_cases
from .trainer import Stage
from .validation import check_validation, validate_checkpoint


class _ControlledVelocity(torch.nn.Module):
    """ControlNet residuals into the UNet → velocity. A frozen UNet is not a submodule, so
    DistributedDataParallel, the optimiser and the trainer state see only the ControlNet; a UNet
    trained jointly (`unet_lr` > 0) is one."""

    def __init__(self, controlnet: torch.nn.Module, unet: torch.nn.Module, joint: bool = False) -> None:
        super().__init__()
        self.controlnet = controlnet
        if joint:
            self.unet = unet
        self._unet = [unet]  # the frozen UNet stays out of parameters() and state_dict()

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

    def prepare(self, write_model_folder: bool = True) -> None:
        """Cases, latents, networks. `write_model_folder=False` leaves `model_dir` as it is: a benchmark
        that reads a shipped model through this stage must not rewrite its config or settings."""
        cfg = self.cfg
        if cfg["background_term"] not in BACKGROUND_TERMS:
            raise OptionError(
                f"controlnet.background_term is '{cfg['background_term']}'", f"use one of {BACKGROUND_TERMS}"
            )
        if cfg["perturbation"] not in PERTURBATIONS:
            raise OptionError(f"controlnet.perturbation is '{cfg['perturbation']}'", f"use one of {PERTURBATIONS}")
        if cfg["contrastive_push"] not in PUSHES:
            raise OptionError(f"controlnet.contrastive_push is '{cfg['contrastive_push']}'", f"use one of {PUSHES}")
        if cfg["contrastive_margin"] not in MARGINS:
            raise OptionError(
                f"controlnet.contrastive_margin is '{cfg['contrastive_margin']}'", f"use one of {MARGINS}"
            )
        self.network = network_config(self.config)
        self.seed = int(self.config["seed"])
        # checked on every process, so a bad folder stops all of them, not the main one alone
        validation = check_validation(self.config, cfg["validate_steps"])
        self.validation = validation if self.ctx.is_main else None
        self.cases = load_cases(self.config["cases"], size_multiple_of(self.network))
        autoencoder = load_autoencoder(self.config, self.network, self.name)
        self.latents = cached_latents(self.config, self.ctx, self.cases, autoencoder)
        del autoencoder
        self.global_batch = int(cfg["batch_size"]) * self.ctx.world_size
        self.sampler = BucketSampler([c.shape for c in self.cases], self.global_batch, self.seed)
        self.scheduler = build_scheduler(self.network)
        self.modality = modality_of(self.network, cfg)
        unet, self.scale_factor = load_unet(self.config, self.network, self.name)
        self.joint = float(cfg["unet_lr"]) > 0
        self.unet = unet.to(self.device)
        if not self.joint:
            self.unet.eval().requires_grad_(False)
        controlnet = build_network(self.network, "controlnet_def", "cpu")
        base = find_weight(self.config["base_model_dir"], CONTROLNET_FILE)
        if base is not None:  # fine-tune an existing ControlNet
            checkpoint = load_checkpoint(base)
            load_weights(
                controlnet, checkpoint_state_dict(checkpoint, "controlnet_state_dict", base), base, "ControlNet"
            )
        else:
            from monai.networks.utils import copy_model_state

            logging.getLogger("monai.networks.utils").setLevel(logging.WARNING)
            copy_model_state(controlnet, unet.state_dict(), inplace=True)
        if float(cfg["zero_init_scale"]) > 0 and base is None:
            _break_zero_init(controlnet, float(cfg["zero_init_scale"]), self.seed)
        self.module = _ControlledVelocity(controlnet, self.unet, self.joint)
        self._perturbed: dict[int, torch.Tensor] = {}
        self._merged: dict[int, tuple[torch.Tensor, torch.Tensor | None, list[int]]] = {}
        if self.ctx.is_main and write_model_folder:
            complete_model_folder(self.config, self.network)

    def trainable(self) -> torch.nn.Module:
        return self.module

    def perturbed(self, index: int) -> torch.Tensor:
        if index not in self._perturbed:
            self._perturbed[index] = perturb_mask(self.cases[index].labels[None], self.cfg["perturbation"])[0]
        return self._perturbed[index]

    def merged(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
        """(labels with vessels merged, its perturbed mask, ids a coarse mask may fold into the body)."""
        if index not in self._merged:
            merged = merge_vessels(self.cases[index].labels[0].numpy().astype("int16"))
            labels = torch.from_numpy(merged.astype("int64"))[None]
            perturbed = perturb_mask(labels[None], self.cfg["perturbation"])[0] if self.cfg["contrastive"] else None
            foldable = [int(i) for i in labels.unique().tolist() if i not in COARSE_KEEP and i not in (0, L.BODY)]
            self._merged[index] = (labels, perturbed, foldable)
        return self._merged[index]

    def condition(self, index: int, step: int, position: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mask, perturbed mask or None) a sample trains on: the case's own, or a coarse version."""
        probability = float(self.cfg["coarse_probability"])
        if probability > 0:
            g = generator(self.seed, step, position, 0xC0A5)
            draws = torch.rand(2, generator=g, dtype=torch.float64)
            if draws[0] < probability:
                labels, perturbed, foldable = self.merged(index)
                fold_share = 0.5 + 0.5 * float(draws[1])  # from half of the structures to all of them
                folded = torch.rand(len(foldable), generator=g, dtype=torch.float64) < fold_share
                lut = torch.arange(256)
                lut[[i for i, f in zip(foldable, folded) if f]] = L.BODY
                return lut[labels], (lut[perturbed] if perturbed is not None else None)
        return self.cases[index].labels, (self.perturbed(index) if self.cfg["contrastive"] else None)

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
            float(self.cfg["timestep_floor"]),
        )
        conditions = [self.condition(i, step, pos) for (pos, _), i in zip(local, b.cases)]
        labels = torch.stack([c[0] for c in conditions]).to(self.device)
        latent_size = tuple(b.latents.shape[2:])
        weights = self.region_weights(labels, latent_size)
        metrics: dict[str, float] = {}
        if not cfg["contrastive"]:
            v = model(b.noisy, b.timesteps, binary_code(labels), b.spacing, b.modality)
            loss = flow_loss(v, b.latents, b.noise, cfg["loss"], weights)
            metrics["flow"] = float(loss.detach())
            return loss, metrics
        perturbed = torch.stack([c[1] for c in conditions]).to(self.device)
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
        delta, direction = float(cfg["contrastive_delta"]), None
        if cfg["contrastive_margin"] != "constant":
            contrast = lesion_contrast(b.latents, roi)
            delta = lesion_margin(contrast, roi, delta)
            metrics["margin"] = float(delta.mean())
            if cfg["contrastive_margin"] == "signed":
                direction = torch.sign(contrast)
        l_roi, l_bg = region_contrastive_loss(
            v,
            v_perturbed,
            b.latents - b.noise,
            roi,
            background,
            delta,
            cfg["background_term"],
            direction,
            cfg["contrastive_push"],
        )
        loss = flow + float(cfg["contrastive_weight"]) * (l_roi + l_bg)
        metrics.update({"flow": float(flow.detach()), "roi": float(l_roi.detach()), "background": float(l_bg.detach())})
        return loss, metrics

    def region_weights(self, labels: torch.Tensor, latent_size: tuple[int, ...]) -> torch.Tensor | None:
        """Flow-loss weights at latent resolution: `tumor_weight` / `bone_weight` / `organ_weight` on
        every latent voxel that a lesion / bone / listed organ voxel falls in (the largest where several
        do), 1 elsewhere; None if all 1."""
        weights = None
        regions = (
            (self.cfg["tumor_labels"], "tumor_weight"),
            (L.BONE_REGION, "bone_weight"),
            (self.cfg["organ_labels"], "organ_weight"),
        )
        for ids, key in regions:
            w = float(self.cfg[key])
            if w == 1.0:
                continue
            inside = torch.isin(labels, torch.tensor(list(ids), device=labels.device)).float()
            region = 1.0 + (w - 1.0) * F.adaptive_max_pool3d(inside, latent_size)
            weights = region if weights is None else torch.maximum(weights, region)
        return weights

    def param_groups(self, module: torch.nn.Module) -> list[dict]:
        """The ControlNet at `lr`; a jointly trained UNet at its own (usually smaller) `unet_lr`."""
        groups = [{"params": [p for p in module.controlnet.parameters() if p.requires_grad]}]
        if self.joint:
            groups.append({"params": list(module.unet.parameters()), "lr": float(self.cfg["unet_lr"])})
        return groups

    def save(self, module: torch.nn.Module, step: int, loss: float) -> None:
        path = Path(self.config["model_dir"]) / CONTROLNET_FILE
        save_controlnet(path, unwrap(module).controlnet, epoch=step, loss=loss)
        if self.joint:
            timesteps = int(network_kwargs(self.network, "noise_scheduler")[1].get("num_train_timesteps", 1000))
            save_unet(
                Path(self.config["model_dir"]) / UNET_FILE,
                unwrap(module).unet,
                self.scale_factor,
                timesteps,
                epoch=step,
                loss=loss,
            )
        if self.validation is not None:  # save() runs on the main process only
            validate_checkpoint(self.config, int(self.cfg["validate_steps"]), str(self.device), step)


def _break_zero_init(controlnet: torch.nn.Module, scale: float, seed: int) -> None:
    """Small random weights in the ControlNet's zero-initialised output convolutions and mask-embedding
    output. With all of them at zero, the mask embedding gets no gradient until the output layers
    have moved (a slow start); small weights keep the starting residuals near zero but let every
    layer learn from the first step."""
    g = generator(seed, 0x2E60)
    layers = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    layers.append(controlnet.controlnet_cond_embedding.conv_out)
    with torch.no_grad():
        for layer in layers:
            for name, param in layer.named_parameters():
                if name.endswith("weight"):
                    param.copy_(torch.randn(param.shape, generator=g) * scale)
