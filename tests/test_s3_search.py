"""Everything a search writes, on a real S3 endpoint (moto's server on localhost, named by ``AWS_ENDPOINT_URL``), used
as a user would: tiles read from ``s3://``, the search CLI with ``--storage s3://...`` killed with SIGKILL and resumed
from another folder and another cache (as on another machine), then ``final_train --experiment s3://...``. Checked
from what lands in the bucket: checkpoints (uploaded by Ray's trial processes), results.parquet, best.yaml, the
Optuna journal (loaded with Optuna), TensorBoard events (read with TensorBoard's reader straight from ``s3://``), the
report page. And the errors a user meets: a wrong bucket, a missing experiment or tile folder, wrong credentials
(moto's server with IAM authentication switched on), an endpoint that does not answer: one line, exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests import proc_helpers
from tests.search_helpers import tiny_space, write_space
from tune_agb.errors import TuneAgbError, run_cli
from tune_agb.location import read_bytes, read_table
from tune_agb.search.experiment import read_trial_rows

MAX_T = 4  # epochs of every trial (ASHA's grace period is max_t: no trial is cut, each one runs on after a resume)
NUM_SAMPLES = 3


def _space() -> dict[str, Any]:
    # Epochs of ~2 s (passes over the tiny tiles): longer than the driver takes to handle a result and copy its
    # TensorBoard run to S3, so the kill lands while a trial runs, whatever the load.
    fixed = {**tiny_space()["fixed"], "steps_per_epoch": 48}
    return tiny_space(
        fixed=fixed,
        experiment__num_samples=NUM_SAMPLES,
        experiment__max_failures=1,
        scheduler__max_t=MAX_T,
        scheduler__grace_period=MAX_T,
        scheduler__reduction_factor=2,
    )


class _Command:
    """A tune_agb command in its own process group, in folder ``cwd``, with the S3 endpoint's environment."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str], tag: str):
        self.ray_tmp = f"/tmp/rs3_{os.getpid()}_{tag}"  # short: Ray's socket paths
        self.log = cwd / f"{tag}.log"
        env = {**os.environ, **env, "RAY_TMPDIR": self.ray_tmp, "PYTHONPATH": str(Path(__file__).parents[1])}
        env.pop("RAY_ADDRESS", None)
        env.pop("RAY_AUTH_MODE", None)
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", *argv], cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )  # fmt: skip

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        """Kill what is left of this command's Ray (its process group, and processes naming its temp dir)."""
        proc_helpers.end_command(self.proc.pid, self.ray_tmp)

    def output(self) -> str:
        return self.log.read_text()


