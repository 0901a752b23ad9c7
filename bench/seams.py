"""Benchmark: are maps predicted in windows free of seams? The README main job's model on the demo scene.

Builds the demo scene (``python -m tune_agb.demo --scene``, 512 x 384 px), trains the README main job's model (the
demo search, then ``final_train --experiment``), predicts the scene with ``--tile-size`` 64, 128 and 512 (one
window over the whole scene: no seam can exist there) at the default overlap, and prints the differences of the
64- and 128-px maps from the 512-px map, mean and std bands. ``--baseline-src DIR`` also predicts with an older
source tree (a worktree of an earlier commit), side by side.

    python bench/seams.py [--baseline-src /tmp/old] [--workdir DIR]
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
import rasterio


def run(cmd: list[str], src: str | None = None) -> str:
    env = {**os.environ, "PYTHONPATH": src} if src else None
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=src)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline-src", help="also predict from this source tree (a worktree of an older commit)")
    ap.add_argument("--workdir", help="scratch folder (default: a new temp folder, removed after)")
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="tune_agb_seams_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parents[1]
    py = sys.executable
    try:
        t0 = time.perf_counter()
        run([py, "-m", "tune_agb.demo", "--scene", "--out", str(work / "scene"), "--overwrite"])
        space = str(repo / "search_spaces" / "demo.yaml")
        run([py, "-m", "tune_agb.search", "--space", space, "--storage", str(work / "st"), "--name", "demo"])
        run([py, "-m", "tune_agb.final_train", "--experiment", str(work / "st" / "demo"), "--out-dir",
             str(work / "final"), "--overwrite"])  # fmt: skip
        train_s = time.perf_counter() - t0
        sources = {"now": None} | ({"baseline": a.baseline_src} if a.baseline_src else {})
        print(f"## seams: demo scene 512 x 384, README main job's model ({platform.machine()}, {os.cpu_count()} "
              f"cores; scene + search + final training {train_s:.0f} s)\n")  # fmt: skip
        print("| code | --tile-size | band | mean abs diff | p99 | max | p99 / scene mean |")
        print("|---|---|---|---|---|---|---|")
        for name, src in sources.items():
            maps = {}
            for tile in (512, 128, 64):
                out = work / f"map_{name}_{tile}.tif"
                run([py, "-m", "tune_agb.predict", "--model", str(work / "final"), "--image",
                     str(work / "scene" / "scene.tif"), "--out", str(out), "--tile-size", str(tile), "--device",
                     "cpu", "--no-progress", "--overwrite"], src)  # fmt: skip
                with rasterio.open(out) as ds:
                    maps[tile] = ds.read().astype(np.float64)
            whole = maps[512]
            scene_mean = float(np.nanmean(whole[0]))
            for tile in (64, 128):
                for b, band in enumerate(("mean", "std")):
                    d = np.abs(maps[tile][b] - whole[b])
                    d = d[np.isfinite(d)]
                    p99 = float(np.percentile(d, 99))
                    print(f"| {name} | {tile} | {band} | {d.mean():.4f} | {p99:.4f} | {d.max():.4f} | "
                          f"{100 * p99 / scene_mean:.4f} % |")  # fmt: skip
        print(f"\nscene mean (512-px map): {scene_mean:.2f} Mg/ha")
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
