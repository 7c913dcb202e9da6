"""Model folders: official-format configs, MONAI's MAISI networks, and safe checkpoint loading.

A model folder is either flat (the config JSON beside the three checkpoints) or the official
repository layout (`configs/config_network_rflow.json` + `models/*.pt`). Networks are MONAI's classes,
built from the config's `*_def` entries; only those classes may be named by `_target_`, and
`$`-expressions are refused, so a config file can never run code. Checkpoints load with
`torch.load(weights_only=True)` (numpy scalars allowed, as official checkpoints may store them).
"""

from __future__ import annotations

import copy
import gc
import importlib
import json
import logging
import math
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ModelError, OptionError
from .grid import GridRules
from .model_home import (  # noqa: F401 - the file names live where torch-free code can read them
    AUTOENCODER_FILE,
    CONFIG_NAME,
    CONTROLNET_FILE,
    INFER_CONFIG_NAME,
    PRIOR_FILE,
    SETTINGS_NAME,
    UNET_FILE,
    find_model_file,
)

log = logging.getLogger(__name__)

_MAISI = "monai.apps.generation.maisi.networks"
ALLOWED_TARGETS = {
    f"{_MAISI}.autoencoderkl_maisi.AutoencoderKlMaisi",
    f"{_MAISI}.diffusion_model_unet_maisi.DiffusionModelUNetMaisi",
    f"{_MAISI}.controlnet_maisi.ControlNetMaisi",
    "monai.networks.schedulers.rectified_flow.RFlowScheduler",
    "monai.networks.schedulers.RFlowScheduler",
}
RFLOW_TARGETS = {t for t in ALLOWED_TARGETS if t.endswith("RFlowScheduler")}

# Official checkpoints may carry numpy scalars (epoch, loss); these types only rebuild numbers.
# numpy 2 calls its core `_core`, numpy 1 `core`: both are in the range the package admits.
_NUMPY_CORE = getattr(np, "_core", None) or np.core
_SAFE_NUMPY = [
    _NUMPY_CORE.multiarray.scalar,
    _NUMPY_CORE.multiarray._reconstruct,
    np.ndarray,
    np.dtype,
    *{type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64, np.bool_)},
]

# Official inference defaults (config_infer.json), used when the folder has no config of its own.
DEFAULT_INFERENCE = {
    "num_inference_steps": 30,
    "cfg_guidance_scale": 0.0,
    # Not in the official config (MaisiSynth's own, `sampling.velocity_model`): 1 = off, as the
    # official sampler; guidance against the UNet alone on timesteps t ≥ mask_guidance_from · T.
    "mask_guidance_scale": 1.0,
    "mask_guidance_from": 0.5,
    # MaisiSynth's own (`latent_prior.py`): 1 = off; < 1 needs latent_prior.pt in the folder
    "latent_prior_from": 1.0,
    # the same, bone labels only, again at t = this · T after the first shift; 0 = off
    "latent_prior_bone_from": 0.0,
    "autoencoder_sliding_window_infer_size": [48, 48, 48],
    "autoencoder_sliding_window_infer_overlap": 0.6666,
    "modality": 1,
}


# ---------------------------------------------------------------------------------------------------
# Config → networks


def _resolve(value: Any, root: dict, path: str, seen: tuple[str, ...] = ()) -> Any:
    if isinstance(value, dict):
        return {k: _resolve(v, root, f"{path}.{k}", seen) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, root, f"{path}[{i}]", seen) for i, v in enumerate(value)]
    if isinstance(value, str) and value.startswith("@"):
        key = value[1:]
        if key not in root:
            raise ModelError(f"config entry {path} refers to '{value}', which the config does not define")
        if key in seen or len(seen) > 16:
            raise ModelError(
                f"config entry {path} refers to '{value}', which refers back to itself",
                "give the entry a value instead of a reference",
            )
        return _resolve(root[key], root, key, (*seen, key))
    if isinstance(value, str) and value.startswith("$"):
        raise ModelError(
            f"config entry {path} is an expression ('{value[:40]}'); expressions are not evaluated",
            "write the value itself in the config",
        )
    return value


