"""A generate request's fields, with their types and ranges, checked once for every front door.

The CLI, the worker, the HTTP server, batch and the Slicer module all end in `pipeline.generate`;
every one of them hands its options to `check_params` (the pipeline calls it again on the request
it is given), so a value is accepted or refused the same way wherever it comes from. Types are
checked as well as names: a JSON client can send `"solver": ["euler"]`, `"spacing": "333"` or
`"controlnet": "no"`, and each is refused with one line naming the field and the fix instead of
being coerced or failing later as an internal error. No torch here: the Slicer module and the
server import this without loading it.

Untrusted JSON (a worker line, a server body) is parsed by `parse_json`, which bounds its size,
nesting depth and integer length before Python's parser sees it: a 5000-digit integer or 100,000
nested brackets are a one-line refusal, not a dead worker.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .errors import MaisiSynthError

SOLVER_NAMES = ("euler", "heun")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
MAX_JSON_BYTES = 1 << 20
MAX_JSON_DEPTH = 32
MAX_INT_DIGITS = 30
MAX_GRID_SIZE = 2048  # voxels per axis of an output grid
MAX_DECODE_WINDOW = 512  # latent voxels per axis


class RequestError(MaisiSynthError):
    """A request that is not valid JSON, not a known request type, or has fields of the wrong type or range."""

    kind = "bad-request"


# ---------------------------------------------------------------------------------------------------
# Bounded JSON


def _nesting_depth(text: str) -> int:
    """The deepest bracket nesting outside strings (a linear scan, no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise RequestError(f"a number has {len(text)} digits", f"send numbers of at most {MAX_INT_DIGITS} digits")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RequestError(f"a number is out of range ({text[:20]})", "send finite numbers")
    return value


def parse_json(data: str | bytes, what: str = "request") -> Any:
    """JSON from an untrusted client: at most 1 MiB, 32 levels deep, integers of at most 30 digits,
    no NaN or Infinity. Anything else is a RequestError naming the problem."""
    if isinstance(data, bytes):
        if len(data) > MAX_JSON_BYTES:
            raise RequestError(f"the {what} is {len(data)} bytes", f"send at most {MAX_JSON_BYTES} bytes")
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"the {what} is not UTF-8", "send UTF-8 JSON") from None
    if len(data) > MAX_JSON_BYTES:
        raise RequestError(f"the {what} is {len(data)} characters", f"send at most {MAX_JSON_BYTES} bytes")
    if _nesting_depth(data) > MAX_JSON_DEPTH:
        raise RequestError(f"the {what} nests more than {MAX_JSON_DEPTH} levels", "send a flat JSON object")

    def refuse_constant(name: str) -> None:
        raise RequestError(f"the {what} contains {name}", "send finite numbers")

    try:
        return json.loads(data, parse_int=_bounded_int, parse_float=_finite_float, parse_constant=refuse_constant)
    except json.JSONDecodeError as exc:
        raise RequestError(
            f"the {what} is not JSON ({exc.msg} at column {exc.colno})", "send one JSON object per line"
        ) from None
    except (RecursionError, ValueError, OverflowError) as exc:  # belt and braces behind the checks above
        raise RequestError(f"the {what} cannot be parsed ({type(exc).__name__})", "send a plain JSON object") from None


# ---------------------------------------------------------------------------------------------------
# The fields of a generate request


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _path(name: str, value: Any, required: bool) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise RequestError(f"'{name}' must be a file path (a non-empty string), got {_show(value)}", f"send '{name}' as a string")
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _triple(name: str, value: Any, kind: str, low: float, high: float, example: str) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise RequestError(f"'{name}' must be three numbers, got {_show(value)}", f"send e.g. {example}")
    check = _is_int if kind == "int" else _is_number
    if not all(check(v) for v in value) or not all(low <= v <= high for v in value):
        what = "whole numbers" if kind == "int" else "numbers"
        raise RequestError(
            f"'{name}' must be three {what} from {low:g} to {high:g}, got {_show(value)}", f"send e.g. {example}"
        )
    return tuple(int(v) if kind == "int" else float(v) for v in value)


FIELDS = (
    "mask",
    "output",
    "model_dir",
    "steps",
    "seed",
    "cfg_scale",
    "solver",
    "output_size",
    "spacing",
    "device",
    "precision",
    "preview",
    "label_output",
    "decode_window",
    "decode_overlap",
    "controlnet",
)


