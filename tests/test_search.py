"""The search end to end on a real local Ray (in-process CLI; slow), its results files, the resource checks, and ASHA's
rung rebuild (the same rungs and decisions as a scheduler that saw the results live)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from ray.tune.schedulers import TrialScheduler

from tests.search_helpers import ray_local, tiny_space, write_space  # noqa: F401 (fixture)
from tune_agb.engine.checkpoint import load_checkpoint
from tune_agb.engine.config import config_from_dict
from tune_agb.errors import TuneAgbError
from tune_agb.search import ray_internals
from tune_agb.search.asha import ResumableASHA
from tune_agb.search.cli import main
from tune_agb.search.launch import check_cluster_resources, unfinished_trials
from tune_agb.search.space import parse_search_space


@pytest.fixture(scope="module")
def finished_search(
    ray_local: None,  # noqa: F811
    tiny_data: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> SimpleNamespace:
    """One small search (6 trials, ASHA rungs at 1 and 2 of 4 epochs) run through the CLI's main()."""
    tmp = tmp_path_factory.mktemp("search")
    space = write_space(tmp / "tiny.yaml", tiny_space(experiment__num_samples=6))
    argv = ["--space", str(space), "--input-dir", str(tiny_data / "inputs"), "--label-dir", str(tiny_data / "labels")]
    argv += ["--storage", str(tmp / "st"), "--name", "exp"]
    return SimpleNamespace(argv=argv, exp=tmp / "st" / "exp", code=main(argv), data=tiny_data)


@pytest.mark.slow
def test_search_writes_results_with_one_row_per_trial_and_epoch(
    finished_search: SimpleNamespace, capsys: pytest.CaptureFixture
) -> None:
    assert finished_search.code == 0
    df = pd.read_parquet(finished_search.exp / "results.parquet")
    assert df["trial_id"].nunique() == 6  # num_samples
    assert not df.duplicated(["trial_id", "epoch"]).any()
    for _, g in df.groupby("trial_id"):
        assert list(g["epoch"]) == list(range(1, len(g) + 1))
    assert df["epoch"].max() == 4  # max_t
    # ASHA stopped some trials early (rungs at 1 and 2 epochs, reduction factor 2)
    assert (df.groupby("trial_id")["epoch"].max() < 4).any()
    assert {"config/lr", "config/optimizer", "config/momentum", "val_rmse", "val_r2", "val_nll"} <= set(df.columns)
    # momentum is conditional: present exactly for the sgd trials
    assert (df["config/momentum"].notna() == (df["config/optimizer"] == "sgd")).all()
    assert df["val_rmse"].map(math.isfinite).all()


@pytest.mark.slow
def test_best_yaml_is_the_best_epoch_over_all_trials_with_a_loadable_checkpoint(
    finished_search: SimpleNamespace,
) -> None:
    df = pd.read_parquet(finished_search.exp / "results.parquet")
    best = yaml.safe_load((finished_search.exp / "best.yaml").read_text())
    assert {"trial_id", "metric", "mode", "value", "epoch", "config", "checkpoint", "data"} <= best.keys()
    row = df.loc[df["val_rmse"].idxmin()]
    assert (best["trial_id"], best["epoch"]) == (row["trial_id"], row["epoch"])
    assert best["value"] == pytest.approx(row["val_rmse"])
    cfg = config_from_dict(best["config"], source="best.yaml")
    assert cfg.epochs == 4 and cfg.base_channels == 4 and cfg.lr == pytest.approx(row["config/lr"])
    assert Path(best["checkpoint"]).is_absolute()
    state = load_checkpoint(Path(best["checkpoint"]) / "checkpoint.pt")
    assert state["epoch"] == best["epoch"]
    assert state["config"] == best["config"]
    assert best["data"] == {
        "input_dir": str((finished_search.data / "inputs").resolve()),
        "label_dir": str((finished_search.data / "labels").resolve()),
    }


@pytest.mark.slow
def test_summary_prints_the_best_trials_and_the_final_train_command(
    ray_local: None,  # noqa: F811
    finished_search: SimpleNamespace,
    capsys: pytest.CaptureFixture,
) -> None:
    # The fixture's output went to an earlier capture; rerunning would need a new name, so check the printer
    # through --resume of the finished search (nothing left to run: no trial is re-run).
    df_before = pd.read_parquet(finished_search.exp / "results.parquet")
    assert main([*finished_search.argv, "--resume"]) == 0
    out = capsys.readouterr().out
    best = yaml.safe_load((finished_search.exp / "best.yaml").read_text())
    assert f"python -m tune_agb.final_train --experiment {finished_search.exp} --out-dir" in out
    assert best["trial_id"] in out.split("best trials by val_rmse")[1]
    df_after = pd.read_parquet(finished_search.exp / "results.parquet")
    pd.testing.assert_frame_equal(df_before, df_after)  # finished trials were not re-run


