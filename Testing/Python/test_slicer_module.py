"""Static checks of the Slicer module (no Slicer app here) and its Qt-free helpers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from MaisiSynthLib.gui_options import EDIT_MODES, GRID_PRESETS, MENUS, GenerateOptions, error_text
from MaisiSynthLib.gui_progress import describe

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "MaisiSynth" / "MaisiSynth.py"
UI = REPO / "MaisiSynth" / "Resources" / "UI" / "MaisiSynth.ui"
CMAKE = REPO / "MaisiSynth" / "CMakeLists.txt"


def test_every_widget_the_module_uses_is_in_the_ui_file():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE.read_text()))
    declared = {w.get("name") for w in ET.parse(UI).iter("widget")}
    assert used, "the module uses no widgets?"
    assert used <= declared, f"missing in the .ui: {sorted(used - declared)}"
    # the menus the module fills by name (gui_options.MENUS) are combo boxes of the .ui
    combos = {w.get("name") for w in ET.parse(UI).iter("widget") if w.get("class") == "QComboBox"}
    assert set(MENUS) <= combos and all(MENUS.values())


def _listed_files() -> set[str]:
    """Every path the module's CMakeLists lists, relative to the repository root."""
    text = CMAKE.read_text()
    listed = set()
    for block in re.findall(r"set\((\w+)\s+(.*?)\)", text, flags=re.S):
        name, body = block
        for token in body.split():
            token = token.replace("${MODULE_NAME}", "MaisiSynth")
            if token.startswith("#"):
                continue
            if name.startswith("MAISISYNTHLIB"):
                listed.add(token)
            elif name.startswith("MODULE_PYTHON"):
                listed.add(f"MaisiSynth/{token}")
    return listed


def test_cmake_lists_exactly_the_files_of_the_module_and_engine():
    listed = _listed_files()
    missing = sorted(p for p in listed if not (REPO / p).is_file())
    assert not missing, f"listed in MaisiSynth/CMakeLists.txt but absent: {missing}"
    expected = {
        p.relative_to(REPO).as_posix() for p in (REPO / "MaisiSynthLib").rglob("*.py") if "__pycache__" not in p.parts
    }
    expected |= {p.relative_to(REPO).as_posix() for p in (REPO / "MaisiSynthLib" / "data").glob("*.json")}
    expected |= {p.relative_to(REPO).as_posix() for p in (REPO / "MaisiSynth").glob("*.py")}
    expected |= {p.relative_to(REPO).as_posix() for p in (REPO / "MaisiSynth" / "Resources").rglob("*") if p.is_file()}
    demo = REPO / "Resources" / "models" / "demo"
    expected |= {p.relative_to(REPO).as_posix() for p in demo.glob("*.pt")}
    expected |= {f"Resources/models/demo/{n}" for n in ("config_network_rflow.json", "maisi_synth.json")}
    expected |= {p.relative_to(REPO).as_posix() for p in (REPO / "Resources" / "examples").glob("*.nii.gz")}
    assert not sorted(expected - listed), f"not listed in MaisiSynth/CMakeLists.txt: {sorted(expected - listed)}"


def test_top_level_cmake_and_s4ext_describe_the_extension():
    top = (REPO / "CMakeLists.txt").read_text()
    for needed in (
        "find_package(Slicer REQUIRED)",
        "add_subdirectory(MaisiSynth)",
        "Slicer_EXTENSION_GENERATE_CONFIG",
        "Slicer_EXTENSION_CPACK",
        "EXTENSION_ICONURL",
    ):
        assert needed in top
    s4ext = dict(
        line.split(" ", 1)
        for line in (REPO / "extension.s4ext").read_text().splitlines()
        if line and not line.startswith("#") and " " in line
    )
    assert s4ext["category"] == "Segmentation" and s4ext["scm"] == "git" and s4ext["iconurl"].endswith("MaisiSynth.png")
    # the extension brings the PyTorch extension (its installer picks the CUDA build); the self-test runs in CTest
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in top and s4ext["depends"] == "PyTorch"
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in CMAKE.read_text()


