"""The packed tile store (:mod:`tune_agb.store`) and the streamed training path that reads it: content, keys,
rebuilds, interrupted and concurrent packs, damage, float16 overflow, URIs; streamed == resident; steps_per_epoch."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import REPO
from tune_agb.engine.config import TrainConfig
from tune_agb.engine.data import choose_mode, compute_norm_stats, load_dataset
from tune_agb.engine.train import Run, train
from tune_agb.errors import TuneAgbError
from tune_agb.store import DataSource, packed_split, store_root

TINY = {"base_channels": 4, "depth": 2, "batch_size": 3, "epochs": 3, "lr": 3e-3}


@pytest.fixture
def data(tiny_data: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny demo data (tests here change tiles)."""
    return Path(shutil.copytree(tiny_data, tmp_path / "data"))


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private store folder (``TUNE_AGB_STORE``, inherited by subprocesses)."""
    monkeypatch.setenv("TUNE_AGB_STORE", str(tmp_path / "store"))
    return tmp_path / "store"


def _stores(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_pack_holds_the_tiles_and_the_stats(data: Path, root: Path) -> None:
    packed = DataSource(str(data / "inputs"), str(data / "labels")).open()
    ref = load_dataset(data / "inputs", data / "labels")
    assert store_root() == root and len(_stores(root)) == 3  # one store per split
    for split, tiles in packed.tiles.items():
        assert tiles.names == ref[split].names
        assert isinstance(tiles.inputs, np.memmap) and tiles.inputs.dtype == np.float16
        assert not tiles.inputs.flags.writeable
        np.testing.assert_array_equal(tiles.inputs, ref[split].inputs.astype(np.float16))
        np.testing.assert_array_equal(tiles.labels, ref[split].labels)  # labels exact (NaN where none)
        assert tiles.num_labelled == ref[split].num_labelled > 0
        assert tiles.nonfinite == int((~np.isfinite(ref[split].inputs)).sum())
    # The stats come from the float32 tiles while packing, not from the float16 copy.
    want = compute_norm_stats(ref["train"]).to_dict()
    got = packed.norm().to_dict()
    for k in ("mean", "std"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-9)
    assert got["target_mean"] == pytest.approx(want["target_mean"], rel=1e-9)
    assert got["target_std"] == pytest.approx(want["target_std"], rel=1e-9)
    assert packed.norm(standardize_target=False).target_std == 1.0


def test_second_open_reuses_the_store_and_a_changed_tile_rebuilds_it(
    data: Path, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = DataSource(str(data / "inputs"), str(data / "labels"), splits=("val",))
    first = src.open()
    path = first.paths["val"]
    mtime = (path / "inputs.npy").stat().st_mtime_ns
    assert src.open().paths["val"] == path and (path / "inputs.npy").stat().st_mtime_ns == mtime
    # Change one tile (new values, new mtime): a new key, a new store with the new values; the old one is removed.
    name = first.tiles["val"].names[1]
    tile = np.load(data / "inputs" / "val" / f"{name}.npy")
    np.save(data / "inputs" / "val" / f"{name}.npy", tile + 1000.0)
    with caplog.at_level(logging.INFO, logger="tune_agb.store"):
        second = src.open()
    assert second.paths["val"] != path and not path.exists()
    assert "removed the older store" in caplog.text
    np.testing.assert_array_equal(second.tiles["val"].inputs[1], (tile + 1000.0).astype(np.float16))
    assert _stores(root) == [second.paths["val"]]


_SLOW_PACK = """
import logging, sys, time
import tune_agb.store as st
logging.basicConfig(level=logging.INFO, format="%(message)s")
read = st._read_npy
def slow(path):
    time.sleep(0.02)
    return read(path)
st._read_npy = slow
p = st.packed_split(sys.argv[1], sys.argv[2], "train")
print(p.path)
"""


def _slow_pack(data: Path) -> subprocess.Popen:
    """A pack in another process whose tile reads take 20 ms (the test's doing, not the product's)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", _SLOW_PACK, str(data / "inputs"), str(data / "labels")]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(cond: Any, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.01)


@pytest.fixture
def more_tiles(data: Path) -> Path:
    """The train split grown to 64 tiles (copies under new names), so that a slow pack takes over a second."""
    for kind in ("inputs", "labels"):
        folder = data / kind / "train"
        originals = sorted(folder.glob("*.npy"))
        for i in range(64 - len(originals)):
            shutil.copy(originals[i % len(originals)], folder / f"extra_{i:03d}.npy")
    return data