@pytest.mark.slow
def test_trials_keep_rays_json_and_csv_logs_but_not_its_tensorboard_events(finished_search: SimpleNamespace) -> None:
    trial_dirs = [p for p in finished_search.exp.iterdir() if (p / "params.json").exists()]
    assert len(trial_dirs) == 6
    for trial in trial_dirs:
        assert (trial / "result.json").stat().st_size > 0 and (trial / "progress.csv").exists()
        assert not list(trial.glob("events.out.tfevents*"))  # tune_agb's own runs are in STORAGE/NAME/tensorboard
    assert list((finished_search.exp / "tensorboard").rglob("events.out.tfevents*"))


@pytest.mark.slow
def test_existing_experiment_and_missing_resume_fail_clearly(finished_search: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(TuneAgbError, match="a search already exists there"):
        main(finished_search.argv)
    argv = [*finished_search.argv, "--resume", "--name", "nothing_here"]
    with pytest.raises(TuneAgbError, match=r"--resume: no search to resume at .*nothing_here"):
        main(argv)


@pytest.mark.slow
def test_gpus_asked_for_on_a_cluster_without_gpus_fails_before_the_search(
    ray_local: None,  # noqa: F811
    tiny_data: Path,
    tmp_path: Path,
) -> None:
    space = write_space(tmp_path / "gpu.yaml", tiny_space(resources={"cpu": 1, "gpu": 0.25}))
    argv = ["--space", str(space), "--storage", str(tmp_path / "st")]
    argv += ["--input-dir", str(tiny_data / "inputs"), "--label-dir", str(tiny_data / "labels")]
    with pytest.raises(TuneAgbError, match=r"resources\.gpu=0\.25 per trial, but the Ray cluster has no GPU"):
        main(argv)
    assert not (tmp_path / "st" / "gpu" / "tuner.pkl").exists()


def test_cluster_resource_check_accepts_fractions_of_present_gpus() -> None:
    space = parse_search_space(tiny_space(resources={"cpu": 1, "gpu": 0.25}), source="t")
    # Mocked cluster resources (no GPU on this machine): one GPU fits four 0.25-GPU trials.
    check_cluster_resources(space, {"CPU": 16.0, "GPU": 1.0})
    with pytest.raises(TuneAgbError, match="no GPU"):
        check_cluster_resources(space, {"CPU": 16.0})
    cpu_space = parse_search_space(tiny_space(resources={"cpu": 4, "gpu": 0}), source="t")
    with pytest.raises(TuneAgbError, match="only 2 CPUs"):
        check_cluster_resources(cpu_space, {"CPU": 2.0})


def _asha(brackets: int = 1) -> ResumableASHA:
    s = ResumableASHA("/nonexistent", max_t=9, grace_period=1, reduction_factor=3, brackets=brackets)
    s.set_search_properties("val_rmse", "min")
    s.rebuilt = True  # no files to read in this unit test
    return s


@pytest.mark.parametrize("brackets", [1, 2])
def test_asha_rungs_rebuilt_from_results_match_the_live_scheduler(brackets: int) -> None:
    # A deterministic stream of results from 8 trials, interleaved as a search would report them.
    values = {f"t{i}": 10.0 + ((i * 37) % 11) for i in range(12)}
    live = _asha(brackets)
    trials = {tid: SimpleNamespace(trial_id=tid) for tid in values}
    for t in trials.values():
        live.on_trial_add(None, t)
    stopped: set[str] = set()
    rows, decisions_after, live_after = [], [], []
    clock = 0.0
    for epoch in range(1, 10):
        for tid, v in values.items():
            if tid in stopped:
                continue
            clock += 1.0
            result = {"trial_id": tid, "epoch": epoch, "val_rmse": v - 0.1 * epoch, "wall_time": clock}
            if clock <= 10:  # the search is interrupted after 10 results ...
                rows.append(result)
                action = live.on_trial_result(None, trials[tid], result)
            else:  # ... and these decisions must be the same after a resume
                decisions_after.append(result)
                action = live.on_trial_result(None, trials[tid], result)
                live_after.append(action)
            if action == TrialScheduler.STOP:  # what Ray's controller does with a STOP
                live.on_trial_complete(None, trials[tid], result)
                stopped.add(tid)
            if clock == 10:
                snapshot = live.rung_records()

    restored = _asha(brackets)
    assert restored.rebuild(list(reversed(rows))) == 10  # order on disk does not matter: sorted by wall_time
    assert restored.rung_records() == snapshot
    for t in trials.values():
        restored.on_trial_add(None, t)
    # the rest of the stream: every decision equals the one the uninterrupted scheduler made
    assert [_decide(restored, trials, r) for r in decisions_after] == live_after
    # while an empty scheduler (what Ray's own restore gives) decides differently for this stream
    empty = _asha(brackets)
    for t in trials.values():
        empty.on_trial_add(None, t)
    assert [_decide(empty, trials, r) for r in decisions_after] != live_after


@pytest.mark.parametrize("brackets", [1, 2])
def test_a_trial_cut_by_a_rung_stays_cut_when_a_lagging_state_runs_it_again(brackets: int) -> None:
    # Ray's saved state can lag behind a kill -9: a trial that a rung stopped comes back as running, resumes from its
    # newest checkpoint and reports the next epoch. Its rung already holds its record, so plain ASHA lets it pass.
    values = {f"t{i}": 10.0 + ((i * 37) % 11) for i in range(8)}
    live = _asha(brackets)
    trials = {tid: SimpleNamespace(trial_id=tid) for tid in values}
    rows, cut, clock = [], {}, 0.0
    for t in trials.values():
        live.on_trial_add(None, t)
    for epoch in (1, 2):
        for tid, v in values.items():
            if tid in cut:
                continue
            clock += 1.0
            rows.append({"trial_id": tid, "epoch": epoch, "val_rmse": v, "wall_time": clock})
            if _decide(live, trials, rows[-1]) == TrialScheduler.STOP:
                cut[tid] = epoch
    assert cut and len(cut) < len(values)
    restored = _asha(brackets)
    restored.rebuild(rows)
    for t in trials.values():
        restored.on_trial_add(None, t)
    again = {tid: {"trial_id": tid, "epoch": e + 1, "val_rmse": 0.0, "wall_time": clock + 1} for tid, e in cut.items()}
    assert {tid: restored.on_trial_result(None, trials[tid], r) for tid, r in again.items()} == dict.fromkeys(
        cut, TrialScheduler.STOP
    )
    # without the stop records (what the rungs alone give) the same results would pass
    restored.stopped_at = {}
    assert set(restored.on_trial_result(None, trials[tid], r) for tid, r in again.items()) == {TrialScheduler.CONTINUE}


def _decide(s: ResumableASHA, trials: dict, result: dict) -> str:
    if ray_internals.assigned_bracket(s, result["trial_id"]) is None:  # stopped earlier than by the live scheduler
        s.on_trial_add(None, trials[result["trial_id"]])
    action = s.on_trial_result(None, trials[result["trial_id"]], result)
    if action == TrialScheduler.STOP:
        s.on_trial_complete(None, trials[result["trial_id"]], result)
    return action


def test_unreachable_address_fails_in_seconds_with_one_line() -> None:
    """Ray itself retries an unreachable head for minutes; the search checks HOST:PORT first."""
    import socket

    from tune_agb.search.launch import check_reachable

    with socket.socket() as s:  # a port that is certainly closed: bind, then close before connecting
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TuneAgbError, match=rf"--address 127.0.0.1:{port}: no Ray head node answers there"):
        check_reachable(f"127.0.0.1:{port}", timeout_s=2)
    with pytest.raises(TuneAgbError, match="expected auto or HOST:PORT"):
        check_reachable("headnode")


class _Grid:
    """What unfinished_trials reads of a ResultGrid (its public API): len, num_terminated, num_errors."""

    def __init__(self, statuses: list[str]):
        self.statuses = statuses

    def __len__(self) -> int:
        return len(self.statuses)

    @property
    def num_terminated(self) -> int:
        return self.statuses.count("TERMINATED")

    @property
    def num_errors(self) -> int:
        return self.statuses.count("ERROR")


def test_unfinished_trials_counts_open_and_missing_trials() -> None:
    space = parse_search_space(tiny_space(experiment__num_samples=4), source="t")
    assert unfinished_trials(_Grid(["TERMINATED", "ERROR", "RUNNING", "PENDING"]), space) == "2 trial(s) not finished"
    assert unfinished_trials(_Grid(["TERMINATED", "ERROR", "TERMINATED"]), space) == "3 of 4 trials started"
    assert unfinished_trials(_Grid(["TERMINATED", "ERROR", "TERMINATED", "TERMINATED"]), space) == ""
    budget = parse_search_space(tiny_space(experiment__num_samples=4, experiment__time_budget_s=60), source="t")
    assert unfinished_trials(_Grid(["TERMINATED"]), budget) == ""  # the time budget ended the search: complete