STUBS = textwrap.dedent("""
    import sys, types

    class Blocker:  # torch and MONAI must not be needed to load the module
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "monai", "nibabel"):
                raise ImportError(f"{name} is blocked for this check")

    sys.meta_path.insert(0, Blocker())
    # Slicer's Qt-side modules do not exist outside the app: stubs, for this import check only
    slicer = types.ModuleType("slicer")
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                 "ScriptedLoadableModuleTest"):
        setattr(slm, name, type(name, (), {"__init__": lambda self, *a, **k: None}))
    util = types.ModuleType("slicer.util")
    util.VTKObservationMixin = type("VTKObservationMixin", (), {"__init__": lambda self: None})
    slicer.ScriptedLoadableModule, slicer.util = slm, util
    sys.modules.update({"slicer": slicer, "slicer.ScriptedLoadableModule": slm, "slicer.util": util,
                        "qt": types.ModuleType("qt"), "vtk": types.ModuleType("vtk"), "ctk": types.ModuleType("ctk")})

    import importlib.util
    spec = importlib.util.spec_from_file_location("MaisiSynth", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parent = types.SimpleNamespace()
    module.MaisiSynth(parent)
    assert parent.title == "MaisiSynth" and parent.categories == ["Segmentation"]
    for cls in ("MaisiSynthWidget", "MaisiSynthLogic", "MaisiSynthTest"):
        assert hasattr(module, cls), cls
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "monai", "scipy", "nibabel"))
    print("heavy:", heavy)
    """)


