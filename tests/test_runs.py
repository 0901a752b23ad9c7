"""tune_agb.runs: the one trial ranking, and each run-directory file written then read back (or refused in one line
naming it), through the public readers and writers on hand-built tables."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.search_helpers import tiny_space
from tune_agb.engine.calibration import Calibration
from tune_agb.errors import TuneAgbError
from tune_agb.runs import (
    BEST_FILE,
    CALIBRATION_FILE,
    CV_FOLDS_FILE,
    ENSEMBLE_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    RESULTS_FILE,
    SEARCH_FILE,
    TEST_MAPS_FILE,
    Best,
    Prediction,
    SearchRecord,
    TileMaps,
    best_of,
    load_calibration,
    rank_trials,
    read_best,
    read_ensemble,
    read_folds,
    read_metrics,
    read_predictions,
    read_results,
    read_search,
    read_space,
    read_test_maps,
    save_calibration,
    write_best,
    write_ensemble,
    write_metrics,
    write_predictions,
    write_results,
    write_search,
    write_test_maps,
)
from tune_agb.search.space import SearchSpace, parse_search_space


def space_of(mode: str = "min") -> SearchSpace:
    return parse_search_space(tiny_space(experiment__mode=mode))


def results(rows: list[tuple[str, int, object, dict]]) -> pd.DataFrame:
    """A results table from ``(trial_id, epoch, val_rmse, config)`` rows (wall_time = the row's order)."""
    recs = []
    for i, (tid, epoch, value, cfg) in enumerate(rows):
        rec = {"trial_id": tid, "epoch": epoch, "val_rmse": value, "wall_time": 1000.0 + i}
        rec |= {"checkpoint_dir_name": f"checkpoint_{epoch:06d}", "trial_path": f"/st/exp/{tid}"}
        rec |= {f"config/{k}": cfg.get(k) for k in ("lr", "optimizer", "momentum")}
        recs.append(rec)
    return pd.DataFrame(recs)


ADAM = {"lr": 0.003, "optimizer": "adamw"}
SGD = {"lr": 0.001, "optimizer": "sgd", "momentum": 0.9}
ROWS = [
    ("b", 1, 4.0, ADAM),
    ("b", 2, 2.5, ADAM),
    ("b", 3, math.nan, ADAM),  # NaN at the last epoch: ignored
    ("a", 1, 3.0, ADAM),
    ("a", 2, None, ADAM),  # None: ignored
    ("c", 1, math.inf, SGD),
    ("c", 2, 2.8, SGD),
    ("d", 1, math.inf, {"lr": 0.005, "optimizer": "adamw"}),  # diverged: no finite value
    ("d", 2, pd.NA, {"lr": 0.005, "optimizer": "adamw"}),
    ("e", 1, 2.5, SGD | {"momentum": 0.85}),  # ties b: trial id order
]


# -- ranking ----------------------------------------------------------------------------------------------------
def test_rank_min_best_epoch_ignores_missing_values_ties_by_trial_id_and_puts_unscored_last() -> None:
    ranked = rank_trials(results(ROWS), space_of("min"), experiment="/st/exp")
    assert [(t.trial_id, t.value, t.epoch) for t in ranked][:4] == [("b", 2.5, 2), ("e", 2.5, 1), ("c", 2.8, 2),
                                                                     ("a", 3.0, 1)]  # fmt: skip
    d = ranked[-1]
    assert d.trial_id == "d" and math.isnan(d.value) and d.epoch is None and d.checkpoint is None
    assert ranked[0].last_epoch == 3 and ranked[0].finished_at == 1002.0
    assert ranked[0].checkpoint == "/st/exp/b/checkpoint_000002" and ranked[0].trial_path == "/st/exp/b"
    assert ranked[0].params == ADAM  # momentum inactive for adamw: left out
    assert ranked[1].params == {"lr": 0.001, "optimizer": "sgd", "momentum": 0.85}


def test_rank_max_takes_the_highest_finite_value_of_each_trial() -> None:
    ranked = rank_trials(results(ROWS), space_of("max"))
    assert [(t.trial_id, t.value, t.epoch) for t in ranked[:4]] == [("b", 4.0, 1), ("a", 3.0, 1), ("c", 2.8, 2),
                                                                    ("e", 2.5, 1)]  # fmt: skip
    assert ranked[-1].trial_id == "d" and ranked[-1].epoch is None  # inf is missing in max mode too


def test_rank_distinct_keeps_the_best_of_each_params_set_and_names_the_others() -> None:
    ranked = rank_trials(results(ROWS), space_of("min"), distinct=True)
    assert [t.trial_id for t in ranked] == ["b", "e", "c", "d"]  # a sampled b's params: counted once, as b
    assert ranked[0].duplicates == ("a",) and all(t.duplicates == () for t in ranked[1:])


def test_rank_of_no_rows_and_a_value_outside_the_space_is_one_line() -> None:
    assert rank_trials(pd.DataFrame(), space_of()) == []
    bad = results([("a", 1, 1.0, {"lr": 0.003, "optimizer": "rmsprop"})])
    with pytest.raises(TuneAgbError, match=r"^/st/exp/results\.parquet: trial a: config/optimizer = 'rmsprop'"):
        rank_trials(bad, space_of(), experiment="/st/exp")


# -- search folder ----------------------------------------------------------------------------------------------
def test_search_record_round_trip_and_broken_ones_are_one_line(tmp_path: Path) -> None:
    exp = str(tmp_path / "st" / "exp")
    assert read_search(exp) is None
    record = SearchRecord({"params": {}}, {"seed": 3}, {"input_dir": "/i"}, space_file="/s.yaml")
    write_search(exp, record)  # creates the folder
    assert read_search(exp) == record
    for text, message in [("space: [unclosed\n", "not valid YAML"), ("- a list\n", "expected a mapping with")]:
        (tmp_path / "st" / "exp" / SEARCH_FILE).write_text(text)
        with pytest.raises(TuneAgbError, match=f"^{re.escape(exp)}/search.yaml: {message}") as err:
            read_search(exp)
        assert "\n" not in str(err.value)


def test_read_space_is_the_space_the_search_ran_with_its_overrides(tmp_path: Path) -> None:
    # the ranking metric and mode of a search started with --set are the overridden ones (the report and
    # --ensemble-top rank by them); older records' flag names (seed, num_samples) count too
    exp = str(tmp_path / "exp")
    overrides = {"experiment.mode": "max", "experiment.metric": "val_mae", "num_samples": 7, "seed": 5}
    write_search(exp, SearchRecord(tiny_space(), overrides))
    space, record = read_space(exp)
    assert (space.metric, space.mode, space.settings["experiment"]["num_samples"]) == ("val_mae", "max", 7)
    assert space.settings["searcher"]["seed"] == 5
    assert record.space == tiny_space()  # the record keeps the file's space and the overrides apart
    write_search(exp, SearchRecord(tiny_space(), {}))
    assert read_space(exp)[0].mode == "min"


def test_results_round_trip_and_mixed_config_types(tmp_path: Path) -> None:
    assert read_results(str(tmp_path)).empty  # no file yet
    df = results(ROWS[:3]).assign(**{"config/lr": [0.003, 1, "x"]})  # mixed: stored as text
    write_results(str(tmp_path), df)
    back = read_results(str(tmp_path))
    assert list(back.columns) == list(df.columns) and len(back) == 3
    assert back["config/lr"].tolist() == ["0.003", "1", "x"]
    pd.testing.assert_frame_equal(back[["trial_id", "epoch"]], df[["trial_id", "epoch"]])
    (tmp_path / RESULTS_FILE).write_bytes(b"not parquet")
    with pytest.raises(TuneAgbError, match=f"^{re.escape(str(tmp_path))}/results.parquet: not a readable parquet"):
        read_results(str(tmp_path))


def test_best_is_the_first_ranked_trial_and_round_trips(tmp_path: Path) -> None:
    space = space_of()
    best = best_of(results(ROWS), space, str(tmp_path), "/in", "/labels")
    assert best is not None and (best.trial_id, best.value, best.epoch) == ("b", 2.5, 2)  # b ties e: trial id
    assert best.config["optimizer"] == "adamw" and best.config["epochs"] == space.max_t
    assert best.data == {"input_dir": "/in", "label_dir": "/labels"} and best.cv is None
    write_best(str(tmp_path), best)
    assert read_best(str(tmp_path)) == best == read_best(f"{tmp_path}/")
    keys = list(yaml.safe_load((tmp_path / BEST_FILE).read_text()))
    assert keys == ["trial_id", "metric", "mode", "value", "epoch", "config", "checkpoint", "data"]
    assert best_of(results([("d", 1, math.inf, ADAM)]), space, str(tmp_path), "/i", "/l") is None


def test_an_old_best_yaml_with_only_a_config_reads_with_defaults(tmp_path: Path) -> None:
    (tmp_path / BEST_FILE).write_text(yaml.safe_dump({"trial_id": "b", "config": {"dropout": 0.1}}))
    best = read_best(str(tmp_path))
    assert best == Best("b", {"dropout": 0.1}, value=best.value) and math.isnan(best.value)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "best.yaml: cannot read the search's best.yaml (not found); is this a finished search?"),
        ("config: [unclosed\n", "best.yaml: not valid YAML ("),
        ("- a list\n", "best.yaml: expected a mapping with a 'config' mapping"),
        ("config: 3\n", "best.yaml: expected a mapping with a 'config' mapping"),
        ("config: {}\nepoch: two\n", "best.yaml: 'value', 'epoch' or 'data' has the wrong type"),
    ],
)
def test_best_that_cannot_be_used_is_one_line_naming_the_file(
    tmp_path: Path, content: str | None, expected: str
) -> None:
    if content is not None:
        (tmp_path / BEST_FILE).write_text(content)
    with pytest.raises(TuneAgbError) as err:
        read_best(str(tmp_path))
    assert str(err.value).startswith(f"{tmp_path}/{expected}") and "\n" not in str(err.value), str(err.value)
    if content is None:
        assert read_best(str(tmp_path), required=False) is None


