"""The function trainable on a real local Ray: per-epoch reports and checkpoints, data from the object store,
retry from the last checkpoint after a failure, divergence reported as inf."""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import ray.cloudpickle
from ray import tune

from tests.search_helpers import ray_local, tiny_space  # noqa: F401 (fixture)
from tune_agb.engine.checkpoint import load_checkpoint
from tune_agb.search.experiment import CHECKPOINT_FILE, read_trial_rows
from tune_agb.search.launch import make_trainable
from tune_agb.search.space import parse_search_space
from tune_agb.search.trainable import finite_or_inf, search_trial, select_device
from tune_agb.store import DataSource

# The failure-injecting trainable below must reach the workers by value (tests/ is not on their sys.path).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

REPORTED = {"epoch", "train_loss", "lr", "val_rmse", "val_r2", "val_mae", "val_me", "val_nll", "val_rmv"}
REPORTED |= {"val_within_1sigma", "val_within_2sigma", "val_uce"}


def _rows(experiment: Path) -> list[dict[str, Any]]:
    """The project's own per-epoch records of an experiment's trials (not Ray's result.json: Ray copies a lagging
    version of that file back from the storage folder when a trial restarts, which drops the newest rows)."""
    return sorted(read_trial_rows(str(experiment)), key=lambda r: r["wall_time"])


class Received(tune.Callback):
    """Every result as the driver received it, in order (what the searcher and the scheduler saw)."""

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.results.append(dict(result))


def _fit(
    trainable: Any,
    config: dict[str, Any],
    storage: Path,
    name: str,
    max_failures: int = 0,
    callbacks: list[Any] | None = None,
) -> Any:
    tuner = tune.Tuner(
        trainable,
        param_space=config,
        tune_config=tune.TuneConfig(num_samples=1),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=tune.FailureConfig(max_failures=max_failures),
            callbacks=callbacks,
            verbose=0,
        ),
    )
    return tuner.fit()


@pytest.mark.slow
def test_reports_every_epoch_with_a_checkpoint_and_reads_the_packed_store(
    ray_local: None,  # noqa: F811
    tiny_data: Path,
    tmp_path: Path,
) -> None:
    data = shutil.copytree(tiny_data, tmp_path / "data")
    source = DataSource(str(data / "inputs"), str(data / "labels"), splits=("train", "val")).pinned()
    shutil.rmtree(data)  # trials open the store the driver packed on this node, not the tiles
    space = parse_search_space(tiny_space(scheduler__max_t=3), source="t")
    grid = _fit(make_trainable(space, source), {"lr": 0.003, "optimizer": "adamw"}, tmp_path / "st", "plain")
    result = grid[0]
    assert result.error is None
    rows = _rows(tmp_path / "st" / "plain")
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
    """The real trainable, made to crash once right after its ``crash_after`` epoch's report (as an out-of-memory
    error would: it cannot be provoked on this machine). A marker file makes the crash happen in the first attempt
    only. With ``lag``, the retry is handed the epoch-1 checkpoint instead of the newest one, as Ray does when its
    saved experiment state lags behind a kill -9."""
    import tune_agb.search.trainable as tr

    marker, crash_after, lag = Path(config["marker"]), config["crash_after"], config["lag"]
    real_report, real_get_checkpoint = tr.tune.report, tr.tune.get_checkpoint

    def report(metrics: dict[str, Any], checkpoint: Any = None) -> None:
        real_report(metrics, checkpoint=checkpoint)
        if metrics["epoch"] == crash_after and not marker.exists():
            marker.touch()
            raise RuntimeError(f"injected failure after epoch {crash_after}")

    def lagging_checkpoint() -> Any:
        newest = real_get_checkpoint()
        trial = Path(newest.path).parent
        first = [d for d in trial.glob("checkpoint_*") if load_checkpoint(d / CHECKPOINT_FILE)["epoch"] == 1]
        return tune.Checkpoint.from_directory(str(first[0]))

    tr.tune.report = report
    if lag and marker.exists():
        tr.tune.get_checkpoint = lagging_checkpoint
    try:
        search_trial({k: v for k, v in config.items() if k not in ("marker", "crash_after", "lag")}, **kwargs)
    finally:
        tr.tune.report, tr.tune.get_checkpoint = real_report, real_get_checkpoint


