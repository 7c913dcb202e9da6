"""The sampler: official schedule, Euler vs Heun accuracy, progress, cancellation, noise contract."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import save_nifti, torso_labels
from monai.networks.schedulers import RFlowScheduler

from MaisiSynthLib.errors import CancelledError
from MaisiSynthLib.models import load_models
from MaisiSynthLib.pipeline import GenerateRequest, generate
from MaisiSynthLib.sampling import initial_noise, sample_euler, sample_heun, schedule, spacing_condition


@pytest.fixture(scope="module")
def models(tiny_model):
    return load_models(tiny_model, "cpu")


def test_schedule_is_monais_with_the_latent_size_shift(models):
    _, timesteps, next_timesteps = schedule(models, 30, (1, 4, 64, 64, 64))
    assert timesteps.dtype == torch.float16 and len(timesteps) == 30
    assert next_timesteps[-1] == 0 and torch.equal(next_timesteps[:-1], timesteps[1:])
    # the shift by latent size (ratio = (64³ / 32³)^(1/3) = 2) moves early steps towards noise
    t = 1000 * (1 - 1 / 30)
    shifted = 2 * (t / 1000) / (1 + (2 - 1) * t / 1000) * 1000
    assert float(timesteps[1]) == pytest.approx(shifted, abs=0.5)
    reference = RFlowScheduler(1000, use_discrete_timesteps=False, use_timestep_transform=True)
    reference.set_timesteps(30, input_img_size_numel=torch.prod(torch.tensor([64, 64, 64])))
    assert torch.equal(timesteps, reference.timesteps)


def decay_error(solver, steps, rate=1.5):
    """Integrate dx/dτ = −rate·x on the sampler's own grid; return |x_end − exact|."""
    scheduler = RFlowScheduler(1000, use_discrete_timesteps=False, use_timestep_transform=True)
    scheduler.set_timesteps(steps, input_img_size_numel=torch.tensor(16**3))
    timesteps = scheduler.timesteps
    next_timesteps = torch.cat((timesteps[1:], torch.tensor([0], dtype=timesteps.dtype)))
    x0 = torch.ones(1, 1, 2, 2, 2, dtype=torch.float64)
    x = solver(lambda x, t: -rate * x, x0, scheduler, timesteps, next_timesteps)
    tau = sum(float(t - int(n)) / 1000 for t, n in zip(timesteps, next_timesteps))  # RFlowScheduler.step's dt
    return abs(float(x.flatten()[0]) - math.exp(-rate * tau))


def test_heun_is_second_order_and_euler_first_order():
    e10, e20 = decay_error(sample_euler, 10), decay_error(sample_euler, 20)
    h10, h20 = decay_error(sample_heun, 10), decay_error(sample_heun, 20)
    assert 1.6 < e10 / e20 < 2.6  # halving the step halves Euler's error
    assert 3.0 < h10 / h20 < 5.5  # and quarters Heun's
    assert h10 < e10 / 10