def test_the_module_file_imports_without_torch(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(STUBS)
    result = subprocess.run([sys.executable, str(script), str(MODULE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "heavy: []" in result.stdout  # nothing heavy at load time


def test_the_module_file_stays_thin():
    source = MODULE.read_text()
    # a budget, not a law: widget wiring + glue; the 1,900-line module files of other extensions are
    # what this keeps us from
    assert len(source.splitlines()) < 600
    # numbers and label work belong to MaisiSynthLib
    assert "import numpy" not in source.split("class MaisiSynthTest")[0]
    assert "import torch" not in source


def test_generate_options_are_checked_before_running(tmp_path):
    assert GenerateOptions().problems() == []
    bad = GenerateOptions(steps=0, seed=-1, cfg_scale=-1, solver="rk4", device="tpu", model_dir=str(tmp_path / "nope"))
    text = " | ".join(bad.problems())
    for word in ("steps", "seed", "CFG", "solver", "device", "model folder not found"):
        assert word in text
    assert any("token" in p for p in GenerateOptions(server_url="http://gpu-box:8765").problems())
    assert GenerateOptions(server_url="http://127.0.0.1:8765").problems() == []
    assert any("http(s)" in p for p in GenerateOptions(server_url="gpu-box").problems())
    assert any("Python executable" in p for p in GenerateOptions(python=str(tmp_path / "python9")).problems())


def test_generate_options_become_worker_params():
    local = GenerateOptions(grid_preset=4, steps=12, seed=3, solver="heun", device="cpu", model_dir="/m")
    params = local.worker_params("in.nrrd", "out.nrrd")
    assert params == {
        "mask": "in.nrrd",
        "output": "out.nrrd",
        "steps": 12,
        "seed": 3,
        "solver": "heun",
        "output_size": [128, 128, 64],
        "spacing": [3.0, 3.0, 5.0],
        "device": "cpu",
        "model_dir": "/m",
    }
    assert local.worker_env() == {"CUDA_VISIBLE_DEVICES": "-1"}
    remote = GenerateOptions(grid_preset=1, server_url="http://127.0.0.1:1", model_dir="/m", device="cuda")
    params = remote.worker_params("in.nrrd", "out.nrrd")
    assert params["output_size"] == "auto" and "model_dir" not in params and "device" not in params
    assert GRID_PRESETS[0][1] is None and "output_size" not in GenerateOptions().worker_params("a", "b")


def test_sampling_controls_leave_the_model_defaults_unless_set():
    """Mask guidance and the latent prior: 'model default' sends nothing (the model folder's
    maisi_synth.json decides, as on the command line); a set value goes to the worker as the request
    field, and what the request would refuse is listed before anything runs."""
    from MaisiSynthLib.request import check_params

    default = GenerateOptions().worker_params("in.nrrd", "out.nrrd")
    for name in ("steps", "cfg_scale", "mask_guidance", "latent_prior_from"):
        assert name not in default
    assert MENUS["latentPriorComboBox"][0] == GenerateOptions().latent_prior == "model default"
    chosen = GenerateOptions(mask_guidance=2.0, latent_prior="off")
    assert chosen.problems() == []
    params = chosen.worker_params("in.nrrd", "out.nrrd")
    assert params["mask_guidance"] == 2.0 and params["latent_prior_from"] == 1.0
    checked = check_params(params)  # what the worker and the server do with them
    assert checked["mask_guidance"] == 2.0 and checked["latent_prior_from"] == 1.0
    remote = GenerateOptions(mask_guidance=1.0, server_url="http://127.0.0.1:1").worker_params("a", "b")
    assert remote["mask_guidance"] == 1.0  # a remote server samples as asked too
    problems = GenerateOptions(mask_guidance=0.5, latent_prior="sometimes").problems()
    assert len(problems) == 2
    assert "mask guidance" in problems[0] and "model default" in problems[0]
    assert "latent prior must be one of model default, off" in problems[1]


def test_revisiting_the_module_adds_no_observer_and_nothing_probes_on_the_gui_thread():
    """enter() runs on every visit: an observer added there is added again ("already has observer");
    it refreshes the editor's effects instead (extensions may register theirs after setup). The worker
    Python is probed only through BackgroundProbe, read by the timer's onPoll."""
    import ast

    source = (REPO / "MaisiSynth" / "MaisiSynth.py").read_text(encoding="utf-8")
    widget = next(
        n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == "MaisiSynthWidget"
    )
    methods = {f.name: ast.unparse(f) for f in widget.body if isinstance(f, ast.FunctionDef)}
    assert "addObserver" not in methods["enter"] and "updateEffectList()" in methods["enter"]
    assert "addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent" in methods["setup"]
    assert "connect('timeout()', self.onPoll)" in methods["setup"] and "self.probe.report" in methods["onPoll"]
    # a canvas set as source volume must not replace what the views show (a synthetic CT, say)
    assert "setAutoShowSourceVolumeNode(node is not None)" in methods["onReferenceChanged"]
    assert all(".probe(" not in m for m in methods.values())  # the self-test may wait; the widget never
    assert "BackgroundProbe(" in methods["onCheckDependencies"]


def test_a_scene_close_keeps_the_worker_and_a_download_and_a_queued_generate_says_why_it_waits():
    """Closing the scene cancels its jobs but neither stops the worker (its models stay loaded) nor
    aborts a weights download; a Generate pressed during a download says it waits for it."""
    import ast

    from MaisiSynthLib.gui_progress import queued_status

    tree = ast.parse((REPO / "MaisiSynth" / "MaisiSynth.py").read_text(encoding="utf-8"))
    close = ast.unparse(next(n for n in ast.walk(tree) if getattr(n, "name", "") == "onSceneStartClose"))
    assert "shutdown" not in close and "downloadId" not in close and "jobs.clear(cancel=" in close
    assert "download" in queued_status(False, "req-1") and "Cancel download" in queued_status(True, "req-1")
    assert queued_status(True, None) == "Starting the worker…" and queued_status(False, None) == "Queued…"


def test_the_self_test_has_a_deadline_stops_its_worker_and_skips_without_torch():
    """CTest runs MaisiSynthTest in the build's Slicer: it must not spin for ever, must stop the
    worker when it fails, and skips (saying why) when the worker Python lacks torch or MONAI."""
    import ast

    tree = ast.parse((REPO / "MaisiSynth" / "MaisiSynth.py").read_text(encoding="utf-8"))
    test = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "test_generate_from_example")
    body = ast.unparse(test)
    assert "deadline" in body and "assertLess(time.monotonic(), deadline" in body
    tries = [n for n in ast.walk(test) if isinstance(n, ast.Try)]
    assert tries and any("logic.shutdown()" in ast.unparse(s) for s in tries[0].finalbody)
    assert "Skipped: the worker Python" in body and "'torch', 'monai'" in body


def test_a_job_leaves_no_temporary_folder_or_record_however_it_ends(tmp_path):
    """Each Generate writes the patient's mask (and for an edit the CT) into a folder of its own: a
    failed or cancelled job removes it at once, a result once loaded (even if loading fails), and
    closing the scene removes what is still in flight. The module loads a result inside a
    _UserAction, so a failed load shows its dialog and the status does not say "Done"."""
    import ast

    from MaisiSynthLib.jobs import Job, JobRecords

    jobs = JobRecords()
    folders = {}
    for rid in ("failed", "cancelled", "done", "running"):
        folders[rid] = tmp_path / rid
        folders[rid].mkdir()
        (folders[rid] / "mask.nii.gz").write_bytes(b"mask")
        jobs.add(rid, Job("CT", None, 0, None, folders[rid]))
    assert jobs.end({"type": "error", "id": "failed", "kind": "worker-died"}).input_name == "CT"
    assert jobs.end({"type": "error", "id": "cancelled", "kind": "cancelled"}) is not None
    assert not folders["failed"].exists() and not folders["cancelled"].exists()
    done = jobs.end({"type": "result", "id": "done"})
    assert done.folder.exists()  # the result is loaded from it first
    jobs.discard(done)
    assert not folders["done"].exists() and len(jobs) == 1
    assert jobs.end({"type": "error", "id": "done"}) is None  # a late duplicate: nothing happens
    cancelled = []
    jobs.clear(cancel=cancelled.append)  # a scene close: its jobs are cancelled, the worker goes on
    assert cancelled == ["running"] and not folders["running"].exists() and len(jobs) == 0

    source = (REPO / "MaisiSynth" / "MaisiSynth.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    widget = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "MaisiSynthWidget")
    on_event = ast.unparse(next(f for f in widget.body if getattr(f, "name", "") == "onEvent"))
    assert "jobs.end(event)" in on_event and "with _UserAction('Cannot load the result.')" in on_event
    logic = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "MaisiSynthLogic")
    methods = {f.name: ast.unparse(f) for f in logic.body if isinstance(f, ast.FunctionDef)}
    assert "self.jobs.discard(job)" in methods["loadResult"] and "self.jobs.clear()" in methods["shutdown"]
    assert "shutil.rmtree(folder" in methods["generate"]  # a request that fails to start leaves nothing


def test_research_settings_sit_in_a_collapsed_advanced_section():
    """The main panel holds what a radiologist needs; the sampler's research settings are one click
    away, collapsed, and still read by the module (their names are unchanged)."""
    root = ET.parse(REPO / "MaisiSynth" / "Resources" / "UI" / "MaisiSynth.ui").getroot()
    advanced = root.find(".//widget[@name='advancedCollapsibleButton']")
    assert advanced is not None and advanced.get("class") == "ctkCollapsibleButton"
    props = {p.get("name"): p[0].text for p in advanced.findall("property")}
    assert props["collapsed"] == "true"
    inside = {w.get("name") for w in advanced.iter("widget")}
    assert {"cfgSpinBox", "solverComboBox", "maskGuidanceSpinBox", "latentPriorComboBox"} <= inside
    assert not {"stepsSpinBox", "seedSpinBox", "gridPresetComboBox", "generateButton"} & inside


def test_one_step_up_from_model_default_is_a_value_generate_takes():
    """Steps, CFG and mask guidance start at 'model default' (Qt shows the special text at the spin
    box's minimum, which sends nothing); every value a spin box steps to from there is one the
    request takes (mask guidance used to step 0 → 0.5, which Generate refused)."""
    from MaisiSynthLib.gui_options import MODEL_DEFAULT_SPINS, from_spin_box

    root = ET.parse(REPO / "MaisiSynth" / "Resources" / "UI" / "MaisiSynth.ui").getroot()
    for name, (option, model_default) in MODEL_DEFAULT_SPINS.items():
        box = root.find(f".//widget[@name='{name}']")
        props = {p.get("name"): p[0].text for p in box.findall("property")}
        assert props["specialValueText"] == "model default"
        low, high, start = (float(props[k]) for k in ("minimum", "maximum", "value"))
        step = float(props.get("singleStep", 1))
        assert low == start == model_default and from_spin_box(name, start) is None
        value = low + step
        while value <= high:
            options = GenerateOptions(**{option: from_spin_box(name, value)})
            assert options.problems() == [], (name, value, options.problems())
            assert options.worker_params("a", "b")[option] == value
            value += step * 7  # a sample of the range, the first step up included


@pytest.mark.parametrize(
    "event, percent, words",
    [
        ({"stage": "load", "elapsed": 0.2}, 0, "Loading models · 0 s"),
        ({"stage": "sample", "i": 15, "total": 30, "elapsed": 12.4}, 48, "Sampling step 15 of 30 · 12 s"),
        ({"stage": "sample", "i": 30, "total": 30}, 85, "Sampling step 30 of 30"),
        ({"stage": "decode", "window": 3}, 85, "Decoding (window 3)"),
        ({"stage": "write"}, 97, "Writing"),
    ],
)
def test_progress_events_map_to_a_bar(event, percent, words):
    assert describe(event) == (percent, words)


def test_error_dialogs_speak_of_the_module_controls():
    geometry = {
        "type": "error",
        "kind": "bad-geometry",
        "message": "output size 100x100x50 is not allowed",
        "hint": "pass --output-size 96 96 48 (or --output-size auto)",
    }
    text = error_text(geometry)
    assert text.startswith("output size 100x100x50 is not allowed") and "Nearest allowed size (auto)" in text
    assert "--output-size" not in text
    mask = {"type": "error", "kind": "bad-mask", "message": "label 250 is not a MAISI id", "hint": "relabel it"}
    assert error_text(mask) == "label 250 is not a MAISI id\n\nFix: relabel it"


def test_the_module_follows_slicers_rules_for_editors_dialogs_and_paths():
    """What can be checked without the app (the Qt side runs only in Slicer, see the self-test)."""
    source = MODULE.read_text()
    # its own Segment Editor parameter node, an effect deactivated on leaving the module
    assert 'GetSingletonNode("MaisiSynth", "vtkMRMLSegmentEditorNode")' in source
    assert "def enter(self)" in source and "def exit(self)" in source and "setActiveEffect(None)" in source
    # a handled error is shown once and not re-raised (tryWithErrorDisplay re-raises)
    assert "tryWithErrorDisplay" not in source
    # the lesion goes to the crosshair; the worker of a foreign Python gets Slicer's startup environment
    assert "GetCursorPositionRAS" not in source and "startupEnvironment" in source
    # the model folder picker picks folders
    for widget in ET.parse(UI).iter("widget"):
        if widget.get("name") == "modelDirPathLineEdit":
            filters = [p.findtext("set") for p in widget.iter("property") if p.get("name") == "filters"]
            assert filters == ["ctkPathLineEdit::Dirs"]
    # nothing in Slicer's process reads volumes with nibabel
    assert "read_volume" not in source and "import nibabel" not in source


def test_worker_python_paths_may_start_with_a_tilde():
    from MaisiSynthLib.client import WorkerClient

    assert WorkerClient(python="~/envs/maisi/bin/python").python == os.path.expanduser("~/envs/maisi/bin/python")


def test_the_official_weights_controls_keep_the_token_secret():
    source = MODULE.read_text()
    widgets = {w.get("name"): w for w in ET.parse(UI).iter("widget")}
    for name in ("downloadButton", "hfTokenLineEdit", "downloadProgressBar", "downloadStatusLabel"):
        assert name in widgets and f"self.ui.{name}" in source, name
    echo = [p.findtext("enum") for p in widgets["hfTokenLineEdit"].iter("property") if p.get("name") == "echoMode"]
    assert echo == ["QLineEdit::Password"]
    # the token is read where the download starts and nowhere else: never saved in the settings
    assert source.count("hfTokenLineEdit") == 1 and "setValue" not in source.split("hfTokenLineEdit")[1].split("\n")[0]


def test_a_download_goes_to_the_local_worker_with_only_the_token_it_was_given():
    remote = GenerateOptions(server_url="http://127.0.0.1:8765", token="server-token", python="py", device="cpu")
    local, params = remote.download_request("  hf_abc  ")
    assert params == {"token": "hf_abc"} and local.server_url == "" and local.token == ""
    assert remote.download_request("")[1] == {}  # empty: the worker's HF_TOKEN or hub login
    key, factory = local.client_factory({"BASE": "1"})
    assert key == ("local", local.python_executable(), "cpu")
    worker = factory()
    assert type(worker).__name__ == "WorkerClient" and worker.base_env == {"BASE": "1"}
    assert worker.env == {"CUDA_VISIBLE_DEVICES": "-1"}
    key, factory = remote.client_factory()
    assert key == ("remote", "http://127.0.0.1:8765", "server-token") and factory().token == "server-token"


@pytest.mark.parametrize(
    "event, percent, words",
    [
        ({"type": "progress", "stage": "resolve"}, 0, "Asking the Hugging Face Hub"),
        (
            {"type": "progress", "stage": "download", "file": "u.pt", "bytes": 5e8, "total": 2e9},
            25,
            "Downloading u.pt: 0.50 GB of 2.00 GB",
        ),
        ({"type": "progress", "stage": "verify", "file": "u.pt", "bytes": 1e9, "total": 2e9}, 50, "Verifying u.pt"),
        ({"type": "progress", "stage": "install"}, 100, "Installing"),
        ({"type": "result", "model_dir": "/w", "commit": "0123456789abcdef"}, 100, "in /w (revision 0123456789ab)"),
        ({"type": "error", "kind": "cancelled"}, 0, "continues where this one stopped"),
        ({"type": "error", "kind": "no-network"}, 0, "Download failed"),
    ],
)
def test_download_events_map_to_the_download_bar(event, percent, words):
    from MaisiSynthLib.gui_progress import download_status

    got_percent, text = download_status(event)
    assert got_percent == percent and words in text


def test_download_errors_speak_of_the_module_controls():
    text = error_text({"type": "error", "kind": "token-needed", "message": "gated", "hint": "pass --token"})
    assert "HF token" in text and "--token" not in text


def test_with_a_reference_ct_generate_edits_it_as_the_mode_says():
    auto, always, new = (GenerateOptions(edit_mode=label) for label in EDIT_MODES)
    assert auto.wants_edit(True) and not auto.wants_edit(False)
    assert always.wants_edit(False) and not new.wants_edit(True)
    # an edit is on the CT's own grid: a grid preset does not reach it
    edit = {"reference_ct": "ct.nrrd", "original_mask": "before.nrrd"}
    params = GenerateOptions(grid_preset=4).worker_params("mask.nrrd", "out.nrrd", edit=edit)
    assert params["reference_ct"] == "ct.nrrd" and params["original_mask"] == "before.nrrd"
    assert "output_size" not in params and "spacing" not in params
    assert any("reference CT" in p for p in GenerateOptions(edit_mode="sometimes").problems())
