"""The training loop. It knows nothing of Ray, files or loggers: callers hook in through ``on_epoch``.

Data is normalised and moved to the device once (:class:`~tune_agb.engine.data.DeviceTiles`); each step gathers a batch
by index, augments it on the device (flips / transposition, identical for image and label), and accumulates
loss sums on the device. The host syncs once per epoch, when the epoch's metrics are read.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from tune_agb.engine.checkpoint import CHECKPOINT_FORMAT
from tune_agb.engine.config import TrainConfig, config_from_dict
from tune_agb.engine.data import DeviceTiles, NormStats, TileSet, compute_norm_stats, count_nonfinite
from tune_agb.engine.losses import LOSSES, predicted_variance
from tune_agb.engine.metrics import labelled_metrics
from tune_agb.engine.model import UNet
from tune_agb.errors import DivergenceError, TuneAgbError

log = logging.getLogger(__name__)


class StopTraining(Exception):  # noqa: N818 (a signal, not an error)
    """Raised by an ``on_epoch`` callback to end the run after the current epoch."""


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TuneAgbError(f"--device {name}: CUDA is not available on this machine (use auto or cpu)")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise TuneAgbError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}")
    return torch.device(name)


def resolve_amp(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on CUDA, full precision on CPU (bf16 autocast on CPU is slower than fp32 on most CPUs)."""
    if cfg.amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[cfg.amp]


def build_optimizer(cfg: TrainConfig, params: Any) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(
    cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """All schedules step once per optimiser step."""
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=cfg.lr * 0.01)
    if cfg.schedule == "onecycle":
        # SGD: cycle the momentum between 0.85 m and the configured m (not torch's fixed 0.85..0.95).
        m = cfg.momentum if cfg.optimizer == "sgd" else 0.95
        return torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=cfg.lr,
            total_steps=total,
            pct_start=0.3,
            cycle_momentum=m > 0,
            base_momentum=0.85 / 0.95 * m,
            max_momentum=m,
        )
    if cfg.schedule == "cyclic":
        return torch.optim.lr_scheduler.CyclicLR(
            opt,
            base_lr=cfg.lr / 10,
            max_lr=cfg.lr,
            step_size_up=max(1, cfg.cyclic_step_epochs * steps_per_epoch),
            mode="triangular2",
            cycle_momentum=cfg.optimizer == "sgd" and cfg.momentum > 0,
            base_momentum=0.85 / 0.95 * cfg.momentum,
            max_momentum=cfg.momentum,
        )
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def memory_format(cfg: TrainConfig, device: torch.device) -> torch.memory_format:
    """channels_last where it pays: on CUDA (tensor cores). On CPU it measured 10-14 % slower at 244 px
    (bench/RESULTS.md), so CPU runs keep the contiguous layout whatever ``cfg.channels_last`` says."""
    return torch.channels_last if cfg.channels_last and device.type == "cuda" else torch.contiguous_format


def augment(x: torch.Tensor, y: torch.Tensor, flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample horizontal flip, vertical flip and (square tiles) transposition: the 8 symmetries of a square.

    ``flags`` (B, 3) bool on the device; ``torch.where`` keeps shapes static (no host sync).
    """
    for k, dims in ((0, (-1,)), (1, (-2,))):
        f = flags[:, k]
        x = torch.where(f.view(-1, 1, 1, 1), x.flip(dims), x)
        y = torch.where(f.view(-1, 1, 1), y.flip(dims), y)
    if x.shape[-1] == x.shape[-2]:
        f = flags[:, 2]
        x = torch.where(f.view(-1, 1, 1, 1), x.transpose(-1, -2), x)
        y = torch.where(f.view(-1, 1, 1), y.transpose(-1, -2), y)
    return x, y


class TrainStep:
    """One optimisation step on a batch (augment, forward, masked loss, backward, clip, step, schedule), with the
    epoch's loss and squared-error sums kept on the device: calling it never syncs with the host."""

    def __init__(
        self,
        model: UNet,
        opt: torch.optim.Optimizer,
        sched: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler | None,
        cfg: TrainConfig,
        amp: torch.dtype | None,
        device: torch.device,
    ):
        self.model, self.opt, self.sched, self.scaler = model, opt, sched, scaler
        self.cfg, self.amp, self.device = cfg, amp, device
        self.fmt = memory_format(cfg, device)
        self.loss_fn = LOSSES[cfg.loss]
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.sq_sum = torch.zeros((), device=self.device)
        self.pix = torch.zeros((), device=self.device)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, flags: torch.Tensor | None = None) -> None:
        """x (B, C, H, W) normalised, y (B, H, W) standardised with NaN, flags (B, 3) bool or None."""
        if flags is not None:
            x, y = augment(x, y, flags)
        x = x.contiguous(memory_format=self.fmt)
        with _autocast(self.device, self.amp):
            mu, logvar = self.model(x)
        loss = self.loss_fn(mu.float(), logvar.float(), y)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        with torch.no_grad():
            mask = torch.isfinite(y)
            npix = mask.sum()
            self.loss_sum += loss.detach() * npix
            self.sq_sum += torch.where(mask, (mu.detach().float() - torch.where(mask, y, 0.0)) ** 2, 0.0).sum()
            self.pix += npix

    def read(self) -> tuple[float, float]:
        """Pixel-weighted mean training loss and MSE (standardised units) since ``reset``: one host sync."""
        pix = self.pix.clamp_min(1)
        loss, mse = torch.stack([self.loss_sum / pix, self.sq_sum / pix]).cpu().tolist()
        return loss, mse


