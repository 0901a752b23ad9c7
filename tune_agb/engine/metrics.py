"""Epoch-level metrics over all labelled pixels of a split (pooled, never a mean of per-batch values).

Names (prefixed by the split, e.g. ``val_rmse``): rmse, mae, me (mean of prediction - label), r2, nll (mean
negative log-likelihood of the labels under the predicted distribution, constants included), rmv (sqrt of the mean
predicted variance), within_1sigma / within_2sigma (share of labels inside the central interval of the predicted
distribution that holds 68.27 % / 95.45 % of it: mean +- 1 / 2 sigma for a Gaussian, mean +- 0.81 / 2.18 sigma for a
Laplacian, see :func:`tune_agb.engine.calibration.sigma_halfwidth`), uce (sum over variance bins
of N_b/N |MSE_b - MV_b|), n (labelled pixels).
"""

from __future__ import annotations

import math

import torch
from torchmetrics.functional import mean_absolute_error, mean_squared_error, r2_score

from tune_agb.engine.calibration import sigma_halfwidth
from tune_agb.engine.metric_names import METRIC_NAMES

UCE_BINS = 10


def regression_metrics(
    y: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    loss: str = "gaussian_nll",
) -> dict[str, float]:
    """Metrics of flat tensors (labels, predicted means, predicted variances), all in target units.

    Computed on the tensors' device in float64; one host transfer at the end.
    """
    y, mean, var = y.double(), mean.double(), var.double()
    n = y.numel()
    if n == 0:
        return {k: float("nan") for k in METRIC_NAMES} | {"n": 0}
    err = mean - y
    sigma = var.sqrt()
    if loss == "laplacian_nll":
        b = (var / 2).sqrt()
        nll = (torch.log(2 * b) + err.abs() / b).mean()
    else:
        nll = 0.5 * (torch.log(2 * math.pi * var) + err**2 / var).mean()
    out = {
        "rmse": mean_squared_error(mean, y, squared=False),
        "mae": mean_absolute_error(mean, y),
        "me": err.mean(),
        "r2": r2_score(mean, y) if n > 1 else torch.tensor(float("nan")),
        "nll": nll,
        "rmv": var.mean().sqrt(),
        "within_1sigma": (err.abs() <= sigma_halfwidth(1, loss) * sigma).double().mean(),
        "within_2sigma": (err.abs() <= sigma_halfwidth(2, loss) * sigma).double().mean(),
        "uce": uncertainty_calibration_error(err, var),
    }
    values = torch.stack([v.to(y.device, torch.float64) for v in out.values()]).cpu().tolist()
    return dict(zip(out.keys(), values, strict=True)) | {"n": n}


def equal_count_bins(values: torch.Tensor, bins: int) -> tuple[torch.Tensor, ...]:
    """Indices of ``values`` (flat) sorted ascending and split into ``bins`` bins of equal count (the first
    ``len % bins`` bins one longer; bins are empty when there are fewer values than bins)."""
    return torch.tensor_split(torch.argsort(values), bins)


def uncertainty_calibration_error(err: torch.Tensor, var: torch.Tensor, bins: int = UCE_BINS) -> torch.Tensor:
    """UCE over ``bins`` equal-count bins of predicted variance: sum_b N_b/N |mean(err^2)_b - mean(var)_b|."""
    sq = err**2
    n = err.numel()
    total = torch.zeros((), dtype=torch.float64, device=err.device)
    for idx in equal_count_bins(var, bins):
        if idx.numel():
            total = total + idx.numel() / n * (sq[idx].mean() - var[idx].mean()).abs()
    return total


def labelled_metrics(y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, loss: str) -> dict[str, float]:
    """:func:`regression_metrics` over the labelled (finite) pixels of maps of any shape, all in target units.

    One data-dependent gather per call (once per evaluation, never per batch)."""
    y = y.to(mean.device)
    mask = torch.isfinite(y)
    return regression_metrics(y[mask], mean[mask], var[mask], loss)
