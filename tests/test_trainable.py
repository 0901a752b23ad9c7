"""The function trainable on a real local Ray: per-epoch reports and checkpoints, data from the object store,
retry from the last checkpoint after a failure, divergence reported as inf."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import ray.cloudpickle
from ray import tune

from tests.search_helpers import ray_local, tiny_space  # noqa: F401 (fixture)
from tune_agb.checkpoint import load_checkpoint
from tune_agb.data import load_dataset
from tune_agb.search import make_trainable
from tune_agb.search_space import parse_search_space
from tune_agb.trainable import CHECKPOINT_FILE, finite_or_inf, search_trial, select_device

# The failure-injecting trainable below must reach the workers by value (tests/ is not on their sys.path).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

REPORTED = {"epoch", "train_loss", "lr", "val_rmse", "val_r2", "val_mae", "val_me", "val_nll", "val_rmv"}
REPORTED |= {"val_within_1sigma", "val_within_2sigma", "val_uce"}


def _rows(trial_path: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(trial_path) / "result.json").read_text().splitlines() if line]


def _fit(trainable: Any, config: dict[str, Any], storage: Path, name: str, max_failures: int = 0) -> Any:
    tuner = tune.Tuner(
        trainable,
        param_space=config,
        tune_config=tune.TuneConfig(num_samples=1),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=tune.FailureConfig(max_failures=max_failures),
            verbose=0,
        ),
    )
    return tuner.fit()


def test_reports_every_epoch_with_a_checkpoint_and_reads_no_files(
    ray_local: None,  # noqa: F811
    tiny_data: Path,
    tmp_path: Path,
) -> None:
    data = shutil.copytree(tiny_data, tmp_path / "data")
    tiles = load_dataset(data / "inputs", data / "labels", splits=("train", "val"))
    shutil.rmtree(data)  # trials must get the tiles from the object store, not from disk
    space = parse_search_space(tiny_space(scheduler__max_t=3), source="t")
    grid = _fit(make_trainable(space, tiles), {"lr": 0.003, "optimizer": "adamw"}, tmp_path / "st", "plain")
    result = grid[0]
    assert result.error is None
    rows = _rows(result.path)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r.keys() >= REPORTED
        assert all(math.isfinite(r[k]) for k in REPORTED)
    assert rows[-1]["config"] == {"lr": 0.003, "optimizer": "adamw"}
    # every kept checkpoint holds the engine's full state for the epoch it was reported with
    kept = [r for r in rows if (Path(result.path) / r["checkpoint_dir_name"]).is_dir()]
    assert kept and rows[-1] in kept  # the latest is always kept (resume needs it)
    for r in kept:
        state = load_checkpoint(Path(result.path) / r["checkpoint_dir_name"] / CHECKPOINT_FILE)
        assert state["epoch"] == r["epoch"]
        assert state["config"]["lr"] == 0.003 and state["config"]["epochs"] == 3
        assert state["history"][-1]["val_rmse"] == pytest.approx(r["val_rmse"])


def flaky_trial(config: dict[str, Any], **kwargs: Any) -> None:
    """The real trainable, made to crash once right after its 2nd epoch's report (as an out-of-memory error would:
    it cannot be provoked on this machine). A marker file makes the crash happen in the first attempt only."""
    import tune_agb.trainable as tr

    marker = Path(config["marker"])
    real_report = tr.tune.report

    def report(metrics: dict[str, Any], checkpoint: Any = None) -> None:
        real_report(metrics, checkpoint=checkpoint)
        if metrics["epoch"] == 2 and not marker.exists():
            marker.touch()
            raise RuntimeError("injected failure after epoch 2")

    tr.tune.report = report
    try:
        search_trial({k: v for k, v in config.items() if k != "marker"}, **kwargs)
    finally:
        tr.tune.report = real_report


def test_failed_trial_is_retried_from_its_last_checkpoint(
    ray_local: None,  # noqa: F811
    tiny_data: Path,
    tmp_path: Path,
) -> None:
    tiles = load_dataset(tiny_data / "inputs", tiny_data / "labels", splits=("train", "val"))
    space = parse_search_space(tiny_space(scheduler__max_t=4), source="t")
    base = space.base_config().to_dict()
    trainable = tune.with_resources(tune.with_parameters(flaky_trial, tiles=tiles, base=base, cpus=1), {"cpu": 1})
    config = {"lr": 0.003, "optimizer": "adamw", "marker": str(tmp_path / "crashed")}
    result = _fit(trainable, config, tmp_path / "st", "flaky", max_failures=1)[0]
    assert (tmp_path / "crashed").exists()
    assert result.error is None
    rows = _rows(result.path)
    epochs = [r["epoch"] for r in rows]
    # epochs 1-2 in the first process; the retry starts from the epoch-2 checkpoint, so the count goes on at 3
    assert epochs == [1, 2, 3, 4]
    assert rows[0]["pid"] == rows[1]["pid"] != rows[2]["pid"] == rows[3]["pid"]
    state = load_checkpoint(Path(result.path) / rows[-1]["checkpoint_dir_name"] / CHECKPOINT_FILE)
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3, 4]


def test_divergence_is_reported_as_inf_then_retried_then_errored(
    ray_local: None,  # noqa: F811
    tiny_data: Path,
    tmp_path: Path,
) -> None:
    tiles = load_dataset(tiny_data / "inputs", tiny_data / "labels", splits=("train", "val"))
    space = parse_search_space(
        tiny_space(scheduler__max_t=3, fixed={"base_channels": 4, "depth": 2, "grad_clip": 0.0, "loss": "mse"}),
        source="t",
    )
    config = {"lr": 1000.0, "optimizer": "sgd", "momentum": 0.9}  # blows up in the first epoch
    result = _fit(make_trainable(space, tiles), config, tmp_path / "st", "diverge", max_failures=1)[0]
    assert result.error is not None and "not finite" in str(result.error)
    text = (Path(result.path) / "result.json").read_text()
    assert "NaN" not in text  # Optuna cannot take NaN; the trainable reports inf instead
    rows = _rows(result.path)
    assert len({r["pid"] for r in rows}) == 2  # first attempt + one retry
    assert all(r["val_rmse"] == math.inf for r in rows)


def test_finite_or_inf_and_device_selection() -> None:
    assert finite_or_inf({"a": math.nan, "b": -math.inf, "c": 1.5, "d": "x"}) == {
        "a": math.inf,
        "b": math.inf,
        "c": 1.5,
        "d": "x",
    }
    assert select_device([], 0.0, cuda_available=False) == ("cpu", None)
    # Mocked GPU presence (no GPU on this machine): a quarter-GPU trial gets the first visible card, capped to 25 %.
    assert select_device(["0"], 0.25, cuda_available=True) == ("cuda:0", 0.25)
    assert select_device(["0"], 1.0, cuda_available=True) == ("cuda:0", None)
    assert select_device(["0"], 0.25, cuda_available=False) == ("cpu", None)


@pytest.mark.cuda
def test_quarter_gpu_trial_trains_on_cuda_with_bf16(tiny_data: Path, tmp_path: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import ray as _ray

    _ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, _temp_dir="/tmp/rta_gpu")
    try:
        tiles = load_dataset(tiny_data / "inputs", tiny_data / "labels", splits=("train", "val"))
        space = parse_search_space(tiny_space(scheduler__max_t=2, resources={"cpu": 1, "gpu": 0.25}), source="t")
        result = _fit(make_trainable(space, tiles), {"lr": 0.003, "optimizer": "adamw"}, tmp_path / "st", "gpu")[0]
        assert result.error is None
        state = load_checkpoint(Path(result.path) / _rows(result.path)[-1]["checkpoint_dir_name"] / CHECKPOINT_FILE)
        assert state["rng"]["cuda"]  # CUDA RNG state is only saved when the run was on a GPU
    finally:
        _ray.shutdown()
