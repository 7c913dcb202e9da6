"""GPU readiness check: proves and times the official-size MAISI-v2 path through our engine.

    python benchmarks/gpu_check.py --device cuda --sizes 256 512 512x512x768 --json gpu_check.json
    python benchmarks/gpu_check.py --tiny --device cpu --json tiny.json          # CPU smoke, seconds

On a lent GPU machine run `scripts/gpu_check.sh` (installs the carried wheels first; see
`scripts/gpu_wheels.sh`). Timing needs no official weights: the networks are built from the shipped
official config (`MaisiSynthLib/data/config_network_rflow.json`) with seeded random weights, scaled
so that activations stay finite, written as an official-format model folder and loaded back with
`load_models`, so the loader, the GPU switches (`use_flash_attention`, `norm_float16`), fp16
autocast, the sampler and the tiled decoder are exactly what users run. `--tiny` derives a network
config of the same structure with 8× fewer channels for the CPU smoke run of the test suite.

What it does, in this order, within `--budget-s` (an item whose estimated time, from what was
already measured, would not fit is skipped and listed as such):
  1. correctness: a small grid sampled and decoded with the fast settings (GPU: fp16 autocast, flash
     attention, float16 group norms) against float32 without them (TF32 off), both decoded by the
     same tiled decode, same device and noise; HU differences reported and bounded (BOUND_REL_MEAN);
     the tiling's own effect and the fast path against a whole float32 decode reported beside;
  2. per size: seconds per sampling step (UNet alone, + ControlNet, + ControlNet with CFG), a full
     `--steps` Euler run, decoding with each official decode preset, end-to-end time, peak memory;
  3. a cold and a warm request through the worker's engine at the first size (the model load is
     paid once), after the second size and before the third (512x512x768, which the budget cuts
     first).
Times are warm (one step of warm-up is excluded from the per-step times) and bracketed by
`torch.cuda.synchronize()`; peak memory is `torch.cuda.max_memory_allocated` per item (weights
included). One table goes to stdout, progress to stderr, everything to `--json` (rewritten after
every item, so a run cut short still leaves its numbers).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import queue
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from MaisiSynthLib.decoding import HU_MAX, HU_MIN, decode_latent, to_hu  # noqa: E402
from MaisiSynthLib.masks import binary_code, remove_tumors  # noqa: E402
from MaisiSynthLib.models import (  # noqa: E402
    MaisiModels,
    build_network,
    load_models,
    locate_model_folder,
    parameter_count,
    resolve_device,
    resolve_precision,
    save_model_folder,
)
from MaisiSynthLib.pipeline import peak_rss_mb  # noqa: E402
from MaisiSynthLib.sampling import (  # noqa: E402
    Conditioning,
    initial_noise,
    sample_euler,
    sample_latent,
    schedule,
    spacing_condition,
    velocity_model,
)
from MaisiSynthLib.tiny_model import torso_mask_labels  # noqa: E402

OFFICIAL_CONFIG = ROOT / "MaisiSynthLib" / "data" / "config_network_rflow.json"
SCHEMA = 1

# Decode presets of the official inference configs (NV-Generate-CTMR configs/config_infer*.json):
# window in latent voxels, overlap. The first is config_infer.json's, the engine's default.
PRESETS: list[tuple[str, tuple[int, int, int], float]] = [
    ("default", (48, 48, 48), 0.6666),  # config_infer.json
    ("24g", (64, 64, 48), 0.4),  # config_infer_24g_512x512x512.json
    ("80g", (80, 80, 80), 0.4),  # config_infer_80g_512x512x512.json
]
PRESET_768 = ("80g-768", (80, 80, 96), 0.4)  # config_infer_80g_512x512x768.json

# --tiny: channels ÷ 8 and image sizes ÷ 8 (a 64³ tiny grid plays 512³), so the decode windows
# shrink by the same factor and tile the tiny latents as the presets tile the official ones.
TINY_FACTOR = 8

# Correctness bound. What the GPU settings change (fp16 autocast, flash attention, float16 group
# norms) is compared with both sides decoded by the same tiled decode, on the VAE's raw output
# (1.0 = 2000 HU) before clipping, relative to the reference's standard deviation. Two unrelated
# outputs of the same spread differ by about 1.13 std on average (2/sqrt(pi) for Gaussians); the
# same computation in reduced precision differs by a few percent (fp16 keeps an 11-bit mantissa,
# bf16 8 bits, and ~30 steps through a deep random network amplify rounding). A mean difference of
# at most 0.1 std therefore passes a right fast path and fails a broken one (a wrong switch, an
# overflow, a kernel that ignores its mask) by a wide margin. The tiling's own effect (float32 tiled
# vs float32 whole: each window's group norms see one window, not the volume) is reported apart:
# it belongs to the official sliding-window decode, not to the GPU settings, and with random
# weights and the small windows of a small grid it is large (test_decoding.py bounds it for trained-
# like smooth latents); the fast path against the whole float32 decode is reported too.
BOUND_REL_MEAN = 0.1


# ---------------------------------------------------------------------------------------------------
# Time, memory, budget


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def measured(device: torch.device) -> Iterator[dict]:
    """{"s": wall seconds, "peak_mb": device peak} of the block, synchronized on both ends."""
    out: dict = {}
    free(device)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    yield out
    sync(device)
    out["s"] = time.perf_counter() - start
    if device.type == "cuda":
        out["peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


class Budget:
    """Wall-clock budget of the whole run; `fits(estimate)` decides whether an item may start."""

    SAFETY = 1.25  # estimates scale earlier measurements; sizes scale attention super-linearly

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def fits(self, estimate: float | None) -> bool:
        """An item with no estimate (nothing comparable measured yet) runs while any time is left."""
        if estimate is None:
            return self.left() > 0
        return estimate * self.SAFETY <= self.left()


class Report:
    """The JSON report, rewritten after every item; `log` prints progress to stderr."""

    def __init__(self, path: str | None, budget: Budget) -> None:
        self.path = Path(path) if path else None
        self.budget = budget
        self.data: dict[str, Any] = {"schema": SCHEMA, "skipped": [], "errors": []}

    def log(self, message: str) -> None:
        print(f"[{self.budget.elapsed():7.1f} s] {message}", file=sys.stderr, flush=True)

    def skip(self, item: str, estimate: float | None) -> None:
        reason = (
            f"estimated {estimate:.1f} s (x{Budget.SAFETY} safety) > {max(self.budget.left(), 0):.1f} s left"
            if estimate is not None
            else f"no time left of the {self.budget.seconds:.0f} s budget"
        )
        self.data["skipped"].append({"item": item, "reason": reason})
        self.log(f"skipped {item}: {reason}")
        self.save()

    def error(self, item: str, exc: BaseException) -> None:
        first = str(exc).splitlines()[0] if str(exc) else ""
        oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in first.lower()
        self.data["errors"].append(
            {"item": item, "kind": "out-of-memory" if oom else type(exc).__name__, "message": first[:300]}
        )
        self.log(f"FAILED {item}: {type(exc).__name__}: {first[:200]}")
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        self.data["elapsed_s"] = round(self.budget.elapsed(), 2)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_json_default) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (tuple, Path)):
        return list(value) if isinstance(value, tuple) else str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


# ---------------------------------------------------------------------------------------------------
# Networks: the official config, its tiny twin, seeded random weights


def official_config() -> dict:
    return json.loads(OFFICIAL_CONFIG.read_text(encoding="utf-8"))


def tiny_config(config: dict) -> dict:
    """The official rflow-ct networks with channels ÷ 8 (at least 4), 4 norm groups and 4-channel
    attention heads: same classes, levels, blocks and attention levels, seconds on a CPU.

    The VAE's convolutions are not split (`num_splits` 1): splitting is a memory knob that needs at
    least 3 voxels per split at the latent level, more than tiny windows have.
    """
    tiny = copy.deepcopy(config)
    tiny["autoencoder_def"]["num_splits"] = 1

    def shrink(values: list[int]) -> list[int]:
        return [max(4, v // TINY_FACTOR) for v in values]

    for key in ("autoencoder_def", "diffusion_unet_def", "controlnet_def"):
        entry = tiny[key]
        entry["num_channels"] = shrink(entry["num_channels"])
        entry["norm_num_groups"] = 4
        if "num_head_channels" in entry:
            entry["num_head_channels"] = [min(v, 4) for v in entry["num_head_channels"]]
        if "conditioning_embedding_num_channels" in entry:
            entry["conditioning_embedding_num_channels"] = shrink(entry["conditioning_embedding_num_channels"])
    return tiny


def randomize_scaled(module: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Seeded random weights that keep activations of order one through the whole network.

    Every weight matrix / kernel gets std 1/sqrt(fan_in), so each layer preserves the scale of its
    input; the residual stream then grows only like sqrt(blocks), far from float16's 65504. Norm
    weights are 1 ± 0.1, biases ± 0.1, class embeddings N(0, 1). Layers MONAI initialises to zero
    (the UNet's output convolution, the ControlNet's zero convolutions) get random weights too, so
    that every path changes the result and a wrong switch shows in the correctness check.
    """
    with torch.no_grad():
        for sub in module.modules():
            for name, param in sub.named_parameters(recurse=False):
                noise = torch.randn(param.shape, generator=generator)
                if isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                    value = (1.0 if name == "weight" else 0.0) + 0.1 * noise
                elif isinstance(sub, torch.nn.Embedding):
                    value = noise
                elif param.ndim >= 2:
                    value = noise / math.sqrt(param[0].numel())
                else:
                    value = 0.1 * noise
                param.copy_(value)
    return module


