"""Variance recalibration (tune_agb.engine.calibration): fits on synthetic residuals with a known miscalibration
recover it, the file round-trips and its bad values fail with one line naming the file and the field."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tune_agb.engine.calibration import (
    IDENTITY,
    ISOTONIC_MIN_BIN,
    Calibration,
    coverage,
    fit_calibration,
    fit_isotonic,
    fit_scale,
    pava,
)
from tune_agb.engine.metrics import regression_metrics
from tune_agb.engine.plots import reliability_plot
from tune_agb.errors import TuneAgbError
from tune_agb.runs import CALIBRATION_FILE, load_calibration, model_calibration, save_calibration

ONE_SIGMA, TWO_SIGMA = 0.6827, 0.9545


def miscalibrated(n: int, factor: float | np.ndarray, seed: int = 0, laplace: bool = False) -> tuple[np.ndarray, ...]:
    """Labels, means and predicted variances (AGB-like units) whose true sigma is ``factor`` x the predicted one
    (``factor``: a number, or a function of the predicted sigma)."""
    rng = np.random.default_rng(seed)
    mean = rng.gamma(2.0, 60.0, n)
    sigma = np.exp(rng.uniform(np.log(5.0), np.log(80.0), n))
    true_sigma = sigma * (factor(sigma) if callable(factor) else factor)
    noise = rng.laplace(0, 1 / math.sqrt(2), n) if laplace else rng.normal(0, 1, n)  # both of unit variance
    return mean + true_sigma * noise, mean, sigma**2


def nll(y: np.ndarray, mean: np.ndarray, var: np.ndarray, loss: str = "gaussian_nll") -> float:
    return regression_metrics(*(torch.from_numpy(np.asarray(a, float)) for a in (y, mean, var)), loss)["nll"]


@pytest.mark.parametrize("factor", [0.4, 1.0, 2.5])
def test_scale_recovers_a_known_miscalibration(factor: float) -> None:
    y, mean, var = miscalibrated(40_000, factor)
    cal = fit_calibration("scale", y, mean, var)
    assert cal.method == "scale" and cal.scale == pytest.approx(factor, rel=0.02) and cal.n == y.size
    after = np.sqrt(cal.variance(var))
    np.testing.assert_allclose(after, cal.std(np.sqrt(var)), rtol=1e-12)
    np.testing.assert_allclose(coverage(y, mean, after, (ONE_SIGMA, TWO_SIGMA)), (ONE_SIGMA, TWO_SIGMA), atol=0.01)
    if factor != 1.0:  # before: far off
        before = coverage(y, mean, np.sqrt(var), (ONE_SIGMA,))[0]
        assert abs(before - ONE_SIGMA) > 0.2
    # on Gaussian residuals the coverage factor is the NLL's minimum too: a factor 5 % either side does worse
    best = nll(y, mean, cal.variance(var))
    for f in (0.95, 1.05):
        assert nll(y, mean, var * (f * cal.scale) ** 2) > best


def test_laplacian_scale_covers_under_the_laplacian_and_minimises_its_nll() -> None:
    y, mean, var = miscalibrated(40_000, 1.8, laplace=True)
    s = fit_scale(y, mean, var, "laplacian_nll")
    assert s == pytest.approx(1.8, rel=0.02)
    sd = np.sqrt(var) * s
    assert coverage(y, mean, sd, (ONE_SIGMA,), "laplacian_nll")[0] == pytest.approx(ONE_SIGMA, abs=0.01)
    # the Gaussian fit differs on Laplacian residuals (the Laplacian's 68.27 % interval is +-0.81 sigma)
    assert fit_scale(y, mean, var, "gaussian_nll") != pytest.approx(s, rel=1e-2)
    best = nll(y, mean, var * s**2, "laplacian_nll")
    for f in (0.97, 1.03):
        assert nll(y, mean, var * (f * s) ** 2, "laplacian_nll") > best


@pytest.mark.parametrize("method", ["scale", "distance"])
def test_one_pixel_predicted_with_a_tiny_sigma_does_not_set_the_factor(method: str) -> None:
    # 1,237 labels like an out-of-fold sample on the real tiles, one of them predicted 36 m off with sigma 0.09 m
    y, mean, var = miscalibrated(1_237, 1.3, seed=4)
    y[0], mean[0], var[0] = 34.9, -1.3, 0.09**2
    shift = {}
    if method == "distance":
        rng = np.random.default_rng(5)
        shift = {"bands": rng.normal(size=(3, y.size)), "reference": rng.normal(size=(500, 3))}
    cal = fit_calibration(method, y, mean, var, **shift)
    clean = fit_calibration(
        method, y[1:], mean[1:], var[1:], **{k: v[:, 1:] if k == "bands" else v for k, v in shift.items()}
    )
    assert cal.scale == pytest.approx(clean.scale, rel=0.01)
    if method == "scale":
        assert cal.scale == pytest.approx(1.3, rel=0.1)
    # the NLL's closed form, sqrt(mean(r^2 / var)), would have been set by that one pixel (1.3 without it)
    assert math.sqrt(np.mean((y - mean) ** 2 / var)) > 8 * clean.scale


def overconfident_when_sure(sigma: np.ndarray) -> np.ndarray:
    """True/predicted sigma falls from 2.5 (small predicted sigma) to 0.8 (large): one factor cannot fix it."""
    t = (np.log(sigma) - np.log(5.0)) / (np.log(80.0) - np.log(5.0))
    return 2.5 - 1.7 * t


def test_isotonic_fixes_a_variance_dependent_miscalibration_that_scale_cannot() -> None:
    fit = miscalibrated(20_000, overconfident_when_sure, seed=1)
    held_out = miscalibrated(20_000, overconfident_when_sure, seed=2)
    iso = fit_calibration("isotonic", *fit)
    scale = fit_calibration("scale", *fit)
    assert iso.method == "isotonic" and len(iso.log_var) >= 10
    y, mean, var = held_out
    thirds = np.array_split(np.argsort(var), 3)  # small, medium, large predicted variance
    for cal, ok in ((iso, True), (scale, False)):
        std = np.sqrt(cal.variance(var))
        cov = [coverage(y[i], mean[i], std[i], (ONE_SIGMA, TWO_SIGMA)) for i in thirds]
        within = all(abs(c[0] - ONE_SIGMA) < 0.03 and abs(c[1] - TWO_SIGMA) < 0.02 for c in cov)
        assert within == ok, (cal.method, cov)
    assert nll(y, mean, iso.variance(var)) < nll(y, mean, scale.variance(var)) - 0.02


def test_isotonic_map_is_nondecreasing_continuous_and_keeps_the_ratio_beyond_its_knots() -> None:
    iso = fit_calibration("isotonic", *miscalibrated(5_000, overconfident_when_sure, seed=3))
    grid = np.exp(np.linspace(iso.log_var[0] - 3, iso.log_var[-1] + 3, 2001))
    out = iso.variance(grid)
    assert np.all(np.diff(out) >= 0) and np.all(out > 0)
    # linear in log variance between knots: no jumps (steps of the grid stay small)
    assert np.max(np.abs(np.diff(np.log(out)))) < 0.05
    lo, hi = np.exp(iso.log_var[0]), np.exp(iso.log_var[-1])
    ratio_lo, ratio_hi = (math.exp(iso.log_var_calibrated[i] - iso.log_var[i]) for i in (0, -1))
    assert iso.variance(np.array([lo / 10]))[0] == pytest.approx(lo / 10 * ratio_lo, rel=1e-9)
    assert iso.variance(np.array([hi * 10]))[0] == pytest.approx(hi * 10 * ratio_hi, rel=1e-9)


def test_isotonic_on_too_few_pixels_falls_back_to_scale() -> None:
    y, mean, var = miscalibrated(2 * ISOTONIC_MIN_BIN - 1, 2.0)
    cal = fit_calibration("isotonic", y, mean, var)
    assert cal.method == "scale" and cal.scale == pytest.approx(fit_scale(y, mean, var))
    with pytest.raises(ValueError, match="isotonic calibration needs"):
        fit_isotonic(y, mean, var)


def test_pava_pools_violators_and_keeps_the_weighted_mean() -> None:
    np.testing.assert_allclose(pava(np.array([1.0, 3.0, 2.0, 4.0]), np.ones(4)), [1, 2.5, 2.5, 4])
    np.testing.assert_allclose(pava(np.array([3.0, 1.0]), np.array([1.0, 3.0])), [1.5, 1.5])
    np.testing.assert_allclose(pava(np.array([5.0, 4.0, 3.0]), np.ones(3)), [4, 4, 4])
    np.testing.assert_allclose(pava(np.array([1.0, 2.0, 3.0]), np.ones(3)), [1, 2, 3])
    rng = np.random.default_rng(0)
    for _ in range(20):
        v, w = rng.normal(size=30), rng.uniform(0.5, 2, 30)
        fit = pava(v, w)
        assert np.all(np.diff(fit) >= -1e-12)
        assert np.sum(w * fit) == pytest.approx(np.sum(w * v))
        # optimal: no nondecreasing neighbour does better (pooling any block differently raises the loss)
        loss = np.sum(w * (fit - v) ** 2)
        for _ in range(20):
            other = np.maximum.accumulate(fit + rng.normal(0, 0.05, 30))
            assert np.sum(w * (other - v) ** 2) >= loss - 1e-12


def test_none_is_the_identity_and_nan_stays_nan() -> None:
    var = np.array([1.0, np.nan, 4.0], dtype=np.float32)
    assert fit_calibration("none", np.ones(3), np.zeros(3), var).method == "none"
    for cal in (IDENTITY, Calibration("scale", 2.0), Calibration("isotonic", 1.0, (0.0, 1.0), (0.5, 1.0))):
        out = cal.variance(var)
        assert out.dtype == np.float32 and np.isnan(out[1]) and np.all(np.isfinite(out[[0, 2]]))
        assert np.isnan(cal.std(np.sqrt(var))[1])
    np.testing.assert_array_equal(IDENTITY.variance(var), var)
    np.testing.assert_array_equal(Calibration("scale", 2.0).std(np.float32([1.5])), np.float32([3.0]))
    with pytest.raises(TuneAgbError, match="calibration method 'platt': allowed: none, scale, isotonic, distance"):
        fit_calibration("platt", np.ones(3), np.zeros(3), var)


@pytest.mark.parametrize("method", ["none", "scale", "isotonic"])
def test_file_round_trip(tmp_path: Path, method: str) -> None:
    y, mean, var = miscalibrated(3_000, overconfident_when_sure, seed=4)
    cal = fit_calibration(method, y, mean, var, split="val")
    save_calibration(cal, tmp_path / CALIBRATION_FILE)
    back = load_calibration(tmp_path / CALIBRATION_FILE)
    assert back == cal
    np.testing.assert_array_equal(back.variance(var), cal.variance(var))
    assert json.loads((tmp_path / CALIBRATION_FILE).read_text())["format"] == "tune_agb.calibration/1"


GOOD = {"format": "tune_agb.calibration/1", "method": "isotonic", "scale": 1.0, "log_var": [1.0, 2.0, 3.0],
        "log_var_calibrated": [1.5, 1.5, 2.0], "loss": "gaussian_nll", "split": "val", "n": 300}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scale": -2.0}, "'scale' must be a finite number > 0, got -2.0"),
        ({"scale": float("nan")}, "'scale' must be a finite number > 0, got nan"),
        ({"scale": "2"}, "'scale' must be a finite number > 0, got '2'"),
        ({"method": "platt"}, "'method' must be one of none, scale, isotonic, distance, got 'platt'"),
        ({"format": "other/2"}, "'format' must be 'tune_agb.calibration/1', got 'other/2'"),
        ({"log_var": [1.0, 3.0, 2.0]}, "'log_var' must be strictly increasing"),
        ({"log_var_calibrated": [2.0, 1.0, 3.0]}, "'log_var_calibrated' must be nondecreasing"),
        (
            {"log_var_calibrated": [1.0, 2.0]},
            "'log_var' and 'log_var_calibrated' must be two lists of the same length >= 2 (method isotonic)",
        ),
        ({"log_var": [1.0, float("inf"), 3.0]}, "'log_var' must hold finite numbers"),
        ({"log_var": "1 2 3"}, "'log_var' must be a list of numbers"),
        ({"n": -1}, "'n' must be an integer >= 0"),
        ({"sigma": 2.0}, "unknown key sigma (valid: format, method, scale,"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_bad_file_is_one_error_naming_file_and_field(tmp_path: Path, change: dict, message: str) -> None:
    path = tmp_path / CALIBRATION_FILE
    path.write_text(json.dumps(GOOD | change))
    with pytest.raises(TuneAgbError, match=re.escape(f"{path}: {message}")) as info:
        load_calibration(path)
    assert len(str(info.value).splitlines()) == 1
    path.write_text(json.dumps(GOOD))
    assert load_calibration(path).method == "isotonic"


def test_unreadable_or_missing_file(tmp_path: Path) -> None:
    path = tmp_path / CALIBRATION_FILE
    path.write_text("{not json")
    with pytest.raises(TuneAgbError, match=re.escape(f"{path}: not a readable calibration JSON file")):
        load_calibration(path)
    path.write_text("[1, 2]")
    with pytest.raises(TuneAgbError, match=re.escape(f"{path}: expected a JSON object, got list")):
        load_calibration(path)
    with pytest.raises(TuneAgbError, match="calibration file not found"):
        load_calibration(tmp_path / "nowhere.json")


def test_the_models_calibration_is_found_beside_it(tmp_path: Path) -> None:
    """An out dir's calibration.json applies to the dir and to its best.pt; other checkpoints and models saved
    without one (older runs, ensemble members) get the identity."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "best.pt").write_bytes(b"")
    assert model_calibration(old) == (IDENTITY, None)
    assert model_calibration(old / "best.pt") == (IDENTITY, None)
    run = tmp_path / "run"
    (run / "members" / "member_00").mkdir(parents=True)
    cal = Calibration("scale", 1.7, split="val", n=10)
    save_calibration(cal, run / CALIBRATION_FILE)
    assert model_calibration(run) == (cal, run / CALIBRATION_FILE)
    assert model_calibration(run / "best.pt") == (cal, run / CALIBRATION_FILE)
    assert model_calibration(run / "last.pt") == (IDENTITY, None)  # fitted for best.pt only
    assert model_calibration(run / "members" / "member_00" / "best.pt") == (IDENTITY, None)


