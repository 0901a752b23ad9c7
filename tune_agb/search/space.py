"""The search-space file: YAML schema, validation (before Ray starts) and conversion to an Optuna define-by-run space.

A space file has seven sections, and two optional ones (``cv``, ``final``); only ``params`` is required::

    experiment: {metric: val_rmse, mode: min, num_samples: 16, max_concurrent: 2, time_budget_s: null,
                 max_failures: 2}
    scheduler:  {type: asha, max_t: 12, grace_period: 2, reduction_factor: 3, brackets: 1}
    searcher:   {type: optuna, seed: 0, n_startup_trials: 5, constant_liar: true, multivariate: true,
                 points_to_evaluate: [{lr: 2.0e-3}]}
    resources:  {cpu: 1, gpu: 0}
    data:       {input_dir: ..., label_dir: ...}
    fixed:      {base_channels: 8}
    params:
      lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      optimizer: {type: categorical, choices: [adamw, sgd]}
      momentum: {type: float, low: 0.8, high: 0.99, when: {optimizer: sgd}}
    cv:         {k: 3, block_size: 2, block_m: null, seed: 0, positions: auto, manifest: null}
    final:      {ensemble_top: 3, ensemble: 1, cv_final: null, calibration: scale, forest: null}

``cv`` turns on spatial k-fold cross-validation (:mod:`tune_agb.cv`): every trial trains k models and reports the
mean over folds (what ASHA and Optuna act on) and the spread.

``final`` is the recipe of the final model (:data:`FINAL_KEYS`, named after ``tune_agb.final_train``'s options):
``python -m tune_agb.final_train --experiment STORAGE/NAME`` takes it as its defaults, and its flags (or
``--set final.KEY=VALUE``) override it. Keys left out keep final_train's defaults; the search itself ignores it.

Every name in ``fixed`` and ``params`` is a :class:`~tune_agb.engine.config.TrainConfig` field. Errors name the file
and the key (``demo.yaml: params.lr.low: ...``) and are raised as :class:`~tune_agb.errors.TuneAgbError`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tune_agb.cv import POSITION_SOURCES
from tune_agb.engine.calibration import METHODS
from tune_agb.engine.config import (
    TrainConfig,
    coerce_value,
    config_from_dict,
    field_names,
    field_types,
    read_yaml_or_json,
)
from tune_agb.engine.metric_names import EPOCH_METRICS, fold_metric_names
from tune_agb.errors import TuneAgbError
from tune_agb.forest_mix import check_weight  # the final model's forest part owns its weight's rule

# Figures every trial reports (see tune_agb.engine.train): the engine's validation metrics (the pixel count ``n``
# is no figure to optimise) and the training loss and RMSE. The ones a search may optimise; with ``cv`` each is the
# mean over folds.
METRICS: tuple[str, ...] = EPOCH_METRICS


def cv_metrics(k: int) -> tuple[str, ...]:
    """What a k-fold search reports besides :data:`METRICS` (never optimised): the spread over folds
    (``val_rmse_sd``, ``val_r2_sd``) and each fold's value (``val_rmse_fold0`` ... ``val_r2_fold{k-1}``)."""
    return fold_metric_names(k)


# The ``cv`` section (spatial k-fold cross-validation), when given: ``k`` is required.
CV_DEFAULTS: dict[str, Any] = {
    "k": None,  # folds, >= 2
    "block_size": 2,  # block side in tile steps
    "block_m": None,  # or in map units (metres for UTM): needs prepare's manifest
    "seed": 0,  # seed of the block-to-fold draw
    "positions": "auto",  # auto | manifest | names | tiles
    "manifest": None,  # prepare's manifest.parquet (relative to the space file); default: next to the inputs
}