@pytest.mark.slow
@pytest.mark.parametrize(
    ("crash_after", "lag"),
    [(2, False), (2, True), (4, True)],
    ids=["retry", "retry-given-an-older-checkpoint", "finished-then-given-an-older-checkpoint"],
)
def test_failed_trial_is_retried_from_its_newest_checkpoint(
    ray_local: None,  # noqa: F811
    tiny_data: Path,
    tmp_path: Path,
    crash_after: int,
    lag: bool,
) -> None:
    source = DataSource(str(tiny_data / "inputs"), str(tiny_data / "labels"), splits=("train", "val")).pinned()
    space = parse_search_space(tiny_space(scheduler__max_t=4), source="t")
    base = space.base_config().to_dict()
    trainable = tune.with_resources(tune.with_parameters(flaky_trial, data=source, base=base, cpus=1), {"cpu": 1})
    config = {"lr": 0.003, "optimizer": "adamw", "marker": str(tmp_path / "crashed"), "crash_after": crash_after}
    result = _fit(trainable, {**config, "lag": lag}, tmp_path / "st", "flaky", max_failures=1)[0]
    assert (tmp_path / "crashed").exists()
    assert result.error is None
    # The project's own records (Ray rewrites its result.json around a retry): one row per epoch, in order.
    rows = _rows(tmp_path / "st" / "flaky")
    epochs = [r["epoch"] for r in rows]
    # epochs 1..crash_after in the first process; the retry goes on from the newest stored checkpoint, even when
    # Ray hands it an older one; a trial that had finished trains no more.
    assert epochs == [1, 2, 3, 4]
    crashed_at = (tmp_path / "crashed").stat().st_mtime
    first = [r for r in rows if r["wall_time"] <= crashed_at]
    retry = [r for r in rows if r["wall_time"] > crashed_at]
    assert [r["epoch"] for r in first] == list(range(1, crash_after + 1))
    assert [r["epoch"] for r in retry] == list(range(crash_after + 1, 5))
    assert all(r["pid"] != first[0]["pid"] for r in retry)
    state = load_checkpoint(Path(result.path) / rows[-1]["checkpoint_dir_name"] / CHECKPOINT_FILE)
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3, 4]
    # Tune's own last result is the final epoch (the finished trial re-reports its stored final row)
    assert result.metrics["epoch"] == 4 and result.metrics["val_rmse"] == pytest.approx(rows[-1]["val_rmse"])


@pytest.mark.slow
def test_divergence_is_reported_as_inf_then_retried_then_errored(
    ray_local: None,  # noqa: F811
    tiny_data: Path,
    tmp_path: Path,
) -> None:
    tiles = DataSource(str(tiny_data / "inputs"), str(tiny_data / "labels"), splits=("train", "val")).pinned()
    space = parse_search_space(
        tiny_space(scheduler__max_t=3, fixed={"base_channels": 4, "depth": 2, "grad_clip": 0.0, "loss": "mse"}),
        source="t",
    )
    config = {"lr": 1000.0, "optimizer": "sgd", "momentum": 0.9}  # blows up in the first epoch
    received = Received()
    result = _fit(
        make_trainable(space, tiles), config, tmp_path / "st", "diverge", max_failures=1, callbacks=[received]
    )[0]
    assert result.error is not None and "not finite" in str(result.error)
    text = (Path(result.path) / "result.json").read_text()
    assert "NaN" not in text  # Optuna cannot take NaN; the trainable reports inf instead
    # what the driver received (its searcher and scheduler see the same): one inf report per attempt
    assert len({r["pid"] for r in received.results}) == 2  # first attempt + one retry
    assert [r["val_rmse"] for r in received.results] == [math.inf, math.inf]


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


@pytest.mark.slow
@pytest.mark.cuda
def test_quarter_gpu_trial_trains_on_cuda_with_bf16(tiny_data: Path, tmp_path: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import ray as _ray

    _ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, _temp_dir="/tmp/rta_gpu")
    try:
        tiles = DataSource(str(tiny_data / "inputs"), str(tiny_data / "labels"), splits=("train", "val")).pinned()
        space = parse_search_space(tiny_space(scheduler__max_t=2, resources={"cpu": 1, "gpu": 0.25}), source="t")
        result = _fit(make_trainable(space, tiles), {"lr": 0.003, "optimizer": "adamw"}, tmp_path / "st", "gpu")[0]
        assert result.error is None
        state = load_checkpoint(
            Path(result.path) / _rows(tmp_path / "st" / "gpu")[-1]["checkpoint_dir_name"] / CHECKPOINT_FILE
        )
        assert state["rng"]["cuda"]  # CUDA RNG state is only saved when the run was on a GPU
        # Each epoch's peak of the trial's allocator stays within its quarter of the card.
        total_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
        peaks = [r["gpu_mem_peak_gb"] for r in _rows(tmp_path / "st" / "gpu")]
        assert peaks and all(0 < p <= 0.25 * total_gb for p in peaks)

        # A configuration that cannot fit its share (a 400 M-weight U-Net, 1.8 GB of weights, on 1 % of the card)
        # ends at once as infeasible, with the reason, instead of failing with an out-of-memory error.
        big = parse_search_space(
            tiny_space(scheduler__max_t=2, resources={"cpu": 1, "gpu": 0.01}, fixed__base_channels=1024),
            source="t",
        )
        result = _fit(make_trainable(big, tiles), {"lr": 0.003, "optimizer": "adamw"}, tmp_path / "st", "big")[0]
        assert result.error is None
        assert result.metrics["infeasible"].startswith("infeasible:") and "GPU share" in result.metrics["infeasible"]
        assert result.metrics["val_rmse"] == math.inf
    finally:
        _ray.shutdown()
