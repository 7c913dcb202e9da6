"""The rectified-flow sampler: timestep schedule, ControlNet-conditioned velocity, Euler and Heun.

Layout after k-diffusion: the schedule is computed separately (MONAI's `RFlowScheduler`, so the
timestep shift by latent size and the float16 storage of timesteps are exactly the official ones);
the velocity model is a closure that hides the conditioning (ControlNet residuals from the mask code,
spacing, modality, tumor CFG); each solver is a small function driving that closure and calling
`callback` once per step, which is where progress is reported and cancellation happens.

Time runs from t = T (noise) to t = 0 (data); the network predicts the velocity v = x0 − noise, and a
step moves x by v · (t − t_next) / T, exactly as `RFlowScheduler.step` does.

Editing a reference CT (`editing.py`) samples with a `LatentHold`: after every solver step the latent
outside the edit is set to the reference's latent noised to the new timestep with the scheduler's own
`add_noise` and the run's initial noise, so that outside the edit the trajectory is the reference's at
every step and ends exactly on it (blended latent diffusion); inside, the model draws.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch

from .models import MaisiModels

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[dict], None]


def initial_noise(shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The noise contract: float32 CPU normal noise from `seed`, then moved, so a seed means the same
    latent on every device."""
    generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)


def spacing_condition(spacing: tuple[float, float, float]) -> torch.Tensor:
    """Spacing in mm × 100, shape (1, 3), rounded through float16 as the official pipeline computes it."""
    return (torch.tensor([list(spacing)], dtype=torch.float32).half() * 100).float()


def schedule(models: MaisiModels, num_steps: int, latent_shape: tuple[int, ...]):
    """A fresh scheduler with timesteps set for this latent size; returns (scheduler, t, t_next).

    The latent size goes in as a tensor, as in the official code: the shift is then computed in float32
    before rounding to float16, which decides a few timesteps by one float16 ulp.
    """
    scheduler = models.new_scheduler()
    scheduler.set_timesteps(
        num_inference_steps=int(num_steps), input_img_size_numel=torch.prod(torch.tensor(latent_shape[-3:]))
    )
    timesteps = scheduler.timesteps
    next_timesteps = torch.cat((timesteps[1:], torch.tensor([0], dtype=timesteps.dtype)))
    return scheduler, timesteps, next_timesteps


@dataclass
class Conditioning:
    """Everything the velocity model needs besides the latent and the timestep (all on the device)."""

    control: torch.Tensor | None  # (1, 8, X, Y, Z) mask code at image resolution
    spacing: torch.Tensor  # (1, 3) mm × 100
    modality: torch.Tensor | None  # (1,) class label, CT = 1
    cfg_scale: float = 0.0
    control_uncond: torch.Tensor | None = None  # the mask with tumors replaced by their hosts
    # v = v_unet + s · (v_controlnet − v_unet) on timesteps t ≥ mask_guidance_from · T; s = 1: off
    mask_guidance: float = 1.0
    mask_guidance_from: float = 0.5
    # latent_prior.level_shift once at the first timestep t ≤ prior_from · T; None: off
    level_prior: Callable[[torch.Tensor], torch.Tensor] | None = None
    prior_from: float = 1.0
    # the same shift on bone labels only, again at the first later timestep t ≤ bone_prior_from · T
    bone_prior: Callable[[torch.Tensor], torch.Tensor] | None = None
    bone_prior_from: float = 0.0


class _FixedEmbedding(torch.nn.Module):
    """Stands in for a ControlNet's mask embedding: returns the embedding computed once."""

    def __init__(self, embedding: torch.Tensor) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, _: torch.Tensor) -> torch.Tensor:
        return self.embedding


def with_fixed_mask(controlnet: torch.nn.Module, control: torch.Tensor) -> torch.nn.Module:
    """The ControlNet with its mask embedding computed once for the whole sampling run.

    The embedding depends only on the mask code, not on the latent or the timestep, yet runs at image
    resolution: it is about half of every ControlNet call on a CPU. The returned module shares every
    weight with `controlnet` and leaves it untouched (a worker may hold it for other requests); its
    outputs are bit for bit those of `controlnet` given `control`.
    """
    with torch.no_grad():
        embedding = controlnet.controlnet_cond_embedding(control)
    fixed = copy.copy(controlnet)
    fixed._modules = dict(controlnet._modules)
    fixed._modules["controlnet_cond_embedding"] = _FixedEmbedding(embedding)
    return fixed


