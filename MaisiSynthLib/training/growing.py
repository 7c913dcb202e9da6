"""Grow a trained VAE into a wider or deeper one that computes exactly the same function.

A small VAE that underfits (thin bone and small lesions blurred on its own training cases) needs
more capacity, but a VAE trained from scratch has a new latent space, and every diffusion stage
trained on the old one is lost with it. Growing keeps the latent ("net2net"):
- wider (`factor`): each layer's old weights go into the leading corner of the wider layer, the
  weights from new input channels into old output channels are zero, and the new output channels
  start from the wide network's own random initialisation. GroupNorm groups keep their size
  (`norm_num_groups` grows with the channels), so an old channel is normalised with exactly the
  channels it was before;
- deeper (`res_blocks`): each new residual block is appended after a level's existing ones with its
  last convolution zeroed, so it starts as the identity (x + 0) and learns a correction.
Encode and decode then match the original VAE's up to float rounding; fine-tuning lets the new
capacity add detail while the UNet and ControlNet still read the latents they were trained on.

    python -m MaisiSynthLib.training.growing MODEL_DIR [--factor 2] [--res-blocks 2 2 2] --out NEW_DIR

writes a flat model folder: the grown `autoencoder_v1.pt`, a `config_network_rflow.json` with the
grown `autoencoder_def`, and MODEL_DIR's other files unchanged.
"""

from __future__ import annotations

import argparse
import copy
import shutil
from pathlib import Path

import torch

from ..errors import ModelError, OptionError, tool_exit_status
from ..models import (
    AUTOENCODER_FILE,
    CONFIG_NAME,
    MAX_RES_BLOCKS,
    build_network,
    check_network_size,
    load_autoencoder_weights,
    locate_model_folder,
    network_kwargs,
    save_autoencoder,
    save_json,
)

MAX_FACTOR = 4
_PARTS = ("encoder", "decoder")


def grown_config(network: dict, factor: int = 1, res_blocks: list[int] | None = None) -> dict:
    """The network config with the autoencoder's channels and GroupNorm groups times `factor` and
    `res_blocks` residual blocks per level (each at least the current count)."""
    if isinstance(factor, bool) or not isinstance(factor, int) or not 1 <= factor <= MAX_FACTOR:
        raise OptionError(f"--factor {factor!r} is not a whole number from 1 to {MAX_FACTOR}", "use --factor 2")
    _, kwargs = network_kwargs(network, "autoencoder_def")  # resolved, so '@' references are checked
    channels, groups, blocks = kwargs.get("num_channels"), kwargs.get("norm_num_groups"), kwargs.get("num_res_blocks")
    if not (
        isinstance(channels, list)
        and all(type(c) is int for c in channels)
        and type(groups) is int
        and isinstance(blocks, list)
        and all(type(b) is int for b in blocks)
        and len(blocks) == len(channels)
    ):
        raise ModelError(
            "the autoencoder_def has no integer num_channels, num_res_blocks and norm_num_groups",
            "grow an official-format MAISI autoencoder config",
        )
    new_blocks = list(blocks) if res_blocks is None else list(res_blocks)
    if len(new_blocks) != len(blocks) or not all(
        type(b) is int and old <= b <= MAX_RES_BLOCKS for b, old in zip(new_blocks, blocks)
    ):
        raise OptionError(
            f"--res-blocks {new_blocks} must give {len(blocks)} levels, each from the current {blocks} to {MAX_RES_BLOCKS}",
            f"e.g. --res-blocks {' '.join(str(b + 1) for b in blocks)}",
        )
    if factor == 1 and new_blocks == list(blocks):
        raise OptionError("nothing to grow: --factor 1 and the same --res-blocks", "pass --factor 2 or --res-blocks")
    grown = copy.deepcopy(network)
    definition = grown["autoencoder_def"]
    definition["num_channels"] = [c * factor for c in channels]
    definition["norm_num_groups"] = groups * factor
    definition["num_res_blocks"] = new_blocks
    check_network_size("autoencoder_def", {**kwargs, **{k: definition[k] for k in ("num_channels", "num_res_blocks")}})
    return grown


