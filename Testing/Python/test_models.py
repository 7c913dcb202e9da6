"""Model folders: official config → MONAI networks, official checkpoint keys, safe loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from MaisiSynthLib.errors import ModelError
from MaisiSynthLib.models import (
    AUTOENCODER_FILE,
    CONTROLNET_FILE,
    UNET_FILE,
    build_network,
    load_models,
    locate_model_folder,
    parameter_count,
    save_model_folder,
    size_multiple_of,
)
from MaisiSynthLib.tiny_model import make_tiny_model_folder, tiny_config

OFFICIAL_CONFIG = Path(__file__).resolve().parents[2] / "MaisiSynthLib" / "data" / "config_network_rflow.json"
SHARED_CONFIG = Path(__file__).resolve().parents[3] / "shared" / "reference" / "maisi" / "config_network_rflow.json"


def test_packaged_official_config_is_the_reference_file():
    if not SHARED_CONFIG.exists():
        pytest.skip("../shared/reference is not beside this checkout")
    assert json.loads(OFFICIAL_CONFIG.read_text()) == json.loads(SHARED_CONFIG.read_text())


def test_full_size_official_config_builds_and_round_trips(tmp_path):
    config = json.loads(OFFICIAL_CONFIG.read_text())
    torch.manual_seed(0)
    networks = {key: build_network(config, key) for key in ("autoencoder_def", "diffusion_unet_def", "controlnet_def")}
    # MAISI-v2 sizes: the official VAE, a 4-level UNet with attention at the two deepest levels.
    assert 20e6 < parameter_count(networks["autoencoder_def"]) < 22e6
    assert 170e6 < parameter_count(networks["diffusion_unet_def"]) < 190e6
    assert size_multiple_of(config) == 32
    for module in networks.values():  # make the ControlNet's zero layers non-zero, so a lost key shows
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.01)
    save_model_folder(tmp_path, config, *networks.values(), scale_factor=0.8125, layout="official")
    assert (tmp_path / "configs" / "config_network_rflow.json").is_file()
    assert (tmp_path / "models" / UNET_FILE).is_file()

    models = load_models(tmp_path, "cpu")
    assert models.scale_factor.item() == pytest.approx(0.8125)
    for key, loaded in [
        ("autoencoder_def", models.autoencoder),
        ("diffusion_unet_def", models.unet),
        ("controlnet_def", models.controlnet),
    ]:
        saved = networks[key].state_dict()
        restored = loaded.state_dict()
        assert saved.keys() == restored.keys()
        assert all(torch.equal(saved[k], restored[k]) for k in saved), key
    # official key layout of the files themselves
    unet_ckpt = torch.load(tmp_path / "models" / UNET_FILE, weights_only=True)
    assert {"epoch", "loss", "num_train_timesteps", "scale_factor", "unet_state_dict"} <= set(unet_ckpt)
    assert "controlnet_state_dict" in torch.load(tmp_path / "models" / CONTROLNET_FILE, weights_only=True)


@pytest.mark.parametrize("layout", ["flat", "official"])
def test_both_layouts_load_as_is(tmp_path, layout):
    root = make_tiny_model_folder(tmp_path / layout, layout=layout)
    folder = locate_model_folder(root)
    assert folder.unet_path.name == UNET_FILE
    assert (folder.config_path.parent.name == "configs") == (layout == "official")
    models = load_models(folder, "cpu")
    assert models.controlnet is not None and models.latent_channels == 4 and models.compression == 4


def test_autoencoder_wrapped_under_unet_state_dict_loads(tmp_path):
    root = make_tiny_model_folder(tmp_path / "m")
    plain = torch.load(root / AUTOENCODER_FILE, weights_only=True)
    torch.save({"unet_state_dict": plain}, root / AUTOENCODER_FILE)
    models = load_models(root, "cpu")
    assert all(torch.equal(plain[k], v) for k, v in models.autoencoder.state_dict().items())


def test_ddp_prefixed_and_numpy_scalar_checkpoints_load(tmp_path):
    root = make_tiny_model_folder(tmp_path / "m")
    ckpt = torch.load(root / UNET_FILE, weights_only=True)
    ckpt["unet_state_dict"] = {"module." + k: v for k, v in ckpt["unet_state_dict"].items()}
    ckpt["loss"] = np.float64(0.25)
    ckpt["epoch"] = np.int64(12)
    torch.save(ckpt, root / UNET_FILE)
    models = load_models(root, "cpu")
    assert models.unet.state_dict().keys() == {k[len("module.") :] for k in ckpt["unet_state_dict"]}


def test_controlnet_keys_shared_with_the_unet_may_be_absent(tmp_path):
    """The official loader copies the UNet's matching weights into the ControlNet first."""
    root = make_tiny_model_folder(tmp_path / "m")
    ckpt = torch.load(root / CONTROLNET_FILE, weights_only=True)
    unet_state = torch.load(root / UNET_FILE, weights_only=True)["unet_state_dict"]
    shared = [k for k, v in ckpt["controlnet_state_dict"].items() if k in unet_state and unet_state[k].shape == v.shape]
    assert shared
    for k in shared:
        del ckpt["controlnet_state_dict"][k]
    torch.save(ckpt, root / CONTROLNET_FILE)
    models = load_models(root, "cpu")
    unet_state = models.unet.state_dict()
    assert all(torch.equal(models.controlnet.state_dict()[k], unet_state[k]) for k in shared)


