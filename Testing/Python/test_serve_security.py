"""The HTTP server against hostile clients and web pages: a real server on 127.0.0.1, real sockets.

The server here runs without a token, as it does by default behind `ssh -L`: a web page in the
user's browser can reach it, so everything a page could do cross-site must fail.
"""

from __future__ import annotations

import http.client as httpclient
import json
import socket
import time

import nibabel as nib
import numpy as np
import pytest
from conftest import save_nifti, torso_labels
from test_serve import http, run_folder, start_server

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

SECRET = b"TOPSECRET-0123456789abcd"


@pytest.fixture(scope="module")
def open_server(tiny_model, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("open-serve")
    process, client = start_server(tiny_model, workdir, None, "--upload-timeout", "2", "--upload-ttl", "3")
    yield client, workdir, process
    if process.poll() is None:
        try:
            client.shutdown()
            process.wait(30)
        finally:
            if process.poll() is None:
                process.kill()


@pytest.fixture(scope="module")
def mask_bytes(tmp_path_factory):
    return save_nifti(tmp_path_factory.mktemp("m") / "mask.nii.gz", torso_labels()).read_bytes()


def raw(client, method: str, path: str, body: bytes = b"", headers: dict | None = None, host: str | None = None):
    """One request with exactly these headers (no token); returns (status, body bytes)."""
    port = int(client.url.rsplit(":", 1)[1])
    conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest(method, path, skip_host=host is not None)
    if host is not None:
        conn.putheader("Host", host)
    for key, value in (headers or {}).items():
        conn.putheader(key, value)
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def test_an_upload_cannot_make_the_server_read_its_own_files(open_server, tmp_path):
    client, workdir, _ = open_server
    secret = tmp_path / "secret.bin"
    secret.write_bytes(SECRET)
    header = "NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 3 4\nencoding: raw\ndata file: {}\n\n"
    for name, target in [("a.nhdr", str(secret)), ("b.nrrd", str(secret)), ("c.nrrd", "../../" + secret.name)]:
        status, body = raw(
            client,
            "POST",
            f"/v1/masks?name={name}",
            header.format(target).encode(),
            {"Content-Type": "application/octet-stream"},
        )
        assert status == 422, (name, body)
        detail = json.loads(body)
        assert detail["kind"] == "bad-mask" and "detached header" in detail["message"]
        assert SECRET not in body and b"84" not in body  # neither the bytes nor their values come back
    assert not list((run_folder(workdir) / "uploads").iterdir())
    # a header declaring a huge volume in a few bytes is refused before anything is allocated
    bomb = nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4))
    bomb.header.set_data_shape((1088, 1088, 1088))
    import gzip

    status, body = raw(
        client,
        "POST",
        "/v1/masks?name=bomb.nii.gz",
        gzip.compress(bomb.header.binaryblock + b"\0" * 4),
        {"Content-Type": "application/octet-stream"},
    )
    assert status == 422 and "declares 1088x1088x1088" in json.loads(body)["message"]


def test_a_web_page_cannot_shut_the_server_down(open_server):
    client, _, process = open_server
    port = client.url.rsplit(":", 1)[1]
    attacks = [
        # a cross-site form/fetch without preflight: text/plain, with the page's Origin
        ({"Content-Type": "text/plain", "Origin": "http://evil.example"}, None),
        # the same from a page that hides its Origin: still not JSON
        ({"Content-Type": "text/plain"}, None),
        # DNS rebinding: the page's own host name resolved to 127.0.0.1
        ({"Content-Type": "application/json"}, f"evil.example:{port}"),
        ({"Content-Type": "application/json", "Origin": f"http://evil.example:{port}"}, f"evil.example:{port}"),
        # JSON with a foreign Origin (would need a preflight the server never answers)
        ({"Content-Type": "application/json", "Origin": "http://evil.example"}, None),
    ]
    for headers, host in attacks:
        status, _ = raw(client, "POST", "/v1/shutdown", b"{}", headers, host)
        assert status in (403, 415), (headers, host, status)
    status, _ = raw(client, "GET", "/v1/ping", host=f"evil.example:{port}")
    assert status == 403
    time.sleep(0.5)
    assert process.poll() is None and client.start()["type"] == "ready"


