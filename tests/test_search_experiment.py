"""The experiment folder module on local temporary folders (pyarrow LocalFileSystem): the experiment's location,
the trials' stored results, the newest intact checkpoint, and its imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest

from tune_agb.engine.checkpoint import CHECKPOINT_FORMAT
from tune_agb.errors import TuneAgbError
from tune_agb.search.experiment import (
    CHECKPOINT_FILE,
    RAY_RESULT_FILE,
    RESULTS_LOG,
    SEARCH_FILE,
    Experiment,
    newest_stored_checkpoint,
    read_trial_rows,
    restore_point,
    write_checkpoint_folder,
)
from tune_agb.search.state import PLACEHOLDER_FILE, fill_pruned_checkpoints

LOCAL = pafs.LocalFileSystem()


# -- the experiment's location ---------------------------------------------------------------------------------
def test_experiment_location_and_its_storage_that_cannot_be_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert Experiment.at("st", "exp").uri == str(tmp_path.resolve() / "st" / "exp")
    assert Experiment.at("s3://bucket/st/", "exp").uri == "s3://bucket/st/exp"
    with pytest.raises(TuneAgbError) as err:
        Experiment.at("nosuchscheme://bucket/st", "exp").fs()
    msg = str(err.value)
    assert msg.startswith("--storage nosuchscheme://bucket/st: cannot open it (") and "\n" not in msg


def test_search_record_round_trip_through_the_experiment(tmp_path: Path) -> None:
    exp = Experiment.at(str(tmp_path / "st"), "exp")
    assert not exp.has_search() and exp.read_search() is None
    record = {"space_file": "/s.yaml", "space": {"params": {}}, "overrides": {"seed": 3}, "data": {"input_dir": "/i"}}
    exp.write_search(record)  # creates the experiment folder
    assert exp.has_search() and exp.read_search() == record
    (tmp_path / "st" / "exp" / SEARCH_FILE).write_text("- a list\n")
    with pytest.raises(TuneAgbError, match="expected a mapping with 'space' and 'overrides' mappings"):
        exp.read_search()


# -- the trials' stored results ---------------------------------------------------------------------------------
def _lines(path: Path, rows: list[dict[str, Any]], cut: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + cut)


def _row(trial: str, epoch: int, wall: float, **more: Any) -> dict[str, Any]:
    return {"trial_id": trial, "epoch": epoch, "wall_time": wall, "val_rmse": 10.0 - epoch, **more}


def test_trial_rows_merge_ray_results_and_checkpoint_logs_once_each(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    a = exp / "trial_a"
    # Ray's result.json lost epoch 3 (a hard kill) and ends with a line cut short; it has fields the logs lack.
    _lines(
        a / RAY_RESULT_FILE,
        [_row("a", 1, 1.0, time_total_s=5, node_id="ray"), _row("a", 2, 2.0, time_total_s=9)],
        '{"trial_',
    )
    _lines(a / "checkpoint_000000" / RESULTS_LOG, [_row("a", 1, 1.0, node_id="log"), _row("a", 2, 2.0)])
    # the newer checkpoint's log repeats epochs 1-2, adds 3, and its last line was cut short
    _lines(a / "checkpoint_000001" / RESULTS_LOG, [_row("a", 1, 1.0), _row("a", 2, 2.0), _row("a", 3, 3.0)], '{"ep')
    # epoch 2 run again after a resume (another wall_time) is a second report, not a duplicate
    b = exp / "trial_b"
    _lines(b / RAY_RESULT_FILE, [_row("b", 1, 1.5), _row("b", 2, 2.5), _row("b", 2, 4.5), {"done": True}])
    (exp / SEARCH_FILE).write_text("space: {}\n")  # files of the experiment folder are no trials

    rows = read_trial_rows(str(exp))
    got = sorted((r["trial_id"], r["epoch"], r["wall_time"]) for r in rows)
    assert got == [("a", 1, 1.0), ("a", 2, 2.0), ("a", 3, 3.0), ("b", 1, 1.5), ("b", 2, 2.5), ("b", 2, 4.5)]
    by = {(r["trial_id"], r["wall_time"]): r for r in rows}
    first = by[("a", 1.0)]
    assert (first["time_total_s"], first["node_id"]) == (5, "ray")  # Ray's row wins where both have it
    assert "time_total_s" not in by[("a", 3.0)]  # known from the checkpoint log only
    # the checkpoint folder whose log ends at the row's epoch (epoch 1 has none)
    kept = [by[("a", w)]["checkpoint_dir_name"] for w in (1.0, 2.0, 3.0)]
    assert kept == [None, "checkpoint_000000", "checkpoint_000001"]
    assert by[("b", 1.5)]["checkpoint_dir_name"] is None
    assert {r["_trial_path"] for r in rows} == {str(a), str(b)}


def test_trial_rows_point_at_the_checkpoint_of_each_epoch(tmp_path: Path) -> None:
    trial = tmp_path / "exp" / "t"
    _lines(trial / "checkpoint_000000" / RESULTS_LOG, [_row("t", 1, 1.0)])
    _lines(trial / "checkpoint_000001" / RESULTS_LOG, [_row("t", 1, 1.0), _row("t", 2, 2.0)])
    rows = {r["epoch"]: r for r in read_trial_rows(str(tmp_path / "exp"))}
    assert {e: r["checkpoint_dir_name"] for e, r in rows.items()} == {1: "checkpoint_000000", 2: "checkpoint_000001"}


def test_trial_rows_of_a_folder_not_there_yet_are_empty(tmp_path: Path) -> None:
    assert read_trial_rows(str(tmp_path / "not_yet")) == []


# -- the newest intact checkpoint -------------------------------------------------------------------------------
def _checkpoint(trial: Path, folder: str, epoch: int, log_epochs: int | None = None) -> Path:
    """A checkpoint folder of ``epoch`` whose report log reaches ``log_epochs`` (default: the same epoch)."""
    path = trial / folder
    path.mkdir(parents=True)
    state = {"format": CHECKPOINT_FORMAT, "epoch": epoch, "history": list(range(1, epoch + 1))}
    log = [_row("t", e, float(e)) for e in range(1, (log_epochs or epoch) + 1)]
    write_checkpoint_folder(path, state, log)
    return path


def test_newest_stored_checkpoint_is_chosen_by_content_skipping_incomplete_ones(tmp_path: Path) -> None:
    trial = tmp_path / "t"
    _checkpoint(trial, "checkpoint_000000", 2)
    cut = _checkpoint(trial, "checkpoint_000001", 4)  # the newest, but a kill cut its checkpoint file short
    data = (cut / CHECKPOINT_FILE).read_bytes()
    (cut / CHECKPOINT_FILE).write_bytes(data[: len(data) // 2])
    _checkpoint(trial, "checkpoint_000002", 1)  # a reused folder name holding an older epoch
    _checkpoint(trial, "checkpoint_000003", 3, log_epochs=4)  # its log is ahead of its state: not intact
    (trial / "checkpoint_000004").mkdir()  # no log at all
    state, log, path = newest_stored_checkpoint(LOCAL, str(trial))
    assert (state["epoch"], path) == (2, str(trial / "checkpoint_000000"))
    assert [r["epoch"] for r in log] == [1, 2]
    # with the cut one repaired it wins: the choice is by epoch, not by folder name
    (cut / CHECKPOINT_FILE).write_bytes(data)
    assert newest_stored_checkpoint(LOCAL, str(trial))[0]["epoch"] == 4


def test_pruned_checkpoints_get_placeholders_that_restore_passes_over(tmp_path: Path) -> None:
    """A kill between Ray pruning a checkpoint (num_to_keep) and its next state save leaves the saved state naming
    a folder that is gone; Ray's restore then fails the trial on every try. Before a resume, each pruned folder below
    a trial's newest gets a placeholder; the trial still restores from its newest intact checkpoint."""
    exp = tmp_path / "exp"
    trial = exp / "search_trial_a"
    _checkpoint(trial, "checkpoint_000001", 2)
    _checkpoint(trial, "checkpoint_000003", 4)  # 000000 and 000002 were pruned
    _checkpoint(exp / "search_trial_b", "checkpoint_000000", 1)  # nothing pruned
    (exp / "tensorboard" / "run").mkdir(parents=True)
    assert fill_pruned_checkpoints(str(exp)) == 2
    for k in (0, 2):
        assert (trial / f"checkpoint_00000{k}" / PLACEHOLDER_FILE).is_file()
    assert sorted(p.name for p in (exp / "search_trial_b").iterdir()) == ["checkpoint_000000"]
    assert sorted(p.name for p in (exp / "tensorboard").iterdir()) == ["run"]
    state, _, path = newest_stored_checkpoint(LOCAL, str(trial))
    assert (state["epoch"], path) == (4, str(trial / "checkpoint_000003"))
    assert restore_point([(LOCAL, str(trial / "nothing")), (LOCAL, str(trial))])[0]["epoch"] == 4
    assert fill_pruned_checkpoints(str(exp)) == 0  # a second resume writes nothing more