def test_missing_checkpoint_is_named(tmp_path):
    root = make_tiny_model_folder(tmp_path / "m")
    (root / CONTROLNET_FILE).unlink()
    with pytest.raises(ModelError, match="controlnet_3d_rflow-ct.pt"):
        locate_model_folder(root)
    assert locate_model_folder(root, require_controlnet=False).controlnet_path is None


def test_wrong_keys_are_reported_by_name(tmp_path):
    root = make_tiny_model_folder(tmp_path / "m")
    ckpt = torch.load(root / UNET_FILE, weights_only=True)
    state = ckpt["unet_state_dict"]
    state["extra.layer.weight"] = torch.zeros(1)
    del state["out.2.conv.weight"]
    torch.save(ckpt, root / UNET_FILE)
    with pytest.raises(ModelError) as info:
        load_models(root, "cpu")
    message = str(info.value)
    assert "missing keys out.2.conv.weight" in message and "unexpected keys extra.layer.weight" in message


def test_wrong_shapes_are_reported(tmp_path):
    root = make_tiny_model_folder(tmp_path / "m")
    config = json.loads((root / "config_network_rflow.json").read_text())
    config["diffusion_unet_def"]["num_channels"] = [8, 16, 32]
    (root / "config_network_rflow.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="size mismatch"):
        load_models(root, "cpu")


class NotAWeight:
    pass


def test_pickle_only_checkpoint_is_refused(tmp_path):
    root = make_tiny_model_folder(tmp_path / "m")
    ckpt = torch.load(root / UNET_FILE, weights_only=True)
    ckpt["args"] = NotAWeight()
    torch.save(ckpt, root / UNET_FILE)
    with pytest.raises(ModelError, match="needs pickle code execution.*refused"):
        load_models(root, "cpu")


def test_config_cannot_name_arbitrary_callables_or_expressions(tmp_path):
    root = make_tiny_model_folder(tmp_path / "m")
    config_path = root / "config_network_rflow.json"
    config = json.loads(config_path.read_text())
    config["autoencoder_def"]["_target_"] = "os.system"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelError, match="not one of MONAI's MAISI classes"):
        load_models(root, "cpu")
    config = tiny_config()
    config["diffusion_unet_def"]["num_res_blocks"] = "$__import__('os').getcwd()"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelError, match="expressions are not evaluated"):
        load_models(root, "cpu")


def test_non_rflow_scheduler_is_refused(tmp_path):
    root = make_tiny_model_folder(tmp_path / "m")
    config = tiny_config()
    config["noise_scheduler"] = {
        "_target_": "monai.networks.schedulers.ddpm.DDPMScheduler",
        "num_train_timesteps": 1000,
    }
    (root / "config_network_rflow.json").write_text(json.dumps(config))
    with pytest.raises(ModelError):
        load_models(root, "cpu")


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(ModelError, match="model folder not found"):
        locate_model_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config_network_rflow.json"):
        locate_model_folder(tmp_path / "empty")


def test_official_inference_config_sets_defaults(tmp_path):
    root = make_tiny_model_folder(tmp_path / "m", layout="official")
    shutil.copy(OFFICIAL_CONFIG.with_name("config_infer.json"), root / "configs" / "config_infer.json")
    folder = locate_model_folder(root)
    assert folder.inference["num_inference_steps"] == 30
    assert folder.inference["autoencoder_sliding_window_infer_size"] == [48, 48, 48]