def check_params(params: Any) -> dict:
    """The generate fields of `params`, type- and range-checked, normalised (tuples, floats); missing
    optional fields are absent. Raises RequestError naming the first bad field and its fix."""
    if not isinstance(params, dict):
        raise RequestError("the generate parameters must be a JSON object", 'send {"mask": ..., "output": ...}')
    unknown = sorted(str(k) for k in params if k not in FIELDS)
    if unknown:
        raise RequestError(f"unknown generate option(s): {', '.join(unknown)}", f"use only {', '.join(FIELDS)}")
    out: dict = {}
    for name in ("mask", "output"):
        if name not in params:
            raise RequestError("a generate request needs 'mask' and 'output'", "give both paths")
        out[name] = _path(name, params[name], True)
    for name in ("model_dir", "preview", "label_output"):
        if name in params:
            out[name] = _path(name, params[name], False)
    value = params.get("steps")
    if value is not None:
        if not _is_int(value) or not 1 <= value <= 1000:
            raise RequestError(f"steps must be a whole number from 1 to 1000, got {_show(value)}", "pass e.g. --steps 30")
    if "steps" in params:
        out["steps"] = value
    if "seed" in params:
        value = params["seed"]
        if not _is_int(value) or not 0 <= value < 2**63:
            raise RequestError(f"seed must be a whole number >= 0, got {_show(value)}", "pass e.g. --seed 42")
        out["seed"] = value
    if "cfg_scale" in params and params["cfg_scale"] is not None:
        value = params["cfg_scale"]
        if not _is_number(value) or not 0 <= value <= 100:
            raise RequestError(
                f"cfg scale must be a number from 0 to 100, got {_show(value)}", "pass e.g. --cfg-scale 0 (off) or 2"
            )
        out["cfg_scale"] = float(value)
    elif "cfg_scale" in params:
        out["cfg_scale"] = None
    if "solver" in params:
        if params["solver"] not in SOLVER_NAMES or not isinstance(params["solver"], str):
            raise RequestError(f"unknown solver {_show(params['solver'])}", f"use one of {', '.join(SOLVER_NAMES)}")
        out["solver"] = params["solver"]
    if "output_size" in params:
        value = params["output_size"]
        if value is None or value == "auto":
            out["output_size"] = value
        else:
            out["output_size"] = _triple("output_size", value, "int", 1, MAX_GRID_SIZE, "[128, 128, 64] or \"auto\"")
    if "spacing" in params:
        value = params["spacing"]
        out["spacing"] = None if value is None else _triple("spacing", value, "float", 0.01, 100.0, "[1.5, 1.5, 2.0]")
        if out["spacing"] is not None and min(out["spacing"]) <= 0:
            raise RequestError(f"'spacing' must be positive, got {_show(value)}", "send e.g. [1.5, 1.5, 2.0]")
    if "device" in params:
        value = params["device"]
        if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|cuda(:\d{1,2})?", value):
            raise RequestError(f"unknown device {_show(value)}", "use auto, cpu, cuda or cuda:N")
        out["device"] = value
    if "precision" in params:
        if params["precision"] not in PRECISIONS or not isinstance(params["precision"], str):
            raise RequestError(f"unknown precision {_show(params['precision'])}", f"use one of {', '.join(PRECISIONS)}")
        out["precision"] = params["precision"]
    if "decode_window" in params:
        value = params["decode_window"]
        out["decode_window"] = (
            None if value is None else _triple("decode_window", value, "int", 1, MAX_DECODE_WINDOW, "[48, 48, 48]")
        )
    if "decode_overlap" in params:
        value = params["decode_overlap"]
        if value is not None and (not _is_number(value) or not 0 <= value < 1):
            raise RequestError(f"decode overlap must be a number in [0, 1), got {_show(value)}", "pass e.g. 0.25")
        out["decode_overlap"] = None if value is None else float(value)
    if "controlnet" in params:
        if not isinstance(params["controlnet"], bool):
            raise RequestError(f"'controlnet' must be true or false, got {_show(params['controlnet'])}", "send a JSON boolean")
        out["controlnet"] = params["controlnet"]
    return out
