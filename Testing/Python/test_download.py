"""`maisi-synth download` against a local hub (fake_hub.py) that serves a tiny official-format model.

Real HTTP on 127.0.0.1 in huggingface_hub's own protocol, real files, real processes: the command
line, the worker, and a generation from the downloaded folder without --model-dir.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import assert_same_as_cli, ras_affine, save_nifti, torso_labels
from fake_hub import FakeHub

from MaisiSynthLib import model_home
from MaisiSynthLib.client import WorkerClient
from MaisiSynthLib.download import HUB_FILES, PACKAGE_FILES, download
from MaisiSynthLib.errors import DownloadError
from MaisiSynthLib.tiny_model import make_tiny_model_folder, tiny_config

pytest.importorskip("huggingface_hub")

REPO = Path(__file__).resolve().parents[2]
AE, UNET, CN = (hub for hub, _ in HUB_FILES)
CHUNK = 10 * 2**20  # huggingface_hub writes downloads in 10 MiB chunks; a resume starts at one's end
SECRET = "hf_good_SECRET_7c1d"


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory) -> Path:
    """The tiny model the hub serves, as a folder of its own (for comparing generations)."""
    return make_tiny_model_folder(tmp_path_factory.mktemp("hub") / "tiny", seed=3, layout="official")


@pytest.fixture(scope="module")
def hub_files(tiny_source) -> dict[str, bytes]:
    """The hub's repository: the tiny checkpoints under the official names, plus a small non-LFS file.

    The UNet checkpoint carries a 24 MB array besides its official keys (the loader reads only
    `unet_state_dict` and `scale_factor`), so that a download of it spans several of the hub client's
    10 MiB write chunks and a cut in the middle leaves a partial file to resume from.
    """
    unet = torch.load(tiny_source / "models" / "diff_unet_3d_rflow-ct.pt", weights_only=True)
    unet["padding"] = torch.arange(6_000_000, dtype=torch.float32)
    buffer = io.BytesIO()
    torch.save(unet, buffer)
    return {
        AE: (tiny_source / "models" / "autoencoder_v1.pt").read_bytes(),
        UNET: buffer.getvalue(),
        CN: (tiny_source / "models" / "controlnet_3d_rflow-ct.pt").read_bytes(),
        "README.md": b"# NV-Generate-CT (fake)\n",
    }


@pytest.fixture
def hub(hub_files):
    with FakeHub(hub_files) as running:
        yield running


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty per-user folder for this test, also for the processes it starts."""
    folder = tmp_path / "home"
    monkeypatch.setenv("MAISI_SYNTH_HOME", str(folder))
    return folder


