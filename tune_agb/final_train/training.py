"""Training one member of a final run and predicting its val and test splits: the per-epoch callback (checkpoints,
TensorBoard scalars/histograms/images, Weights & Biases) and a fold model of a cv search kept as a member."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tune_agb.engine.checkpoint import load_checkpoint, save_checkpoint
from tune_agb.engine.config import TrainConfig, save_config
from tune_agb.engine.data import NormStats, SplitFeed, TileSet
from tune_agb.engine.device import resolve_amp, resolve_device
from tune_agb.engine.inference import member_from_state
from tune_agb.engine.train import EpochReport, SplitEval, TrainResult, evaluate_split, train
from tune_agb.errors import TuneAgbError

log = logging.getLogger("tune_agb.final_train")

# How many test tiles a final run keeps whole (mean, std and label maps) for the report: the most labelled ones.
MAP_TILES = 4
NORM_STATS_FILE = "norm_stats.json"


class EpochLogger:
    """Writes best.pt / last.pt / optional per-epoch checkpoints, TensorBoard scalars and images, wandb."""

    def __init__(
        self, out: Path, tb_dir: Path, keep_dir: Path | None, wandb_run: Any = None, last_is_best: bool = False
    ):
        from torch.utils.tensorboard import SummaryWriter

        self.out = out
        self.last_is_best = last_is_best  # best.pt = the last epoch (no held-out split to pick an epoch on)
        self.keep_dir = keep_dir
        self.writer = SummaryWriter(log_dir=str(tb_dir))
        self.wandb = wandb_run

    def __call__(self, rep: EpochReport) -> None:
        state = rep.state()
        save_checkpoint(state, self.out / "last.pt")
        if rep.is_best or self.last_is_best:
            save_checkpoint(state, self.out / "best.pt")
        if self.keep_dir is not None:
            save_checkpoint(state, self.keep_dir / f"epoch_{rep.epoch:04d}.pt")
        for k, v in rep.metrics.items():
            if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(k, v, rep.epoch)
        flat = rep.val.var.sqrt().float()  # at the labelled val pixels
        q = torch.quantile(flat[:: max(1, flat.numel() // 100_000)], torch.tensor([0.1, 0.5, 0.9], device=flat.device))
        stats = dict(zip(("std_p10", "std_median", "std_p90"), q.cpu().tolist(), strict=True))
        for k, v in stats.items():
            self.writer.add_scalar(f"val_variance/{k}", v, rep.epoch)
        self.writer.add_histogram("val_variance/predicted_std", flat.cpu(), rep.epoch)
        if 0 in rep.val.maps:
            mean0, var0 = rep.val.maps[0]
            self.writer.add_image("val_prediction/mean_and_std", prediction_image(mean0, var0.sqrt()), rep.epoch)
        self.writer.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in rep.metrics.items() if k != "epoch"} | stats, step=rep.epoch)

    def close(self) -> None:
        self.writer.close()


def prediction_image(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(1, H, 2W + 2) image in [0, 1]: the mean map beside the std map, each scaled by its own max."""
    m = mean.detach().float().cpu().clamp_min(0)
    s = std.detach().float().cpu()
    m = m / m.max().clamp_min(1e-6)
    s = s / s.max().clamp_min(1e-6)
    gap = torch.ones(m.shape[0], 2)
    return torch.cat([m, gap, s], dim=1).unsqueeze(0)


def _start_wandb(project: str | None, cfg: TrainConfig, out: Path) -> Any:
    if project is None:
        return None
    try:
        import wandb
    except ImportError:
        raise TuneAgbError("--wandb: the wandb package is not installed (pip install 'tune_agb[wandb]')") from None
    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return wandb.init(project=project, dir=str(out), config=cfg.to_dict(), mode=mode)


@dataclass
class MemberOutput:
    """A member's result: its training (None: a fold model kept from a search, not trained here), its val/test
    predictions at the labelled pixels (and the maps of the kept test tiles), its own uncalibrated metrics."""

    result: TrainResult | None
    preds: dict[str, SplitEval]
    metrics: dict[str, float]


