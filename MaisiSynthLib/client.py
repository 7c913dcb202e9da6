"""Clients of the worker: a local subprocess (`WorkerClient`) or a remote server (`RemoteClient`).

No Qt here. Events arrive on background threads and wait in a queue; a GUI drains them with
`poll()` from a timer, so every callback runs on the GUI's own thread. Scripts and tests use
`wait(request_id)`.

    client = WorkerClient(python="/path/to/python", env={"CUDA_VISIBLE_DEVICES": "-1"})
    client.start()
    rid = client.generate({"mask": "m.nii.gz", "output": "ct.nii.gz"}, callback=on_event)
    ...  # QTimer: client.poll()
    client.cancel(rid)        # the worker stops within one step; killed if it does not answer
    client.shutdown()

Every request ends with exactly one `result` or `error` event. When the worker dies, each pending
request gets an `error` of kind `worker-died` (exit code and the last stderr lines in the message),
and an `exit` event follows.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Callable

from .request import (
    INPUT_FIELDS,
    OUTPUT_FIELDS,
    TERMINAL_EVENTS,
    cancel_request,
    error_event,
    exit_event,
    job_request,
    ping_request,
    shutdown_request,
)

Callback = Callable[[dict], None]
TERMINAL = TERMINAL_EVENTS


class WorkerError(RuntimeError):
    """The worker could not be started or is gone."""


class _EventClient:
    """Event queue, per-request callbacks, poll/wait: what both clients share."""

    def __init__(self, on_event: Callback | None = None) -> None:
        self.on_event = on_event
        self._events: queue.Queue = queue.Queue()
        self._callbacks: dict[str, Callback | None] = {}
        self._pending: set[str] = set()
        self._ended: set[str] = set()
        self._finished: dict[str, dict] = {}
        self._lock = threading.Lock()

    # -- for subclasses -------------------------------------------------------------------------------

    def _push(self, event: dict) -> None:
        rid = event.get("id")
        if event.get("type") in TERMINAL and rid is not None:
            with self._lock:
                if rid in self._ended:
                    return  # a late duplicate (e.g. the worker's own error after we reported its death)
                self._ended.add(rid)
                self._pending.discard(rid)
        self._events.put(event)

    def _register(self, request_id: str, callback: Callback | None) -> None:
        with self._lock:
            self._callbacks[request_id] = callback
            self._pending.add(request_id)

    def _fail_pending(self, kind: str, message: str, hint: str = "") -> None:
        with self._lock:
            pending = list(self._pending)
        for rid in pending:
            self._push(error_event(rid, kind, message, hint))

    # -- public ---------------------------------------------------------------------------------------

    @property
    def pending(self) -> list[str]:
        with self._lock:
            return sorted(self._pending)

    def poll(self) -> list[dict]:
        """Deliver every event that has arrived (callbacks run here, on the caller's thread)."""
        delivered = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return delivered
            self._deliver(event)
            delivered.append(event)

    def _deliver(self, event: dict) -> None:
        rid = event.get("id")
        callback = self._callbacks.get(rid) if rid is not None else None
        if event.get("type") in TERMINAL and rid is not None:
            self._finished[rid] = event
            self._callbacks.pop(rid, None)
        if callback is not None:
            callback(event)
        if self.on_event is not None:
            self.on_event(event)

    def wait(self, request_id: str, timeout: float | None = None) -> dict:
        """Deliver events until `request_id` ends; returns its `result` or `error` event."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while request_id not in self._finished:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"request {request_id} did not finish within {timeout} s")
            try:
                event = self._events.get(timeout=0.1 if left is None else min(left, 0.1))
            except queue.Empty:
                continue
            self._deliver(event)
        return self._finished.pop(request_id)


# ---------------------------------------------------------------------------------------------------
# Local worker process


def kill_tree(pid: int) -> None:
    """Kill a process and everything it started (the worker runs in its own process group)."""
    if sys.platform == "win32":
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(pid)], capture_output=True)
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# Variables an embedding application's launcher (3D Slicer's among them) sets for its own Python;
# handed to another interpreter they make it load the wrong standard library ("SRE module mismatch").
LAUNCHER_PYTHON_VARIABLES = (
    "PYTHONHOME",
    "PYTHONPATH",
    "PYTHONNOUSERSITE",
    "PYTHONSTARTUP",
    "PYTHONEXECUTABLE",
    "PYTHONPLATLIBDIR",
    "PYTHONSAFEPATH",
)


def worker_environment(python: str, base: dict | None = None, extra: dict | None = None) -> dict:
    """The environment to start the worker with: `base` (default: this process's), cleaned of the
    launcher's Python variables when `python` is not this process's own interpreter, plus `extra`,
    plus the folder that holds this MaisiSynthLib (so a Python without an installed copy finds it)."""
    env = dict(os.environ if base is None else base)
    if not same_interpreter(python):
        for name in LAUNCHER_PYTHON_VARIABLES:
            env.pop(name, None)
    env.update(extra or {})
    env["PYTHONUNBUFFERED"] = "1"
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def same_interpreter(python: str) -> bool:
    try:
        return os.path.samefile(python, sys.executable)
    except OSError:
        return os.path.normcase(os.path.abspath(python)) == os.path.normcase(os.path.abspath(sys.executable))


class WorkerClient(_EventClient):
    """Starts `python -m MaisiSynthLib worker` and talks JSON lines with it.

    `python`: the interpreter (default: this one; `~` is expanded). `base_env`: the environment to
    start from (default: this process's); inside 3D Slicer, pass `slicer.util.startupEnvironment()`
    for a Python other than Slicer's. `env`: variables to set on top.
    """

    def __init__(
        self,
        python: str | None = None,
        env: dict | None = None,
        worker_args: list[str] | None = None,
        cwd: str | Path | None = None,
        on_event: Callback | None = None,
        stderr_lines: int = 40,
        cancel_timeout: float = 15.0,
        base_env: dict | None = None,
    ) -> None:
        super().__init__(on_event)
        self.python = os.path.expanduser(python) if python else sys.executable
        self.env = env
        self.base_env = base_env
        self.worker_args = list(worker_args or [])
        self.cwd = cwd
        self.cancel_timeout = cancel_timeout
        self.ready: dict | None = None
        self.process: subprocess.Popen | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=stderr_lines)
        self._write_lock = threading.Lock()
        self._ready_event = threading.Event()
        self._exited = threading.Event()

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self, timeout: float = 300.0) -> dict:
        """Start the worker and wait for its `ready` event (importing torch takes a few seconds)."""
        env = worker_environment(self.python, self.base_env, self.env)
        kwargs: dict = {}
        if sys.platform == "win32":
            # its own process group (for taskkill /T), and no console window popping up over Slicer
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # its own process group: kill_tree reaches its children
        try:
            self.process = subprocess.Popen(
                [self.python, "-m", "MaisiSynthLib", "worker", *self.worker_args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=self.cwd,
                env=env,
                **kwargs,
            )
        except OSError as exc:
            raise WorkerError(f"cannot start the worker with {self.python}: {exc.strerror or exc}") from None
        threading.Thread(target=self._read_stdout, daemon=True, name="maisi-synth-stdout").start()
        threading.Thread(target=self._read_stderr, daemon=True, name="maisi-synth-stderr").start()
        self._ready_event.wait(timeout)
        if self.ready is None:
            if self._exited.wait(1.0):
                raise WorkerError(f"the worker exited with code {self.returncode} before it was ready{self._tail()}")
            self.kill()
            raise WorkerError(f"the worker was not ready within {timeout:.0f} s{self._tail()}")
        return self.ready

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    @property
    def stderr_tail(self) -> list[str]:
        return list(self._stderr)

    def wait_exit(self, timeout: float | None = None) -> int | None:
        """Wait until the worker has exited and its end is reported; returns the exit code."""
        self._exited.wait(timeout)
        return self.returncode

    def kill(self) -> None:
        """Kill the worker and its children at once; pending requests end with `worker-died`."""
        if self.process is not None and self.process.poll() is None:
            kill_tree(self.process.pid)
            self.process.wait()

    def shutdown(self, timeout: float = 20.0) -> int | None:
        """Ask the worker to stop (running requests are cancelled); kill it if it does not."""
        if self.alive:
            try:
                self._send(shutdown_request())
            except WorkerError:
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._exited.wait(5.0)
        return self.returncode

    # -- requests -------------------------------------------------------------------------------------

    def generate(self, params: dict, callback: Callback | None = None, request_id: str | None = None) -> str:
        return self._submit("generate", params, callback, request_id)

    def download(self, params: dict, callback: Callback | None = None, request_id: str | None = None) -> str:
        """The official weights into a model folder (params: dest, revision, token; all optional)."""
        return self._submit("download", params, callback, request_id)

    def _submit(self, kind: str, params: dict, callback: Callback | None, request_id: str | None) -> str:
        request_id = request_id or uuid.uuid4().hex[:12]
        self._register(request_id, callback)
        try:
            self._send(job_request(kind, request_id, params))
        except WorkerError as exc:
            self._push(error_event(request_id, "worker-died", str(exc), ""))
        return request_id

    def cancel(self, request_id: str, timeout: float | None = None) -> None:
        """Ask for a stop; if the request has not ended `timeout` s later, kill the worker's tree."""
        if request_id not in self.pending:
            return
        try:
            self._send(cancel_request(f"cancel-{request_id}", request_id))
        except WorkerError:
            return
        timeout = self.cancel_timeout if timeout is None else timeout

        def enforce() -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if request_id not in self.pending or not self.alive:
                    return
                time.sleep(0.05)
            if request_id in self.pending:
                self._killed_for = request_id
                self.kill()

        threading.Thread(target=enforce, daemon=True, name="maisi-synth-cancel").start()

    def ping(self, callback: Callback | None = None) -> str:
        request_id = f"ping-{uuid.uuid4().hex[:8]}"
        self._callbacks[request_id] = callback
        self._send(ping_request(request_id))
        return request_id

    def send_raw(self, line: str) -> None:
        """Write one raw line (for protocol tests)."""
        with self._write_lock:
            self._write(line if line.endswith("\n") else line + "\n")

    # -- plumbing -------------------------------------------------------------------------------------

    _killed_for: str | None = None
    exit_event: dict | None = None

    def _send(self, message: dict) -> None:
        with self._write_lock:
            self._write(json.dumps(message) + "\n")

    def _write(self, text: str) -> None:
        if not self.alive:
            raise WorkerError(f"the worker is not running (exit code {self.returncode}){self._tail()}")
        try:
            self.process.stdin.write(text.encode("utf-8"))
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise WorkerError(f"cannot reach the worker: {exc}") from None

    def _tail(self, lines: int = 5) -> str:
        tail = [line for line in self._stderr if line.strip()][-lines:]
        return (": " + " | ".join(tail)) if tail else ""

    def _read_stdout(self) -> None:
        for raw in self.process.stdout:
            try:
                event = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                self._stderr.append(f"(not a protocol line on stdout) {raw[:200]!r}")
                continue
            if event.get("type") == "ready" and self.ready is None:
                self.ready = event
                self._ready_event.set()
            self._push(event)
        code = self.process.wait()
        time.sleep(0.05)  # let the stderr reader catch the last lines
        if self._killed_for is not None and self._killed_for in self.pending:
            self._push(
                error_event(
                    self._killed_for,
                    "cancelled",
                    "the worker was killed because the request did not stop after cancel",
                    "start a new worker for the next request",
                )
            )
        self._fail_pending(
            "worker-died",
            f"the worker exited with code {code} during the request{self._tail()}",
            "see the worker's stderr; start a new worker to continue",
        )
        self.exit_event = exit_event(code, self.stderr_tail)
        self._push(self.exit_event)
        self._exited.set()
        self._ready_event.set()

    def _read_stderr(self) -> None:
        for raw in self.process.stderr:
            self._stderr.append(raw.decode("utf-8", "replace").rstrip("\n"))


# ---------------------------------------------------------------------------------------------------
# Remote server


class RemoteClient(_EventClient):
    """The same calls against `maisi-synth serve`: the mask is uploaded, progress streamed, and the
    outputs downloaded to the local paths named in the request (atomically) before `result` fires."""

    def __init__(self, url: str, token: str | None = None, on_event: Callback | None = None, timeout: float = 60.0):
        super().__init__(on_event)
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.ready: dict | None = None
        self._cancelled: set[str] = set()

    def start(self, timeout: float = 30.0) -> dict:
        self.ready = self._json("GET", "/v1/ping", timeout=timeout)
        return self.ready

    def generate(self, params: dict, callback: Callback | None = None, request_id: str | None = None) -> str:
        request_id = request_id or uuid.uuid4().hex[:12]
        self._register(request_id, callback)
        threading.Thread(
            target=self._run_request, args=(request_id, dict(params)), daemon=True, name="maisi-synth-remote"
        ).start()
        return request_id

    def cancel(self, request_id: str, timeout: float | None = None) -> None:
        self._cancelled.add(request_id)  # still uploading: cancelled as soon as the server has it
        try:
            self._json("POST", f"/v1/requests/{request_id}/cancel")
        except (WorkerError, RemoteError):
            pass  # not on the server yet, or already finished

    def shutdown(self, timeout: float = 20.0) -> None:
        self._json("POST", "/v1/shutdown")

    # -- plumbing -------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout=None):
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            return urllib.request.urlopen(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read().decode("utf-8"))
            except (ValueError, OSError):
                detail = {"message": exc.reason}
            raise RemoteError(exc.code, detail) from None
        except (urllib.error.URLError, OSError) as exc:
            raise WorkerError(f"cannot reach the server at {self.url}: {getattr(exc, 'reason', exc)}") from None

    def _json(self, method: str, path: str, payload: dict | None = None, timeout=None) -> dict:
        if payload is None and method == "POST":
            payload = {}  # the server takes every POST as JSON (a web page cannot send that cross-site)
        body = json.dumps(payload).encode("utf-8") if payload is not None else None
        headers = {"Content-Type": "application/json"} if body is not None else {}
        with self._request(method, path, body, headers, timeout) as response:
            return json.loads(response.read().decode("utf-8"))

    def _run_request(self, request_id: str, params: dict) -> None:
        try:
            local = {key: params.pop(key) for key in OUTPUT_FIELDS if params.get(key)}
            uploads = {}
            try:
                for key in INPUT_FIELDS:
                    if params.get(key):
                        uploads[f"{key}_id"] = self._upload(params.pop(key))
            except (RemoteError, WorkerError):
                self._drop_uploads(uploads.values())  # an edit's mask must not wait on the server for its CT
                raise
            params = {key: value for key, value in params.items() if key not in INPUT_FIELDS}
            outputs = {key: Path(value).name for key, value in local.items()}
            self._json("POST", "/v1/requests", {"id": request_id, **uploads, "outputs": outputs, "params": params})
            if request_id in self._cancelled:
                self.cancel(request_id)
            end = None
            with self._request("GET", f"/v1/requests/{request_id}/events?stream=1", timeout=None) as stream:
                for raw in stream:
                    event = json.loads(raw.decode("utf-8"))
                    if event.get("type") in TERMINAL:
                        end = event
                        break
                    self._push(event)
            if end is not None:
                if end.get("type") == "result" and request_id in self._cancelled:  # finished as it was cancelled
                    end = error_event(
                        request_id, "cancelled", "cancelled by the user; the server's output is not kept", ""
                    )
                elif end.get("type") == "result":
                    end = self._download(request_id, end, local)
                # the server forgets the request (and deletes its files) before the caller hears the end
                with self._request("DELETE", f"/v1/requests/{request_id}"):
                    pass
                self._push(end)
        except RemoteError as exc:
            self._push(error_event(request_id, **exc.event()))
        except WorkerError as exc:
            self._push(error_event(request_id, "worker-died", str(exc), ""))
        finally:
            with self._lock:
                gone = request_id in self._pending
            if gone:  # the stream ended without a terminal event
                self._push(
                    error_event(
                        request_id,
                        "worker-died",
                        "the server closed the request without a result",
                        "see the server's log",
                    )
                )

    def _upload(self, path: str) -> str:
        """One input volume to the server; its upload id."""
        path = Path(path)
        try:
            size = path.stat().st_size
            limit = (self.ready or self.start()).get("max_upload_bytes")
            if isinstance(limit, int) and size > limit:
                raise RemoteError(
                    413,
                    {
                        "kind": "too-large",
                        "message": f"{path.name} is {size} bytes, more than the server's upload limit of {limit} bytes",
                        "hint": "crop or compress the volume, or start the server with a larger --max-upload-mb",
                    },
                )
            data = path.read_bytes()
        except OSError as exc:
            raise RemoteError(
                400, {"kind": "bad-mask", "message": f"cannot read {path}: {exc.strerror}", "hint": "check the path"}
            ) from None
        name = urllib.parse.quote(path.name)
        upload = self._request("POST", f"/v1/masks?name={name}", data, {"Content-Type": "application/octet-stream"})
        with upload as response:
            return json.loads(response.read().decode("utf-8"))["mask_id"]

    def _drop_uploads(self, upload_ids) -> None:
        for upload_id in upload_ids:
            try:
                with self._request("DELETE", f"/v1/masks/{upload_id}"):
                    pass
            except (RemoteError, WorkerError):
                pass  # the server deletes unused uploads after its time-to-live anyway

    def _download(self, request_id: str, event: dict, local: dict) -> dict:
        from .volumes import atomic_paths

        keys = list(local)
        targets = [Path(local[k]) for k in keys]
        with atomic_paths(*targets) as temps:
            for key, temp in zip(keys, temps):
                with self._request("GET", f"/v1/requests/{request_id}/files/{key}", timeout=None) as response:
                    with open(temp, "wb") as f:
                        while chunk := response.read(1 << 20):
                            f.write(chunk)
        return {**event, **{k: str(p) for k, p in zip(keys, targets)}}


class RemoteError(Exception):
    def __init__(self, status: int, detail: dict) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail if isinstance(detail, dict) else {"message": str(detail)}

    def event(self) -> dict:
        return {
            "kind": self.detail.get("kind", "bad-request"),
            "message": self.detail.get("message", f"HTTP {self.status}"),
            "hint": self.detail.get("hint", ""),
            "status": self.status,
        }


# ---------------------------------------------------------------------------------------------------
# The GUI's session: start in the background, queue what comes meanwhile


CANCEL_GRACE_S = 30.0  # a cancelled request stops within one sampling step; a minute's step is not normal


class ClientSession:
    """One worker (or server) connection for a GUI, which must never wait for it.

    `request(key, make_client, params, callback)` returns at once: when `key` (the worker Python and
    device, or the server URL) differs from the running client's, the old one is closed and a new
    one is made and started on a background thread; requests made before it is ready are queued and
    sent by `poll()` once it is (or answered with a `worker-died` error if it could not start).
    `close()` stops a local worker this session started, never a remote server: other users may share it.
    `kind` is the client method a request calls: "generate", or "download" (local workers only).

    A client replaced while it still runs requests (the user changed the device, the worker Python or
    the server during a job) is retired, not closed: `poll()` keeps delivering its events and
    `cancel()` still reaches it, and it is closed once its last request has ended. Local workers are
    shut down on a background thread, so the GUI never waits for one to exit.
    """

    def __init__(self) -> None:
        self.client: _EventClient | None = None
        self.key: object = None
        self._thread: threading.Thread | None = None
        self._start_error: str | None = None
        self._queued: list[tuple[str, dict, Callback | None, str]] = []
        self._late: list[tuple[Callback | None, dict]] = []  # events for requests that never reached a client
        self.retired: list[_EventClient] = []  # replaced while running requests; closed when they end
        # a remote cancel not answered within this many seconds is ended here: reported cancelled, and
        # what the server sends for it later is ignored (a local worker enforces its own: cancel_timeout)
        self.cancel_grace_s = CANCEL_GRACE_S
        self._cancelling: dict[str, tuple[float, _EventClient]] = {}

    @property
    def ready(self) -> bool:
        return self.client is not None and self._thread is None and self.client.ready is not None

    @property
    def starting(self) -> bool:
        return self._thread is not None

    def request(
        self,
        key: object,
        make_client: Callable[[], _EventClient],
        params: dict,
        callback: Callback | None = None,
        kind: str = "generate",
    ) -> str:
        request_id = uuid.uuid4().hex[:12]
        # a client that could not start is not reused: the next request starts a new one (the server
        # may be up by now), rather than queueing behind a start that will never come
        alive = self.client is not None and self._start_error is None and getattr(self.client, "alive", True)
        if key != self.key or not (alive or self.starting):
            self._retire()
            self.key, self.client = key, make_client()
            self._start_error = None
            self._thread = threading.Thread(
                target=self._start, args=(self.client,), daemon=True, name="maisi-synth-start"
            )
            self._thread.start()
        if self.ready:
            self._send(kind, request_id, params, callback)
        else:
            self._queued.append((request_id, params, callback, kind))
        return request_id

    def _send(self, kind: str, request_id: str, params: dict, callback: Callback | None) -> None:
        method = getattr(self.client, kind, None)
        if method is None:  # e.g. a download asked of a remote server
            self._fail_later(
                request_id,
                callback,
                "bad-request",
                f"{type(self.client).__name__} cannot run a {kind} request",
                "run it with a local worker (clear Remote server)",
            )
            return
        method(params, callback, request_id)

    def _fail_later(self, request_id: str, callback: Callback | None, kind: str, message: str, hint: str) -> None:
        """Queue an error event for the request; `poll` delivers it on the GUI's thread."""
        self._late.append((callback, error_event(request_id, kind, message, hint)))

    def _start(self, client: _EventClient) -> None:
        try:
            client.start()
        except Exception as exc:  # noqa: BLE001 - reported to every queued request
            self._start_error = str(exc) or type(exc).__name__

    def poll(self) -> None:
        if self._thread is not None and not self._thread.is_alive():
            self._thread = None
            queued, self._queued = self._queued, []
            for request_id, params, callback, kind in queued:
                if self._start_error is None:
                    self._send(kind, request_id, params, callback)
                else:
                    self._fail_later(
                        request_id,
                        callback,
                        "worker-died",
                        f"the worker could not start: {self._start_error}",
                        "check the worker Python (torch and MONAI installed?) or the server address",
                    )
        late, self._late = self._late, []
        for callback, event in late:
            if callback is not None:
                callback(event)
        if self.client is not None and self._thread is None:
            self.client.poll()
        self._end_unanswered_cancels()
        for client in list(self.retired):
            client.poll()
            if not client.pending:
                self.retired.remove(client)
                self._stop(client)

    def _end_unanswered_cancels(self) -> None:
        now = time.monotonic()
        for request_id, (since, client) in list(self._cancelling.items()):
            if request_id not in client.pending:
                del self._cancelling[request_id]
            elif now - since > self.cancel_grace_s:
                del self._cancelling[request_id]
                message = "cancelled here; the server did not answer the cancel, and its result is ignored"
                client._push(error_event(request_id, "cancelled", message, ""))
                client.poll()

    def cancel(self, request_id: str) -> None:
        for item in list(self._queued):
            if item[0] == request_id:
                self._queued.remove(item)
                self._late.append((item[2], error_event(request_id, "cancelled", "cancelled by the user", "")))
                return
        owner = next((c for c in self.retired if request_id in c.pending), None)
        if owner is None and self.client is not None and self._thread is None:
            owner = self.client
        if owner is not None:
            owner.cancel(request_id)
            if not isinstance(owner, WorkerClient):
                self._cancelling.setdefault(request_id, (time.monotonic(), owner))

    def _retire(self) -> None:
        """Make way for a new client: the current one keeps its running requests (retired), or stops."""
        client = self.client
        if client is not None and self._thread is None and self._start_error is None and client.pending:
            self.client, self.key = None, None
            self.retired.append(client)
        self.close(retired=False)

    def close(self, retired: bool = True) -> None:
        """Stop this session's client (and, unless `retired` is False, the retired ones): queued
        requests end as cancelled; a local worker cancels what it runs and exits in the background."""
        client, self.client, self.key = self.client, None, None
        starting, self._thread = self._thread, None
        for request_id, _, callback, _ in self._queued:
            self._late.append((callback, error_event(request_id, "cancelled", "the worker was closed", "")))
        self._queued = []
        self._stop(client, starting)
        for old in self.retired if retired else []:
            self._stop(old)
        if retired:
            self.retired = []

    def _stop(self, client: _EventClient | None, starting: threading.Thread | None = None) -> None:
        if not isinstance(client, WorkerClient):  # a remote server is shared: never stopped from here
            return

        def shutdown() -> None:
            if starting is not None:
                starting.join(120)  # a worker still starting is stopped once it exists
            try:
                client.shutdown()
            except Exception:  # noqa: BLE001 - closing must not fail
                client.kill()

        threading.Thread(target=shutdown, daemon=True, name="maisi-synth-shutdown").start()
