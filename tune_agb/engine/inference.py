"""Running a model to target units, and loading a trained model (or an ensemble of them) for prediction on raw,
un-normalised input stacks.

:func:`predict_target_units` is the one place where the model runs for prediction and its outputs are scaled back to
target units: validation during training, final evaluation and wall-to-wall prediction all go through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tune_agb.engine.checkpoint import load_checkpoint
from tune_agb.engine.config import TrainConfig, config_from_dict
from tune_agb.engine.data import NormStats
from tune_agb.engine.device import autocast, memory_format, resolve_amp, resolve_device
from tune_agb.engine.losses import predicted_variance
from tune_agb.engine.model import UNet
from tune_agb.engine.seams import grid_step, measure_margin
from tune_agb.errors import TuneAgbError


@torch.no_grad()
def predict_target_units(
    model: UNet, x: torch.Tensor, cfg: TrainConfig, norm: NormStats, amp: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance maps (B, H, W) in target units (float32) for normalised inputs ``x`` (B, C, H, W).

    ``x`` is on the model's device; ``cfg`` gives the memory layout and the loss (the variance its head implies),
    ``norm`` the target mean and std, ``amp`` the autocast dtype (None: full precision). The model's mode (eval) is
    the caller's to set."""
    x = x.contiguous(memory_format=memory_format(cfg, x.device))
    with autocast(x.device, amp):
        mu, logvar = model(x)
    mean = mu.float() * norm.target_std + norm.target_mean
    var = predicted_variance(logvar.float(), cfg.loss) * norm.target_std**2
    return mean, var


@dataclass
class Member:
    model: UNet
    config: TrainConfig
    norm: NormStats
    margin: int | None = None  # px a window must discard at its edges (None: the output depends on the window)


class Predictor:
    """Mean and standard deviation (label units) for raw (B, C, H, W) inputs; NaN inputs are handled.

    With several members: their mixture, weighted by each member's bounded precision (:func:`combine_members`).
    """

    def __init__(self, members: list[Member], device: torch.device):
        self.members = members
        self.device = device
        self.in_channels = members[0].config.in_channels
        self.amp = resolve_amp(members[0].config, device)
        # Tiled prediction: windows start on multiples of ``step`` px and discard ``margin`` px at their edges.
        self.step = max(grid_step(m.model) for m in members)
        margins = [m.margin for m in members]
        self.margin = None if None in margins else max(m for m in margins if m is not None)

    @torch.no_grad()
    def predict(self, x: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(x, dtype=torch.float32)
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise TuneAgbError(f"input has shape {tuple(x.shape)}; the model expects (B, {self.in_channels}, H, W)")
        x = x.to(self.device, non_blocking=True)
        means, varis = [], []
        for m in self.members:
            mean, var = predict_target_units(m.model, m.norm.normalize(x), m.config, m.norm, self.amp)
            means.append(mean)
            varis.append(var)
        mean, var = combine_members(torch.stack(means), torch.stack(varis))
        return mean, var.sqrt()


# No member weighs more at a pixel than this many times a member with the median variance there.
MAX_WEIGHT_RATIO = 4.0


def combine_members(means: torch.Tensor, varis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(members, ...) means and variances -> ensemble mean and total variance, each member weighted at each pixel by
    its own precision, bounded: ``w = 1 / max(v, median(v) / 4)``, normalised to sum to 1; mean ``sum(w m)``,
    variance ``sum(w (v + (m - mean)^2))`` (the mixture's: the members' variances plus their spread).

    A member that says it does not know a pixel (a runaway under input shift comes with a large variance) counts
    less there. A member that claims a far smaller variance than the others counts at most 4 times a member with
    the median variance (:data:`MAX_WEIGHT_RATIO`): one overconfident member (a wrong mean with sigma 0.1 m) must
    not take a pixel over, and the others' spread stays in its variance. With equal variances this is the plain
    mean and mean variance + variance of the means. A single member is returned as it is. Measured in
    ``bench/RESULTS.md`` (issue 31)."""
    k = means.shape[0]
    if k == 1:
        return means[0], varis[0]
    ordered = varis.sort(0).values
    median = 0.5 * (ordered[(k - 1) // 2] + ordered[k // 2])
    w = torch.maximum(varis, median / MAX_WEIGHT_RATIO).clamp_min(torch.finfo(varis.dtype).tiny).reciprocal()
    w = w / w.sum(0)
    mean = (w * means).sum(0)
    return mean, (w * (varis + (means - mean) ** 2)).sum(0)


def load_member(path: Path, device: torch.device) -> Member:
    """The model of checkpoint ``path`` on ``device``, in eval mode, with its config and normalisation stats."""
    return member_from_state(load_checkpoint(path, map_location=device), device, source=str(path))


def model_from_state(
    state: dict[str, Any], device: torch.device, source: str = "checkpoint"
) -> tuple[UNet, TrainConfig, NormStats]:
    """The model of an engine checkpoint dict, ready to predict: the one place a checkpoint becomes a model.

    Args:
        state: an engine checkpoint (``model`` weights, ``config``, ``norm``), as
            :func:`~tune_agb.engine.checkpoint.load_checkpoint` returns it or one fold of a k-fold checkpoint.
        device: where the model's weights go (in the config's memory format for that device).
        source: names the checkpoint in error messages.

    Returns:
        The U-Net in eval mode on ``device``, its training config and the normalisation stats of its inputs and
        target.

    Raises:
        TuneAgbError: one line naming ``source`` when the config is not valid.
    """
    cfg = config_from_dict(state["config"], source=f"{source} config")
    model = UNet.from_config(cfg)
    model.load_state_dict(state["model"])
    model.to(device, memory_format=memory_format(cfg, device)).eval()
    return model, cfg, NormStats.from_dict(state["norm"])


def member_from_state(state: dict[str, Any], device: torch.device, source: str = "checkpoint") -> Member:
    """:func:`load_member` for a checkpoint dict already loaded (the model from :func:`model_from_state`).

    The seam margin is the checkpoint's ``seam_margin`` (final_train stores it); a checkpoint without one has it
    measured here (a few seconds on a CPU).

    Args:
        state: an engine checkpoint dict (``model``, ``config``, ``norm``, optionally ``seam_margin``).
        device: where the model goes.
        source: names the checkpoint in error messages.
    """
    model, cfg, norm = model_from_state(state, device, source)
    margin = state["seam_margin"] if "seam_margin" in state else measure_margin(model, cfg.in_channels, device)
    return Member(model, cfg, norm, margin)


def member_checkpoints(path: str | Path) -> list[Path]:
    """Checkpoints behind ``path``: a ``.pt`` file, a final-train out dir (``best.pt``) or an ensemble out dir
    (``members/member_*/best.pt``)."""
    path = Path(path)
    if path.is_file():
        return [path]
    members = sorted((path / "members").glob("member_*/best.pt"))
    if members:
        return members
    if (path / "best.pt").is_file():
        return [path / "best.pt"]
    raise TuneAgbError(
        f"{path}: no model found (expected a .pt checkpoint, OUT_DIR/best.pt or OUT_DIR/members/member_*/best.pt)"
    )


def load_predictor(path: str | Path, device: str = "auto") -> Predictor:
    dev = resolve_device(device)
    members = [load_member(p, dev) for p in member_checkpoints(path)]
    chans = {m.config.in_channels for m in members}
    if len(chans) > 1:
        raise TuneAgbError(f"{path}: ensemble members disagree on in_channels ({sorted(chans)})")
    return Predictor(members, dev)
