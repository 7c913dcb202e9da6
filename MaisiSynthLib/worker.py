"""The background worker: a long-lived process that keeps models loaded and speaks JSON lines.

Started by the Slicer module (through `client.py`) with any Python that has torch + MONAI, or by
`maisi-synth serve` in-process for remote use. One request per line on stdin, one event per line on
stdout; nothing else ever reaches stdout (the process's fd 1 is pointed at stderr at start-up, so
even C libraries print to stderr).

Requests (`id` is any string the caller chooses, echoed in every event about the request):

    {"type": "generate", "id": "r1", "params": {...}}   params: the fields of GenerateRequest
    {"type": "download", "id": "d1", "params": {"dest": null, "revision": "main", "token": null}}
                                                        the official weights (download.py); all optional
    {"type": "cancel", "id": "c1", "target": "r1"}
    {"type": "ping", "id": "p1"}
    {"type": "shutdown"}

Events:

    ready     once at start: pid, device, device name, memory, torch / CUDA / MONAI versions
    progress  id, stage (load, encode-mask, sample, decode, write; an edit of a reference CT adds
              encode-ct and composite), elapsed s; sample adds i, total;
              a download's stages are resolve, verify, download (file, done, size, bytes, total), install
    log       id (or null), level, message
    result    id, output paths, seed, steps, shape, spacing, timings per stage, peak memory, the
              model used in words ("model"), "models": "loaded" or "reused", and for an edit "edit"
              (region voxels and millilitres, crop shape and spacing, seconds); a download's result
              has model_dir, repo, revision, commit, files, sizes (never the token)
    error     id (or null), kind, message, hint; kinds: the engine's user errors (bad-mask, ...),
              cancelled, bad-request, out-of-memory, internal
    pong      id, busy (the running request id or null), queued
    bye       after shutdown (or end of stdin), just before the process exits with code 0

Requests run one at a time in arrival order; cancel and ping are answered at once, also while a
request runs. A cancelled request stops within one sampling step and writes nothing; a cancelled
download stops within one chunk and keeps what it fetched for the next one.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import queue
import sys
import threading
import traceback
from typing import Callable

from . import __version__
from .errors import CancelledError, MaisiSynthError
from .request import (
    MAX_JSON_BYTES,
    REQUEST_TYPES,
    RequestError,
    bye_event,
    check_params,
    error_event,
    log_event,
    parse_json,
    pong_event,
    progress_event,
    ready_event,
    result_event,
)

PROTOCOL_VERSION = 1
Emit = Callable[[dict], None]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# The request runner: request handling, independent of the transport (stdio here, HTTP in serve.py)


def _check_params(params: object) -> dict:
    if not isinstance(params, dict):
        raise RequestError("'params' of a generate request must be a JSON object", 'send {"params": {...}}')
    check_params(params)  # refuse a bad field now, not when the request's turn comes
    return params


def device_info(device: str = "auto") -> dict:
    """What the `ready` event reports about the machine."""
    import monai
    import torch

    from .models import resolve_device

    resolved = resolve_device(device)
    info = {
        "device": str(resolved),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "monai": monai.__version__,
        "maisi_synth": __version__,
        "python": platform.python_version(),
    }
    if resolved.type == "cuda":
        props = torch.cuda.get_device_properties(resolved)
        info["device_name"] = props.name
        info["memory_mb"] = round(props.total_memory / 2**20)
    else:
        info["device_name"] = f"CPU ({platform.machine() or 'unknown'}, {torch.get_num_threads()} threads)"
        try:
            info["memory_mb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20)
        except (ValueError, OSError, AttributeError):
            info["memory_mb"] = None
    return info


class RequestRunner:
    """Runs generate requests one at a time on its own thread and reports everything through `emit`.

    `handle(message)` is called by the transport for every incoming request and never blocks on a
    running generation. `defaults` are merged under each request's params (e.g. the server's model
    folder and device).
    """

    def __init__(self, emit: Emit, defaults: dict | None = None) -> None:
        self.emit = emit
        self.defaults = dict(defaults or {})
        from .models import ModelCache  # torch: imported when a runner starts, not with this module

        self.cache = ModelCache()
        self._jobs: queue.Queue = queue.Queue()
        self._cancel: dict[str, threading.Event] = {}  # queued or running request id → cancel flag
        self._lock = threading.Lock()
        self._running: str | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="maisi-synth-runner", daemon=True)
        self._thread.start()

    # -- incoming -------------------------------------------------------------------------------------

    def handle_line(self, line: str | bytes) -> None:
        try:
            message = parse_json(line, "request line")
        except RequestError as exc:
            self._error(None, exc)
            return
        self.handle(message)

    def handle(self, message: object) -> None:
        request_id = message.get("id") if isinstance(message, dict) else None
        try:
            if not isinstance(message, dict):
                raise RequestError("a request must be a JSON object", 'send e.g. {"type": "ping"}')
            if request_id is not None and (
                not isinstance(request_id, (str, int)) or isinstance(request_id, bool) or len(str(request_id)) > 200
            ):
                request_id = None  # never echo a malformed id back
                raise RequestError("'id' must be a string of at most 200 characters", "send a short string id")
            request_id = None if request_id is None else str(request_id)
            kind = message.get("type")
            if kind in ("generate", "download"):
                self.submit(request_id, message.get("params"), kind)
            elif kind == "cancel":
                self.cancel(request_id, message.get("target"))
            elif kind == "ping":
                with self._lock:
                    busy, queued = self._running, len(self._cancel) - (1 if self._running else 0)
                self.emit(pong_event(request_id, busy, queued))
            elif kind == "shutdown":
                self.shutdown()
            else:
                raise RequestError(f"unknown request type {kind!r}", f"use one of {', '.join(REQUEST_TYPES)}")
        except MaisiSynthError as exc:
            self._error(request_id, exc)

    def submit(self, request_id: str | None, params: object, kind: str = "generate") -> None:
        if not request_id:
            raise RequestError(f"a {kind} request needs an 'id'", "send an id, e.g. a UUID, to match the events")
        if kind == "download":
            from .download import check_download_params

            params = check_download_params(params)
        else:
            params = {**self.defaults, **_check_params(params)}
        with self._lock:
            if request_id in self._cancel:
                raise RequestError(f"request id '{request_id}' is already queued or running", "use a new id")
            if self._stopping.is_set():
                raise RequestError("the worker is shutting down", "start a new worker")
            self._cancel[request_id] = threading.Event()
        self._jobs.put((request_id, kind, params))

    def cancel(self, request_id: str | None, target: object) -> None:
        with self._lock:
            flag = self._cancel.get(str(target)) if target is not None else None
        if flag is None:
            raise RequestError(f"no queued or running request '{target}' to cancel", "it may have finished already")
        flag.set()  # the running request stops at its next step; a queued one ends when its turn comes
        self._log(request_id, "info", f"cancelling {target}")

    def shutdown(self, wait: float | None = None) -> None:
        """Cancel everything, stop the runner thread; `bye` is emitted when it has stopped."""
        with self._lock:
            self._stopping.set()
            for flag in self._cancel.values():
                flag.set()
        self._jobs.put(None)
        if wait is not None:
            self._thread.join(wait)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the runner thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                break
            request_id, kind, params = job
            with self._lock:
                flag = self._cancel[request_id]
                self._running = request_id
            try:
                if flag.is_set():
                    raise CancelledError()
                (self._download if kind == "download" else self._generate)(request_id, params, flag)
            except CancelledError as exc:
                self._error(request_id, exc)
            except MaisiSynthError as exc:
                self._error(request_id, exc)
            except BaseException as exc:  # noqa: BLE001 - one failing request must not end the worker
                self._crash(request_id, exc)
            finally:
                with self._lock:
                    self._cancel.pop(request_id, None)
                    self._running = None
        self.cache.clear()
        self.emit(bye_event())

    def _generate(self, request_id: str, params: dict, flag: threading.Event) -> None:
        from .pipeline import GenerateRequest, generate

        request = GenerateRequest.from_dict(params)

        def provide(folder, device, precision):
            models = self.cache.get(folder, device, precision)
            if self.cache.last_reused:
                self._log(request_id, "info", f"reusing the loaded models of {folder.root} on {device}")
            else:
                self._log(
                    request_id, "info", f"loaded the models of {folder.root} on {device} in {models.load_seconds:.1f} s"
                )
            return models

        def progress(event: dict) -> None:
            self.emit(progress_event(request_id, event))

        result = generate(request, models=provide, progress=progress, cancel=flag)
        self._log(request_id, "info", f"model: {result.model}")
        for note in result.notes:
            self._log(request_id, "warning", note)
        self.emit(result_event(request_id, result.to_dict(), models="reused" if self.cache.last_reused else "loaded"))

    def _download(self, request_id: str, params: dict, flag: threading.Event) -> None:
        """The official weights into a model folder; the token stays in this call, no event carries it."""
        from .download import download

        def progress(event: dict) -> None:
            self.emit(progress_event(request_id, event))

        result = download(
            params.get("dest"), params.get("revision"), params.get("token"), progress=progress, cancel=flag
        )
        self._log(request_id, "info", f"official weights {result.repo} ({result.commit[:12]}) in {result.model_dir}")
        self.emit(result_event(request_id, result.to_dict()))

    # -- outgoing -------------------------------------------------------------------------------------

    def _log(self, request_id: str | None, level: str, message: str) -> None:
        self.emit(log_event(request_id, level, message))

    def _error(self, request_id: str | None, exc: MaisiSynthError) -> None:
        self.emit(error_event(request_id, **exc.to_dict()))

    def _crash(self, request_id: str, exc: BaseException) -> None:
        import torch

        traceback.print_exc(file=sys.stderr)
        out_of_memory = isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(exc).lower()
        if out_of_memory:
            self.cache.clear()  # a fresh load after an OOM is safer than half-freed buffers
            error = {
                "kind": "out-of-memory",
                "message": f"ran out of memory: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                "hint": "use a smaller output size or decode window, fp16 precision, or a device with more memory",
            }
        else:
            error = {
                "kind": "internal",
                "message": f"{type(exc).__name__}: {exc}",
                "hint": "this is a bug or an unusual input; the worker's stderr has the traceback",
            }
            from .models import empty_cuda_cache

            empty_cuda_cache()
        self.emit(error_event(request_id, **error))


# ---------------------------------------------------------------------------------------------------
# The stdio transport


class _LineWriter:
    """Writes whole JSON lines to the protocol stream from any thread."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def __call__(self, event: dict) -> None:
        line = json.dumps(event, default=str)
        with self._lock:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (BrokenPipeError, ValueError):
                pass  # the reader is gone; the worker ends when stdin closes


