"""The search-space file: shipped spaces load, every kind of mistake fails with one line naming the key, and the
define-by-run space samples what the file says (checked with a real Optuna study)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from tests.search_helpers import tiny_space, write_space
from tune_agb.engine.config import TrainConfig, field_names
from tune_agb.engine.metric_names import METRIC_NAMES
from tune_agb.errors import TuneAgbError
from tune_agb.search.space import METRICS, load_search_space, parse_search_space

REPO = Path(__file__).resolve().parents[1]


def test_shipped_spaces_load_and_use_trainconfig_names() -> None:
    default = load_search_space(REPO / "search_spaces" / "default.yaml")
    demo = load_search_space(REPO / "search_spaces" / "demo.yaml")
    names = {p.name for p in default.params}
    assert names <= set(field_names())
    # The list of searched hyperparameters, each under its TrainConfig name.
    assert {
        "lr",
        "weight_decay",
        "optimizer",
        "schedule",
        "base_channels",
        "depth",
        "dropout",
        "batch_size",
        "loss",
    } <= names
    assert default.settings["resources"]["gpu"] == 0.25
    assert default.settings["experiment"]["num_samples"] >= 20
    assert demo.settings["resources"]["gpu"] == 0
    assert demo.base_config().epochs == demo.max_t


def _yaml_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(TuneAgbError) as err:
        load_search_space(path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(path))
    return msg


PARAMS_OK = "params:\n  lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"


def test_the_demo_space_trains_its_trials_enough_steps_before_the_first_rung() -> None:
    """ASHA judges the demo's trials after ``grace_period`` epochs, an epoch being one pass over the demo's train
    tiles. At batch 8 that pass was 4 optimizer steps: at the first rung no model had learned anything, validation
    RMSE jumped by tens of percent from epoch to epoch, and which search found the best model was luck (bench/
    RESULTS.md, "Search efficiency with epochs that train"). The demo keeps at least 16 steps before its first rung."""
    from tune_agb.demo_data import demo_data_dir
    from tune_agb.engine.train import _batch_starts  # the engine's own rule for the batches of a pass

    demo = load_search_space(REPO / "search_spaces" / "demo.yaml")
    train_tiles = len(list((demo_data_dir() / "inputs" / "train").glob("*.npy")))
    config = demo.base_config()
    steps = config.steps_per_epoch or len(_batch_starts(train_tiles, config.batch_size, config.norm))
    assert steps * demo.settings["scheduler"]["grace_period"] >= 16, (train_tiles, config.batch_size)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("experimnt: {}\n" + PARAMS_OK, "experimnt: unknown key; allowed: experiment"),
        ("experiment: {metrc: val_rmse}\n" + PARAMS_OK, "experiment.metrc: unknown key"),
        ("experiment: {metric: rmse}\n" + PARAMS_OK, "experiment.metric: must be one of val_rmse"),
        ("scheduler: {max_t: 4, grace_period: 8}\n" + PARAMS_OK, "scheduler.grace_period: must be <= max_t"),
        ("params:\n  lr: {type: float, low: 1.0e-2, high: 1.0e-4}\n", "params.lr: low (0.01) must be < high"),
        ("params:\n  lr: {type: float, low: 0.0, high: 0.1, log: true}\n", "params.lr.low: must be > 0 with log"),
        ("params:\n  lr: {type: float, low: 0.001, high: 0.1, log: true, step: 0.001}\n", "params.lr.step: cannot"),
        ("params:\n  lr: {type: float, low: 1e-5, high: 1.0e-2}\n", "params.lr.low: must be a number, got '1e-5'"),
        ("params:\n  lr: {type: float, low: 1.0e-5, high: 1.0e-2, lg: true}\n", "params.lr.lg: unknown key"),
        ("params:\n  learning_rate: {type: float, low: 0.1, high: 1.0}\n", "params.learning_rate: not a training"),
        ("params:\n  depth: {type: float, low: 2, high: 4}\n", "params.depth.type: 'depth' is a int"),
        ("params:\n  optimizer: {type: categorical, choices: [adamw, lion]}\n", "must be one of adam, adamw, sgd"),
        (
            "params:\n  momentum: {type: float, low: 0.8, high: 0.9, when: {optimizer: sgd}}\n",
            "params.momentum.when.optimizer: must name a parameter listed before",
        ),
        (
            "params:\n  optimizer: {type: categorical, choices: [adamw]}\n"
            "  momentum: {type: float, low: 0.8, high: 0.9, when: {optimizer: sgd}}\n",
            "'sgd' is not a possible value of 'optimizer'",
        ),
        ("fixed: {weight_decay: 1e-4}\n" + PARAMS_OK, "fixed.weight_decay: must be a number (YAML reads 1e-4 as text"),
        ("fixed: {epochs: 10}\n" + PARAMS_OK, "fixed.epochs: set the epoch budget with scheduler.max_t"),
        ("fixed: {lr: 0.01}\n" + PARAMS_OK, "params.lr: is also in fixed"),
        ("searcher: {points_to_evaluate: [{lr: 1.0}]}\n" + PARAMS_OK, "points_to_evaluate[0].lr: 1.0 is outside"),
        ("resources: {gpu: 1.5}\n" + PARAMS_OK, "resources.gpu: must be 0, a fraction"),
        ("searcher: {constant_liar: 1}\n" + PARAMS_OK, "searcher.constant_liar: must be true or false, got 1"),
        ("searcher: {multivariate: yes please}\n" + PARAMS_OK, "searcher.multivariate: must be true or false"),
        ("params: {}\n", "params: must be a non-empty mapping"),
    ],
)
def test_bad_space_fails_with_one_line_naming_the_key(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in _yaml_error(tmp_path, text)


def test_unknown_hyperparameter_lists_valid_names(tmp_path: Path) -> None:
    msg = _yaml_error(tmp_path, "params:\n  lerning_rate: {type: float, low: 0.1, high: 1.0}\n")
    assert all(name in msg for name in field_names())


def test_define_by_run_samples_within_bounds_and_respects_conditions() -> None:
    space = parse_search_space(
        tiny_space(
            fixed={"base_channels": 4},
            params={
                "optimizer": {"type": "categorical", "choices": ["adamw", "sgd"]},
                "momentum": {"type": "float", "low": 0.8, "high": 0.95, "when": {"optimizer": "sgd"}},
                "lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-1, "log": True},
                "depth": {"type": "int", "low": 2, "high": 3},
                "dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.25},
            },
        ),
        source="t",
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_opt, seen_depth, seen_dropout = set(), set(), set()
    for _ in range(40):
        trial = study.ask()
        space.define_by_run(trial)
        p = trial.params
        assert ("momentum" in p) == (p["optimizer"] == "sgd")  # conditional: only searched for sgd
        if "momentum" in p:
            assert 0.8 <= p["momentum"] <= 0.95
        assert 1e-4 <= p["lr"] <= 1e-1
        seen_opt.add(p["optimizer"])
        seen_depth.add(p["depth"])
        seen_dropout.add(p["dropout"])
        study.tell(trial, 1.0)
    assert seen_opt == {"adamw", "sgd"}
    assert seen_depth == {2, 3}  # int bounds are inclusive
    assert seen_dropout <= {0.0, 0.25, 0.5} and len(seen_dropout) > 1
    # log: true is a log-uniform distribution in Optuna
    assert study.trials[0].distributions["lr"].log


def test_steps_per_epoch_fixed_or_searched() -> None:
    """Large datasets: an epoch of ``steps_per_epoch`` batches, fixed or searched (ASHA's rungs count these)."""
    fixed = parse_search_space(tiny_space(fixed={"base_channels": 4, "steps_per_epoch": 50}), source="t")
    assert fixed.trial_config({"lr": 0.005, "optimizer": "adamw"}).steps_per_epoch == 50
    searched = parse_search_space(
        tiny_space(params={"steps_per_epoch": {"type": "categorical", "choices": [25, 100]}}), source="t"
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(10):
        trial = study.ask()
        searched.define_by_run(trial)
        seen.add(searched.trial_config(trial.params).steps_per_epoch)
        study.tell(trial, 1.0)
    assert seen == {25, 100}
    with pytest.raises(TuneAgbError, match="steps_per_epoch"):
        parse_search_space(tiny_space(fixed={"steps_per_epoch": -5}), source="t")


def test_trial_config_is_defaults_plus_fixed_plus_sampled() -> None:
    space = parse_search_space(tiny_space(), source="t")
    cfg = space.trial_config({"lr": 0.005, "optimizer": "sgd", "momentum": 0.9})
    assert isinstance(cfg, TrainConfig)
    assert (cfg.lr, cfg.optimizer, cfg.momentum) == (0.005, "sgd", 0.9)
    assert (cfg.base_channels, cfg.depth, cfg.batch_size) == (4, 2, 4)  # fixed
    assert cfg.epochs == 4  # scheduler.max_t
    assert cfg.loss == TrainConfig().loss  # default


def test_a_search_may_optimise_every_engine_metric_of_the_validation_split_and_the_training_figures() -> None:
    # One source of truth: the engine's metric names, reported by every trial as val_<name>.
    assert set(METRICS) == {f"val_{m}" for m in METRIC_NAMES if m != "n"} | {"train_loss", "train_rmse"}
    for metric in METRICS:
        assert parse_search_space(tiny_space(experiment__metric=metric), source="t").metric == metric
    for not_a_figure in ("val_n", "rmse", "test_rmse"):  # a pixel count, unprefixed, a split trials never see
        with pytest.raises(TuneAgbError, match=r"experiment\.metric: must be one of val_rmse"):
            parse_search_space(tiny_space(experiment__metric=not_a_figure), source="t")


@pytest.mark.parametrize(("liar", "multivariate", "startup"), [(True, True, 2), (False, False, 0)])
def test_tpe_options_reach_the_sampler(liar: bool, multivariate: bool, startup: int) -> None:
    """searcher.constant_liar / multivariate / n_startup_trials are the TPESampler's (its attributes in Optuna 5),
    and the sampler runs the define-by-run space with a conditional parameter and trials still running."""
    space = parse_search_space(
        tiny_space(
            searcher__constant_liar=liar, searcher__multivariate=multivariate, searcher__n_startup_trials=startup
        ),
        source="t",
    )
    sampler = space.sampler()
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert (sampler._constant_liar, sampler._multivariate, sampler._n_startup_trials) == (liar, multivariate, startup)
    study = optuna.create_study(sampler=sampler)
    running = []
    for i in range(8):
        trial = study.ask()
        space.define_by_run(trial)
        running.append(trial)
        if i % 2:  # two at a time, as with max_concurrent 2: one stays running while the next is sampled
            study.tell(running.pop(0), float(i))
    assert len(study.trials) == 8 and all(1e-3 <= t.params["lr"] <= 1e-2 for t in study.trials)
    defaults = parse_search_space(tiny_space(), source="t").settings["searcher"]
    assert (defaults["constant_liar"], defaults["multivariate"]) == (True, True)  # Optuna 5's own defaults


def test_random_searcher_is_optunas_random_sampler_with_the_seed() -> None:
    space = parse_search_space(tiny_space(searcher__type="random", searcher__seed=3), source="t")
    a, b = (optuna.create_study(sampler=space.sampler()) for _ in range(2))
    draws = []
    for study in (a, b):
        trial = study.ask()
        space.define_by_run(trial)
        draws.append(trial.params)
    assert isinstance(space.sampler(), optuna.samplers.RandomSampler) and draws[0] == draws[1]


def test_fingerprint_changes_with_the_space() -> None:
    a = parse_search_space(tiny_space(), source="a")
    b = parse_search_space(tiny_space(scheduler__max_t=5), source="b")
    assert a.fingerprint() == parse_search_space(tiny_space(), source="c").fingerprint()
    assert a.fingerprint() != b.fingerprint()


@pytest.mark.slow
def test_cli_bad_space_is_one_error_line_and_exit_2(tmp_path: Path) -> None:
    bad = write_space(tmp_path / "bad.yaml", tiny_space(params={"lr": {"type": "float", "low": "1e-5", "high": 1}}))
    proc = subprocess.run(
        [sys.executable, "-m", "tune_agb.search", "--space", str(bad), "--storage", str(tmp_path / "st")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "params.lr.low" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "st").exists()  # failed before anything was written


def test_a_space_stored_before_new_settings_compares_equal_after_reparsing() -> None:
    """--resume re-parses the space a search was started with, so settings added later (here the searcher's
    constant_liar and multivariate) compare as their defaults instead of refusing the resume."""
    space = parse_search_space(tiny_space(), source="t")
    stored = space.to_dict()
    old = {
        **stored,
        "searcher": {k: v for k, v in stored["searcher"].items() if k not in ("constant_liar", "multivariate")},
    }
    assert old != stored
    assert parse_search_space(old, source="stored").to_dict() == stored
