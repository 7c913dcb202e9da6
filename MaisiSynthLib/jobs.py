"""The Slicer module's jobs in flight: what each needs when it ends, and its temporary folder.

Each Generate writes its inputs (the mask, for an edit the CT and the segmentation before the edit)
into a folder of its own. The folder goes when the job ends, however it ends: a failed or cancelled
run must not leave a patient's mask behind in the temporary directory, nor its record in the module.
Kept out of the module file so that it is tested without Qt.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass
class Job:
    input_name: str  # the reference CT's name, else the segmentation's: names the result
    reference_id: str | None  # the reference CT's node id, if any
    seed: int
    region: Any  # an edit's region (scene.prepare_generate), else None
    folder: Path  # the job's temporary folder


class JobRecords:
    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}

    def add(self, request_id: str, job: Job) -> None:
        self._jobs[request_id] = job

    def __len__(self) -> int:
        return len(self._jobs)

    def end(self, event: dict) -> Job | None:
        """The job a terminal event ends, no longer recorded. An error's folder is removed now; a
        result's once the result is loaded (`discard`)."""
        job = self._jobs.pop(event.get("id"), None)
        if job is not None and event.get("type") != "result":
            self.discard(job)
        return job

    @staticmethod
    def discard(job: Job | None) -> None:
        if job is not None:
            shutil.rmtree(job.folder, ignore_errors=True)

    def clear(self, cancel: Callable[[str], None] | None = None) -> None:
        """Forget every job and remove its folder (scene closed, module left): their events will not
        be shown any more. `cancel`: called with each request id first (a scene close cancels its
        jobs but keeps the worker, and a weights download, going)."""
        jobs, self._jobs = self._jobs, {}
        for request_id, job in jobs.items():
            if cancel is not None:
                cancel(request_id)
            self.discard(job)
