"""Losses on labelled pixels only, with static shapes and no host sync.

Every loss takes mean (B, H, W), log-variance (B, H, W) and target (B, H, W) with NaN where unlabelled, and returns
the mean over labelled pixels (0 when there is none). Constants (0.5 log 2 pi, log 2) are left out.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def _masked_mean(per_pixel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, per_pixel, 0.0).sum() / mask.sum().clamp_min(1)


def _prepare(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.isfinite(target)
    # NaN * 0 is NaN: replace NaN labels before any arithmetic, not after.
    return torch.where(mask, target, 0.0), mask


def _beta_weight(log_param: torch.Tensor, beta: float) -> torch.Tensor | float:
    """The beta-NLL weight (Seitzer et al. 2022, ICLR): the per-pixel NLL times param^beta, held constant in the
    backward pass. param is the distribution's own spread parameter (Gaussian variance, Laplace scale b), so at
    beta = 1 the mean's gradient is that of the plain regression loss (mse, mae) and at beta = 0 it is the NLL's,
    which lets pixels the model calls uncertain fade out of the fit of the mean."""
    return torch.exp(beta * log_param).detach() if beta else 1.0


def gaussian_nll(mean: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor, beta: float = 0.0) -> torch.Tensor:
    """0.5 * (s + (y - mu)^2 exp(-s)), s = log variance; times var^beta (no gradient) for beta-NLL."""
    y, mask = _prepare(target)
    nll = 0.5 * (logvar + (y - mean) ** 2 * torch.exp(-logvar))
    return _masked_mean(nll * _beta_weight(logvar, beta), mask)


def laplacian_nll(mean: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor, beta: float = 0.0) -> torch.Tensor:
    """Laplace NLL with scale b = exp(s/2) (so the variance head means the same in every loss):
    log b + |y - mu| / b, i.e. s/2 + |y - mu| exp(-s/2). The variance of Laplace(mu, b) is 2 b^2.
    Times b^beta (no gradient) for beta-NLL."""
    y, mask = _prepare(target)
    nll = 0.5 * logvar + (y - mean).abs() * torch.exp(-0.5 * logvar)
    return _masked_mean(nll * _beta_weight(0.5 * logvar, beta), mask)


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


def make_loss(name: str, nll_beta: float = 0.0) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss of a config: ``LOSSES[name]``, with the beta-NLL weight for the two NLLs when
    ``nll_beta`` > 0 (mse and mae have no spread to weight by and ignore it)."""
    fn = LOSSES[name]
    if nll_beta and name in ("gaussian_nll", "laplacian_nll"):
        return functools.partial(fn, beta=nll_beta)
    return fn


def predicted_variance(logvar: torch.Tensor, loss: str) -> torch.Tensor:
    """Variance of the predictive distribution implied by the log-variance head under ``loss``.

    Gaussian: exp(s). Laplace with b = exp(s/2): 2 b^2 = 2 exp(s). mse/mae do not train the head; their
    variance is reported as exp(s) of the untrained head and should not be read as uncertainty.
    """
    var = torch.exp(logvar)
    return 2.0 * var if loss == "laplacian_nll" else var