def test_reliability_plot_is_a_png_with_content(tmp_path: Path) -> None:
    y, mean, var = miscalibrated(2_000, 2.0)
    cal = fit_calibration("scale", y, mean, var)
    path = tmp_path / "rel.png"
    reliability_plot(y, mean, np.sqrt(var), np.sqrt(cal.variance(var)), path, "val: reliability")
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) >= 300
        lo, hi = img.convert("L").getextrema()
        assert hi - lo > 100


# -- distance: sigma widened by the input bands' distance from the train pixels ------------------------------------
def shifted_pixels(n: int, shift: float, factor: float, seed: int) -> tuple[np.ndarray, ...]:
    """Pixels whose bands (4, n) are drawn around ``shift`` (the train pixels' are around 0), and labels whose true
    sigma is the predicted one x ``factor`` x max(1, d / d_ref): the miscalibration the method models."""
    rng = np.random.default_rng(seed)
    bands = rng.normal(shift, 1.0, (4, n))
    d = np.sqrt((bands**2).sum(axis=0))
    mean, sigma = rng.gamma(2.0, 60.0, n), np.exp(rng.uniform(np.log(5.0), np.log(80.0), n))
    true_sigma = sigma * factor * np.maximum(1.0, d / REF_4D)
    return mean + true_sigma * rng.normal(0, 1, n), mean, sigma**2, bands


