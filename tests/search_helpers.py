"""Shared pieces of the search tests: one local Ray instance per test module, small space files, file readers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

# Short: Ray's unix sockets live under its temp dir and their paths are limited to 107 bytes.
RAY_TMP = f"/tmp/rta_{os.getpid()}"


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A real local Ray (2 CPUs, no dashboard, small object store) shared by the tests of one module."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        object_store_memory=200 * 1024**2,
        _temp_dir=RAY_TMP,
        log_to_driver=False,
    )
    try:
        yield
    finally:
        ray.shutdown()


def tiny_space(**changes: Any) -> dict[str, Any]:
    """A small search space for tests: tiny U-Nets, few epochs, ASHA rungs at 1 and 2 epochs of 4."""
    space: dict[str, Any] = {
        "experiment": {"metric": "val_rmse", "mode": "min", "num_samples": 4, "max_concurrent": 2, "max_failures": 0},
        "scheduler": {"type": "asha", "max_t": 4, "grace_period": 1, "reduction_factor": 2},
        "searcher": {"type": "optuna", "seed": 1, "n_startup_trials": 2},
        "resources": {"cpu": 1, "gpu": 0},
        "fixed": {"base_channels": 4, "depth": 2, "batch_size": 4, "schedule": "constant"},
        "params": {
            "lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True},
            "optimizer": {"type": "categorical", "choices": ["adamw", "sgd"]},
            "momentum": {"type": "float", "low": 0.8, "high": 0.95, "when": {"optimizer": "sgd"}},
        },
    }
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            space[section] = {**space.get(section, {}), name: value}
        else:
            space[section] = value
    return space


def write_space(path: Path, space: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path
