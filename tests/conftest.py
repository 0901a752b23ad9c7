"""Shared fixtures: small generated datasets (never the network), the real-data folder from ../shared, and a
private demo-data cache (tests never touch the user's real ``~/.cache/tune_agb``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tune_agb.demo_data import write_demo_dataset

# Ray reads its authentication mode once per process, when it is first used: every Ray instance this test process
# starts (ray_local, ray.cluster_utils.Cluster fixtures) and the processes they spawn must agree on one mode, or the
# driver cannot talk to a later instance ("Failed to start GCS"). Subprocess commands get their own environment.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "gedi-s1s2-real"


@pytest.fixture(scope="session", autouse=True)
def private_demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``TUNE_AGB_CACHE`` points at a temporary folder for the whole session (subprocesses inherit it), and a user's
    ``TUNE_AGB_STORE`` is set aside, so packed stores go there too."""
    old = {k: os.environ.get(k) for k in ("TUNE_AGB_CACHE", "TUNE_AGB_STORE")}
    cache = tmp_path_factory.mktemp("tune_agb_cache")
    os.environ["TUNE_AGB_CACHE"] = str(cache)
    os.environ.pop("TUNE_AGB_STORE", None)
    try:
        yield cache
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4 x 4 grid of 32 px demo tiles (train/val/test by 2 x 2 blocks). Read-only: copy before changing it."""
    return write_demo_dataset(tmp_path_factory.mktemp("tiny") / "demo", tile=32, grid=(4, 4), seed=3)


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not (REAL_DATA / "inputs" / "train").is_dir():
        pytest.skip(f"real GEDI + Sentinel-1/2 tiles not found at {REAL_DATA} (../shared is absent)")
    return REAL_DATA


@pytest.fixture(scope="session")
def s3_server() -> Iterator[object]:
    """moto's S3 server on localhost for the whole session (tests/s3_server.py)."""
    pytest.importorskip("moto.server", reason="the S3 tests need moto[s3] and flask (the test extra)")
    from tests.s3_server import start_server

    server = start_server()
    try:
        yield server
    finally:
        server.server.stop()


@pytest.fixture()
def s3(s3_server: object) -> Iterator[object]:
    """The S3 server with its endpoint and credentials in the environment for this test (``AWS_ENDPOINT_URL``, ...)."""
    from tests.s3_server import environment

    gen = environment(s3_server)  # type: ignore[arg-type]
    next(gen)
    try:
        yield s3_server
    finally:
        next(gen, None)