def test_open_event_streams_do_not_freeze_the_server(open_server, mask_bytes, tmp_path):
    """One long request followed by 45 open streams: ping and cancel still answer at once."""
    client, _, _ = open_server
    mask = tmp_path / "mask.nii.gz"
    mask.write_bytes(mask_bytes)
    status, body = http(client, "POST", "/v1/masks?name=m.nii.gz", mask_bytes, token=None)
    assert status == 200
    status, _ = http(
        client,
        "POST",
        "/v1/requests",
        json.dumps({"id": "long", "mask_id": body["mask_id"], "params": {"steps": 1000}}).encode(),
        token=None,
    )
    assert status == 200
    streams = []
    for _ in range(45):
        conn = httpclient.HTTPConnection("127.0.0.1", int(client.url.rsplit(":", 1)[1]), timeout=60)
        conn.request("GET", "/v1/requests/long/events?stream=1")
        streams.append(conn)
    try:
        started = time.monotonic()
        assert http(client, "GET", "/v1/ping", token=None)[0] == 200
        status, _ = http(client, "POST", "/v1/requests/long/cancel", b"{}", token=None)
        assert status == 200 and time.monotonic() - started < 5
        deadline = time.monotonic() + 60
        while http(client, "GET", "/v1/requests/long/events", token=None)[1]["done"] is False:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        events = http(client, "GET", "/v1/requests/long/events", token=None)[1]["events"]
        assert events[-1]["kind"] == "cancelled"
    finally:
        for conn in streams:
            conn.close()
    assert http(client, "DELETE", "/v1/requests/long", token=None)[0] == 200


def test_uploads_time_out_expire_and_leave_nothing_behind(open_server, mask_bytes):
    client, workdir, _ = open_server
    uploads = run_folder(workdir) / "uploads"
    port = int(client.url.rsplit(":", 1)[1])
    # a stalled upload (declares 1000 bytes, sends 10) is dropped after the idle timeout
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /v1/masks?name=s.nii.gz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10
    )
    sock.settimeout(15)
    reply = sock.recv(4096)
    sock.close()
    assert b" 408 " in reply.split(b"\r\n", 1)[0]
    # a client that disconnects half-way leaves no partial file
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /v1/masks?name=d.nii.gz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n" + b"x" * 5000
    )
    sock.close()
    time.sleep(1.0)
    assert not list(uploads.iterdir())
    # an upload can be deleted, and an unused one expires (ttl 3 s here)
    status, body = http(client, "POST", "/v1/masks?name=" + "n" * 300 + ".nii.gz", mask_bytes, token=None)
    assert status == 200
    (kept,) = list(next(uploads.iterdir()).iterdir())
    assert len(kept.name) <= 100 and kept.name.endswith(".nii.gz")  # a long name is shortened, format kept
    assert http(client, "DELETE", f"/v1/masks/{body['mask_id']}", token=None)[0] == 200
    assert not list(uploads.iterdir())
    status, body = http(client, "POST", "/v1/masks?name=m.nii.gz", mask_bytes, token=None)
    time.sleep(3.5)
    http(client, "POST", "/v1/masks?name=other.nii.gz", mask_bytes, token=None)  # any upload sweeps
    status, reply = http(client, "POST", "/v1/requests", json.dumps({"mask_id": body["mask_id"]}).encode(), token=None)
    assert status == 404


def test_hostile_bodies_get_one_clear_refusal(open_server, mask_bytes, tiny_model, tmp_path):
    client, workdir, _ = open_server
    deep = b"[" * 100000
    status, body = http(client, "POST", "/v1/requests", deep, token=None)
    assert status == 400 and "nests" in body["message"]
    status, body = http(client, "POST", "/v1/requests", b'{"id": ' + b"9" * 5000 + b"}", token=None)
    assert status == 400 and "digits" in body["message"]
    status, up = http(client, "POST", "/v1/masks?name=m.nii.gz", mask_bytes, token=None)
    bad = {"mask_id": up["mask_id"], "params": {"solver": ["euler"], "steps": 2}}
    status, body = http(client, "POST", "/v1/requests", json.dumps(bad).encode(), token=None)
    assert status == 400 and "solver" in body["message"]
    # results and logs name the model, never the server's folders
    status, up = http(client, "POST", "/v1/masks?name=m.nii.gz", mask_bytes, token=None)
    ok = {"id": "named", "mask_id": up["mask_id"], "params": {"steps": 2}}
    assert http(client, "POST", "/v1/requests", json.dumps(ok).encode(), token=None)[0] == 200
    deadline = time.monotonic() + 120
    while not http(client, "GET", "/v1/requests/named/events", token=None)[1]["done"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    text = json.dumps(http(client, "GET", "/v1/requests/named/events", token=None)[1]["events"])
    assert '"type": "result"' in text
    assert str(tiny_model) not in text and str(workdir) not in text and tiny_model.name in text


def test_a_reused_workdir_serves_again(tiny_model, tmp_path, mask_bytes):
    for _ in range(2):
        process, client = start_server(tiny_model, tmp_path / "work", None)
        try:
            status, up = http(client, "POST", "/v1/masks?name=m.nii.gz", mask_bytes, token=None)
            body = json.dumps({"id": "same-id", "mask_id": up["mask_id"], "params": {"steps": 1}}).encode()
            assert http(client, "POST", "/v1/requests", body, token=None)[0] == 200
        finally:
            client.shutdown()
            process.wait(30)
