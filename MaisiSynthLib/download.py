"""`maisi-synth download`: the official MAISI-v2 weights from the Hugging Face Hub, in one step.

What it writes is a model folder in the official layout that every front door accepts as it is
(`configs/` + `models/`, see `models.locate_model_folder`), by default the per-user folder that
`model_home.choose_model_dir` falls back to when no model folder is named.

- **What**: only what rflow-ct CT generation needs: the three checkpoints of `HUB_FILES`, all from
  one commit of `nvidia/NV-Generate-CT` (the revision asked for is resolved to its commit first, so a
  branch that moves during the download cannot mix two versions). The network and inference configs
  come from this package (`MaisiSynthLib/data`, copies of the official files).
- **Resumable**: bytes land in `DEST/.partial/<name>.part`; a later run, or the hub client's own
  retry after a cut connection, continues with an HTTP Range request. Finished files wait verified
  in `.partial/` until all of them are there.
- **Verified**: every file's size and SHA-256 are checked against what the hub reports (the LFS
  hash; git's blob hash for a file outside LFS). A mismatch is fetched once more, then refused.
  Running the command again on a complete folder re-hashes it and repairs what does not match.
- **Atomic**: the manifest (`model_home.MANIFEST_NAME`) is removed before anything else in the
  folder changes and written last; `model_home.read_manifest` trusts no folder without it. A
  cut-off, cancelled or failed download therefore never leaves a folder that looks complete. At any
  moment the folder holds the manifest or `.partial/download.json`, which is how a later run knows
  the folder is its own; any other non-empty folder is refused rather than overwritten.
- **Token**: from the argument, else `$HF_TOKEN` or the hub's own login (`hf auth login`), which
  huggingface_hub reads itself. It goes into request headers only: never into an event, a log line,
  an error message or a file.

huggingface_hub is an optional extra (`pip install 'maisi-synth[download]'`) imported only when a
download runs. Its public calls are used (`HfApi.model_info` for the commit, sizes and hashes,
`hf_hub_url` + `file_download.http_get` for the bytes, which resumes and retries itself) rather than
`hf_hub_download`, because that deletes a partial file whenever a download stops and could not
resume across runs. No torch here: the worker of the Slicer module runs this, on Python 3.9 too.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, List, Optional, Union
from urllib.parse import urlsplit, urlunsplit

from . import __version__
from .errors import CancelledError, DownloadError, MaisiSynthError
from .model_home import (
    AUTOENCODER_FILE,
    CONFIG_NAME,
    CONTROLNET_FILE,
    INFER_CONFIG_NAME,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    OFFICIAL_REPO,
    UNET_FILE,
    official_model_dir,
)

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_REVISION = "main"

# Hub file of nvidia/NV-Generate-CT → file in the local model folder (official layout, where
# models.locate_model_folder looks). The hub names are those the official NV-Generate-CTMR
# `scripts/download_model_data.py` fetches for "rflow-ct"; the local names are models.py's.
HUB_FILES = (
    ("models/autoencoder_v1.pt", f"models/{AUTOENCODER_FILE}"),  # VAE (shared by all MAISI versions)
    ("models/diff_unet_3d_rflow-ct.pt", f"models/{UNET_FILE}"),  # rectified-flow diffusion UNet
    ("models/controlnet_3d_rflow-ct.pt", f"models/{CONTROLNET_FILE}"),  # ControlNet (mask conditioning)
)
# Package file (MaisiSynthLib/data) → file in the local model folder.
PACKAGE_FILES = (
    (CONFIG_NAME, f"configs/{CONFIG_NAME}"),
    (INFER_CONFIG_NAME, f"configs/{INFER_CONFIG_NAME}"),
)

STAGING = ".partial"
STAGING_STATE = "download.json"
# Files an operating system drops into any folder it shows; they do not make a folder "in use".
_IGNORABLE = {".DS_Store", "Thumbs.db", "desktop.ini"}
_HASH_CHUNK = 8 << 20
_EVENT_INTERVAL = 0.25  # seconds between byte-progress events (the last one always goes out)
_EVENT_BYTES = 8 << 20  # ... unless this much more has arrived

Progress = Callable[[dict], None]
Cancel = Union[threading.Event, Callable[[], bool], None]


@dataclass
class _Item:
    hub_path: str
    local_path: str
    size: int
    sha256: Optional[str]  # the LFS hash; None for a file outside LFS
    git_sha1: Optional[str]  # git's blob hash, checked when there is no LFS hash


@dataclass
class DownloadResult:
    model_dir: str
    repo: str
    revision: str
    commit: str
    files: List[dict]
    downloaded_bytes: int
    total_bytes: int
    default_location: bool  # the per-user folder every front door finds without --model-dir
    seconds: float = 0.0
    repaired: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------
# Errors


def _hub():
    try:
        import huggingface_hub
        import huggingface_hub.utils  # noqa: F401 - newer versions load submodules lazily
    except ImportError:
        raise DownloadError(
            "missing-package",
            "downloading the official weights needs the huggingface_hub package, which this Python lacks",
            "install it: python -m pip install 'maisi-synth[download]' (or pip install huggingface_hub) "
            "into the Python that runs MaisiSynth",
        ) from None
    return huggingface_hub


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _disk_full(exc: BaseException) -> bool:
    codes = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
    return any(isinstance(e, OSError) and e.errno in codes for e in _chain(exc))


# Transport failures of the HTTP libraries huggingface_hub has used (requests before 1.0, httpx and
# httpx2 after), named rather than imported so that any of them is recognised.
_NETWORK_NAMES = {
    "TransportError",
    "ConnectError",
    "ConnectionError",
    "Timeout",
    "TimeoutException",
    "ChunkedEncodingError",
    "ProtocolError",
    "LocalEntryNotFoundError",
    "OfflineModeIsEnabled",
    "gaierror",
    "TimeoutError",
}


def _network_failure(exc: BaseException) -> bool:
    return any(cls.__name__ in _NETWORK_NAMES for e in _chain(exc) for cls in type(e).__mro__)


def _status(exc: BaseException) -> Optional[int]:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _reason(exc: BaseException) -> str:
    # the innermost cause names the actual failure ("Connection refused"), the outer ones wrap it
    for e in reversed(list(_chain(exc))):
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if text:
            return text[:160]
    return type(exc).__name__


def translate_error(exc: BaseException, revision: str, endpoint: str, have_token: bool) -> Optional[MaisiSynthError]:
    """The one-line error for a failure of the hub client, or None when it is not a known case (a bug)."""
    if isinstance(exc, MaisiSynthError):
        return exc
    if _disk_full(exc):
        return DownloadError(
            "disk-full",
            "the disk filled up during the download",
            "free some space (or choose another folder with --dest) and run the same command again: "
            "finished files and the partial one are kept",
        )
    hub = _hub()
    errors = hub.utils
    page = f"{endpoint}/{OFFICIAL_REPO}"
    tokens = f"{endpoint}/settings/tokens"
    if isinstance(exc, errors.RevisionNotFoundError):
        return DownloadError(
            "bad-revision",
            f"revision '{revision}' does not exist in {OFFICIAL_REPO}",
            f"leave out --revision for the newest weights ({DEFAULT_REVISION}), "
            f"or give a branch, tag or commit listed at {page}",
        )
    if isinstance(exc, errors.GatedRepoError):
        if have_token:
            return DownloadError(
                "no-access",
                f"the Hugging Face account of this token has no access to the gated repository {OFFICIAL_REPO}",
                f"accept its license at {page} with that account, then run the same command again",
            )
        return DownloadError(
            "token-needed",
            f"{OFFICIAL_REPO} is a gated repository and no Hugging Face token was given",
            f"accept its license at {page}, create a read token at {tokens}, then pass --token, "
            "set HF_TOKEN or run `hf auth login`",
        )
    status = _status(exc)
    if status == 401 and have_token and not isinstance(exc, errors.RepositoryNotFoundError):
        return DownloadError(
            "bad-token",
            "the Hugging Face Hub refused the token (invalid, expired or revoked)",
            f"create a read token at {tokens} and pass it with --token or HF_TOKEN",
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        if have_token:
            return DownloadError(
                "no-access",
                f"{OFFICIAL_REPO} was not found at {endpoint}, or this token cannot read it",
                f"check the token's permissions at {tokens} and that {page} opens in a browser",
            )
        return DownloadError(
            "token-needed",
            f"{OFFICIAL_REPO} was not found at {endpoint} without a token (it may need one)",
            f"accept its license at {page}, then pass --token, set HF_TOKEN or run `hf auth login`",
        )
    if isinstance(exc, errors.HfHubHTTPError) and status is not None:
        return DownloadError(
            "hub-error",
            f"the Hugging Face Hub answered HTTP {status}",
            "try again later: run the same command, finished files are kept",
        )
    if _network_failure(exc):
        return DownloadError(
            "no-network",
            f"cannot reach the Hugging Face Hub at {endpoint} ({_reason(exc)})",
            "check the internet connection (behind a proxy: set HTTPS_PROXY), then run the same command "
            "again: finished files are kept",
        )
    return None


# ---------------------------------------------------------------------------------------------------
# Files


def _cancel_check(cancel: Cancel) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    return cancel


def _sha256(path: Path, cancelled: Callable[[], bool]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            if cancelled():
                raise CancelledError()
            chunk = f.read(_HASH_CHUNK)
            if not chunk:
                return digest.hexdigest()
            digest.update(chunk)


def _git_sha1(path: Path, cancelled: Callable[[], bool]) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode("ascii"))
    with open(path, "rb") as f:
        while True:
            if cancelled():
                raise CancelledError()
            chunk = f.read(_HASH_CHUNK)
            if not chunk:
                return digest.hexdigest()
            digest.update(chunk)


def _matches(path: Path, item: _Item, cancelled: Callable[[], bool]) -> Optional[str]:
    """The file's SHA-256 if it is `item` (size and hub hash), else None."""
    try:
        if not path.is_file() or path.stat().st_size != item.size:
            return None
    except OSError:
        return None
    sha256 = _sha256(path, cancelled)
    if item.sha256 is not None:
        return sha256 if sha256 == item.sha256 else None
    return sha256 if _git_sha1(path, cancelled) == item.git_sha1 else None


