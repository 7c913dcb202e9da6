"""`maisi-synth serve` over loopback: a real server process, real HTTP, `client.RemoteClient`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from http.client import HTTPConnection

import nibabel as nib
import numpy as np
import pytest
from conftest import (
    act_at_step,
    assert_kept_outside,
    assert_same_as_cli,
    run_cli,
    sample_steps,
    save_nifti,
    torso_labels,
    write_scan,
)

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from MaisiSynthLib.client import RemoteClient  # noqa: E402

TOKEN = "test-token-0123456789"
MAX_UPLOAD_MB = 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, workdir, token: str | None = TOKEN, *extra: str, port: int | None = None):
    port = port or free_port()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="-1", PYTHONUNBUFFERED="1")
    env.pop("MAISI_SYNTH_TOKEN", None)
    if token:
        env["MAISI_SYNTH_TOKEN"] = token
    cmd = [sys.executable, "-m", "MaisiSynthLib", "serve", "--port", str(port), "--model-dir", str(model)]
    cmd += ["--device", "cpu", "--max-upload-mb", str(MAX_UPLOAD_MB), "--workdir", str(workdir), *extra]
    process = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    client = RemoteClient(f"http://127.0.0.1:{port}", token=token)
    deadline = time.monotonic() + 120
    while True:
        try:
            client.start(timeout=2)
            return process, client
        except Exception:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"server did not start: {process.stderr.read()}") from None
            time.sleep(0.3)


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("serve")
    process, client = start_server(tiny_model, workdir)
    yield client, workdir
    try:
        client.shutdown()
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()


def run_folder(workdir):
    """The folder this server run keeps its files in (a fresh one inside --workdir)."""
    (folder,) = [p for p in workdir.iterdir() if p.is_dir()]
    return folder


@pytest.fixture(scope="module")
def mask(tmp_path_factory):
    return save_nifti(tmp_path_factory.mktemp("serve-mask") / "mask.nii.gz", torso_labels())


def http(
    client: RemoteClient, method: str, path: str, body: bytes | None = None, token: str | None = TOKEN, headers=None
):
    """A raw request; returns (status, JSON body)."""
    headers = dict(headers or {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if method == "POST" and "Content-Type" not in headers:
        headers["Content-Type"] = "application/octet-stream" if path.startswith("/v1/masks") else "application/json"
    req = urllib.request.Request(client.url + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_two_requests_download_results_and_reuse_models(server, mask, tmp_path):
    client, workdir = server
    seen: list[dict] = []
    first = client.wait(
        client.generate(
            {"mask": str(mask), "output": str(tmp_path / "a.nii.gz"), "preview": str(tmp_path / "a.png"), "steps": 3},
            callback=seen.append,
        ),
        180,
    )
    second = client.wait(client.generate({"mask": str(mask), "output": str(tmp_path / "b.nii.gz"), "steps": 3}), 180)
    assert first["type"] == second["type"] == "result"
    assert first["output"] == str(tmp_path / "a.nii.gz") and first["preview"] == str(tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert second["models"] == "reused"
    a, b = nib.load(tmp_path / "a.nii.gz"), nib.load(tmp_path / "b.nii.gz")
    assert np.array_equal(a.get_fdata(), b.get_fdata()) and a.shape == (64, 64, 64)
    assert [e["i"] for e in seen if e["type"] == "progress" and e.get("stage") == "sample"] == [0, 1, 2, 3]
    # the client deletes finished requests on the server; the upload went with its request
    run = run_folder(workdir)
    assert not list((run / "requests").iterdir()) and not list((run / "uploads").iterdir())


def test_remote_output_equals_the_cli(server, mask, tiny_model, tmp_path):
    client, _ = server
    end = client.wait(
        client.generate({"mask": str(mask), "output": str(tmp_path / "r.nii.gz"), "steps": 3, "seed": 4}), 180
    )
    assert end["type"] == "result"
    assert_same_as_cli(tmp_path / "r.nii.gz", mask, tiny_model, seed=4)


def test_cancel_over_http_leaves_no_file(server, mask, tmp_path):
    client, _ = server
    out = tmp_path / "long.nii.gz"
    rid = client.generate({"mask": str(mask), "output": str(out), "steps": 400})
    end, seen = act_at_step(client, rid, 2, lambda: client.cancel(rid))
    assert end["type"] == "error" and end["kind"] == "cancelled"
    # events reach the client over HTTP a little late, so a few more fast steps may run; a request
    # that ignored the cancel would run all 400 and end with a result
    assert max(sample_steps(seen)) < 40
    assert not out.exists() and not list(tmp_path.iterdir())
    again = client.wait(client.generate({"mask": str(mask), "output": str(tmp_path / "n.nii.gz"), "steps": 2}), 180)
    assert again["type"] == "result" and (tmp_path / "n.nii.gz").exists()


def test_bad_requests_get_clear_errors(server, mask, tmp_path):
    client, workdir = server
    status, body = http(client, "POST", "/v1/requests", b"{not json", headers={"Content-Type": "application/json"})
    assert status == 400 and body["kind"] == "bad-request"
    status, body = http(client, "POST", "/v1/requests", json.dumps({"mask_id": "nope"}).encode())
    assert status == 404 and "upload the mask first" in body["hint"]
    # the server owns the model folder: a client may not point it at other paths
    end = client.wait(client.generate({"mask": str(mask), "output": str(tmp_path / "x.nii.gz"), "model_dir": "/"}), 60)
    assert end["kind"] == "bad-request" and "model_dir" in end["message"]
    end = client.wait(client.generate({"mask": str(mask), "output": str(tmp_path / "x.nii.gz"), "stepz": 3}), 60)
    assert end["kind"] == "bad-request" and "stepz" in end["message"]
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"\x00" * 100)
    end = client.wait(client.generate({"mask": str(garbage), "output": str(tmp_path / "x.nii.gz")}), 60)
    assert end["kind"] == "bad-mask" and end["hint"]
    assert not (tmp_path / "x.nii.gz").exists()
    assert client.start()["type"] == "ready"  # still serving


def test_an_edit_uploads_the_reference_ct_and_keeps_it_outside_the_region(server, tmp_path):
    client, workdir = server
    scan = write_scan(tmp_path / "scan")
    out, labels = tmp_path / "edited.nii.gz", tmp_path / "edited_label.nii.gz"
    request = {"mask": str(scan / "mask.nii.gz"), "reference_ct": str(scan / "ct.nii.gz"), "output": str(out)}
    end = client.wait(client.generate({**request, "label_output": str(labels), "edits": ["insert:hepatic:30"],
                                       "steps": 3}), 180)  # fmt: skip
    assert end["type"] == "result" and end["edit"]["region_voxels"] > 0, end
    original = np.asanyarray(nib.load(str(scan / "mask.nii.gz")).dataobj)
    assert_kept_outside(out, scan / "ct.nii.gz", np.asanyarray(nib.load(str(labels)).dataobj), original)
    assert str(workdir) not in json.dumps(end)  # server paths stay private
    # the client may not name a server-side file as the reference CT
    status, body = http(client, "POST", "/v1/requests", json.dumps({"mask_id": "x", "params": {
        "reference_ct": "/etc/passwd"}}).encode())  # fmt: skip
    assert status == 404 or "reference_ct" in body["message"]
    # a reference CT larger than the server takes: one clear error, nothing kept, nothing written
    big = tmp_path / "big_ct.nii.gz"
    noise = np.random.default_rng(0).integers(-1000, 1000, (96, 96, 64)).astype(np.int16)
    nib.save(nib.Nifti1Image(noise, np.diag([6.0, 6.0, 8.0, 1.0])), str(big))
    assert big.stat().st_size > MAX_UPLOAD_MB * 2**20
    end = client.wait(client.generate({**request, "reference_ct": str(big), "edits": ["insert:hepatic:30"]}), 60)
    assert end["type"] == "error" and end["kind"] == "too-large" and end["status"] == 413
    assert "max-upload-mb" in end["hint"] and not out.with_name("x").exists()
    assert not list((run_folder(workdir) / "uploads").iterdir())  # the mask uploaded first went too


def test_token_is_required_when_set(server, mask):
    client, _ = server
    for method, path in [
        ("GET", "/v1/ping"),
        ("POST", "/v1/masks"),
        ("POST", "/v1/requests"),
        ("POST", "/v1/shutdown"),
    ]:
        assert http(client, method, path, b"", token=None)[0] == 401
        assert http(client, method, path, b"", token="wrong")[0] == 401
    assert http(client, "GET", "/v1/ping")[0] == 200


def test_oversized_uploads_are_refused(server):
    client, workdir = server
    # a declared length over the limit is refused from the headers alone: the client waits for the
    # answer before sending the body (sending it races the server closing the connection)
    host, port = client.url.split("//")[1].split(":")
    conn = HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/masks?name=big.nii.gz")
    for key, value in (("Authorization", f"Bearer {TOKEN}"), ("Content-Type", "application/octet-stream")):
        conn.putheader(key, value)
    conn.putheader("Content-Length", str(int(MAX_UPLOAD_MB * 2**20 + 1024)))
    conn.endheaders()
    answer = conn.getresponse()
    status, body = answer.status, json.loads(answer.read())
    conn.close()
    assert status == 413 and body["kind"] == "too-large" and "max-upload-mb" in body["hint"]

    # chunked upload without a declared length: refused while streaming, nothing kept
    def chunks():
        for _ in range(8):
            yield b"\x00" * (2**17)

    req = urllib.request.Request(
        client.url + "/v1/masks?name=big.nii.gz",
        data=chunks(),
        method="POST",
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/octet-stream"},
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    assert info.value.code == 413
    assert not list((run_folder(workdir) / "uploads").iterdir())


def test_a_non_loopback_bind_needs_a_token(tiny_model):
    env = {"MAISI_SYNTH_TOKEN": ""}
    result = run_cli("serve", "--host", "0.0.0.0", "--port", str(free_port()), "--model-dir", str(tiny_model), env=env)
    assert result.returncode == 2
    assert "needs a token" in result.stderr and "MAISI_SYNTH_TOKEN" in result.stderr


def test_a_dying_server_is_reported(tiny_model, mask, tmp_path):
    process, client = start_server(tiny_model, tmp_path / "work")
    rid = client.generate({"mask": str(mask), "output": str(tmp_path / "x.nii.gz"), "steps": 400})
    end, _ = act_at_step(client, rid, 1, lambda: process.send_signal(signal.SIGKILL))
    assert end["type"] == "error" and end["kind"] == "worker-died"
    assert process.wait(30) == -signal.SIGKILL and not (tmp_path / "x.nii.gz").exists()


def test_a_session_retries_a_server_it_could_not_reach(tiny_model, mask, tmp_path):
    """The module's session to a remote server whose first connection failed (not up yet, a typo
    fixed on the server's side): every later Generate to the same address tries again, answered
    with an error while nothing listens and run once the server is up, never 'Queued…' for ever."""
    from MaisiSynthLib.client import ClientSession

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    session = ClientSession()

    def generate(name: str) -> dict:
        got: list[dict] = []
        params = {"mask": str(mask), "output": str(tmp_path / name), "steps": 2}
        session.request(("remote", url, TOKEN), lambda: RemoteClient(url, token=TOKEN), params, got.append)
        deadline = time.monotonic() + 180
        while not any(e["type"] in ("result", "error") for e in got):
            assert time.monotonic() < deadline, f"no answer, still {session.starting=} {session.ready=}"
            session.poll()
            time.sleep(0.05)
        return got[-1]

    for attempt in ("a.nii.gz", "b.nii.gz"):
        failed = generate(attempt)
        assert failed["kind"] == "worker-died" and "could not start" in failed["message"]
    process, client = start_server(tiny_model, tmp_path / "work", TOKEN, port=port)
    try:
        done = generate("c.nii.gz")
        assert done["type"] == "result", done
        assert (tmp_path / "c.nii.gz").is_file()
    finally:
        session.close()
        process.terminate()
        process.wait(30)


def test_a_cancel_the_server_does_not_answer_ends_the_job_here(tiny_model, mask, tmp_path, monkeypatch):
    """A server that never answers a cancel (its worker hung, or an older server) must not leave the
    GUI in "Cancelling…": after the session's grace period the job ends as cancelled here, and what
    the server sends for it later writes nothing. The stand-in server is the real one with cancels
    ignored (a sitecustomize on its PYTHONPATH)."""
    from MaisiSynthLib.client import ClientSession

    deaf = tmp_path / "deaf"
    deaf.mkdir()
    (deaf / "sitecustomize.py").write_text(
        "from MaisiSynthLib import worker\nworker.RequestRunner.cancel = lambda self, request_id, target: None\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(deaf))
    process, client = start_server(tiny_model, tmp_path / "work")
    url = client.url
    session = ClientSession()
    session.cancel_grace_s = 2.0
    got: list[dict] = []
    out = tmp_path / "long.nii.gz"
    params = {"mask": str(mask), "output": str(out), "steps": 1000}
    try:
        rid = session.request(("remote", url, TOKEN), lambda: RemoteClient(url, token=TOKEN), params, got.append)
        deadline = time.monotonic() + 180
        while not any(e.get("stage") == "sample" for e in got):
            assert time.monotonic() < deadline, got[-3:]
            session.poll()
            time.sleep(0.02)
        session.cancel(rid)
        cancelled_at = time.monotonic()
        while not any(e["type"] in ("result", "error") for e in got):
            assert time.monotonic() - cancelled_at < 60, "the unanswered cancel never ended the job"
            session.poll()
            time.sleep(0.02)
        assert got[-1]["kind"] == "cancelled" and "did not answer" in got[-1]["message"]
        assert time.monotonic() - cancelled_at >= 2.0 and not out.exists()
    finally:
        session.close()
        process.kill()  # its runner is still drawing the job it was told to cancel
        process.wait(30)
