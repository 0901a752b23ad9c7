"""A search joins a running two-node Ray cluster (``ray.cluster_utils.Cluster``: two real raylets on this machine)
with ``--address`` and its trials run on both nodes, as the results show."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.search_helpers import tiny_space, write_space


@pytest.fixture(scope="module")
def two_node_cluster() -> Iterator[object]:
    from ray.cluster_utils import Cluster

    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = f"/tmp/rtc_{os.getpid()}"  # short: unix socket paths are limited to 107 bytes
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    cluster.add_node(num_cpus=1, num_gpus=0)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        cluster.shutdown()
        if old is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old


@pytest.mark.slow
def test_search_with_address_runs_trials_on_both_nodes(
    two_node_cluster: object, tiny_data: Path, tmp_path: Path
) -> None:
    space = write_space(
        tmp_path / "cluster.yaml",
        tiny_space(experiment__num_samples=4, experiment__max_concurrent=2, scheduler__max_t=2),
    )
    argv = [sys.executable, "-m", "tune_agb.search", "--space", str(space), "--address", two_node_cluster.address]
    argv += ["--storage", str(tmp_path / "shared"), "--name", "exp"]
    argv += ["--input-dir", str(tiny_data / "inputs"), "--label-dir", str(tiny_data / "labels")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    df = pd.read_parquet(tmp_path / "shared" / "exp" / "results.parquet")
    assert df["trial_id"].nunique() == 4
    # each node has one CPU and a trial needs one: two trials at a time means one on each node
    nodes = set(df["node_id"])
    assert len(nodes) == 2, nodes
    best = yaml.safe_load((tmp_path / "shared" / "exp" / "best.yaml").read_text())
    assert (Path(best["checkpoint"]) / "checkpoint.pt").is_file()