def network_kwargs(config: dict, key: str) -> tuple[str, dict]:
    """(`_target_`, constructor arguments) of a `*_def` entry, references resolved."""
    if key not in config:
        raise ModelError(f"the model config has no '{key}' entry", f"use an official-format {CONFIG_NAME}")
    definition = _resolve(copy.deepcopy(config[key]), config, key)
    target = definition.pop("_target_", None)
    if target not in ALLOWED_TARGETS:
        raise ModelError(
            f"config entry {key} names '{target}', which is not one of MONAI's MAISI classes",
            "use the official network definitions (MAISI autoencoder, diffusion UNet, ControlNet, RFlowScheduler)",
        )
    return target, definition


# Bounds on a network definition, checked before anything is built: the official networks use at
# most 512 channels over at most 4 levels; a config asking for far more would allocate gigabytes of
# weights before failing (or never finish building).
MAX_CHANNELS = 1024
MAX_LEVELS = 6
MAX_RES_BLOCKS = 8
_CHANNEL_KEYS = ("num_channels", "channels", "conditioning_embedding_num_channels")


def check_network_size(key: str, kwargs: dict) -> None:
    """Refuse channel counts, levels and block counts far beyond the official networks."""
    for name in _CHANNEL_KEYS:
        if name in kwargs:
            values = kwargs[name] if isinstance(kwargs[name], (list, tuple)) else [kwargs[name]]
            if (
                not values
                or len(values) > MAX_LEVELS
                or not all(isinstance(v, int) and 0 < v <= MAX_CHANNELS for v in values)
            ):
                raise ModelError(
                    f"config entry {key}.{name} is {str(values)[:80]}: at most {MAX_LEVELS} levels of 1 to {MAX_CHANNELS} channels",
                    "use the official network definitions (at most 512 channels per level)",
                )
    blocks = kwargs.get("num_res_blocks")
    if blocks is not None:
        values = blocks if isinstance(blocks, (list, tuple)) else [blocks]
        if not all(isinstance(v, int) and 0 <= v <= MAX_RES_BLOCKS for v in values):
            raise ModelError(
                f"config entry {key}.num_res_blocks is {str(blocks)[:80]}: at most {MAX_RES_BLOCKS} per level",
                "use the official network definitions",
            )
    for name in ("in_channels", "out_channels", "latent_channels"):
        value = kwargs.get(name)
        if value is not None and not (isinstance(value, int) and 0 < value <= 256):
            raise ModelError(f"config entry {key}.{name} is {str(value)[:40]}", "use the official network definitions")


def instantiate(target: str, kwargs: dict) -> Any:
    module_name, _, class_name = target.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ModelError(
            f"cannot build {class_name} from the config: {exc}", "check the network definition in the config"
        ) from None


# Constructor switches that only work on a GPU; they change no weights, so a network built without
# them on the CPU can switch them back on once it is on a GPU.
_GPU_ONLY_SWITCHES = ("use_flash_attention", "norm_float16")