def _calibrate_vae_output(autoencoder: torch.nn.Module) -> None:
    """Centre the random VAE's output in [0, 1] (std ≈ 0.2) so that HU are mostly unclipped and
    differences in HU mean something: the last convolution of the decoder is scaled, its bias 0.5."""
    last = [m for m in autoencoder.decoder.modules() if isinstance(m, torch.nn.Conv3d)][-1]
    with torch.no_grad():
        last.weight.mul_(0.25)
        last.bias.fill_(0.5)


def make_model_folder(root: Path, config: dict, seed: int, settings: dict | None) -> dict:
    """Build the three networks on the CPU with seeded weights (the same on every machine) and write
    them as an official-format model folder; returns parameter counts and timings."""
    generator = torch.Generator("cpu").manual_seed(seed)
    start = time.perf_counter()
    autoencoder = randomize_scaled(build_network(config, "autoencoder_def", "cpu"), generator)
    _calibrate_vae_output(autoencoder)
    unet = randomize_scaled(build_network(config, "diffusion_unet_def", "cpu"), generator)
    controlnet = randomize_scaled(build_network(config, "controlnet_def", "cpu"), generator)
    built = time.perf_counter()
    save_model_folder(root, config, autoencoder, unet, controlnet, 1.0, settings=settings)
    return {
        "parameters_m": {
            "autoencoder": round(parameter_count(autoencoder) / 1e6, 3),
            "unet": round(parameter_count(unet) / 1e6, 3),
            "controlnet": round(parameter_count(controlnet) / 1e6, 3),
        },
        "build_s": round(built - start, 2),
        "save_s": round(time.perf_counter() - built, 2),
    }