def train_member(
    cfg: TrainConfig,
    tiles: dict[str, TileSet],
    out: Path,
    *,
    norm: NormStats | None = None,
    resume: dict[str, Any] | None = None,
    device: str = "auto",
    progress: bool = True,
    epoch_checkpoints: Path | None = None,
    wandb_project: str | None = None,
    last_is_best: bool = False,
) -> MemberOutput:
    """Train one model into ``out`` (config.yaml, best.pt, last.pt, tensorboard/, norm_stats.json) and predict val
    and test with its best epoch.

    Args:
        cfg: hyperparameters.
        tiles: ``train``, ``val`` and ``test`` TileSets.
        out: the member's output folder.
        norm: normalisation stats (None: computed from the train split).
        resume: a checkpoint dict to continue from.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        progress: show a progress bar.
        epoch_checkpoints: a folder to keep every epoch's checkpoint in (None: not kept).
        wandb_project: log to Weights & Biases under this project (None: no W&B).
        last_is_best: keep the last epoch as best.pt, not the one with the lowest val RMSE (a retrain on train+val,
            whose val tiles are training tiles: the epoch count was chosen by cross-validation).
    """
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    wb = _start_wandb(wandb_project, cfg, out)
    logger = EpochLogger(out, out / "tensorboard", epoch_checkpoints, wb, last_is_best=last_is_best)
    try:
        result = train(
            cfg,
            {"train": tiles["train"], "val": tiles["val"]},
            norm=norm,
            device=device,
            resume=resume,
            on_epoch=logger,
            progress=progress,
        )
    finally:
        logger.close()
        if wb is not None:
            wb.finish()
    if not (out / "best.pt").is_file():  # resumed elsewhere and no epoch beat the checkpoint's best
        log.warning("%s: no epoch improved on the resumed checkpoint's best; evaluating the last epoch", out)
        save_checkpoint(load_checkpoint(out / "last.pt"), out / "best.pt")
    best = load_checkpoint(out / "best.pt", map_location=result.device)
    member = member_from_state(best, result.device, source=str(out / "best.pt"))  # measures its seam margin
    if best.get("seam_margin", -1) != member.margin:  # stored with the model for tiled prediction without seams
        save_checkpoint({**best, "seam_margin": member.margin}, out / "best.pt")
    log.info("%s: seam margin %s px", out / "best.pt", member.margin)
    preds, metrics = predict_splits(member.model, cfg, result.norm, tiles, result.device, result.amp)
    (out / NORM_STATS_FILE).write_text(json.dumps(result.norm.to_dict(), indent=1))
    return MemberOutput(result, preds, {"best_epoch": int(best["epoch"])} | metrics)


def predict_splits(
    model: torch.nn.Module,
    cfg: TrainConfig,
    norm: NormStats,
    tiles: dict[str, TileSet],
    device: torch.device,
    amp: torch.dtype | None,
) -> tuple[dict[str, SplitEval], dict[str, float]]:
    """A model's predictions of val and test (the test maps of a few tiles kept) and their metrics."""
    preds, metrics = {}, {}
    for split in ("val", "test"):
        feed = SplitFeed(tiles[split], norm, device, cfg.data_mode)
        keep = map_tiles(feed) if split == "test" else ()
        ev = evaluate_split(model, feed, cfg, norm, cfg.batch_size, amp, keep=keep)
        preds[split] = ev
        metrics |= {f"{split}_{k}": v for k, v in ev.metrics.items()}
    return preds, metrics


def keep_fold_model(state: dict[str, Any], tiles: dict[str, TileSet], out: Path, device: str) -> MemberOutput:
    """One fold model of a cross-validated search kept as an ensemble member: written to ``out`` like a trained
    member (best.pt with its seam margin, config.yaml, norm_stats.json) and predicting val and test."""
    dev = resolve_device(device)
    member = member_from_state(state, dev, source=f"{out.name} (fold model)")
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint({**state, "seam_margin": member.margin}, out / "best.pt")
    save_config(member.config, out / "config.yaml")
    (out / NORM_STATS_FILE).write_text(json.dumps(member.norm.to_dict(), indent=1))
    preds, metrics = predict_splits(
        member.model, member.config, member.norm, tiles, dev, resolve_amp(member.config, dev)
    )
    return MemberOutput(None, preds, {"best_epoch": int(state["epoch"])} | metrics)


def map_tiles(feed: SplitFeed, k: int = MAP_TILES) -> tuple[int, ...]:
    """The ``k`` tiles with the most labelled pixels (ties: the first), whose whole maps the run keeps."""
    counts = feed.labelled.counts()
    return tuple(int(i) for i in sorted(range(len(counts)), key=lambda i: (-counts[i], i))[:k])
