"""Benchmark: prepare and predict on a large GeoTIFF stack (default 8192 x 8192 x 14 float32, about 3.7 GB).

Each step runs as its own subprocess (``python -m tune_agb.prepare`` / ``python -m tune_agb.predict``); its peak
resident memory is the child's ``ru_maxrss`` from ``os.wait4`` and its wall time is measured around it. Throughput:
MB of input raster read per second, tiles (prepare) or windows (predict) per second.

Predict uses a deliberately tiny U-Net (base_channels 4, depth 2, random weights): the figure measures the raster
I/O and blending path, not model speed.

    python bench/raster_io.py                 # full size; needs ~8 GB free disk in --workdir
    python bench/raster_io.py --size 2048     # quicker
    python bench/raster_io.py --skip-prepare --baseline-src /tmp/old   # predict now and with an older source tree
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
import torch
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import transform as warp_points
from rasterio.windows import Window

from tune_agb.bands import BAND_NAMES
from tune_agb.engine.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
from tune_agb.engine.config import TrainConfig
from tune_agb.engine.data import NormStats
from tune_agb.engine.model import UNet

CRS_UTM = "EPSG:32647"


def write_stack(path: Path, size: int, bands: int, seed: int = 0) -> Affine:
    """A tiled, uncompressed float32 stack written strip by strip (bounded memory), with a nodata hole."""
    transform = Affine(10.0, 0.0, 600_000.0, 0.0, -10.0, 1_650_000.0)
    profile = {"driver": "GTiff", "dtype": "float32", "count": bands, "height": size, "width": size, "crs": CRS_UTM,
               "transform": transform, "nodata": float("nan"), "tiled": True, "blockxsize": 512, "blockysize": 512,
               "BIGTIFF": "YES"}  # fmt: skip
    rng = np.random.default_rng(seed)
    strip = 512
    with rasterio.open(path, "w", **profile) as dst:
        for r in range(0, size, strip):
            h = min(strip, size - r)
            data = rng.random((bands, h, size), dtype=np.float32)
            if r == 0:
                data[:, :100, :100] = np.nan
            dst.write(data, window=Window(0, r, size, h))
        for i in range(bands):
            dst.set_band_description(i + 1, BAND_NAMES[i] if bands == len(BAND_NAMES) else f"b{i + 1}")
    return transform


def write_shots(path: Path, size: int, transform: Affine, seed: int = 0) -> int:
    """GEDI-like tracks: shots every 6 px (60 m) along N-S tracks 60 px (600 m) apart."""
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(0.5, size, 6.0), np.arange(30.0, size, 60.0), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel() + rng.normal(0, 0.5, rows.size)
    x, y = transform @ (cols, rows)
    lon, lat = warp_points(CRS.from_user_input(CRS_UTM), CRS.from_epsg(4326), x, y)
    flag = (rng.random(rows.size) > 0.1).astype(np.int8)
    table = pa.table({"lon_lowestmode": np.asarray(lon), "lat_lowestmode": np.asarray(lat),
                      "agbd": rng.uniform(0, 300, rows.size), "l4_quality_flag": flag})  # fmt: skip
    pq.write_table(table, path)
    return rows.size


def tiny_checkpoint(path: Path, bands: int) -> None:
    cfg = TrainConfig(in_channels=bands, base_channels=4, depth=2, norm="batch")
    torch.manual_seed(0)
    model = UNet.from_config(cfg).eval()
    norm = NormStats([0.5] * bands, [0.29] * bands, 100.0, 80.0)
    state = {"format": CHECKPOINT_FORMAT, "epoch": 1, "config": cfg.to_dict(), "norm": norm.to_dict(),
             "model": model.state_dict(), "optimizer": {}, "scheduler": {}, "scaler": {}, "rng": {}, "history": [],
             "best": {"epoch": 1, "val_rmse": 0.0}}  # fmt: skip
    save_checkpoint(state, path)


def measure(cmd: list[str], src: str | None = None) -> tuple[float, float, str]:
    """Run ``cmd`` (with ``src`` first on PYTHONPATH when given); return (wall seconds, peak RSS in MB of that child
    alone, its stdout)."""
    env = {**os.environ, "PYTHONPATH": src} if src else None
    with tempfile.TemporaryFile("w+") as fout, tempfile.TemporaryFile("w+") as ferr:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=fout, stderr=ferr, text=True, env=env, cwd=src)
        _, status, usage = os.wait4(p.pid, 0)  # this child's own rusage (ru_maxrss in KB on Linux)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        fout.seek(0)
        ferr.seek(0)
        out, err = fout.read(), ferr.read()
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    return wall, usage.ru_maxrss / 1024, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--bands", type=int, default=14)
    ap.add_argument("--tile-size", type=int, default=244, help="prepare tile size (px)")
    ap.add_argument("--predict-tile", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--skip-prepare", action="store_true", help="measure predict only")
    ap.add_argument("--baseline-src", help="also run predict from this source tree (a worktree of an older commit)")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a new temp folder, removed after)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="tune_agb_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        stack, shots, ckpt = work / "stack.tif", work / "shots.parquet", work / "tiny.pt"
        t0 = time.perf_counter()
        transform = write_stack(stack, a.size, a.bands)
        n_shots = write_shots(shots, a.size, transform)
        tiny_checkpoint(ckpt, a.bands)
        gen_s = time.perf_counter() - t0
        raster_mb = a.size * a.size * a.bands * 4 / 1e6
        py = sys.executable
        if not a.skip_prepare:
            prep_s, prep_rss, prep_out = measure(
                [py, "-m", "tune_agb.prepare", "--image", str(stack), "--gedi", str(shots), "--filter",
                 "l4_quality_flag==1", "--out", str(work / "ds"), "--tile-size", str(a.tile_size), "--no-progress"]
            )  # fmt: skip
            n_tiles = sum(1 for _ in (work / "ds" / "inputs").glob("*/*.npy"))
            shutil.rmtree(work / "ds")  # free the disk before the next step
        predict = [py, "-m", "tune_agb.predict", "--model", str(ckpt), "--image", str(stack), "--out",
                   str(work / "map.tif"), "--tile-size", str(a.predict_tile), "--batch-size", str(a.batch_size),
                   "--device", "cpu", "--no-progress", "--overwrite"]  # fmt: skip
        runs = {"": measure(predict)}
        if a.baseline_src:
            runs[f" [{a.baseline_src}]"] = measure(predict, a.baseline_src)
        cpu = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU"
        print(f"## raster I/O benchmark: {a.size} x {a.size} x {a.bands} float32 ({raster_mb / 1e3:.2f} GB), {cpu}")
        print(f"input written in {gen_s:.0f} s; {n_shots} GEDI shots; torch {torch.__version__}, threads "
              f"{torch.get_num_threads()}\n")  # fmt: skip
        print("| step | wall (s) | peak RSS (MB) | read MB/s | tiles/s |")
        print("|---|---|---|---|---|")
        if not a.skip_prepare:
            print(f"| prepare (tile {a.tile_size}) | {prep_s:.1f} | {prep_rss:.0f} | {raster_mb / prep_s:.0f} "
                  f"| {n_tiles / prep_s:.1f} ({n_tiles} tiles) |")  # fmt: skip
        for tag, (pred_s, pred_rss, pred_out) in runs.items():
            n_windows = int(pred_out.split("from ")[1].split(" windows")[0])
            print(f"| predict{tag} (tiny U-Net, window {a.predict_tile}, CPU) | {pred_s:.1f} | {pred_rss:.0f} "
                  f"| {raster_mb / pred_s:.0f} | {n_windows / pred_s:.2f} ({n_windows} windows) |")  # fmt: skip
        if not a.skip_prepare:
            print("\n" + prep_out.strip())
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