def build_network(config: dict, key: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Build one network of an official-format config with MONAI's class, on `device`.

    Flash attention and float16 group norms are GPU features: they are turned off on the CPU (MONAI
    refuses flash attention without CUDA; float16 norm outputs break the next float32 convolution).
    """
    target, kwargs = network_kwargs(config, key)
    check_network_size(key, kwargs)
    if torch.device(device).type != "cuda":
        kwargs.update({k: False for k in _GPU_ONLY_SWITCHES if k in kwargs})
    return instantiate(target, kwargs).to(device).eval()


def move_network(
    module: torch.nn.Module, config: dict, key: str, device: torch.device, precision: str = "fp16"
) -> torch.nn.Module:
    """Move a network to `device`, with the config's GPU-only switches on when they can work there.

    Float16 norm outputs need autocast to feed the next convolution, so they stay off at fp32.
    """
    _, kwargs = network_kwargs(config, key)
    for switch in _GPU_ONLY_SWITCHES:
        if switch in kwargs:
            wanted = bool(kwargs[switch]) and device.type == "cuda"
            if switch == "norm_float16":
                wanted = wanted and precision != "fp32"
            for sub in module.modules():
                if hasattr(sub, switch):
                    setattr(sub, switch, wanted)
    return module.to(device)


def build_scheduler(config: dict):
    target, kwargs = network_kwargs(config, "noise_scheduler")
    if target not in RFLOW_TARGETS:
        raise ModelError(
            f"the noise scheduler is {target}; only rectified-flow (RFlowScheduler) models are supported",
            "use a MAISI-v2 rflow model",
        )
    return instantiate(target, kwargs)


def compression_of(config: dict) -> int:
    """Image voxels per latent voxel along one axis (4 for MAISI's VAE)."""
    _, ae = network_kwargs(config, "autoencoder_def")
    return 2 ** (len(ae["num_channels"]) - 1)


def size_multiple_of(config: dict) -> int:
    """Output sizes must be multiples of this: VAE compression × the UNet's down-sampling."""
    _, unet = network_kwargs(config, "diffusion_unet_def")
    return compression_of(config) * 2 ** (len(unet["num_channels"]) - 1)


# ---------------------------------------------------------------------------------------------------
# Model folders


@dataclass
class ModelFolder:
    root: Path
    config_path: Path
    autoencoder_path: Path
    unet_path: Path
    controlnet_path: Path | None
    config: dict
    settings: dict = field(default_factory=dict)
    inference: dict = field(default_factory=dict)
    prior_path: Path | None = None
    settings_path: Path | None = None  # maisi_synth.json, where one was found

    @property
    def name(self) -> str:
        return self.settings.get("name", self.root.name)

    def grid_rules(self) -> GridRules:
        return GridRules.from_dict(self.settings.get("grid", {}), size_multiple_of(self.config))

    def weight_files(self) -> list[Path]:
        """Every file whose bytes decide the output besides the configs (the prior included)."""
        files = (self.autoencoder_path, self.unet_path, self.controlnet_path, self.prior_path)
        return [p for p in files if p is not None]


def read_json(path: Path) -> dict:
    """A JSON object from a model folder's file; anything else is one ModelError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc}", "fix or replace the JSON file") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a JSON object", "use an official-format config file")
    return data


def locate_model_folder(path: str | Path, require_controlnet: bool = True) -> ModelFolder:
    """Find the config and checkpoints of a flat or official-layout model folder (nothing loaded yet)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ModelError(f"model folder not found: {root}", "pass --model-dir with a folder holding the model files")

    config_path = find_model_file(root, CONFIG_NAME)
    if config_path is None:
        raise ModelError(
            f"no {CONFIG_NAME} in {root} (looked in the folder and in configs/)",
            "put the official network config beside the checkpoints",
        )
    found = {name: find_model_file(root, name) for name in (AUTOENCODER_FILE, UNET_FILE, CONTROLNET_FILE)}
    required = [AUTOENCODER_FILE, UNET_FILE] + ([CONTROLNET_FILE] if require_controlnet else [])
    missing = [n for n in required if found[n] is None]
    if missing:
        raise ModelError(
            f"missing checkpoint(s) {', '.join(missing)} in {root} (looked in the folder and in models/)",
            "copy the official checkpoints into the model folder",
        )
    settings_path = find_model_file(root, SETTINGS_NAME)
    settings = read_json(settings_path) if settings_path else {}
    infer_path = find_model_file(root, INFER_CONFIG_NAME)
    inference = dict(DEFAULT_INFERENCE)
    if infer_path:
        official = read_json(infer_path)
        inference.update({k: official[k] for k in DEFAULT_INFERENCE if k in official})
    inference.update(settings.get("inference", {}))
    return ModelFolder(
        root=root,
        config_path=config_path,
        autoencoder_path=found[AUTOENCODER_FILE],
        unet_path=found[UNET_FILE],
        controlnet_path=found[CONTROLNET_FILE],
        config=read_json(config_path),
        settings=settings,
        inference=inference,
        prior_path=find_model_file(root, PRIOR_FILE),
        settings_path=settings_path,
    )


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def load_checkpoint(path: Path) -> Any:
    """`torch.load(weights_only=True)`; a file that needs pickle code execution is refused."""
    try:
        # torch warns about pickle files before refusing them; the refusal below says it in one line
        with torch.serialization.safe_globals(_SAFE_NUMPY), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        detail = f"it stores a Python object of type {found.group(1)}" if found else "it stores Python objects"
        raise ModelError(
            f"{path.name} needs pickle code execution to load ({detail}); refused for safety",
            "re-save it as a dict of tensors and numbers, e.g. "
            "torch.save({'unet_state_dict': model.state_dict(), 'scale_factor': s}, path)",
        ) from None
    except Exception as exc:  # truncated zip, not a torch file, ...
        raise ModelError(
            f"cannot read checkpoint {path.name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            "check that the file is a complete torch.save() checkpoint",
        ) from None


def checkpoint_state_dict(checkpoint: Any, key: str | None, path: Path) -> dict:
    if key is not None:
        if not isinstance(checkpoint, dict) or key not in checkpoint:
            found = (
                ", ".join(map(str, list(checkpoint)[:6])) if isinstance(checkpoint, dict) else type(checkpoint).__name__
            )
            raise ModelError(
                f"{path.name} has no '{key}' entry (found: {found})",
                f"save the weights under '{key}' as the official files do",
            )
        checkpoint = checkpoint[key]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ModelError(f"{path.name} does not hold a state dict of tensors", "save model.state_dict()")
    # A model saved from inside DistributedDataParallel prefixes every key with "module.".
    if checkpoint and all(k.startswith("module.") for k in checkpoint):
        checkpoint = {k[len("module.") :]: v for k, v in checkpoint.items()}
    return checkpoint


def _names(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_weights(
    module: torch.nn.Module, state: dict, path: Path, what: str, prefilled: set[str] = frozenset()
) -> None:
    """Load `state` into `module`; any missing (not prefilled) or unexpected key is a ModelError."""
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        mismatches = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        raise ModelError(
            f"{path.name} does not fit the {what} of the config: {'; '.join(mismatches[:3]) or exc}",
            "use the config the checkpoint was trained with",
        ) from None
    missing = [k for k in result.missing_keys if k not in prefilled]
    if missing or result.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"missing keys {_names(missing)}")
        if result.unexpected_keys:
            parts.append(f"unexpected keys {_names(result.unexpected_keys)}")
        raise ModelError(
            f"{path.name} does not match the {what} of the config: {'; '.join(parts)}",
            "use the config the checkpoint was trained with",
        )


def load_autoencoder_weights(autoencoder: torch.nn.Module, path: Path) -> None:
    """Load an `autoencoder_v1.pt` into `autoencoder`: a plain state dict (the official file) or one
    saved under 'unet_state_dict'."""
    checkpoint = load_checkpoint(path)
    key = "unet_state_dict" if isinstance(checkpoint, dict) and "unet_state_dict" in checkpoint else None
    load_weights(autoencoder, checkpoint_state_dict(checkpoint, key, path), path, "autoencoder")


# ---------------------------------------------------------------------------------------------------
# Loaded models


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise OptionError(f"unknown device '{name}'", "use auto, cpu or cuda") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(
            f"device {name} requested but torch {torch.__version__} sees no CUDA GPU",
            "use --device cpu, or install a CUDA build of torch on a machine with a GPU",
        )
    if resolved.type not in ("cpu", "cuda"):
        raise OptionError(f"device {name} is not supported", "use auto, cpu or cuda")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        # The official inference runs under CUDA float16 autocast.
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "fp16", "bf16"):
        raise OptionError(f"unknown precision '{precision}'", "use auto, fp32, fp16 or bf16")
    if precision == "fp16" and device.type != "cuda":
        raise OptionError("fp16 needs a CUDA GPU", "use --precision fp32 (or bf16) on the CPU")
    return precision


@dataclass
class MaisiModels:
    folder: ModelFolder
    autoencoder: torch.nn.Module
    unet: torch.nn.Module
    controlnet: torch.nn.Module | None
    scale_factor: torch.Tensor
    device: torch.device
    precision: str = "fp32"
    load_seconds: float = 0.0
    latent_prior: Any = None  # latent_prior.LatentPrior when the folder has one

    @property
    def config(self) -> dict:
        return self.folder.config

    @property
    def latent_channels(self) -> int:
        return int(network_kwargs(self.config, "diffusion_unet_def")[1]["in_channels"])

    @property
    def compression(self) -> int:
        return compression_of(self.config)

    @property
    def uses_modality(self) -> bool:
        return getattr(self.unet, "num_class_embeds", None) is not None

    def new_scheduler(self):
        return build_scheduler(self.config)

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, ...]:
        c = self.compression
        return (1, self.latent_channels) + tuple(n // c for n in image_shape)

    def autocast(self):
        if self.precision == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)