REF_4D = math.sqrt(3.357)  # median of a chi-square with 4 degrees of freedom, square-rooted


def test_distance_widens_sigma_where_the_bands_leave_the_train_pixels() -> None:
    """Fitted on val pixels like the train pixels, ``distance`` recovers the factor and keeps its coverage on pixels
    far from them, where one factor fitted on val (``scale``) covers far too few labels."""
    reference = np.random.default_rng(9).normal(0.0, 1.0, (20_000, 4))
    *fit, bands = shifted_pixels(20_000, 0.0, 1.6, seed=1)
    cal = fit_calibration("distance", *fit, split="val", bands=bands, reference=reference)
    scale = fit_calibration("scale", *fit, split="val")
    assert cal.method == "distance" and cal.scale == pytest.approx(1.6, rel=0.03) and cal.n == 20_000
    assert cal.distance_ref == pytest.approx(REF_4D, rel=0.03) and len(cal.band_icov) == 4
    y, mean, var, far = shifted_pixels(20_000, 1.5, 1.6, seed=2)  # a new region: every band shifted 1.5 sd
    sd = cal.std(np.sqrt(var), far)
    np.testing.assert_allclose(sd**2, cal.variance(var, far), rtol=1e-9)
    np.testing.assert_allclose(coverage(y, mean, sd, (ONE_SIGMA, TWO_SIGMA)), (ONE_SIGMA, TWO_SIGMA), atol=0.015)
    assert coverage(y, mean, scale.std(np.sqrt(var)), (ONE_SIGMA,))[0] < ONE_SIGMA - 0.1
    assert np.all(cal.widening(far) >= 1.0) and cal.widening(far).mean() > 1.3
    assert "distance: sigma x 1.6" in cal.describe() and "4 input bands" in cal.describe()