def test_restore_point_takes_the_first_folder_with_an_intact_checkpoint(tmp_path: Path) -> None:
    assert newest_stored_checkpoint(LOCAL, str(tmp_path / "nothing")) is None
    assert restore_point([]) == (None, [])
    _checkpoint(tmp_path / "ray_given", "checkpoint_000000", 1)
    _checkpoint(tmp_path / "stored", "checkpoint_000005", 3)
    state, log = restore_point([(LOCAL, str(tmp_path / "empty")), (LOCAL, str(tmp_path / "stored"))])
    assert state["epoch"] == 3 and [r["epoch"] for r in log] == [1, 2, 3]
    state, _ = restore_point([(LOCAL, str(tmp_path / "ray_given")), (LOCAL, str(tmp_path / "stored"))])
    assert state["epoch"] == 1  # the first folder that has one, in the caller's order


# -- imports ----------------------------------------------------------------------------------------------------
def test_the_experiment_module_and_the_cli_load_no_ray() -> None:
    """final_train imports the experiment module; the CLI imports Ray only once a search runs."""
    code = (
        "import sys\n"
        "import tune_agb.search.experiment\n"
        "assert not {'ray', 'torch'} & set(sys.modules), 'experiment'\n"
        "import tune_agb.search, tune_agb.search.cli, tune_agb.search.space\n"
        "assert 'ray' not in sys.modules, [m for m in sys.modules if m.startswith('ray')][:5]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