def load_models(
    folder: ModelFolder | str | Path, device: str | torch.device = "auto", precision: str = "auto"
) -> MaisiModels:
    """Build the networks of a model folder and load its checkpoints, as the official loader does.

    The ControlNet first receives the UNet weights it shares (the official `copy_model_state` step),
    then its own checkpoint; keys it lacks are fine only if the UNet supplied them.
    """
    import time

    from monai.networks.utils import copy_model_state

    start = time.perf_counter()
    if not isinstance(folder, ModelFolder):
        folder = locate_model_folder(folder)
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    config = folder.config
    _, unet_kwargs = network_kwargs(config, "diffusion_unet_def")
    if unet_kwargs.get("include_top_region_index_input") or unet_kwargs.get("include_bottom_region_index_input"):
        raise ModelError(
            "this UNet is conditioned on body regions (MAISI v1 DDPM); only MAISI-v2 rflow models are supported",
            "use the rflow-ct model and its config_network_rflow.json",
        )
    build_scheduler(config)  # refuse a non-rflow model before loading gigabytes of weights

    autoencoder = build_network(config, "autoencoder_def", "cpu")
    load_autoencoder_weights(autoencoder, folder.autoencoder_path)

    unet = build_network(config, "diffusion_unet_def", "cpu")
    unet_ckpt = load_checkpoint(folder.unet_path)
    load_weights(
        unet, checkpoint_state_dict(unet_ckpt, "unet_state_dict", folder.unet_path), folder.unet_path, "diffusion UNet"
    )
    if "scale_factor" not in unet_ckpt:
        raise ModelError(f"{folder.unet_path.name} has no 'scale_factor'", "save the latent scale factor with the UNet")
    scale_factor = torch.as_tensor(np.asarray(unet_ckpt["scale_factor"], dtype=np.float32)).reshape(())

    controlnet = None
    if folder.controlnet_path is not None:
        controlnet = build_network(config, "controlnet_def", "cpu")
        # MONAI's logger prints this step's summary to stdout, which the worker reserves for protocol.
        logging.getLogger("monai.networks.utils").setLevel(logging.WARNING)
        _, copied, _ = copy_model_state(controlnet, unet.state_dict(), inplace=True)
        cn_ckpt = load_checkpoint(folder.controlnet_path)
        load_weights(
            controlnet,
            checkpoint_state_dict(cn_ckpt, "controlnet_state_dict", folder.controlnet_path),
            folder.controlnet_path,
            "ControlNet",
            prefilled=set(copied),
        )
    models = MaisiModels(
        folder=folder,
        autoencoder=move_network(autoencoder, config, "autoencoder_def", device, precision),
        unet=move_network(unet, config, "diffusion_unet_def", device, precision),
        controlnet=(
            move_network(controlnet, config, "controlnet_def", device, precision) if controlnet is not None else None
        ),
        scale_factor=scale_factor.to(device),
        device=device,
        precision=precision,
    )
    if folder.prior_path is not None:
        from .latent_prior import load_latent_prior

        models.latent_prior = load_latent_prior(folder.prior_path, models.latent_channels, models.compression)
    models.load_seconds = time.perf_counter() - start
    return models


