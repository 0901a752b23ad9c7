"""bench/raster_io.py: the input stack it writes, and a small predict run end to end (its summary line, its JSON and
the map predict wrote); a run stopped by --timeout is reported, not fatal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import rasterio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import raster_io as rio

REPO = Path(__file__).resolve().parents[1]


def _run(tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "bench" / "raster_io.py"), "--skip-prepare", "--json", str(out), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(out.read_text())


def test_write_stack_is_tiled_band_interleaved_with_a_nodata_hole(tmp_path: Path) -> None:
    path = tmp_path / "s.tif"
    rio.write_stack(path, 600, 3)
    with rasterio.open(path) as ds:
        assert (ds.count, ds.height, ds.width, ds.dtypes[0]) == (3, 600, 600, "float32")
        assert ds.profile["tiled"] and ds.block_shapes[0] == (512, 512)
        assert ds.profile["interleave"] == "band" and ds.compression is None
        x = ds.read()
    assert np.isnan(x[:, :100, :100]).all()
    assert np.isfinite(x[:, 100:, :]).all() and np.nanmin(x) >= 0.0 and np.nanmax(x) < 1.0
    # strips are shifted copies of one draw, never the same block twice in a column
    assert not np.array_equal(x[:, 512:600, :], x[:, 0:88, :])


def test_small_predict_run_reports_mpx_s_and_writes_the_map(tmp_path: Path) -> None:
    work = tmp_path / "work"
    proc, rep = _run(tmp_path, "--size", "256", "--predict-tile", "128", "--workdir", str(work), "--keep")
    write, pred = rep["steps"]
    assert write["step"] == "write" and write["gb"] > 0 and write["wall_s"] > 0
    assert pred["step"] == "predict" and not pred["timed_out"] and pred["device"] == "cpu"
    assert pred["input_mpx"] == round(256 * 256 / 1e6, 3)
    assert pred["mpx_s"] > 0 and pred["windows"] > 1 and pred["windows_s"] > 0 and pred["rss_mb"] > 100
    # the wrapper inside predict saw every window go through the model
    assert pred["batches"] >= 1 and pred["model_s"] > 0 and pred["window_mpx"] >= pred["input_mpx"]
    assert pred["main_s"] < pred["wall_s"]
    assert rep["model"]["seam_margin"] > 0 and rep["model"]["margin_measured"]
    lines = [ln for ln in proc.stdout.splitlines() if "Mpx/s" in ln]
    assert len(lines) == 1 and lines[0].startswith("[raster_io] predict [cpu, U-Net base 4 depth 2")
    with rasterio.open(work / "stack.tif") as src, rasterio.open(work / "map.tif") as dst:
        assert (dst.count, dst.height, dst.width) == (2, src.height, src.width)
        assert dst.descriptions == ("mean", "std")
        m = dst.read()
    assert np.isnan(m[:, :100, :100]).all() and np.isfinite(m[:, 100:, :]).all()


def test_timeout_is_reported(tmp_path: Path) -> None:
    proc, rep = _run(tmp_path, "--size", "64", "--seam-margin", "8", "--timeout", "0.01")
    pred = rep["steps"][-1]
    assert pred["timed_out"] and "mpx_s" not in pred and rep["model"]["seam_margin"] == 8
    assert "TIMEOUT after" in proc.stdout
