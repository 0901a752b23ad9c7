"""--resume after a hard kill (kill -9) and after Ctrl-C (SIGINT) of the real CLI in a subprocess, checked from the
files the search leaves: finished trials are not re-run, running trials continue from their checkpoint, the total
stays num_samples, ASHA's rungs are rebuilt; and --resume with another space file fails with one line."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
import yaml

from tests import proc_helpers
from tests.search_helpers import tiny_space, write_space
from tune_agb.demo_data import write_demo_dataset
from tune_agb.errors import TuneAgbError
from tune_agb.search.experiment import read_trial_rows
from tune_agb.search.state import repair_experiment_state

pytestmark = pytest.mark.slow  # every test here reads one search run through the CLI with two interruptions

MAX_T = 40
GRACE = 20  # rungs at 20 and 40 epochs: a trial whose last epoch is 3 to 19 is certainly still running
# The interrupt comes when a trial has just reported epoch 3 to 9, and that trial must still be mid-run (epoch 19 at
# most) once the search has stopped. With one epoch in each window (a tenth of a second on 32 px tiles) both missed
# about one run in ten: the poller did not see a resumed search's last trials go through epoch 3, or Ray's stop on
# SIGINT came after the trial had passed the first rung. Tiles of 64 px and these windows give seconds for each.
# (A third cause: the killed search's Ray workers, left running, reported epochs after the resume had started;
# proc_helpers.end_command now ends them too.)
TRIGGER = range(3, 10)
MID_RUN = range(3, GRACE)
NUM_SAMPLES = 5


def _space() -> dict[str, Any]:
    return tiny_space(
        experiment__num_samples=NUM_SAMPLES,
        experiment__max_failures=1,
        scheduler__max_t=MAX_T,
        scheduler__grace_period=GRACE,
        scheduler__reduction_factor=2,
    )


class Search:
    """The search CLI in its own process group, with its own short Ray temp dir."""

    def __init__(self, root: Path, data: Path, space: Path, resume: bool, tag: str):
        self.ray_tmp = f"/tmp/rtr_{os.getpid()}_{tag}"
        self.log = root / f"{tag}.log"
        argv = [sys.executable, "-m", "tune_agb.search", "--space", str(space), "--storage", str(root / "st")]
        argv += ["--name", "exp", "--input-dir", str(data / "inputs"), "--label-dir", str(data / "labels")]
        argv += ["--resume"] if resume else []
        env = {**os.environ, "RAY_TMPDIR": self.ray_tmp}
        env.pop("RAY_ADDRESS", None)
        env.pop("RAY_AUTH_MODE", None)  # as in a user's shell (a Ray started in this process sets it)
        self.started = time.time()
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        """Kill what is left of this search's Ray (its process group, and processes naming its temp dir)."""
        if self.proc.poll() is None:
            self.proc.wait(timeout=60)
        proc_helpers.end_command(self.proc.pid, self.ray_tmp)

    def output(self) -> str:
        return self.log.read_text()


