"""The optimiser, the learning-rate schedules and one optimiser step, as training uses them.

Every schedule steps once per optimiser step, over a horizon of ``epochs * steps_per_epoch`` steps; a resumed run
continues its checkpoint's schedule (:func:`resume_scheduler`) with the horizon of its own config.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tune_agb.engine.config import TrainConfig


def build_optimizer(cfg: TrainConfig, params: Any, fused: bool = False) -> torch.optim.Optimizer:
    """The optimiser of ``cfg``; ``fused``: Adam/AdamW's fused CUDA kernel (one launch for all the weights, used
    on CUDA; same state dict, so checkpoints move between the two)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


# Warmup-stable-decay: linear warm-up over the first 5 % of the steps, the full lr until 80 % of the horizon, then a
# cosine decay to lr/100 at its end. Unlike cosine, the lr stays at its peak for most of the run, so ASHA's early
# rungs compare trials at the same (full) learning rate, not at different points of an anneal.
WSD_WARMUP = 0.05
WSD_DECAY_START = 0.8
LR_FLOOR = 0.01  # cosine and wsd end at lr * LR_FLOOR


def wsd_factor(step: int, total: int) -> float:
    """The warmup-stable-decay multiplier of the lr after ``step`` optimiser steps of a ``total``-step horizon.

    Warm-up: ``w = max(1, round(0.05 total))`` steps at ``(step + 1) / (w + 1)``; then 1 up to step
    ``d = max(w, floor(0.8 total))`` (at most ``total - 1``); then a cosine from 1 to ``LR_FLOOR`` at ``total``, and
    ``LR_FLOOR`` past it (a resumed run that goes on beyond its horizon)."""
    warmup = max(1, round(WSD_WARMUP * total))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    decay_start = min(max(warmup, math.floor(WSD_DECAY_START * total)), total - 1)  # decays by ``total``
    if step <= decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
    return LR_FLOOR + (1.0 - LR_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int, last_epoch: int = -1
) -> torch.optim.lr_scheduler.LRScheduler:
    """All schedules step once per optimiser step, over a horizon of ``cfg.epochs * steps_per_epoch`` steps.

    ``last_epoch`` is torch's argument (here the index of the last *step* taken): -1 starts the schedule; use
    :func:`resume_scheduler` to continue one."""
    total = max(1, cfg.epochs * steps_per_epoch)
    lr_scheduler = torch.optim.lr_scheduler
    if cfg.schedule == "cosine":
        return lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=cfg.lr * LR_FLOOR, last_epoch=last_epoch)
    if cfg.schedule == "onecycle":
        # SGD: cycle the momentum between 0.85 m and the configured m (not torch's fixed 0.85..0.95).
        m = cfg.momentum if cfg.optimizer == "sgd" else 0.95
        return lr_scheduler.OneCycleLR(
            opt,
            max_lr=cfg.lr,
            total_steps=total,
            pct_start=0.3,
            cycle_momentum=m > 0,
            base_momentum=0.85 / 0.95 * m,
            max_momentum=m,
            last_epoch=last_epoch,
        )
    if cfg.schedule == "cyclic":
        return lr_scheduler.CyclicLR(
            opt,
            base_lr=cfg.lr / 10,
            max_lr=cfg.lr,
            step_size_up=max(1, cfg.cyclic_step_epochs * steps_per_epoch),
            mode="triangular2",
            cycle_momentum=cfg.optimizer == "sgd" and cfg.momentum > 0,
            base_momentum=0.85 / 0.95 * cfg.momentum,
            max_momentum=cfg.momentum,
            last_epoch=last_epoch,
        )
    if cfg.schedule == "wsd":
        # A plain function (not a callable object): LambdaLR's state_dict then keeps no copy of the horizon, so a
        # resumed run follows its own cfg.epochs.
        return lr_scheduler.LambdaLR(opt, lambda step: wsd_factor(step, total), last_epoch=last_epoch)
    return lr_scheduler.LambdaLR(opt, lambda _: 1.0, last_epoch=last_epoch)


def resume_scheduler(
    cfg: TrainConfig,
    opt: torch.optim.Optimizer,
    steps_per_epoch: int,
    state: dict[str, Any],
    opt_state: dict[str, Any],
) -> torch.optim.lr_scheduler.LRScheduler:
    """Restore ``opt`` from ``opt_state`` and continue the schedule of ``cfg`` after the steps recorded in ``state``
    (both ``state_dict()``s of one checkpoint).

    The horizon is the one of ``cfg`` (``cfg.epochs * steps_per_epoch``), so a resumed run can be extended; the
    learning rates and momenta in force are the checkpoint's, the next step follows the schedule."""
    opt.load_state_dict(opt_state)  # a scheduler built at a step takes the base lr and momenta from the param groups
    # Building a torch scheduler takes one step, hence the step before the recorded one.
    sched = build_scheduler(cfg, opt, steps_per_epoch, last_epoch=int(state["last_epoch"]) - 1)
    opt.load_state_dict(opt_state)  # that step set the lr of the (new) horizon: the checkpoint's is the one in force
    return sched


def optimizer_step(
    loss: torch.Tensor,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    grad_clip: float,
) -> None:
    """Backward, clip the gradient norm at ``grad_clip`` (0: no clipping), step the optimiser and the schedule; with a
    gradient scaler (fp16), scaled and unscaled around the clip. No host sync."""
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    else:
        loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    sched.step()
