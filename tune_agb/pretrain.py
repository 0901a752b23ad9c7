"""Self-supervised pretraining of the U-Net's trunk on the input tiles (no labels): masked-patch reconstruction.

    python -m tune_agb.pretrain --out trunk.pt [--config FILE] [--input-dir D --label-dir D]
        [--splits train,val] [--steps 600] [--batch-size B] [--lr 2e-3] [--mask-patch 8] [--mask-ratio 0.6]
        [--seed 0] [--device auto|cpu|cuda] [--overwrite]

GEDI labels cover a few pixels per tile; the images cover all of them. Each step hides random square patches
(``--mask-patch`` px, a ``--mask-ratio`` share of them) of a batch of tiles, in every band, and trains the U-Net of
``--config`` (its architecture keys; flips and transpositions as in training) with a reconstruction head of its own
to predict the hidden bands (mean squared error on the normalised bands, on the hidden pixels only).

The output is a tune_agb checkpoint holding the trunk (every weight but the output head), its config, the train
split's normalisation and the pretraining's settings and losses. Training starts from it with the config key
``init_weights: trunk.pt`` (``final_train --config``, or a search space's ``fixed:``); the head then starts random.
The config's architecture keys must be the same in both.

Which tiles: ``--splits`` (default train and val). Test tiles may be added: their labels are never read, but a model
pretrained on them has seen the test images, which a strict evaluation may not want. Normalisation always comes from
the train split, as in final training.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from tune_agb.bands import SPLITS
from tune_agb.demo import data_dirs
from tune_agb.engine.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
from tune_agb.engine.config import TrainConfig, config_from_dict, read_config_values
from tune_agb.engine.data import NormStats, SplitFeed, TileSet
from tune_agb.engine.device import autocast, memory_format, resolve_amp, resolve_device, tune_cuda
from tune_agb.engine.model import UNet
from tune_agb.engine.train import augment, optimizer_step
from tune_agb.errors import TuneAgbError, run_cli
from tune_agb.folds import stack_splits
from tune_agb.store import DataSource

log = logging.getLogger(__name__)

LOG_EVERY = 25  # steps per recorded loss (one host read each)


def patch_mask(
    batch: int, h: int, w: int, patch: int, ratio: float, device: torch.device, gen: torch.Generator | None = None
) -> torch.Tensor:
    """(batch, 1, h, w) float mask, 1 on hidden pixels: a grid of ``patch`` px squares, each hidden with probability
    ``ratio`` (the grid starts at the tile's corner; edge squares are cut to the tile). Drawn on ``device``."""
    gh, gw = math.ceil(h / patch), math.ceil(w / patch)
    cells = torch.rand((batch, 1, gh, gw), device=device, generator=gen).lt(ratio).float()
    # each cell spread over its square by a broadcast view (no data-dependent sizes: no host sync on CUDA)
    squares = cells[:, :, :, None, :, None].expand(batch, 1, gh, patch, gw, patch)
    return squares.reshape(batch, 1, gh * patch, gw * patch)[..., :h, :w]


def reconstruction_loss(pred: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the hidden pixels and every band (0 when nothing is hidden)."""
    se = ((pred.float() - x.float()) ** 2 * mask).sum()
    return se / (mask.sum() * x.shape[1]).clamp_min(1)


class Pretrainer(nn.Module):
    """The U-Net's trunk with a 1x1 reconstruction head: masked input (B, C, H, W) -> bands (B, C, H, W)."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.unet = UNet.from_config(cfg)
        self.recon = nn.Conv2d(self.unet.head.in_channels, cfg.in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.recon(self.unet.features(x))

    def trunk_state(self) -> dict[str, torch.Tensor]:
        """The U-Net's weights without its (untrained) output head: what ``init_weights`` loads."""
        return {k: v.detach().cpu().clone() for k, v in self.unet.state_dict().items() if not k.startswith("head.")}


class PretrainStep:
    """One pretraining step on a batch (flips, mask, forward, masked loss, backward, clip, step, schedule), with the
    loss summed on the device: calling it never syncs with the host; :meth:`read` does, once."""

    def __init__(self, model: Pretrainer, cfg: TrainConfig, device: torch.device, *, steps: int, lr: float,
                 mask_patch: int, mask_ratio: float):  # fmt: skip
        self.model, self.cfg, self.device = model, cfg, device
        self.opt = torch.optim.AdamW(
            model.parameters(), lr=lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda"
        )
        self.sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=lr, total_steps=steps)
        self.amp = resolve_amp(cfg, device)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp == torch.float16 else None
        self.fmt = memory_format(cfg, device)
        self.mask_patch, self.mask_ratio = mask_patch, mask_ratio
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)  # the masks, drawn on the device
        self.loss_sum = torch.zeros((), device=device)
        self.count = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor, flags: torch.Tensor | None = None) -> None:
        """x (B, C, H, W) normalised, y (B, H, W) (unused but flipped along), flags (B, 3) bool or None."""
        if flags is not None:
            x, y = augment(x, y, flags)
        b, _, h, w = x.shape
        mask = patch_mask(b, h, w, self.mask_patch, self.mask_ratio, self.device, self.gen)
        x = x.contiguous(memory_format=self.fmt)
        with autocast(self.device, self.amp):
            pred = self.model((x * (1 - mask)).contiguous(memory_format=self.fmt))
        loss = reconstruction_loss(pred, x, mask)
        optimizer_step(loss, self.model, self.opt, self.sched, self.scaler, self.cfg.grad_clip)
        self.loss_sum += loss.detach()
        self.count += 1

    def read(self) -> float:
        """The mean loss of the steps since the last read (one host sync); starts a new sum."""
        mean = float(self.loss_sum) / max(self.count, 1)
        self.loss_sum.zero_()
        self.count = 0
        return mean


