"""`maisi-synth serve`: the worker's requests over HTTP, for a GPU machine elsewhere on the network.

The server runs the same `Engine` as the stdio worker, in-process, so models stay loaded between
requests. The server owns the model folder, the device and where files live; a client uploads the
mask, names the outputs it wants, follows the events (polling or a JSON-lines stream) and downloads
the files. `client.RemoteClient` does all of that behind the same calls as the local worker.

    GET    /v1/ping                               ready info (device, versions), busy request
    POST   /v1/masks?name=mask.nii.gz             body: the mask file → {"mask_id"}
    POST   /v1/requests                           {"id", "mask_id", "outputs": {"output": "ct.nii.gz",
                                                   "preview": "ct.png"}, "params": {steps, seed, ...}}
    GET    /v1/requests/{id}/events?since=N       {"events": [...], "next": M, "done": bool}
    GET    /v1/requests/{id}/events?stream=1      the events as JSON lines, until result or error
    POST   /v1/requests/{id}/cancel
    GET    /v1/requests/{id}/files/{key}          key: output, preview or label_output
    DELETE /v1/requests/{id}                      forget the request and delete its files
    POST   /v1/shutdown

Bound to 127.0.0.1 by default. On any other address a token is required, sent as
`Authorization: Bearer <token>`; with a token set, every endpoint checks it.
"""

import hmac
import json
import ipaddress
import re
import shutil
import sys
import tempfile
import threading
import uuid
from pathlib import Path

from .errors import OptionError
from .worker import PROTOCOL_VERSION, Engine, device_info

SERVER_OWNED = ("mask", "output", "preview", "label_output", "model_dir", "device")
OUTPUT_KEYS = ("output", "preview", "label_output")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _safe_name(name: str) -> str:
    """A file name from a client: its last component, with unusual characters replaced."""
    base = Path(name.replace("\\", "/")).name
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")
    return base or "file"


class _RequestLog:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.events: list[dict] = []
        self.files: dict[str, Path] = {}
        self.mask: Path | None = None
        self.done = False


class Hub:
    """Routes the engine's events into per-request logs that HTTP handlers read or wait on."""

    def __init__(self, workdir: Path, defaults: dict) -> None:
        self.workdir = workdir
        self.requests: dict[str, _RequestLog] = {}
        self.uploads: dict[str, Path] = {}
        self.changed = threading.Condition()
        self.engine = Engine(self.emit, defaults)

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
            if event.get("type") in ("result", "error"):
                log.done = True
                if log.mask is not None:
                    shutil.rmtree(log.mask.parent, ignore_errors=True)
            log.events.append(event)
            self.changed.notify_all()


