"""The background worker as the Slicer module uses it: a real subprocess on the CPU, a tiny model,
JSON lines through `client.WorkerClient`."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import (
    act_at_step,
    assert_kept_outside,
    assert_same_as_cli,
    sample_steps,
    save_nifti,
    torso_labels,
    write_scan,
)

from MaisiSynthLib.client import WorkerClient

CPU = {"CUDA_VISIBLE_DEVICES": "-1"}


@pytest.fixture(scope="module")
def worker():
    client = WorkerClient(env=CPU, worker_args=["--device", "cpu"])
    client.start()
    yield client
    client.shutdown()


@pytest.fixture(scope="module")
def mask(tmp_path_factory):
    return save_nifti(tmp_path_factory.mktemp("worker") / "mask.nii.gz", torso_labels())


def params(mask, out, model, **extra) -> dict:
    return {"mask": str(mask), "output": str(out), "model_dir": str(model), "steps": 3, **extra}


def collect(client: WorkerClient, rid: str, timeout: float = 180) -> tuple[dict, list[dict]]:
    seen: list[dict] = []
    client._callbacks[rid] = seen.append
    end = client.wait(rid, timeout)
    return end, seen


def test_ready_reports_device_and_versions(worker):
    ready = worker.ready
    assert ready["type"] == "ready" and ready["device"] == "cpu" and ready["pid"] == worker.process.pid
    assert ready["torch"].startswith("2.") and ready["monai"] and ready["cuda"] is None
    assert ready["memory_mb"] > 0 and "CPU" in ready["device_name"]


def test_second_request_reuses_the_loaded_models(worker, mask, tiny_model, tmp_path):
    first, events = collect(worker, worker.generate(params(mask, tmp_path / "a.nii.gz", tiny_model)))
    second, events2 = collect(worker, worker.generate(params(mask, tmp_path / "b.nii.gz", tiny_model)))
    assert first["type"] == second["type"] == "result"
    # the module's worker may have loaded this model in an earlier test; the second never loads
    assert second["models"] == "reused"
    assert any(e["type"] == "log" and "reusing" in e["message"] for e in events2)
    assert not any(e["type"] == "log" and e["message"].startswith("loaded") for e in events2)
    stages = [e["stage"] for e in events if e["type"] == "progress"]
    assert stages[0] == "load" and stages[-1] == "write"
    assert [e["i"] for e in events if e["type"] == "progress" and e["stage"] == "sample"] == [0, 1, 2, 3]
    assert all(e["elapsed"] >= 0 for e in events if e["type"] == "progress")
    assert set(second["timings"]) >= {"load", "encode-mask", "sample", "decode", "write", "total"}
    assert second["peak_memory"]["process_rss_mb"] > 0
    assert (tmp_path / "a.nii.gz").exists() and (tmp_path / "b.nii.gz").exists()


def test_a_changed_model_folder_is_reloaded(worker, mask, tmp_path):
    from MaisiSynthLib.tiny_model import make_tiny_model_folder

    folder = make_tiny_model_folder(tmp_path / "model", seed=5)
    first, _ = collect(worker, worker.generate(params(mask, tmp_path / "a.nii.gz", folder)))
    again, _ = collect(worker, worker.generate(params(mask, tmp_path / "b.nii.gz", folder)))
    make_tiny_model_folder(folder, seed=6)  # new weights in the same folder
    changed, _ = collect(worker, worker.generate(params(mask, tmp_path / "c.nii.gz", folder)))
    assert (first["models"], again["models"], changed["models"]) == ("loaded", "reused", "loaded")
    a = nib.load(tmp_path / "a.nii.gz").get_fdata()
    assert np.array_equal(a, nib.load(tmp_path / "b.nii.gz").get_fdata())
    assert not np.array_equal(a, nib.load(tmp_path / "c.nii.gz").get_fdata())


def test_cancel_stops_within_a_step_and_the_worker_goes_on(worker, mask, tiny_model, tmp_path):
    out = tmp_path / "long.nii.gz"
    rid = worker.generate(params(mask, out, tiny_model, steps=400))
    end, seen = act_at_step(worker, rid, 2, lambda: worker.cancel(rid))
    assert end["type"] == "error" and end["kind"] == "cancelled"
    # the step running when cancel arrived may finish; pipe latency may let one or two more through
    assert max(sample_steps(seen)) <= 5
    assert not out.exists() and not list(tmp_path.iterdir())
    assert worker.alive
    nxt, _ = collect(worker, worker.generate(params(mask, tmp_path / "next.nii.gz", tiny_model)))
    assert nxt["type"] == "result" and (tmp_path / "next.nii.gz").exists()


def test_bad_requests_get_error_replies_and_the_worker_stays(worker, mask, tiny_model, tmp_path):
    got: list[dict] = []
    worker.on_event = got.append
    try:
        worker.send_raw("{this is not json")
        worker.send_raw(json.dumps({"type": "explode", "id": "x1"}))
        worker.send_raw(json.dumps({"type": "generate", "id": "x2", "params": {"mask": str(mask)}}))
        worker.send_raw(json.dumps({"type": "cancel", "id": "x3", "target": "never-sent"}))
        bad_mask = tmp_path / "bad.nii.gz"
        bad_mask.write_bytes(b"not a nifti at all")
        rid = worker.generate(params(bad_mask, tmp_path / "out.nii.gz", tiny_model))
        end = worker.wait(rid, 60)
        pong = worker.ping()
        deadline = time.monotonic() + 30
        while not any(e.get("id") == pong for e in got) and time.monotonic() < deadline:
            worker.poll()
            time.sleep(0.05)
    finally:
        worker.on_event = None
    errors = [e for e in got if e["type"] == "error"]
    by_id = {e["id"]: e for e in errors}
    assert any(e["id"] is None and "is not JSON" in e["message"] for e in errors)
    assert by_id["x1"]["kind"] == "bad-request" and "explode" in by_id["x1"]["message"]
    assert by_id["x2"]["kind"] == "bad-request" and "output" in by_id["x2"]["message"]
    assert by_id["x3"]["kind"] == "bad-request" and "never-sent" in by_id["x3"]["message"]
    assert end["type"] == "error" and end["kind"] == "bad-mask" and end["hint"]
    assert not (tmp_path / "out.nii.gz").exists()
    assert any(e["type"] == "pong" and e["id"] == pong for e in got)
    assert worker.alive


def test_stdout_carries_only_protocol_lines(worker):
    assert not [line for line in worker.stderr_tail if line.startswith("(not a protocol line")]


def test_worker_output_equals_the_cli_for_the_same_seed(worker, mask, tiny_model, tmp_path):
    end, _ = collect(worker, worker.generate(params(mask, tmp_path / "w.nii.gz", tiny_model, seed=11)))
    assert end["type"] == "result"
    assert_same_as_cli(tmp_path / "w.nii.gz", mask, tiny_model, seed=11)


def test_a_killed_worker_is_reported_with_its_exit_code(mask, tiny_model, tmp_path):
    client = WorkerClient(env=CPU, worker_args=["--device", "cpu"])
    client.start()
    rid = client.generate(params(mask, tmp_path / "x.nii.gz", tiny_model, steps=400))
    end, _ = act_at_step(client, rid, 1, lambda: os.kill(client.process.pid, signal.SIGKILL))
    assert end["type"] == "error" and end["kind"] == "worker-died"
    assert "exited with code -9" in end["message"]
    assert client.wait_exit(30) == -9 and not client.alive
    assert client.exit_event["returncode"] == -9
    assert not (tmp_path / "x.nii.gz").exists()
    # a dead worker refuses new requests with a clear error instead of hanging
    late = client.wait(client.generate(params(mask, tmp_path / "y.nii.gz", tiny_model)), 10)
    assert late["kind"] == "worker-died" and "not running" in late["message"]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP is POSIX")
def test_cancel_kills_the_process_tree_when_the_worker_does_not_answer(mask, tiny_model, tmp_path):
    client = WorkerClient(env=CPU, worker_args=["--device", "cpu"], cancel_timeout=1.0)
    client.start()
    rid = client.generate(params(mask, tmp_path / "x.nii.gz", tiny_model, steps=400))

    def hang_then_cancel():
        os.kill(client.process.pid, signal.SIGSTOP)  # a hung worker: it cannot see the cancel
        client.cancel(rid)

    started = time.monotonic()
    end, _ = act_at_step(client, rid, 1, hang_then_cancel)
    assert end["type"] == "error" and end["kind"] == "cancelled" and "killed" in end["message"]
    assert time.monotonic() - started < 60 and not client.alive and client.returncode == -signal.SIGKILL
    assert not (tmp_path / "x.nii.gz").exists()


def test_hostile_lines_get_one_error_each_and_the_worker_stays(worker, mask, tiny_model, tmp_path):
    got: list[dict] = []
    worker.on_event = got.append
    try:
        worker.send_raw('{"type": "ping", "id": ' + "9" * 5000 + "}")
        worker.send_raw("[" * 100000)
        worker.send_raw('{"type": "ping", "id": "' + "x" * (1 << 21) + '"}')  # over the 1 MiB line limit
        worker.send_raw(
            json.dumps(
                {
                    "type": "generate",
                    "id": "t1",
                    "params": {**params(mask, "o.nii.gz", tiny_model), "solver": ["euler"]},
                }
            )
        )
        worker.send_raw(
            json.dumps(
                {"type": "generate", "id": "t2", "params": {**params(mask, "o.nii.gz", tiny_model), "spacing": "333"}}
            )
        )
        worker.send_raw(
            json.dumps(
                {"type": "generate", "id": "t3", "params": {**params(mask, "o.nii.gz", tiny_model), "controlnet": "no"}}
            )
        )
        # the output names the input mask another way: refused, the mask is untouched
        before = mask.read_bytes()
        sneaky = mask.parent / "sub" / ".." / mask.name
        rid = worker.generate(params(mask, sneaky, tiny_model))
        end = worker.wait(rid, 60)
        pong = worker.ping()
        deadline = time.monotonic() + 30
        while not any(e.get("id") == pong for e in got) and time.monotonic() < deadline:
            worker.poll()
            time.sleep(0.05)
    finally:
        worker.on_event = None
    errors = [e for e in got if e["type"] == "error"]
    anonymous = [e["message"] for e in errors if e["id"] is None]
    assert any("digits" in m for m in anonymous) and any("nests" in m for m in anonymous)
    assert any("longer than" in m for m in anonymous)
    by_id = {e["id"]: e for e in errors}
    assert "solver" in by_id["t1"]["message"] and "spacing" in by_id["t2"]["message"]
    assert "controlnet" in by_id["t3"]["message"] and by_id["t3"]["kind"] == "bad-request"
    assert end["type"] == "error" and "input mask itself" in end["message"] and mask.read_bytes() == before
    assert any(e["type"] == "pong" and e["id"] == pong for e in got) and worker.alive


def test_a_worker_starts_from_a_launcher_polluted_environment(tmp_path):
    """Slicer's launcher sets PYTHONHOME/PYTHONPATH for its own Python. Here a Python 3.12 process
    plays Slicer (its PYTHONHOME set, as the launcher does) and starts the worker with this test's
    Python 3.11 (the recommended external worker): the worker must come up, not abort."""
    import shutil
    import subprocess as sp

    slicer_python = None
    for version in ("3.12", "3.9"):
        found = sp.run(
            ["pyenv", "which", "python"], capture_output=True, text=True, env={**os.environ, "PYENV_VERSION": version}
        )
        if found.returncode == 0 and found.stdout.strip():
            slicer_python = found.stdout.strip()
            break
    if slicer_python is None and shutil.which("python3.12"):
        slicer_python = shutil.which("python3.12")
    if slicer_python is None:
        pytest.skip("no second Python to play Slicer's")
    prefix = sp.run(
        [slicer_python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True
    ).stdout.strip()
    repo = str(Path(__file__).resolve().parents[2])
    script = tmp_path / "slicer_like.py"
    script.write_text(
        "import sys\n"
        "from MaisiSynthLib.client import WorkerClient\n"
        "c = WorkerClient(python=sys.argv[1], env={'CUDA_VISIBLE_DEVICES': '-1'}, worker_args=['--device', 'cpu'])\n"
        "ready = c.start(timeout=180)\n"
        "print('READY', ready['python'])\n"
        "c.shutdown()\n"
    )
    env = {**os.environ, "PYTHONHOME": prefix, "PYTHONPATH": repo, "PYTHONNOUSERSITE": "1"}
    result = sp.run([slicer_python, str(script), sys.executable], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"READY {sys.version.split()[0]}" in result.stdout


def test_a_gui_session_never_waits_for_the_worker(tiny_model, mask, tmp_path):
    """The GUI's request returns at once while the worker starts; queued requests go out when it is
    ready; a worker that cannot start answers every queued request; closing stops only local workers."""
    from MaisiSynthLib.client import ClientSession, RemoteClient

    session = ClientSession()
    events: list[dict] = []
    make = lambda: WorkerClient(env=CPU, worker_args=["--device", "cpu"])  # noqa: E731
    started = time.monotonic()
    rid = session.request(("local", "cpu"), make, params(mask, tmp_path / "a.nii.gz", tiny_model), events.append)
    assert time.monotonic() - started < 1.0 and session.starting and not session.ready
    deadline = time.monotonic() + 180
    while not any(e.get("type") in ("result", "error") for e in events):
        assert time.monotonic() < deadline
        session.poll()
        time.sleep(0.05)
    assert events[-1]["type"] == "result" and events[-1]["id"] == rid and session.ready
    worker = session.client
    session.close()
    assert worker.wait_exit(30) == 0

    broken = ClientSession()
    failed: list[dict] = []
    rid = broken.request(("local", "nope"), lambda: WorkerClient(python=str(tmp_path / "no-python")), {}, failed.append)
    deadline = time.monotonic() + 30
    while not failed:
        assert time.monotonic() < deadline
        broken.poll()
        time.sleep(0.05)
    assert failed[0]["id"] == rid and failed[0]["kind"] == "worker-died" and "could not start" in failed[0]["message"]

    remote = ClientSession()
    shut = []

    class Server(RemoteClient):  # a shared server must not be stopped by one of its users
        def shutdown(self, timeout: float = 20.0) -> None:
            shut.append(True)

    remote.client, remote.key = Server("http://127.0.0.1:9"), ("remote", "x")
    remote.close()
    assert not shut


def test_a_settings_change_during_a_job_keeps_the_job(tiny_model, mask, tmp_path):
    """The user changes the device (or worker Python, or server) while a job runs: the new key gets a
    new worker, and the running job still reaches its result (the old worker is retired, polled until
    its last job ends, then shut down); a cancel still reaches a retired worker. No call the GUI makes
    waits: each returns within 0.2 s while workers are busy, start and stop."""
    from MaisiSynthLib.client import ClientSession

    session = ClientSession()
    make = lambda: WorkerClient(env=CPU, worker_args=["--device", "cpu"])  # noqa: E731
    events: dict[str, list[dict]] = {}
    slowest = 0.0

    def timed(call, *args):
        nonlocal slowest
        started = time.monotonic()
        out = call(*args)
        slowest = max(slowest, time.monotonic() - started)
        return out

    def submit(key, name, steps):
        got: list[dict] = []
        rid = timed(session.request, key, make, params(mask, tmp_path / name, tiny_model, steps=steps), got.append)
        events[rid] = got
        return rid

    def until(done, timeout=240):
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, {rid: [e["type"] for e in got][-3:] for rid, got in events.items()}
            timed(session.poll)
            time.sleep(0.02)

    def ended(rid):
        return any(e["type"] in ("result", "error") for e in events[rid])

    first = submit(("local", "a"), "first.nii.gz", 40)
    until(lambda: any(e.get("stage") == "sample" for e in events[first]))  # running
    old = session.client
    second = submit(("local", "b"), "second.nii.gz", 3)  # the settings change
    assert session.retired == [old] and session.client is not old
    until(lambda: ended(first) and ended(second))
    assert events[first][-1]["type"] == "result" and (tmp_path / "first.nii.gz").is_file()
    assert events[second][-1]["type"] == "result" and (tmp_path / "second.nii.gz").is_file()
    until(lambda: not session.retired)
    assert old.wait_exit(60) == 0  # shut down once its job had ended

    long = submit(("local", "b"), "long.nii.gz", 400)
    until(lambda: any(e.get("stage") == "sample" for e in events[long]))
    busy = session.client
    third = submit(("local", "c"), "third.nii.gz", 3)
    assert session.retired == [busy]
    timed(session.cancel, long)  # reaches the retired worker
    until(lambda: ended(long) and ended(third))
    assert events[long][-1]["kind"] == "cancelled" and not (tmp_path / "long.nii.gz").exists()
    assert events[third][-1]["type"] == "result"
    current = session.client
    timed(session.close)
    assert current.wait_exit(60) == 0 and busy.wait_exit(60) == 0
    assert slowest < 0.2, f"a GUI-thread call took {slowest:.3f} s"


def test_an_edit_keeps_the_scan_and_a_cancelled_edit_leaves_nothing(worker, tiny_model, tmp_path):
    scan = write_scan(tmp_path / "scan")
    edit = {"reference_ct": str(scan / "ct.nii.gz"), "edits": ["insert:hepatic:30"]}
    out, labels = tmp_path / "edited.nii.gz", tmp_path / "edited_label.nii.gz"
    end, seen = collect(
        worker, worker.generate(params(scan / "mask.nii.gz", out, tiny_model, label_output=str(labels), **edit))
    )
    assert end["type"] == "result" and end["edit"]["region_voxels"] > 0, end
    stages = [e["stage"] for e in seen if e["type"] == "progress"]
    assert "encode-ct" in stages and "composite" in stages
    original = np.asanyarray(nib.load(str(scan / "mask.nii.gz")).dataobj)
    assert_kept_outside(out, scan / "ct.nii.gz", np.asanyarray(nib.load(str(labels)).dataobj), original)
    # cancelled mid-sampling: no file, and the worker serves the next request
    long = tmp_path / "long.nii.gz"
    rid = worker.generate(params(scan / "mask.nii.gz", long, tiny_model, **{**edit, "steps": 400}))
    end, seen = act_at_step(worker, rid, 2, lambda: worker.cancel(rid))
    assert end["type"] == "error" and end["kind"] == "cancelled" and max(sample_steps(seen)) <= 5
    assert not long.exists() and worker.alive
    again, _ = collect(worker, worker.generate(params(scan / "mask.nii.gz", tmp_path / "n.nii.gz", tiny_model, **edit)))
    assert again["type"] == "result"
