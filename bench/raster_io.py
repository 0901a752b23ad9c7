"""Benchmark: prepare and predict on a large GeoTIFF stack (default 8192 x 8192 x 14 float32, about 3.8 GB).

Each step runs as its own subprocess (``python -m tune_agb.prepare``; predict through a small wrapper that calls
``tune_agb.predict.main`` unchanged and reports timings); its peak resident memory is the child's ``ru_maxrss`` from
``os.wait4`` and its wall time is measured around it. Throughput: megapixels of input per second of the predict
step's wall time (``Mpx/s``), MB of input raster read per second, tiles (prepare) or windows (predict) per second.
The wrapper also reports, from inside predict: the seconds spent in the model's forward passes (host-to-device
copies included, synchronised on CUDA), the window pixels the model saw (overlap included), and on CUDA the peak
device memory that torch allocated.

The model has random weights, ``--base-channels`` and ``--depth`` (default 4 and 2: a tiny U-Net, so that the figure
measures the raster I/O and blending path; ``--base-channels 32 --depth 4`` is the default training size). Its seam
margin is stored in the checkpoint as final_train does (``--seam-margin``, or measured here on the CPU), so the
overlap is twice that margin as in a real run.

    python bench/raster_io.py                 # full size; needs ~8 GB free disk in --workdir
    python bench/raster_io.py --size 2048     # quicker
    python bench/raster_io.py --skip-prepare --baseline-src /tmp/old   # predict now and with an older source tree
    python bench/raster_io.py --skip-prepare --device cuda --base-channels 32 --depth 4 --seam-margin 16 \
        --predict-tile 1024 --batch-size 8 --timeout 40 --json predict_gpu.json   # predict throughput on the GPU
    python bench/raster_io.py --size 2048 --skip-prepare --device cpu --base-channels 32 --depth 4 \
        --seam-margin 16 --predict-tile 1024 --batch-size 8                        # the CPU figure to set beside it

16 px is what ``measure_margin`` gives this random base-32, depth-4 model (a trained one has more); passing it
skips the measurement. ``--timeout`` stops predict (SIGTERM) and still reports what it did; the predict child is
also killed if this script is killed.

Every step prints one line starting with ``[raster_io]`` (predict's lines contain ``Mpx/s``), then a markdown table;
``--json FILE`` writes the same figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
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
from tune_agb.engine.seams import measure_margin

CRS_UTM = "EPSG:32647"


def write_stack(path: Path, size: int, bands: int, seed: int = 0, interleave: str = "band") -> Affine:
    """A tiled (512 px), uncompressed float32 stack with a nodata hole, written in strips of 512 rows (bounded memory).

    Fast to write: one strip of uniform noise is drawn once and every strip writes it shifted along the columns by
    another amount (no two neighbouring blocks alike), instead of drawing the whole raster. ``band`` interleaving
    (each band's blocks apart) writes and reads several times faster than GDAL's default ``pixel`` interleaving,
    which the first version of this script used (bench/RESULTS.md): the window reads of predict are part of its
    figure, so the input's layout is reported with it."""
    transform = Affine(10.0, 0.0, 600_000.0, 0.0, -10.0, 1_650_000.0)
    profile = {"driver": "GTiff", "dtype": "float32", "count": bands, "height": size, "width": size, "crs": CRS_UTM,
               "transform": transform, "nodata": float("nan"), "tiled": True, "blockxsize": 512, "blockysize": 512,
               "interleave": interleave, "BIGTIFF": "YES"}  # fmt: skip
    strip = min(512, size)
    base = np.random.default_rng(seed).random((bands, strip, size), dtype=np.float32)
    with rasterio.Env(GDAL_CACHEMAX=512), rasterio.open(path, "w", **profile) as dst:
        for k, r in enumerate(range(0, size, strip)):
            h = min(strip, size - r)
            data = np.roll(base[:, :h], 97 * k, axis=2)
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


def make_checkpoint(path: Path, bands: int, base_channels: int, depth: int, margin: int | None) -> dict:
    """A random-weight U-Net checkpoint (batch norm, seed 0) with its seam margin stored as final_train stores it:
    ``margin`` px, or measured here on the CPU when None. Returns the model's description."""
    cfg = TrainConfig(in_channels=bands, base_channels=base_channels, depth=depth, norm="batch")
    torch.manual_seed(0)
    model = UNet.from_config(cfg).eval()
    t0 = time.perf_counter()
    measured = margin is None
    if measured:
        margin = measure_margin(model, bands, "cpu")
    margin_s = time.perf_counter() - t0
    norm = NormStats([0.5] * bands, [0.29] * bands, 100.0, 80.0)
    state = {"format": CHECKPOINT_FORMAT, "epoch": 1, "config": cfg.to_dict(), "norm": norm.to_dict(),
             "model": model.state_dict(), "optimizer": {}, "scheduler": {}, "scaler": {}, "rng": {}, "history": [],
             "best": {"epoch": 1, "val_rmse": 0.0}}  # fmt: skip
    if margin is not None:
        state["seam_margin"] = margin
    save_checkpoint(state, path)
    params = sum(p.numel() for p in model.parameters())
    return {"base_channels": base_channels, "depth": depth, "params": params, "seam_margin": margin,
            "margin_measured": measured, "margin_s": round(margin_s, 2), "amp": cfg.amp,
            "channels_last": cfg.channels_last}  # fmt: skip


# Runs ``tune_agb.predict.main`` unchanged, with the model's forward passes timed (synchronised on CUDA, where
# predict itself syncs right after them when it copies the maps back), and prints one ``BENCH_CHILD {json}`` line
# at exit, or on SIGTERM (a --timeout) with what was done so far.
CHILD = r"""
import json, os, signal, sys, time
t_start = time.perf_counter()
t_main = None
import torch
from tune_agb.errors import run_cli
from tune_agb.predict import main
stats = {"model_s": 0.0, "batches": 0, "window_px": 0}
try:
    from tune_agb.engine.inference import Predictor
except ImportError:  # an older source tree (--baseline-src): no model timings
    Predictor = None
if Predictor is not None:
    forward = Predictor.predict
    def timed(self, x):
        t = time.perf_counter()
        out = forward(self, x)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        stats["model_s"] += time.perf_counter() - t
        stats["batches"] += 1
        stats["window_px"] += int(x.shape[0]) * int(x.shape[-2]) * int(x.shape[-1])
        stats["device"] = str(self.device)
        return out
    Predictor.predict = timed
def report(code):
    now = time.perf_counter()
    stats.update(exit=code, in_process_s=now - t_start, main_s=None if t_main is None else now - t_main,
                 torch=torch.__version__, threads=torch.get_num_threads())
    dev = torch.device(stats.get("device") or "cuda")
    if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_initialized():
        stats["cuda_device"] = torch.cuda.get_device_name(dev)
        stats["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        stats["cuda_peak_reserved_mb"] = torch.cuda.max_memory_reserved(dev) / 2**20
    print("BENCH_CHILD " + json.dumps(stats), flush=True)
def on_term(signum, frame):
    report(124)
    os._exit(124)
signal.signal(signal.SIGTERM, on_term)
t_main = time.perf_counter()
code = run_cli(main, sys.argv[1:])
report(code)
sys.exit(code)
"""


def _die_with_parent() -> None:
    """In the child before it starts (Linux): SIGKILL it when this process dies, e.g. killed by a wrapper's own
    timeout, so that no predict run is left holding the GPU."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def measure(
    cmd: list[str],
    src: str | None = None,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> dict:
    """Run ``cmd`` (with ``src`` first on PYTHONPATH when given, ``env`` added to the environment); return its wall
    seconds, peak RSS in MB of that child alone, stdout, stderr and exit code. After ``timeout`` seconds the child
    gets SIGTERM (then SIGKILL 15 s later) and ``timed_out`` is set; another failure stops the benchmark when
    ``check``."""
    env = {**os.environ, **(env or {}), **({"PYTHONPATH": src} if src else {})}
    timers: list[threading.Timer] = []
    fired = threading.Event()
    with tempfile.TemporaryFile("w+") as fout, tempfile.TemporaryFile("w+") as ferr:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=fout, stderr=ferr, text=True, env=env, cwd=src,
                             preexec_fn=_die_with_parent if sys.platform == "linux" else None)  # fmt: skip

        def stop(sig: int) -> None:
            fired.set()
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, sig)  # not p.send_signal: its poll() could reap the child before os.wait4

        if timeout:
            timers = [threading.Timer(timeout, stop, (signal.SIGTERM,)), threading.Timer(timeout + 15, stop, (9,))]
            for t in timers:
                t.daemon = True
                t.start()
        _, status, usage = os.wait4(p.pid, 0)  # this child's own rusage (ru_maxrss in KB on Linux)
        wall = time.perf_counter() - t0
        for t in timers:
            t.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
        fout.seek(0)
        ferr.seek(0)
        out, err = fout.read(), ferr.read()
    if check and p.returncode != 0 and not fired.is_set():
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    return {"wall_s": wall, "rss_mb": usage.ru_maxrss / 1024, "stdout": out, "stderr": err, "exit": p.returncode,
            "timed_out": fired.is_set()}  # fmt: skip


def child_stats(stdout: str) -> dict:
    """The wrapper's ``BENCH_CHILD`` figures (empty when it printed none)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("BENCH_CHILD "):
            return json.loads(line[len("BENCH_CHILD ") :])
    return {}


def predict_step(run: dict, size: int, raster_mb: float, tag: str) -> dict:
    """The predict step's figures from :func:`measure`'s result; ``Mpx/s`` is input pixels per second of wall time."""
    child = child_stats(run["stdout"])
    mpx = size * size / 1e6
    windows = None
    if " windows" in run["stdout"] and "from " in run["stdout"]:
        windows = int(run["stdout"].split("from ")[1].split(" windows")[0])
    step = {"step": "predict" + tag, "wall_s": round(run["wall_s"], 2), "rss_mb": round(run["rss_mb"]),
            "timed_out": run["timed_out"], "exit": run["exit"], "input_mpx": round(mpx, 3),
            "windows": windows}  # fmt: skip
    if run["exit"] != 0 and not run["timed_out"]:
        err = [ln for ln in run["stderr"].strip().splitlines() if ln.strip()]
        return step | {"error": err[-1] if err else "(no output)", "stderr_tail": err[-30:]}
    if not run["timed_out"]:
        step |= {"mpx_s": round(mpx / run["wall_s"], 4), "read_mb_s": round(raster_mb / run["wall_s"], 1),
                 "windows_s": round(windows / run["wall_s"], 3) if windows else None}  # fmt: skip
    if child:
        model_s, wpx = child.get("model_s", 0.0), child.get("window_px", 0)
        main_s = child.get("main_s") or 0.0
        step |= {"main_s": round(main_s, 2), "startup_s": round(run["wall_s"] - main_s, 2),
                 "model_s": round(model_s, 2), "batches": child.get("batches"), "window_mpx": round(wpx / 1e6, 3),
                 "window_overhead": round(wpx / 1e6 / mpx, 3) if not run["timed_out"] else None,
                 "model_window_mpx_s": round(wpx / 1e6 / model_s, 3) if model_s else None,
                 "torch": child.get("torch"), "threads": child.get("threads")}  # fmt: skip
        for k in ("cuda_device", "cuda_peak_allocated_mb", "cuda_peak_reserved_mb"):
            if k in child:
                step[k] = round(child[k]) if k.endswith("_mb") else child[k]
    return step


def predict_line(s: dict, label: str) -> str:
    """The one summary line of a predict step (contains ``Mpx/s``)."""
    head = f"[raster_io] predict{s['step'][len('predict') :]} {label}: "
    if s.get("error"):
        return head + f"FAILED (exit {s['exit']}): {s['error']}"
    if s["timed_out"]:
        done = s.get("window_mpx") or 0.0
        main_s = s.get("main_s") or s["wall_s"]
        return (head + f"TIMEOUT after {s['wall_s']:.1f} s: {s.get('batches') or 0} batches, {done:.1f} window Mpx "
                f"done (~{done / main_s:.3f} window Mpx/s inside predict); peak RSS {s['rss_mb']} MB")  # fmt: skip
    line = (head + f"{s['input_mpx']:.2f} Mpx in {s['wall_s']:.1f} s = {s['mpx_s']:.3f} Mpx/s; "
            f"{s['windows_s']} windows/s ({s['windows']} windows); peak RSS {s['rss_mb']} MB")  # fmt: skip
    if "cuda_peak_allocated_mb" in s:
        line += f"; peak CUDA memory {s['cuda_peak_allocated_mb']} MB allocated ({s['cuda_peak_reserved_mb']} reserved)"
    if s.get("model_s"):
        line += (f"; model {s['model_s']:.1f} s ({s['model_window_mpx_s']:.2f} window Mpx/s, window px "
                 f"x{s['window_overhead']}), startup {s['startup_s']:.1f} s")  # fmt: skip
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--bands", type=int, default=14)
    ap.add_argument("--interleave", choices=("band", "pixel"), default="band", help="input stack layout")
    ap.add_argument("--tile-size", type=int, default=244, help="prepare tile size (px)")
    ap.add_argument("--predict-tile", type=int, nargs="+", default=[512], help="predict window(s); one run each")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="predict's --device: cpu, cuda, cuda:N or auto")
    ap.add_argument("--base-channels", type=int, default=4, help="random-weight U-Net width (default 4: tiny)")
    ap.add_argument("--depth", type=int, default=2, help="random-weight U-Net depth (default 2)")
    ap.add_argument("--seam-margin", type=int, default=None,
                    help="seam margin stored in the checkpoint (px; default: measured on the CPU)")  # fmt: skip
    ap.add_argument("--gdal-num-threads", default=None,
                    help="GDAL_NUM_THREADS for predict (e.g. ALL_CPUS: multi-threaded DEFLATE of the map; "
                    "default unset, as predict runs)")  # fmt: skip
    ap.add_argument("--timeout", type=float, default=None, help="stop a predict run after this many seconds")
    ap.add_argument("--skip-prepare", action="store_true", help="measure predict only")
    ap.add_argument("--baseline-src", help="also run predict from this source tree (a worktree of an older commit)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a new temp folder, removed after)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="tune_agb_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    cpu = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})"
    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    report: dict = {"machine": {"cpu": cpu, "ram_gb": round(ram_gb, 1), "load_avg_1min": os.getloadavg()[0],
                                "python": platform.python_version(), "torch": torch.__version__,
                                "rasterio": rasterio.__version__, "gdal": rasterio.__gdal_version__},
                    "args": vars(a), "steps": []}  # fmt: skip

    def emit(line: str, step: dict) -> None:
        print(line, flush=True)
        report["steps"].append(step)
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=1))

    try:
        stack, shots, ckpt = work / "stack.tif", work / "shots.parquet", work / "model.pt"
        raster_mb = a.size * a.size * a.bands * 4 / 1e6
        t0 = time.perf_counter()
        transform = write_stack(stack, a.size, a.bands, interleave=a.interleave)
        write_s = time.perf_counter() - t0
        emit(f"[raster_io] write: {a.size} x {a.size} x {a.bands} float32 ({raster_mb / 1e3:.3g} GB, tiled 512, "
             f"{a.interleave}-interleaved, uncompressed) in {write_s:.1f} s = {raster_mb / 1e3 / write_s:.2f} GB/s",
             {"step": "write", "wall_s": round(write_s, 2), "gb": round(raster_mb / 1e3, 3),
              "interleave": a.interleave})  # fmt: skip
        model = make_checkpoint(ckpt, a.bands, a.base_channels, a.depth, a.seam_margin)
        report["model"] = model
        label = (f"[{a.device}, U-Net base {a.base_channels} depth {a.depth} ({model['params'] / 1e6:.2f} M "
                 f"weights, margin {model['seam_margin']} px)")  # fmt: skip
        py = sys.executable
        if not a.skip_prepare:
            n_shots = write_shots(shots, a.size, transform)
            run = measure(
                [py, "-m", "tune_agb.prepare", "--image", str(stack), "--gedi", str(shots), "--filter",
                 "l4_quality_flag==1", "--out", str(work / "ds"), "--tile-size", str(a.tile_size), "--no-progress"]
            )  # fmt: skip
            n_tiles = sum(1 for _ in (work / "ds" / "inputs").glob("*/*.npy"))
            shutil.rmtree(work / "ds")  # free the disk before the next step
            emit(f"[raster_io] prepare (tile {a.tile_size}): {a.size * a.size / 1e6:.2f} Mpx in {run['wall_s']:.1f} s "
                 f"= {raster_mb / run['wall_s']:.0f} read MB/s; {n_tiles / run['wall_s']:.1f} tiles/s ({n_tiles} "
                 f"tiles, {n_shots} shots); peak RSS {run['rss_mb']:.0f} MB",
                 {"step": "prepare", "wall_s": round(run["wall_s"], 2), "rss_mb": round(run["rss_mb"]),
                  "tiles": n_tiles, "shots": n_shots, "stdout": run["stdout"].strip()})  # fmt: skip
        env = {"GDAL_NUM_THREADS": a.gdal_num_threads} if a.gdal_num_threads else {}
        for tile in a.predict_tile:
            predict = [py, "-c", CHILD, "--model", str(ckpt), "--image", str(stack), "--out", str(work / "map.tif"),
                       "--tile-size", str(tile), "--batch-size", str(a.batch_size), "--device", a.device,
                       "--no-progress", "--overwrite"]  # fmt: skip
            for tag, src in [("", None)] + ([(f" [{a.baseline_src}]", a.baseline_src)] if a.baseline_src else []):
                run = measure(predict, src, a.timeout, env, check=False)
                step = predict_step(run, a.size, raster_mb, tag) | {"tile": tile, "batch_size": a.batch_size,
                                                                   "device": a.device}  # fmt: skip
                emit(predict_line(step, f"{label}, window {tile}, batch {a.batch_size}]"), step)
        print_table(report, a)
        if not a.skip_prepare:
            print("\n" + report["steps"][1]["stdout"])
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    if any(s.get("error") for s in report["steps"]):
        raise SystemExit(1)