def velocity_model(models: MaisiModels, cond: Conditioning) -> Velocity:
    """v(x, t): ControlNet residuals into the UNet; with CFG, one batch of (conditional, unconditional).

    The unconditional branch is the tumor-free mask with class label 0, as in the official inference.

    Mask guidance (MaisiSynth's, not in the official sampler): the UNet alone is a model of the same data
    without the mask, so v_unet + s · (v_controlnet − v_unet) with s > 1 amplifies what the mask adds,
    as classifier-free guidance does with a condition. A small ControlNet under-draws what departs from
    the UNet's average anatomy (organ HU, bone, lesions); amplifying it on the noisy half of the
    trajectory, where the image's intensities are decided, draws them closer to the mask's tissue
    (docs/results.md). It costs one more UNet pass on those steps. With CFG both branches are guided
    against the same UNet pass.
    """
    guided = cond.cfg_scale > 0
    mask_guided = cond.mask_guidance != 1.0 and cond.control is not None and models.controlnet is not None
    guide_from = cond.mask_guidance_from * float(models.new_scheduler().num_train_timesteps)
    if guided and cond.control is not None and cond.control_uncond is None:
        raise ValueError("CFG needs the unconditional (tumor-free) mask code")
    device = models.device
    spacing = cond.spacing.to(device)
    control = cond.control
    modality = cond.modality if models.uses_modality else None
    if guided:
        spacing = torch.cat([spacing, spacing])
        if control is not None:
            control = torch.cat([control, cond.control_uncond])
        if modality is not None:
            modality = torch.cat([modality, torch.zeros_like(modality)])
    controlnet = models.controlnet
    if controlnet is not None and control is not None:
        with models.autocast():
            controlnet = with_fixed_mask(controlnet, control)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # The networks see the float16 timestep value as a float32 tensor, as in the official loop.
        timesteps = torch.tensor([float(t)], dtype=torch.float32, device=device)
        if guided:
            x, timesteps = torch.cat([x, x]), torch.cat([timesteps, timesteps])
        with torch.no_grad(), models.autocast():
            residuals = {}
            if controlnet is not None and control is not None:
                down, mid = controlnet(x=x, timesteps=timesteps, controlnet_cond=control, class_labels=modality)
                residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            v = models.unet(x=x, timesteps=timesteps, spacing_tensor=spacing, class_labels=modality, **residuals)
            v_unet = None
            if mask_guided and float(t) >= guide_from:
                # the same input for both CFG branches: one pass of the first half of the batch
                half = slice(0, 1) if guided else slice(None)
                v_unet = models.unet(
                    x=x[half],
                    timesteps=timesteps[half],
                    spacing_tensor=spacing[half],
                    class_labels=None if modality is None else modality[half],
                )
        v = v.float()
        if v_unet is not None:
            v = v_unet.float() + cond.mask_guidance * (v - v_unet.float())
        if guided:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + cond.cfg_scale * (v_cond - v_uncond)
        return v

    return velocity


def sample_euler(
    velocity: Velocity, x: torch.Tensor, scheduler, timesteps, next_timesteps, callback=None
) -> torch.Tensor:
    """The official stepping: one velocity evaluation and one `RFlowScheduler.step` per timestep."""
    total = len(timesteps)
    for i, (t, t_next) in enumerate(zip(timesteps, next_timesteps)):
        v = velocity(x, t)
        x, _ = scheduler.step(v, t, x, t_next)
        if callback is not None:
            callback({"i": i, "total": total, "t": float(t), "t_next": float(t_next), "x": x})
    return x


def sample_heun(
    velocity: Velocity, x: torch.Tensor, scheduler, timesteps, next_timesteps, callback=None
) -> torch.Tensor:
    """Heun's second-order step: Euler predictor, then the mean of the start and end velocities.

    Two network evaluations per step (the last step included: at t = 0 the flow's velocity is
    defined), on the same timestep grid and with the same step sizes as Euler.
    """
    total = len(timesteps)
    for i, (t, t_next) in enumerate(zip(timesteps, next_timesteps)):
        v = velocity(x, t)
        x_pred, _ = scheduler.step(v, t, x, t_next)
        v_next = velocity(x_pred, t_next)
        x, _ = scheduler.step(0.5 * (v + v_next), t, x, t_next)
        if callback is not None:
            callback({"i": i, "total": total, "t": float(t), "t_next": float(t_next), "x": x})
    return x


SOLVERS = {"euler": sample_euler, "heun": sample_heun}


@dataclass
class LatentHold:
    """The part of the latent an edit keeps: the reference's clean latent, held where `free` is 0.

    `free` is 1 where the model draws, 0 where the reference is held, and may be fractional in a
    band between (a soft blend). `harmonize` > 0 adds that many resampling jumps per step (RePaint):
    the blended latent is noised back from t_next to t and the step taken again, so that the drawn part
    can agree with the held part it was just joined to, at (1 + harmonize) times the network passes.
    """

    latent: torch.Tensor  # (1, C, x, y, z) in the UNet's scaled units, on the device
    free: torch.Tensor  # (1, 1, x, y, z) in [0, 1], on the device
    harmonize: int = 0
    # the latent shape whose timestep shift the schedule takes: the whole scan's, not the crop's
    schedule_shape: tuple[int, ...] | None = None

    def blend(self, x: torch.Tensor, noise: torch.Tensor, scheduler, t: torch.Tensor) -> torch.Tensor:
        """x where the model draws, the reference noised to timestep t elsewhere (t = 0: the reference)."""
        known = scheduler.add_noise(self.latent, noise, t.reshape(1).to(self.latent.device))
        return known + self.free * (x - known)