class _Sink:
    """The file object http_get writes to: reports bytes and stops at a cancel between chunks."""

    def __init__(self, raw, on_bytes: Callable[[int], None], cancelled: Callable[[], bool]) -> None:
        self._raw = raw
        self._on_bytes = on_bytes
        self._cancelled = cancelled

    def write(self, data: bytes) -> int:
        if self._cancelled():
            raise CancelledError()
        written = self._raw.write(data)
        self._on_bytes(self._raw.tell())
        return written

    @property
    def name(self) -> str:  # huggingface_hub < 1.0 hands the file's name to hf_transfer when enabled
        return self._raw.name

    def tell(self) -> int:
        return self._raw.tell()

    def seek(self, *args) -> int:
        return self._raw.seek(*args)

    def truncate(self, *args) -> int:
        # http_get rewinds when a server ignores the Range header and sends the whole file again
        result = self._raw.truncate(*args)
        self._on_bytes(self._raw.tell())
        return result

    def flush(self) -> None:
        self._raw.flush()


def _free_bytes(folder: Path) -> Optional[int]:
    for candidate in (folder, *folder.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _public_endpoint(endpoint: str) -> str:
    """The endpoint without any user:password part (it goes into the manifest)."""
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", "")).rstrip("/")


def _read_json(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict) -> None:
    from .volumes import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _check_destination(dest: Path) -> None:
    """Refuse a destination that holds anything but an earlier download of ours."""
    if dest.exists() and not dest.is_dir():
        raise DownloadError(
            "folder-in-use", f"{dest} is a file, not a folder", "choose a folder for the weights with --dest"
        )
    if not dest.exists():
        return
    for marker in (dest / MANIFEST_NAME, dest / STAGING / STAGING_STATE):
        if marker.exists():
            data = _read_json(marker)
            if data is not None and data.get("repo") == OFFICIAL_REPO:
                return
            raise DownloadError(
                "folder-in-use",
                f"{dest} holds a download of other weights "
                f"({marker.name} names {(data or {}).get('repo', 'nothing readable')})",
                "choose another folder with --dest",
            )
    # staging without its state file: cut off in the instant between creating the two
    others = sorted(p.name for p in dest.iterdir() if p.name not in _IGNORABLE and p.name != STAGING)
    if others:
        shown = ", ".join(others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4 else "")
        raise DownloadError(
            "folder-in-use",
            f"{dest} already holds other files ({shown}) that this command did not download",
            "choose an empty or new folder with --dest (a folder that already holds weights works as it is "
            "with --model-dir)",
        )


# ---------------------------------------------------------------------------------------------------
# The download


def _plan(info, revision: str) -> List[_Item]:
    siblings = {s.rfilename: s for s in (info.siblings or [])}
    items = []
    for hub_path, local_path in HUB_FILES:
        sibling = siblings.get(hub_path)
        if sibling is None:
            raise DownloadError(
                "bad-revision",
                f"revision '{revision}' of {OFFICIAL_REPO} has no {hub_path}",
                f"use a revision with the MAISI-v2 rflow-ct weights (the default, {DEFAULT_REVISION}, has them)",
            )
        lfs = sibling.lfs
        size = lfs.size if lfs is not None else sibling.size
        sha256 = lfs.sha256 if lfs is not None else None
        if size is None or (sha256 is None and not sibling.blob_id):
            raise DownloadError(
                "hub-error",
                f"the hub reported no size or hash for {hub_path}, so it could not be verified",
                "try again later; if it persists, update huggingface_hub",
            )
        items.append(_Item(hub_path, local_path, int(size), sha256, sibling.blob_id))
    return items


def download(
    dest: Union[str, "os.PathLike[str]", None] = None,
    revision: Optional[str] = None,
    token: Optional[str] = None,
    *,
    endpoint: Optional[str] = None,
    progress: Optional[Progress] = None,
    cancel: Cancel = None,
    network_config: Optional[dict] = None,
) -> DownloadResult:
    """Download (or resume, or verify and repair) the official weights into `dest`.

    `dest`: the model folder (default: `model_home.official_model_dir()`). `revision`: a branch, tag
    or commit of the hub repository (default main). `token`: a Hugging Face token; None lets
    huggingface_hub use `$HF_TOKEN` or its stored login. `endpoint`: the hub (default `$HF_ENDPOINT`,
    else huggingface.co). `progress` receives {"stage": "resolve" | "verify" | "download" | "install",
    "elapsed", ...} dicts ("download" adds file, done, size, bytes, total); `cancel` is polled between
    chunks and raises CancelledError, keeping what was fetched for the next run. `network_config`
    replaces the package's network config (a folder for other networks of the same format, e.g. tests).
    """
    started = time.monotonic()
    cancelled = _cancel_check(cancel)
    revision = (revision or DEFAULT_REVISION).strip()
    if not revision or len(revision) > 200 or any(c.isspace() for c in revision):
        raise DownloadError("bad-revision", f"'{revision[:60]}' is not a revision name", "give a branch, tag or commit")
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    token = token or None
    hub = _hub()
    dest = Path(dest).expanduser().absolute() if dest else official_model_dir().absolute()

    def report(stage: str, **extra) -> None:
        if progress is not None:
            progress({"stage": stage, "elapsed": round(time.monotonic() - started, 3), **extra})

    have_token = token is not None
    if not have_token:
        try:
            have_token = hub.get_token() is not None
        except Exception:  # noqa: BLE001 - an unreadable stored login is the same as none
            have_token = False

    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock(dest)
    try:
        _check_destination(dest)
        hub.utils.disable_progress_bars()  # progress goes through `progress`, never the hub's bars
        return _download_locked(hub, dest, revision, token, endpoint, report, cancelled, network_config, started)
    except (MaisiSynthError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - hub and transport failures become one-line errors
        translated = translate_error(exc, revision, endpoint, have_token)
        if translated is None:
            raise
        if token:  # an error text must never carry the token, whatever a library put into it
            translated.message = translated.message.replace(token, "***")
        raise translated from None
    finally:
        lock.release()


def _lock(dest: Path):
    """One download per destination at a time (e.g. the command line and Slicer at once)."""
    from filelock import FileLock, Timeout  # a dependency of huggingface_hub

    # beside the folder, not in it: the finished folder holds the model and nothing else
    lock = FileLock(str(dest.parent / f".{dest.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:  # before OSError: filelock's Timeout is a TimeoutError
        raise DownloadError(
            "folder-in-use",
            f"another download into {dest} is running",
            "wait for it to finish, or cancel it, then run this again",
        ) from None
    except OSError:  # a parent folder we may not write to: go on without the lock
        return _NoLock()
    return lock


class _NoLock:
    def release(self) -> None:
        pass


def _download_locked(hub, dest, revision, token, endpoint, report, cancelled, network_config, started):
    report("resolve")
    info = hub.HfApi(endpoint=endpoint).model_info(OFFICIAL_REPO, revision=revision, files_metadata=True, token=token)
    commit = info.sha
    if not commit:
        raise DownloadError("hub-error", f"the hub named no commit for revision '{revision}'", "try again later")
    items = _plan(info, revision)
    staging = dest / STAGING
    state_path = staging / STAGING_STATE
    state = _read_json(state_path)
    if state is not None and state.get("commit") != commit:
        shutil.rmtree(staging, ignore_errors=True)  # parts of another commit would only fail their hash
    staging.mkdir(parents=True, exist_ok=True)
    _write_json(state_path, {"repo": OFFICIAL_REPO, "revision": revision, "commit": commit})

    # 1. What is there already: the folder's own files, then verified ones waiting in staging.
    total = sum(i.size for i in items)
    hashes: dict = {}
    to_fetch: List[_Item] = []
    for item in items:
        if cancelled():
            raise CancelledError()
        final, staged = dest / item.local_path, staging / Path(item.local_path).name
        for candidate in (final, staged):
            if candidate.exists():
                checked = sum(i.size for i in items if i.local_path in hashes)
                report("verify", file=Path(item.local_path).name, bytes=checked, total=total)
                digest = _matches(candidate, item, cancelled)
                if digest is not None:
                    hashes[item.local_path] = (candidate, digest)
                    break
        else:
            to_fetch.append(item)
    repaired = [i.local_path for i in to_fetch if (dest / i.local_path).exists()]

    # 2. Room for what is missing, before the first byte.
    parts = {i.local_path: staging / (Path(i.local_path).name + ".part") for i in to_fetch}
    needed = sum(i.size - min(_size(parts[i.local_path]), i.size) for i in to_fetch)
    free = _free_bytes(dest)
    if free is not None and needed > free:
        raise DownloadError(
            "disk-full",
            f"not enough disk space in {dest}: the download needs {_gb(needed)} more, {_gb(free)} is free",
            "free some space or choose a folder on another disk with --dest",
        )

    # 3. Fetch, verify, fetch once more on a mismatch.
    done_before = sum(i.size for i in items if i.local_path in hashes)
    downloaded = 0
    headers = hub.utils.build_hf_headers(token=token, library_name="maisi-synth", library_version=__version__)
    for item in to_fetch:
        name = Path(item.local_path).name
        part = parts[item.local_path]
        url = hub.hf_hub_url(OFFICIAL_REPO, item.hub_path, revision=commit, endpoint=endpoint)
        for attempt in (1, 2):
            start_size = _size(part)
            sent = _Throttle(report, name, item.size, done_before, total)
            try:
                _fetch(hub, url, part, item.size, headers, sent, cancelled)
            except OSError as exc:
                # http_get's plain OSError "Consistency check failed" (not the size the hub announced) is
                # judged by the hash below, like any other wrong bytes. Everything else is raised: hub
                # refusals and requests' transport errors are OSErrors too, and so is a full disk.
                if type(exc) is not OSError or exc.errno is not None:
                    raise
            downloaded += max(_size(part) - start_size, 0)
            sent.flush(_size(part))
            report("verify", file=name, bytes=done_before + min(_size(part), item.size), total=total)
            digest = _matches(part, item, cancelled)
            if digest is not None:
                staged = staging / name
                os.replace(part, staged)
                hashes[item.local_path] = (staged, digest)
                break
            part.unlink()
            if attempt == 2:
                raise DownloadError(
                    "corrupt-file",
                    f"{item.hub_path} arrived twice with the wrong size or hash "
                    f"(expected {item.size} bytes, {item.sha256 or item.git_sha1})",
                    "try again later; behind a proxy that rewrites downloads, fetch from another network",
                )
        done_before += item.size

    # 4. Install: manifest away first, files in, configs, manifest last.
    if cancelled():
        raise CancelledError()
    report("install")
    manifest_path = dest / MANIFEST_NAME
    if manifest_path.exists():
        manifest_path.unlink()
    files = []
    for item in items:
        source, digest = hashes[item.local_path]
        final = dest / item.local_path
        if source != final:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, final)
        files.append({"path": item.local_path, "hub_path": item.hub_path, "size": item.size, "sha256": digest})
    configs = _write_configs(dest, network_config)
    manifest = {
        "format": MANIFEST_FORMAT,
        "repo": OFFICIAL_REPO,
        "revision": revision,
        "commit": commit,
        "endpoint": _public_endpoint(endpoint),
        "downloaded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "maisi_synth": __version__,
        "files": files,
        "configs": configs,
    }
    _write_json(manifest_path, manifest)
    shutil.rmtree(staging, ignore_errors=True)
    return DownloadResult(
        model_dir=str(dest),
        repo=OFFICIAL_REPO,
        revision=revision,
        commit=commit,
        files=files,
        downloaded_bytes=downloaded,
        total_bytes=total,
        default_location=_same_path(dest, official_model_dir()),
        seconds=round(time.monotonic() - started, 3),
        repaired=repaired,
    )


def _same_path(a: Path, b: Path) -> bool:
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class _Throttle:
    """Byte-progress events for one file: one per `_EVENT_INTERVAL`, or per `_EVENT_BYTES` of progress
    (a fast link must not hide a whole chunk from the bar)."""

    def __init__(self, report, name: str, size: int, before: int, total: int) -> None:
        self.report, self.name, self.size, self.before, self.total = report, name, size, before, total
        self.last, self.last_done = 0.0, 0

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last >= _EVENT_INTERVAL or abs(done - self.last_done) >= _EVENT_BYTES:
            self.last, self.last_done = now, done
            self.flush(done)

    def flush(self, done: int) -> None:
        done = min(done, self.size)
        self.report("download", file=self.name, done=done, size=self.size, bytes=self.before + done, total=self.total)


def _fetch(hub, url: str, part: Path, size: int, headers: dict, on_bytes, cancelled) -> None:
    """Append the missing bytes of `url` to `part` (a Range request when some are there)."""
    have = _size(part)
    if have > size:
        part.unlink()
        have = 0
    if have == size:
        return
    from huggingface_hub.file_download import http_get

    part.parent.mkdir(parents=True, exist_ok=True)
    with open(part, "r+b" if part.exists() else "wb") as raw:
        raw.seek(have)
        on_bytes(have)
        http_get(url, _Sink(raw, on_bytes, cancelled), resume_size=have, headers=dict(headers), expected_size=size)
        raw.flush()
        os.fsync(raw.fileno())  # the bytes are on disk before the file is called finished


def _write_configs(dest: Path, network_config: Optional[dict]) -> List[dict]:
    data = Path(__file__).resolve().parent / "data"
    written = []
    for name, local_path in PACKAGE_FILES:
        if name == CONFIG_NAME and network_config is not None:
            content = (json.dumps(network_config, indent=2) + "\n").encode("utf-8")
            source = "network_config argument"
        else:
            content = (data / name).read_bytes()
            source = f"MaisiSynthLib/data/{name}"
        target = dest / local_path
        target.parent.mkdir(parents=True, exist_ok=True)
        from .volumes import atomic_path

        with atomic_path(target) as tmp:
            Path(tmp).write_bytes(content)
        digest = hashlib.sha256(content).hexdigest()
        written.append({"path": local_path, "source": source, "size": len(content), "sha256": digest})
    return written


# ---------------------------------------------------------------------------------------------------
# Worker requests


_PARAM_KEYS = {"dest", "revision", "token"}


def check_download_params(params: object) -> dict:
    """The params of a worker `download` request: optional strings dest, revision and token."""
    from .request import RequestError

    if params is None:
        return {}
    if not isinstance(params, dict):
        raise RequestError("'params' of a download request must be a JSON object", 'send {"params": {}}')
    unknown = sorted(set(params) - _PARAM_KEYS)
    if unknown:
        raise RequestError(f"unknown download field(s) {', '.join(unknown)}", "send only dest, revision and token")
    for key, value in params.items():
        if value is not None and (not isinstance(value, str) or len(value) > 4096):
            raise RequestError(f"download field '{key}' must be a string", f"send {key} as a short string or null")
    return dict(params)