def print_table(report: dict, a: argparse.Namespace) -> None:
    steps = report["steps"]
    m = report["model"]
    print(f"\n## raster I/O benchmark: {a.size} x {a.size} x {a.bands} float32 ({steps[0]['gb']:.3g} GB), "
          f"{report['machine']['cpu']}, {report['machine']['ram_gb']:.0f} GiB RAM, load average "
          f"{report['machine']['load_avg_1min']:.1f} at the start")  # fmt: skip
    print(f"input written in {steps[0]['wall_s']:.1f} s ({a.interleave}-interleaved); torch {torch.__version__}; "
          f"model: random U-Net base {m['base_channels']} depth {m['depth']}, seam margin {m['seam_margin']} px "
          f"({'measured in ' + str(m['margin_s']) + ' s' if m['margin_measured'] else 'given'})\n")  # fmt: skip
    print("| step | wall (s) | peak RSS (MB) | input Mpx per s | read MB/s | tiles or windows/s | model (s) "
          "| peak CUDA (MB) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for s in steps[1:]:
        if s["step"] == "prepare":
            print(f"| prepare (tile {a.tile_size}) | {s['wall_s']:.1f} | {s['rss_mb']} | "
                  f"{a.size * a.size / 1e6 / s['wall_s']:.3f} | {steps[0]['gb'] * 1e3 / s['wall_s']:.0f} | "
                  f"{s['tiles'] / s['wall_s']:.1f} ({s['tiles']} tiles) | | |")  # fmt: skip
            continue
        name = f"{s['step']} (window {s['tile']}, batch {s['batch_size']}, {s['device']})"
        if s.get("error"):
            print(f"| {name} | failed: {s['error']} | {s['rss_mb']} | | | | | |")
            continue
        if s["timed_out"]:
            print(f"| {name} | timed out at {s['wall_s']:.1f} | {s['rss_mb']} | | | | {s.get('model_s', '')} | |")
            continue
        print(f"| {name} | {s['wall_s']:.1f} | {s['rss_mb']} | {s['mpx_s']:.3f} | {s['read_mb_s']:.0f} | "
              f"{s['windows_s']} ({s['windows']} windows) | {s.get('model_s', '')} | "
              f"{s.get('cuda_peak_allocated_mb', '')} |")  # fmt: skip


if __name__ == "__main__":
    main()