def _renoise(x: torch.Tensor, t_from: float, t_to: float, T: float, generator: torch.Generator) -> torch.Tensor:
    """A sample of x_t_to given x_t_from (t_to > t_from) under the rectified flow's forward process
    x_t = (1 − t/T)·x0 + (t/T)·ε: x_to = a·x_from + σ·ε' with a = (1 − t_to/T)/(1 − t_from/T) and
    σ² = (t_to/T)² − a²·(t_from/T)²."""
    s, t = t_from / T, t_to / T
    a = (1.0 - t) / (1.0 - s)
    sigma = max(t * t - (a * s) ** 2, 0.0) ** 0.5
    fresh = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
    return a * x + sigma * fresh


def _held(run, hold: LatentHold, noise: torch.Tensor, seed: int):
    """`run` (a solver) one timestep at a time, the latent blended with the held reference after each
    step (and, with `hold.harmonize`, noised back and stepped again that many times)."""
    generator = torch.Generator("cpu").manual_seed((int(seed) + 1) % 2**63)

    def solver(velocity, x, scheduler, timesteps, next_timesteps, callback=None):
        T = float(scheduler.num_train_timesteps)
        for i, (t, t_next) in enumerate(zip(timesteps, next_timesteps)):
            for jump in range(hold.harmonize + 1):
                if jump:
                    x = _renoise(x, float(t_next), float(t), T, generator)
                x = run(velocity, x, scheduler, timesteps[i : i + 1], next_timesteps[i : i + 1])
                x = hold.blend(x, noise, scheduler, t_next)
                if float(t_next) <= 0:
                    break  # the last step ends on the data: nothing left to harmonise
            if callback is not None:
                callback({"i": i, "total": len(timesteps), "t": float(t), "t_next": float(t_next), "x": x})
        return x

    return solver


def sample_latent(
    models: MaisiModels,
    cond: Conditioning,
    latent_shape: tuple[int, ...],
    seed: int,
    num_steps: int = 30,
    solver: str = "euler",
    callback: StepCallback | None = None,
    hold: LatentHold | None = None,
) -> torch.Tensor:
    """Noise from `seed` → latent after `num_steps` solver steps (float32, on the device).

    With `hold`, the latent is the held reference outside the edit at every timestep (`LatentHold`).

    With `cond.level_prior`, the trajectory is split at the first timestep t ≤ prior_from · T: there
    the one-step prediction x̂0 = x + t·v is moved by level_prior(x̂0) while the noise it implies is
    kept (x += (1 − t/T)·shift), which costs one more velocity evaluation. With `cond.bone_prior` as
    well, it is split again at the first later timestep t ≤ bone_prior_from · T for the bone-only shift
    (the networks draw bone back towards the tissue around it after the first shift; TRAINING.md).
    """
    schedule_shape = latent_shape if hold is None or hold.schedule_shape is None else hold.schedule_shape
    scheduler, timesteps, next_timesteps = schedule(models, num_steps, schedule_shape)
    x = noise = initial_noise(latent_shape, seed, models.device)
    velocity = velocity_model(models, cond)
    run = SOLVERS[solver]
    if hold is not None:
        x = hold.blend(noise, noise, scheduler, timesteps[0])
        run = _held(run, hold, noise, seed)
    total = len(timesteps)
    T = float(scheduler.num_train_timesteps)
    splits: list[tuple[int, Callable[[torch.Tensor], torch.Tensor]]] = []
    if cond.level_prior is not None:
        after = (timesteps.float() <= cond.prior_from * T).nonzero()
        if len(after):
            first = int(after[0])
            splits.append((first, cond.level_prior))
            if cond.bone_prior is not None:
                later = (timesteps.float() <= cond.bone_prior_from * T).nonzero()[:, 0]
                later = later[later > first]
                if len(later):
                    splits.append((int(later[0]), cond.bone_prior))

    def shifted(offset: int) -> StepCallback | None:
        if callback is None:
            return None
        return lambda info: callback({**info, "i": info["i"] + offset, "total": total})

    start = 0
    for split, shift in splits:
        x = run(velocity, x, scheduler, timesteps[start:split], next_timesteps[start:split], shifted(start))
        t = float(timesteps[split])
        x0 = x + (t / T) * velocity(x, timesteps[split])
        x = x + (1.0 - t / T) * shift(x0)
        start = split
    return run(velocity, x, scheduler, timesteps[start:], next_timesteps[start:], shifted(start))