def test_pack_killed_midway_is_detected_and_rebuilt(more_tiles: Path, root: Path) -> None:
    proc = _slow_pack(more_tiles)
    _wait_for(lambda: root.is_dir() and any(root.glob(".staging-*/inputs.npy")))
    time.sleep(0.3)  # some tiles written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(root.glob(".staging-*")) and not _stores(root)  # nothing half-written was published
    packed = packed_split(str(more_tiles / "inputs"), str(more_tiles / "labels"), "train")
    assert not any(root.glob(".staging-*"))  # the leftover was removed
    ref = load_dataset(more_tiles / "inputs", more_tiles / "labels", splits=("train",))["train"]
    np.testing.assert_array_equal(packed.tiles.inputs, ref.inputs.astype(np.float16))
    np.testing.assert_array_equal(packed.tiles.labels, ref.labels)


def test_two_processes_starting_at_once_end_with_one_valid_store(more_tiles: Path, root: Path) -> None:
    procs = [_slow_pack(more_tiles) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1 and _stores(root) == [Path(paths.pop())]
    assert not any(root.glob(".staging-*"))
    # Exactly one packed it; the other opened its result (after waiting for it, when it started during the pack).
    assert sum("packed split 'train'" in o[1] for o in outs) == 1, [o[1][-2000:] for o in outs]
    ref = load_dataset(more_tiles / "inputs", more_tiles / "labels", splits=("train",))["train"]
    packed = packed_split(str(more_tiles / "inputs"), str(more_tiles / "labels"), "train")
    np.testing.assert_array_equal(packed.tiles.inputs, ref.inputs.astype(np.float16))


@pytest.mark.parametrize("damage", ["truncated inputs", "meta not json", "labels missing"])
def test_damaged_store_is_rebuilt(data: Path, root: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    packed = packed_split(str(data / "inputs"), str(data / "labels"), "val")
    path = packed.path
    del packed
    if damage == "truncated inputs":
        with open(path / "inputs.npy", "rb+") as f:
            f.truncate((path / "inputs.npy").stat().st_size - 100)
    elif damage == "meta not json":
        (path / "meta.json").write_text("{oops")
    else:
        (path / "labels.npy").unlink()
    with caplog.at_level(logging.WARNING, logger="tune_agb.store"):
        again = packed_split(str(data / "inputs"), str(data / "labels"), "val")
    assert "is damaged" in caplog.text and str(path) in caplog.text
    ref = load_dataset(data / "inputs", data / "labels", splits=("val",))["val"]
    np.testing.assert_array_equal(again.tiles.inputs, ref.inputs.astype(np.float16))
    np.testing.assert_array_equal(again.tiles.labels, ref.labels)


def test_values_beyond_float16_are_stored_as_float32(data: Path, root: Path) -> None:
    name = sorted((data / "inputs" / "val").glob("*.npy"))[0]
    tile = np.load(name)
    tile[0, 0, 0] = 1e6  # > 65504
    np.save(name, tile)
    packed = packed_split(str(data / "inputs"), str(data / "labels"), "val")
    assert packed.tiles.inputs.dtype == np.float32 and packed.tiles.inputs[0, 0, 0, 0] == 1e6


def test_uri_source_through_pyarrow(data: Path, root: Path) -> None:
    """A ``file://`` URI goes through pyarrow's filesystem layer, as ``s3://``/``gs://`` would (no network here)."""
    by_uri = DataSource(f"file://{data / 'inputs'}", f"file://{data / 'labels'}", splits=("val",)).open()
    local = load_dataset(data / "inputs", data / "labels", splits=("val",))["val"]
    np.testing.assert_array_equal(by_uri.tiles["val"].inputs, local.inputs.astype(np.float16))
    np.testing.assert_array_equal(by_uri.tiles["val"].labels, local.labels)
    with pytest.raises(TuneAgbError, match="split folder 'nope' is missing"):
        DataSource(f"file://{data / 'inputs'}", f"file://{data / 'labels'}", splits=("nope",)).open()


def test_pinned_keys_open_without_the_source_and_refuse_changed_tiles(data: Path, root: Path) -> None:
    pinned = DataSource(str(data / "inputs"), str(data / "labels"), splits=("val",)).pinned()
    assert dict(pinned.keys)["val"] == pinned.open().paths["val"].name
    moved = data.parent / "moved"
    data.rename(moved)
    assert len(pinned.open().tiles["val"]) == 4  # opened from the store: the source is not listed
    moved.rename(data)
    shutil.rmtree(root)  # a node without the store packs from the source, and checks it is the same data
    assert len(pinned.open().tiles["val"]) == 4
    shutil.rmtree(root)
    name = sorted((data / "inputs" / "val").glob("*.npy"))[0]
    np.save(name, np.load(name) * 2)
    with pytest.raises(TuneAgbError, match="changed since the search started"):
        pinned.open()


def test_bad_tiles_are_one_error_naming_the_file(data: Path, root: Path) -> None:
    bad = sorted((data / "inputs" / "train").glob("*.npy"))[2]
    np.save(bad, np.zeros((3, 32, 32), dtype=np.float32))
    with pytest.raises(TuneAgbError, match=f"{bad}: has 3 channels, expected 14"):
        DataSource(str(data / "inputs"), str(data / "labels"), splits=("train",)).open()
    assert not any(root.glob(".staging-*")) and not _stores(root)


# -- the streamed path and steps_per_epoch -----------------------------------------------------------------------------
@pytest.mark.slow
def test_streamed_and_resident_training_give_the_same_metrics(data: Path, root: Path) -> None:
    packed = DataSource(str(data / "inputs"), str(data / "labels"), splits=("train", "val")).open()
    runs = {}
    for mode in ("stream", "resident"):
        cfg = TrainConfig(**TINY, data_mode=mode)
        runs[mode] = train(cfg, packed.tiles, norm=packed.norm(), device="cpu", progress=False)
    for a, b in zip(runs["stream"].history, runs["resident"].history, strict=True):
        assert a == b  # bit for bit: the same stored values, normalised by the same code


def test_steps_per_epoch_sees_every_tile_once_per_pass(tiny_data: Path) -> None:
    tiles = load_dataset(tiny_data / "inputs", tiny_data / "labels", splits=("train", "val"))
    n = len(tiles["train"])
    cfg = TrainConfig(**{**TINY, "batch_size": 2, "steps_per_epoch": 3})
    run = Run(cfg, tiles, compute_norm_stats(tiles["train"]), torch.device("cpu"), None)
    seen, flags = [], []
    for _ in range(4):  # 12 batches of 2 = 3 passes over 8 tiles
        idx, fl = run._batches()
        assert len(idx) == 3 and fl is not None and fl.shape == (6, 3)
        seen += [int(i) for b in idx for i in b]
        flags.append(fl)
    assert n == 8 and len(seen) == 3 * n
    passes = [seen[k * n : (k + 1) * n] for k in range(3)]
    assert all(sorted(p) == list(range(n)) for p in passes)
    assert passes[0] != passes[1]  # a new order each pass


def test_resident_only_when_the_split_fits_the_trials_share() -> None:
    """The share is of the trial's part of the card (``resources.gpu``), not of the card's free memory: at 0.25 of
    an 80 GB card, a 20 GB split streams (it would take the whole cap), a 10 GB one stays resident."""
    gb, cuda = 10**9, torch.device("cuda")
    assert choose_mode("auto", 20 * gb, cuda, 0.25, total_memory=80 * gb) == "stream"
    assert choose_mode("auto", 10 * gb, cuda, 0.25, total_memory=80 * gb) == "resident"
    assert choose_mode("auto", 20 * gb, cuda, 1.0, total_memory=80 * gb) == "resident"
    assert choose_mode("auto", 1, torch.device("cpu")) == "stream"  # CPU: the page cache is the resident copy
    assert choose_mode("resident", 20 * gb, cuda, 0.25, total_memory=80 * gb) == "resident"  # asked for
    with pytest.raises(TuneAgbError, match="data_mode must be one of"):
        choose_mode("ram", 1, cuda)


def test_steps_per_epoch_is_a_checked_setting() -> None:
    from tune_agb.engine.config import config_from_dict

    with pytest.raises(TuneAgbError, match="'steps_per_epoch' must be >= 0"):
        config_from_dict({"steps_per_epoch": -1})
    with pytest.raises(TuneAgbError, match="'data_mode' must be one of auto, resident, stream"):
        config_from_dict({"data_mode": "ram"})


def test_meta_records_the_source_and_counts(data: Path, root: Path) -> None:
    packed = packed_split(str(data / "inputs"), str(data / "labels"), "test")
    meta = json.loads((packed.path / "meta.json").read_text())
    assert meta["source"] == {"input_dir": str(data / "inputs"), "label_dir": str(data / "labels")}
    assert meta["shape"] == [len(packed.tiles), 14, 32, 32] and meta["dtype"] == "float16"
    assert meta["labelled"] == packed.tiles.num_labelled
