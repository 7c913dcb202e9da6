"""`maisi-synth serve`: the worker's requests over HTTP, for a GPU machine elsewhere on the network.

The server runs the same `RequestRunner` as the stdio worker, in-process, so models stay loaded between
requests. The server owns the model folder, the device and where files live; a client uploads the
mask, names the outputs it wants, follows the events (polling or a JSON-lines stream) and downloads
the files. `client.RemoteClient` does all of that behind the same calls as the local worker.

    GET    /v1/ping                               ready info (device, versions), busy request
    POST   /v1/masks?name=mask.nii.gz             body: a volume file (a mask, or the reference CT,
                                                   original mask or edit region of an edit) → {"mask_id"}
    POST   /v1/requests                           {"id", "mask_id", "outputs": {"output": "ct.nii.gz",
                                                   "preview": "ct.png"}, "params": {steps, seed, ...}}
                                                   an edit adds "reference_ct_id" (and "original_mask_id"
                                                   or "edit_region_id"), uploads like the mask's
    GET    /v1/requests/{id}/events?since=N       {"events": [...], "next": M, "done": bool}
    GET    /v1/requests/{id}/events?stream=1      the events as JSON lines, until result or error
    POST   /v1/requests/{id}/cancel
    GET    /v1/requests/{id}/files/{key}          key: output, preview or label_output
    DELETE /v1/requests/{id}                      forget the request and delete its files
    POST   /v1/shutdown

    DELETE /v1/masks/{mask_id}                    drop an upload no request used

Bound to 127.0.0.1 by default. On any other address a token is required, sent as
`Authorization: Bearer <token>`; with a token set, every endpoint checks it.

Hostile clients and web pages: on a loopback binding the `Host` header must name the loopback
(a DNS-rebinding page cannot reach the API) and a request with a foreign `Origin` is refused;
every POST must be `application/json` (uploads `application/octet-stream`), which a page cannot
send cross-site without a CORS preflight this server never grants. Uploads are self-contained
volumes only (no NRRD `data file` pointing elsewhere), checked against their declared size before
anything reads them; a stalled upload times out, a broken one leaves nothing, an unused one expires.
Event streams wait asynchronously, so open streams never hold the threads other calls need. Server
paths (work folder, model folder) never appear in a response.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run time
# and must find `Request`, which is imported inside create_app (FastAPI is an optional extra).
# Hence Optional[...] instead of `X | None`, which Python 3.9 cannot evaluate.
import asyncio
import hmac
import ipaddress
import json
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

from .errors import MaisiSynthError, OptionError
from .request import (
    INPUT_FIELDS,
    OUTPUT_FIELDS,
    RequestError,
    bye_event,
    cancel_request,
    job_request,
    parse_json,
    ready_event,
)
from .worker import PROTOCOL_VERSION, RequestRunner, device_info

SERVER_OWNED = (*INPUT_FIELDS, *OUTPUT_FIELDS, "model_dir", "device")  # the server chooses these, never a client
# the body's upload id of each input file: "mask_id", "reference_ct_id", ...
UPLOAD_KEYS = {f"{name}_id": name for name in INPUT_FIELDS}
OUTPUT_KEYS = OUTPUT_FIELDS
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_NAME = 100  # characters of a client's file name kept on the server
UPLOAD_IDLE_SECONDS = 60.0  # an upload that sends nothing for this long is dropped
UPLOAD_TTL_SECONDS = 3600.0  # an upload no request used is deleted after this long


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _safe_name(name: str) -> str:
    """A file name from a client: its last component, unusual characters replaced, at most
    MAX_NAME characters (the volume suffix kept, so the format is still known)."""
    base = Path(name.replace("\\", "/")).name
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")
    if len(base) > MAX_NAME:
        lower = base.lower()
        suffix = next((s for s in (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".png") if lower.endswith(s)), "")
        base = base[: MAX_NAME - len(suffix)] + suffix
    return base or "file"


def _host_of(value: str) -> str:
    """The host part of a Host header or an Origin (scheme, port and brackets removed)."""
    value = value.strip().lower()
    if "://" in value:
        value = value.split("://", 1)[1]
    value = value.split("/", 1)[0]
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class _RequestLog:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.events: list[dict] = []
        self.files: dict[str, Path] = {}
        self.uploads: list = []  # the uploaded inputs this request uses, deleted when it ends
        self.done = False


class Hub:
    """Routes the request runner's events into per-request logs that HTTP handlers read or wait on."""

    def __init__(self, workdir: Path, defaults: dict) -> None:
        self.workdir = workdir
        self.requests: dict[str, _RequestLog] = {}
        self.uploads: dict = {}  # mask id → (file, monotonic time of upload)
        self.changed = threading.Condition()
        self.runner = RequestRunner(self.emit, defaults)
        model_dir = str(defaults.get("model_dir") or "")
        # Server paths never reach a client: the work folder and the model folder are replaced by names.
        self._private = [(str(workdir.resolve()), "<server>"), (str(workdir), "<server>")]
        if model_dir:
            self._private += [(str(Path(model_dir).resolve()), Path(model_dir).name), (model_dir, Path(model_dir).name)]

    def _scrub(self, value):
        if isinstance(value, str):
            for private, public in self._private:
                if private and private in value:
                    value = value.replace(private, public)
            return value
        if isinstance(value, dict):
            return {k: self._scrub(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._scrub(v) for v in value]
        return value

    def expire_uploads(self, ttl: float = UPLOAD_TTL_SECONDS) -> None:
        """Delete uploads that no request used within `ttl` seconds."""
        now = time.monotonic()
        with self.changed:
            old = [k for k, (_, t) in self.uploads.items() if now - t > ttl]
            paths = [self.uploads.pop(k)[0] for k in old]
        for path in paths:
            shutil.rmtree(path.parent, ignore_errors=True)

    def emit(self, event: dict) -> None:
        with self.changed:
            log = self.requests.get(str(event.get("id")))
            if log is None:
                return  # events of no request (e.g. a cancel's own log line)
            if event.get("type") == "result":
                # keep server paths private: the client downloads by key
                for key in OUTPUT_KEYS:
                    if event.get(key):
                        log.files[key] = Path(event[key])
                        event = {**event, key: Path(event[key]).name}
            event = self._scrub(event)
            if event.get("type") in ("result", "error"):
                log.done = True
                for upload in log.uploads:
                    shutil.rmtree(upload.parent, ignore_errors=True)
            log.events.append(event)
            self.changed.notify_all()


def create_app(
    hub: Hub,
    token: Optional[str],
    max_upload_bytes: int,
    on_shutdown=None,
    loopback: bool = True,
    upload_idle_seconds: float = UPLOAD_IDLE_SECONDS,
    upload_ttl_seconds: float = UPLOAD_TTL_SECONDS,
):
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

    app = FastAPI(title="MaisiSynth", version=str(PROTOCOL_VERSION), docs_url=None, redoc_url=None)
    # the upload limit is public: a client refuses a larger file before sending it (a body cut off by
    # an early 413 reaches the client as a broken connection, not as the answer)
    ready = ready_event(
        PROTOCOL_VERSION, **device_info(hub.runner.defaults.get("device", "auto")), max_upload_bytes=max_upload_bytes
    )

    def problem(status: int, kind: str, message: str, hint: str = "") -> JSONResponse:
        return JSONResponse({"kind": kind, "message": message, "hint": hint}, status_code=status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        host = _host_of(request.headers.get("host", ""))
        if loopback and host not in LOOPBACK_HOSTS:
            # DNS rebinding: a page on attacker.example resolved to 127.0.0.1 sends Host: attacker.example
            return problem(403, "forbidden", "requests must name this server as 127.0.0.1 or localhost", "")
        origin = request.headers.get("origin")
        if origin is not None and _host_of(origin) != host:
            return problem(
                403, "forbidden", "cross-site requests are refused", "call the API from a program, not a web page"
            )
        if token is not None:
            sent = request.headers.get("authorization", "")
            expected = f"Bearer {token}"
            if not hmac.compare_digest(sent.encode("utf-8"), expected.encode("utf-8")):
                return problem(401, "unauthorized", "missing or wrong token", "send 'Authorization: Bearer <token>'")
        if request.method == "POST":
            wanted = "application/octet-stream" if request.url.path == "/v1/masks" else "application/json"
            sent = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if sent != wanted:
                return problem(
                    415, "bad-request", f"this call takes Content-Type: {wanted}", f"send the body as {wanted}"
                )
        return await call_next(request)

    def find(request_id: str):
        with hub.changed:
            return hub.requests.get(request_id)

    @app.get("/v1/ping")
    async def ping():
        return ready

    @app.post("/v1/masks")
    async def upload_mask(request: Request, name: str = "mask.nii.gz"):
        from .volumes import check_volume_file, format_of

        hub.expire_uploads(upload_ttl_seconds)
        declared = request.headers.get("content-length")
        too_big = problem(
            413,
            "too-large",
            f"the upload is larger than the server's limit of {max_upload_bytes} bytes",
            "crop or compress the volume, or start the server with a larger --max-upload-mb",
        )
        if declared is not None and declared.isdigit() and int(declared) > max_upload_bytes:
            return too_big
        safe = _safe_name(name)
        if format_of(safe) not in ("nifti", "nrrd", "seg.nrrd"):
            return problem(415, "bad-mask", f"{safe} is not a supported volume format", "upload .nii.gz, .nii or .nrrd")
        mask_id = uuid.uuid4().hex
        folder = hub.workdir / "uploads" / mask_id
        folder.mkdir(parents=True)
        path = folder / safe
        size = 0
        complete = False
        try:
            with open(path, "wb") as f:
                chunks = request.stream().__aiter__()
                while True:
                    try:
                        chunk = await asyncio.wait_for(chunks.__anext__(), upload_idle_seconds)
                    except StopAsyncIteration:
                        break
                    size += len(chunk)
                    if size > max_upload_bytes:
                        return too_big
                    f.write(chunk)
            check_volume_file(path, "upload", detached="never")
            complete = True
        except asyncio.TimeoutError:
            return problem(408, "bad-request", f"the upload stalled for {upload_idle_seconds:.0f} s", "upload again")
        except MaisiSynthError as exc:
            return problem(422, exc.kind, exc.message, exc.hint)
        except Exception:  # noqa: BLE001 - the client went away mid-upload: keep nothing of it
            return problem(400, "bad-request", "the upload was interrupted", "upload again")
        finally:
            if not complete:
                shutil.rmtree(folder, ignore_errors=True)
        with hub.changed:
            hub.uploads[mask_id] = (path, time.monotonic())
        return {"mask_id": mask_id, "bytes": size}

    @app.delete("/v1/masks/{mask_id}")
    async def drop_mask(mask_id: str):
        with hub.changed:
            entry = hub.uploads.pop(mask_id, None)
        if entry is None:
            return problem(404, "bad-request", "unknown mask_id", "")
        shutil.rmtree(entry[0].parent, ignore_errors=True)
        return {"deleted": mask_id}

    @app.post("/v1/requests")
    async def submit(request: Request):
        try:
            body = parse_json(await request.body(), "request body")
        except RequestError as exc:
            return problem(400, exc.kind, exc.message, exc.hint)
        if not isinstance(body, dict):
            return problem(400, "bad-request", "the body must be a JSON object", "send a JSON object")
        hub.expire_uploads(upload_ttl_seconds)
        inputs, missing = {}, []
        with hub.changed:
            for key, name in UPLOAD_KEYS.items():
                if name == "mask" or body.get(key) is not None:
                    entry = hub.uploads.pop(str(body.get(key)), None)
                    if entry is None:
                        missing.append(key)
                    else:
                        inputs[name] = entry[0]
        refused = None
        if missing:
            refused = problem(
                404,
                "bad-request",
                f"unknown {', '.join(missing)}",
                "upload the mask first (POST /v1/masks), and each other input file the same way",
            )
        else:
            refused = _submit(body, inputs)
        if refused is not None:  # an upload serves one request: a refused one takes its files with it
            for path in inputs.values():
                shutil.rmtree(path.parent, ignore_errors=True)
        return refused or {"id": str(body["id"])}

    def _submit(body: dict, inputs: dict):
        params = body.get("params") or {}
        outputs = body.get("outputs") or {"output": "ct.nii.gz"}
        if not isinstance(params, dict) or not isinstance(outputs, dict):
            return problem(400, "bad-request", "'params' and 'outputs' must be JSON objects", "see the API docs")
        owned = sorted(set(params) & set(SERVER_OWNED))
        if owned:
            return problem(
                400,
                "bad-request",
                f"the server decides {', '.join(owned)}",
                "upload the input files, name outputs in 'outputs'; the model and device are the server's",
            )
        unknown = sorted(set(outputs) - set(OUTPUT_KEYS))
        if unknown or "output" not in outputs:
            return problem(400, "bad-request", f"'outputs' needs 'output' and only {', '.join(OUTPUT_KEYS)}", "")
        request_id = body.get("id") or uuid.uuid4().hex[:12]
        if not isinstance(request_id, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", request_id):
            return problem(400, "bad-request", "a request id is 1–64 letters, digits, '-' or '_'", "")
        body["id"] = request_id
        try:
            from .request import check_params

            check_params({**params, **{name: name for name in inputs}, "output": "output"})
        except RequestError as exc:
            return problem(400, exc.kind, exc.message, exc.hint)
        with hub.changed:
            if request_id in hub.requests:
                return problem(409, "bad-request", f"request id '{request_id}' exists", "use a new id")
            folder = hub.workdir / "requests" / request_id
            folder.mkdir(parents=True)
            log = _RequestLog(folder)
            log.uploads = list(inputs.values())
            hub.requests[request_id] = log
        names = {key: _safe_name(str(value)) for key, value in outputs.items() if value}
        if len(set(names.values())) != len(names):
            names = {key: f"{key}-{name}" for key, name in names.items()}
        full = {
            **params,
            **{name: str(path) for name, path in inputs.items()},
            **{key: str(folder / name) for key, name in names.items()},
        }
        hub.runner.handle(job_request("generate", request_id, full))
        return None

    @app.get("/v1/requests/{request_id}/events")
    async def events(request_id: str, since: int = 0, stream: bool = False):
        log = find(request_id)
        if log is None:
            return problem(404, "bad-request", f"no request '{request_id}'", "")
        since = max(0, since)
        if not stream:
            with hub.changed:
                return {"events": log.events[since:], "next": len(log.events), "done": log.done}

        async def lines():
            # Polls on the event loop: an open stream costs no thread, however many are open.
            position = since
            while True:
                with hub.changed:
                    batch = log.events[position:]
                    position = len(log.events)
                    finished = log.done
                for event in batch:
                    yield json.dumps(event) + "\n"
                if finished:
                    return
                if not batch:
                    await asyncio.sleep(0.05)

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.post("/v1/requests/{request_id}/cancel")
    async def cancel(request_id: str):
        log = find(request_id)
        if log is None:
            return problem(404, "bad-request", f"no request '{request_id}'", "")
        if log.done:
            return problem(409, "bad-request", f"request '{request_id}' has already finished", "")
        hub.runner.handle(cancel_request(f"cancel-{request_id}", request_id))
        return {"cancelling": request_id}

    @app.get("/v1/requests/{request_id}/files/{key}")
    async def download(request_id: str, key: str):
        log = find(request_id)
        if log is None or key not in log.files or not log.files[key].exists():
            return problem(404, "bad-request", f"no file '{key}' for request '{request_id}'", "wait for its result")
        return FileResponse(log.files[key], filename=log.files[key].name)

    @app.delete("/v1/requests/{request_id}")
    async def forget(request_id: str):
        with hub.changed:
            log = hub.requests.get(request_id)
            if log is None:
                return problem(404, "bad-request", f"no request '{request_id}'", "")
            if not log.done:
                return problem(409, "bad-request", f"request '{request_id}' is still running", "cancel it first")
            hub.requests.pop(request_id)
        shutil.rmtree(log.folder, ignore_errors=True)
        return {"deleted": request_id}

    @app.post("/v1/shutdown")
    async def shutdown():
        hub.runner.shutdown()
        if on_shutdown is not None:
            on_shutdown()
        return bye_event()

    return app


def run_server(
    host: str = "127.0.0.1",
    port: int = 8765,
    token: Optional[str] = None,
    model_dir: Optional[str] = None,
    device: str = "auto",
    max_upload_bytes: int = 512 * 2**20,
    workdir: Optional[str] = None,
    upload_timeout: float = UPLOAD_IDLE_SECONDS,
    upload_ttl: float = UPLOAD_TTL_SECONDS,
) -> int:
    if not is_loopback(host) and not token:
        raise OptionError(
            f"serving on {host} (reachable from other machines) needs a token",
            "set MAISI_SYNTH_TOKEN or pass --token-file, or bind to 127.0.0.1",
        )
    if max_upload_bytes <= 0:
        raise OptionError("--max-upload-mb must be positive", "pass e.g. --max-upload-mb 512")
    try:
        import uvicorn
    except ImportError:
        raise OptionError("serving over HTTP needs FastAPI and uvicorn", "pip install 'maisi-synth[serve]'") from None
    from .model_home import choose_model_dir
    from .models import locate_model_folder

    choice = choose_model_dir(model_dir)
    model_dir = str(locate_model_folder(choice.path).root)  # fail now, not per request
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    # A fresh folder per run, also inside a given --workdir: a reused one may hold an earlier run's
    # uploads and request folders.
    root = Path(tempfile.mkdtemp(prefix="maisi-synth-serve-", dir=workdir))
    hub = Hub(root, {"device": device, "model_dir": model_dir})
    server = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    if upload_timeout <= 0 or upload_ttl <= 0:
        raise OptionError("--upload-timeout and --upload-ttl must be positive", "pass e.g. --upload-timeout 60")
    app = create_app(
        hub,
        token,
        max_upload_bytes,
        on_shutdown=stop,
        loopback=is_loopback(host),
        upload_idle_seconds=upload_timeout,
        upload_ttl_seconds=upload_ttl,
    )
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    print(
        f"serving {choice.describe()} on http://{host}:{port} ({'token required' if token else 'no token'})",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.run()
    finally:
        hub.runner.shutdown(wait=30)
        shutil.rmtree(root, ignore_errors=True)
    return 0
