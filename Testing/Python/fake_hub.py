"""A local stand-in for the Hugging Face Hub, speaking the part of its HTTP protocol downloads use.

`HF_ENDPOINT=<hub.url>` points huggingface_hub at it. Served, as huggingface.co serves them:

- `GET /api/models/{repo}[/revision/{rev}]` (`?blobs=true`): JSON with the commit (`sha`) and the
  files (`siblings`: `rfilename`, `size`, git `blobId`, and `lfs` {`sha256`, `size`} for LFS files);
- `HEAD/GET /{repo}/resolve/{rev}/{path}`: `X-Repo-Commit`; an LFS file answers 302 to a content
  address (`/cdn/{sha256}`) with `X-Linked-Etag` / `X-Linked-Size`, a small file 200 with its git
  ETag; the content address serves the bytes with `Range` support (206 + `Content-Range`);
- refusals with the hub's headers: 401 `X-Error-Code: GatedRepo` (a gated repository without a
  token), 401 `X-Error-Message: Invalid credentials in Authorization header` (an unknown token),
  403 `GatedRepo` (a valid token without access), 401 `RepoNotFound`, 404 `RevisionNotFound`,
  404 `EntryNotFound`.

Faults for the next GETs of a file's bytes (`hub.faults[path] = [...]`, consumed in order):
`("cut", n)` sends n bytes of a response that announced them all, then drops the connection;
`("stall", n)` sends n bytes, then waits until `hub.release` is set before dropping it;
`("corrupt",)` sends the whole file with one byte changed. `hub.requests` logs every request.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(
        self,
        files: dict[str, bytes],
        repo: str = "nvidia/NV-Generate-CT",
        gated: bool = False,
        tokens: set[str] | None = None,
        granted: set[str] | None = None,
        commit: str = "0123456789abcdef0123456789abcdef01234567",
        tags: dict[str, str] | None = None,
    ) -> None:
        self.files = dict(files)
        self.repo = repo
        self.gated = gated
        self.tokens = tokens  # None: any token (or none) is accepted
        self.granted = granted if granted is not None else set(tokens or ())  # tokens with access to a gated repo
        self.commit = commit
        self.refs = {"main": commit, **(tags or {})}
        self.faults: dict[str, list[tuple]] = {}
        self.reported_size: dict[str, int] = {}  # path → size the API reports instead of the real one
        self.requests: list[dict] = []
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="fake-hub")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()

    def is_lfs(self, path: str) -> bool:
        return path.endswith(".pt")

    def sha256(self, path: str) -> str:
        return hashlib.sha256(self.files[path]).hexdigest()

    def gets(self, path: str) -> list[dict]:
        """The GETs of a file's bytes (after the resolve redirect), in order."""
        address = f"/cdn/{self.sha256(path)}"
        return [r for r in self.requests if r["method"] == "GET" and r["path"] == address]

    def log(self, entry: dict) -> None:
        with self._lock:
            self.requests.append(entry)

    def next_fault(self, path: str) -> tuple | None:
        with self._lock:
            queue = self.faults.get(path) or []
            return queue.pop(0) if queue else None


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        # clients that hang up (killed, cancelled) are part of the tests, not errors of the server
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep the test output quiet
            pass

        # -- helpers ------------------------------------------------------------------------------

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _refuse(self, status: int, code: str | None, message: str) -> None:
            headers = {"Content-Type": "application/json", "X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, json.dumps({"error": message}).encode(), headers)

        def _token(self) -> tuple[bool, str | None]:
            """(acceptable, token): a token the hub does not know is refused on every endpoint."""
            header = self.headers.get("Authorization", "")
            token = header[len("Bearer ") :] if header.startswith("Bearer ") else None
            if token is not None and hub.tokens is not None and token not in hub.tokens:
                return False, token
            return True, token

        # -- endpoints ----------------------------------------------------------------------------

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            path = unquote(url.path)
            hub.log(
                {
                    "method": self.command,
                    "path": path,
                    "query": url.query,
                    "range": self.headers.get("Range"),
                    "authorization": self.headers.get("Authorization"),
                }
            )
            ok, token = self._token()
            if not ok:
                return self._refuse(401, None, "Invalid credentials in Authorization header")
            api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
            if api:
                return self._model_info(api.group(1), api.group(2) or "main")
            resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if resolve:
                return self._resolve(resolve.group(1), resolve.group(2), resolve.group(3), token)
            cdn = re.fullmatch(r"/cdn/([0-9a-f]{64})", path)
            if cdn:
                return self._content(cdn.group(1))
            self._send(404, b"not found")

        def _commit_of(self, repo: str, revision: str) -> str | None:
            if repo != hub.repo:
                self._refuse(401, "RepoNotFound", "Repository not found")
                return None
            commit = hub.refs.get(revision) or (revision if revision == hub.commit else None)
            if commit is None:
                self._refuse(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return commit

        def _model_info(self, repo: str, revision: str) -> None:
            commit = self._commit_of(repo, revision)
            if commit is None:
                return
            siblings = []
            for name, data in sorted(hub.files.items()):
                size = hub.reported_size.get(name, len(data))
                entry = {"rfilename": name, "size": size, "blobId": git_blob_sha1(data)}
                if hub.is_lfs(name):
                    entry["lfs"] = {"sha256": hub.sha256(name), "size": size, "pointerSize": 134}
                siblings.append(entry)
            info = {
                "_id": "fake",
                "id": repo,
                "modelId": repo,
                "sha": commit,
                "private": False,
                "gated": "manual" if hub.gated else False,
                "disabled": False,
                "tags": [],
                "siblings": siblings,
            }
            self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})

        def _resolve(self, repo: str, revision: str, name: str, token: str | None) -> None:
            if hub.gated and token is None:
                return self._refuse(
                    401, "GatedRepo", f"Access to model {repo} is restricted. You must be authenticated to access it."
                )
            if hub.gated and token not in hub.granted:
                message = f"Access to model {repo} is restricted and you are not in the authorized list."
                return self._refuse(403, "GatedRepo", message)
            commit = self._commit_of(repo, revision)
            if commit is None:
                return
            if name not in hub.files:
                return self._refuse(404, "EntryNotFound", f"{name} does not exist on {revision}")
            data = hub.files[name]
            if hub.is_lfs(name):
                sha = hub.sha256(name)
                return self._send(
                    302,
                    headers={
                        "Location": f"{hub.url}/cdn/{sha}",
                        "X-Repo-Commit": commit,
                        "X-Linked-Etag": f'"{sha}"',
                        "X-Linked-Size": str(len(data)),
                        "ETag": f'"{git_blob_sha1(data)}"',
                    },
                )
            self._send(200, data, {"X-Repo-Commit": commit, "ETag": f'"{git_blob_sha1(data)}"'})

        def _content(self, sha: str) -> None:
            names = [n for n in hub.files if hub.is_lfs(n) and hub.sha256(n) == sha]
            if not names:
                return self._send(404, b"no such object")
            name = names[0]
            data = hub.files[name]
            start = 0
            ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if ranged:
                start = int(ranged.group(1))
                if start >= len(data):
                    return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            body = data[start:]
            headers = {"ETag": f'"{sha}"', "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            if ranged:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            fault = hub.next_fault(name) if self.command == "GET" else None
            if fault is None or fault[0] == "corrupt":
                if fault is not None:
                    middle = len(body) // 2
                    body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
                return self._send(206 if ranged else 200, body, headers)
            # cut or stall: announce everything, send a part, then drop the connection
            self.send_response(206 if ranged else 200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: fault[1]])
            self.wfile.flush()
            if fault[0] == "stall":
                hub.release.wait(120)
            self.close_connection = True

    return Handler