def hub_env(hub_url: str, home: Path, **extra) -> dict:
    """A process environment that reaches only the local hub and has no Hugging Face login."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(
        HF_ENDPOINT=hub_url,
        HF_HOME=str(home / "hf"),  # no stored `hf auth login` token
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        MAISI_SYNTH_HOME=str(home),
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def cli(hub_url: str, home: Path, *args: str, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "MaisiSynthLib", *args],
        env=hub_env(hub_url, home, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_for(condition, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout} s")
        time.sleep(0.05)


def every_byte_under(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------------
# A fresh download, and running it again


def test_a_fresh_download_writes_a_verified_model_folder_that_records_its_revision(hub, hub_files, home):
    result = cli(hub.url, home, "download")
    assert result.returncode == 0, result.stderr
    folder = home / model_home.OFFICIAL_FOLDER_NAME
    assert f"revision {hub.commit[:12]} (main) in {folder}" in result.stdout
    assert "use them from now on" in result.stdout  # the default folder: no --model-dir needed

    for hub_path, local_path in HUB_FILES:
        assert (folder / local_path).read_bytes() == hub_files[hub_path]
    for name, local_path in PACKAGE_FILES:
        assert (folder / local_path).read_bytes() == (REPO / "MaisiSynthLib" / "data" / name).read_bytes()
    assert not (folder / ".partial").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["configs", model_home.MANIFEST_NAME, "models"]

    manifest = json.loads((folder / model_home.MANIFEST_NAME).read_text())
    assert (manifest["repo"], manifest["revision"], manifest["commit"]) == ("nvidia/NV-Generate-CT", "main", hub.commit)
    assert {f["hub_path"]: (f["size"], f["sha256"]) for f in manifest["files"]} == {
        hub_path: (len(hub_files[hub_path]), sha256(hub_files[hub_path])) for hub_path, _ in HUB_FILES
    }
    # the revision is resolved once; every file then comes from that commit
    api = [r for r in hub.requests if r["path"].startswith("/api/")]
    assert [(r["path"], r["query"]) for r in api] == [("/api/models/nvidia/NV-Generate-CT/revision/main", "blobs=true")]
    resolves = [r["path"] for r in hub.requests if "/resolve/" in r["path"]]
    assert sorted(resolves) == sorted(f"/nvidia/NV-Generate-CT/resolve/{hub.commit}/{p}" for p, _ in HUB_FILES)
    assert not any("README" in r["path"] for r in hub.requests)  # only what rflow-ct generation needs

    # every front door finds it now
    choice = model_home.choose_model_dir()
    assert choice.source == "official" and choice.path == folder and hub.commit[:12] in choice.describe()

    # again: every file is re-hashed against the hub's list, nothing is fetched twice
    before = len(hub.requests)
    again = cli(hub.url, home, "download")
    assert again.returncode == 0, again.stderr
    assert "downloaded now: 0.0 MB" in again.stdout and again.stderr.count("verifying") == 3
    assert [r["path"] for r in hub.requests[before:]] == ["/api/models/nvidia/NV-Generate-CT/revision/main"]


def test_a_connection_cut_half_way_resumes_with_a_range_request(hub, hub_files, tmp_path):
    hub.faults[UNET] = [("cut", 15_000_000)]  # the first answer stops after 15 of 24 MB
    result = download(tmp_path / "weights", token=SECRET, endpoint=hub.url)
    gets = hub.gets(UNET)
    assert [g["range"] for g in gets] == [None, f"bytes={CHUNK}-"]  # the bytes on disk were not fetched again
    assert (tmp_path / "weights" / "models" / "diff_unet_3d_rflow-ct.pt").read_bytes() == hub_files[UNET]
    assert result.downloaded_bytes == sum(len(hub_files[p]) for p, _ in HUB_FILES)
    assert model_home.read_manifest(tmp_path / "weights")["commit"] == hub.commit


def test_a_killed_download_never_looks_complete_and_the_next_run_resumes(hub, hub_files, home):
    hub.faults[UNET] = [("stall", 15_000_000)]  # 15 MB, then silence until released
    folder = home / model_home.OFFICIAL_FOLDER_NAME
    part = folder / ".partial" / "diff_unet_3d_rflow-ct.pt.part"
    process = subprocess.Popen(
        [sys.executable, "-m", "MaisiSynthLib", "download", "--quiet"],
        env=hub_env(hub.url, home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: part.exists() and part.stat().st_size >= CHUNK, what="partial UNet on disk")
    finally:
        process.kill()  # a cut-off run: no cleanup of any kind
        process.communicate()
    hub.release.set()

    assert (folder / "models").exists() is False  # nothing was installed
    assert model_home.read_manifest(folder) is None
    assert model_home.choose_model_dir().source == "demo"  # the demo model stays the fallback
    assert (folder / ".partial" / "autoencoder_v1.pt").read_bytes() == hub_files[AE]  # verified, waiting

    result = cli(hub.url, home, "download")
    assert result.returncode == 0, result.stderr
    assert [g["range"] for g in hub.gets(UNET)] == [None, f"bytes={CHUNK}-"]
    assert len(hub.gets(AE)) == 1  # the finished file was not fetched again
    assert model_home.choose_model_dir().source == "official"
    assert (folder / "models" / "diff_unet_3d_rflow-ct.pt").read_bytes() == hub_files[UNET]


def test_a_corrupted_file_is_detected_and_fetched_again(hub, hub_files, tmp_path):
    hub.faults[CN] = [("corrupt",)]
    folder = tmp_path / "weights"
    download(folder, token=SECRET, endpoint=hub.url)
    assert [g["range"] for g in hub.gets(CN)] == [None, None]  # the bad copy was dropped, not resumed
    installed = folder / "models" / "controlnet_3d_rflow-ct.pt"
    assert installed.read_bytes() == hub_files[CN]

    # damage on disk (same size, so the quick completeness check cannot see it): a run repairs it
    damaged = bytearray(installed.read_bytes())
    damaged[100] ^= 0xFF
    installed.write_bytes(bytes(damaged))
    repaired = download(folder, token=SECRET, endpoint=hub.url)
    assert repaired.repaired == ["models/controlnet_3d_rflow-ct.pt"]
    assert installed.read_bytes() == hub_files[CN] and len(hub.gets(CN)) == 3 and len(hub.gets(UNET)) == 1

    # a file that arrives wrong every time is refused, and the folder does not claim to be complete
    hub.faults[AE] = [("corrupt",), ("corrupt",)]
    with pytest.raises(DownloadError) as refused:
        download(tmp_path / "other", token=SECRET, endpoint=hub.url)
    assert refused.value.kind == "corrupt-file" and "autoencoder_v1.pt" in refused.value.one_line()
    assert model_home.read_manifest(tmp_path / "other") is None


# ---------------------------------------------------------------------------------------------------
# Refusals: one line each, with the fix, and never the token


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: ") and "Fix: " in line, line
    for word in words:
        assert word in line, line
    assert result.stdout == ""
    return line


@pytest.fixture
def gated_hub(hub_files):
    with FakeHub(hub_files, gated=True, tokens={SECRET, "hf_other_account"}, granted={SECRET}) as running:
        yield running


def test_a_gated_repository_without_a_token_says_how_to_get_one(gated_hub, home):
    line = assert_one_line_error(cli(gated_hub.url, home, "download"), "gated", "--token", "HF_TOKEN", "license")
    assert f"{gated_hub.url}/nvidia/NV-Generate-CT" in line  # where to accept the license
    assert model_home.read_manifest(home / model_home.OFFICIAL_FOLDER_NAME) is None


def test_a_refused_token_is_reported_and_never_printed(gated_hub, home):
    wrong = "hf_wrong_SECRET_0000"
    result = cli(gated_hub.url, home, "download", "--token", wrong)
    assert_one_line_error(result, "refused the token", "settings/tokens")
    assert wrong not in result.stderr + result.stdout
    # a valid token whose account was not granted access: 403 GatedRepo
    other = cli(gated_hub.url, home, "download", "--token", "hf_other_account")
    assert_one_line_error(other, "no access", "accept its license")
    assert "hf_other_account" not in other.stderr


def test_the_token_from_hf_token_is_sent_but_never_printed_or_written(gated_hub, hub_files, home):
    result = cli(gated_hub.url, home, "download", HF_TOKEN=SECRET)
    assert result.returncode == 0, result.stderr
    assert {r["authorization"] for r in gated_hub.requests if "/resolve/" in r["path"]} == {f"Bearer {SECRET}"}
    assert SECRET not in result.stdout + result.stderr
    assert SECRET.encode() not in every_byte_under(home)  # manifest, configs, anything else in the folder


def test_a_revision_that_does_not_exist_is_named(hub, home):
    assert_one_line_error(cli(hub.url, home, "download", "--revision", "v9.9"), "revision 'v9.9' does not exist")
    assert not (home / model_home.OFFICIAL_FOLDER_NAME / "models").exists()


def test_no_network_is_one_line_that_says_what_to_check(home):
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens there
    assert_one_line_error(cli(closed, home, "download"), "cannot reach the Hugging Face Hub", "internet connection")


def test_a_disk_without_room_is_refused_before_the_first_byte(hub, home):
    hub.reported_size[UNET] = 2**52  # 4.5 PB: no disk has it free
    assert_one_line_error(cli(hub.url, home, "download"), "not enough disk space", "GB is free")
    assert hub.gets(AE) == [] and hub.gets(UNET) == []


def test_a_folder_holding_other_weights_is_not_touched(hub, home, tmp_path):
    other = tmp_path / "my-weights"
    (other / "models").mkdir(parents=True)
    (other / "models" / "diff_unet_3d_rflow-ct.pt").write_bytes(b"someone else's weights")
    line = assert_one_line_error(cli(hub.url, home, "download", "--dest", str(other)), "already holds other files")
    assert "--model-dir" in line
    assert (other / "models" / "diff_unet_3d_rflow-ct.pt").read_bytes() == b"someone else's weights"
    assert sorted(p.name for p in other.iterdir()) == ["models"] and hub.requests == []


# ---------------------------------------------------------------------------------------------------
# Using what was downloaded


def test_the_downloaded_folder_generates_a_ct_without_model_dir(hub, tiny_source, home, tmp_path):
    download(None, token=SECRET, endpoint=hub.url, network_config=tiny_config())
    mask = save_nifti(tmp_path / "mask.nii.gz", torso_labels(96), ras_affine(origin=(-144.0, -144.0, -144.0)))
    out = tmp_path / "ct.nii.gz"
    args = ["--mask", str(mask), "--output", str(out), "--steps", "2", "--device", "cpu", "--quiet"]
    result = cli(hub.url, home, "generate", *args, timeout=300, CUDA_VISIBLE_DEVICES="-1")
    assert result.returncode == 0, result.stderr
    folder = home / model_home.OFFICIAL_FOLDER_NAME
    assert f"model: official MAISI-v2 weights nvidia/NV-Generate-CT (revision {hub.commit[:12]}) in {folder}" in (
        result.stdout
    )
    # the downloaded weights are the hub's: the same CT as the tiny model's own folder gives
    assert_same_as_cli(out, mask, tiny_source, seed=0, steps=2)
    assert nib.load(out).shape == (96, 96, 96) and np.ptp(nib.load(out).get_fdata()) > 0


def test_the_worker_downloads_in_the_background_with_progress_cancel_and_resume(gated_hub, hub_files, home):
    gated_hub.faults[UNET] = [("stall", 15_000_000)]
    folder = home / "from-worker"
    base = hub_env(gated_hub.url, home)
    client = WorkerClient(env={"CUDA_VISIBLE_DEVICES": "-1"}, base_env=base, worker_args=["--device", "cpu"])
    client.start()
    try:
        seen: list[dict] = []
        first = client.download({"dest": str(folder), "token": SECRET}, seen.append)
        part = folder / ".partial" / "diff_unet_3d_rflow-ct.pt.part"

        def unet_on_disk() -> bool:
            client.poll()
            return part.exists() and part.stat().st_size >= CHUNK

        wait_for(unet_on_disk, what="partial UNet from the worker")
        client.cancel(first)
        gated_hub.release.set()  # the next chunk arrives, and the cancel stops the download there
        end = client.wait(first, timeout=60)
        assert end["type"] == "error" and end["kind"] == "cancelled", end
        kept = part.stat().st_size  # one chunk, unless the cancel reached the worker after the next one
        assert model_home.read_manifest(folder) is None and kept >= CHUNK and kept % CHUNK == 0
        steps = [e for e in seen if e["type"] == "progress" and e["stage"] == "download"]
        assert (
            steps
            and steps[-1]["bytes"] >= len(hub_files[AE]) + CHUNK
            and steps[-1]["total"] == sum(len(hub_files[p]) for p, _ in HUB_FILES)
        )

        again: list[dict] = []
        second = client.download({"dest": str(folder), "token": SECRET}, again.append)
        done = client.wait(second, timeout=120)
        assert done["type"] == "result", done
        assert done["model_dir"] == str(folder) and done["commit"] == gated_hub.commit
        assert gated_hub.gets(UNET)[-1]["range"] == f"bytes={kept}-"  # resumed, not restarted
        assert model_home.read_manifest(folder) is not None
        stages = [e["stage"] for e in again if e["type"] == "progress"]
        assert stages[0] == "resolve" and stages[-1] == "install" and "download" in stages
        assert SECRET not in json.dumps(seen + again) + "\n".join(client.stderr_tail)
    finally:
        client.shutdown()


def test_a_download_asked_of_a_remote_server_is_refused_by_the_session():
    from MaisiSynthLib.client import ClientSession, RemoteClient

    session = ClientSession()
    remote = RemoteClient("http://127.0.0.1:9")
    remote.ready = {"type": "ready"}  # as if started: the refusal must not depend on the server
    session.client, session.key = remote, "remote"
    events: list[dict] = []
    session.request("remote", lambda: remote, {}, events.append, kind="download")
    session.poll()
    assert [(e["type"], e["kind"]) for e in events] == [("error", "bad-request")]
    assert "local worker" in events[0]["hint"]


def test_without_huggingface_hub_the_fix_is_to_install_the_extra(home, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['huggingface_hub'] = None\n")
    result = cli("http://127.0.0.1:9", home, "download", PYTHONPATH=f"{blocker}{os.pathsep}{REPO}")
    assert_one_line_error(result, "needs the huggingface_hub package", "maisi-synth[download]")