def test_distance_needs_the_bands_and_keeps_nan() -> None:
    *fit, fit_bands = shifted_pixels(500, 0.0, 1.0, seed=3)
    cal = fit_calibration("distance", *fit, bands=fit_bands, reference=np.random.default_rng(0).normal(size=(80, 4)))
    var = np.array([1.0, np.nan, 4.0], dtype=np.float32)
    bands = np.zeros((4, 3))
    bands[2, 2] = np.nan  # a missing band: no evidence of shift, the scale alone
    out = cal.variance(var, bands)
    assert out.dtype == np.float32 and np.isnan(out[1])
    assert cal.widening(bands)[2] == 1.0
    with pytest.raises(TuneAgbError, match="needs the bands of the pixels it calibrates"):
        cal.variance(var)
    with pytest.raises(TuneAgbError, match="fitted on 4 input bands; the pixels to calibrate have 3"):
        cal.std(np.sqrt(var), np.zeros((3, 3)))
    with pytest.raises(TuneAgbError, match="needs more train pixels with finite bands than bands, got 3 pixels"):
        fit_calibration("distance", np.ones(3), np.zeros(3), var, bands=bands, reference=np.ones((3, 4)))


def test_distance_file_round_trip_and_bad_fields(tmp_path: Path) -> None:
    y, mean, var, bands = shifted_pixels(2_000, 0.5, 1.2, seed=5)
    cal = fit_calibration(
        "distance", y, mean, var, bands=bands, reference=np.random.default_rng(0).normal(size=(99, 4))
    )
    path = tmp_path / CALIBRATION_FILE
    save_calibration(cal, path)
    back = load_calibration(path)
    assert back == cal
    np.testing.assert_array_equal(back.variance(var, bands), cal.variance(var, bands))
    good = json.loads(path.read_text())
    for change, message in (
        ({"band_icov": good["band_icov"][:3]}, "'band_icov' must be 4 rows of 4 numbers, one per band of 'band_mean'"),
        ({"band_icov": [[1.0]] * 4}, "'band_icov' must be 4 rows of 4 numbers"),
        ({"band_icov": [1.0, 2.0]}, "'band_icov' must be a list of rows"),
        ({"distance_ref": 0.0}, "'distance_ref' must be > 0 (method distance)"),
        ({"distance_ref": -1.0}, "'distance_ref' must be a finite number >= 0"),
        ({"band_mean": [1.0, "x", 0.0, 0.0]}, "'band_mean' must be a list of numbers"),
    ):
        path.write_text(json.dumps(good | change))
        with pytest.raises(TuneAgbError, match=re.escape(f"{path}: {message}")):
            load_calibration(path)
