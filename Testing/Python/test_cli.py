"""`maisi-synth` end to end, as a real process: a CT from a mask, and every kind of bad input."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import shutil

import nibabel as nib
import nrrd
import numpy as np
import pytest
import torch
from conftest import ras_affine, run_cli, save_nifti, torso_labels

from MaisiSynthLib.models import AUTOENCODER_FILE, CONTROLNET_FILE, UNET_FILE


def test_generate_writes_an_int16_ct_on_the_mask_grid(tmp_path, tiny_model):
    labels = torso_labels(64)
    # an oblique-free but flipped/offset grid, as scanners write them
    affine = np.array([[-3.0, 0, 0, 95.0], [0, -3.0, 0, 120.0], [0, 0, 3.0, -40.0], [0, 0, 0, 1]])
    mask = save_nifti(tmp_path / "mask.nii.gz", labels, affine)
    out = tmp_path / "out" / "ct.nii.gz"
    result = run_cli(
        "generate",
        "--mask",
        str(mask),
        "--output",
        str(out),
        "--model-dir",
        str(tiny_model),
        "--steps",
        "4",
        "--preview",
        str(tmp_path / "preview.png"),
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "generation took" in result.stdout
    img = nib.load(str(out))
    ct = np.asanyarray(img.dataobj)
    assert img.get_data_dtype() == np.int16 and ct.shape == labels.shape
    np.testing.assert_allclose(img.affine, affine, atol=1e-6)
    assert ct.min() >= -1000 and ct.max() <= 1000
    assert (ct[labels == 0] == -1000).all()
    assert (ct[labels > 0] > -1000).mean() > 0.2  # the body is not simply air
    png = (tmp_path / "preview.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_generate_nrrd_output_keeps_geometry(tmp_path, tiny_model):
    labels = torso_labels(64)
    header = {
        "space": "left-posterior-superior",
        "space directions": np.diag([3.0, 3.0, 3.0]),
        "space origin": np.array([90.0, 90.0, -90.0]),
    }
    nrrd.write(str(tmp_path / "mask.nrrd"), labels, header)
    out = tmp_path / "ct.nrrd"
    result = run_cli(
        "generate",
        "--mask",
        str(tmp_path / "mask.nrrd"),
        "--output",
        str(out),
        "--model-dir",
        str(tiny_model),
        "--steps",
        "2",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    ct, ct_header = nrrd.read(str(out))
    assert ct.dtype == np.int16 and ct.shape == labels.shape
    np.testing.assert_allclose(ct_header["space directions"], np.diag([3.0, 3.0, 3.0]), atol=1e-6)
    np.testing.assert_allclose(ct_header["space origin"], [90.0, 90.0, -90.0], atol=1e-6)
    assert (ct[labels == 0] == -1000).all()


def test_info_reports_parameters_and_memory(tiny_model):
    result = run_cli("info", "--model-dir", str(tiny_model), "--output-size", "128", "128", "64")
    assert result.returncode == 0, result.stderr
    assert "DiffusionModelUNetMaisi" in result.stdout and "M parameters" in result.stdout
    assert "memory       for 128x128x64" in result.stdout


# ---------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, no output file, nothing else changed.


def _model_copy(tmp_path, tiny_model):
    target = tmp_path / "model"
    shutil.copytree(tiny_model, target)
    return target


class Unpicklable:
    pass


def _bad_inputs(tmp_path, tiny_model):
    """name → (mask path, model folder, extra args, expected words in the message)."""
    good = save_nifti(tmp_path / "good.nii.gz", torso_labels(64))
    text = tmp_path / "notes.nii.gz"
    text.write_text("this is not an image")
    four_d = save_nifti(tmp_path / "4d.nii.gz", np.stack([torso_labels(32)] * 3, axis=-1))
    floats = torso_labels(64).astype(np.float32)
    floats[10:12, 10:12, 10:12] = 0.4
    float_mask = save_nifti(tmp_path / "float.nii.gz", floats)
    unknown = torso_labels(64)
    unknown[5:7, 5:7, 5:7] = 150
    unknown_mask = save_nifti(tmp_path / "unknown.nii.gz", unknown)
    empty = save_nifti(tmp_path / "empty.nii.gz", np.zeros((64, 64, 64), np.int16))
    coarse = save_nifti(tmp_path / "coarse.nii.gz", torso_labels(64), ras_affine((10.0, 10.0, 3.0)))
    small_fov = save_nifti(tmp_path / "smallfov.nii.gz", torso_labels(64), ras_affine((0.75, 0.75, 3.0)))

    no_controlnet = _model_copy(tmp_path / "a", tiny_model)
    (no_controlnet / CONTROLNET_FILE).unlink()
    wrong_keys = _model_copy(tmp_path / "b", tiny_model)
    ckpt = torch.load(wrong_keys / UNET_FILE, weights_only=True)
    ckpt["unet_state_dict"]["bogus.weight"] = torch.zeros(2)
    torch.save(ckpt, wrong_keys / UNET_FILE)
    pickled = _model_copy(tmp_path / "c", tiny_model)
    ae = torch.load(pickled / AUTOENCODER_FILE, weights_only=True)
    torch.save({"state": ae, "meta": Unpicklable()}, pickled / AUTOENCODER_FILE)

    # Hostile or broken headers: a gzip "bomb" (a huge declared size in a few bytes), affines that
    # cannot place voxels, a zero-size volume, a symlink that loops.
    bomb_header = nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)).header
    bomb_header.set_data_shape((1088, 1088, 1088))
    bomb = tmp_path / "bomb.nii.gz"
    bomb.write_bytes(gzip.compress(bomb_header.binaryblock + b"\0" * 4))
    zero_column = ras_affine()
    zero_column[:3, 1] = 0
    nan_affine = ras_affine()
    nan_affine[0, 3] = np.nan
    parallel = ras_affine()
    parallel[:3, 1] = parallel[:3, 0]
    broken = {}
    for name, affine in (("zero", zero_column), ("nan", nan_affine), ("parallel", parallel)):
        # nibabel will not write such a header itself: write a good file, then patch its sform rows
        data = bytearray(nib.Nifti1Image(torso_labels(64), ras_affine()).to_bytes())
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(data[:348])))
        header["qform_code"], header["sform_code"] = 0, 1
        header["srow_x"], header["srow_y"], header["srow_z"] = affine[0], affine[1], affine[2]
        data[:348] = header.binaryblock
        broken[name] = tmp_path / f"{name}.nii.gz"
        broken[name].write_bytes(gzip.compress(bytes(data)))
    zero_size = tmp_path / "zero.nrrd"
    nrrd.write(str(zero_size), np.zeros((4, 0, 4), np.int16))
    loop = tmp_path / "loop.nii.gz"
    loop.symlink_to(loop)
    self_reference = _model_copy(tmp_path / "d", tiny_model)
    config = json.loads((self_reference / "config_network_rflow.json").read_text())
    config["spatial_dims"] = "@spatial_dims"
    (self_reference / "config_network_rflow.json").write_text(json.dumps(config))
    huge = _model_copy(tmp_path / "e", tiny_model)
    config = json.loads((huge / "config_network_rflow.json").read_text())
    config["diffusion_unet_def"]["num_channels"] = [2048, 4096, 4096]
    (huge / "config_network_rflow.json").write_text(json.dumps(config))
    secret = tmp_path / "elsewhere" / "secret.raw"
    secret.parent.mkdir()
    secret.write_bytes(bytes(range(24)))
    detached = tmp_path / "detached.nhdr"
    detached.write_text(f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 3 4\nencoding: raw\ndata file: {secret}\n\n")
    raw_pickle = _model_copy(tmp_path / "f", tiny_model)
    (raw_pickle / AUTOENCODER_FILE).write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))

    return {
        "missing file": (tmp_path / "absent.nii.gz", tiny_model, [], "mask file not found"),
        "header declaring a huge volume": (bomb, tiny_model, [], "declares 1088x1088x1088 voxels"),
        "affine with a zero axis": (broken["zero"], tiny_model, [], "zero voxel size along axis 1"),
        "affine with NaN": (broken["nan"], tiny_model, [], "NaN or infinite"),
        "affine with parallel axes": (broken["parallel"], tiny_model, [], "parallel voxel axes"),
        "zero-size mask": (zero_size, tiny_model, [], "has no voxels"),
        "symlink loop": (loop, tiny_model, [], "symbolic link that loops"),
        "NaN spacing": (good, tiny_model, ["--spacing", "nan", "3", "3"], "'spacing' must be three numbers"),
        "huge output grid": (
            good,
            tiny_model,
            ["--output-size", "1024", "1024", "1024", "--spacing", "8", "8", "8"],
            "1074 million voxels",
        ),
        "config entry referring to itself": (good, self_reference, [], "refers back to itself"),
        "network far beyond the official size": (good, huge, [], "num_channels"),
        "raw pickle checkpoint": (good, raw_pickle, [], "needs pickle code execution"),
        "detached header naming a file elsewhere": (detached, tiny_model, [], "not a regular file in the same folder"),
        "output is the input by another name": (
            good,
            tiny_model,
            ["--output", str(tmp_path / "sub" / ".." / "good.nii.gz")],
            "is the input mask itself",
        ),
        "non-image file": (text, tiny_model, [], "cannot read mask notes.nii.gz"),
        "4-D volume": (four_d, tiny_model, [], "4 dimensions"),
        "float labels": (float_mask, tiny_model, [], "non-integer values"),
        "unknown label ids": (unknown_mask, tiny_model, [], "150 that are not MAISI labels"),
        "empty mask": (empty, tiny_model, [], "empty"),
        "spacing out of range": (coarse, tiny_model, ["--spacing", "10", "10", "3"], "in-plane spacing 10"),
        "FOV out of range": (small_fov, tiny_model, [], "field of view 48 x 48 mm"),
        "output size not allowed": (
            good,
            tiny_model,
            ["--output-size", "60", "60", "60"],
            "output size 60x60x60 is not allowed",
        ),
        "missing checkpoint": (good, no_controlnet, [], "missing checkpoint(s) controlnet_3d_rflow-ct.pt"),
        "checkpoint with wrong keys": (good, wrong_keys, [], "unexpected keys bogus.weight"),
        "pickle-only checkpoint": (good, pickled, [], "needs pickle code execution"),
        "unsupported output format": (
            good,
            tiny_model,
            ["--output", str(tmp_path / "out" / "ct.mha")],
            "unsupported output format",
        ),
    }


BAD_CASES = [
    "missing file",
    "header declaring a huge volume",
    "affine with a zero axis",
    "affine with NaN",
    "affine with parallel axes",
    "zero-size mask",
    "symlink loop",
    "NaN spacing",
    "huge output grid",
    "config entry referring to itself",
    "network far beyond the official size",
    "raw pickle checkpoint",
    "detached header naming a file elsewhere",
    "output is the input by another name",
    "non-image file",
    "4-D volume",
    "float labels",
    "unknown label ids",
    "empty mask",
    "spacing out of range",
    "FOV out of range",
    "output size not allowed",
    "missing checkpoint",
    "checkpoint with wrong keys",
    "pickle-only checkpoint",
    "unsupported output format",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_gives_one_clear_line_and_no_output(tmp_path, tiny_model, case):
    mask, model, extra, expected = _bad_inputs(tmp_path, tiny_model)[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    output = ["--output", str(out_dir / "ct.nii.gz")] if "--output" not in extra else []
    result = run_cli(
        "generate",
        "--mask",
        str(mask),
        *output,
        "--model-dir",
        str(model),
        "--preview",
        str(out_dir / "p.png"),
        "--steps",
        "2",
        *extra,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Fix: " in lines[0]
    assert result.stdout == ""
    assert list(out_dir.iterdir()) == []
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_long_legal_output_name_is_written(tmp_path, tiny_model):
    """A 242-character name is legal on every file system; its temporary file must be too."""
    mask = save_nifti(tmp_path / "m.nii.gz", torso_labels(64))
    out = tmp_path / ("c" * 235 + ".nii.gz")
    result = run_cli(
        "generate", "--mask", str(mask), "--output", str(out), "--model-dir", str(tiny_model), "--steps", "1"
    )
    assert result.returncode == 0, result.stderr
    assert out.exists() and len(out.name) == 242
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, "m.nii.gz"])
    too_long = tmp_path / ("c" * 250 + ".nii.gz")
    result = run_cli("generate", "--mask", str(mask), "--output", str(too_long), "--model-dir", str(tiny_model))
    assert result.returncode == 2 and "longer than file systems allow" in result.stderr


def test_a_full_disk_is_a_user_error_not_a_bug(tmp_path, tiny_model, monkeypatch):
    """A disk cannot be filled here, so the writer is made to fail as a full one does (ENOSPC)."""
    import errno

    from MaisiSynthLib import pipeline
    from MaisiSynthLib.errors import OptionError

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "save_volume", full)
    mask = save_nifti(tmp_path / "m.nii.gz", torso_labels(64))
    request = pipeline.GenerateRequest(mask=mask, output=tmp_path / "ct.nii.gz", model_dir=tiny_model, steps=1)
    with pytest.raises(OptionError, match="no space left") as caught:
        pipeline.generate(request)
    assert caught.value.kind == "bad-option" and "free some space" in caught.value.hint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.nii.gz"]


def test_a_mask_off_the_models_grid_comes_back_on_its_own_grid(tmp_path, tiny_model):
    """Mask in, CT out on the same grid: a size the model does not take is padded and cropped back,
    a spacing outside its range is generated on the nearest grid it takes and resampled back."""
    odd = torso_labels(64)[:61, 3:, :50]  # 61 x 61 x 50 voxels of 3 mm
    fine = np.repeat(np.repeat(torso_labels(32), 2, axis=0), 2, axis=1)  # 64 x 64 x 32 voxels of 0.3 mm in-plane
    cases = {
        "odd": (odd, ras_affine((3.0, 3.0, 3.0), (-90.0, -81.0, -75.0)), "padded with background"),
        "fine": (fine, ras_affine((0.3, 0.3, 6.0), (-9.6, -9.6, -96.0)), "outside this model's range"),
    }
    tiny_rules = {"grid": {"spacing_xy_mm": [0.5, 8.0], "spacing_z_mm": [0.5, 8.0], "min_fov_xy_mm": 16}}
    model = _model_copy(tmp_path / "m", tiny_model)
    (model / "maisi_synth.json").write_text(json.dumps(tiny_rules))
    for name, (labels, affine, note) in cases.items():
        mask = save_nifti(tmp_path / f"{name}.nii.gz", labels.astype(np.int16), affine)
        out = tmp_path / f"{name}_ct.nii.gz"
        result = run_cli(
            "generate", "--mask", str(mask), "--output", str(out), "--model-dir", str(model), "--steps", "1"
        )
        assert result.returncode == 0, result.stderr
        assert note in result.stderr + result.stdout
        ct = nib.load(str(out))
        assert ct.shape == labels.shape and np.array_equal(ct.affine, nib.load(str(mask)).affine)
        data = np.asanyarray(ct.dataobj)
        assert (data[labels == 0] == -1000).all() and np.ptp(data[labels > 0]) > 0
