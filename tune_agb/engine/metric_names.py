"""The names of the figures training reports, without the code that computes them (no torch), so that a search
space can be validated and a results table read without importing the training loop.

Per split (prefixed, e.g. ``val_rmse``): :data:`METRIC_NAMES`, computed by :mod:`tune_agb.engine.metrics`. Per epoch,
the loop reports :data:`EPOCH_METRICS`; a k-fold cross-validation adds :func:`fold_metric_names`.
"""

from __future__ import annotations

METRIC_NAMES: tuple[str, ...] = ("rmse", "mae", "me", "r2", "nll", "rmv", "within_1sigma", "within_2sigma", "uce", "n")
# What every epoch reports and a search may optimise: the validation metrics (but the pixel count) and the train loss.
EPOCH_METRICS: tuple[str, ...] = (*(f"val_{m}" for m in METRIC_NAMES if m != "n"), "train_loss", "train_rmse")
# Metrics whose spread over the folds of a cross-validation is reported (``val_rmse_sd``, ``val_r2_sd``), with the value
# of every fold (``val_rmse_fold0`` ...).
FOLD_SPREAD = ("val_rmse", "val_r2")


def fold_metric_names(k: int) -> tuple[str, ...]:
    """The figures a k-fold cross-validation reports besides the engine's: ``val_rmse_sd``, ``val_r2_sd`` (sample
    standard deviation over folds), then ``val_rmse_fold0`` ... ``val_r2_fold{k-1}`` (each fold's value)."""
    return (*(f"{m}_sd" for m in FOLD_SPREAD), *(f"{m}_fold{j}" for m in FOLD_SPREAD for j in range(k)))
