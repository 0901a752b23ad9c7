"""The training loop. It knows nothing of Ray, files or loggers: callers hook in through ``on_epoch``.

Batches come from a :class:`~tune_agb.engine.data.SplitFeed` (the split resident on the device, or streamed from the
packed store with prefetch), are normalised and augmented on the device (flips / transposition, identical for image
and label), and the loss sums accumulate on the device. The host syncs once per epoch, when the metrics are read.

An epoch is one pass over the train tiles, or ``steps_per_epoch`` batches of an ongoing pass (the pass, its order
and flips are part of the checkpoint, so a run resumed mid-pass goes on exactly).

:func:`train` checks the run (:func:`check_run`), builds it or restores it from a checkpoint (:class:`Run`), then
runs one epoch at a time (:meth:`Run.one_epoch`: train, validate, record) and reports each to ``on_epoch``. One step
is :class:`TrainStep` (augment, forward, loss, :func:`~tune_agb.engine.optim.optimizer_step`); the optimiser and the
schedules are in :mod:`tune_agb.engine.optim`, the k models of a cross-validation trained in step in
:mod:`tune_agb.engine.folds_loop`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tune_agb.engine.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from tune_agb.engine.config import TrainConfig, config_from_dict
from tune_agb.engine.data import NormStats, SplitFeed, TileSet, compute_norm_stats, count_nonfinite
from tune_agb.engine.device import (
    autocast,
    compile_for_training,
    memory_format,
    resolve_amp,
    resolve_device,
    tune_cuda,
)
from tune_agb.engine.inference import predict_target_units
from tune_agb.engine.losses import LOSSES
from tune_agb.engine.memory import MemoryFit, check_memory_fit
from tune_agb.engine.metrics import labelled_metrics
from tune_agb.engine.model import UNet
from tune_agb.engine.optim import build_optimizer, build_scheduler, optimizer_step, resume_scheduler
from tune_agb.errors import DivergenceError, TuneAgbError

log = logging.getLogger(__name__)


class StopTraining(Exception):  # noqa: N818 (a signal, not an error)
    """Raised by an ``on_epoch`` callback to end the run after the current epoch."""


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
        forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        self.model, self.opt, self.sched, self.scaler = model, opt, sched, scaler
        self.forward = model if forward is None else forward  # the model, or its compiled wrapper
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
        with autocast(self.device, self.amp):
            mu, logvar = self.forward(x)
        loss = self.loss_fn(mu.float(), logvar.float(), y)
        optimizer_step(loss, self.model, self.opt, self.sched, self.scaler, self.cfg.grad_clip)
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
    """Mean and variance maps (N, H, W) in target units for normalised inputs ``x`` (N, C, H, W), in batches."""
    model.eval()
    means, varis = [], []
    for i in range(0, x.shape[0], batch_size):
        mean, var = predict_target_units(model, x[i : i + batch_size].to(device, non_blocking=True), cfg, norm, amp)
        means.append(mean)
        varis.append(var)
    return torch.cat(means), torch.cat(varis)


@dataclass
class SplitEval:
    """Predictions of one split at its labelled pixels, in target units on the device: ``y``, ``mean``, ``var`` (P,)
    for the pixels ``tile``, ``flat`` (host arrays: tile index, row * W + col); ``maps``: whole (mean, var) maps
    (H, W) of the tiles asked for; and the metrics over the labelled pixels."""

    split: str
    y: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    tile: np.ndarray
    flat: np.ndarray
    maps: dict[int, tuple[torch.Tensor, torch.Tensor]]
    metrics: dict[str, float]


@torch.no_grad()
def evaluate_split(
    model: UNet,
    feed: SplitFeed,
    cfg: TrainConfig,
    norm: NormStats,
    batch_size: int,
    amp: torch.dtype | None,
    keep: tuple[int, ...] = (0,),
) -> SplitEval:
    """Predict the split in order, batch by batch (streamed like training), keeping the labelled pixels and the maps
    of the tiles ``keep``: memory grows with the labels, not with the tiles."""
    model.eval()
    lab = feed.labelled
    hw = feed.shape[2] * feed.shape[3]
    n = len(feed)
    starts = list(range(0, n, batch_size))
    means, varis, maps = [], [], {}
    # Each labelled pixel's position in its batch's flattened maps, for every batch, sent in one copy (a host
    # copy per batch would sync per batch); the batches' ranges in it are known on the host.
    first = np.asarray(starts, dtype=np.int64)[lab.tile // batch_size] if lab.tile.size else lab.tile
    sel_all = torch.from_numpy(((lab.tile - first) * hw + lab.flat).astype(np.int64)).to(feed.device)
    batches = feed.batches([np.arange(s, min(s + batch_size, n)) for s in starts])
    for s, (x, _) in zip(starts, batches, strict=True):
        e = min(s + batch_size, n)
        mean, var = predict_target_units(model, x, cfg, norm, amp)
        sel = sel_all[lab.ptr[s] : lab.ptr[e]]
        means.append(mean.reshape(-1)[sel].float())
        varis.append(var.reshape(-1)[sel].float())
        for k in keep:
            if s <= k < e:
                maps[k] = (mean[k - s].float().clone(), var[k - s].float().clone())
    maps = {k: maps[k] for k in keep if k in maps}  # in the order asked for
    y = torch.from_numpy(lab.values).to(feed.device)
    mean, var = torch.cat(means), torch.cat(varis)
    metrics = labelled_metrics(y, mean, var, cfg.loss)
    return SplitEval(feed.split, y, mean, var, lab.tile, lab.flat, maps, metrics)


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
    memory: MemoryFit | None = None  # the measured working set (CUDA), see tune_agb.engine.memory


# The keys that fix a model's weights: a checkpoint can only be resumed with the same ones.
ARCHITECTURE_KEYS = ("in_channels", "base_channels", "depth", "upsampling", "norm")


def train(
    cfg: TrainConfig,
    tiles: dict[str, TileSet],
    *,
    norm: NormStats | None = None,
    device: str = "auto",
    resume: dict[str, Any] | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    progress: bool = True,
    device_share: float = 1.0,
) -> TrainResult:
    """Train a U-Net on ``tiles['train']``, evaluating on ``tiles['val']`` after every epoch.

    Args:
        cfg: hyperparameters.
        tiles: at least ``train`` and ``val`` TileSets.
        norm: normalisation stats; computed from the train split when None (and taken from ``resume`` if given).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        resume: a checkpoint dict (see :mod:`tune_agb.engine.checkpoint`); training continues after its epoch, with
            the horizon of ``cfg.epochs`` (which may extend the run).
        on_epoch: called after every epoch; may raise :class:`StopTraining`.
        progress: show a tqdm bar over epochs.
        device_share: the share of the GPU this run may use (a trial's ``resources.gpu``): on CUDA, a dry step checks
            that the configuration fits it before anything trains, and the tiles stay resident only where they fit.

    Raises:
        InfeasibleError: on CUDA, when one training step at the batch size would not fit ``device_share`` of the card
            (:func:`tune_agb.engine.memory.check_memory_fit`).
        DivergenceError: when the epoch's training loss or validation metrics are not finite.
    """
    dev = resolve_device(device)
    norm = check_run(cfg, tiles, norm, resume)
    run = Run(cfg, tiles, norm, dev, resume, device_share)
    bar = tqdm(
        range(run.epochs_done, cfg.epochs),
        initial=run.epochs_done,
        total=cfg.epochs,
        disable=not progress,
        desc="train",
        unit="epoch",
        leave=False,
    )
    for _ in bar:
        report = run.one_epoch()
        bar.set_postfix(val_rmse=f"{report.metrics['val_rmse']:.3g}", loss=f"{report.metrics['train_loss']:.3g}")
        if on_epoch is not None:
            try:
                on_epoch(report)
            except StopTraining as stop:
                run.result.stopped = str(stop) or "stopped by callback"
                break
    bar.close()
    return run.result


def architecture_difference(saved: TrainConfig, cfg: TrainConfig) -> str | None:
    """The first of :data:`ARCHITECTURE_KEYS` on which two configs differ (their weights do not fit each other's
    model), or None."""
    return next((k for k in ARCHITECTURE_KEYS if getattr(saved, k) != getattr(cfg, k)), None)


def init_state(cfg: TrainConfig) -> dict[str, torch.Tensor] | None:
    """The weights ``cfg.init_weights`` names (None when it is ""), checked against ``cfg``'s architecture: every
    architecture key must match, and every tensor of the model must be there with its shape.

    Raises:
        TuneAgbError: naming the file, when it is missing, not a tune_agb checkpoint, or of another architecture.
    """
    if not cfg.init_weights:
        return None
    path = cfg.init_weights
    ckpt = load_checkpoint(path)
    saved = config_from_dict(ckpt.get("config", {}), source=f"{path}: config")
    if k := architecture_difference(saved, cfg):
        raise TuneAgbError(
            f"init_weights {path}: holds a model with {k}={getattr(saved, k)!r}, but the config asks for "
            f"{getattr(cfg, k)!r} (every architecture key must match: {', '.join(ARCHITECTURE_KEYS)})"
        )
    state = ckpt.get("model")
    if not isinstance(state, dict):
        raise TuneAgbError(f"init_weights {path}: holds no model weights")
    want = UNet.from_config(cfg).state_dict()
    absent = [k for k in want if k not in state]
    wrong = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    extra = [k for k in state if k not in want]
    if absent or wrong or extra:
        what = (f"{len(absent)} missing" if absent else "", f"{len(wrong)} of another shape" if wrong else "",
                f"{len(extra)} unknown" if extra else "")  # fmt: skip
        first = (absent or wrong or extra)[0]
        raise TuneAgbError(
            f"init_weights {path}: its weights do not fit this model ({', '.join(w for w in what if w)} tensors, "
            f"first {first!r})"
        )
    return state


def check_run(
    cfg: TrainConfig, tiles: dict[str, TileSet], norm: NormStats | None, resume: dict[str, Any] | None
) -> NormStats:
    """Validate a run before anything is built (checkpoint, channels, tile size); the normalisation stats to use:
    the checkpoint's, else ``norm``, else computed from the train split."""
    if resume is not None:
        if resume.get("format") != CHECKPOINT_FORMAT:
            raise TuneAgbError("resume: not a tune_agb checkpoint")
        saved = config_from_dict(resume["config"], source="checkpoint config")
        if k := architecture_difference(saved, cfg):
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
    return norm


def _batch_starts(n: int, batch_size: int, norm: str) -> list[int]:
    """First index of each batch of an epoch over ``n`` tiles."""
    starts = list(range(0, n, batch_size))
    if norm == "batch" and len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()  # a batch of one tile breaks BatchNorm; that tile is seen in other epochs
    return starts


class Run:
    """One training run: the tile feeds, model, optimiser, schedule, RNGs, the pass in progress and the result."""

    def __init__(
        self,
        cfg: TrainConfig,
        tiles: dict[str, TileSet],
        norm: NormStats,
        dev: torch.device,
        resume: dict | None,
        device_share: float = 1.0,
    ):
        self.cfg, self.norm, self.device = cfg, norm, dev
        tune_cuda(dev)
        n_train = len(tiles["train"])
        self.batch_size = min(cfg.batch_size, n_train)
        # Before anything is on the device: does one step at this batch size fit the share? (CUDA only.)
        self.memory: MemoryFit | None = check_memory_fit(
            cfg.replace(batch_size=self.batch_size), tuple(tiles["train"].inputs.shape[-2:]), dev, device_share
        )
        reserved = self.memory.required if self.memory is not None else 0
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)  # shuffling, flip flags
        fmt = memory_format(cfg, dev)
        self.train_t = SplitFeed(tiles["train"], norm, dev, cfg.data_mode, device_share, reserved=reserved)
        if self.train_t.mode == "resident":
            reserved += self.train_t.nbytes
        self.val_t = SplitFeed(tiles["val"], norm, dev, cfg.data_mode, device_share, reserved=reserved)
        log.debug("train tiles %s, val tiles %s", self.train_t.mode, self.val_t.mode)
        self.model = UNet.from_config(cfg)
        start = init_state(cfg) if resume is None else None
        if start is not None:  # checked by init_state: every tensor of this architecture
            self.model.load_state_dict(start)
            log.info("weights from %s (%d tensors)", cfg.init_weights, len(start))
        self.model = self.model.to(dev, memory_format=fmt)
        self.forward = compile_for_training(self.model, cfg)
        self.opt = build_optimizer(cfg, self.model.parameters(), fused=dev.type == "cuda")
        self.starts = _batch_starts(len(self.train_t), self.batch_size, cfg.norm)
        self.steps = cfg.steps_per_epoch or len(self.starts)
        # The pass in progress: tile order, flip flags, and the next batch (None: a new pass starts when needed).
        self.perm: torch.Tensor | None = None
        self.flags: torch.Tensor | None = None
        self.pos = 0
        amp = resolve_amp(cfg, dev)
        self.scaler = torch.amp.GradScaler(dev.type) if amp == torch.float16 else None
        self.result = TrainResult(self.model, norm, cfg, [], device=dev, amp=amp, memory=self.memory)
        self.epochs_done = 0
        if resume is None:
            self.sched = build_scheduler(cfg, self.opt, self.steps)
        else:
            self.sched = self._restore(resume)
        self.step = TrainStep(self.model, self.opt, self.sched, self.scaler, cfg, amp, dev, self.forward)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)  # from here on the peak is training's own

    def _restore(self, ckpt: dict[str, Any]) -> torch.optim.lr_scheduler.LRScheduler:
        """Continue from a checkpoint: weights, scaler, RNG states, the pass in progress, history, best epoch;
        optimiser and schedule."""
        self.model.load_state_dict(ckpt["model"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if self.device.type == "cuda" and ckpt["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        self.gen.set_state(ckpt["rng"]["shuffle"])
        ongoing = ckpt.get("pass")
        if ongoing is not None and len(ongoing["perm"]) == len(self.train_t):
            self.perm, self.flags, self.pos = ongoing["perm"], ongoing["flags"], int(ongoing["pos"])
        self.result.history = [dict(h) for h in ckpt["history"]]
        self.result.best_epoch, self.result.best_val_rmse = int(ckpt["best"]["epoch"]), float(ckpt["best"]["val_rmse"])
        self.epochs_done = int(ckpt["epoch"])
        # The schedule is the checkpoint's (its optimiser state holds the learning rates and momenta); its horizon
        # follows cfg.epochs, so that a resumed run can be extended.
        saved = config_from_dict(ckpt["config"], source="checkpoint config")
        horizon = saved.replace(epochs=max(self.cfg.epochs, self.epochs_done))
        return resume_scheduler(horizon, self.opt, self.steps, ckpt["scheduler"], ckpt["optimizer"])

    def _batches(self) -> tuple[list[np.ndarray], torch.Tensor | None]:
        """The epoch's batches (tile indices) and flip flags, taken from the pass in progress, starting new passes
        (new order, new flips) as needed. The flags reach the device once."""
        n, bs = len(self.train_t), self.batch_size
        idx: list[np.ndarray] = []
        flags: list[torch.Tensor] = []
        while len(idx) < self.steps:
            if self.perm is None:
                self.perm = torch.randperm(n, generator=self.gen)
                self.flags = torch.rand((n, 3), generator=self.gen).lt(0.5) if self.cfg.augment else None
                self.pos = 0
            s = self.starts[self.pos]
            idx.append(self.perm[s : s + bs].numpy())
            if self.flags is not None:
                flags.append(self.flags[s : s + bs])
            self.pos += 1
            if self.pos == len(self.starts):
                self.perm, self.flags = None, None
        return idx, torch.cat(flags).to(self.device) if flags else None

    def one_epoch(self) -> EpochReport:
        """Train ``steps`` batches (one pass, or ``steps_per_epoch`` batches of the passes), validate, record."""
        self.model.train()
        idx, flags = self._batches()
        self.step.reset()
        at = 0
        for i, (x, y) in zip(idx, self.train_t.batches(idx), strict=True):
            self.step(x, y, flags[at : at + len(i)] if flags is not None else None)
            at += len(i)
        val = evaluate_split(self.model, self.val_t, self.cfg, self.norm, max(self.batch_size, 1), self.result.amp)
        return self._record(val)

    def _record(self, val: SplitEval) -> EpochReport:
        """The epoch's metrics appended to the history; a DivergenceError when they are not finite; the best epoch."""
        train_loss, train_mse = self.step.read()  # the epoch's one host sync
        self.epochs_done += 1
        epoch = self.epochs_done
        metrics = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_rmse": math.sqrt(train_mse) * self.norm.target_std if math.isfinite(train_mse) else math.inf,
            "lr": self.opt.param_groups[0]["lr"],
        }
        if self.device.type == "cuda":  # the allocator's own counters: no device sync
            metrics["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        metrics |= {f"val_{k}": v for k, v in val.metrics.items()}
        self.result.history.append(metrics)
        _raise_if_diverged(metrics, self.cfg)
        is_best = metrics["val_rmse"] < self.result.best_val_rmse
        if is_best:
            self.result.best_epoch, self.result.best_val_rmse = epoch, metrics["val_rmse"]
        return EpochReport(epoch, metrics, val, lambda: self.state(epoch), is_best)

    def state(self, epoch: int) -> dict[str, Any]:
        """The checkpoint dict after ``epoch`` epochs (see :mod:`tune_agb.engine.checkpoint`)."""
        ongoing = None
        if self.perm is not None:
            ongoing = {"perm": self.perm.clone(), "flags": None if self.flags is None else self.flags.clone(),
                       "pos": self.pos}  # fmt: skip
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,
            "config": self.cfg.to_dict(),
            "norm": self.norm.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "rng": {
                "torch": torch.get_rng_state(),
                "shuffle": self.gen.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            },
            "pass": ongoing,
            "history": [dict(h) for h in self.result.history],
            "best": {"epoch": self.result.best_epoch, "val_rmse": self.result.best_val_rmse},
        }


def _raise_if_diverged(metrics: dict[str, float], cfg: TrainConfig) -> None:
    train_loss, val_rmse = metrics["train_loss"], metrics["val_rmse"]
    if math.isfinite(train_loss) and math.isfinite(val_rmse):
        return
    what, value = ("training loss", train_loss) if not math.isfinite(train_loss) else ("validation RMSE", val_rmse)
    raise DivergenceError(
        f"epoch {metrics['epoch']}: {what} is not finite ({value}); the run diverged "
        f"(lr={cfg.lr:g}, optimizer={cfg.optimizer}; try a lower lr or grad_clip)",
        metrics,
    )