def _wait_until(cond: Callable[[], Any], search: Search, timeout: float = 240) -> Any:
    end = time.time() + timeout
    while time.time() < end:
        got = cond()
        if got:
            return got
        if search.proc.poll() is not None:
            pytest.fail(f"search ended before the interrupt point:\n{search.output()[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"interrupt point not reached in {timeout}s:\n{search.output()[-3000:]}")


def _latest(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: r["wall_time"]):
        out[r["trial_id"]] = r
    return out


def _running_point(exp: Path, after: float) -> Callable[[], Any]:
    """>= 2 trials have reported, and one of them last reported an epoch in TRIGGER (after ``after``): it is
    mid-run, and Ray has saved the experiment state with one of its checkpoints (it does so after every 2
    checkpoints of a trial)."""

    def cond() -> Any:
        rows = [r for r in read_trial_rows(str(exp)) if "epoch" in r]
        latest = _latest(rows)
        mid = [t for t, r in latest.items() if r["epoch"] in TRIGGER and r["wall_time"] > after]
        return (rows, mid[0]) if len(latest) >= 2 and mid else None

    return cond


def _mid_run(rows: list[dict[str, Any]], after: float) -> str:
    """A trial that was certainly running when the search stopped: its last epoch is in MID_RUN (before ASHA's
    first rung)."""
    mid = [t for t, r in _latest(rows).items() if r["epoch"] in MID_RUN and r["wall_time"] > after]
    assert mid, "no trial was mid-run at the interrupt (it came too late to test continuation)"
    return mid[0]


def _check_interrupted_trial_went_on(
    exp: Path, before: list[dict[str, Any]], trial: str, since: float, until: float = float("inf")
) -> None:
    """The trial running at the interrupt continued from its checkpoint: the epoch count went on."""
    rows = read_trial_rows(str(exp))
    last_before = max(r["epoch"] for r in before if r["trial_id"] == trial)
    after = sorted(
        (r for r in rows if r["trial_id"] == trial and since < r["wall_time"] < until), key=lambda r: r["wall_time"]
    )
    assert after, f"trial {trial} did not continue after the resume"
    # One epoch may run twice (its checkpoint was newer than the saved experiment state), never a restart at 1.
    assert 1 < after[0]["epoch"] <= last_before + 1, (after[0]["epoch"], last_before)
    assert [r["epoch"] for r in after] == list(range(after[0]["epoch"], after[0]["epoch"] + len(after)))


@pytest.fixture(scope="module")
def slow_tiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny data's grid with 64 px tiles: epochs slow enough for the interrupt windows above."""
    return write_demo_dataset(tmp_path_factory.mktemp("slow") / "demo", tile=64, grid=(4, 4), seed=3)


@pytest.fixture(scope="module")
def interrupted_twice(slow_tiles: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """start -> kill -9 -> --resume -> SIGINT -> --resume to the end, on one experiment."""
    root = tmp_path_factory.mktemp("resume")
    space = write_space(root / "space.yaml", _space())
    exp = root / "st" / "exp"
    ns = SimpleNamespace(root=root, space=space, exp=exp, data=slow_tiles)

    first = Search(root, slow_tiles, space, resume=False, tag="a")
    try:
        ns.before_kill, ns.kill_trial = _wait_until(_running_point(exp, 0.0), first)
        ns.killed_at = time.time()
        os.kill(first.proc.pid, signal.SIGKILL)
        ns.kill_rc = first.wait()
        ns.before_kill = read_trial_rows(str(exp))  # all that reached the disk
        ns.kill_trial = _mid_run(ns.before_kill, 0.0)
    finally:
        first.cleanup()

    second = Search(root, slow_tiles, space, resume=True, tag="b")
    try:
        ns.resumed_at = second.started
        mid_run = _running_point(exp, second.started)

        def killed_trial_went_on_and_another_is_mid_run() -> Any:
            # Interrupt only once the killed trial has reported after the resume, so that its continuation is
            # checked in this run (it may otherwise be scheduled after the trial that triggers the SIGINT).
            got = mid_run()
            if got and any(r["trial_id"] == ns.kill_trial and r["wall_time"] > second.started for r in got[0]):
                return got
            return None

        ns.before_int, ns.int_trial = _wait_until(killed_trial_went_on_and_another_is_mid_run, second)
        ns.int_at = time.time()
        second.proc.send_signal(signal.SIGINT)
        ns.int_rc = second.wait()
        ns.int_output = second.output()
        ns.before_int = read_trial_rows(str(exp))
        ns.int_trial = _mid_run(ns.before_int, second.started)
    finally:
        second.cleanup()

    third = Search(root, slow_tiles, space, resume=True, tag="c")
    ns.third_started = third.started
    ns.final_rc = third.wait()
    ns.final_output = third.output()
    yield ns


def test_kill9_then_resume_keeps_finished_trials_and_continues_running_ones(interrupted_twice: SimpleNamespace) -> None:
    ns = interrupted_twice
    assert ns.kill_rc == -signal.SIGKILL
    finished = [t for t, r in _latest(ns.before_kill).items() if r["epoch"] == MAX_T]
    rows = read_trial_rows(str(ns.exp))
    for t in finished:  # finished trials are kept and not re-run
        assert not [r for r in rows if r["trial_id"] == t and r["wall_time"] > ns.killed_at]
    _check_interrupted_trial_went_on(ns.exp, ns.before_kill, ns.kill_trial, ns.killed_at, ns.int_at)


def test_sigint_saves_and_resume_continues(interrupted_twice: SimpleNamespace) -> None:
    ns = interrupted_twice
    assert ns.int_rc == 130, ns.int_output[-3000:]
    assert "search interrupted" in ns.int_output and "--resume" in ns.int_output
    # ASHA's rungs were rebuilt from what the killed search had reported
    rebuilt = [line for line in ns.int_output.splitlines() if line.startswith("ASHA: rungs rebuilt from")]
    assert rebuilt and int(rebuilt[0].split()[4]) >= len([r for r in ns.before_kill if "epoch" in r])
    _check_interrupted_trial_went_on(ns.exp, ns.before_int, ns.int_trial, ns.third_started - 0.001)


def test_resumed_search_ends_with_num_samples_trials_and_complete_results(interrupted_twice: SimpleNamespace) -> None:
    ns = interrupted_twice
    assert ns.final_rc == 0, ns.final_output[-3000:]
    df = pd.read_parquet(ns.exp / "results.parquet")
    assert df["trial_id"].nunique() == NUM_SAMPLES  # the total stays num_samples
    for _, g in df.groupby("trial_id"):
        assert list(g["epoch"]) == list(range(1, len(g) + 1))  # no gaps; a repeated epoch appears once
    best = yaml.safe_load((ns.exp / "best.yaml").read_text())
    assert best["value"] == pytest.approx(df["val_rmse"].min())
    assert "python -m tune_agb.final_train --experiment" in ns.final_output
    # Ray's own lines that were wrong for a user: the token warning of a private Ray, the /tmp/ray TensorBoard hint
    assert "Token authentication" not in ns.final_output and "RAY_AUTH_MODE" not in ns.final_output
    assert "To visualize your results with TensorBoard" not in ns.final_output


def test_resume_with_another_space_file_fails_with_one_line(interrupted_twice: SimpleNamespace) -> None:
    ns = interrupted_twice
    other = write_space(
        ns.root / "other.yaml", {**_space(), "scheduler": {**_space()["scheduler"], "max_t": MAX_T - 1}}
    )
    argv = [sys.executable, "-m", "tune_agb.search", "--space", str(other), "--storage", str(ns.root / "st")]
    proc = subprocess.run([*argv, "--name", "exp", "--resume"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "differs from the space" in proc.stderr and "scheduler.max_t" in proc.stderr


def test_a_searcher_state_cut_by_a_kill_is_restored_from_its_backup(interrupted_twice: SimpleNamespace) -> None:
    ns = interrupted_twice
    state = sorted(ns.exp.glob("searcher-state-*.pkl"), key=lambda p: p.stat().st_mtime)[-1]
    good = state.read_bytes()
    state.write_bytes(good[: len(good) // 2])  # what a kill during Ray's copy into the storage folder leaves
    assert repair_experiment_state(str(ns.exp)) == [state.name]
    assert state.read_bytes() == good
    pickle.loads(state.read_bytes())
    # without an intact backup: one clear line, nothing overwritten
    state.write_bytes(good[:10])
    backup = state.with_name(state.name + ".bak")
    backup.write_bytes(good[:10])
    with pytest.raises(TuneAgbError, match="cut short"):
        repair_experiment_state(str(ns.exp))
    state.write_bytes(good)
    backup.write_bytes(good)