def create_app(hub: Hub, token: str | None, max_upload_bytes: int, on_shutdown=None):
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

    app = FastAPI(title="MaisiSynth", version=str(PROTOCOL_VERSION), docs_url=None, redoc_url=None)
    ready = {"type": "ready", "protocol": PROTOCOL_VERSION, **device_info(hub.engine.defaults.get("device", "auto"))}

    def problem(status: int, kind: str, message: str, hint: str = "") -> JSONResponse:
        return JSONResponse({"kind": kind, "message": message, "hint": hint}, status_code=status)

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if token is not None:
            sent = request.headers.get("authorization", "")
            expected = f"Bearer {token}"
            if not hmac.compare_digest(sent.encode("utf-8"), expected.encode("utf-8")):
                return problem(401, "unauthorized", "missing or wrong token", "send 'Authorization: Bearer <token>'")
        return await call_next(request)

    def find(request_id: str):
        with hub.changed:
            return hub.requests.get(request_id)

    @app.get("/v1/ping")
    def ping():
        return ready

    @app.post("/v1/masks")
    async def upload_mask(request: Request, name: str = "mask.nii.gz"):
        declared = request.headers.get("content-length")
        too_big = problem(
            413,
            "too-large",
            f"the upload is larger than the server's limit of {max_upload_bytes} bytes",
            "crop or compress the mask, or start the server with a larger --max-upload-mb",
        )
        if declared is not None and declared.isdigit() and int(declared) > max_upload_bytes:
            return too_big
        mask_id = uuid.uuid4().hex
        folder = hub.workdir / "uploads" / mask_id
        folder.mkdir(parents=True)
        path = folder / _safe_name(name)
        size = 0
        with open(path, "wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_upload_bytes:
                    f.close()
                    shutil.rmtree(folder, ignore_errors=True)
                    return too_big
                f.write(chunk)
        with hub.changed:
            hub.uploads[mask_id] = path
        return {"mask_id": mask_id, "bytes": size}

    @app.post("/v1/requests")
    async def submit(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return problem(400, "bad-request", "the body is not JSON", "send a JSON object")
        if not isinstance(body, dict):
            return problem(400, "bad-request", "the body must be a JSON object", "send a JSON object")
        with hub.changed:
            mask = hub.uploads.pop(str(body.get("mask_id")), None)
        if mask is None:
            return problem(404, "bad-request", "unknown mask_id", "upload the mask first (POST /v1/masks)")
        refused = _submit(body, mask)
        if refused is not None:  # an upload serves one request: a refused one takes its mask with it
            shutil.rmtree(mask.parent, ignore_errors=True)
        return refused or {"id": str(body["id"])}

    def _submit(body: dict, mask: Path):
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
                "upload the mask, name outputs in 'outputs'; the model and device are the server's",
            )
        unknown = sorted(set(outputs) - set(OUTPUT_KEYS))
        if unknown or "output" not in outputs:
            return problem(400, "bad-request", f"'outputs' needs 'output' and only {', '.join(OUTPUT_KEYS)}", "")
        request_id = body["id"] = str(body.get("id") or uuid.uuid4().hex[:12])
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", request_id):
            return problem(400, "bad-request", "a request id is 1–64 letters, digits, '-' or '_'", "")
        with hub.changed:
            if request_id in hub.requests:
                return problem(409, "bad-request", f"request id '{request_id}' exists", "use a new id")
            folder = hub.workdir / "requests" / request_id
            folder.mkdir(parents=True)
            log = _RequestLog(folder)
            log.mask = mask
            hub.requests[request_id] = log
        names = {key: _safe_name(str(value)) for key, value in outputs.items() if value}
        if len(set(names.values())) != len(names):
            names = {key: f"{key}-{name}" for key, name in names.items()}
        full = {**params, "mask": str(mask), **{key: str(folder / name) for key, name in names.items()}}
        hub.engine.handle({"type": "generate", "id": request_id, "params": full})
        return None

    @app.get("/v1/requests/{request_id}/events")
    def events(request_id: str, since: int = 0, stream: bool = False):
        log = find(request_id)
        if log is None:
            return problem(404, "bad-request", f"no request '{request_id}'", "")
        if not stream:
            with hub.changed:
                return {"events": log.events[since:], "next": len(log.events), "done": log.done}

        def lines():
            position = since
            while True:
                with hub.changed:
                    while position >= len(log.events) and not log.done:
                        hub.changed.wait(1.0)
                    batch = log.events[position:]
                    position = len(log.events)
                    finished = log.done
                for event in batch:
                    yield json.dumps(event) + "\n"
                if finished and position >= len(log.events):
                    return

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.post("/v1/requests/{request_id}/cancel")
    def cancel(request_id: str):
        log = find(request_id)
        if log is None:
            return problem(404, "bad-request", f"no request '{request_id}'", "")
        if log.done:
            return problem(409, "bad-request", f"request '{request_id}' has already finished", "")
        hub.engine.handle({"type": "cancel", "id": f"cancel-{request_id}", "target": request_id})
        return {"cancelling": request_id}

    @app.get("/v1/requests/{request_id}/files/{key}")
    def download(request_id: str, key: str):
        log = find(request_id)
        if log is None or key not in log.files or not log.files[key].exists():
            return problem(404, "bad-request", f"no file '{key}' for request '{request_id}'", "wait for its result")
        return FileResponse(log.files[key], filename=log.files[key].name)

    @app.delete("/v1/requests/{request_id}")
    def forget(request_id: str):
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
    def shutdown():
        hub.engine.shutdown()
        if on_shutdown is not None:
            on_shutdown()
        return {"type": "bye"}

    return app


def run_server(
    host: str = "127.0.0.1",
    port: int = 8765,
    token: str | None = None,
    model_dir: str | None = None,
    device: str = "auto",
    max_upload_bytes: int = 512 * 2**20,
    workdir: str | None = None,
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
    from .models import locate_model_folder
    from .pipeline import default_model_dir

    model_dir = str(locate_model_folder(model_dir or default_model_dir()).root)  # fail now, not per request
    own_tmp = workdir is None
    root = Path(tempfile.mkdtemp(prefix="maisi-synth-serve-")) if own_tmp else Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    hub = Hub(root, {"device": device, "model_dir": model_dir})
    server = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(hub, token, max_upload_bytes, on_shutdown=stop)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    print(
        f"serving {model_dir} on http://{host}:{port} ({'token required' if token else 'no token'})",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.run()
    finally:
        hub.engine.shutdown(wait=30)
        if own_tmp:
            shutil.rmtree(root, ignore_errors=True)
    return 0