def test_folds_file_missing_or_not_json(tmp_path: Path) -> None:
    assert read_folds(str(tmp_path)) is None
    (tmp_path / CV_FOLDS_FILE).write_text("{cut")
    with pytest.raises(TuneAgbError, match=f"^{re.escape(str(tmp_path))}/cv_folds.json: not valid JSON"):
        read_folds(str(tmp_path))


# -- final run folder -------------------------------------------------------------------------------------------
class _Tiles:
    """What the writers use of a TileSet: ``names`` and ``labels`` (N, H, W)."""

    def __init__(self, names: list[str], labels: np.ndarray):
        self.names, self.labels = names, labels


def test_metrics_round_trip_and_a_broken_file_is_one_line(tmp_path: Path) -> None:
    metrics = {"val_rmse": 1.5, "uncalibrated": {"val_rmse": 1.5}, "ensemble": 1}
    write_metrics(tmp_path, metrics)
    assert read_metrics(tmp_path) == metrics
    (tmp_path / METRICS_FILE).write_text("[1, 2]")
    with pytest.raises(TuneAgbError, match=re.escape("metrics.json: expected a JSON object of metrics, got list")):
        read_metrics(tmp_path)
    (tmp_path / METRICS_FILE).unlink()
    with pytest.raises(TuneAgbError, match=re.escape("metrics.json: not found")):
        read_metrics(tmp_path)