def test_callback_once_per_step_and_cancel_stops_within_one_step(tmp_path, models):
    mask = save_nifti(tmp_path / "mask.nii.gz", torso_labels(64))
    events = []
    generate(GenerateRequest(mask=mask, output=tmp_path / "a.nii.gz", steps=6), models=models, progress=events.append)
    steps = [e["i"] for e in events if e["stage"] == "sample"]
    assert steps == [0, 1, 2, 3, 4, 5, 6]
    stages = [e["stage"] for e in events]
    assert (
        stages.index("load")
        < stages.index("encode-mask")
        < stages.index("sample")
        < stages.index("decode")
        < stages.index("write")
    )

    done = []
    calls = {"n": 0}

    def cancel_after_two_steps():
        return len(done) >= 2

    def progress(event):
        if event["stage"] == "sample" and event["i"] > 0:
            done.append(event["i"])

    original = models.unet.forward

    def counting_forward(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    models.unet.forward = counting_forward
    try:
        with pytest.raises(CancelledError):
            generate(
                GenerateRequest(mask=mask, output=tmp_path / "b.nii.gz", steps=30),
                models=models,
                progress=progress,
                cancel=cancel_after_two_steps,
            )
    finally:
        models.unet.forward = original
    assert calls["n"] == 2  # stopped right after the step during which cancel was requested
    assert not (tmp_path / "b.nii.gz").exists()
    assert not list(tmp_path.glob(".b.nii.gz*"))


def test_noise_contract_and_determinism(tmp_path, models):
    expected = torch.randn((1, 4, 8, 8, 8), generator=torch.Generator("cpu").manual_seed(3))
    assert torch.equal(initial_noise((1, 4, 8, 8, 8), 3), expected)
    mask = save_nifti(tmp_path / "mask.nii.gz", torso_labels(64))
    run = lambda seed, name: generate(  # noqa: E731
        GenerateRequest(mask=mask, output=tmp_path / name, seed=seed, steps=4), models=models, keep_latent=True
    )
    a, b, c = run(5, "a.nii.gz"), run(5, "b.nii.gz"), run(6, "c.nii.gz")
    assert torch.equal(a.latent, b.latent)
    assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()
    assert not torch.equal(a.latent, c.latent)


def test_spacing_condition_is_mm_times_100_through_float16():
    cond = spacing_condition((1.5, 0.703125, 0.8))
    assert cond.shape == (1, 3) and cond.dtype == torch.float32
    assert cond[0, 0].item() == 150.0 and cond[0, 1].item() == 70.3125
    assert cond[0, 2].item() == float(torch.tensor(0.8).half() * 100)  # rounded as the official half maths


def test_heun_solver_runs_in_the_pipeline(tmp_path, models):
    mask = save_nifti(tmp_path / "mask.nii.gz", torso_labels(64))
    euler = generate(GenerateRequest(mask=mask, output=tmp_path / "e.nii.gz", steps=3), models=models, keep_latent=True)
    heun = generate(
        GenerateRequest(mask=mask, output=tmp_path / "h.nii.gz", steps=3, solver="heun"),
        models=models,
        keep_latent=True,
    )
    assert heun.solver == "heun" and not torch.allclose(euler.latent, heun.latent)


def test_the_mask_embedding_is_computed_once_and_changes_nothing(models):
    """The ControlNet with its mask embedding fixed gives the same residuals bit for bit, for any
    latent and timestep, and leaves the shared model untouched."""
    from MaisiSynthLib.sampling import with_fixed_mask

    control = (torch.rand((1, 8, 32, 32, 32), generator=torch.Generator().manual_seed(0)) > 0.5).float()
    embedding = models.controlnet.controlnet_cond_embedding
    calls = []
    hook = embedding.register_forward_hook(lambda *_: calls.append(1))
    fixed = with_fixed_mask(models.controlnet, control)
    assert len(calls) == 1
    assert models.controlnet.controlnet_cond_embedding is embedding  # the shared ControlNet is unchanged
    modality = torch.tensor([1]) if models.uses_modality else None
    with torch.no_grad():
        for seed, t in ((1, 999.0), (2, 500.0), (3, 3.0)):
            x = torch.randn((1, 4, 8, 8, 8), generator=torch.Generator().manual_seed(seed))
            ts = torch.tensor([t])
            down_a, mid_a = models.controlnet(x=x, timesteps=ts, controlnet_cond=control, class_labels=modality)
            down_b, mid_b = fixed(x=x, timesteps=ts, controlnet_cond=control, class_labels=modality)
            assert torch.equal(mid_a, mid_b) and all(torch.equal(a, b) for a, b in zip(down_a, down_b))
    assert len(calls) == 1 + 3  # only the reference calls ran the embedding again
    hook.remove()


def test_mask_guidance_amplifies_what_the_mask_adds_on_the_noisy_steps_only(models):
    """v = v_unet + s (v_controlnet − v_unet) for t ≥ mask_guidance_from · T, the plain ControlNet
    velocity below; with tumor CFG both branches are guided against the one UNet-alone pass."""
    from MaisiSynthLib.sampling import Conditioning, velocity_model

    gen = torch.Generator().manual_seed(0)
    control = (torch.rand((1, 8, 32, 32, 32), generator=gen) > 0.5).float()
    control_free = (torch.rand((1, 8, 32, 32, 32), generator=gen) > 0.5).float()
    spacing = spacing_condition((3.0, 3.0, 3.0))
    modality = torch.tensor([1]) if models.uses_modality else None
    x = torch.randn((1, 4, 8, 8, 8), generator=gen)

    def v(t, **kw):
        return velocity_model(models, Conditioning(control, spacing, modality, **kw))(x, torch.tensor(t))

    def v_unet(t):
        with torch.no_grad():
            ts = torch.tensor([float(t)])
            return models.unet(x=x, timesteps=ts, spacing_tensor=spacing, class_labels=modality).float()

    for t in (900.0, 600.0):
        plain, alone = v(t), v_unet(t)
        assert not torch.allclose(plain, alone)  # the tiny ControlNet adds something to amplify
        guided = v(t, mask_guidance=2.5, mask_guidance_from=0.5)
        assert torch.allclose(guided, alone + 2.5 * (plain - alone), atol=1e-5)
    # below the interval the guided model is the plain one, bit for bit
    assert torch.equal(v(300.0, mask_guidance=2.5, mask_guidance_from=0.5), v(300.0))
    assert torch.equal(v(900.0, mask_guidance=2.5, mask_guidance_from=0.95), v(900.0))

    both = dict(cfg_scale=3.0, control_uncond=control_free)
    c = velocity_model(models, Conditioning(control, spacing, modality))(x, torch.tensor(800.0))
    u = velocity_model(models, Conditioning(control_free, spacing, modality))(x, torch.tensor(800.0))
    if modality is not None:  # the CFG branch runs with class label 0, the UNet-alone pass with the CT's
        u = velocity_model(models, Conditioning(control_free, spacing, torch.zeros_like(modality)))(
            x, torch.tensor(800.0)
        )
    alone = v_unet(800.0)
    g_c, g_u = alone + 2.0 * (c - alone), alone + 2.0 * (u - alone)
    assert torch.allclose(v(800.0, mask_guidance=2.0, **both), g_u + 3.0 * (g_c - g_u), atol=1e-4)


def test_mask_guidance_comes_from_the_model_unless_the_request_sets_it(tmp_path, tiny_model):
    import json
    import shutil

    from MaisiSynthLib.errors import ModelError

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    settings_path = folder / "maisi_synth.json"
    settings = json.loads(settings_path.read_text()) if settings_path.exists() else {}
    settings.setdefault("inference", {})["mask_guidance_scale"] = 2.0
    settings_path.write_text(json.dumps(settings))
    mask = save_nifti(tmp_path / "mask.nii.gz", torso_labels(64))

    def run(name, **kw):
        return generate(
            GenerateRequest(mask=mask, output=tmp_path / name, model_dir=folder, steps=4, **kw), keep_latent=True
        )

    default, off, explicit = run("a.nii.gz"), run("b.nii.gz", mask_guidance=1.0), run("c.nii.gz", mask_guidance=2.0)
    assert default.mask_guidance == 2.0 and off.mask_guidance == 1.0
    assert torch.equal(default.latent, explicit.latent) and not torch.equal(default.latent, off.latent)
    # without the ControlNet there is nothing to guide
    assert run("d.nii.gz", controlnet=False).mask_guidance == 1.0

    settings["inference"]["mask_guidance_from"] = 1.5
    settings_path.write_text(json.dumps(settings))
    with pytest.raises(ModelError, match="mask_guidance_from"):
        run("e.nii.gz")
    assert not (tmp_path / "e.nii.gz").exists()
