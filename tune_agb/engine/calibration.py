"""Variance recalibration: a map from the model's predicted variance to a calibrated one, fitted on the validation
split's labelled pixels after training, saved with the model (``calibration.json``) and applied to every later
prediction.

Methods (fitted on the validation labels, or the out-of-fold ones of a cross-validated search; the mean is never
changed, so RMSE, MAE, ME and R^2 are unaffected):

- ``scale``: one factor ``s`` on sigma, ``var * s^2``, chosen so that the 1-sigma interval holds 68.27 % of the fit
  pixels: ``s = quantile(|r| / sigma, 0.6827) / h``, ``r`` = label - mean, ``h`` the half-width in sigmas of the
  central 68.27 % interval of the model's distribution (1 for the Gaussian, 0.81 for the Laplacian;
  :func:`interval_halfwidth`). A quantile, not the NLL's optimum (``sqrt(mean(r^2 / var))`` for the Gaussian): the
  mean is set by its largest terms, and one pixel that a model predicts wrongly with a sigma of 0.1 m tripled an
  NLL factor on real tiles, so that every interval came out three times too wide (``bench/RESULTS.md``, issue 31).
  With Gaussian residuals the two agree; with heavier tails the quantile leaves the 2-sigma interval a little short.
- ``isotonic``: a nondecreasing map of the predicted variance, fitted by pool-adjacent-violators (PAV) on
  equal-count bins of the predicted variance: each bin's calibrated parameter is the weighted mean of ``r^2`` (or
  ``|r|`` for the Laplacian), which is the NLL-optimal nondecreasing solution (isotonic regression minimises every
  Bregman loss at once, the Gaussian and Laplacian NLLs in their scale parameter included). The map is linear in
  log variance between the bins' knots and keeps the end knots' ratio beyond them. It corrects a miscalibration
  that changes with the predicted variance, which one scale cannot, at the price of more parameters: it needs
  ``2 * ISOTONIC_MIN_BIN`` validation labels or falls back to ``scale``.
- ``distance``: one factor on sigma times a widening under input shift, ``sigma * s * max(1, d / d_ref)``, where
  ``d`` is the Mahalanobis distance of the pixel's input bands from the labelled train pixels' bands (their mean and
  covariance, saved in the file) and ``d_ref`` the train pixels' own median distance. A pixel whose bands lie as far
  from the training data as a typical train pixel keeps the ``scale`` interval; one twice as far gets twice its
  width. ``s`` is then fitted on val like ``scale``'s, with the widening applied. It needs the input bands of every
  pixel it calibrates (final_train, predict and the maps pass them). Measured on the two real regions in
  ``bench/RESULTS.md`` (issue 31): on a region the model never saw, val-fitted ``scale`` intervals are too narrow
  where the inputs differ from the training region's; this widens them there and leaves pixels like the train
  pixels alone. No labels of the new region are needed.
- ``none``: the identity (also what a model saved before calibration existed gets).

The file format (JSON, one object): ``format`` (:data:`CALIBRATION_FORMAT`), ``method``, ``scale`` (sigma factor,
1 unless ``scale``), ``log_var`` and ``log_var_calibrated`` (the isotonic knots: natural log of the predicted and the
calibrated variance in target units^2, ``[]`` unless ``isotonic``), ``band_mean``, ``band_icov`` and ``distance_ref``
(``distance``: the train pixels' band means, the inverse of their covariance as a list of rows, and their median
distance; ``[]``, ``[]`` and 0 otherwise), ``loss``, ``split`` and ``n`` (the pixels it was fitted on).
:func:`calibration_from_dict` checks every field and names the file and the field in its one-line error; the file is
read and written by :mod:`tune_agb.runs.final_dir` (``load_calibration``, ``save_calibration``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from statistics import NormalDist
from typing import Any

import numpy as np

from tune_agb.errors import TuneAgbError

CALIBRATION_FORMAT = "tune_agb.calibration/1"
METHODS = ("none", "scale", "isotonic", "distance")
DEFAULT_METHOD = "scale"
# Isotonic fits: labelled pixels per equal-count bin of predicted variance (at least), and the most bins.
ISOTONIC_MIN_BIN = 50
ISOTONIC_MAX_BINS = 20
# Nominal levels of the central intervals in reliability diagrams and coverage tables.
RELIABILITY_LEVELS: tuple[float, ...] = (*(round(0.05 * k, 2) for k in range(1, 20)), 0.99)


@dataclass(frozen=True)
class Calibration:
    """A variance map, fitted on ``n`` labelled pixels of ``split`` (see the module docstring for the methods)."""

    method: str = "none"
    scale: float = 1.0
    log_var: tuple[float, ...] = ()
    log_var_calibrated: tuple[float, ...] = ()
    band_mean: tuple[float, ...] = ()
    band_icov: tuple[tuple[float, ...], ...] = ()
    distance_ref: float = 0.0
    loss: str = "gaussian_nll"
    split: str = ""
    n: int = 0
    format: str = field(default=CALIBRATION_FORMAT, repr=False)

    @property
    def needs_bands(self) -> bool:
        """Whether :meth:`variance` and :meth:`std` need the pixels' input bands (method ``distance``)."""
        return self.method == "distance"

    def distance(self, bands: np.ndarray) -> np.ndarray:
        """The Mahalanobis distance of input ``bands`` (C, ...), in the units the model reads, from the train pixels'
        (method ``distance``; NaN where a band is not finite), shape ``bands.shape[1:]``."""
        bands = np.asarray(bands)
        mean, icov = np.asarray(self.band_mean), np.asarray(self.band_icov)
        if bands.ndim < 1 or bands.shape[0] != mean.size:
            raise TuneAgbError(
                f"calibration 'distance' was fitted on {mean.size} input bands; the pixels to calibrate have "
                f"{bands.shape[0] if bands.ndim else 0}"
            )
        z = np.moveaxis(bands, 0, -1).astype(np.float64) - mean
        with np.errstate(invalid="ignore"):
            return np.sqrt(np.maximum(np.einsum("...i,ij,...j->...", z, icov, z), 0.0))

    def widening(self, bands: np.ndarray) -> np.ndarray:
        """``max(1, d / distance_ref)`` for input ``bands`` (C, ...) (1 where a band is not finite: no evidence of
        shift), shape ``bands.shape[1:]``; all ones unless ``distance``."""
        if not self.needs_bands:
            return np.ones(np.shape(bands)[1:])
        with np.errstate(invalid="ignore"):
            g = np.maximum(1.0, self.distance(bands) / self.distance_ref)
        return np.where(np.isfinite(g), g, 1.0)

    def variance(self, var: np.ndarray, bands: np.ndarray | None = None) -> np.ndarray:
        """Calibrated variance of predicted variances ``var`` (any shape, target units^2; NaN stays NaN); ``bands``
        (C, *var.shape): the pixels' input bands, needed by ``distance`` only."""
        var = np.asarray(var)
        if self.method == "none":
            return var
        if self.method == "scale":
            return var * np.asarray(self.scale**2, dtype=var.dtype)
        if self.method == "distance":
            factor = self.scale * self._widening_of(bands, var.shape)
            return (var * factor**2).astype(var.dtype if np.issubdtype(var.dtype, np.floating) else np.float64)
        x, y = np.asarray(self.log_var), np.asarray(self.log_var_calibrated)
        with np.errstate(divide="ignore", invalid="ignore"):
            lv = np.log(var.astype(np.float64))
            out = np.interp(lv, x, y)
            out = np.where(lv < x[0], y[0] + lv - x[0], out)  # beyond the knots: the end knot's ratio
            out = np.where(lv > x[-1], y[-1] + lv - x[-1], out)
            out = np.where(np.isnan(lv), np.nan, out)
        return np.exp(out).astype(var.dtype if np.issubdtype(var.dtype, np.floating) else np.float64)

    def std(self, std: np.ndarray, bands: np.ndarray | None = None) -> np.ndarray:
        """Calibrated standard deviation of predicted standard deviations ``std`` (any shape, target units);
        ``bands`` as in :meth:`variance`."""
        std = np.asarray(std)
        if self.method == "scale":  # exact in float32, no square and root
            return std * np.asarray(self.scale, dtype=std.dtype)
        if self.method == "distance":
            return (std * (self.scale * self._widening_of(bands, std.shape))).astype(std.dtype)
        return np.sqrt(self.variance(std.astype(np.float64) ** 2)).astype(std.dtype)

    def _widening_of(self, bands: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
        if bands is None:
            raise TuneAgbError(
                "calibration 'distance' widens sigma by the input bands' distance from the train pixels: it needs "
                "the bands of the pixels it calibrates"
            )
        g = self.widening(bands)
        if g.shape != shape:
            raise TuneAgbError(f"calibration 'distance': bands of shape {np.shape(bands)} for sigma of shape {shape}")
        return g

    def describe(self) -> str:
        """One line for logs and GeoTIFF tags, e.g. ``scale: sigma x 1.31 (fitted on 116 val pixels)``."""
        fitted = f" (fitted on {self.n} {self.split} pixels)" if self.n else ""
        if self.method == "scale":
            return f"scale: sigma x {self.scale:.4g}{fitted}"
        if self.method == "distance":
            return (
                f"distance: sigma x {self.scale:.4g} x max(1, d / {self.distance_ref:.3g}), d the "
                f"{len(self.band_mean)} input bands' Mahalanobis distance from the train pixels'{fitted}"
            )
        if self.method == "isotonic":
            ratios = np.exp(0.5 * (np.asarray(self.log_var_calibrated) - np.asarray(self.log_var)))
            return f"isotonic: {len(self.log_var)} knots, sigma x {ratios.min():.3g} to {ratios.max():.3g}{fitted}"
        return "none (the model's own variance)"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["log_var"], d["log_var_calibrated"] = list(self.log_var), list(self.log_var_calibrated)
        d["band_mean"], d["band_icov"] = list(self.band_mean), [list(r) for r in self.band_icov]
        return {"format": d.pop("format"), **d}


IDENTITY = Calibration()
FILE_KEYS = tuple(IDENTITY.to_dict())


# -- fitting ------------------------------------------------------------------------------------------------
def _labelled(y: np.ndarray, mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Residuals and variances (float64, flat) of the pixels where label, mean and variance are all usable."""
    y, mean, var = (np.asarray(a, dtype=np.float64).ravel() for a in (y, mean, var))
    ok = np.isfinite(y) & np.isfinite(mean) & np.isfinite(var) & (var > 0)
    return (y - mean)[ok], var[ok]


def _laplacian(loss: str) -> bool:
    return loss == "laplacian_nll"


# The central interval whose coverage the sigma factor sets: +-1 sigma of a Gaussian (0.6827).
SCALE_LEVEL = 2 * NormalDist().cdf(1.0) - 1


def fit_scale(y: np.ndarray, mean: np.ndarray, var: np.ndarray, loss: str = "gaussian_nll") -> float:
    """The factor ``s`` on sigma with which the central 68.27 % interval of the model's distribution (``loss``)
    holds 68.27 % of labels ``y`` under (``mean``, ``var`` * s^2): ``quantile(|r| / sigma, 0.6827) / h`` with ``h`` =
    :func:`interval_halfwidth` (0.6827); flat arrays in target units. Robust: a few pixels predicted with a tiny
    sigma cannot set it (see the module docstring)."""
    r, var = _labelled(y, mean, var)
    if r.size == 0:
        raise TuneAgbError("calibration: no labelled pixel with a finite prediction and a positive variance")
    z = np.abs(r) / np.sqrt(var)
    s = float(np.quantile(z, SCALE_LEVEL)) / interval_halfwidth(SCALE_LEVEL, loss)
    if not (math.isfinite(s) and s > 0):  # every residual exactly zero
        raise TuneAgbError(f"calibration: the fitted sigma factor is {s} (are the labels equal to the predictions?)")
    return s


def pava(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Pool adjacent violators: the nondecreasing sequence closest to ``values`` in weighted least squares."""
    blocks: list[list[float]] = []  # [weighted mean, weight, count]
    for v, w in zip(np.asarray(values, float), np.asarray(weights, float), strict=True):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, c2 = blocks.pop()
            v1, w1, c1 = blocks[-1]
            blocks[-1] = [(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, c1 + c2]
    return np.concatenate([np.full(int(c), v) for v, _, c in blocks]) if blocks else np.zeros(0)


def fit_isotonic(
    y: np.ndarray, mean: np.ndarray, var: np.ndarray, loss: str = "gaussian_nll"
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Knots ``(log_var, log_var_calibrated)`` of the NLL-optimal nondecreasing map of the predicted variance
    (PAV over equal-count bins of it; see the module docstring). Needs ``2 * ISOTONIC_MIN_BIN`` usable pixels."""
    r, var = _labelled(y, mean, var)
    bins = min(ISOTONIC_MAX_BINS, r.size // ISOTONIC_MIN_BIN)
    if bins < 2:
        raise ValueError(f"isotonic calibration needs {2 * ISOTONIC_MIN_BIN} labelled pixels, got {r.size}")
    lap = _laplacian(loss)
    theta = np.sqrt(var / 2) if lap else var  # the distribution's scale parameter, fitted by the mean of t
    t = np.abs(r) if lap else r**2
    idx = np.array_split(np.argsort(var, kind="stable"), bins)
    x = np.array([np.mean(np.log(theta[i])) for i in idx])  # each bin's knot: its geometric mean parameter
    fitted = pava(np.array([t[i].mean() for i in idx]), np.array([i.size for i in idx], float))
    fitted = np.maximum(fitted, fitted.max() * 1e-6)  # a bin of residuals all ~0 must not give zero variance
    if np.any(np.diff(x) <= 0):  # bins of equal predicted variance: keep the first knot of each value
        keep = np.concatenate([[True], np.diff(x) > 0])
        x, fitted = x[keep], fitted[keep]
    to_log_var = (lambda lt: math.log(2) + 2 * lt) if lap else (lambda lt: lt)
    return tuple(float(v) for v in to_log_var(x)), tuple(float(v) for v in to_log_var(np.log(fitted)))


def labelled_bands(inputs: Any, labels: Any, chunk: int = 16) -> np.ndarray:
    """The input bands (pixels, C) of every labelled pixel of a split (``inputs`` (N, C, H, W), ``labels`` (N, H, W):
    arrays or memory maps, read ``chunk`` tiles at a time), float64."""
    out = []
    for i in range(0, len(labels), chunk):
        mask = np.isfinite(np.asarray(labels[i : i + chunk]))
        if mask.any():
            out.append(np.asarray(inputs[i : i + chunk]).transpose(0, 2, 3, 1)[mask].astype(np.float64))
    return np.concatenate(out) if out else np.zeros((0, np.shape(inputs)[1]))


def pixel_bands(inputs: Any, tile: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """The input bands (C, pixels) of pixels given by ``tile`` (index into ``inputs`` (N, C, H, W)) and ``flat``
    (row * W + col), in their order, float64; each tile is read once."""
    w = inputs.shape[-1]
    out = np.full((inputs.shape[1], np.size(tile)), np.nan)
    for t in np.unique(tile):
        pick = tile == t
        out[:, pick] = np.asarray(inputs[int(t)])[:, flat[pick] // w, flat[pick] % w]
    return out


def fit_band_distance(reference: np.ndarray) -> tuple[tuple[float, ...], tuple[tuple[float, ...], ...], float]:
    """``(band_mean, band_icov, distance_ref)`` of the ``distance`` method from the train pixels' bands (pixels, C):
    their mean, the (pseudo-)inverse of their covariance and their own median Mahalanobis distance."""
    x = np.asarray(reference, dtype=np.float64)
    x = x[np.all(np.isfinite(x), axis=1)] if x.ndim == 2 else x
    if x.ndim != 2 or len(x) <= x.shape[1]:
        raise TuneAgbError(
            f"calibration 'distance': needs more train pixels with finite bands than bands, got {len(x)} pixels of "
            f"{x.shape[-1] if x.ndim == 2 else '?'} bands"
        )
    mean, icov = tuple(float(v) for v in x.mean(axis=0)), np.linalg.pinv(np.cov(x.T))
    icov = tuple(tuple(float(v) for v in r) for r in icov)
    ref = float(np.median(Calibration("distance", band_mean=mean, band_icov=icov).distance(x.T)))
    if not (math.isfinite(ref) and ref > 0):
        raise TuneAgbError(f"calibration 'distance': the train pixels' median distance is {ref} (constant bands?)")
    return mean, icov, ref


def fit_calibration(
    method: str,
    y: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    loss: str = "gaussian_nll",
    split: str = "val",
    bands: np.ndarray | None = None,
    reference: np.ndarray | None = None,
) -> Calibration:
    """Fit ``method`` (``none``, ``scale``, ``isotonic``, ``distance``) on the labelled pixels of one split: flat
    labels ``y``, predicted ``mean`` and ``var`` in target units (NaN labels ignored). An isotonic fit on too few
    pixels falls back to ``scale`` (the returned method says which). ``distance`` also needs ``bands`` (C, pixels),
    the input bands of those pixels, and ``reference`` (pixels, C), those of the labelled train pixels."""
    if method not in METHODS:
        raise TuneAgbError(f"calibration method {method!r}: allowed: {', '.join(METHODS)}")
    n = int(_labelled(y, mean, var)[0].size)
    if method == "none":
        return Calibration(loss=loss, split=split, n=n)
    if method == "distance":
        if bands is None or reference is None:
            raise TuneAgbError(
                "calibration 'distance': needs the input bands of the fit pixels and of the train pixels"
            )
        band_mean, band_icov, ref = fit_band_distance(reference)
        shape = Calibration("distance", 1.0, band_mean=band_mean, band_icov=band_icov, distance_ref=ref)
        g = shape.widening(bands)
        s = fit_scale(y, mean, np.asarray(var, dtype=np.float64) * g**2, loss)
        return replace(shape, scale=s, loss=loss, split=split, n=n)
    if method == "isotonic":
        try:
            lv, lvc = fit_isotonic(y, mean, var, loss)
            if len(lv) >= 2:
                return Calibration("isotonic", 1.0, lv, lvc, loss=loss, split=split, n=n)
        except ValueError:
            pass
    return Calibration("scale", fit_scale(y, mean, var, loss), loss=loss, split=split, n=n)


# -- coverage -----------------------------------------------------------------------------------------------
def interval_halfwidth(level: float, loss: str = "gaussian_nll") -> float:
    """The half-width, in predicted standard deviations, of the central interval that holds ``level`` of the
    model's predictive distribution: Gaussian ``Phi^-1((1 + level) / 2)`` (1 for 68.27 %, 2 for 95.45 %);
    Laplacian (``sigma = sqrt(2) b``) ``-ln(1 - level) / sqrt(2)`` (0.81 for 68.27 %, 2.18 for 95.45 %). A
    Laplacian's +-1 sigma holds 75.7 % of it, so counting labels within +-1 sigma would call a calibrated
    Laplacian model too wide."""
    if not 0 < level < 1:
        raise ValueError(f"interval level must be in (0, 1), got {level}")
    if _laplacian(loss):
        return -math.log1p(-level) / math.sqrt(2)
    return NormalDist().inv_cdf(0.5 + level / 2)


def sigma_halfwidth(k: int, loss: str = "gaussian_nll") -> float:
    """The half-width, in predicted standard deviations, of the central interval holding what a Gaussian holds
    within +-k sigma: ``k`` for a Gaussian model, the same probability's interval for a Laplacian one."""
    return float(k) if not _laplacian(loss) else interval_halfwidth(math.erf(k / math.sqrt(2)), loss)


def coverage(
    label: np.ndarray, mean: np.ndarray, std: np.ndarray, levels: tuple[float, ...], loss: str = "gaussian_nll"
) -> np.ndarray:
    """Observed share of labels inside the central interval of each nominal ``level`` of the predictive
    distribution (Gaussian, or Laplacian for ``laplacian_nll``, of standard deviation ``std``; flat arrays; NaN
    where there is no label)."""
    err = np.abs(np.asarray(label, float) - np.asarray(mean, float))
    std = np.asarray(std, float)
    z = [interval_halfwidth(lvl, loss) for lvl in levels]
    return np.array([float(np.mean(err <= k * std)) if err.size else math.nan for k in z])


# -- the file's content --------------------------------------------------------------------------------------
def _number_list(d: dict[str, Any], key: str, source: str) -> tuple[float, ...]:
    v = d.get(key, [])
    if not isinstance(v, list) or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in v):
        raise TuneAgbError(f"{source}: '{key}' must be a list of numbers, got {v!r}")
    if not all(math.isfinite(a) for a in v):
        raise TuneAgbError(f"{source}: '{key}' must hold finite numbers, got {v!r}")
    return tuple(float(a) for a in v)


def calibration_from_dict(d: Any, source: str) -> Calibration:
    """A :class:`Calibration` from its dict, every field checked; ``source`` names it in the error."""
    if not isinstance(d, dict):
        raise TuneAgbError(f"{source}: expected a JSON object, got {type(d).__name__}")
    unknown = set(d) - set(FILE_KEYS)
    if unknown:
        raise TuneAgbError(f"{source}: unknown key {', '.join(sorted(unknown))} (valid: {', '.join(FILE_KEYS)})")
    if d.get("format") != CALIBRATION_FORMAT:
        raise TuneAgbError(f"{source}: 'format' must be {CALIBRATION_FORMAT!r}, got {d.get('format')!r}")
    method = d.get("method")
    if method not in METHODS:
        raise TuneAgbError(f"{source}: 'method' must be one of {', '.join(METHODS)}, got {method!r}")
    scale = d.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        raise TuneAgbError(f"{source}: 'scale' must be a finite number > 0, got {scale!r}")
    lv, lvc = _number_list(d, "log_var", source), _number_list(d, "log_var_calibrated", source)
    if method == "isotonic":
        if len(lv) < 2 or len(lvc) != len(lv):
            raise TuneAgbError(
                f"{source}: 'log_var' and 'log_var_calibrated' must be two lists of the same length >= 2 (method "
                f"isotonic), got {len(lv)} and {len(lvc)}"
            )
        if np.any(np.diff(lv) <= 0):
            raise TuneAgbError(f"{source}: 'log_var' must be strictly increasing, got {list(lv)}")
        if np.any(np.diff(lvc) < 0):
            raise TuneAgbError(f"{source}: 'log_var_calibrated' must be nondecreasing, got {list(lvc)}")
    band_mean, band_icov, ref = _band_fields(d, method, source)
    loss, split, n = d.get("loss", "gaussian_nll"), d.get("split", ""), d.get("n", 0)
    if not isinstance(loss, str) or not isinstance(split, str):
        raise TuneAgbError(f"{source}: 'loss' and 'split' must be strings, got {loss!r} and {split!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise TuneAgbError(f"{source}: 'n' must be an integer >= 0, got {n!r}")
    return Calibration(method, float(scale), lv, lvc, band_mean, band_icov, ref, loss, split, n)


def _band_fields(
    d: dict[str, Any], method: str, source: str
) -> tuple[tuple[float, ...], tuple[tuple[float, ...], ...], float]:
    """``band_mean``, ``band_icov`` and ``distance_ref`` of a calibration dict, checked (required by ``distance``)."""
    band_mean = _number_list(d, "band_mean", source)
    rows = d.get("band_icov", [])
    if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        raise TuneAgbError(f"{source}: 'band_icov' must be a list of rows (lists of numbers), got {rows!r}")
    band_icov = tuple(_number_list({"band_icov": r}, "band_icov", source) for r in rows)
    ref = d.get("distance_ref", 0.0)
    if isinstance(ref, bool) or not isinstance(ref, (int, float)) or not (math.isfinite(ref) and ref >= 0):
        raise TuneAgbError(f"{source}: 'distance_ref' must be a finite number >= 0, got {ref!r}")
    if method == "distance":
        c = len(band_mean)
        if c == 0 or len(band_icov) != c or any(len(r) != c for r in band_icov):
            raise TuneAgbError(
                f"{source}: 'band_icov' must be {c} rows of {c} numbers, one per band of 'band_mean' (method "
                f"distance), got {len(band_icov)} rows for {c} bands"
            )
        if ref <= 0:
            raise TuneAgbError(f"{source}: 'distance_ref' must be > 0 (method distance), got {ref!r}")
    return band_mean, band_icov, float(ref)
