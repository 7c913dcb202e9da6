"""The trainer skeleton shared by the VAE, UNet and ControlNet loops.

A `Stage` says what to train and how to compute a step's loss; the trainer does the rest the same way
for all three: process group and device, DistributedDataParallel, AdamW with warm-up and polynomial
decay, float16 autocast with grad scaling on GPUs, optional EMA and gradient clipping, a CSV metrics
log, checkpoints (official-format weights in the model folder + a resumable trainer state) and
resume. Step k always trains on the global batch of step k (see `data`), so a run resumed from a
checkpoint computes exactly what an uninterrupted run would have.
"""

from __future__ import annotations

import csv
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..distributed import DistContext, setup, teardown
from ..models import save_json
from .data import mix_seed

log = logging.getLogger(__name__)


class Stage:
    """One training loop. Subclasses set `name` and implement the methods below."""

    name = ""
    find_unused_parameters = False

    def __init__(self, config: dict, ctx: DistContext) -> None:
        # (position in the global batch, case name) of this process's last step, for the batch log
        self.last_batch: list[tuple[int, str]] = []
        self.config = config
        self.cfg = config[self.name]
        self.ctx = ctx
        self.device = ctx.device
        self.model_dir = Path(config["model_dir"])

    def prepare(self) -> None:
        """Load data and frozen networks; build the network to train."""

    def trainable(self) -> torch.nn.Module:
        raise NotImplementedError

    def param_groups(self, module: torch.nn.Module) -> list[dict]:
        """Optimiser parameter groups (each may set its own `lr`); by default one, at the stage's lr."""
        return [{"params": [p for p in module.parameters() if p.requires_grad]}]

    def loss(self, model: torch.nn.Module, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of this process's slice of step `step`'s global batch (`model` may be DDP-wrapped)."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Extra updates after the optimiser step (e.g. a discriminator)."""

    def save(self, module: torch.nn.Module, step: int, loss: float) -> None:
        """Write the official-format checkpoint(s) of `module` into the model folder (main process)."""
        raise NotImplementedError

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


class Trainer:
    def __init__(
        self,
        stage_cls: type[Stage],
        config: dict,
        resume: bool = False,
        stop_after: int | None = None,
        progress: bool = True,
    ) -> None:
        self.stage_cls = stage_cls
        self.config = config
        self.resume = resume
        self.stop_after = stop_after
        self.show_progress = progress

    # -----------------------------------------------------------------------------------------------

    def _paths(self) -> tuple[Path, Path]:
        out = Path(self.config["output_dir"])
        name = self.stage_cls.name
        return out / "state" / f"{name}.pt", out / "logs" / f"{name}.csv"

    def _lr_lambda(self, cfg: dict):
        total, warmup, power = int(cfg["steps"]), int(cfg["warmup_steps"]), float(cfg["lr_power"])

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            span = max(1, total - warmup)
            return max(0.0, 1.0 - (step - warmup) / span) ** power

        return factor

    def run(self) -> dict[str, Any]:
        ctx = setup(self.config.get("device", "auto"))
        try:
            return self._run(ctx)
        finally:
            teardown()

    def _run(self, ctx: DistContext) -> dict[str, Any]:
        stage = self.stage_cls(self.config, ctx)
        cfg = stage.cfg
        state_path, log_path = self._paths()
        torch.manual_seed(mix_seed(self.config["seed"], 0x5EED))
        stage.prepare()
        module = stage.trainable().to(ctx.device)
        groups = stage.param_groups(module)
        params = [p for group in groups for p in group["params"]]
        optimizer = torch.optim.AdamW(groups, lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_lambda(cfg))
        use_amp = bool(cfg["amp"]) and ctx.device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        # bfloat16 autocast on the CPU: about 1.6x faster convolutions where the CPU has bf16 units
        # (AVX512-BF16, AMX); bf16 keeps float32's range, so no grad scaling is needed.
        cpu_bf16 = bool(cfg["cpu_bf16"]) and ctx.device.type == "cpu"
        amp_dtype = torch.float16 if use_amp else torch.bfloat16
        ema = None
        if float(cfg["ema_decay"]) > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            ema = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(float(cfg["ema_decay"])))

        start = 0
        if self.resume and state_path.exists():
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            module.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            if ema is not None and state.get("ema") is not None:
                ema.load_state_dict(state["ema"])
            stage.load_extra_state(state.get("extra", {}))
            start = int(state["step"])
            if ctx.is_main:
                print(f"resuming {stage.name} from step {start}", file=sys.stderr)
        elif self.resume and ctx.is_main:
            print(f"no saved state at {state_path}: starting {stage.name} from step 0", file=sys.stderr)

        model = ctx.wrap(module, stage.find_unused_parameters)
        total = int(cfg["steps"])
        end = min(total, self.stop_after) if self.stop_after else total
        logger = _CsvLog(log_path, start) if ctx.is_main else None
        bar = None
        if ctx.is_main and self.show_progress:
            from tqdm import tqdm

            bar = tqdm(total=end, initial=start, desc=f"train {stage.name}", unit="step", file=sys.stderr)
        if ctx.is_main:
            Path(self.config["output_dir"]).mkdir(parents=True, exist_ok=True)
            save_json(self.config, Path(self.config["output_dir"]) / f"train_{stage.name}.json")

        fixed_batch = bool(cfg["fixed_batch"])
        batches = _BatchLog(log_path.with_name(f"{stage.name}_batches_rank{ctx.rank}.csv"), start)
        last_loss = float("nan")
        started = time.perf_counter()
        for step in range(start, end):
            module.train()
            torch.manual_seed(mix_seed(self.config["seed"], step, ctx.rank, 0x77))
            with torch.autocast(ctx.device.type, dtype=amp_dtype, enabled=use_amp or cpu_bf16):
                loss, metrics = stage.loss(model, 0 if fixed_batch else step)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{stage.name} loss is {loss.item()} at step {step + 1}; lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if float(cfg["grad_clip"]) > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, float(cfg["grad_clip"]))
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(module)
            stage.after_step(step)
            batches.write(step + 1, stage.last_batch)
            done = step + 1
            last_loss = float(loss.detach())
            if done % int(cfg["log_every"]) == 0 or done == end:
                row = {"step": done, "loss": ctx.mean(last_loss)}
                row.update({k: ctx.mean(v) for k, v in metrics.items()})
                row["lr"] = scheduler.get_last_lr()[0]
                row["seconds"] = round(time.perf_counter() - started, 2)
                if logger is not None:
                    logger.write(row)
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
            if bar is not None:
                bar.update(1)
            if done % int(cfg["checkpoint_every"]) == 0 or done == end:
                self._checkpoint(ctx, stage, module, optimizer, scheduler, scaler, ema, done, last_loss, state_path)
        if bar is not None:
            bar.close()
        if start >= end and ctx.is_main:
            print(f"{stage.name}: already at step {start} of {end}; nothing to do", file=sys.stderr)
        seconds = time.perf_counter() - started
        return {
            "stage": stage.name,
            "start": start,
            "end": end,
            "loss": last_loss,
            "seconds": seconds,
            "is_main": ctx.is_main,
        }

    def _checkpoint(self, ctx, stage, module, optimizer, scheduler, scaler, ema, step, loss, state_path) -> None:
        if ctx.is_main:
            stage.save(ema.module if ema is not None else module, step, loss)
            state = {
                "step": step,
                "model": module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "extra": stage.extra_state(),
            }
            from ..volumes import atomic_path

            state_path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(state_path) as tmp:
                torch.save(state, tmp)
        ctx.barrier()