SECTIONS: dict[str, dict[str, Any]] = {
    "experiment": {
        "metric": "val_rmse",
        "mode": "min",
        "num_samples": 16,
        "max_concurrent": 2,
        "time_budget_s": None,
        "max_failures": 2,
    },
    "scheduler": {"type": "asha", "max_t": 12, "grace_period": 2, "reduction_factor": 3, "brackets": 1},
    # constant_liar / multivariate: Optuna's TPESampler options (its defaults in Optuna 5). With trials running in
    # parallel, constant_liar counts the running ones as bad so the next suggestion avoids their region.
    "searcher": {
        "type": "optuna",
        "seed": 0,
        "n_startup_trials": 5,
        "constant_liar": True,
        "multivariate": True,
        "points_to_evaluate": [],
    },
    "resources": {"cpu": 1, "gpu": 0},
    "data": {"input_dir": None, "label_dir": None},
}
PARAM_KEYS: dict[str, set[str]] = {
    "float": {"type", "low", "high", "log", "step", "when"},
    "int": {"type", "low", "high", "log", "step", "when"},
    "categorical": {"type", "choices", "when"},
}
# The ``final`` section (the final model's recipe), when given: each key is final_train's option of that name, and a
# key left out keeps final_train's default (ensemble_top: null, the best configuration alone; ensemble: 1;
# cv_final: null, retrain for a cv search; calibration: scale).
FINAL_KEYS = ("ensemble_top", "ensemble", "cv_final", "calibration", "forest")
CV_FINAL = ("retrain", "folds")  # a cv search's final model: retrained on train+val, or its k fold models kept
SCHEDULERS = ("asha", "fifo")  # fifo: every trial runs to max_t (the baseline of bench/search_efficiency.py)
SEARCHERS = ("optuna", "random")  # random: Optuna's RandomSampler, same define-by-run space


@dataclass
class ParamSpec:
    """One searched hyperparameter.

    ``kind`` is ``float``, ``int`` or ``categorical``; ``low``/``high`` are inclusive bounds; ``when`` maps
    another (categorical) parameter's name to the values for which this one is searched.
    """

    name: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list[Any] = field(default_factory=list)
    when: dict[str, list[Any]] = field(default_factory=dict)

    def contains(self, value: Any) -> bool:
        """Whether ``value`` lies in this parameter's domain."""
        if self.kind == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        return self.low <= value <= self.high

    def from_stored(self, value: Any) -> Any:
        """A value as stored in results.parquet (possibly as text) turned into this parameter's type: the matching
        choice, or an int / float. Raises ``ValueError`` when it cannot be one (no check of the bounds)."""
        if self.kind == "categorical":
            for c in self.choices:
                if c == value or str(c) == str(value):
                    return c
            raise ValueError(f"{value!r} is not one of {self.name}'s choices")
        try:
            return int(float(value)) if self.kind == "int" else float(value)
        except TypeError as exc:
            raise ValueError(str(exc)) from None

    def active(self, values: dict[str, Any]) -> bool:
        """Whether the conditions in ``when`` hold for the values sampled so far."""
        return all(values.get(k) in allowed for k, allowed in self.when.items())


@dataclass
class SearchSpace:
    """A validated search-space file. ``settings`` holds the five settings sections with defaults filled in."""

    source: str
    settings: dict[str, dict[str, Any]]
    fixed: dict[str, Any]
    params: list[ParamSpec]
    cv: dict[str, Any] | None = None  # the cv section with defaults filled in; None: no cross-validation
    final: dict[str, Any] | None = None  # the final section's keys as given (validated); None: none given

    # -- convenient views of the settings ------------------------------------------------------------------
    @property
    def metric(self) -> str:
        return self.settings["experiment"]["metric"]

    @property
    def mode(self) -> str:
        return self.settings["experiment"]["mode"]

    @property
    def max_t(self) -> int:
        return self.settings["scheduler"]["max_t"]

    @property
    def reported(self) -> tuple[str, ...]:
        """Every figure a trial reports per epoch: :data:`METRICS`, then with ``cv`` :func:`cv_metrics`."""
        return (*METRICS, *(cv_metrics(self.cv["k"]) if self.cv else ()))

    def sampler(self) -> Any:
        """The Optuna sampler of ``searcher``: RandomSampler(seed) for ``type: random``, else TPESampler with the
        section's seed, n_startup_trials, constant_liar and multivariate (Optuna is imported here, not on load)."""
        import optuna

        se = self.settings["searcher"]
        if se["type"] == "random":
            return optuna.samplers.RandomSampler(seed=se["seed"])
        return optuna.samplers.TPESampler(
            seed=se["seed"],
            n_startup_trials=se["n_startup_trials"],
            constant_liar=se["constant_liar"],
            multivariate=se["multivariate"],
        )

    def base_config(self) -> TrainConfig:
        """Defaults + fixed values, with ``epochs`` = the scheduler's ``max_t`` (every trial's full budget)."""
        return config_from_dict({**self.fixed, "epochs": self.max_t}, source=f"{self.source}: fixed")

    def trial_config(self, sampled: dict[str, Any]) -> TrainConfig:
        """The complete TrainConfig of one trial: defaults + fixed + the sampled values."""
        return config_from_dict({**self.base_config().to_dict(), **sampled}, source=f"{self.source}: trial config")

    def define_by_run(self, trial: Any) -> None:
        """Optuna define-by-run space: suggest each parameter in file order, skipping inactive conditional ones."""
        values: dict[str, Any] = {}
        for p in self.params:
            if not p.active(values):
                continue
            if p.kind == "categorical":
                values[p.name] = trial.suggest_categorical(p.name, p.choices)
            elif p.kind == "int":
                values[p.name] = trial.suggest_int(p.name, p.low, p.high, step=p.step or 1, log=p.log)
            else:
                values[p.name] = trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)
        return None

    def to_dict(self) -> dict[str, Any]:
        """A canonical plain-data form (what a resumed search compares against)."""
        params = {}
        for p in self.params:
            d: dict[str, Any] = {"type": p.kind}
            if p.kind == "categorical":
                d["choices"] = list(p.choices)
            else:
                d |= {"low": p.low, "high": p.high, "log": p.log}
                if p.step is not None:
                    d["step"] = p.step
            if p.when:
                d["when"] = {k: list(v) for k, v in p.when.items()}
            params[p.name] = d
        out = {**copy.deepcopy(self.settings), "fixed": dict(self.fixed), "params": params}
        if self.cv is not None:
            out["cv"] = dict(self.cv)
        if self.final is not None:
            out["final"] = dict(self.final)
        return out

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
def _fail(source: str, key: str, msg: str) -> TuneAgbError:
    return TuneAgbError(f"{source}: {key}: {msg}")