def _protocol_stdout():
    """A private copy of stdout for protocol lines; fd 1 and sys.stdout then go to stderr."""
    sys.stdout.flush()
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return proto


def serve_stdio(device: str = "auto", model_dir: str | None = None) -> int:
    """Run the worker on stdin/stdout until `shutdown` or the end of stdin; returns the exit code."""
    emit = _LineWriter(_protocol_stdout())
    defaults = {"device": device}
    if model_dir:
        defaults["model_dir"] = model_dir
    runner = RequestRunner(emit, defaults)
    emit(ready_event(PROTOCOL_VERSION, pid=os.getpid(), **device_info(device)))
    stdin = sys.stdin.buffer
    while True:
        raw = stdin.readline(MAX_JSON_BYTES + 1)
        if not raw:
            runner.shutdown()
            break
        if len(raw) > MAX_JSON_BYTES and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # skip the rest of an overlong line, unbuffered
                raw = stdin.readline(MAX_JSON_BYTES)
            too_long = RequestError(f"a request line is longer than {MAX_JSON_BYTES} bytes", "send shorter lines")
            emit(error_event(None, **too_long.to_dict()))
            continue
        if not raw.strip():
            continue
        runner.handle_line(raw.strip())
        if runner.stopping:
            break
    runner.join()
    return 0
