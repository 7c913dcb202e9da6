"""Parity with the official stepping: `generate` against a straight loop over MONAI's RFlowScheduler.

The reference loop below is written from MONAI's public API and the official inference's conventions
(noise → set_timesteps with the latent size as a tensor → per timestep: ControlNet on the 8-bit mask
code, UNet with spacing ×100 and modality 1, CFG batch of (mask, tumor-free mask with class 0) →
`scheduler.step(v, t, x, t_next)`). It shares nothing with MaisiSynthLib's sampler but the networks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import save_nifti, torso_labels
from monai.networks.schedulers import RFlowScheduler

from MaisiSynthLib.models import load_models
from MaisiSynthLib.pipeline import GenerateRequest, generate


def mask_code(labels: np.ndarray) -> torch.Tensor:
    bits = np.stack([(labels >> k) & 1 for k in range(8)])  # official binarize_labels: bit k → channel k
    return torch.from_numpy(bits.astype(np.float32))[None]


def tumor_free(labels: np.ndarray) -> np.ndarray:
    out = labels.copy()
    out[out == 26] = 1  # the only tumor of this mask: hepatic tumor → liver
    return out


def reference_latent(models, labels, spacing, seed, steps, cfg, use_controlnet):
    cfg_def = dict(models.config["noise_scheduler"])
    cfg_def.pop("_target_")
    scheduler = RFlowScheduler(**cfg_def)
    latent_shape = (1, 4) + tuple(n // 4 for n in labels.shape)
    x = torch.randn(latent_shape, generator=torch.Generator("cpu").manual_seed(seed))
    scheduler.set_timesteps(num_inference_steps=steps, input_img_size_numel=torch.prod(torch.tensor(latent_shape[2:])))
    timesteps = scheduler.timesteps
    next_timesteps = torch.cat((timesteps[1:], torch.tensor([0], dtype=timesteps.dtype)))
    spacing_t = (torch.FloatTensor(list(spacing)).unsqueeze(0).half() * 1e2).float()
    modality = torch.ones((1,), dtype=torch.long)
    cond = mask_code(labels)
    uncond = mask_code(tumor_free(labels))
    with torch.no_grad():
        for t, t_next in zip(timesteps, next_timesteps):
            ts = torch.Tensor((t,))
            xs, tss, sp, cls, control = x, ts, spacing_t, modality, cond
            if cfg > 0:
                xs, tss, sp = torch.cat([x, x]), torch.cat([ts, ts]), torch.cat([spacing_t, spacing_t])
                cls = torch.cat([modality, torch.zeros_like(modality)])
                control = torch.cat([cond, uncond])
            extra = {}
            if use_controlnet:
                down, mid = models.controlnet(x=xs, timesteps=tss, controlnet_cond=control, class_labels=cls)
                extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            v = models.unet(x=xs, timesteps=tss, spacing_tensor=sp, class_labels=cls, **extra)
            if cfg > 0:
                v_c, v_u = v.chunk(2)
                v = v_u + cfg * (v_c - v_u)
            x, _ = scheduler.step(v, t, x, t_next)
    return x


@pytest.fixture(scope="module")
def models(tiny_model):
    return load_models(tiny_model, "cpu")


@pytest.mark.parametrize("use_controlnet", [True, False], ids=["controlnet", "unet-only"])
@pytest.mark.parametrize("cfg", [0.0, 2.5], ids=["no-cfg", "cfg"])
def test_generate_matches_reference_loop(tmp_path, models, use_controlnet, cfg):
    labels = torso_labels(64, tumor=26)
    spacing = (3.0, 3.0, 3.0)
    mask = save_nifti(tmp_path / "mask.nii.gz", labels)
    request = GenerateRequest(
        mask=mask, output=tmp_path / "ct.nii.gz", seed=7, steps=30, cfg_scale=cfg, controlnet=use_controlnet
    )
    result = generate(request, models=models, keep_latent=True)
    expected = reference_latent(models, labels, spacing, seed=7, steps=30, cfg=cfg, use_controlnet=use_controlnet)
    assert result.latent.shape == expected.shape == (1, 4, 16, 16, 16)
    assert torch.max(torch.abs(result.latent - expected)).item() <= 1e-5
    # The comparison is not vacuous: the latent moved far from the noise, and conditioning mattered.
    noise = torch.randn(expected.shape, generator=torch.Generator("cpu").manual_seed(7))
    assert torch.mean(torch.abs(expected - noise)).item() > 0.1


def test_cfg_and_controlnet_change_the_result(tmp_path, models):
    """Guards the parity test above: each switch it covers must change the latent."""
    mask = save_nifti(tmp_path / "mask.nii.gz", torso_labels(64, tumor=26))
    latents = {}
    for name, cfg, cn in [("plain", 0.0, True), ("cfg", 2.5, True), ("unet", 0.0, False)]:
        request = GenerateRequest(
            mask=mask, output=tmp_path / f"{name}.nii.gz", seed=7, steps=5, cfg_scale=cfg, controlnet=cn
        )
        latents[name] = generate(request, models=models, keep_latent=True).latent
    assert torch.mean(torch.abs(latents["plain"] - latents["cfg"])).item() > 1e-3
    assert torch.mean(torch.abs(latents["plain"] - latents["unet"])).item() > 1e-3
