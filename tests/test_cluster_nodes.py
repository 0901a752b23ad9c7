"""A worker node lost in the middle of a search: a three-node Ray cluster on this machine
(``ray.cluster_utils.Cluster``: a head with no CPUs, so trials run on the two one-CPU workers), one local folder as
the shared storage. The node running a trial is killed (no graceful shutdown) after the trial stored a checkpoint;
the search still ends with every trial complete, the interrupted trial goes on from its newest stored checkpoint on
the surviving node, and results.parquet shows the node change, with each epoch reported once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import proc_helpers
from tests.search_helpers import tiny_space, write_space
from tune_agb.demo_data import write_demo_dataset
from tune_agb.runs import read_results
from tune_agb.search.experiment import read_trial_rows

EPOCHS = 30  # ~0.1 s each on the 96 px tiles: the kill after epoch 2 has seconds to land
OBJECT_STORE = 80 * 1024**2  # small: 2 CPU cores and little memory are shared with other test runs


@pytest.fixture(scope="module")
def slow_tiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo tiles of 96 px (the shared tiny ones train in ~0.05 s an epoch): epochs long enough that the kill lands
    in the middle of a trial."""
    return write_demo_dataset(tmp_path_factory.mktemp("tiles") / "demo", tile=96, grid=(4, 4), seed=3)


@pytest.fixture()
def three_nodes() -> Iterator[object]:
    """A head node without CPUs (it runs the search's driver only) and two worker nodes with one CPU each."""
    from ray.cluster_utils import Cluster

    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = f"/tmp/rtn_{os.getpid()}"  # short: unix socket paths are limited to 107 bytes
    # A lost raylet is noticed by the GCS health check: every 1 s, dead after 3 misses (Ray's default is ~15 s).
    fast_health = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    head = {"num_cpus": 0, "num_gpus": 0, "include_dashboard": False, "object_store_memory": OBJECT_STORE}
    cluster = Cluster(initialize_head=True, head_node_args={**head, "_system_config": fast_health})
    for _ in range(2):
        cluster.add_node(num_cpus=1, num_gpus=0, object_store_memory=OBJECT_STORE)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        cluster.shutdown()
        if old is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old


def _wait_for_checkpoint(exp: Path, proc: subprocess.Popen, min_epoch: int, timeout_s: float) -> dict:
    """The newest stored row of the first trial with a checkpoint of epoch ``min_epoch`` or later."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the search ended before any trial stored a checkpoint"
        stored = [r for r in read_trial_rows(str(exp)) if r.get("checkpoint_dir_name")]
        ready = [r for r in stored if r["epoch"] >= min_epoch]
        if ready:
            return max(ready, key=lambda r: r["epoch"])
        time.sleep(0.2)
    raise AssertionError(f"no trial stored a checkpoint of epoch {min_epoch} within {timeout_s} s")


def _lose(cluster: object, node: object) -> None:
    """Kill a worker node at once, as if its machine went away: its worker processes (the trial's among them)
    with SIGKILL first, then its raylet and object store (``remove_node`` alone leaves the workers running until they
    notice the raylet is gone, and they go on training and reporting meanwhile)."""
    from ray._private import ray_constants

    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    proc_helpers.kill(proc_helpers.descendants(raylet))
    cluster.remove_node(node, allow_graceful=False)


@pytest.mark.slow
def test_lost_worker_node_trial_continues_on_survivor(three_nodes: object, slow_tiles: Path, tmp_path: Path) -> None:
    cluster = three_nodes
    space = tiny_space(
        experiment__num_samples=2, experiment__max_concurrent=2, experiment__max_failures=3,
        scheduler={"type": "fifo", "max_t": EPOCHS},
    )  # fmt: skip
    space_file = write_space(tmp_path / "lost.yaml", space)
    exp = tmp_path / "shared" / "lost"
    argv = [sys.executable, "-m", "tune_agb.search", "--space", str(space_file), "--address", cluster.address]
    argv += ["--storage", str(tmp_path / "shared"), "--name", "lost"]
    argv += ["--input-dir", str(slow_tiles / "inputs"), "--label-dir", str(slow_tiles / "labels")]
    log = tmp_path / "search.log"
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            row = _wait_for_checkpoint(exp, proc, min_epoch=2, timeout_s=300)
            victim_trial, victim_node = row["trial_id"], row["node_id"]
            [node] = [n for n in cluster.worker_nodes if n.node_id == victim_node]
            _lose(cluster, node)
            # The newest checkpoint the trial had stored when its node went away: it must go on from there.
            kept = [r for r in read_trial_rows(str(exp)) if r["trial_id"] == victim_trial]
            newest = max(r["epoch"] for r in kept if r.get("checkpoint_dir_name"))
            assert newest < EPOCHS, "the trial finished before its node was killed: nothing was interrupted"
            rc = proc.wait(timeout=400)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert rc == 0, text[-3000:]

    df = read_results(str(exp))
    assert sorted(df["trial_id"].unique()) == sorted({r["trial_id"] for r in read_trial_rows(str(exp))})
    assert df["trial_id"].nunique() == 2
    for trial_id, rows in df.groupby("trial_id"):
        assert sorted(rows["epoch"]) == list(range(1, EPOCHS + 1)), (trial_id, sorted(rows["epoch"]))

    # Every epoch was reported once: a re-run epoch would be a second stored row (another wall_time).
    raw = [(r["trial_id"], r["epoch"]) for r in read_trial_rows(str(exp))]
    assert len(raw) == len(set(raw)) == 2 * EPOCHS

    victim = df[df["trial_id"] == victim_trial].sort_values("epoch")
    nodes = list(victim["node_id"])
    survivor = next(n.node_id for n in cluster.worker_nodes)
    assert set(nodes) == {victim_node, survivor}
    switch = nodes.index(survivor)  # the first epoch on the surviving node; the killed node's ones all before it
    assert nodes[:switch] == [victim_node] * switch and nodes[switch:] == [survivor] * (EPOCHS - switch)
    # It went on from the newest checkpoint stored before the kill, not from scratch or from an older one.
    assert int(victim["epoch"].iloc[switch]) == newest + 1, (newest, list(victim["epoch"]), nodes)
    assert victim["pid"].iloc[switch - 1] != victim["pid"].iloc[switch]
    other = df[df["trial_id"] != victim_trial]
    assert set(other["node_id"]) == {survivor}
