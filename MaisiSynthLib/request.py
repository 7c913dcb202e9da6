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

This is also where the vocabulary lives that every front door shares: the names of solvers, stages,
precisions and output files, each field's default, and the worker protocol's messages and events
(small constructors, so no caller spells a protocol dict by hand). Adding a request option means
adding it here (FIELDS, DEFAULTS, a checker in `_CHECKS`), where it is used, and to its test.
Python 3.9 compatible (`from __future__ import annotations`): the Slicer module imports it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

from .errors import MaisiSynthError

SOLVER_NAMES = ("euler", "heun")  # sampling.SOLVERS implements them, in this order
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")  # what a menu offers; a request also takes cuda:N
# progress events of a generation, in order; an edit of a reference CT adds encode-ct and composite
STAGES = ("load", "encode-mask", "encode-ct", "sample", "decode", "composite", "write")
OUTPUT_FIELDS = ("output", "preview", "label_output")  # the files a generation writes
INPUT_FIELDS = ("mask", "reference_ct", "original_mask", "edit_region")  # the files it reads
# the fields of an edit of the user's own CT: meaningful only with reference_ct
EDIT_FIELDS = ("reference_ct", "original_mask", "edit_region", "edit_margin_mm")
EDIT_MARGIN_RANGE = (0.0, 100.0)  # mm
MAX_EDIT_RULES = 16
MAX_RULE_CHARS = 100
STEPS_RANGE = (1, 1000)
CFG_RANGE = (0.0, 100.0)
# mask guidance scale: 1 = off (the ControlNet-conditioned velocity as it is), > 1 amplifies what the mask adds
MASK_GUIDANCE_RANGE = (1.0, 10.0)
SEED_LIMIT = 2**63  # seeds are 0 <= seed < 2**63 (numpy and torch generators take them)
OFFICIAL_STEPS = 30  # the official inference config's num_inference_steps
# CT modality classes of MAISI-v2's modality conditioning (data/modality_mapping.json: 1, 2, 3)
CT_MODALITIES = ("ct", "ct_wo_contrast", "ct_contrast")
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
        raise RequestError(
            f"'{name}' must be a file path (a non-empty string), got {_show(value)}", f"send '{name}' as a string"
        )
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
    "mask_guidance",
    "latent_prior_from",
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
    "modality",
    "reference_ct",
    "original_mask",
    "edit_region",
    "edit_margin_mm",
    "edits",
)
REQUIRED = ("mask", "output")
# The value a field has when a request leaves it out; None: the model's own default (steps, CFG scale,
# decode window and overlap come from the model folder's inference config) or no such output.
DEFAULTS: dict = {
    "model_dir": None,
    "steps": None,
    "seed": 0,
    "cfg_scale": None,
    "mask_guidance": None,  # the model's (its inference config's "mask_guidance_scale", 1 = off)
    "latent_prior_from": None,  # the model's (its inference config's "latent_prior_from", 1 = off)
    "solver": "euler",
    "output_size": None,
    "spacing": None,
    "device": "auto",
    "precision": "auto",
    "preview": None,
    "label_output": None,
    "decode_window": None,
    "decode_overlap": None,
    # False: the diffusion UNet alone, without ControlNet residuals (engine checks, UNet-only models)
    "controlnet": True,
    "modality": None,  # the model's (its inference config's "modality", 1 = ct)
    # an edit of the user's own CT: the scan kept outside the edit region (None: a new CT)
    "reference_ct": None,
    "original_mask": None,  # the mask before the edit: the region is then what changed
    "edit_region": None,  # or the region itself (nonzero voxels)
    "edit_margin_mm": None,  # how far the changed (or tumor) voxels are widened (None: editing.edit_region's rule)
    "edits": None,  # edit rules applied to the mask first (lesions.parse_rule), e.g. ["insert:hepatic:20"]
}


def _check_steps(value: Any) -> int:
    low, high = STEPS_RANGE
    if not _is_int(value) or not low <= value <= high:
        raise RequestError(
            f"steps must be a whole number from {low} to {high}, got {_show(value)}", "pass e.g. --steps 30"
        )
    return value


def _check_seed(value: Any) -> int:
    if not _is_int(value) or not 0 <= value < SEED_LIMIT:
        raise RequestError(f"seed must be a whole number >= 0, got {_show(value)}", "pass e.g. --seed 42")
    return value


def _scale_in(value: Any, what: str, bounds: tuple[float, float], hint: str) -> float:
    low, high = bounds
    if not _is_number(value) or not low <= value <= high:
        raise RequestError(f"{what} must be a number from {low:g} to {high:g}, got {_show(value)}", hint)
    return float(value)


def _check_cfg_scale(value: Any) -> float:
    return _scale_in(value, "CFG scale", CFG_RANGE, "pass e.g. --cfg-scale 0 (off) or 2")


def _check_mask_guidance(value: Any) -> float:
    return _scale_in(value, "mask guidance", MASK_GUIDANCE_RANGE, "pass e.g. --mask-guidance 1 (off) or 1.5")