def _latest_epochs(rows: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in sorted(rows, key=lambda r: r["wall_time"]):
        out[r["trial_id"]] = int(r["epoch"])
    return out


@pytest.fixture(scope="module")
def s3_search(s3_server: Any, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """Tiles uploaded to s3://B/tiles; the search CLI started in folder a/ (cache a), killed with SIGKILL while a trial
    runs, resumed in folder b/ (cache b) to the end; then final_train --experiment s3://... in folder b/."""
    from tests.s3_server import environment

    root = tmp_path_factory.mktemp("s3search")
    with contextlib.ExitStack() as stack:
        gen = environment(s3_server)
        next(gen)
        stack.callback(next, gen, None)
        bucket = s3_server.bucket()
        tiles = f"s3://{bucket}/tiles"
        s3_server.upload_dir(tiny_data, tiles)
        storage, exp = f"s3://{bucket}/runs", f"s3://{bucket}/runs/exp"
        ns = SimpleNamespace(s3=s3_server, bucket=bucket, exp=exp, root=root)
        (root / "a").mkdir()
        (root / "b").mkdir()
        space = write_space(root / "space.yaml", _space())
        argv = ["tune_agb.search", "--space", str(space), "--storage", storage, "--name", "exp"]
        data = ["--input-dir", f"{tiles}/inputs", "--label-dir", f"{tiles}/labels"]
        ns.cache_a, ns.cache_b = root / "cache_a", root / "cache_b"

        first = _Command([*argv, *data], root / "a", {**s3_server.env, "TUNE_AGB_CACHE": str(ns.cache_a)}, "a")
        try:
            end = time.time() + 240
            while time.time() < end:
                # A trial with stored checkpoints up to epoch 1 or 2 (it runs on) whose TensorBoard run the driver has
                # already copied to S3 (the driver handles a result after the trial stored its checkpoint).
                rows = [r for r in read_trial_rows(exp) if "epoch" in r]
                on_s3 = {k.split("/")[-2] for k in s3_server.keys(f"{exp}/tensorboard") if "/events.out" in k}
                mid = [t for t, e in _latest_epochs(rows).items() if e <= 2 and t in on_s3]
                if mid:
                    break
                assert first.proc.poll() is None, f"search ended before the kill:\n{first.output()[-3000:]}"
                time.sleep(0.2)
            else:
                pytest.fail(f"no trial reached epoch 2 in 240 s:\n{first.output()[-3000:]}")
            os.kill(first.proc.pid, signal.SIGKILL)
            ns.kill_rc = first.wait()  # then its Ray processes are killed too: nothing of it runs on
            ns.killed_at = time.time()
            ns.first_output = first.output()
        finally:
            first.cleanup()
        ns.before_kill = read_trial_rows(exp)
        ns.kill_trial = mid[0]

        env_b = {**s3_server.env, "TUNE_AGB_CACHE": str(ns.cache_b)}
        second = _Command([*argv, "--resume"], root / "b", env_b, "b")
        ns.resume_rc = second.wait()
        ns.resume_output = second.output()

        final = ["tune_agb.final_train", "--experiment", exp, "--out-dir", "final", "--epochs", "2", "--no-progress"]
        third = _Command(final, root / "b", env_b, "final")
        ns.final_rc = third.wait()
        ns.final_output = third.output()
        ns.final_dir = root / "b" / "final"
        yield ns


def _after_kill(ns: SimpleNamespace) -> list[dict[str, Any]]:
    """The rows the trial running at the kill reported after it, in order."""
    rows = (r for r in read_trial_rows(ns.exp) if r["trial_id"] == ns.kill_trial and r["wall_time"] > ns.killed_at)
    return sorted(rows, key=lambda r: r["wall_time"])


@pytest.mark.slow
def test_search_on_s3_resumes_after_kill9_from_another_folder_and_cache(s3_search: SimpleNamespace) -> None:
    ns = s3_search
    assert ns.kill_rc == -signal.SIGKILL
    assert ns.resume_rc == 0, ns.resume_output[-3000:]
    assert "Traceback" not in ns.resume_output and "error:" not in ns.resume_output, ns.resume_output[-3000:]
    # The trial running at the kill went on from its checkpoint on S3 (one epoch may run again), not from epoch 1.
    last_before = max(r["epoch"] for r in ns.before_kill if r["trial_id"] == ns.kill_trial)
    after = [r["epoch"] for r in _after_kill(ns)]
    assert after and 1 < after[0] <= last_before + 1 and after[-1] == MAX_T, (last_before, after)
    # Checkpoints are in the bucket: Ray's trial processes reached the endpoint named by AWS_ENDPOINT_URL.
    keys = ns.s3.keys(ns.exp)
    assert any(k.endswith("/checkpoint.pt") and "/checkpoint_" in k for k in keys)
    # The journal and TensorBoard runs were written in cache a's mirror, then pulled into cache b's on --resume.
    for cache in (ns.cache_a, ns.cache_b):
        (mirror,) = (cache / "experiments").iterdir()
        assert (mirror / "optuna.journal").stat().st_size > 0 and (mirror / "tensorboard").is_dir()


@pytest.mark.slow
def test_results_and_best_on_s3(s3_search: SimpleNamespace) -> None:
    from tune_agb.runs import read_best

    table = read_table(f"{s3_search.exp}/results.parquet")
    assert table is not None
    df = table.to_pandas()
    assert df["trial_id"].nunique() == NUM_SAMPLES
    best = read_best(s3_search.exp)
    assert best is not None and best.trial_id in set(df["trial_id"])
    assert best.value == pytest.approx(df["val_rmse"].min())
    # Ray keeps the 2 best checkpoints of each trial; after a kill -9 the best epoch's may have been replaced (Ray
    # reuses a checkpoint folder name after a restore), then best.yaml says so (None) and final_train retrains.
    if best.checkpoint is not None:
        assert best.checkpoint.startswith(f"{s3_search.exp}/") and read_bytes(f"{best.checkpoint}/checkpoint.pt")
    assert f"results: {s3_search.exp}/results.parquet" in s3_search.resume_output


@pytest.mark.slow
def test_optuna_study_on_s3_opens_with_optuna(s3_search: SimpleNamespace, tmp_path: Path) -> None:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = tmp_path / "optuna.journal"  # as a user would copy it, to open it with optuna-dashboard
    journal.write_bytes(s3_search.s3.read(f"{s3_search.exp}/optuna.journal"))
    study = optuna.load_study(study_name="exp", storage=JournalStorage(JournalFileBackend(str(journal))))
    df = read_table(f"{s3_search.exp}/results.parquet").to_pandas()  # type: ignore[union-attr]
    done = {t.user_attrs.get("ray_trial_id"): t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert set(df["trial_id"]) <= set(done)  # every trial of the search, finished, with its Ray trial id
    for trial_id, t in done.items():
        last = df[df["trial_id"] == trial_id].sort_values("epoch").iloc[-1]
        assert t.value == pytest.approx(last["val_rmse"])  # the value it ended with (ASHA's cut or max_t)
        assert set(t.params) >= {"lr", "optimizer"}
    assert f"Optuna study: {s3_search.exp}/optuna.journal" in s3_search.resume_output


@pytest.mark.slow
def test_tensorboard_events_on_s3_read_by_tensorboard(s3_search: SimpleNamespace) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ns = s3_search
    df = read_table(f"{ns.exp}/results.parquet").to_pandas()  # type: ignore[union-attr]

    def steps(trial_id: str) -> list[int]:
        # TensorBoard reads s3:// itself (boto3 honours AWS_ENDPOINT_URL): `tensorboard --logdir s3://...` works
        acc = EventAccumulator(f"{ns.exp}/tensorboard/{trial_id}", size_guidance={"scalars": 0})
        acc.Reload()
        assert "hparams/best_val_rmse" in acc.Tags()["scalars"]
        return [e.step for e in acc.Scalars("val_rmse")]

    every = list(range(1, MAX_T + 1))
    runs = {t: steps(t) for t in sorted(set(df["trial_id"]))}
    for got in runs.values():
        # up to the last epoch, one point per epoch. Results the killed driver never handled (or handled in its last
        # second, before their copy to S3) have none: TensorBoard's runs are written by the driver.
        assert got[-1] == MAX_T and got == sorted(set(got)) and set(got) <= set(every), runs
    assert every in runs.values(), runs  # the trial started after the resume: every epoch
    # the trial cut by the kill: its run from before the kill (copied to S3 then, pulled into the other cache by
    # --resume, kept) and the epochs after the resume
    assert runs[ns.kill_trial][0] == 1, runs


@pytest.mark.slow
def test_report_page_on_s3_and_final_train_from_s3(s3_search: SimpleNamespace) -> None:
    page = s3_search.s3.read(f"{s3_search.exp}/report/index.html").decode()
    assert page.startswith("<!DOCTYPE html>") or page.lower().startswith("<!doctype html>")
    assert "exp" in page and "<img" in page
    assert f"report page: {s3_search.exp}/report/index.html" in s3_search.resume_output
    # final_train retrains the best configuration of the S3 experiment on the S3 tiles
    assert s3_search.final_rc == 0, s3_search.final_output[-3000:]

    from tune_agb.runs import read_best

    best = read_best(s3_search.exp)
    assert f"final training (best trial {best.trial_id} of {s3_search.exp}) on s3://" in s3_search.final_output
    metrics = json.loads((s3_search.final_dir / "metrics.json").read_text())
    assert metrics["input_dir"] == f"s3://{s3_search.bucket}/tiles/inputs" and metrics["epochs"] == 2
    assert (s3_search.final_dir / "report" / "index.html").is_file()


# -- errors: one line, exit code 2 --------------------------------------------------------------------------------
def _cli(main: Any, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = run_cli(main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_wrong_bucket_missing_experiment_and_tile_folders_are_one_line(
    s3: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tune_agb.final_train.cli import main as final_main
    from tune_agb.search.cli import main as search_main

    bucket = s3.bucket()
    space = str(write_space(tmp_path / "space.yaml", _space()))
    s3.upload_dir(tmp_path, f"s3://{bucket}/tiles/inputs/val")  # a tile folder without its train/ split
    local_st = ["--space", space, "--storage", str(tmp_path / "st"), "--name", "t"]
    cases = [
        (
            search_main,
            ["--space", space, "--storage", "s3://no-such-bucket-tune-agb/runs", "--name", "x"],
            "error: --storage s3://no-such-bucket-tune-agb/runs: the bucket no-such-bucket-tune-agb does not exist",
        ),
        (
            search_main,
            ["--space", space, "--storage", f"s3://{bucket}/runs", "--name", "nothere", "--resume"],
            f"error: --resume: no search to resume at s3://{bucket}/runs/nothere (check --name and --storage)",
        ),
        (
            final_main,
            ["--experiment", f"s3://{bucket}/runs/nothere", "--out-dir", str(tmp_path / "f")],
            f"error: s3://{bucket}/runs/nothere/best.yaml: cannot read the search's best.yaml (not found)",
        ),
        (
            final_main,
            ["--experiment", "s3://no-such-bucket-tune-agb/runs/x", "--out-dir", str(tmp_path / "f")],
            "the bucket no-such-bucket-tune-agb does not exist",
        ),
        (
            search_main,
            [*local_st, "--input-dir", f"s3://{bucket}/tiles/inputs", "--label-dir", f"s3://{bucket}/tiles/labels"],
            f"error: s3://{bucket}/tiles/inputs/train: split folder 'train' is missing",
        ),
        (
            search_main,
            [
                *local_st,
                "--input-dir",
                "s3://no-such-bucket-tune-agb/in",
                "--label-dir",
                "s3://no-such-bucket-tune-agb/lab",
            ],
            "error: s3://no-such-bucket-tune-agb/in/train: the bucket no-such-bucket-tune-agb does not exist",
        ),
    ]
    for main, argv, expected in cases:
        code, line = _cli(main, argv, capsys)
        assert code == 2 and expected in line, (argv, code, line)
    assert not (tmp_path / "f").exists() and not (tmp_path / "st" / "t").exists()


def test_wrong_credentials_are_one_line_naming_what_to_check(
    s3: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tune_agb.final_train.cli import main as final_main
    from tune_agb.report.cli import main as report_main
    from tune_agb.search.cli import main as search_main

    bucket = s3.bucket()
    space = str(write_space(tmp_path / "space.yaml", _space()))
    exp = f"s3://{bucket}/runs/exp"
    check = "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    with s3.credential_checks():
        code, line = _cli(search_main, ["--space", space, "--storage", f"s3://{bucket}/runs", "--name", "exp"], capsys)
        assert (code, line) == (
            2,
            f"error: --storage s3://{bucket}/runs: access denied; {check}, and the bucket's permissions",
        )
        code, line = _cli(final_main, ["--experiment", exp, "--out-dir", str(tmp_path / "f")], capsys)
        # final_train reads the search's recipe (search.yaml, its final: section) first
        assert code == 2 and f"{exp}/search.yaml: access denied; {check}" in line, line
        code, line = _cli(report_main, [exp], capsys)
        assert code == 2 and line.startswith(f"error: {exp}: access denied; {check}"), line
        tiles = ["--input-dir", f"s3://{bucket}/in", "--label-dir", f"s3://{bucket}/lab"]
        argv = ["--space", space, "--storage", str(tmp_path / "st"), "--name", "t", *tiles]
        code, line = _cli(search_main, argv, capsys)
        # a listing (GET) carries the store's own answer: the key is unknown to the server
        assert code == 2 and line.startswith(f"error: s3://{bucket}/in/train: the access key is not known"), line
        with pytest.raises(TuneAgbError, match=rf"^s3://{bucket}/x\.yaml: access denied; {check}"):
            from tune_agb.location import write_atomic

            write_atomic(f"s3://{bucket}/x.yaml", b"a: 1\n")
    assert s3.keys(f"s3://{bucket}") == []  # nothing was written


def test_an_endpoint_that_does_not_answer_is_one_line(s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(TuneAgbError) as err:
        read_bytes("s3://bucket/runs/exp/best.yaml")
    assert str(err.value) == (
        f"s3://bucket/runs/exp/best.yaml: cannot reach the S3 endpoint AWS_ENDPOINT_URL=http://127.0.0.1:{port}"
    )


def test_a_wrong_secret_and_a_key_without_permissions_are_told_apart(
    s3: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tune_agb.store import list_tiles

    bucket = s3.bucket()
    import boto3

    iam = boto3.client("iam", endpoint_url=s3.endpoint, region_name="us-east-1")
    user = f"tune-agb-{bucket}"
    iam.create_user(UserName=user)  # no policy: it may do nothing
    key = iam.create_access_key(UserName=user)["AccessKey"]
    tiles = [f"s3://{bucket}/in", f"s3://{bucket}/lab"]
    with s3.credential_checks():
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"] + "x")
        with pytest.raises(TuneAgbError, match=r"^s3://[^ ]+/in/train: the secret key does not fit the access key; "):
            list_tiles(*tiles, "train")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        with pytest.raises(TuneAgbError, match=r"^s3://[^ ]+/in/train: access denied; check AWS_ACCESS_KEY_ID"):
            list_tiles(*tiles, "train")


def test_the_mirror_of_a_remote_experiment_goes_there_and_comes_back_in_another_cache(
    s3: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import pickle

    import optuna

    from tune_agb.search import sync

    exp = f"s3://{s3.bucket()}/runs/exp"
    monkeypatch.setenv("TUNE_AGB_CACHE", str(tmp_path / "cache_a"))
    sync.clear(exp)
    storage = sync.MirroredJournalStorage(exp)
    study = optuna.create_study(study_name="exp", storage=storage)
    study.add_trial(
        optuna.trial.create_trial(
            params={"x": 1.0}, distributions={"x": optuna.distributions.FloatDistribution(0, 2)}, value=3.0
        )
    )
    mirror = sync.mirror_dir(exp)
    assert mirror.parent == tmp_path / "cache_a" / "experiments" and (mirror / "optuna.journal").is_file()
    run = mirror / "tensorboard" / "t1"
    run.mkdir(parents=True)
    (run / "events.out.tfevents.1").write_bytes(b"epoch 1\n")
    assert sorted(sync.push(exp)) == ["optuna.journal", "tensorboard/t1/events.out.tfevents.1"]
    assert sync.push(exp) == []  # unchanged: not copied again
    (run / "events.out.tfevents.1").write_bytes(b"epoch 1\nepoch 2\n")
    assert sync.push(exp) == ["tensorboard/t1/events.out.tfevents.1"]
    assert s3.read(f"{exp}/tensorboard/t1/events.out.tfevents.1") == b"epoch 1\nepoch 2\n"
    pickled = pickle.dumps(storage)
    assert str(mirror).encode() not in pickled  # it pickles as the experiment, not as this machine's folder

    # another machine (another cache): --resume pulls the files, the unpickled storage opens the same study there
    monkeypatch.setenv("TUNE_AGB_CACHE", str(tmp_path / "cache_b"))
    assert sorted(sync.pull(exp)) == ["optuna.journal", "tensorboard/t1/events.out.tfevents.1"]
    again = pickle.loads(pickled)
    assert sync.mirror_dir(exp).parent == tmp_path / "cache_b" / "experiments"
    (trial,) = optuna.load_study(study_name="exp", storage=again).trials
    assert trial.value == 3.0 and trial.params == {"x": 1.0}
    assert sync.push(exp) == []  # what was pulled is not copied back
    # a local copy that goes further than the stored one (the search stopped before its last copy) is kept
    local = sync.mirror_dir(exp) / "tensorboard" / "t1" / "events.out.tfevents.1"
    local.write_bytes(b"epoch 1\nepoch 2\nepoch 3\n")
    assert sync.pull(exp) == [] and local.read_bytes().endswith(b"epoch 3\n")
    assert sync.push(exp) == ["tensorboard/t1/events.out.tfevents.1"]
    # any other local copy is replaced by the stored one
    local.write_bytes(b"something else")
    assert sync.pull(exp) == ["tensorboard/t1/events.out.tfevents.1"] and local.read_bytes().endswith(b"epoch 3\n")
    # a new search under the same name starts without the old journal, here and there
    sync.clear(exp)
    assert not sync.mirror_dir(exp).exists()
    assert not any(k.endswith("/optuna.journal") for k in s3.keys(exp))
