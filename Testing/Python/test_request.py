"""One request vocabulary: every front door takes its fields, defaults, names and checks from request.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from MaisiSynthLib import request as R
from MaisiSynthLib.request import RequestError, check_field, check_options, check_params

VALID = {"mask": "m.nii.gz", "output": "ct.nii.gz"}


def test_every_field_has_a_default_and_a_check():
    assert set(R.DEFAULTS) == set(R.FIELDS) - set(R.REQUIRED)
    for name in R.FIELDS:
        assert name in R._CHECKS
        if name not in R.REQUIRED:  # the default itself passes the field's check
            assert check_field(name, R.DEFAULTS[name]) == R.DEFAULTS[name]


def test_the_pipeline_request_is_the_request_module_s_fields_and_defaults():
    from MaisiSynthLib.pipeline import GenerateRequest

    fields = {f.name: f.default for f in dataclasses.fields(GenerateRequest)}
    assert tuple(fields) == R.FIELDS
    assert {k: v for k, v in fields.items() if k not in R.REQUIRED} == R.DEFAULTS
    assert set(GenerateRequest(**VALID).params()) == set(R.FIELDS)


def test_solver_and_stage_names_are_the_engine_s():
    from MaisiSynthLib import gui_options, gui_progress
    from MaisiSynthLib.sampling import SOLVERS

    assert tuple(SOLVERS) == R.SOLVER_NAMES == gui_options.SOLVERS
    assert set(gui_progress._SPANS) == set(R.STAGES)


def test_the_command_line_flags_come_from_the_request():
    from MaisiSynthLib.cli import REQUEST_FLAGS, build_parser

    assert set(REQUEST_FLAGS) <= set(R.FIELDS)
    args = build_parser().parse_args(["generate", "--mask", "m.nii.gz", "--output", "ct.nii.gz"])
    for name in REQUEST_FLAGS:
        assert getattr(args, name) == R.DEFAULTS[name], name
    for command in (["evaluate", "--cases", "c"], ["batch", "--masks", "m", "--out", "o"]):
        args = build_parser().parse_args(command)
        assert args.solver == R.DEFAULTS["solver"] and args.device == R.DEFAULTS["device"]


@pytest.mark.parametrize(
    "name, good, bad",
    [
        ("steps", [1, 1000, None], [0, 1001, 2.5, True, "30"]),
        ("seed", [0, 2**63 - 1], [-1, 2**63, None, 1.0]),
        ("cfg_scale", [0, 0.5, 100, None], [-0.1, 100.1, "2", float("nan")]),
        ("mask_guidance", [1, 1.5, 10, None], [0, 0.99, 10.5, "2", True, float("inf")]),
        ("solver", list(R.SOLVER_NAMES), ["rk4", ["euler"], None]),
        ("device", ["auto", "cpu", "cuda", "cuda:1"], ["tpu", "cuda:x", None]),
        ("precision", list(R.PRECISIONS), ["fp64", None]),
        ("output_size", [[128, 128, 64], "auto", None], [[0, 1, 1], [1, 1], "big", [1.5, 2, 2]]),
        ("spacing", [[1, 1, 2.5], None], [[0, 1, 1], "333", [1, 1]]),
        ("decode_overlap", [0, 0.5, None], [1, -0.1]),
        ("controlnet", [True, False], ["no", None, 1]),
        ("modality", [*R.CT_MODALITIES, None], ["mri", "CT", 1]),
        (
            "edits",
            [["insert:hepatic:20"], ("remove:all", "swap:lung:hepatic"), None],
            ["insert:hepatic:20", ["insert:brain:20"], [7], ["x" * 101], ["remove:all"] * 17],
        ),
    ],
)
def test_ranges_and_types_are_checked_once_the_same_way(name, good, bad):
    for value in good:
        check_params({**VALID, name: value})
        assert R.field_problem(name, value) is None
    for value in bad:
        with pytest.raises(RequestError) as caught:
            check_params({**VALID, name: value})
        assert caught.value.kind == "bad-request" and caught.value.hint
        assert R.field_problem(name, value) == caught.value.message


def test_the_panel_refuses_what_the_request_refuses():
    from MaisiSynthLib.gui_options import GenerateOptions

    assert GenerateOptions().problems() == []
    default = " (or 'model default')"  # what the panel's spin boxes offer besides a value
    assert GenerateOptions(steps=1001).problems() == [R.field_problem("steps", 1001) + default]
    assert GenerateOptions(cfg_scale=100.5).problems() == [R.field_problem("cfg_scale", 100.5) + default]
    assert GenerateOptions(steps=30.0).problems() == []  # a spin box's float of a whole number


def test_options_of_many_requests_are_checked_before_the_first():
    assert check_options(steps=5, solver="heun") == {"steps": 5, "solver": "heun"}
    with pytest.raises(RequestError, match="steps"):
        check_options(steps=0)
    with pytest.raises(RequestError, match="stepz"):
        check_options(stepz=5)


def test_protocol_messages_keep_their_wire_format():
    assert R.job_request("generate", "r1", {"mask": "m"}) == {"type": "generate", "id": "r1", "params": {"mask": "m"}}
    assert R.cancel_request("c1", "r1") == {"type": "cancel", "id": "c1", "target": "r1"}
    assert R.ping_request("p") == {"type": "ping", "id": "p"}
    assert R.shutdown_request() == {"type": "shutdown"}
    assert R.ready_event(1, pid=7) == {"type": "ready", "protocol": 1, "pid": 7}
    assert R.progress_event("r1", {"stage": "sample", "i": 1}) == {
        "type": "progress",
        "id": "r1",
        "stage": "sample",
        "i": 1,
    }
    assert R.log_event(None, "info", "x") == {"type": "log", "id": None, "level": "info", "message": "x"}
    assert R.result_event("r1", {"seed": 0}, models="loaded") == {
        "type": "result",
        "id": "r1",
        "seed": 0,
        "models": "loaded",
    }
    assert R.error_event("r1", **RequestError("m", "h").to_dict()) == {
        "type": "error",
        "id": "r1",
        "kind": "bad-request",
        "message": "m",
        "hint": "h",
    }
    assert R.pong_event("p", None, 0) == {"type": "pong", "id": "p", "busy": None, "queued": 0}
    assert R.bye_event() == {"type": "bye"}
    assert {R.ready_event(1)["type"], R.bye_event()["type"]} <= set(R.EVENT_TYPES)


def test_modality_reaches_the_conditioning(tiny_model):
    """A request option end to end: field and check here, the pipeline's conditioning, the CLI flag."""
    from conftest import torso_labels

    from MaisiSynthLib.cli import build_parser
    from MaisiSynthLib.labels import modality_id
    from MaisiSynthLib.masks import Mask
    from MaisiSynthLib.pipeline import generate_volume

    assert [modality_id(name) for name in R.CT_MODALITIES] == [1, 2, 3]
    args = build_parser().parse_args(["generate", "--mask", "m", "--output", "o", "--modality", "ct_contrast"])
    assert args.modality == "ct_contrast"
    mask = Mask(torso_labels(32), np.diag([6.0, 6.0, 6.0, 1.0]))
    options = {"model_dir": str(tiny_model), "steps": 2, "device": "cpu"}
    default = generate_volume(mask, options).hu
    assert np.array_equal(generate_volume(mask, {**options, "modality": "ct"}).hu, default)  # the model's is ct
    assert not np.array_equal(generate_volume(mask, {**options, "modality": "ct_contrast"}).hu, default)


def test_the_fields_of_an_edit_need_the_reference_ct_and_its_grid():
    edit = {**VALID, "reference_ct": "ct.nii.gz"}
    check_params({**edit, "original_mask": "m0.nii.gz", "edit_margin_mm": 5})
    for margin in (-1, 101, "10", True):
        with pytest.raises(RequestError, match="edit margin"):
            check_params({**edit, "edit_margin_mm": margin})
    for fields, words in (
        ({**VALID, "original_mask": "m0.nii.gz"}, "only to an edit"),
        ({**VALID, "edit_region": "r.nii.gz"}, "only to an edit"),
        ({**edit, "original_mask": "m0.nii.gz", "edit_region": "r.nii.gz"}, "not both"),
        ({**edit, "output_size": [64, 64, 64]}, "own grid"),
    ):
        with pytest.raises(RequestError, match=words):
            check_params(fields)
