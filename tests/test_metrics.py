"""Epoch-level metrics agree with numpy on the pooled labelled pixels (issue 2, point 6)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tune_agb.engine.calibration import RELIABILITY_LEVELS, coverage
from tune_agb.engine.config import TrainConfig
from tune_agb.engine.data import SplitFeed, compute_norm_stats, load_dataset
from tune_agb.engine.metric_names import METRIC_NAMES
from tune_agb.engine.metrics import UCE_BINS, regression_metrics
from tune_agb.engine.model import UNet
from tune_agb.engine.train import evaluate_split


def numpy_metrics(y: np.ndarray, mean: np.ndarray, var: np.ndarray, loss: str = "gaussian_nll") -> dict[str, float]:
    """Reference implementation on flat float64 arrays of the labelled pixels, written from the definitions."""
    y, mean, var = (np.asarray(a, dtype=np.float64) for a in (y, mean, var))
    err = mean - y
    sigma = np.sqrt(var)
    b = np.sqrt(var / 2)
    lap = loss == "laplacian_nll"
    gauss_nll = 0.5 * (np.log(2 * np.pi * var) + err**2 / var)
    nll = np.mean(np.log(2 * b) + np.abs(err) / b) if lap else np.mean(gauss_nll)
    order = np.argsort(var, kind="stable")
    uce = sum(
        len(e) / len(y) * abs(np.mean(e) - np.mean(v))
        for e, v in zip(np.array_split((err**2)[order], UCE_BINS), np.array_split(var[order], UCE_BINS), strict=True)
        if len(e)
    )
    return {
        "rmse": float(np.sqrt(np.mean(err**2))),
        "mae": float(np.mean(np.abs(err))),
        "me": float(np.mean(err)),
        "r2": float(1 - np.sum(err**2) / np.sum((y - y.mean()) ** 2)),
        "nll": float(nll),
        "rmv": float(np.sqrt(np.mean(var))),
        # the central intervals holding 68.27 % / 95.45 %: +-1 / 2 sigma (Gaussian), +-b ln(1 / 0.3173) and
        # +-b ln(1 / 0.0455) with b = sigma / sqrt(2) (Laplacian)
        "within_1sigma": float(np.mean(np.abs(err) <= (b * np.log(1 / (1 - 0.682689)) if lap else sigma))),
        "within_2sigma": float(np.mean(np.abs(err) <= (b * np.log(1 / (1 - 0.954500)) if lap else 2 * sigma))),
        "uce": float(uce),
        "n": len(y),
    }


def _assert_metrics_close(got: dict[str, float], want: dict[str, float], rtol: float = 1e-9) -> None:
    assert set(got) == set(METRIC_NAMES)
    for k in METRIC_NAMES:
        assert got[k] == pytest.approx(want[k], rel=rtol, abs=1e-9), k


@pytest.mark.parametrize("loss", ["gaussian_nll", "laplacian_nll"])
def test_regression_metrics_match_numpy(loss: str) -> None:
    rng = np.random.default_rng(0)
    n = 1003  # not a multiple of the bin count: uneven bins
    y = rng.gamma(2.0, 60.0, n)
    mean = y + rng.normal(5.0, 30.0, n)
    var = rng.uniform(100.0, 2500.0, n)
    got = regression_metrics(torch.from_numpy(y), torch.from_numpy(mean), torch.from_numpy(var), loss)
    want = numpy_metrics(y, mean, var, loss)
    _assert_metrics_close(got, want)
    # Sanity of the reference itself on these numbers: a biased, noisy prediction.
    assert want["me"] == pytest.approx(5.0, abs=3.0) and 0 < want["within_1sigma"] < want["within_2sigma"] < 1


def test_calibrated_gaussian_gives_textbook_coverage() -> None:
    """Residuals drawn from the predicted Gaussian: ~68.3 % within 1 sigma, ~95.4 % within 2, small UCE."""
    g = torch.Generator().manual_seed(1)
    n = 200_000
    var = torch.rand(n, generator=g, dtype=torch.float64) * 9 + 1
    mean = torch.randn(n, generator=g, dtype=torch.float64) * 50
    y = mean + torch.randn(n, generator=g, dtype=torch.float64) * var.sqrt()
    m = regression_metrics(y, mean, var)
    assert m["within_1sigma"] == pytest.approx(0.6827, abs=0.005)
    assert m["within_2sigma"] == pytest.approx(0.9545, abs=0.003)
    assert m["uce"] < 0.1
    assert m["rmv"] == pytest.approx(math.sqrt(5.5), rel=0.01)


def test_calibrated_laplacian_gives_the_same_coverage() -> None:
    """Residuals drawn from the predicted Laplacian (sigma = sqrt(2) b): its 68.27 % and 95.45 % central intervals
    hold that share; counting |r| <= sigma would give 75.7 % and 94.1 % for a calibrated model."""
    g = np.random.default_rng(2)
    n = 200_000
    var = g.uniform(1, 10, n)
    mean = g.normal(0, 50, n)
    y = mean + g.laplace(0, np.sqrt(var / 2))
    m = regression_metrics(*(torch.from_numpy(a) for a in (y, mean, var)), "laplacian_nll")
    assert m["within_1sigma"] == pytest.approx(0.6827, abs=0.005)
    assert m["within_2sigma"] == pytest.approx(0.9545, abs=0.003)
    assert float(np.mean(np.abs(y - mean) <= np.sqrt(var))) == pytest.approx(0.757, abs=0.005)
    lv = coverage(y, mean, np.sqrt(var), RELIABILITY_LEVELS, "laplacian_nll")
    assert np.allclose(lv, RELIABILITY_LEVELS, atol=0.006)  # the reliability diagram's diagonal
    assert not np.allclose(coverage(y, mean, np.sqrt(var), RELIABILITY_LEVELS), RELIABILITY_LEVELS, atol=0.02)


def test_empty_and_single_pixel() -> None:
    empty = regression_metrics(torch.zeros(0), torch.zeros(0), torch.ones(0))
    assert empty["n"] == 0 and all(math.isnan(empty[k]) for k in METRIC_NAMES if k != "n")
    one = regression_metrics(torch.tensor([3.0]), torch.tensor([5.0]), torch.tensor([4.0]))
    assert one["n"] == 1 and one["rmse"] == pytest.approx(2.0) and one["me"] == pytest.approx(2.0)
    assert math.isnan(one["r2"]) and one["within_1sigma"] == 1.0


@pytest.mark.parametrize("loss", ["gaussian_nll", "laplacian_nll"])
def test_evaluate_split_in_batches_matches_numpy_on_pooled_pixels(tiny_data: Path, loss: str) -> None:
    tiles = load_dataset(tiny_data / "inputs", tiny_data / "labels", splits=("train", "val"))
    norm = compute_norm_stats(tiles["train"], standardize_target=True)
    cfg = TrainConfig(base_channels=4, depth=2, loss=loss, channels_last=False)
    torch.manual_seed(0)
    model = UNet.from_config(cfg).eval()
    with torch.no_grad():  # spread the predicted variances so that the UCE bins are not all alike
        model.head.weight.mul_(20.0)
    val = SplitFeed(tiles["val"], norm, torch.device("cpu"))
    assert len(val) >= 3
    ev = evaluate_split(model, val, cfg, norm, batch_size=1, amp=None, keep=(2, 0))  # one tile per batch

    # Reference: one forward pass over the whole split, scaled to label units by hand, labels straight from disk.
    x = torch.from_numpy(tiles["val"].inputs)
    with torch.no_grad():
        mu, logvar = model(norm.normalize(x))
    mean = mu.double().numpy() * norm.target_std + norm.target_mean
    var = np.exp(logvar.double().numpy()) * norm.target_std**2 * (2.0 if loss == "laplacian_nll" else 1.0)
    labels = tiles["val"].labels
    mask = np.isfinite(labels)
    # The labelled pixels, in (tile, row-major pixel) order, and the whole maps of the tiles kept.
    t, r, c = np.nonzero(mask)
    np.testing.assert_array_equal(ev.tile, t)
    np.testing.assert_array_equal(ev.flat, r * labels.shape[2] + c)
    np.testing.assert_array_equal(ev.y.numpy(), labels[mask])
    np.testing.assert_allclose(ev.mean.numpy(), mean[mask], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(ev.var.numpy(), var[mask], rtol=1e-4)
    assert list(ev.maps) == [2, 0]
    for k, (m, v) in ev.maps.items():
        np.testing.assert_allclose(m.numpy(), mean[k], rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(v.numpy(), var[k], rtol=1e-4)
    assert np.unique(var[mask]).size == mask.sum()  # no ties: the UCE bins are the same in torch and numpy
    want = numpy_metrics(labels[mask], mean[mask], var[mask], loss)
    assert ev.metrics["n"] == int(mask.sum()) == tiles["val"].num_labelled
    _assert_metrics_close(ev.metrics, want, rtol=1e-4)

    # The pooled RMSE is not the mean of per-batch (per-tile) RMSEs: labelled-pixel counts differ between tiles.
    per_tile = [
        np.sqrt(np.mean((mean[i][mask[i]] - labels[i][mask[i]]) ** 2)) for i in range(len(labels)) if mask[i].any()
    ]
    assert len({int(mask[i].sum()) for i in range(len(labels))}) > 1
    assert abs(np.mean(per_tile) - ev.metrics["rmse"]) > 1e-3 * ev.metrics["rmse"]
    assert ev.metrics["rmse"] == pytest.approx(want["rmse"], rel=1e-5)


def test_evaluate_split_does_not_depend_on_batch_size(tiny_data: Path) -> None:
    """Never drop_last: every tile is predicted whatever the batch size (4 val tiles, batch 3 -> 3 + 1)."""
    tiles = load_dataset(tiny_data / "inputs", tiny_data / "labels", splits=("train", "val"))
    norm = compute_norm_stats(tiles["train"], standardize_target=False)
    cfg = TrainConfig(base_channels=4, depth=2, norm="group", channels_last=True)
    torch.manual_seed(1)
    model = UNet.from_config(cfg).to(memory_format=torch.channels_last)
    val = SplitFeed(tiles["val"], norm, torch.device("cpu"))
    a = evaluate_split(model, val, cfg, norm, batch_size=3, amp=None, keep=(3,))
    b = evaluate_split(model, val, cfg, norm, batch_size=len(val), amp=None, keep=(3,))
    assert len(val) == 4 and a.mean.shape[0] == tiles["val"].num_labelled and 3 in a.maps
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.maps[3][0], b.maps[3][0], rtol=1e-4, atol=1e-4)
    for k in METRIC_NAMES:
        assert a.metrics[k] == pytest.approx(b.metrics[k], rel=1e-4, abs=1e-6), k
