"""Weight averaging of two checkpoints of one network (a "model soup" along a fine-tuning run).

Two consecutive ControlNet stages can sit on either side of a balance the sampler cares about (stage
h of the demo draws pancreatic lesions, stage i colon lesions and the spleen): their weights, being
fine-tunes of one another, interpolate smoothly, and `weight`·first + (1 − weight)·second lands
between the two without another training run. Works on any official-format checkpoint (a dict with
one `*_state_dict` of tensors); the other entries (epoch, loss, scale_factor, …) come from `first`.

    python -m MaisiSynthLib.training.averaging FIRST.pt SECOND.pt --weight 0.5 --out OUT.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..errors import ModelError, OptionError, tool_exit_status
from ..models import _atomic_save, load_checkpoint


def _state_key(checkpoint: object, path: Path) -> str:
    keys = (
        [k for k in checkpoint if isinstance(k, str) and k.endswith("_state_dict")]
        if isinstance(checkpoint, dict)
        else []
    )
    if len(keys) != 1 or not isinstance(checkpoint[keys[0]], dict):
        raise ModelError(
            f"{path.name} is not an official-format checkpoint (one '*_state_dict' entry; found {keys or 'none'})",
            "pass two checkpoints written by maisi-synth train (e.g. controlnet_3d_rflow-ct.pt)",
        )
    return keys[0]


def average_checkpoints(first: str | Path, second: str | Path, weight: float, out: str | Path) -> dict:
    """Write weight·first + (1 − weight)·second (floating-point tensors; others from first) to `out`.
    Both must hold the same network: same state-dict key, tensor names, shapes and dtypes."""
    if not 0.0 <= float(weight) <= 1.0:
        raise OptionError(f"--weight {weight} is outside [0, 1]", "use a weight between 0 and 1 (0.5: the midpoint)")
    first, second, out = Path(first), Path(second), Path(out)
    a, b = load_checkpoint(first), load_checkpoint(second)
    key = _state_key(a, first)
    if _state_key(b, second) != key:
        raise ModelError(
            f"{first.name} and {second.name} hold different networks ({key} vs {_state_key(b, second)})",
            "average two checkpoints of the same network",
        )
    sa, sb = a[key], b[key]
    if sa.keys() != sb.keys():
        missing = sorted(set(sa) ^ set(sb))[:3]
        raise ModelError(
            f"{first.name} and {second.name} have different layers (e.g. {', '.join(missing)})",
            "average two checkpoints of the same architecture (same config_network_rflow.json)",
        )
    mixed = {}
    for name, ta in sa.items():
        tb = sb[name]
        if not (torch.is_tensor(ta) and torch.is_tensor(tb)) or ta.shape != tb.shape or ta.dtype != tb.dtype:
            raise ModelError(
                f"{first.name} and {second.name} differ in layer {name}",
                "average two checkpoints of the same architecture (same config_network_rflow.json)",
            )
        if ta.is_floating_point():
            wide = torch.promote_types(ta.dtype, torch.float32)  # bf16/fp16 averaged in fp32
            mixed[name] = (float(weight) * ta.to(wide) + (1.0 - float(weight)) * tb.to(wide)).to(ta.dtype)
        else:  # integer buffers (e.g. counters) cannot be averaged; keep the first's
            mixed[name] = ta.clone()
    result = {**a, key: mixed}
    _atomic_save(result, out)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--weight", type=float, default=0.5, help="share of FIRST (default 0.5)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    def average() -> str:
        average_checkpoints(args.first, args.second, args.weight, args.out)
        return f"wrote {args.out} ({args.weight:g} × {args.first} + {1 - args.weight:g} × {args.second})"

    return tool_exit_status(average)


if __name__ == "__main__":
    raise SystemExit(main())
