"""A search submitted as a Ray job (``ray job submit -- python -m tune_agb.search ...``) runs in the cluster it is
submitted to: Ray sets ``RAY_ADDRESS`` for the job's entrypoint and the search joins that cluster. The same command
outside a job, with ``RAY_ADDRESS`` exported, still starts a private Ray (today's rule: joining is ``--address``)."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import proc_helpers
from tests.search_helpers import tiny_space, write_space
from tune_agb.runs import read_results
from tune_agb.search.launch import RAY_JOB_ENV, ray_job_address

REPO = Path(__file__).resolve().parents[1]


def test_ray_job_address_only_inside_a_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RAY_JOB_ENV, raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert ray_job_address() is None  # exported in a shell: not a job, the search starts its own Ray
    monkeypatch.setenv(RAY_JOB_ENV, '{"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_x"}}')
    assert ray_job_address() == "10.0.0.5:6379"
    monkeypatch.setenv("RAY_ADDRESS", " ")
    assert ray_job_address() is None


def test_job_with_unreachable_ray_address_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a job the address comes from RAY_ADDRESS: the one-line error says so (not --address)."""
    import ray

    from tune_agb.errors import TuneAgbError
    from tune_agb.search.launch import init_ray

    assert not ray.is_initialized()
    port = _free_port()  # closed once the probe socket is
    monkeypatch.setenv(RAY_JOB_ENV, "{}")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    for name in ("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "RAY_TUNE_CALLBACKS", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)  # init_ray sets them: put back as they were after the test
    with pytest.raises(TuneAgbError, match=rf"^RAY_ADDRESS \(set by Ray for this job\) 127.0.0.1:{port}: no Ray head"):
        init_ray(None)
    assert "RAY_AUTH_MODE" not in os.environ  # joining a cluster keeps its auth mode: nothing set


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Head:
    gcs: str  # HOST:PORT, what RAY_ADDRESS holds inside a job
    dashboard: str  # http://127.0.0.1:PORT, where jobs are submitted
    env: dict[str, str]


@pytest.fixture(scope="module")
def head_node() -> Iterator[Head]:
    """``ray start --head`` with the dashboard (the job server) on free ports, 2 CPUs, a small object store."""
    temp = f"/tmp/rjb_{os.getpid()}"  # short: unix socket paths are limited to 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    gcs_port, dash_port, agent_port, client_port = (_free_port() for _ in range(4))
    argv = ["ray", "start", "--head", f"--port={gcs_port}", f"--dashboard-port={dash_port}", "--include-dashboard=true"]
    argv += [f"--dashboard-agent-listen-port={agent_port}", f"--ray-client-server-port={client_port}"]
    argv += ["--num-cpus=2", "--num-gpus=0", f"--object-store-memory={80 * 1024**2}", f"--temp-dir={temp}"]
    started = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    try:
        yield Head(gcs=f"127.0.0.1:{gcs_port}", dashboard=f"http://127.0.0.1:{dash_port}", env=env)
    finally:
        # Not `ray stop`: it stops every Ray on the machine, other test runs' too. The Ray client server started with
        # the head is the one process whose command line names neither the temp dir nor the GCS port.
        proc_helpers.kill(proc_helpers.naming(temp) + proc_helpers.naming(f"--port={client_port} "))


def _cluster_node_ids(head: Head) -> set[str]:
    from ray.util.state import list_nodes

    return {n.node_id for n in list_nodes(address=head.dashboard)}


def _search_argv(tmp_path: Path, data: Path, name: str) -> list[str]:
    space = tiny_space(experiment__num_samples=2, experiment__max_concurrent=2, scheduler__max_t=2)
    space_file = write_space(tmp_path / f"{name}.yaml", space)
    argv = [sys.executable, "-m", "tune_agb.search", "--space", str(space_file), "--name", name]
    argv += [
        "--storage",
        str(tmp_path / "exp"),
        "--input-dir",
        str(data / "inputs"),
        "--label-dir",
        str(data / "labels"),
    ]
    return argv


@pytest.mark.slow
def test_search_submitted_as_ray_job_runs_in_that_cluster(head_node: Head, tiny_data: Path, tmp_path: Path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(head_node.dashboard)
    job = client.submit_job(
        entrypoint=shlex.join(_search_argv(tmp_path, tiny_data, "job")),
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},  # this checkout's tune_agb, in the job and its trials
    )
    deadline = time.monotonic() + 300
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, f"job {job} still {status} after 300 s"
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert job in {j.submission_id for j in client.list_jobs()}
    assert f"search: {tmp_path / 'exp' / 'job'}" in logs

    df = read_results(str(tmp_path / "exp" / "job"))
    assert df["trial_id"].nunique() == 2
    assert set(df["epoch"]) >= {1}
    # The trials ran on the cluster's node, not in a Ray the job's process started for itself.
    assert set(df["node_id"]) <= _cluster_node_ids(head_node), (set(df["node_id"]), _cluster_node_ids(head_node))


@pytest.mark.slow
def test_plain_command_with_ray_address_starts_its_own_ray(head_node: Head, tiny_data: Path, tmp_path: Path) -> None:
    env = {**head_node.env, "RAY_ADDRESS": head_node.gcs}
    env.pop(RAY_JOB_ENV, None)
    proc = subprocess.run(
        _search_argv(tmp_path, tiny_data, "plain"), env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    df = read_results(str(tmp_path / "exp" / "plain"))
    assert df["trial_id"].nunique() == 2
    assert not set(df["node_id"]) & _cluster_node_ids(head_node)  # a private Ray: not the running cluster's node