@torch.no_grad()
def predict_tiles(
    model: UNet,
    x: torch.Tensor,
    cfg: TrainConfig,
    norm: NormStats,
    batch_size: int,
    amp: torch.dtype | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance maps (N, H, W) in target units for normalised inputs ``x`` (N, C, H, W)."""
    model.eval()
    means, varis = [], []
    fmt = memory_format(cfg, device)
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size].to(device, non_blocking=True).contiguous(memory_format=fmt)
        with _autocast(device, amp):
            mu, logvar = model(xb)
        means.append(mu.float() * norm.target_std + norm.target_mean)
        varis.append(predicted_variance(logvar.float(), cfg.loss) * norm.target_std**2)
    return torch.cat(means), torch.cat(varis)


def _autocast(device: torch.device, amp: torch.dtype | None) -> contextlib.AbstractContextManager:
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp)


@dataclass
class SplitEval:
    """Predictions of one split: maps (N, H, W) on the device, and the metrics over its labelled pixels."""

    split: str
    mean: torch.Tensor
    var: torch.Tensor
    metrics: dict[str, float]


def evaluate_split(
    model: UNet, tiles: DeviceTiles, cfg: TrainConfig, norm: NormStats, batch_size: int, amp: torch.dtype | None
) -> SplitEval:
    mean, var = predict_tiles(model, tiles.x, cfg, norm, batch_size, amp, tiles.device)
    return SplitEval(tiles.split, mean, var, split_metrics(tiles, norm, mean, var, cfg.loss))


def split_metrics(
    tiles: DeviceTiles, norm: NormStats, mean: torch.Tensor, var: torch.Tensor, loss: str
) -> dict[str, float]:
    return labelled_metrics(tiles.y * norm.target_std + norm.target_mean, mean, var, loss)


@dataclass
class EpochReport:
    """What ``on_epoch`` receives after each epoch."""

    epoch: int
    metrics: dict[str, float]
    val: SplitEval
    state: Callable[[], dict[str, Any]]
    is_best: bool


@dataclass
class TrainResult:
    model: UNet
    norm: NormStats
    config: TrainConfig
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_rmse: float = math.inf
    stopped: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: torch.dtype | None = None


def train(
    cfg: TrainConfig,
    tiles: dict[str, TileSet],
    *,
    norm: NormStats | None = None,
    device: str = "auto",
    resume: dict[str, Any] | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a U-Net on ``tiles['train']``, evaluating on ``tiles['val']`` after every epoch.

    Args:
        cfg: hyperparameters.
        tiles: at least ``train`` and ``val`` TileSets.
        norm: normalisation stats; computed from the train split when None (and taken from ``resume`` if given).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        resume: a checkpoint dict (see :mod:`tune_agb.engine.checkpoint`); training continues after its epoch.
        on_epoch: called after every epoch; may raise :class:`StopTraining`.
        progress: show a tqdm bar over epochs.

    Raises:
        DivergenceError: when the epoch's training loss or validation metrics are not finite.
    """
    dev = resolve_device(device)
    if resume is not None:
        if resume.get("format") != CHECKPOINT_FORMAT:
            raise TuneAgbError("resume: not a tune_agb checkpoint")
        saved = config_from_dict(resume["config"], source="checkpoint config")
        arch = ("in_channels", "base_channels", "depth", "upsampling", "norm")
        for k in arch:
            if getattr(saved, k) != getattr(cfg, k):
                raise TuneAgbError(
                    f"resume: checkpoint has {k}={getattr(saved, k)!r} but the config asks for {getattr(cfg, k)!r}"
                )
        norm = NormStats.from_dict(resume["norm"])
    if norm is None:
        norm = compute_norm_stats(tiles["train"], cfg.standardize_target)
    c = tiles["train"].inputs.shape[1]
    if c != cfg.in_channels:
        raise TuneAgbError(f"train split has {c} channels but in_channels={cfg.in_channels}")
    for split in ("train", "val"):
        bad = count_nonfinite(tiles[split])
        if bad:
            log.warning(
                "%s split: %d non-finite input values replaced by the band mean after normalisation", split, bad
            )

    h, w = tiles["train"].inputs.shape[-2:]
    if math.ceil(min(h, w) / 2**cfg.depth) < 2:
        raise TuneAgbError(
            f"depth={cfg.depth} needs tiles larger than {2**cfg.depth} px (the bottleneck must be at "
            f"least 2 x 2); tiles are {h} x {w}: lower depth or use larger tiles"
        )
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    fmt = memory_format(cfg, dev)
    train_t = DeviceTiles(tiles["train"], norm, dev, fmt == torch.channels_last)
    val_t = DeviceTiles(tiles["val"], norm, dev, fmt == torch.channels_last)
    model = UNet.from_config(cfg).to(dev, memory_format=fmt)
    opt = build_optimizer(cfg, model.parameters())
    n = len(train_t)
    bs = min(cfg.batch_size, n)
    starts = list(range(0, n, bs))
    if cfg.norm == "batch" and len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()  # a batch of one tile breaks BatchNorm; that tile is seen in other epochs
    sched = build_scheduler(cfg, opt, len(starts))
    amp = resolve_amp(cfg, dev)
    scaler = torch.amp.GradScaler(dev.type) if amp == torch.float16 else None
    step = TrainStep(model, opt, sched, scaler, cfg, amp, dev)

    history: list[dict[str, float]] = []
    best_epoch, best_rmse, start_epoch = 0, math.inf, 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        horizon = {k: v for k, v in vars(sched).items() if k in ("total_steps", "T_max", "_schedule_phases")}
        sched.load_state_dict(resume["scheduler"])
        sched.__dict__.update(horizon)  # a resumed run may extend cfg.epochs: keep the new schedule horizon
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        torch.set_rng_state(resume["rng"]["torch"])
        if dev.type == "cuda" and resume["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(resume["rng"]["cuda"])
        gen.set_state(resume["rng"]["shuffle"])
        history = [dict(h) for h in resume["history"]]
        start_epoch = int(resume["epoch"])
        best_epoch, best_rmse = int(resume["best"]["epoch"]), float(resume["best"]["val_rmse"])

    result = TrainResult(model, norm, cfg, history, best_epoch, best_rmse, None, dev, amp)

    def state(epoch: int) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,
            "config": cfg.to_dict(),
            "norm": norm.to_dict(),
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "rng": {
                "torch": torch.get_rng_state(),
                "shuffle": gen.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if dev.type == "cuda" else [],
            },
            "history": [dict(h) for h in history],
            "best": {"epoch": result.best_epoch, "val_rmse": result.best_val_rmse},
        }

    bar = tqdm(
        range(start_epoch, cfg.epochs),
        initial=start_epoch,
        total=cfg.epochs,
        disable=not progress,
        desc="train",
        unit="epoch",
        leave=False,
    )
    for epoch in bar:
        model.train()
        perm = torch.randperm(n, generator=gen).to(train_t.x.device)
        flags = torch.rand((n, 3), generator=gen).lt(0.5).to(dev) if cfg.augment else None
        step.reset()
        for s in starts:
            x, y = train_t.batch(perm[s : s + bs])
            step(x, y, flags[s : s + bs] if flags is not None else None)
        val = evaluate_split(model, val_t, cfg, norm, max(bs, 1), amp)
        train_loss, train_mse = step.read()  # the epoch's one host sync
        metrics = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_rmse": math.sqrt(train_mse) * norm.target_std if math.isfinite(train_mse) else math.inf,
            "lr": opt.param_groups[0]["lr"],
        }
        metrics |= {f"val_{k}": v for k, v in val.metrics.items()}
        history.append(metrics)
        if not math.isfinite(train_loss) or not math.isfinite(metrics["val_rmse"]):
            what = "training loss" if not math.isfinite(train_loss) else "validation RMSE"
            raise DivergenceError(
                f"epoch {epoch + 1}: {what} is not finite ({train_loss if what[0] == 't' else metrics['val_rmse']}); "
                f"the run diverged (lr={cfg.lr:g}, optimizer={cfg.optimizer}; try a lower lr or grad_clip)",
                metrics,
            )
        is_best = metrics["val_rmse"] < result.best_val_rmse
        if is_best:
            result.best_epoch, result.best_val_rmse = epoch + 1, metrics["val_rmse"]
        bar.set_postfix(val_rmse=f"{metrics['val_rmse']:.3g}", loss=f"{train_loss:.3g}")
        if on_epoch is not None:
            try:
                on_epoch(EpochReport(epoch + 1, metrics, val, lambda e=epoch + 1: state(e), is_best))
            except StopTraining as stop:
                result.stopped = str(stop) or "stopped by callback"
                break
    bar.close()
    result.history = history
    return result