def test_predictions_round_trip_one_row_per_labelled_pixel(tmp_path: Path) -> None:
    tiles = {"val": _Tiles(["t0", "t1"], np.zeros((2, 3, 4)))}
    pred = Prediction(np.array([0, 1]), np.array([5, 11]), np.array([1.0, 2.0]), np.array([1.5, 2.5]),
                      np.array([4.0, 9.0]), {})  # fmt: skip
    raw = Prediction(pred.tile, pred.flat, pred.y, pred.mean, np.array([1.0, 1.0]), {})
    write_predictions(tmp_path, tiles, {"val": pred}, {"val": raw})
    df = read_predictions(tmp_path)
    assert df["tile"].tolist() == ["t0", "t1"] and df["row"].tolist() == [1, 2] and df["col"].tolist() == [1, 3]
    assert df["std"].tolist() == [2.0, 3.0] and df["std_uncalibrated"].tolist() == [1.0, 1.0]
    df.drop(columns="std").to_parquet(tmp_path / PREDICTIONS_FILE)
    with pytest.raises(TuneAgbError, match=re.escape("predictions.parquet: missing columns std")):
        read_predictions(tmp_path)


def test_test_maps_round_trip_and_a_cut_file_is_one_line(tmp_path: Path) -> None:
    assert read_test_maps(tmp_path) is None
    labels = np.full((3, 2, 2), np.nan, dtype=np.float32)
    labels[2, 0, 1] = 7.0
    var = np.full((2, 2), 4.0)
    pred = Prediction(*(np.zeros(0),) * 5, maps={2: (np.ones((2, 2)), var), 0: (np.zeros((2, 2)), var)})
    maps = TileMaps.of(_Tiles(["a", "b", "c"], labels), pred)
    assert maps.names == ["c", "a"] and maps.std.tolist() == [[[2.0, 2.0]] * 2] * 2
    write_test_maps(tmp_path, maps)
    back = read_test_maps(tmp_path)
    assert back.names == ["c", "a"]
    for key in ("mean", "std", "label"):
        np.testing.assert_array_equal(getattr(back, key), getattr(maps, key))
    (tmp_path / TEST_MAPS_FILE).write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(TuneAgbError, match=re.escape("test_maps.npz: not a readable .npz of names, mean, std, label")):
        read_test_maps(tmp_path)


def test_ensemble_round_trip_and_a_foreign_file_is_one_line(tmp_path: Path) -> None:
    assert read_ensemble(tmp_path) is None
    members = [{"folder": "members/member_00", "seed": 0}, {"folder": "members/member_01", "seed": 1}]
    write_ensemble(tmp_path, "seeds", members, experiment="/st/exp")
    doc = read_ensemble(tmp_path)
    assert doc == {"format": "tune_agb.ensemble/1", "kind": "seeds", "experiment": "/st/exp", "members": members}
    (tmp_path / ENSEMBLE_FILE).write_text(yaml.safe_dump(doc | {"kind": "bagged"}))
    with pytest.raises(TuneAgbError, match=re.escape("ensemble.yaml: 'kind' must be one of seeds, configs, folds")):
        read_ensemble(tmp_path)


def test_calibration_round_trip_and_missing_file(tmp_path: Path) -> None:
    cal = Calibration("scale", 1.7, split="val", n=12)
    save_calibration(cal, tmp_path / CALIBRATION_FILE)
    assert load_calibration(tmp_path / CALIBRATION_FILE) == cal
    assert sorted(p.name for p in tmp_path.iterdir()) == [CALIBRATION_FILE]
    with pytest.raises(TuneAgbError, match=re.escape("nowhere.json: calibration file not found")):
        load_calibration(tmp_path / "nowhere.json")