# ---------------------------------------------------------------------------------------------------
# Sizes and memory


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def estimate_memory(
    config: dict, output_size: tuple[int, int, int], precision: str, cfg: bool, window: list[int]
) -> dict:
    """Rough peak memory (bytes) of sampling and decoding at `output_size`, for planning.

    Sampling keeps the UNet's skip activations of the whole latent (the ControlNet's residuals add as
    many); decoding holds a few full-width feature maps of one sliding window at image resolution plus
    the output and its weight map on the CPU. Measured numbers come from `benchmarks/`.
    """
    bytes_per = 4 if precision == "fp32" else 2
    batch = 2 if cfg else 1
    c = compression_of(config)
    latent_voxels = math.prod(n // c for n in output_size)
    _, unet = network_kwargs(config, "diffusion_unet_def")
    res_blocks = unet["num_res_blocks"]
    res_blocks = [res_blocks] * len(unet["num_channels"]) if isinstance(res_blocks, int) else list(res_blocks)
    skips = sum(
        ch * (r + 1) * latent_voxels / 8**level for level, (ch, r) in enumerate(zip(unet["num_channels"], res_blocks))
    )
    working = 4 * unet["num_channels"][0] * latent_voxels
    sampling = 2 * batch * bytes_per * (skips + working)
    _, ae = network_kwargs(config, "autoencoder_def")
    window_voxels = math.prod(min(w, n // c) * c for w, n in zip(window, output_size))
    splits = max(1, int(ae.get("num_splits", 1)))
    decoding = bytes_per * ae["num_channels"][0] * window_voxels * (2 + 2 / splits)
    weights = 4 * sum(
        param_estimate(config, key)
        for key in ("autoencoder_def", "diffusion_unet_def", "controlnet_def")
        if key in config
    )
    return {
        "weights": weights,
        "sampling": sampling,
        "decoding": decoding,
        "output_on_cpu": 3 * 4 * math.prod(output_size),
        "peak_device": weights + max(sampling, decoding),
    }


def param_estimate(config: dict, key: str) -> int:
    target, kwargs = network_kwargs(config, key)
    with torch.device("meta"):
        return parameter_count(instantiate(target, kwargs))


# ---------------------------------------------------------------------------------------------------
# Writing model folders in the official format


def _plain_state(module: torch.nn.Module) -> dict:
    # Unwrap DistributedDataParallel / AveragedModel so keys are the bare network's.
    while hasattr(module, "module"):
        module = module.module
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _atomic_save(obj, path: Path) -> None:
    from .volumes import atomic_path

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_json(data: dict, path: str | Path) -> None:
    from .volumes import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def save_autoencoder(path: str | Path, autoencoder: torch.nn.Module) -> None:
    """`autoencoder_v1.pt`: a plain state dict, as the official file."""
    _atomic_save(_plain_state(autoencoder), Path(path))


def save_unet(
    path: str | Path,
    unet: torch.nn.Module,
    scale_factor: float | torch.Tensor,
    num_train_timesteps: int = 1000,
    epoch: int = 0,
    loss: float = 0.0,
) -> None:
    """`diff_unet_3d_rflow-ct.pt`: {epoch, loss, num_train_timesteps, scale_factor, unet_state_dict}."""
    checkpoint = {
        "epoch": int(epoch),
        "loss": float(loss),
        "num_train_timesteps": int(num_train_timesteps),
        "scale_factor": torch.as_tensor(scale_factor, dtype=torch.float32).detach().cpu().reshape(()),
        "unet_state_dict": _plain_state(unet),
    }
    _atomic_save(checkpoint, Path(path))


def save_controlnet(path: str | Path, controlnet: torch.nn.Module, epoch: int = 0, loss: float = 0.0) -> None:
    """`controlnet_3d_rflow-ct.pt`: {epoch, loss, controlnet_state_dict}."""
    _atomic_save(
        {"epoch": int(epoch), "loss": float(loss), "controlnet_state_dict": _plain_state(controlnet)}, Path(path)
    )


def save_model_folder(
    root: str | Path,
    config: dict,
    autoencoder: torch.nn.Module,
    unet: torch.nn.Module,
    controlnet: torch.nn.Module | None,
    scale_factor: float | torch.Tensor,
    layout: str = "flat",
    settings: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write config + checkpoints with the official file names and keys (flat or official layout).

    `extra` adds epoch and loss to the UNet and ControlNet checkpoints, as the official training
    scripts save them.
    """
    root = Path(root)
    if layout not in ("flat", "official"):
        raise ValueError(f"layout must be 'flat' or 'official', got {layout!r}")
    config_dir = root if layout == "flat" else root / "configs"
    weights_dir = root if layout == "flat" else root / "models"
    config_dir.mkdir(parents=True, exist_ok=True)
    weights_dir.mkdir(parents=True, exist_ok=True)
    extra = dict(extra or {})
    epoch, loss = int(extra.get("epoch", 0)), float(extra.get("loss", 0.0))
    save_json(config, config_dir / CONFIG_NAME)
    if settings:
        save_json(settings, config_dir / SETTINGS_NAME)
    save_autoencoder(weights_dir / AUTOENCODER_FILE, autoencoder)
    timesteps = int(network_kwargs(config, "noise_scheduler")[1].get("num_train_timesteps", 1000))
    save_unet(weights_dir / UNET_FILE, unet, scale_factor, timesteps, epoch, loss)
    if controlnet is not None:
        save_controlnet(weights_dir / CONTROLNET_FILE, controlnet, epoch, loss)
    return root


# ---------------------------------------------------------------------------------------------------
# Models kept between requests (the worker, the server and batch reuse loaded networks)


def _folder_fingerprint(folder) -> tuple:
    """What identifies a model folder's contents without reading them: paths, sizes, mtimes."""
    files = [folder.config_path, *folder.weight_files()]
    if folder.settings_path is not None:
        files.append(folder.settings_path)
    out = []
    for path in files:
        stat = Path(path).stat()
        out.append((str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns))
    return tuple(out)


class ModelCache:
    """Holds the models of one (folder, device, precision); another one, or a changed folder, replaces
    them. One set at a time: two full-size MAISI models rarely fit on one GPU."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._models = None
        self.last_reused = False

    def get(self, folder, device, precision: str):
        key = (
            str(folder.root.resolve()),
            str(device),
            resolve_precision(precision, device),
            _folder_fingerprint(folder),
        )
        if self._models is not None and key == self._key:
            self.last_reused = True
            return self._models
        self.clear()
        self._models = load_models(folder, device, precision)
        self._key = key
        self.last_reused = False
        return self._models

    def clear(self) -> None:
        self._models = None
        self._key = None
        gc.collect()
        empty_cuda_cache()


def empty_cuda_cache() -> None:
    """Give cached CUDA memory back (after dropping models, or after an out-of-memory error)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
