"""What the Slicer Extensions Index checks on a submission, checked here first: the catalog entry
against the schema from Slicer's sources (Testing/Data, copied from Slicer/Schemas), the icon and
screenshot URLs pointing at images in this repository, a LICENSE, the extension's status, and a
module file that runs nothing when Slicer imports it (only definitions)."""

from __future__ import annotations

import ast
import json
import re
import struct
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
RAW = "https://raw.githubusercontent.com/maisisynth/MaisiSynth/main/"


def cmake_setting(name: str) -> str:
    found = re.search(rf'set\({name} "([^"]*)"\)', (REPO / "CMakeLists.txt").read_text())
    assert found, f"{name} is not set in CMakeLists.txt"
    return found.group(1)


def s4ext() -> dict:
    out = {}
    for line in (REPO / "extension.s4ext").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out[key] = value.strip()
    return out


def test_the_catalog_entry_validates_against_slicers_schema_and_agrees_with_the_build_files():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((REPO / "Testing" / "Data" / "slicer-extension-catalog-entry-schema-v1.0.2.json").read_text())
    entry = json.loads((REPO / "MaisiSynth.json").read_text())
    jsonschema.validate(entry, schema)
    assert entry["$schema"].rstrip("#") == schema["$id"].rstrip("#")
    assert entry["category"] == cmake_setting("EXTENSION_CATEGORY") == s4ext()["category"]
    assert entry["scm_url"] == s4ext()["scmurl"] and entry["scm_url"].startswith(cmake_setting("EXTENSION_HOMEPAGE"))
    assert entry["build_dependencies"] == cmake_setting("EXTENSION_DEPENDS").split() == s4ext()["depends"].split()
    # what the schema would refuse: a field it does not know, a tier out of range
    for broken in (
        {**entry, "homepage": "x"},
        {**entry, "tier": 7},
        {k: v for k, v in entry.items() if k != "scm_url"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG image"
    return struct.unpack(">II", data[16:24])


def test_icon_and_screenshot_urls_are_images_in_this_repository():
    icon = cmake_setting("EXTENSION_ICONURL")
    shots = cmake_setting("EXTENSION_SCREENSHOTURLS").split()
    assert icon == s4ext()["iconurl"] and shots == s4ext()["screenshoturls"].split() and shots
    for url in [icon, *shots]:
        assert url.startswith(RAW), url  # the raw file of the main branch, which the Index loads
        width, height = png_size(REPO / url[len(RAW) :])
        assert width >= 128 and height >= 128
    assert png_size(REPO / icon[len(RAW) :]) == (128, 128)


def test_license_status_and_description_are_there():
    license_text = (REPO / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0" in license_text
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"] == {"text": "Apache-2.0"}
    assert cmake_setting("EXTENSION_STATUS") == s4ext()["status"] == "Beta"
    assert cmake_setting("EXTENSION_DESCRIPTION") and cmake_setting("EXTENSION_CONTRIBUTORS")


def test_the_module_file_runs_nothing_at_file_scope():
    """Reviewers ask it: importing the module may define, not act (no path changes, no I/O)."""
    tree = ast.parse((REPO / "MaisiSynth" / "MaisiSynth.py").read_text(encoding="utf-8"))
    acting = []
    for i, node in enumerate(tree.body):
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)):
            continue
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            continue  # a constant
        acting.append(f"line {node.lineno}: {ast.unparse(node).splitlines()[0]}")
    assert not acting, acting
