"""Training: VAE, rectified-flow diffusion UNet and ControlNet loops on one trainer skeleton.

    maisi-synth train vae|unet|controlnet --config train.json [--set key=value ...]
    torchrun --nproc_per_node G -m MaisiSynthLib train controlnet --config train.json

All three write into one official-format model folder (`<output_dir>/model`), which `generate`
loads as it is.
"""

from __future__ import annotations

STAGES = ("vae", "unet", "controlnet")


def stage_class(stage: str):
    """The Stage class of `vae`, `unet` or `controlnet`."""
    if stage == "vae":
        from .vae import VaeStage as cls
    elif stage == "unet":
        from .unet import UnetStage as cls
    elif stage == "controlnet":
        from .controlnet import ControlNetStage as cls
    else:
        from ..errors import OptionError

        raise OptionError(f"unknown training stage '{stage}'", f"use one of {', '.join(STAGES)}")
    return cls


def train(
    stage: str,
    config: str | None = None,
    overrides: list[str] | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    **direct,
) -> dict:
    """Run one training stage; `direct` holds dotted-key overrides from CLI flags (e.g. `vae.steps`)."""
    from .config import load_config
    from .trainer import Trainer

    cls = stage_class(stage)
    settings = load_config(config, overrides, **direct)
    return Trainer(cls, settings, resume=resume, stop_after=stop_after, progress=progress).run()
