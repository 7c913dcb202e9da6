"""Benchmark: whole-latent vs sliding-window VAE decoding — peak memory, time, and difference.

Each mode runs in a fresh process so that its peak memory is its own: on the CPU the growth of the
process's peak resident memory during decoding, on a GPU `torch.cuda.max_memory_allocated`.

    python benchmarks/decode_memory.py                       # tiny random VAE, 48x48x32 latent
    python benchmarks/decode_memory.py --model-dir D --latent 64 64 32 --window 32 32 32 --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(args) -> None:
    import torch

    from MaisiSynthLib.decoding import decode_latent
    from MaisiSynthLib.models import load_models

    torch.set_num_threads(args.threads)
    models = load_models(args.model_dir, args.device, "fp32" if args.device == "cpu" else "fp16")
    generator = torch.Generator().manual_seed(0)
    latent = torch.nn.functional.avg_pool3d(
        torch.randn([1, models.latent_channels, *args.latent], generator=generator), 3, 1, 1
    )
    window = args.latent if args.mode == "whole" else args.window
    baseline = _rss_mb()
    if models.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    image = decode_latent(models, latent, window=window, overlap=args.overlap)
    if models.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {
        "mode": args.mode,
        "seconds": seconds,
        "rss_growth_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline,
        "image_shape": list(image.shape[2:]),
    }
    if models.device.type == "cuda":
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    np.save(args.out, image[0, 0].numpy())
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="model folder (default: a tiny random one)")
    parser.add_argument("--latent", nargs=3, type=int, default=[48, 48, 32])
    parser.add_argument("--window", nargs=3, type=int, default=[16, 16, 16])
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", choices=["whole", "sliding"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        child(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        if not args.model_dir:
            from MaisiSynthLib.tiny_model import make_tiny_model_folder

            args.model_dir = str(make_tiny_model_folder(Path(tmp) / "tiny", seed=1))
        rows = {}
        for mode in ("whole", "sliding"):
            out = str(Path(tmp) / f"{mode}.npy")
            cmd = [
                sys.executable,
                __file__,
                "--mode",
                mode,
                "--out",
                out,
                "--model-dir",
                args.model_dir,
                "--latent",
                *map(str, args.latent),
                "--window",
                *map(str, args.window),
                "--overlap",
                str(args.overlap),
                "--device",
                args.device,
                "--threads",
                str(args.threads),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            rows[mode]["image"] = np.load(out)
        diff = np.abs(rows["sliding"]["image"] - rows["whole"]["image"])
        std = rows["whole"]["image"].std()

    print(
        f"VAE decode of a {'x'.join(map(str, args.latent))} latent -> {'x'.join(map(str, rows['whole']['image_shape']))} image on {args.device}"
    )
    print(f"sliding window {'x'.join(map(str, args.window))} latent voxels, overlap {args.overlap}, Gaussian blending")
    print(
        f"{'mode':<10}{'time s':>10}{'peak RSS growth MB':>22}"
        + (f"{'CUDA peak MB':>16}" if args.device != "cpu" else "")
    )
    for mode in ("whole", "sliding"):
        r = rows[mode]
        line = f"{mode:<10}{r['seconds']:>10.2f}{r['rss_growth_mb']:>22.0f}"
        if "cuda_peak_mb" in r:
            line += f"{r['cuda_peak_mb']:>16.0f}"
        print(line)
    print(
        f"difference (VAE units, 1.0 = 2000 HU): mean {diff.mean():.4f} ({diff.mean() / std:.0%} of the image's std), "
        f"p99 {np.quantile(diff, 0.99):.4f}, max {diff.max():.4f}"
    )


if __name__ == "__main__":
    main()