def _block_map(small: torch.nn.Module, big: torch.nn.Module, factor: int) -> dict[str, str | None]:
    """Key prefix in `big` → the prefix it grows from in `small`, or None for a new residual block.

    Blocks are matched in order; a block of `big` that matches none is a new residual block (same
    channels in and out) appended to a level."""
    mapping: dict[str, str | None] = {}
    for part in _PARTS:
        old, new = list(getattr(small, part).blocks), list(getattr(big, part).blocks)
        j = 0
        for i, block in enumerate(new):
            here = f"{part}.blocks.{i}."
            ins, outs = getattr(block, "in_channels", None), getattr(block, "out_channels", None)
            if j < len(old) and type(old[j]) is type(block):
                if ins is None or (ins, outs) == (old[j].in_channels * factor, old[j].out_channels * factor):
                    mapping[here] = f"{part}.blocks.{j}."
                    j += 1
                    continue
            if ins is not None and ins == outs:
                mapping[here] = None
                continue
            raise ModelError(f"cannot match {part} block {i} to the original VAE", "grow a MAISI autoencoder")
        if j != len(old):
            raise ModelError(f"the grown {part} lost block {j} of the original", "grow a MAISI autoencoder")
    return mapping


def grow_state(small: torch.nn.Module, big: torch.nn.Module, factor: int) -> dict:
    """The grown network's state dict: every tensor of `small` in the leading corner of its grown
    counterpart (module docstring), new residual blocks with their last convolution zeroed."""
    mapping = _block_map(small, big, factor)
    small_state = small.state_dict()
    grown = {}
    for name, target in big.state_dict().items():
        out = target.clone()
        prefix = next((p for p in mapping if name.startswith(p)), None)
        if prefix is not None and mapping[prefix] is None:  # a new block: the identity until trained
            if name[len(prefix) :].startswith("conv2."):
                out.zero_()
            grown[name] = out
            continue
        source = small_state[name if prefix is None else mapping[prefix] + name[len(prefix) :]]
        if (
            not torch.is_tensor(source)
            or source.ndim != out.ndim
            or any(s > t for s, t in zip(source.shape, out.shape))
        ):
            raise ModelError(f"layer {name} does not fit its grown shape", "grow a VAE checkpoint of this config")
        if out.is_floating_point() and out.ndim >= 2:
            out[: source.shape[0], source.shape[1] :] = 0  # new inputs into old outputs
        out[tuple(slice(0, s) for s in source.shape)] = source.to(out.dtype)
        grown[name] = out
    return grown


def grow_model_folder(
    model_dir: str | Path,
    out_dir: str | Path,
    factor: int = 1,
    res_blocks: list[int] | None = None,
    seed: int = 0,
) -> Path:
    """Write a flat model folder whose VAE is `model_dir`'s grown (module docstring)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OptionError(f"{out_dir} exists and is not an empty folder", "choose a new folder for the grown model")
    folder = locate_model_folder(model_dir)
    network = folder.config
    grown_network = grown_config(network, factor, res_blocks)
    small = build_network(network, "autoencoder_def", "cpu")
    load_autoencoder_weights(small, folder.autoencoder_path)  # a checkpoint that misfits its config stops here
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))  # the new channels' initialisation is part of the result
        big = build_network(grown_network, "autoencoder_def", "cpu")
    big.load_state_dict(grow_state(small, big, factor))
    out_dir.mkdir(parents=True, exist_ok=True)
    # the other weights, then the top-level extras (settings, model card) a flat folder keeps
    for item in [folder.unet_path, folder.controlnet_path, *sorted(model_dir.iterdir())]:
        if item is not None and item.is_file() and item.name not in (AUTOENCODER_FILE, CONFIG_NAME):
            if not (out_dir / item.name).exists():
                shutil.copyfile(item, out_dir / item.name)
    save_json(grown_network, out_dir / CONFIG_NAME)
    save_autoencoder(out_dir / AUTOENCODER_FILE, big)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="model folder with the trained VAE")
    parser.add_argument("--factor", type=int, default=1, help="channel multiplier (default 1: same width)")
    parser.add_argument("--res-blocks", type=int, nargs="+", help="residual blocks per level, e.g. 2 2 2")
    parser.add_argument("--seed", type=int, default=0, help="initialisation of the new weights")
    parser.add_argument("--out", type=Path, required=True, help="new model folder")
    args = parser.parse_args(argv)

    def grow() -> str:
        grow_model_folder(args.model_dir, args.out, args.factor, args.res_blocks, args.seed)
        return f"wrote {args.out} (VAE grown, same latents)"

    return tool_exit_status(grow)


if __name__ == "__main__":
    raise SystemExit(main())
