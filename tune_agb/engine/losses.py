"""Losses on labelled pixels only, with static shapes and no host sync.

Every loss takes mean (B, H, W), log-variance (B, H, W) and target (B, H, W) with NaN where unlabelled, and returns
the mean over labelled pixels (0 when there is none). Constants (0.5 log 2 pi, log 2) are left out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _masked_mean(per_pixel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, per_pixel, 0.0).sum() / mask.sum().clamp_min(1)


def _prepare(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.isfinite(target)
    # NaN * 0 is NaN: replace NaN labels before any arithmetic, not after.
    return torch.where(mask, target, 0.0), mask


def gaussian_nll(mean: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0.5 * (s + (y - mu)^2 exp(-s)), s = log variance."""
    y, mask = _prepare(target)
    return _masked_mean(0.5 * (logvar + (y - mean) ** 2 * torch.exp(-logvar)), mask)


def laplacian_nll(mean: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Laplace NLL with scale b = exp(s/2) (so the variance head means the same in every loss):
    log b + |y - mu| / b, i.e. s/2 + |y - mu| exp(-s/2). The variance of Laplace(mu, b) is 2 b^2."""
    y, mask = _prepare(target)
    return _masked_mean(0.5 * logvar + (y - mean).abs() * torch.exp(-0.5 * logvar), mask)


def mse(mean: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    y, mask = _prepare(target)
    return _masked_mean((y - mean) ** 2, mask)


def mae(mean: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    y, mask = _prepare(target)
    return _masked_mean((y - mean).abs(), mask)


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "gaussian_nll": gaussian_nll,
    "laplacian_nll": laplacian_nll,
    "mse": mse,
    "mae": mae,
}


def predicted_variance(logvar: torch.Tensor, loss: str) -> torch.Tensor:
    """Variance of the predictive distribution implied by the log-variance head under ``loss``.

    Gaussian: exp(s). Laplace with b = exp(s/2): 2 b^2 = 2 exp(s). mse/mae do not train the head; their
    variance is reported as exp(s) of the untrained head and should not be read as uncertainty.
    """
    var = torch.exp(logvar)
    return 2.0 * var if loss == "laplacian_nll" else var
