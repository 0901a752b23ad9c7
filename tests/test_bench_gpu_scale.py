"""bench/synthetic_store.py and bench/gpu_scale.py at a tiny scale on CPU: the synthetic store opens as written
(nothing packed, the placeholders sparse, the labels sparse and learnable, the statistics those of the stored values),
``gpu_scale.py store`` runs the same writer, and the search with a SIGKILL and ``--resume`` finishes every trial and
reports RSS, epochs and FLOPs (figures from bench/scale_summary.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from tune_agb.engine.data import TileSet, compute_norm_stats
from tune_agb.store import INPUTS, DataSource

sys.path.insert(0, str(REPO / "bench"))
import gpu_scale as gs

SCRIPT = REPO / "bench" / "gpu_scale.py"
STORE_SCRIPT = REPO / "bench" / "synthetic_store.py"
TRAIN, VAL, TILE = 40, 8, 32


def _bench(*args: str, timeout: float = 120, script: Path = SCRIPT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout)


def _store_state(root: Path) -> dict[str, int]:
    """Every entry of the store root (hidden ones too) with its inputs' modification time (-1: not a store)."""
    return {p.name: (p / INPUTS).stat().st_mtime_ns if (p / INPUTS).is_file() else -1 for p in root.iterdir()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gpu_scale") / "data"
    proc = _bench("--out", str(out), "--train", str(TRAIN), "--val", str(VAL), "--tile", str(TILE), "--workers", "2",
                  script=STORE_SCRIPT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "as float32" in proc.stdout and "tiles/s" in proc.stdout
    return out


def test_store_is_opened_as_written_without_packing(dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = json.loads((dataset / "gpu_scale_store.json").read_text())
    root = Path(manifest["store_root"])
    keys = {s: manifest["splits"][s]["key"] for s in ("train", "val")}
    before = _store_state(root)
    assert set(before) == set(keys.values())  # the two split folders, nothing else

    # The sources: placeholders of the right shape and size, holding no data.
    ph = dataset / "inputs" / "train" / "train_000000.npy"
    head = np.load(ph, mmap_mode="r")
    assert head.shape == (14, TILE, TILE) and head.dtype == np.float32
    assert ph.stat().st_size == head.offset + head.nbytes
    assert ph.stat().st_blocks * 512 < ph.stat().st_size  # sparse
    assert np.load(dataset / "labels" / "val" / "val_000000.npy", mmap_mode="r").shape == (TILE, TILE)
    assert len(list((dataset / "labels" / "train").glob("*.npy"))) == TRAIN

    monkeypatch.setenv("TUNE_AGB_STORE", str(root))
    monkeypatch.delenv("TUNE_AGB_STORE_DTYPE", raising=False)
    src = DataSource(str(dataset / "inputs"), str(dataset / "labels"), ("train", "val"), in_channels=14)
    data = src.open()
    assert dict(src.pinned().keys) == keys
    assert _store_state(root) == before  # opened, not packed: no staging folder, no lock, no new store
    train, val = data.tiles["train"], data.tiles["val"]
    assert train.inputs.shape == (TRAIN, 14, TILE, TILE) and train.inputs.dtype == np.float16
    assert train.labels.shape == (TRAIN, TILE, TILE) and train.labels.dtype == np.float32
    assert val.inputs.shape == (VAL, 14, TILE, TILE) and val.labels.shape == (VAL, TILE, TILE)

    # Labels: ~1.1 % of the pixels, the counts in meta.json right, the inputs' NaN (clouds) counted.
    for tiles in (train, val):
        lab = np.asarray(tiles.labels)
        assert 0.005 < np.isfinite(lab).mean() < 0.025
        assert tiles.num_labelled == int(np.isfinite(lab).sum())
        assert tiles.nonfinite == int(np.isnan(np.asarray(tiles.inputs)).sum())
    assert train.nonfinite > 0

    # The stored statistics are those of the stored values (what the trials normalise with).
    arrays = TileSet("train", train.names, np.asarray(train.inputs, dtype=np.float32), np.asarray(train.labels))
    exact = compute_norm_stats(arrays)
    stored = data.norm()
    np.testing.assert_allclose(stored.mean, exact.mean, rtol=1e-9)
    np.testing.assert_allclose(stored.std, exact.std, rtol=1e-9)
    assert stored.target_mean == pytest.approx(exact.target_mean, rel=1e-9)

    # Learnable: a per-pixel linear fit of the labels on the bands explains most of their variance on val.
    def pixels(tiles: TileSet) -> tuple[np.ndarray, np.ndarray]:
        lab = np.asarray(tiles.labels)
        x = np.asarray(tiles.inputs, dtype=np.float64).transpose(0, 2, 3, 1)[np.isfinite(lab)]
        x = np.nan_to_num((x - np.array(stored.mean)) / np.array(stored.std))
        return np.c_[x, np.ones(len(x))], lab[np.isfinite(lab)]

    x, y = pixels(train)
    w = np.linalg.lstsq(x, y, rcond=None)[0]
    xv, yv = pixels(val)
    assert 1 - np.mean((xv @ w - yv) ** 2) / yv.var() > 0.8


def test_store_refuses_to_overwrite_without_the_flag(dataset: Path) -> None:
    args = ("--out", str(dataset), "--train", "2", "--val", "1", "--tile", "16", "--workers", "1")
    proc = _bench(*args, script=STORE_SCRIPT)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    # ``gpu_scale.py store`` is the same writer with the same arguments
    proc = _bench("store", *args)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    proc = _bench("store", *args[:-2], "--pool", "0")
    assert proc.returncode == 2 and "usage: gpu_scale.py store" in proc.stderr and "--pool >= 1" in proc.stderr


def test_search_process_waits_for_exit_kill_point_or_budget(tmp_path: Path) -> None:
    def start(code: str, tag: str) -> gs.SearchProcess:
        return gs.SearchProcess([sys.executable, "-c", code], tmp_path / f"{tag}.log", dict(os.environ), tag)

    done = start("pass", "ta")
    assert done.wait(time.monotonic() + 60) == "exited"
    assert done.finish(tmp_path / "logs_a", (0,)) == (0, [])

    killed = start("import time; time.sleep(60)", "tb")
    seen: list[float] = []
    assert killed.wait(time.monotonic() + 60, lambda s: seen.append(s) or s >= 0.5) == "kill"
    assert len(seen) >= 2 and seen[-1] >= 0.5 and killed.proc.poll() is None
    killed.kill()
    assert killed.finish(tmp_path / "logs_b", (0, -signal.SIGKILL))[0] == -signal.SIGKILL

    late = start("import time; time.sleep(60)", "tc")
    t0 = time.monotonic()
    assert late.wait(t0 + 0.5, lambda s: False) == "budget" and time.monotonic() - t0 < 5
    late.interrupt(10)
    assert late.finish(tmp_path / "logs_c", (0,))[0] is not None


@pytest.mark.slow
def test_search_killed_and_resumed_finishes_every_trial(dataset: Path, tmp_path: Path) -> None:
    root = Path(json.loads((dataset / "gpu_scale_store.json").read_text())["store_root"])
    before = _store_state(root)
    out = tmp_path / "out"
    proc = _bench(
        "search", "--data", str(dataset), "--out", str(out), "--gpus-per-trial", "0", "--cpus-per-trial", "1",
        "--max-concurrent", "2", "--num-samples", "3", "--max-t", "3", "--kill-after", "1", "--base-channels", "4",
        "--batch-sizes", "4,8", "--depth", "2", "--budget-s", "240", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["errors"] == []

    # The kill happened after an epoch was reported; the resumed search finished all 3 trials.
    r = s["resume"]
    assert r["killed"] and r["reports_before_kill"] >= 1 and r["first_rc"] == -9
    assert r["resume_rc"] == 0 and r["all_trials_finished"]
    assert len(r["statuses"]) == 3 and set(r["statuses"].values()) == {"TERMINATED"}
    assert (out / "search_first.log").is_file() and "search:" in (out / "search_resume.log").read_text()

    # Epochs per trial (ASHA: every trial >= 1 epoch, the first to its rung goes on to max_t) and FLOPs.
    per_trial = s["epochs"]["per_trial"]
    assert len(per_trial) == 3
    assert all(1 <= v["epochs"] <= 3 for v in per_trial.values())
    assert max(v["epochs"] for v in per_trial.values()) == 3
    assert s["epochs"]["trial_epochs"] == sum(v["epochs"] for v in per_trial.values())
    assert any(v["epoch_s"] for v in per_trial.values()) and s["epochs"]["epoch_s_median"] > 0
    bound = s["epochs"]["compute_bound"]
    assert bound["peak_tflops"] is None and bound["base_4"]["flops_fwd_bwd_per_sample"] > 0
    assert bound["base_4"]["batch_4"]["samples_per_epoch"] == TRAIN
    assert s["best"]["val_rmse"] <= min(v["val_rmse_first"] for v in per_trial.values())

    # RssAnon per trial, from its own process(es), sampled over its epochs.
    rss = s["rss"]
    assert set(rss["trials"]) == set(per_trial)
    for procs in rss["trials"].values():
        sampled = [p for p in procs if p.get("samples")]
        assert sampled, procs
        for p in sampled:
            assert 0 < p["rss_at_first_report_mb"] <= p["rss_max_mb"] and p["growth_mb"] >= 0
            assert p["title"].startswith("ray::")
    assert isinstance(rss["flat"], bool) and rss["driver_rss_max_mb"] > 0
    rows = (out / "rss_timeline.csv").read_text().splitlines()
    assert rows[0].startswith("t_s,") and any(",resume," in row for row in rows) and any("ray::" in r for r in rows)
    if shutil.which("nvidia-smi") is None:
        assert s["gpu"] == {"nvidia_smi": False}

    assert _store_state(root) == before  # the search opened the store: nothing packed
