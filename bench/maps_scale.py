"""Benchmark: mapping one scene on Ray with 1 and 2 workers (a 2-node local cluster, ``ray.cluster_utils.Cluster``,
one CPU per node) beside today's single-process ``predict_map`` on the same scene, and the maps compared.

The scene is ``--size`` x ``--size`` px of ``--channels`` float32 bands (smooth random values, a no-data hole); the
model a random U-Net (``--base-channels``, ``--depth``) whose seam margin is measured once and stored in the
checkpoint as final_train does. Each Ray run maps the scene from scratch into its own folder with
:func:`tune_agb.maps.map_scenes` (``--cpus-per-worker 1``: one torch thread per worker) and is timed end to end
(joining the cluster, starting the workers and loading the model, the blocks, assembling and validating the COG,
the mosaic): ``Mpx/s`` is the scene's pixels over that wall time. The single-process map runs in this process with
torch's default threads (all cores). ``worker RssAnon`` is the largest anonymous resident memory a worker reported
after a block; ``--memory-size`` adds a 1-worker run on a larger scene to show it does not grow with the scene.

Agreement: p99 and max of |Ray map - single-process map| over pixels with data, as a fraction of the map's mean
(the issue asks p99 under 0.1 %).

    python bench/maps_scale.py                       # default: 2048 px (16 blocks), ~2 min on 2 shared cores
    python bench/maps_scale.py --size 2048 --memory-size 4096 --json maps.json

Prints one ``[maps_scale]`` line per run, then a markdown table; ``--json FILE`` writes the same figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tune_agb.engine.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
from tune_agb.engine.config import TrainConfig
from tune_agb.engine.data import NormStats
from tune_agb.engine.model import UNet
from tune_agb.engine.seams import measure_margin
from tune_agb.maps import Scene, map_scenes
from tune_agb.predict import predict_map


def write_scene(path: Path, size: int, channels: int, seed: int = 0) -> Path:
    """A ``size`` x ``size`` float32 scene (tiled GeoTIFF, UTM 47N, 10 m), written in strips to bound memory."""
    rng = np.random.default_rng(seed)
    profile = {
        "driver": "GTiff",
        "dtype": "float32",
        "count": channels,
        "height": size,
        "width": size,
        "crs": "EPSG:32647",
        "transform": rasterio.Affine(10.0, 0.0, 600_000.0, 0.0, -10.0, 1_650_000.0),
        "nodata": float("nan"),
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
    }
    base = np.cumsum(rng.normal(size=(channels, 1, size)), axis=2).astype(np.float32) * 0.05
    with rasterio.open(path, "w", **profile) as dst:
        for r in range(0, size, 256):
            h = min(256, size - r)
            x = rng.normal(size=(channels, h, size)).astype(np.float32) + base
            if r == 0:
                x[:, 10:40, 10:40] = np.nan
            dst.write(x, window=rasterio.windows.Window(0, r, size, h))
    return path


def write_model(path: Path, channels: int, base: int, depth: int) -> Path:
    """A random U-Net checkpoint with its seam margin stored (as final_train stores it)."""
    torch.manual_seed(0)
    cfg = TrainConfig(in_channels=channels, base_channels=base, depth=depth, norm="batch", amp="none")
    model = UNet.from_config(cfg).eval()
    state = {
        "format": CHECKPOINT_FORMAT,
        "epoch": 1,
        "config": cfg.to_dict(),
        "norm": NormStats([0.0] * channels, [1.0] * channels, 120.0, 60.0).to_dict(),
        "model": model.state_dict(),
        "optimizer": {},
        "scheduler": {},
        "scaler": {},
        "rng": {},
        "history": [],
        "best": {"epoch": 1, "val_rmse": 0.0},
        "seam_margin": measure_margin(model, channels),
    }
    save_checkpoint(state, path)
    return path


def agreement(a_path: Path, b_path: Path) -> tuple[float, float]:
    """p99 and max |a - b| over pixels with data in both, as fractions of a's mean (band 1, mean)."""
    with rasterio.open(a_path) as a, rasterio.open(b_path) as b:
        x, y = a.read(1), b.read(1)
    ok = np.isfinite(x) & np.isfinite(y)
    assert (np.isfinite(x) == np.isfinite(y)).all(), "the maps' nodata differ"
    d = np.abs(x[ok] - y[ok]) / float(np.mean(x[ok]))
    return float(np.percentile(d, 99)), float(d.max())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=2048, help="scene side in px (default 2048)")
    p.add_argument("--memory-size", type=int, default=0, help="also map a scene this large (0: no)")
    p.add_argument("--memory-workers", type=int, default=1, help="workers for the --memory-size scene (default 1)")
    p.add_argument("--channels", type=int, default=14)
    p.add_argument("--base-channels", type=int, default=8)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--tile-size", type=int, default=256)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--workdir", default=None, help="where the scene and maps go (default: a temporary folder)")
    p.add_argument("--json", default=None, help="write the figures to this file")
    a = p.parse_args()
    from ray.cluster_utils import Cluster

    work = Path(a.workdir or tempfile.mkdtemp(prefix="maps_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    scene = write_scene(work / "scene.tif", a.size, a.channels)
    model = write_model(work / "model.pt", a.channels, a.base_channels, a.depth)
    px = a.size * a.size
    rows = []

    def say(row: dict) -> None:
        rows.append(row)
        print("[maps_scale] " + ", ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    t0 = time.perf_counter()
    single = predict_map(
        model, [scene], work / "single.tif", tile_size=a.tile_size, device="cpu", progress=False, overwrite=True
    )
    dt = time.perf_counter() - t0
    say(
        {
            "run": "predict_map, 1 process",
            "threads": torch.get_num_threads(),
            "seconds": round(dt, 2),
            "Mpx/s": round(px / dt / 1e6, 4),
            "startup_s": "",
            "cog_s": "",
            "Mpx/s_after_startup": round(px / dt / 1e6, 4),
            "worker_rss_anon_mb": "",
            "p99_diff": "",
            "max_diff": "",
        }
    )

    os.environ.setdefault("RAY_TMPDIR", f"/tmp/rms_{os.getpid()}")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    node = {"num_cpus": 1, "num_gpus": 0, "object_store_memory": 200 * 1024**2}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    try:
        runs = [(1, scene, a.size), (2, scene, a.size)]
        if a.memory_size:
            large = write_scene(work / "large.tif", a.memory_size, a.channels, seed=1)
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            decoded = 4 * a.channels * a.memory_size**2
            print(
                f"[maps_scale] large scene: {decoded / 1e9:.2f} GB as float32, RAM {ram / 1e9:.1f} GB, "
                f"RAM / {a.memory_workers} workers = {ram / a.memory_workers / 1e9:.1f} GB",
                flush=True,
            )
            runs.append((a.memory_workers, large, a.memory_size))
        for workers, src, size in runs:
            out = work / f"ray_{workers}w_{size}"
            shutil.rmtree(out, ignore_errors=True)  # from scratch: nothing staged by an earlier bench
            t0 = time.perf_counter()
            done = map_scenes(
                model,
                [Scene(src.stem, (str(src),))],
                out,
                tile_size=a.tile_size,
                block_size=a.block_size,
                device="cpu",
                address=cluster.address,
                workers=workers,
                progress=False,
            )
            dt = time.perf_counter() - t0
            p99 = mx = ""
            if src == scene:
                p99_f, mx_f = agreement(single.out, done.scenes[0].out)
                p99, mx = f"{p99_f:.2e}", f"{mx_f:.2e}"
            say(
                {
                    "run": f"map_scenes, {done.workers} worker(s) on {len(done.nodes)} node(s), {size} px",
                    "threads": 1,
                    "seconds": round(dt, 2),
                    "Mpx/s": round(size * size / dt / 1e6, 4),
                    "startup_s": round(done.startup_seconds, 2),
                    "cog_s": round(done.assemble_seconds, 2),
                    "Mpx/s_after_startup": round(size * size / (dt - done.startup_seconds) / 1e6, 4),
                    "worker_rss_anon_mb": round(done.worker_rss_anon_mb),
                    "p99_diff": p99,
                    "max_diff": mx,
                }
            )
    finally:
        cluster.shutdown()
    meta = {
        "size": a.size,
        "channels": a.channels,
        "base_channels": a.base_channels,
        "depth": a.depth,
        "tile_size": a.tile_size,
        "block_size": a.block_size,
        "cpus": os.cpu_count(),
        "machine": platform.node(),
        # the bench process: the single-process predict_map and every map_scenes driver (blocks written here)
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print(f"[maps_scale] peak RSS of this process (predict_map + the drivers): {meta['driver_peak_rss_mb']} MB")
    print(
        f"\nscene {a.size} x {a.size} x {a.channels}, U-Net base {a.base_channels} depth {a.depth}, "
        f"tile {a.tile_size}, block {a.block_size}, {os.cpu_count()} CPU cores\n"
    )
    print(
        "| run | torch threads | seconds | Mpx/s | startup s | COG s | Mpx/s after startup | worker RssAnon MB "
        "| p99 \\|diff\\| / mean | max \\|diff\\| / mean |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(v) for v in r.values()) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
