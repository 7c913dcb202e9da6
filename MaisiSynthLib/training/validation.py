"""Held-out validation while a ControlNet trains: what the model draws, not only its loss.

The flow loss hardly moves between ControlNet stages while what the model draws does: an organ drifts
darker by a few HU per few hundred steps, a lesion type fades while another passes its real contrast.
With `validation_cases` set, every checkpoint generates a CT for each held-out case (at
`controlnet.validate_steps` Euler steps, seed = the training seed, no tumor-free second pass) from
the model folder just saved and adds one row to `logs/validation.csv`: per organ the mean |median-HU
error| and its sign, per lesion type the conspicuity synthetic / real. At 10 steps the organ errors
are within about 1 HU of 30 steps' (docs/results.md, table 2) in about half the time.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import OptionError
from .trainer import _CsvLog

LOG_NAME = "validation.csv"


def check_validation(config: dict, steps: int) -> list | None:
    """The held-out pairs named by `validation_cases`, checked before the first training step (a typo
    must not surface at the first checkpoint, after minutes of training); None when unset."""
    from ..cases import find_pairs

    cases = config.get("validation_cases")
    if cases is None:
        return None
    if not isinstance(cases, str):
        raise OptionError(
            f"training setting 'validation_cases' is {cases!r}",
            "give a folder of caseNNNN_image/_label.nii.gz pairs (or null for no validation)",
        )
    if steps < 1:  # its type is checked when the config loads
        raise OptionError(f"training setting 'controlnet.validate_steps' is {steps!r}", "give a whole number ≥ 1")
    return find_pairs(cases)


def validation_row(summary: dict, step: int, seconds: float) -> dict:
    """One CSV row from an `evaluation.evaluate` summary."""
    row: dict = {"step": step}
    for organ, error in summary["organ_median_abs_error_hu"].items():
        row[f"{organ} |error| HU"] = error
    for organ, error in summary["organ_median_signed_error_hu"].items():
        row[f"{organ} error HU"] = error
    for tumor, c in summary["tumor_conspicuity_hu"].items():
        row[f"{tumor} synthetic/real"] = c["ratio"]
    row["seconds"] = seconds
    return row


def validate_checkpoint(config: dict, steps: int, device: str, step: int) -> dict:
    """Generate and measure the held-out cases with the model folder as saved at `step`; log the row."""
    import time

    from ..evaluation import evaluate

    started = time.perf_counter()
    summary = evaluate(
        config["model_dir"], config["validation_cases"], steps=steps, seed=int(config["seed"]), device=device, roi=False
    )
    row = validation_row(summary, step, round(time.perf_counter() - started, 2))
    # the trainer's metrics log, opened as if resuming just before `step`: after `--resume` the rows
    # of redone checkpoints are replaced, not repeated
    _CsvLog(Path(config["output_dir"]) / "logs" / LOG_NAME, step - 1).write(row)
    errors = summary["organ_median_abs_error_hu"]
    shown = ", ".join(f"{k} {v:.0f}" for k, v in errors.items() if v is not None)
    print(f"validation at step {step}: organ |error| HU {shown}", file=sys.stderr)
    return row