def pretrain(
    cfg: TrainConfig,
    tiles: TileSet,
    norm: NormStats,
    *,
    steps: int,
    lr: float,
    mask_patch: int,
    mask_ratio: float,
    batch_size: int | None = None,
    device: str = "auto",
    progress: bool = True,
) -> tuple[Pretrainer, list[float]]:
    """Train the trunk of ``cfg``'s U-Net to reconstruct masked patches of ``tiles`` for ``steps`` steps (AdamW with
    ``cfg.weight_decay``, one-cycle schedule peaking at ``lr``, gradients clipped at ``cfg.grad_clip``). Returns the
    model (on the device) and the mean loss of every ``LOG_EVERY`` steps (and of the last, shorter, stretch).

    Batches are drawn in passes over the tiles, each pass a new order and new flips. Tiles reach the device as in
    training (:class:`SplitFeed`: resident or streamed); masks are drawn there; the loss is read back every
    ``LOG_EVERY`` steps only."""
    dev = resolve_device(device)
    tune_cuda(dev)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    bs = min(batch_size or cfg.batch_size, len(tiles))
    feed = SplitFeed(tiles, norm, dev, cfg.data_mode)
    model = Pretrainer(cfg).to(dev, memory_format=memory_format(cfg, dev))
    model.train()
    step = PretrainStep(model, cfg, dev, steps=steps, lr=lr, mask_patch=mask_patch, mask_ratio=mask_ratio)
    n = len(tiles)
    batches: list[np.ndarray] = []
    while len(batches) < steps:  # whole passes; a last short batch would break BatchNorm's statistics
        perm = torch.randperm(n, generator=gen).numpy()
        batches += [perm[s : s + bs] for s in range(0, n - bs + 1, bs)]
    batches = batches[:steps]
    flags = torch.rand((steps, bs, 3), generator=gen).lt(0.5).to(dev) if cfg.augment else None  # one copy
    losses: list[float] = []
    bar = tqdm(total=steps, disable=not progress, desc="pretrain", unit="step", leave=False)
    for i, (x, y) in enumerate(feed.batches(batches)):
        step(x, y, None if flags is None else flags[i, : len(x)])
        if step.count == LOG_EVERY or i == steps - 1:
            losses.append(step.read())  # the only host read: every LOG_EVERY steps
            if not math.isfinite(losses[-1]):
                raise TuneAgbError(f"pretraining diverged at step {i + 1} (loss {losses[-1]}); lower --lr")
            bar.set_postfix(loss=f"{losses[-1]:.3g}")
        bar.update(1)
    bar.close()
    return model, losses


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tune_agb.pretrain",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--out", required=True, help="the checkpoint to write (the trunk), e.g. trunk.pt")
    p.add_argument("--config", help="YAML/JSON file of hyperparameters: the architecture to pretrain")
    p.add_argument("--input-dir", help="INPUT_DIR holding {train,val,test}/NAME.npy (default: the demo data)")
    p.add_argument("--label-dir", help="LABEL_DIR (the layout's; labels are not used)")
    p.add_argument("--splits", default="train,val", help="the splits whose tiles are pretrained on (default train,val)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, help="tiles per step (default: the config's batch_size)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--mask-patch", type=int, default=8, help="side of a hidden square, px")
    p.add_argument("--mask-ratio", type=float, default=0.6, help="share of the squares hidden")
    p.add_argument("--seed", type=int, help="overrides the config's seed")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true")
    return p


def _check_args(a: argparse.Namespace) -> list[str]:
    splits = [s.strip() for s in a.splits.split(",") if s.strip()]
    if not splits or any(s not in SPLITS for s in splits) or len(set(splits)) != len(splits):
        raise TuneAgbError(f"--splits: distinct names among {', '.join(SPLITS)}, comma-separated; got {a.splits!r}")
    if a.steps < 1:
        raise TuneAgbError(f"--steps: must be >= 1, got {a.steps}")
    if a.batch_size is not None and a.batch_size < 2:
        raise TuneAgbError(f"--batch-size: must be >= 2 (BatchNorm needs two tiles), got {a.batch_size}")
    if not (math.isfinite(a.lr) and a.lr > 0):
        raise TuneAgbError(f"--lr: must be > 0, got {a.lr}")
    if a.mask_patch < 1:
        raise TuneAgbError(f"--mask-patch: must be >= 1 px, got {a.mask_patch}")
    if not 0 < a.mask_ratio < 1:
        raise TuneAgbError(f"--mask-ratio: must be in (0, 1), got {a.mask_ratio}")
    out = Path(a.out)
    if out.exists() and not a.overwrite:
        raise TuneAgbError(f"{out}: already exists; use --overwrite to replace it, or another --out")
    return splits


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    a = build_parser().parse_args(argv)
    splits = _check_args(a)
    values: dict[str, Any] = read_config_values(a.config) if a.config else {}
    if a.seed is not None:
        values["seed"] = a.seed
    cfg = config_from_dict({**values, "init_weights": ""}, source=a.config or "config")
    input_dir, label_dir = data_dirs(a.input_dir, a.label_dir)
    wanted = ("train", *(s for s in splits if s != "train"))  # train always: the normalisation comes from it
    data = DataSource(str(input_dir), str(label_dir), splits=wanted, in_channels=cfg.in_channels).open()
    norm = data.norm(cfg.standardize_target)
    tiles = stack_splits(data.tiles, splits)
    if len(tiles) < 2:
        raise TuneAgbError(f"--splits {a.splits}: {len(tiles)} tile; pretraining needs at least 2")
    print(f"pretraining on {len(tiles)} tiles of {','.join(splits)} in {input_dir} -> {a.out}", file=sys.stderr)
    model, losses = pretrain(
        cfg, tiles, norm, steps=a.steps, lr=a.lr, mask_patch=a.mask_patch, mask_ratio=a.mask_ratio,
        batch_size=a.batch_size, device=a.device, progress=not a.no_progress,
    )  # fmt: skip
    settings = {"splits": splits, "tiles": len(tiles), "steps": a.steps, "lr": a.lr, "mask_patch": a.mask_patch,
                "mask_ratio": a.mask_ratio, "batch_size": min(a.batch_size or cfg.batch_size, len(tiles)),
                "log_every": LOG_EVERY, "losses": losses}  # fmt: skip
    save_checkpoint(
        {
            "format": CHECKPOINT_FORMAT,
            "epoch": 0,
            "config": cfg.to_dict(),
            "norm": norm.to_dict(),
            "model": model.trunk_state(),
            "pretrain": settings,
        },
        a.out,
    )
    print(json.dumps({"out": str(a.out), "first_loss": losses[0], "last_loss": losses[-1]}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