def _string_number_hint(value: Any) -> str:
    """YAML 1.1 reads ``1e-5`` (no dot) as a string: say how to write it as a number."""
    if isinstance(value, str):
        try:
            x = float(value)
        except ValueError:
            return ""
        if "e" in value.lower() and "." not in value:
            mant, _, exp = value.lower().partition("e")
            return f" (YAML reads {value} as text; write {mant}.0e{exp})"
        return f" (got the text {value!r}; remove the quotes, e.g. {x!r})"
    return ""


def _number(source: str, key: str, value: Any, integer: bool = False) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        want = "an integer" if integer else "a number"
        raise _fail(source, key, f"must be {want}, got {value!r}{_string_number_hint(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(source, key, f"must be finite, got {value!r}")
    return value


def _check_keys(source: str, where: str, got: dict[str, Any], allowed: set[str] | dict[str, Any]) -> None:
    for k in got:
        if k not in allowed:
            raise _fail(source, f"{where}.{k}" if where else str(k), f"unknown key; allowed: {', '.join(allowed)}")


def _validate_settings(source: str, raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for section, defaults in SECTIONS.items():
        given = raw.get(section) or {}
        if not isinstance(given, dict):
            raise _fail(source, section, f"must be a mapping, got {type(given).__name__}")
        _check_keys(source, section, given, defaults)
        out[section] = {**copy.deepcopy(defaults), **given}
    ex, sc, se, rs, da = (out[s] for s in ("experiment", "scheduler", "searcher", "resources", "data"))

    if ex["metric"] not in METRICS:
        raise _fail(source, "experiment.metric", f"must be one of {', '.join(METRICS)}, got {ex['metric']!r}")
    if ex["mode"] not in ("min", "max"):
        raise _fail(source, "experiment.mode", f"must be min or max, got {ex['mode']!r}")
    for key, lo in (("num_samples", 1), ("max_concurrent", 1), ("max_failures", 0)):
        v = _number(source, f"experiment.{key}", ex[key], integer=True)
        if v < lo:
            raise _fail(source, f"experiment.{key}", f"must be >= {lo}, got {v}")
    if ex["time_budget_s"] is not None and _number(source, "experiment.time_budget_s", ex["time_budget_s"]) <= 0:
        raise _fail(source, "experiment.time_budget_s", f"must be > 0 seconds (or null), got {ex['time_budget_s']}")

    if sc["type"] not in SCHEDULERS:
        raise _fail(source, "scheduler.type", f"must be one of {', '.join(SCHEDULERS)}, got {sc['type']!r}")
    for key in ("max_t", "grace_period", "brackets"):
        if _number(source, f"scheduler.{key}", sc[key], integer=True) < 1:
            raise _fail(source, f"scheduler.{key}", f"must be >= 1, got {sc[key]}")
    if _number(source, "scheduler.reduction_factor", sc["reduction_factor"]) <= 1:
        raise _fail(source, "scheduler.reduction_factor", f"must be > 1, got {sc['reduction_factor']}")
    if sc["grace_period"] > sc["max_t"]:
        raise _fail(source, "scheduler.grace_period", f"must be <= max_t ({sc['max_t']}), got {sc['grace_period']}")

    if se["type"] not in SEARCHERS:
        raise _fail(source, "searcher.type", f"must be one of {', '.join(SEARCHERS)}, got {se['type']!r}")
    _number(source, "searcher.seed", se["seed"], integer=True)
    if _number(source, "searcher.n_startup_trials", se["n_startup_trials"], integer=True) < 0:
        raise _fail(source, "searcher.n_startup_trials", f"must be >= 0, got {se['n_startup_trials']}")
    for key in ("constant_liar", "multivariate"):
        if not isinstance(se[key], bool):
            raise _fail(source, f"searcher.{key}", f"must be true or false, got {se[key]!r}")
    if not isinstance(se["points_to_evaluate"], list):
        raise _fail(source, "searcher.points_to_evaluate", "must be a list of mappings {name: value}")

    if _number(source, "resources.cpu", rs["cpu"]) <= 0:
        raise _fail(source, "resources.cpu", f"must be > 0, got {rs['cpu']}")
    gpu = _number(source, "resources.gpu", rs["gpu"])
    if gpu < 0 or (gpu > 1 and gpu != int(gpu)):
        raise _fail(source, "resources.gpu", f"must be 0, a fraction in (0, 1] or a whole number, got {gpu}")

    for key in ("input_dir", "label_dir"):
        if da[key] is not None and not isinstance(da[key], str):
            raise _fail(source, f"data.{key}", f"must be a folder path, got {da[key]!r}")
    if (da["input_dir"] is None) != (da["label_dir"] is None):
        raise _fail(source, "data", "give both input_dir and label_dir, or neither (then the demo data is used)")
    return out


def _validate_cv(source: str, raw: Any) -> dict[str, Any] | None:
    """The ``cv`` section with its defaults, or None when it is absent (errors name the field and what is allowed)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _fail(source, "cv", f"must be a mapping {{k: ..., block_size: ...}}, got {type(raw).__name__}")
    _check_keys(source, "cv", raw, CV_DEFAULTS)
    cv = {**CV_DEFAULTS, **raw}
    if cv["k"] is None:
        raise _fail(source, "cv.k", "is required: the number of folds, an integer >= 2")
    if _number(source, "cv.k", cv["k"], integer=True) < 2:
        raise _fail(source, "cv.k", f"must be an integer >= 2 (folds), got {cv['k']}")
    if _number(source, "cv.block_size", cv["block_size"], integer=True) < 1:
        raise _fail(source, "cv.block_size", f"must be an integer >= 1 (tiles per block side), got {cv['block_size']}")
    if cv["block_m"] is not None:
        if "block_size" in raw:
            raise _fail(source, "cv.block_m", "give the block size once: block_size (tiles) or block_m (map units)")
        if _number(source, "cv.block_m", cv["block_m"]) <= 0:
            raise _fail(source, "cv.block_m", f"must be > 0 (map units, metres for UTM), got {cv['block_m']}")
    _number(source, "cv.seed", cv["seed"], integer=True)
    if cv["positions"] not in POSITION_SOURCES:
        raise _fail(source, "cv.positions", f"must be one of {', '.join(POSITION_SOURCES)}, got {cv['positions']!r}")
    if cv["block_m"] is not None and cv["positions"] in ("names", "tiles"):
        raise _fail(
            source, "cv.block_m", f"needs map coordinates (prepare's manifest), not positions: {cv['positions']}"
        )
    if cv["manifest"] is not None and not isinstance(cv["manifest"], str):
        raise _fail(source, "cv.manifest", f"must be the path of prepare's manifest.parquet, got {cv['manifest']!r}")
    return cv


def _validate_final(source: str, raw: Any, settings: dict[str, Any], cv: dict[str, Any] | None) -> dict | None:
    """The ``final`` section as given, its values checked (None when absent or empty): each key's type and allowed
    values, and the combinations final_train refuses, so that a recipe fails before the search rather than after."""
    if raw is None or raw == {}:
        return None
    if not isinstance(raw, dict):
        raise _fail(source, "final", f"must be a mapping {{ensemble_top: ..., calibration: ...}}, got {raw!r}")
    _check_keys(source, "final", raw, FINAL_KEYS)
    out = dict(raw)
    for key, what in (
        ("ensemble_top", "the number of best distinct configurations"),
        ("ensemble", "seeds per configuration"),
    ):
        v = out.get(key)
        if key not in out or (v is None and key == "ensemble_top"):
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            null = " or null (the best configuration alone)" if key == "ensemble_top" else ""
            raise _fail(source, f"final.{key}", f"must be an integer >= 1 ({what}){null}, got {v!r}")
    for key, allowed in (("cv_final", CV_FINAL), ("calibration", METHODS)):
        v = out.get(key)
        if key not in out or (v is None and key == "cv_final"):
            continue
        if not isinstance(v, str) or v.lower() not in allowed:
            null = " or null (retrain, for a cv search)" if key == "cv_final" else ""
            raise _fail(source, f"final.{key}", f"must be one of {', '.join(allowed)}{null}, got {v!r}")
        out[key] = v.lower()
    if out.get("forest") is not None:
        check_weight(out["forest"], f"{source}: final.forest", null=True)
    top, cv_final, n = out.get("ensemble_top"), out.get("cv_final"), settings["experiment"]["num_samples"]
    if top is not None and top > n:
        raise _fail(source, "final.ensemble_top", f"must be <= experiment.num_samples ({n}), got {top}")
    if cv_final is not None and cv is None:
        raise _fail(source, "final.cv_final", f"needs a cv: section (a spatial k-fold search); got {cv_final!r}")
    if cv_final == "folds" and top is not None:
        raise _fail(source, "final.cv_final", "folds keeps one trial's fold models; it cannot go with ensemble_top")
    if cv_final is not None and out.get("ensemble", 1) != 1:
        raise _fail(source, "final.ensemble", f"must be 1 with cv_final ({cv_final}), got {out['ensemble']}")
    return out


def _validate_param(source: str, name: str, raw: Any, earlier: dict[str, ParamSpec]) -> ParamSpec:
    key = f"params.{name}"
    if name not in field_types():
        raise _fail(source, key, f"not a training hyperparameter; valid names: {', '.join(field_names())}")
    if not isinstance(raw, dict) or "type" not in raw:
        raise _fail(source, key, "must be a mapping with a 'type' (float, int or categorical)")
    kind = raw["type"]
    if kind not in PARAM_KEYS:
        raise _fail(source, f"{key}.type", f"must be float, int or categorical, got {kind!r}")
    _check_keys(source, key, raw, PARAM_KEYS[kind])
    want = field_types()[name]
    spec = ParamSpec(name=name, kind=kind)
    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise _fail(source, f"{key}.choices", "must be a non-empty list")
        spec.choices = [coerce_value(name, c, f"{source}: {key}.choices") for c in choices]
        if len(set(map(repr, spec.choices))) != len(spec.choices):
            raise _fail(source, f"{key}.choices", f"has duplicates: {choices}")
    else:
        if want.__name__ != kind:
            use = want.__name__ if want in (int, float) else "categorical"
            raise _fail(source, f"{key}.type", f"'{name}' is a {want.__name__} hyperparameter; use type: {use}")
        for b in ("low", "high"):
            if b not in raw:
                raise _fail(source, f"{key}.{b}", "is required")
        spec.low = _number(source, f"{key}.low", raw["low"], integer=kind == "int")
        spec.high = _number(source, f"{key}.high", raw["high"], integer=kind == "int")
        if spec.low >= spec.high:
            raise _fail(source, key, f"low ({spec.low}) must be < high ({spec.high})")
        log = raw.get("log", False)
        if not isinstance(log, bool):
            raise _fail(source, f"{key}.log", f"must be true or false, got {log!r}")
        spec.log = log
        if log and spec.low <= 0:
            raise _fail(source, f"{key}.low", f"must be > 0 with log: true, got {spec.low}")
        if raw.get("step") is not None:
            if log:
                raise _fail(source, f"{key}.step", "cannot be combined with log: true (Optuna does not allow it)")
            spec.step = _number(source, f"{key}.step", raw["step"], integer=kind == "int")
            if spec.step <= 0:
                raise _fail(source, f"{key}.step", f"must be > 0, got {spec.step}")
        for b in ("low", "high"):  # both ends must be legal values of the field (e.g. dropout < 1)
            coerce_value(name, getattr(spec, b), f"{source}: {key}.{b}")
    when = raw.get("when") or {}
    if not isinstance(when, dict):
        raise _fail(source, f"{key}.when", "must be a mapping {other_param: value or [values]}")
    for other, allowed in when.items():
        if other not in earlier:
            raise _fail(
                source,
                f"{key}.when.{other}",
                "must name a parameter listed before this one in params"
                + (f" (one of {', '.join(earlier)})" if earlier else ""),
            )
        allowed = allowed if isinstance(allowed, list) else [allowed]
        for v in allowed:
            if not earlier[other].contains(v):
                raise _fail(source, f"{key}.when.{other}", f"{v!r} is not a possible value of '{other}'")
        spec.when[other] = allowed
    return spec


def parse_search_space(raw: Any, source: str = "search space") -> SearchSpace:
    """Validate a search space given as plain data (a parsed YAML document)."""
    sections = [*SECTIONS, "fixed", "params", "cv", "final"]
    if not isinstance(raw, dict):
        raise TuneAgbError(f"{source}: expected a mapping with sections {', '.join(sections)}")
    _check_keys(source, "", raw, sections)
    settings = _validate_settings(source, raw)
    cv = _validate_cv(source, raw.get("cv"))
    final = _validate_final(source, raw.get("final"), settings, cv)

    fixed_raw = raw.get("fixed") or {}
    if not isinstance(fixed_raw, dict):
        raise _fail(source, "fixed", "must be a mapping {hyperparameter: value}")
    fixed: dict[str, Any] = {}
    for name, value in fixed_raw.items():
        if name not in field_types():
            raise _fail(
                source, f"fixed.{name}", f"not a training hyperparameter; valid names: {', '.join(field_names())}"
            )
        if name == "epochs":
            raise _fail(source, "fixed.epochs", "set the epoch budget with scheduler.max_t instead")
        hint = _string_number_hint(value) if field_types()[name] in (int, float) else ""
        if hint:
            raise _fail(source, f"fixed.{name}", f"must be a number{hint}")
        fixed[name] = coerce_value(name, value, f"{source}: fixed.{name}")

    params_raw = raw.get("params")
    if not isinstance(params_raw, dict) or not params_raw:
        raise _fail(source, "params", "must be a non-empty mapping {hyperparameter: {type: ..., ...}}")
    params: dict[str, ParamSpec] = {}
    for name, spec in params_raw.items():
        if name in fixed:
            raise _fail(source, f"params.{name}", "is also in fixed; a hyperparameter is either fixed or searched")
        if name == "epochs":
            raise _fail(source, "params.epochs", "the epoch budget is scheduler.max_t (ASHA decides who gets it)")
        params[name] = _validate_param(source, name, spec, params)

    space = SearchSpace(source=source, settings=settings, fixed=fixed, params=list(params.values()), cv=cv, final=final)
    space.base_config()  # fixed values that only clash together (logvar_min >= logvar_max) fail here
    for i, point in enumerate(settings["searcher"]["points_to_evaluate"]):
        _validate_point(space, point, f"searcher.points_to_evaluate[{i}]")
    return space


def _validate_point(space: SearchSpace, point: Any, key: str) -> None:
    if not isinstance(point, dict):
        raise _fail(space.source, key, "must be a mapping {param: value}")
    by_name = {p.name: p for p in space.params}
    for name, value in point.items():
        if name not in by_name:
            raise _fail(space.source, f"{key}.{name}", f"not a searched parameter; searched: {', '.join(by_name)}")
        if not by_name[name].contains(value):
            raise _fail(space.source, f"{key}.{name}", f"{value!r} is outside the parameter's range/choices")
    for p in space.params:
        # Parameters left out are sampled; a conditional one given where its condition fails would be ignored.
        if p.name in point and not p.active(point):
            raise _fail(space.source, f"{key}.{p.name}", f"is set but its condition {p.when} does not hold")


def load_search_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space YAML file (see the module docstring for the grammar)."""
    raw = read_yaml_or_json(path, "search-space file")
    return parse_search_space(raw, source=str(path))