def _check_latent_prior_from(value: Any) -> float:
    if not _is_number(value) or not 0 < value <= 1:
        raise RequestError(
            f"latent_prior_from must be a number above 0 and at most 1, got {_show(value)}",
            "pass e.g. --latent-prior-from 0.6, or 1 (off)",
        )
    return float(value)


def _check_choice(value: Any, what: str, names: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in names:
        raise RequestError(f"unknown {what} {_show(value)}", f"use one of {', '.join(names)}")
    return value


def _check_solver(value: Any) -> str:
    return _check_choice(value, "solver", SOLVER_NAMES)


def _check_output_size(value: Any) -> tuple | str:
    if value == "auto":
        return value
    return _triple("output_size", value, "int", 1, MAX_GRID_SIZE, '[128, 128, 64] or "auto"')


def _check_spacing(value: Any) -> tuple:
    spacing = _triple("spacing", value, "float", 0.01, 100.0, "[1.5, 1.5, 2.0]")
    if min(spacing) <= 0:
        raise RequestError(f"'spacing' must be positive, got {_show(value)}", "send e.g. [1.5, 1.5, 2.0]")
    return spacing


def _check_device(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|cuda(:\d{1,2})?", value):
        raise RequestError(f"unknown device {_show(value)}", "use auto, cpu, cuda or cuda:N")
    return value


def _check_precision(value: Any) -> str:
    return _check_choice(value, "precision", PRECISIONS)


def _check_decode_window(value: Any) -> tuple:
    return _triple("decode_window", value, "int", 1, MAX_DECODE_WINDOW, "[48, 48, 48]")


def _check_decode_overlap(value: Any) -> float:
    if not _is_number(value) or not 0 <= value < 1:
        raise RequestError(f"decode overlap must be a number in [0, 1), got {_show(value)}", "pass e.g. 0.25")
    return float(value)


def _check_controlnet(value: Any) -> bool:
    if not isinstance(value, bool):
        raise RequestError(f"'controlnet' must be true or false, got {_show(value)}", "send a JSON boolean")
    return value


def _check_modality(value: Any) -> str:
    return _check_choice(value, "modality", CT_MODALITIES)


def _check_edit_margin(value: Any) -> float:
    return _scale_in(value, "edit margin (mm)", EDIT_MARGIN_RANGE, "pass e.g. --edit-margin-mm 10")


def _check_edits(value: Any) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) > MAX_EDIT_RULES:
        raise RequestError(
            f"'edits' must be a list of at most {MAX_EDIT_RULES} edit rules, got {_show(value)}",
            'send e.g. ["insert:hepatic:20"]',
        )
    for rule in value:
        if not isinstance(rule, str) or not 0 < len(rule) <= MAX_RULE_CHARS:
            raise RequestError(
                f"an edit rule must be a string of 1 to {MAX_RULE_CHARS} characters, got {_show(rule)}",
                "e.g. insert:hepatic:20, swap:lung:hepatic or remove:all",
            )
    from .lesions import parse_rule  # the rules' grammar has one home; numpy + scipy only

    for rule in value:
        try:
            parse_rule(rule)
        except MaisiSynthError as exc:
            raise RequestError(exc.message, exc.hint) from None
    return tuple(value)


# Field → checker of a present, non-null value (None means "the default" for every optional field).
_CHECKS = {
    "mask": lambda value: _path("mask", value, True),
    "output": lambda value: _path("output", value, True),
    "model_dir": lambda value: _path("model_dir", value, False),
    "preview": lambda value: _path("preview", value, False),
    "label_output": lambda value: _path("label_output", value, False),
    "steps": _check_steps,
    "seed": _check_seed,
    "cfg_scale": _check_cfg_scale,
    "mask_guidance": _check_mask_guidance,
    "latent_prior_from": _check_latent_prior_from,
    "solver": _check_solver,
    "output_size": _check_output_size,
    "spacing": _check_spacing,
    "device": _check_device,
    "precision": _check_precision,
    "decode_window": _check_decode_window,
    "decode_overlap": _check_decode_overlap,
    "controlnet": _check_controlnet,
    "modality": _check_modality,
    "reference_ct": lambda value: _path("reference_ct", value, False),
    "original_mask": lambda value: _path("original_mask", value, False),
    "edit_region": lambda value: _path("edit_region", value, False),
    "edit_margin_mm": _check_edit_margin,
    "edits": _check_edits,
}
# None is a value only where it means "the default"; a required path or a flag cannot be null, and
# seed, solver, device and precision have fixed defaults that a null would only hide.
_NULLABLE = ("model_dir", "preview", "label_output", "steps", "cfg_scale", "mask_guidance", "output_size", "spacing")
_NULLABLE += ("decode_window", "decode_overlap", "modality", "latent_prior_from")
_NULLABLE += ("reference_ct", "original_mask", "edit_region", "edit_margin_mm", "edits")


def check_field(name: str, value: Any) -> Any:
    """One field's value, type- and range-checked and normalised; raises RequestError naming the fix."""
    if value is None and name in _NULLABLE:
        return None
    return _CHECKS[name](value)


def field_problem(name: str, value: Any) -> str | None:
    """What is wrong with one field's value, in one line, or None: for forms that list every problem."""
    try:
        check_field(name, value)
    except RequestError as exc:
        return exc.message
    return None


def check_options(**fields: Any) -> dict:
    """Some of a request's fields, checked as `check_params` checks them, without the paths of one
    generation: for the front doors that make many requests (batch, evaluation), before the first."""
    unknown = sorted(name for name in fields if name not in FIELDS)
    if unknown:
        raise RequestError(f"unknown generate option(s): {', '.join(unknown)}", f"use only {', '.join(FIELDS)}")
    checked = {name: check_field(name, value) for name, value in fields.items()}
    check_edit_fields(checked)
    return checked


def check_params(params: Any) -> dict:
    """The generate fields of `params`, type- and range-checked, normalised (tuples, floats); missing
    optional fields are absent. Raises RequestError naming the first bad field and its fix."""
    if not isinstance(params, dict):
        raise RequestError("the generate parameters must be a JSON object", 'send {"mask": ..., "output": ...}')
    unknown = sorted(str(k) for k in params if k not in FIELDS)
    if unknown:
        raise RequestError(f"unknown generate option(s): {', '.join(unknown)}", f"use only {', '.join(FIELDS)}")
    if any(name not in params for name in REQUIRED):
        raise RequestError("a generate request needs 'mask' and 'output'", "give both paths")
    checked = {name: check_field(name, params[name]) for name in FIELDS if name in params}
    check_edit_fields(checked)
    return checked


def check_edit_fields(fields: dict) -> None:
    """The fields of an edit go together: each needs the reference CT, and the region is either
    what changed against the original mask or given, not both."""
    if fields.get("reference_ct") is None:
        given = [name for name in EDIT_FIELDS[1:] if fields.get(name) is not None]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise RequestError(
                f"{given[0]} applies only to an edit of a reference CT", f"pass --reference-ct too, or leave out {flag}"
            )
    elif fields.get("original_mask") is not None and fields.get("edit_region") is not None:
        raise RequestError(
            "give either the original mask (the region is then what changed) or the edit region, not both",
            "leave out --original-mask or --edit-region",
        )
    if any(fields.get(name) is not None for name in ("output_size", "spacing")) and fields.get("reference_ct"):
        raise RequestError("an edit is written on the reference CT's own grid", "leave out --output-size and --spacing")


# ---------------------------------------------------------------------------------------------------
# The worker protocol: requests a client sends, events the worker (or a client on its behalf) emits.
# The wire format is plain JSON objects with a "type"; these constructors are the only place that
# spells them, so the worker, the server and both clients cannot drift apart.

REQUEST_TYPES = ("generate", "download", "cancel", "ping", "shutdown")
EVENT_TYPES = ("ready", "progress", "log", "result", "error", "pong", "bye")
TERMINAL_EVENTS = ("result", "error")  # a request's last event


def job_request(kind: str, request_id: str, params: dict) -> dict:
    """A generate or download request."""
    return {"type": kind, "id": request_id, "params": params}


def cancel_request(request_id: str, target: str) -> dict:
    return {"type": "cancel", "id": request_id, "target": target}


def ping_request(request_id: str) -> dict:
    return {"type": "ping", "id": request_id}


def shutdown_request() -> dict:
    return {"type": "shutdown"}


def ready_event(protocol: int, **info: Any) -> dict:
    """Once at start: the protocol version, then what the machine is (pid, device, versions)."""
    return {"type": "ready", "protocol": protocol, **info}


def progress_event(request_id: str | None, info: dict) -> dict:
    """A stage report of the pipeline or the downloader ({"stage", "elapsed", ...})."""
    return {"type": "progress", "id": request_id, **info}


def log_event(request_id: str | None, level: str, message: str) -> dict:
    return {"type": "log", "id": request_id, "level": level, "message": message}


def result_event(request_id: str | None, fields: dict, **extra: Any) -> dict:
    return {"type": "result", "id": request_id, **fields, **extra}


def error_event(request_id: str | None, kind: str, message: str, hint: str = "", **extra: Any) -> dict:
    """A request's (or, with id None, the connection's) failure: kind, one-line message, fix; `extra`
    adds what the transport knows (a remote client adds the HTTP status)."""
    return {"type": "error", "id": request_id, "kind": kind, "message": message, "hint": hint, **extra}


def pong_event(request_id: str | None, busy: str | None, queued: int) -> dict:
    return {"type": "pong", "id": request_id, "busy": busy, "queued": queued}


def bye_event() -> dict:
    return {"type": "bye"}


def exit_event(returncode: int | None, stderr_tail: list) -> dict:
    """Not sent by the worker: what a client reports once the worker process has exited."""
    return {"type": "exit", "id": None, "returncode": returncode, "stderr_tail": stderr_tail}