def switch_state(models: MaisiModels) -> dict:
    """Which GPU switches are on in the loaded modules (read back, not assumed from the config)."""
    nets = [m for m in (models.autoencoder, models.unet, models.controlnet) if m is not None]
    subs = [s for net in nets for s in net.modules()]
    return {
        "flash_attention": any(getattr(s, "use_flash_attention", False) for s in subs),
        "norm_float16": any(getattr(s, "norm_float16", False) for s in subs),
        "precision": models.precision,
    }


@contextlib.contextmanager
def reference_mode(models: MaisiModels) -> Iterator[MaisiModels]:
    """The same networks in plain float32: no autocast, no flash attention, float32 group norms and
    no TF32 (cuDNN uses TF32 for float32 convolutions by default, which has fp16's mantissa and would
    make the reference as coarse as the path it checks). Everything is restored afterwards."""
    nets = [m for m in (models.autoencoder, models.unet, models.controlnet) if m is not None]
    saved = [
        (s, k, getattr(s, k))
        for n in nets
        for s in n.modules()
        for k in ("use_flash_attention", "norm_float16")
        if hasattr(s, k)
    ]
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        for sub, key, _ in saved:
            setattr(sub, key, False)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        yield dataclasses.replace(models, precision="fp32")
    finally:
        for sub, key, value in saved:
            setattr(sub, key, value)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


# ---------------------------------------------------------------------------------------------------
# Inputs: a phantom mask at any size, the conditioning the pipeline builds from it


