"""TensorBoard and W&B logging of a search (tune_agb.search.logging_callbacks), driven with stand-in trials."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
from tensorboard.plugins.hparams import metadata
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from tune_agb.search.logging_callbacks import (
    TensorBoardCallback,
    WandbCallback,
    epoch_metrics,
    flat_hparams,
    wandb_mode,
)


def read_runs(logdir: Path) -> EventMultiplexer:
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    return mux


def hparams_data(mux: EventMultiplexer, run: str, tag: str) -> HParamsPluginData:
    content = mux.PluginRunToTagToContent(metadata.PLUGIN_NAME)[run][tag]
    return HParamsPluginData.FromString(content)


def result(epoch: int, rmse: float) -> dict:
    # engine metrics plus some of Ray's bookkeeping fields, which are not logged
    return {"epoch": epoch, "val_rmse": rmse, "val_r2": 0.1 * epoch, "train_loss": 2.0 / epoch, "lr": 0.01, "pid": 7}


def test_hparams_table_and_per_epoch_scalars_for_every_trial(tmp_path: Path) -> None:
    cb = TensorBoardCallback(str(tmp_path / "tb"), "val_rmse", "min")
    sgd = SimpleNamespace(trial_id="t_sgd", config={"lr": 0.01, "optimizer": "sgd", "momentum": 0.9})
    adam = SimpleNamespace(trial_id="t_adam", config={"lr": 0.002, "optimizer": "adamw"})
    for epoch, rmse in [(1, 5.0), (2, 4.0), (3, 4.5)]:
        cb.on_trial_result(epoch, [], sgd, result(epoch, rmse))
    cb.on_trial_result(1, [], adam, result(1, 6.0))
    cb.on_trial_complete(3, [], sgd)
    cb.on_trial_error(3, [], adam)
    cb.on_experiment_end([])

    mux = read_runs(tmp_path / "tb")
    assert set(mux.Runs()) == {".", "t_sgd", "t_adam"}
    exp = hparams_data(mux, ".", metadata.EXPERIMENT_TAG).experiment
    assert {h.name for h in exp.hparam_infos} == {"lr", "optimizer", "momentum"}  # the union over trials
    metrics = {m.name.tag for m in exp.metric_infos}
    assert {"val_rmse", "val_r2", "train_loss", "lr", "hparams/best_val_rmse", "epoch"} <= metrics
    assert "pid" not in metrics
    start = hparams_data(mux, "t_sgd", metadata.SESSION_START_INFO_TAG).session_start_info
    assert start.hparams["optimizer"].string_value == "sgd"
    assert start.hparams["momentum"].number_value == 0.9
    assert "momentum" not in hparams_data(mux, "t_adam", metadata.SESSION_START_INFO_TAG).session_start_info.hparams
    assert hparams_data(mux, "t_sgd", metadata.SESSION_END_INFO_TAG).session_end_info.status == 1  # success
    assert hparams_data(mux, "t_adam", metadata.SESSION_END_INFO_TAG).session_end_info.status == 2  # failure
    assert [(e.step, e.value) for e in mux.Scalars("t_sgd", "val_rmse")] == [(1, 5.0), (2, 4.0), (3, 4.5)]
    assert [e.value for e in mux.Scalars("t_sgd", "hparams/best_val_rmse")] == [5.0, 4.0, 4.0]


def test_a_resumed_trial_keeps_its_best_and_replaces_the_epochs_it_runs_again(tmp_path: Path) -> None:
    cb = TensorBoardCallback(str(tmp_path / "tb"), "val_rmse", "min")
    trial = SimpleNamespace(trial_id="t1", config={"lr": 0.01})
    for epoch, rmse in [(1, 5.0), (2, 3.0), (3, 4.0)]:
        cb.on_trial_result(epoch, [], trial, result(epoch, rmse))
    cb.on_experiment_end([])  # interrupted: the trial did not end
    restored = pickle.loads(pickle.dumps(cb))  # as Ray restores callbacks from tuner.pkl
    restored.best.clear()  # a fresh driver process knows nothing of the trial
    # the resumed trial goes on from its epoch-2 checkpoint: epoch 3 runs again
    restored.on_trial_result(3, [], trial, result(3, 3.5))
    restored.on_trial_result(4, [], trial, result(4, 2.0))
    restored.on_trial_complete(4, [], trial)

    mux = read_runs(tmp_path / "tb")
    assert [(e.step, e.value) for e in mux.Scalars("t1", "val_rmse")] == [(1, 5.0), (2, 3.0), (3, 3.5), (4, 2.0)]
    assert [e.value for e in mux.Scalars("t1", "hparams/best_val_rmse")] == [5.0, 3.0, 3.0, 2.0]


def test_flat_hparams_and_epoch_metrics() -> None:
    assert flat_hparams({"a": 1, "b": {"c": "x", "d": None}, "e": [1, 2], "f": True}) == {
        "a": 1,
        "b/c": "x",
        "e": "[1, 2]",
        "f": True,
    }
    assert epoch_metrics({"val_rmse": 1, "train_loss": 2.5, "lr": 0.1, "done": True, "pid": 3, "val_x": "s"}) == {
        "val_rmse": 1.0,
        "train_loss": 2.5,
        "lr": 0.1,
    }


def wandb_records(path: Path) -> list:
    """The records of a ``.wandb`` run file (W&B's format: a 7-byte header, then a block log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, out, buf = path.read_bytes(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4) and buf:  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def test_wandb_runs_one_per_trial_offline_with_config_and_epochs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cb = pickle.loads(pickle.dumps(WandbCallback(str(tmp_path / "exp"), group="exp")))
    sgd = SimpleNamespace(trial_id="t_sgd", config={"lr": 0.01, "optimizer": "sgd", "momentum": 0.9})
    adam = SimpleNamespace(trial_id="t_adam", config={"lr": 0.002, "optimizer": "adamw"})
    for epoch in (1, 2, 3):
        cb.on_trial_result(epoch, [], sgd, result(epoch, 5.0 - epoch))
        if epoch < 3:
            cb.on_trial_result(epoch, [], adam, result(epoch, 6.0 - epoch))
    assert set(pickle.loads(pickle.dumps(cb)).runs) == set()  # open runs are not pickled
    cb.on_trial_complete(3, [], sgd)
    cb.on_trial_error(2, [], adam)
    cb.on_experiment_end([])

    run_files = sorted((tmp_path / "exp" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 2
    runs = {}
    for path in run_files:
        records = wandb_records(path)
        (run,) = [r.run for r in records if r.HasField("run")]
        history = [{"/".join(i.nested_key) or i.key: i.value_json for i in r.history.item} for r in records]
        history = [h for h in history if "val_rmse" in h]
        (exit_,) = [r.exit for r in records if r.HasField("exit")]
        config = {i.key: i.value_json for i in run.config.update}
        runs[run.display_name] = (run.run_group, config, history, exit_.exit_code)
    group, config, history, code = runs["t_sgd"]
    assert group == "exp" and code == 0
    assert (config["lr"], config["optimizer"], config["momentum"]) == ("0.01", '"sgd"', "0.9")
    assert [(h["epoch"], float(h["val_rmse"])) for h in history] == [("1", 4.0), ("2", 3.0), ("3", 2.0)]
    assert "pid" not in history[0]
    group, config, history, code = runs["t_adam"]
    assert group == "exp" and code == 1 and "momentum" not in config and len(history) == 2
    assert not (tmp_path / "exp" / "wandb" / "settings").exists()  # no key or login written


def test_wandb_mode_is_offline_without_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"
