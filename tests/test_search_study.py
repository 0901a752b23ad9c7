"""The Optuna study of a search persists in STORAGE/NAME/optuna.journal: through Ray's pickling of the searcher
(what --resume restores), and after a real search, with every finished trial and its value (slow)."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

from tests.search_helpers import ray_local, tiny_space, write_space  # noqa: F401 (fixture)
from tune_agb.search.cli import main
from tune_agb.search.experiment import OPTUNA_JOURNAL, TENSORBOARD_DIR, Experiment
from tune_agb.search.launch import build_tuner_parts
from tune_agb.search.space import parse_search_space


def load(exp_dir: Path, name: str) -> optuna.Study:
    storage = JournalStorage(JournalFileBackend(str(exp_dir / OPTUNA_JOURNAL)))
    assert optuna.get_all_study_names(storage) == [name]  # one study, named after the experiment
    return optuna.load_study(study_name=name, storage=storage)


def test_the_searcher_ray_pickles_and_restores_keeps_writing_the_same_study(tmp_path: Path) -> None:
    space = parse_search_space(tiny_space(), source="tiny.yaml")
    exp = Experiment.at(str(tmp_path / "st"), "exp")
    tune_config, _, _ = build_tuner_parts(space, exp)
    searcher = tune_config.search_alg
    first = searcher.suggest("t1")
    searcher.on_trial_result("t1", {"val_rmse": 3.0, "training_iteration": 1})
    searcher.save(str(tmp_path / "searcher-state.pkl"))  # what Ray saves with the experiment state
    # Tuner.restore: the searcher comes back from tuner.pkl, then takes the saved state
    restored = pickle.loads(pickle.dumps(searcher))
    restored.restore(str(tmp_path / "searcher-state.pkl"))
    restored.on_trial_result("t1", {"val_rmse": 2.5, "training_iteration": 2})
    restored.on_trial_complete("t1", {"val_rmse": 2.5, "training_iteration": 2})
    restored.suggest("t2")
    restored.on_trial_complete("t2", {"val_rmse": 4.0, "training_iteration": 1})

    study = load(tmp_path / "st" / "exp", "exp")
    assert [(t.number, t.state, t.value) for t in study.trials] == [
        (0, TrialState.COMPLETE, 2.5),
        (1, TrialState.COMPLETE, 4.0),
    ]
    assert study.trials[0].intermediate_values == {1: 3.0, 2: 2.5}
    assert study.trials[0].params["lr"] == pytest.approx(first["lr"])
    assert [t.user_attrs["ray_trial_id"] for t in study.trials] == ["t1", "t2"]


def test_a_trial_that_errored_then_finished_after_a_resume_is_in_the_study_with_its_value(tmp_path: Path) -> None:
    space = parse_search_space(tiny_space(), source="tiny.yaml")
    exp = Experiment.at(str(tmp_path / "st"), "exp")
    searcher = build_tuner_parts(space, exp)[0].search_alg
    searcher.suggest("t1")
    searcher.on_trial_result("t1", {"val_rmse": 3.0, "training_iteration": 1})
    searcher.on_trial_complete("t1", None, error=True)  # Ray: ERROR (e.g. interrupted); Optuna: FAIL
    searcher.on_trial_complete("t1", {"val_rmse": 2.0, "training_iteration": 4})  # restarted by --resume, finished
    searcher.on_trial_complete("t1", {"val_rmse": 1.0, "training_iteration": 4})  # a repeat is ignored

    failed, done = load(tmp_path / "st" / "exp", "exp").trials
    assert (failed.state, done.state, done.value) == (TrialState.FAIL, TrialState.COMPLETE, 2.0)
    assert done.params == failed.params and done.intermediate_values == {1: 3.0}
    assert failed.user_attrs == done.user_attrs == {"ray_trial_id": "t1"}


def test_a_failed_start_leaves_no_study_behind(tmp_path: Path) -> None:
    space = parse_search_space(tiny_space(), source="tiny.yaml")
    exp = Experiment.at(str(tmp_path / "st"), "exp")
    build_tuner_parts(space, exp)[0].search_alg.suggest("t1")  # a start that never ran its search
    build_tuner_parts(space, exp)  # the next fresh start
    assert load(tmp_path / "st" / "exp", "exp").trials == []


@pytest.mark.slow
def test_search_stores_its_study_and_tensorboard_logs(
    ray_local: None,  # noqa: F811
    tiny_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    space = write_space(tmp_path / "tiny.yaml", tiny_space(experiment__num_samples=4))
    argv = ["--space", str(space), "--input-dir", str(tiny_data / "inputs"), "--label-dir", str(tiny_data / "labels")]
    argv += ["--storage", str(tmp_path / "st"), "--name", "exp"]
    assert main(argv) == 0
    exp_dir = tmp_path / "st" / "exp"
    out = capsys.readouterr().out
    assert f"optuna-dashboard {exp_dir}/{OPTUNA_JOURNAL}" in out
    assert f"tensorboard --logdir {exp_dir}/{TENSORBOARD_DIR}" in out

    df = pd.read_parquet(exp_dir / "results.parquet")
    last = df.sort_values("epoch").groupby("trial_id").last()
    assert len(last) == 4
    study = load(exp_dir, "exp")
    assert len(study.trials) == 4 and all(t.state == TrialState.COMPLETE for t in study.trials)
    for _, row in last.iterrows():
        # the Optuna trial with this trial's parameters holds its last reported value (ASHA-stopped ones too)
        (match,) = [t for t in study.trials if math.isclose(t.params["lr"], row["config/lr"])]
        assert match.value == pytest.approx(row["val_rmse"])
        # per-epoch values; Ray hands the searcher the result that meets the stop criterion only at completion
        assert set(match.intermediate_values) in ({*range(1, row["epoch"])}, {*range(1, row["epoch"] + 1)})

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(exp_dir / TENSORBOARD_DIR))
    mux.Reload()
    hparams_runs = mux.PluginRunToTagToContent("hparams")
    assert "_hparams_/experiment" in hparams_runs["."]
    for trial_id, g in df.groupby("trial_id"):
        assert {"_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(hparams_runs[trial_id])
        logged = mux.Scalars(trial_id, "val_rmse")
        assert [e.step for e in logged] == list(g.sort_values("epoch")["epoch"])
        assert [e.value for e in logged] == pytest.approx(list(g.sort_values("epoch")["val_rmse"]), rel=1e-6)

    # --resume of the finished search: the same single study, no trial added or changed
    assert main([*argv, "--resume"]) == 0
    again = load(exp_dir, "exp")
    assert [(t.number, t.state, t.value) for t in again.trials] == [(t.number, t.state, t.value) for t in study.trials]


def test_the_dashboard_opens_the_journal(tmp_path: Path) -> None:
    # optional: optuna-dashboard is not a dependency of the project (skipped where it is not installed)
    optuna_dashboard = pytest.importorskip("optuna_dashboard")
    get_storage = pytest.importorskip("optuna_dashboard._storage_url").get_storage  # what `optuna-dashboard PATH` does
    import io
    import json
    import sys

    path = tmp_path / OPTUNA_JOURNAL
    storage = JournalStorage(JournalFileBackend(str(path)))
    optuna.create_study(storage=storage, study_name="exp").optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    app = optuna_dashboard.wsgi(get_storage(str(path)))
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": "/api/studies", "QUERY_STRING": "", "wsgi.input": io.BytesIO()}
    env |= {"wsgi.errors": sys.stderr, "wsgi.url_scheme": "http", "SERVER_NAME": "x", "SERVER_PORT": "80"}
    status = []
    body = b"".join(app(env, lambda s, h, exc_info=None: status.append(s)))
    assert status == ["200 OK"]
    assert [s["study_name"] for s in json.loads(body)["study_summaries"]] == ["exp"]
