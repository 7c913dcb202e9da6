"""Cold start vs warm requests of the background worker (what a second Generate in Slicer costs).

    .venv/bin/python benchmarks/worker_latency.py [--model-dir D] [--mask M] [--steps N] [--warm 3]

Cold: start the worker process, wait for `ready`, send the first request (which loads the models).
Warm: the same request again on the running worker. For every request it prints the wall time seen
by the client (request sent → result received), the worker's own sample and decode times, and the
overhead: wall time − (sampling + decoding), i.e. everything a warm worker adds around the model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from MaisiSynthLib.client import WorkerClient  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=str(ROOT / "Resources" / "models" / "demo"))
    p.add_argument("--mask", default=str(ROOT / "Resources" / "examples" / "example_hepatic_tumor.nii.gz"))
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--warm", type=int, default=3, help="warm requests after the cold one")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        client = WorkerClient(worker_args=["--device", args.device])
        client.start()
        ready_s = time.perf_counter() - started
        try:
            for n in range(1 + args.warm):
                params = {"mask": args.mask, "output": f"{tmp}/ct{n}.nii.gz", "model_dir": args.model_dir}
                if args.steps:
                    params["steps"] = args.steps
                sent = time.perf_counter()
                end = client.wait(client.generate(params), 3600)
                wall = time.perf_counter() - sent
                if end["type"] != "result":
                    print(f"request failed: {end['kind']}: {end['message']}", file=sys.stderr)
                    return 1
                t = end["timings"]
                rows.append(
                    {
                        "request": "cold" if n == 0 else f"warm {n}",
                        "models": end["models"],
                        "wall_s": round(wall, 3),
                        "load_s": t["load"],
                        "sample_s": t["sample"],
                        "decode_s": t["decode"],
                        "overhead_s": round(wall - t["sample"] - t["decode"], 3),
                    }
                )
        finally:
            client.shutdown()
    warm = [r["overhead_s"] for r in rows[1:]]
    summary = {
        "device": args.device,
        "model_dir": args.model_dir,
        "process_start_to_ready_s": round(ready_s, 3),
        "cold_total_s": round(ready_s + rows[0]["wall_s"], 3),
        "warm_wall_median_s": statistics.median(r["wall_s"] for r in rows[1:]) if warm else None,
        "warm_overhead_median_s": statistics.median(warm) if warm else None,
        "requests": rows,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"worker process start → ready: {ready_s:.2f} s ({args.device})")
    print(
        f"{'request':<8} {'models':<7} {'wall s':>7} {'load s':>7} {'sample s':>9} {'decode s':>9} {'overhead s':>11}"
    )
    for r in rows:
        print(
            f"{r['request']:<8} {r['models']:<7} {r['wall_s']:7.2f} {r['load_s']:7.2f} {r['sample_s']:9.2f} "
            f"{r['decode_s']:9.2f} {r['overhead_s']:11.2f}"
        )
    print(f"cold (start + first request): {summary['cold_total_s']:.2f} s")
    if warm:
        print(
            f"warm request: {summary['warm_wall_median_s']:.2f} s, of which overhead beyond sampling + decoding "
            f"{summary['warm_overhead_median_s']:.2f} s (median of {len(warm)})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