def phantom_labels(shape: tuple[int, int, int], base: int = 32) -> np.ndarray:
    """The tests' torso phantom (liver with a hepatic tumor, spleen, kidneys, lungs, body) drawn at
    `base`³ and repeated up to `shape` (each a multiple of `base`): instant at 512×512×768."""
    labels = torso_mask_labels(base, tumor=26)
    for axis, n in enumerate(shape):
        if n % base:
            raise ValueError(f"size {n} is not a multiple of {base}")
        labels = np.repeat(labels, n // base, axis=axis)
    return labels


def spacing_for(shape: tuple[int, int, int]) -> tuple[float, float, float]:
    """A 384 mm field of view in-plane, as the official 512³ configs; only the conditioning value."""
    xy = 384.0 / shape[0]
    return (xy, xy, xy)


def conditioning(models: MaisiModels, labels: np.ndarray, spacing, cfg_scale: float) -> Conditioning:
    """What `pipeline.generate` builds in its encode-mask stage: the 8-bit mask code on the device,
    spacing × 100, modality CT; with CFG the tumor-free code as well."""
    device = models.device
    control = binary_code(torch.from_numpy(labels.astype(np.int64))[None, None]).to(device)
    uncond = None
    if cfg_scale > 0:
        uncond = binary_code(torch.from_numpy(remove_tumors(labels).astype(np.int64))[None, None]).to(device)
    modality = torch.tensor([1], dtype=torch.long, device=device)
    return Conditioning(control, spacing_condition(spacing), modality, cfg_scale, uncond)


def shape_text(shape) -> str:
    return "x".join(str(int(n)) for n in shape)


def count_windows(latent: tuple[int, ...], window: tuple[int, ...], overlap: float) -> int:
    """Sliding windows MONAI's inferer uses for this latent (1: decoded whole, as `decode_latent`)."""
    if math.prod(latent) <= math.prod(window):
        return 1
    total = 1
    for n, w in zip(latent, window):
        w = min(w, n)
        interval = max(int(w * (1 - overlap)), 1)
        total *= 1 if n <= w else math.ceil((n - w) / interval) + 1
    return total


def window_voxels(latent: tuple[int, ...], window: tuple[int, ...], overlap: float) -> int:
    """Latent voxels the decoder processes in all windows together (the decode's work)."""
    if math.prod(latent) <= math.prod(window):
        return math.prod(latent)
    return count_windows(latent, window, overlap) * math.prod(min(w, n) for w, n in zip(window, latent))


def finite_stats(image: torch.Tensor) -> dict:
    flat = image.flatten().float()
    finite = torch.isfinite(flat)
    bad = int((~finite).sum())
    good = flat[finite]
    return {
        "nonfinite": bad,
        "mean": float(good.mean()) if good.numel() else float("nan"),
        "std": float(good.std()) if good.numel() > 1 else float("nan"),
        "clipped_fraction": float(((good < 0) | (good > 1)).float().mean()) if good.numel() else float("nan"),
    }


# ---------------------------------------------------------------------------------------------------
# 1. Correctness


def check_correctness(models: MaisiModels, args, tiny: bool) -> dict:
    """Fast path vs float32 reference on a small grid, same noise, same steps (see BOUND_REL_MEAN).

    bounded: fast sampling + fast tiled decode vs float32 sampling + float32 tiled decode;
    reported: the latents, the decoder alone (the fast latent decoded both ways), the tiling alone
    (float32 tiled vs float32 whole) and the fast path against the float32 whole decode.
    """
    size = 32 if tiny else 128
    shape = (size, size, size)
    labels = phantom_labels(shape)
    cond = conditioning(models, labels, spacing_for(shape), 0.0)
    latent_shape = models.latent_shape(shape)
    # windows of 3/4 of the latent: 2 per axis at the official presets' overlap, so the tiled decode
    # really stitches (8 windows) without making the small check slow
    window = tuple(3 * n // 4 for n in latent_shape[2:])
    overlap = 0.4  # the official large-volume presets' overlap
    steps = args.steps

    fast_latent = sample_latent(models, cond, latent_shape, args.seed, steps)
    fast_image = decode_latent(models, fast_latent, window, overlap)
    with reference_mode(models) as ref:
        reference = switch_state(ref) | {
            "tf32": torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
        }
        ref_latent = sample_latent(ref, cond, latent_shape, args.seed, steps)
        ref_whole = decode_latent(ref, ref_latent, tuple(latent_shape[2:]), overlap)
        ref_tiled = decode_latent(ref, ref_latent, window, overlap)
        fast_latent_ref_decode = decode_latent(ref, fast_latent, window, overlap)
    del cond

    def diff(a: torch.Tensor, b: torch.Tensor, reference: torch.Tensor, in_hu: bool = True) -> dict:
        """max / mean |a − b| (VAE units for images), the mean relative to the reference's standard
        deviation, and for images the same in HU (clipped as `decoding.to_hu`, no body crop)."""
        a, b = a.float(), b.float()
        d = (a - b).abs()
        out = {
            "max": float(d.max()),
            "mean": float(d.mean()),
            "rel_mean": float(d.mean()) / float(reference.float().std()),
        }
        if in_hu:
            hu_d = (hu(a) - hu(b)).abs()
            out |= {"hu_max_abs": float(hu_d.max()), "hu_mean_abs": float(hu_d.mean())}
        return out

    def hu(image: torch.Tensor) -> torch.Tensor:
        return image.clamp(0, 1) * (HU_MAX - HU_MIN) + HU_MIN

    fast_stats = finite_stats(fast_image)
    precision = diff(fast_image, ref_tiled, ref_tiled)
    result = {
        "grid": list(shape),
        "latent": list(latent_shape[2:]),
        "steps": steps,
        "window": list(window),
        "overlap": overlap,
        "fast": switch_state(models) | {"decode": f"tiled {shape_text(window)}/{overlap}"},
        "reference": reference,  # read back inside the reference mode, as the fast path's switches
        # the bounded comparison: GPU settings vs float32, both decoded with the same tiling
        "hu_max_abs": round(precision["hu_max_abs"], 1),
        "hu_mean_abs": round(precision["hu_mean_abs"], 2),
        "hu_std_reference": round(float(hu(ref_tiled).std()), 1),
        "rel_mean": precision["rel_mean"],
        "bound_rel_mean": BOUND_REL_MEAN,
        "latent_diff": diff(fast_latent.cpu(), ref_latent.cpu(), ref_latent.cpu(), in_hu=False),
        "decode_only": diff(fast_image, fast_latent_ref_decode, ref_tiled),
        # reported, not bounded: the official tiled decode's own effect, and the two together
        "tiling": diff(ref_tiled, ref_whole, ref_whole),
        "vs_whole_float32": diff(fast_image, ref_whole, ref_whole),
        "fast_image": fast_stats,
        "reference_image": finite_stats(ref_tiled),
    }
    result["within_bound"] = bool(fast_stats["nonfinite"] == 0 and precision["rel_mean"] <= BOUND_REL_MEAN)
    return result


# ---------------------------------------------------------------------------------------------------
# 2. Speed and memory per size


def step_times(
    models: MaisiModels, cond: Conditioning, latent_shape: tuple[int, ...], seed: int, steps: int, count: int
) -> dict:
    """Seconds per Euler step over `count` steps after one warm-up step, on the real schedule of a
    `steps`-step run; the mask embedding (computed once per run) is outside the timed steps."""
    device = models.device
    scheduler, timesteps, next_timesteps = schedule(models, steps, latent_shape)
    n = min(count + 1, len(timesteps))
    x = initial_noise(latent_shape, seed, device)
    with measured(device) as m:
        velocity = velocity_model(models, cond)
        sync(device)
        stamps = [time.perf_counter()]

        def on_step(_: dict) -> None:
            sync(device)
            stamps.append(time.perf_counter())

        sample_euler(velocity, x, scheduler, timesteps[:n], next_timesteps[:n], on_step)
    durations = np.diff(stamps)
    timed = durations[1:] if len(durations) > 1 else durations
    out = {"s_per_step": float(np.median(timed)), "warmup_s": float(durations[0]), "timed_steps": int(len(timed))}
    if "peak_mb" in m:
        out["peak_mb"] = m["peak_mb"]
    return out


def full_run(models: MaisiModels, cond: Conditioning, latent_shape: tuple[int, ...], seed: int, steps: int):
    """`sampling.sample_latent` as the pipeline calls it, timed step by step."""
    device = models.device
    stamps: list[float] = []

    def on_step(_: dict) -> None:
        sync(device)
        stamps.append(time.perf_counter())

    with measured(device) as m:
        start = time.perf_counter()
        latent = sample_latent(models, cond, latent_shape, seed, steps, "euler", on_step)
    durations = np.diff([start] + stamps)
    out = {"s": m["s"], "s_per_step_median": float(np.median(durations)), "first_step_s": float(durations[0])}
    if "peak_mb" in m:
        out["peak_mb"] = m["peak_mb"]
    out["latent"] = finite_stats(latent)
    return latent, out


def decode_item(models: MaisiModels, latent: torch.Tensor, labels: np.ndarray, window, overlap: float) -> dict:
    """`decode_latent` + `to_hu` (the pipeline's decode stage), timed, windows counted."""
    windows: list[int] = []
    with measured(models.device) as m:
        image = decode_latent(models, latent, window, overlap, progress=windows.append)
        hu = to_hu(image, labels)
    stats = finite_stats(image)
    del image
    out = {"s": m["s"], "windows": max(windows[-1] if windows else 1, 1), "image": stats, "hu_mean": float(hu.mean())}
    if "peak_mb" in m:
        out["peak_mb"] = m["peak_mb"]
    return out


class Rates:
    """What earlier measurements predict: seconds per latent voxel per step, per decoded voxel."""

    def __init__(self) -> None:
        self.step: dict[str, float] = {}  # variant → s per latent voxel per step
        self.decode: float | None = None  # s per decoded latent voxel (all windows together)

    def step_s(self, variant: str, latent_voxels: int) -> float | None:
        rate = self.step.get(variant)
        return None if rate is None else rate * latent_voxels

    def decode_s(self, voxels: int) -> float | None:
        return None if self.decode is None else self.decode * voxels


def presets_for(shape: tuple[int, int, int], tiny: bool) -> list[tuple[str, tuple[int, int, int], float]]:
    presets = list(PRESETS) + ([PRESET_768] if shape[2] > shape[0] else [])
    if tiny:
        presets = [(n, tuple(max(2, w // TINY_FACTOR) for w in win), o) for n, win, o in presets]
    return presets


def measure_size(models: MaisiModels, shape, args, budget: Budget, report: Report, rates: Rates) -> dict | None:
    device = models.device
    name = shape_text(shape)
    latent_shape = models.latent_shape(shape)
    voxels = math.prod(latent_shape[2:])
    n = args.timed_steps + 1
    # The least this size needs: the three short step runs and the full run (CFG costs ~2 steps).
    guess = [rates.step_s(v, voxels) for v in ("unet", "unet_controlnet", "cfg")]
    estimate = None if None in guess else n * sum(guess) + args.steps * guess[1]
    if not budget.fits(estimate):
        report.skip(f"size {name}", estimate)
        return None
    row: dict[str, Any] = {"size": list(shape), "latent": list(latent_shape[2:]), "steps": args.steps}
    report.data["sizes"].append(row)
    report.log(f"{name}: latent {shape_text(latent_shape[2:])}")

    labels = phantom_labels(shape)
    spacing = spacing_for(shape)
    with measured(device) as m:
        cond = conditioning(models, labels, spacing, args.cfg_scale)
    row["encode_mask_s"] = m["s"]

    # Per-step times: UNet alone, with the ControlNet, with the ControlNet and tumor CFG.
    row["step"] = {}
    plain = dataclasses.replace(cond, cfg_scale=0.0, control_uncond=None)
    variants = [
        ("unet", dataclasses.replace(models, controlnet=None), plain),
        ("unet_controlnet", models, plain),
        ("cfg", models, cond),
    ]
    for variant, variant_models, variant_cond in variants:
        try:
            result = step_times(variant_models, variant_cond, latent_shape, args.seed, args.steps, args.timed_steps)
        except Exception as exc:  # noqa: BLE001 - an OOM at one variant must not lose the others
            report.error(f"{name} step {variant}", exc)
            free(device)
            continue
        row["step"][variant] = result
        rates.step[variant] = result["s_per_step"] / voxels
        report.log(f"{name}: {variant} {result['s_per_step']:.4f} s/step" + _peak_text(result))
        report.save()

    # The full run (ControlNet, no CFG), as a user's request; CFG's full run is extrapolated.
    latent = None
    estimate = rates.step_s("unet_controlnet", voxels)
    if estimate is not None:
        estimate *= args.steps
    if budget.fits(estimate):
        try:
            latent, row["sample"] = full_run(models, plain, latent_shape, args.seed, args.steps)
            report.log(f"{name}: {args.steps} steps {row['sample']['s']:.2f} s" + _peak_text(row["sample"]))
        except Exception as exc:  # noqa: BLE001
            report.error(f"{name} sampling", exc)
    else:
        report.skip(f"{name} full {args.steps}-step sampling", estimate)
    for variant, value in row["step"].items():
        row["step"][variant]["steps_total_est_s"] = value["s_per_step"] * args.steps
    del cond, plain, variants
    free(device)
    report.save()

    # Decoding with each official preset, cheapest first, so the budget cuts the most expensive.
    row["decode"] = []
    if latent is None:  # no sampled latent: decode a smooth random one of the right shape
        latent = torch.nn.functional.avg_pool3d(initial_noise(latent_shape, args.seed, device), 3, 1, 1)
    presets = sorted(presets_for(shape, args.tiny), key=lambda p: window_voxels(latent_shape[2:], p[1], p[2]))
    for preset, window, overlap in presets:
        work = window_voxels(latent_shape[2:], window, overlap)
        estimate = rates.decode_s(work)
        item = f"{name} decode {preset} {shape_text(window)}/{overlap}"
        if not budget.fits(estimate):
            report.skip(item, estimate)
            continue
        try:
            result = decode_item(models, latent, labels, window, overlap)
        except Exception as exc:  # noqa: BLE001
            report.error(item, exc)
            free(device)
            continue
        rates.decode = result["s"] / work
        row["decode"].append({"preset": preset, "window": list(window), "overlap": overlap, **result})
        report.log(f"{item}: {result['windows']} windows {result['s']:.2f} s" + _peak_text(result))
        report.save()
    del latent
    free(device)

    # End to end (engine, no file I/O): encode mask + sampling + decode, per measured preset.
    sample_s = row.get("sample", {}).get("s")
    cfg_step = row["step"].get("cfg", {}).get("s_per_step")
    cn_step = row["step"].get("unet_controlnet", {}).get("s_per_step")
    # CFG's full run is not run: the measured run scaled by the per-step ratio (the mask embedding
    # and the schedule scale along, slightly overstating them), or the per-step time × steps.
    if sample_s is not None and cfg_step and cn_step:
        cfg_s = sample_s * cfg_step / cn_step
    else:
        cfg_s = cfg_step * args.steps if cfg_step else None
    row["sample_cfg_est_s"] = cfg_s
    for d in row["decode"]:
        base = row["encode_mask_s"] + d["s"]
        d["end_to_end_s"] = base + sample_s if sample_s is not None else None
        d["end_to_end_cfg_est_s"] = base + cfg_s if cfg_s is not None else None
        peaks = [p for p in (row.get("sample", {}).get("peak_mb"), d.get("peak_mb")) if p is not None]
        d["end_to_end_peak_mb"] = max(peaks) if peaks else None
    report.save()
    return row


def _peak_text(result: dict) -> str:
    return f", peak {result['peak_mb'] / 1024:.2f} GB" if result.get("peak_mb") is not None else ""


# ---------------------------------------------------------------------------------------------------
# 3. Worker: a cold and a warm request through the worker's engine


def worker_check(folder: Path, shape, args, device: torch.device, work: Path) -> dict:
    """Two identical requests to `worker.RequestRunner` (what `maisi-synth worker` and `serve` run): the
    first loads the models from the folder, the second reuses them."""
    from MaisiSynthLib.volumes import write_volume
    from MaisiSynthLib.worker import RequestRunner

    spacing = spacing_for(shape)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-s * (n - 1) / 2 for s, n in zip(spacing, shape)]
    mask = write_volume(work / "worker_mask.nii", phantom_labels(shape).astype(np.int16), affine)
    events: queue.Queue = queue.Queue()
    engine = RequestRunner(events.put, {"device": str(device)})
    requests = []
    try:
        for label in ("cold", "warm"):
            params = {
                "mask": str(mask),
                "output": str(work / f"worker_{label}.nii"),  # uncompressed: time the engine, not gzip
                "model_dir": str(folder),
                "steps": args.steps,
                "seed": args.seed,
                "precision": args.precision,
            }
            start = time.perf_counter()
            engine.handle({"type": "generate", "id": label, "params": params})
            while True:
                event = events.get(timeout=max(args.budget_s, 60))
                if event.get("id") == label and event["type"] in ("result", "error"):
                    break
            wall = time.perf_counter() - start
            if event["type"] == "error":
                raise RuntimeError(f"worker {label} request failed: {event['kind']}: {event['message']}")
            requests.append(
                {
                    "request": label,
                    "models": event["models"],
                    "wall_s": wall,
                    "timings": event["timings"],
                    "peak_memory": event["peak_memory"],
                }
            )
    finally:
        engine.shutdown(wait=60)
    return {"size": list(shape), "steps": args.steps, "requests": requests}


# ---------------------------------------------------------------------------------------------------
# Output


def device_info(device: torch.device) -> dict:
    import monai

    info = {
        "type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "monai": monai.__version__,
        # where MONAI came from: on a lent machine, the carried wheel's install folder
        "monai_path": str(Path(monai.__file__).resolve().parent.parent),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["name"] = props.name
        info["memory_gb"] = round(props.total_memory / 2**30, 1)
    else:
        info["name"] = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    return info


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _gb(mb: float | None) -> str:
    return "-" if mb is None else f"{mb / 1024:.1f}"


def print_table(data: dict) -> None:
    dev = data["device"]
    print(
        f"MaisiSynth GPU check {data['date']}: {dev['name']}, torch {dev['torch']}, CUDA {dev['cuda']}, MONAI {dev['monai']}"
    )
    s = data["settings"]
    print(
        f"networks: {data['mode']} rflow-ct, random weights (seed {s['seed']}); {s['steps']} Euler steps, "
        f"CFG scale {s['cfg_scale']}; fast path {json.dumps(data.get('fast_path', {}))}"
    )
    setup = data.get("setup", {})
    print(
        f"setup: build {_f(setup.get('build_s'), 1)} s, save {_f(setup.get('save_s'), 1)} s, "
        f"load {_f(setup.get('load_s'), 1)} s (parameters M: {json.dumps(setup.get('parameters_m', {}))})"
    )
    c = data.get("correctness")
    if c:
        print(
            f"correctness {shape_text(c['grid'])}, {c['steps']} steps, fast vs float32 (same tiling): |ΔHU| max "
            f"{c['hu_max_abs']:.0f}, mean {c['hu_mean_abs']:.1f} (HU std {c['hu_std_reference']:.0f}), "
            f"mean/std {c['rel_mean']:.4f} (bound {c['bound_rel_mean']}), non-finite {c['fast_image']['nonfinite']}: "
            f"{'PASS' if c['within_bound'] else 'FAIL'}; latent mean/std {c['latent_diff']['rel_mean']:.4f}; "
            f"decoder alone {c['decode_only']['rel_mean']:.4f}; tiling alone {c['tiling']['rel_mean']:.3f}, "
            f"vs whole float32 |ΔHU| mean {c['vs_whole_float32']['hu_mean_abs']:.1f}"
        )
    header = (
        f"{'size':<13}{'latent':<12}{'s/step UNet':>12}{'+CN':>8}{'+CFG':>8}{'steps s':>9}{'GB':>6}  "
        f"{'decode window/overlap':<24}{'win':>5}{'dec s':>8}{'GB':>6}{'e2e s':>8}{'e2e CFG s':>10}"
    )
    print(header)
    print("-" * len(header))
    for row in data.get("sizes", []):
        step = row.get("step", {})
        sample = row.get("sample", {})
        left = (
            f"{shape_text(row['size']):<13}{shape_text(row['latent']):<12}"
            f"{_f(step.get('unet', {}).get('s_per_step'), 4):>12}"
            f"{_f(step.get('unet_controlnet', {}).get('s_per_step'), 4):>8}"
            f"{_f(step.get('cfg', {}).get('s_per_step'), 4):>8}"
            f"{_f(sample.get('s')):>9}{_gb(sample.get('peak_mb')):>6}  "
        )
        decodes = row.get("decode") or [None]
        for i, d in enumerate(decodes):
            prefix = left if i == 0 else " " * len(left)
            if d is None:
                print(prefix + "(no decode measured)")
                continue
            print(
                prefix
                + f"{d['preset'] + ' ' + shape_text(d['window']) + '/' + str(d['overlap']):<24}{d['windows']:>5}"
                + f"{_f(d['s']):>8}{_gb(d.get('peak_mb')):>6}{_f(d['end_to_end_s']):>8}{_f(d['end_to_end_cfg_est_s']):>10}"
            )
    w = data.get("worker")
    if w:
        parts = [
            f"{r['request']} {r['wall_s']:.2f} s (models {r['models']}, load {r['timings'].get('load', 0):.2f} s)"
            for r in w["requests"]
        ]
        print(f"worker {shape_text(w['size'])}, {w['steps']} steps: " + "; ".join(parts))
    for item in data.get("skipped", []):
        print(f"skipped {item['item']}: {item['reason']}")
    for item in data.get("errors", []):
        print(f"error {item['item']}: {item['kind']}: {item['message']}")
    rss = data.get("process_rss_peak_mb")
    print(
        f"total {data.get('elapsed_s', 0):.1f} s of a {s['budget_s']:.0f} s budget"
        + (f"; process peak RSS {rss / 1024:.1f} GB" if rss else "")
    )


# ---------------------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"size must be N or XxYxZ, got {text!r}")
    return tuple(parts)  # type: ignore[return-value]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--tiny", action="store_true", help="tiny networks and grids (CPU smoke run)")
    p.add_argument(
        "--sizes", nargs="+", type=parse_size, help="image sizes, N or XxYxZ (default 256 512 512x512x768; tiny: 32 64)"
    )
    p.add_argument("--steps", type=int, help="Euler steps of a full run (default 30; tiny: 4)")
    p.add_argument("--timed-steps", type=int, default=3, help="steps timed per variant after one warm-up step")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="tumor CFG scale of the CFG variant")
    p.add_argument("--budget-s", type=float, default=300.0, help="skip items that would end the run later")
    p.add_argument(
        "--precision", default="auto", help="fast path: auto (fp16 on GPUs, fp32 on the CPU), fp16, bf16, fp32"
    )
    p.add_argument("--no-worker", action="store_true", help="skip the cold/warm worker requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", help="write the report here (rewritten after every item)")
    args = p.parse_args(argv)
    if args.sizes is None:
        args.sizes = [(32,) * 3, (64,) * 3] if args.tiny else [(256,) * 3, (512,) * 3, (512, 512, 768)]
    if args.steps is None:
        args.steps = 4 if args.tiny else 30
    if args.steps < 1 or args.timed_steps < 1:
        p.error("--steps and --timed-steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    report = Report(args.json, budget)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    if args.threads is None and args.tiny and device.type == "cpu":
        # Tiny networks gain nothing from threads, and on a shared CPU (CI, a busy workstation) the
        # thread pool's barriers make each of the many tiny ops many times slower.
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = official_config()
    if args.tiny:
        config = tiny_config(config)
    multiple = 32
    for shape in args.sizes:
        if any(n % multiple for n in shape):
            print(f"size {shape_text(shape)}: every side must be a multiple of {multiple}", file=sys.stderr)
            return 2
    report.data.update(
        {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "mode": "tiny" if args.tiny else "official",
            "device": device_info(device),
            "settings": {
                "sizes": [list(s) for s in args.sizes],
                "steps": args.steps,
                "timed_steps": args.timed_steps,
                "cfg_scale": args.cfg_scale,
                "budget_s": args.budget_s,
                "seed": args.seed,
                "precision": precision,
            },
            "sizes": [],
        }
    )
    report.log(f"device {report.data['device']['name']}, {report.data['mode']} networks, precision {precision}")

    with tempfile.TemporaryDirectory(prefix="maisi-gpu-check-") as tmp:
        work = Path(tmp)
        folder = work / "model"
        # Tiny grids have coarse voxels and a small field of view: widen the grid rules the worker
        # checks, as the tiny test models do. The official-size run keeps the official rules.
        settings: dict = {"name": "gpu-check-random-official"}
        if args.tiny:
            default_window, default_overlap = presets_for(args.sizes[0], True)[0][1:]
            settings = {
                "name": "gpu-check-tiny",
                "grid": {"spacing_xy_mm": [0.5, 16], "spacing_z_mm": [0.5, 16], "min_fov_xy_mm": 64},
                # the default preset scaled like the other tiny windows, so the worker decodes tiled
                "inference": {
                    "autoencoder_sliding_window_infer_size": list(default_window),
                    "autoencoder_sliding_window_infer_overlap": default_overlap,
                },
            }
        report.data["setup"] = make_model_folder(folder, config, args.seed, settings)
        start = time.perf_counter()
        models = load_models(locate_model_folder(folder), device, precision)
        sync(device)
        report.data["setup"]["load_s"] = round(time.perf_counter() - start, 2)
        report.data["fast_path"] = switch_state(models)
        report.log(f"networks built, saved and loaded: {report.data['setup']}")
        report.save()

        # 1. Correctness always runs: it is the go/no-go of the whole path and takes seconds.
        try:
            report.data["correctness"] = check_correctness(models, args, args.tiny)
            c = report.data["correctness"]
            report.log(
                f"correctness: |ΔHU| max {c['hu_max_abs']:.0f} mean {c['hu_mean_abs']:.1f}, mean/std {c['rel_mean']:.4f} "
                f"(bound {c['bound_rel_mean']}): {'PASS' if c['within_bound'] else 'FAIL'}"
            )
        except Exception as exc:  # noqa: BLE001 - the timings are still worth having
            report.error("correctness", exc)
        free(device)
        report.save()

        # 2. Sizes in order; the worker check goes after the first two, before the largest size.
        rates = Rates()
        worker_after = min(2, len(args.sizes))
        for index, shape in enumerate(args.sizes):
            if index == worker_after and not args.no_worker:
                run_worker(
                    folder, args, device, work, budget, report, rates, models, loaded_s=report.data["setup"]["load_s"]
                )
            try:
                measure_size(models, shape, args, budget, report, rates)
            except Exception as exc:  # noqa: BLE001
                report.error(f"size {shape_text(shape)}", exc)
            free(device)
        if worker_after >= len(args.sizes) and not args.no_worker:
            run_worker(
                folder, args, device, work, budget, report, rates, models, loaded_s=report.data["setup"]["load_s"]
            )

    # The host side too: the stitched image and the mask code live in CPU memory.
    report.data["process_rss_peak_mb"] = peak_rss_mb()
    report.save()
    print_table(report.data)
    failed = not report.data.get("correctness", {}).get("within_bound", False)
    return 1 if failed else 0


def run_worker(
    folder, args, device, work, budget: Budget, report: Report, rates: Rates, models, loaded_s: float
) -> None:
    shape = args.sizes[0]
    voxels = math.prod(models.latent_shape(shape)[2:])
    step = rates.step_s("unet_controlnet", voxels)
    window, overlap = presets_for(shape, args.tiny)[0][1:]
    decode = rates.decode_s(window_voxels(models.latent_shape(shape)[2:], window, overlap))
    estimate = None if step is None or decode is None else loaded_s + 2 * (args.steps * step + decode + 1.0)
    if not budget.fits(estimate):
        report.skip("worker cold/warm requests", estimate)
        return
    try:
        report.data["worker"] = worker_check(folder, shape, args, device, work)
        for r in report.data["worker"]["requests"]:
            report.log(f"worker {r['request']}: {r['wall_s']:.2f} s, models {r['models']}, timings {r['timings']}")
    except Exception as exc:  # noqa: BLE001
        report.error("worker", exc)
    free(device)
    report.save()


if __name__ == "__main__":
    sys.exit(main())
