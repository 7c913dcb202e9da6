"""Worker progress events → (percent, status text) for a progress bar; no Qt, no torch."""

from __future__ import annotations

# Share of the bar per stage; sampling dominates the time, decoding comes second.
_SPANS = {
    "load": (0, 10),
    "encode-mask": (10, 11),
    "encode-ct": (11, 12),  # an edit's only
    "sample": (12, 85),
    "decode": (85, 96),
    "composite": (96, 97),  # an edit's only
    "write": (97, 100),
}
_WORDS = {
    "load": "Loading models",
    "encode-mask": "Encoding the mask",
    "encode-ct": "Encoding the reference CT",
    "composite": "Blending the edit into the CT",
    "sample": "Sampling",
    "decode": "Decoding",
    "write": "Writing",
}


def describe(event: dict) -> tuple[int, str]:
    """A `progress` event's position on a 0–100 bar and a line of status text."""
    stage = event.get("stage", "")
    start, end = _SPANS.get(stage, (0, 0))
    text = _WORDS.get(stage, stage or "Working")
    if stage == "sample" and event.get("total"):
        done = min(int(event.get("i", 0)), int(event["total"]))
        percent = start + (end - start) * done / int(event["total"])
        text = f"Sampling step {done} of {event['total']}"
    elif stage == "decode" and event.get("window"):
        percent = start
        text = f"Decoding (window {event['window']})"
    else:
        percent = start
    elapsed = event.get("elapsed")
    if elapsed is not None:
        text += f" · {float(elapsed):.0f} s"
    return int(round(percent)), text


def worker_line(ready: dict) -> str:
    """The log line that says which worker runs the request (device, torch, CUDA, MONAI)."""
    return (
        f"worker: {ready.get('device_name', '?')} ({ready.get('device', '?')}), torch {ready.get('torch', '?')}, "
        f"CUDA {ready.get('cuda') or 'none'}, MONAI {ready.get('monai', '?')}"
    )


def final_status(event: dict) -> tuple[int, str]:
    """(bar position, status text) once a request has ended with `result` or `error`."""
    if event.get("type") == "result":
        return 100, f"Done in {event['timings']['total']:.1f} s ({event['device']})"
    if event.get("kind") == "cancelled":
        return 0, "Cancelled; nothing was written."
    return 0, "Failed."


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def download_status(event: dict) -> tuple[int, str]:
    """(bar position, status text) of any event of a `download` request (progress, result or error)."""
    kind = event.get("type")
    if kind == "result":
        commit = str(event.get("commit"))[:12]
        return 100, f"Official weights ready in {event.get('model_dir', '?')} (revision {commit})"
    if kind == "error":
        if event.get("kind") == "cancelled":
            return 0, "Download cancelled; the next one continues where this one stopped."
        return 0, "Download failed."
    stage, total = event.get("stage", ""), int(event.get("total") or 0)
    percent = int(100 * min(int(event.get("bytes") or 0), total) / total) if total else 0
    if stage == "download":
        return percent, f"Downloading {event.get('file', '')}: {_size(event.get('bytes') or 0)} of {_size(total)}"
    if stage == "verify":
        return percent, f"Verifying {event.get('file', '')}…"
    if stage == "install":
        return 100, "Installing…"
    return 0, "Asking the Hugging Face Hub…"


def queued_status(starting: bool, downloading: object) -> str:
    """The status of a Generate not yet running: the worker runs one request at a time, so behind a
    weights download (gigabytes) it waits, and says so rather than sitting silent."""
    if downloading:
        return "Queued: the weights download runs first (Cancel download to generate now)…"
    return "Starting the worker…" if starting else "Queued…"
