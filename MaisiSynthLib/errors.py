"""User-facing error types.

Each kind of user error has its own type so that the CLI, the worker and the Slicer module can
report it the same way: one line naming the problem, plus a hint saying how to fix it.
"""

from __future__ import annotations

import sys
from typing import Callable


class MaisiSynthError(Exception):
    """Base class of every error a user can fix by changing the input."""

    kind = "error"

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = self.message.rstrip(".")
        if self.hint:
            text += f". Fix: {self.hint.rstrip('.')}"
        return " ".join(text.split()) + "."

    def to_dict(self) -> dict:
        return {"kind": self.kind, "message": self.message, "hint": self.hint}


class MaskError(MaisiSynthError):
    """The mask file is missing, unreadable or not a valid MAISI label map."""

    kind = "bad-mask"


class GeometryError(MaisiSynthError):
    """Spacing, field of view or output size is outside what the model accepts."""

    kind = "bad-geometry"


class ModelError(MaisiSynthError):
    """The model folder, its config or a checkpoint is missing or does not match."""

    kind = "bad-model"


class OptionError(MaisiSynthError):
    """A generation option (steps, solver, device, output path, ...) is invalid."""

    kind = "bad-option"


class CancelledError(MaisiSynthError):
    """The user cancelled a running request."""

    kind = "cancelled"

    def __init__(self, message: str = "cancelled by the user", hint: str = "") -> None:
        super().__init__(message, hint)


class DownloadError(MaisiSynthError):
    """Fetching the official weights failed; `kind` says why (no-network, token-needed, bad-token,
    no-access, bad-revision, disk-full, folder-in-use, corrupt-file, hub-error, missing-package)."""

    kind = "download-failed"

    def __init__(self, kind: str, message: str, hint: str = "") -> None:
        super().__init__(message, hint)
        self.kind = kind


def tool_exit_status(action: Callable[[], str]) -> int:
    """Run a small command-line tool's `action`: print the line it returns (status 0), or its
    MaisiSynthError as one `error: … Fix: …` line on stderr (status 2)."""
    try:
        message = action()
    except MaisiSynthError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return 2
    print(message)
    return 0