class _CsvLog:
    """Metrics per logged step; on resume, rows after the resumed step are dropped (they are redone)."""

    def __init__(self, path: Path, start: int) -> None:
        self.path = path
        self.fields: list[str] | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        if start == 0 or not path.exists():
            path.write_text("")
        else:
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start]
            if rows:
                self.fields = list(rows[0].keys())
            with path.open("w", newline="") as f:
                if self.fields:
                    writer = csv.DictWriter(f, fieldnames=self.fields)
                    writer.writeheader()
                    writer.writerows(rows)

    def write(self, row: dict) -> None:
        new = self.fields is None
        if new:
            self.fields = list(row.keys())
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()}
            )


class _BatchLog:
    """Which cases each process trained on at each step (`step,position,case`), for auditing data
    order and the split of global batches across processes."""

    def __init__(self, path: Path, start: int) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if start > 0 and path.exists():
            kept = [ln for ln in path.read_text().splitlines()[1:] if int(ln.split(",")[0]) <= start]
        path.write_text("\n".join(["step,position,case", *kept]) + "\n")

    def write(self, step: int, batch: list[tuple[int, str]]) -> None:
        if batch:
            with self.path.open("a") as f:
                f.writelines(f"{step},{pos},{name}\n" for pos, name in batch)


def read_log(path: str | Path) -> list[dict]:
    with Path(path).open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
