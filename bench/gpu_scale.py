"""Issue 30: a search end to end at scale on one GPU host, with a kill and a ``--resume``, measured from outside.

    python bench/gpu_scale.py store --out DIR --train 20000 --val 1000 --tile 244 [--workers 16]
    python bench/gpu_scale.py search --data DIR --out OUT --gpus-per-trial 0.25 --max-concurrent 4 \\
        --num-samples 8 --max-t 3 --kill-after 150 [--cpus-per-trial 3] [--budget-s 420]

**store** writes a synthetic dataset of 14-band tiles fast (20,000 tiles of 244 px: 33.3 GB of float16 inputs,
66.7 GB as float32), without going through ``tune_agb.store``'s packing:

- **The source tiles are placeholders.** ``DIR/inputs/{train,val}/NAME.npy`` (float32 (14, H, W)) and
  ``DIR/labels/{train,val}/NAME.npy`` (float32 (H, W)) are sparse files of the right byte size: a valid ``.npy``
  header and a hole (``truncate``), no data. They exist so that ``list_tiles`` / ``split_key`` see the tiles and
  give the store's key; **reading one gives zeros**. Do not train on ``DIR/inputs`` by any path other than the
  store (and do not touch or copy the placeholders: their modification times are part of the key).
- **The store is written directly** in ``tune_agb.store``'s format under ``--store-root`` (default ``DIR/store``;
  the search sets ``TUNE_AGB_STORE`` to it): one folder per split named by its key, with ``inputs.npy`` float16
  (N, 14, H, W), ``labels.npy`` float32 (N, H, W) and ``meta.json`` with the keys ``_pack`` writes. It is checked
  with the store's own ``_check_and_open`` and opened through ``DataSource(...).pinned()`` (what the search's
  driver does) to show that nothing would be packed.
- **The data:** a pool of ``--pool`` random tiles (two smooth latent fields, "vegetation" and "moisture", mixed into
  the 14 bands with band-typical means and spreads, plus per-pixel noise), each tile one of them flipped/transposed
  with its own per-band gain and offset; a cloud (NaN in the 12 optical bands) over a square in 20 % of tiles;
  labels (Mg/ha-like) at ~1.1 % of pixels along GEDI-like tracks (a shot every 3 px, tracks 30 px apart, tilted),
  each ``max(0, 120 + 40 z(B8) - 15 z(B4) + 10 z(VH) + N(0, 8))`` of the tile's own (pre-cloud) bands, ``z`` being
  a fixed nominal standardisation: a per-pixel linear function of the inputs, so val RMSE falls as trials train.
  Val tiles come from the same pool (near-duplicates of train tiles under other gains): a throughput benchmark,
  not a generalisation test.
- **Parallel:** ``--workers`` processes (fork) fill slices of the two memory maps, each opening the ``.npy`` in
  ``r+`` mode. The normalisation statistics are **exact** by default: each worker keeps ``StatsAccumulator``'s
  float64 sums (per band sum, sum of squares, count of finite values; labels' count, sum, sum of squares) over the
  float16 values as stored (what the trials read; ``_pack`` would sum the float32 sources instead, a difference
  of float16 rounding), and the parent adds them into a ``StatsAccumulator``; ``--stats-every K`` uses every
  K-th tile only (the labelled and non-finite counts stay exact).
- Prints the sizes (GB as float16 and the float32 equivalent) and the time of each step; writes
  ``DIR/gpu_scale_store.json`` (the manifest ``search`` reads).

**search** writes a search space (ASHA, grace period 1, 244-px U-Nets of depth 4, ``base_channels`` and
``batch_size`` searched among ``--base-channels`` / ``--batch-sizes``, lr searched, ``wsd`` schedule) and runs
``python -m tune_agb.search`` on the store in its own process group; once ``--kill-after`` seconds have passed and
at least one epoch is reported it SIGKILLs the whole group, then runs the same command with ``--resume`` to the end.
Every ``--sample-every`` seconds it records ``nvidia-smi``'s utilisation and memory (when ``nvidia-smi`` exists) and
the ``RssAnon`` of the search driver and of every ``ray::`` process. At the end it writes ``OUT/summary.json``:

- ``gpu``: utilisation (mean, per phase, per 10-s bin) and memory;
- ``rss``: per trial and process (found by the ``pid`` column of the results; a resumed trial has two), RssAnon at
  the first sample of the process's time on the trial, at its first report, at its last, and the max; ``growth_mb``
  = the max after the first report - at the first report (start-up, imports and the CUDA context come before the
  first report and are not growth);
- ``epochs``: epochs per trial, seconds per epoch (between consecutive reports of one process; a process's first
  epoch holds its start-up and is left out), each trial's peak GPU memory (``gpu_mem_peak_gb``), and the compute
  bound per epoch: forward + backward FLOPs per sample (``FlopCounterMode``) x samples per epoch + the val
  forward pass, over ``--peak-tflops`` (989: H200 dense bf16), for the whole card and for the trial's share;
- ``resume``: whether the kill happened (and when), the exit codes, each trial's status, whether every trial
  finished, and the trials that reported both before and after the kill (``continued_across_kill``: their last
  epoch before it and first after it);
- ``best``: the best val RMSE (trial, epoch, configuration) and each trial's first and best val RMSE.

Files in ``OUT``: ``space.yaml``, ``search_first.log``, ``search_resume.log``, ``gpu_timeline.csv``,
``rss_timeline.csv``, ``gpu_scale.log`` (each step), ``summary.json``, and the experiment under ``OUT/ray/scale``.
``--budget-s``: the waits end in time for a summary (the search is interrupted with SIGINT, then killed). Every step
logs its failure and the summary is still written.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tune_agb.bands import BAND_NAMES  # noqa: E402
from tune_agb.engine.data import StatsAccumulator  # noqa: E402
from tune_agb.store import (  # noqa: E402
    INPUTS,
    LABELS,
    META,
    STORE_FORMAT,
    _check_and_open,
    list_tiles,
    split_key,
)

C = len(BAND_NAMES)
MANIFEST = "gpu_scale_store.json"
SPLIT_IDS = {"train": 1, "val": 2}
# Nominal band levels: reflectance for the 12 Sentinel-2 bands, dB for VV and VH.
#                   B1    B2    B3    B4    B5    B6    B7    B8    B8A   B9    B11   B12    VV     VH
MEAN = np.array([0.05, 0.07, 0.09, 0.08, 0.13, 0.22, 0.26, 0.28, 0.30, 0.30, 0.20, 0.12, -12.0, -19.0], np.float32)
SD = np.array([0.02, 0.02, 0.03, 0.04, 0.04, 0.05, 0.06, 0.07, 0.07, 0.06, 0.05, 0.04, 3.0, 3.0], np.float32)
VEG = np.array([-0.3, -0.4, -0.3, -0.8, -0.2, 0.6, 0.8, 0.9, 0.9, 0.7, -0.5, -0.7, 0.5, 0.7], np.float32)
WET = np.array([0.1, 0.1, 0.1, 0.1, 0.1, 0.0, 0.0, 0.1, 0.1, 0.3, -0.6, -0.5, 0.4, 0.2], np.float32)
B4, B8, VH = BAND_NAMES.index("B4"), BAND_NAMES.index("B8"), BAND_NAMES.index("VH")
TRACK_SPACING, SHOT_STEP, TRACK_TILT = 30, 3, math.tan(math.radians(6))
CLOUD_SHARE = 0.2
GB = 1e9


def log(out: Path | None, msg: str) -> None:
    """One line to stdout and to ``OUT/gpu_scale.log``."""
    line = f"{time.strftime('%H:%M:%S')} {msg}"
    print(line, flush=True)
    if out is not None:
        with (out / "gpu_scale.log").open("a") as f:
            f.write(line + "\n")


# -- store: the synthetic tiles --------------------------------------------------------------------------------------
def _upsample(g: np.ndarray, t: int) -> np.ndarray:
    """A (k, k) grid bilinearly up to (t, t), elementwise only (no BLAS threads in the parent before the fork)."""
    k = g.shape[0]
    p = np.linspace(0, k - 1, t)
    i0 = np.minimum(p.astype(int), k - 2)
    w = (p - i0).astype(np.float32)
    rows = g[i0] * (1 - w)[:, None] + g[i0 + 1] * w[:, None]
    return rows[:, i0] * (1 - w)[None] + rows[:, i0 + 1] * w[None]


def make_pool(n: int, tile: int, seed: int) -> np.ndarray:
    """``n`` base tiles (n, 14, tile, tile) float32: two smooth latent fields mixed into the bands, plus noise."""
    rng = np.random.default_rng(seed)
    k = max(3, tile // 24)
    pool = np.empty((n, C, tile, tile), np.float32)
    for j in range(n):
        veg, wet = (_upsample(rng.standard_normal((k, k)).astype(np.float32), tile) for _ in range(2))
        veg /= veg.std() + 1e-6
        wet /= wet.std() + 1e-6
        noise = rng.standard_normal((C, tile, tile), dtype=np.float32)
        pool[j] = MEAN[:, None, None] + SD[:, None, None] * (
            VEG[:, None, None] * veg + WET[:, None, None] * wet + 0.4 * noise
        )
    return pool


def label_of(x: np.ndarray) -> np.ndarray:
    """The label of pixels with bands ``x`` (14, ...): a linear function of three standardised bands, floored at 0."""
    z = (x - MEAN.reshape(-1, *[1] * (x.ndim - 1))) / SD.reshape(-1, *[1] * (x.ndim - 1))
    return 120.0 + 40.0 * z[B8] - 15.0 * z[B4] + 10.0 * z[VH]


def synth_tile(pool: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One tile: inputs (14, T, T) float32 (NaN under a cloud) and labels (T, T) float32 (NaN off the tracks)."""
    t = pool.shape[-1]
    x = pool[int(rng.integers(len(pool)))]
    if rng.random() < 0.5:
        x = x[:, ::-1]
    if rng.random() < 0.5:
        x = x[:, :, ::-1]
    if rng.random() < 0.5:
        x = x.transpose(0, 2, 1)
    gain = rng.uniform(0.9, 1.1, C).astype(np.float32)
    offset = (rng.normal(0.0, 0.1, C) * SD).astype(np.float32)
    x = x * gain[:, None, None] + offset[:, None, None]
    lab = np.full((t, t), np.nan, np.float32)
    rows = np.arange(int(rng.integers(SHOT_STEP)), t, SHOT_STEP)
    col0 = int(rng.integers(TRACK_SPACING))
    shift = np.round(rows * TRACK_TILT).astype(int)
    for c in range(col0, t + int(shift[-1]) if rows.size else t, TRACK_SPACING):
        cols = c - shift
        ok = (cols >= 0) & (cols < t)
        r, cc = rows[ok], cols[ok]
        if r.size:
            y = label_of(x[:, r, cc]) + rng.normal(0.0, 8.0, r.size)
            lab[r, cc] = np.maximum(y, 0.0)
    if rng.random() < CLOUD_SHARE:
        s = max(2, t // 6)
        r0, c0 = (int(v) for v in rng.integers(0, t - s, 2))
        x[:12, r0 : r0 + s, c0 : c0 + s] = np.nan
    return x, lab


_POOL: np.ndarray | None = None  # set in the parent before the fork; the workers share it copy-on-write


def band_sums(x16: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-band sum, sum of squares and count of the finite values of one float16 tile (14, H, W), in float64: the
    sums ``StatsAccumulator.add`` keeps (bit for bit: a float16 value squared is exact in float32), at half its cost."""
    x = x16.astype(np.float32)
    nan = np.isnan(x)
    bad = nan.sum(axis=(1, 2))
    if bad.any():
        x[nan] = 0.0
    return x.sum(axis=(1, 2), dtype=np.float64), (x * x).sum(axis=(1, 2), dtype=np.float64), x[0].size - bad


def _fill(task: tuple[int, int, str, str, int, int, int]) -> dict[str, Any]:
    """Fill tiles ``start:stop`` of one split's memory maps; return its stats sums and counts."""
    seed, split_id, inputs_path, labels_path, start, stop, stats_every = task
    assert _POOL is not None
    inputs = np.load(inputs_path, mmap_mode="r+")
    labels = np.load(labels_path, mmap_mode="r+")
    s, ss, cnt, t = np.zeros(C), np.zeros(C), np.zeros(C), np.zeros(3)
    labelled = nonfinite = 0
    for i in range(start, stop):
        x, lab = synth_tile(_POOL, np.random.default_rng((seed, split_id, i)))
        x16 = x.astype(np.float16)
        inputs[i] = x16
        labels[i] = lab
        y = lab[np.isfinite(lab)].astype(np.float64)
        labelled += y.size
        nonfinite += int(np.isnan(x16).sum())
        if i % stats_every == 0:  # the values as stored: what the trials read
            bs, bss, bc = band_sums(x16)
            s, ss, cnt = s + bs, ss + bss, cnt + bc
            t += (y.size, y.sum(), (y * y).sum())
    del inputs, labels
    sums = {"s": s.tolist(), "ss": ss.tolist(), "cnt": cnt.tolist(), "t": t.tolist()}
    return {"sums": sums, "labelled": labelled, "nonfinite": nonfinite}


def _merge(parts: list[dict[str, Any]]) -> StatsAccumulator:
    sums = {k: np.sum([np.asarray(p["sums"][k]) for p in parts], axis=0).tolist() for k in ("s", "ss", "cnt", "t")}
    return StatsAccumulator.from_dict(sums)


def _npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    buf = io.BytesIO()
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, d)
    return buf.getvalue()


def write_placeholders(folder: Path, names: list[str], shape: tuple[int, ...]) -> int:
    """Sparse float32 ``.npy`` files of ``shape``: the header, then a hole up to the full size. Returns that size."""
    folder.mkdir(parents=True, exist_ok=True)
    header = _npy_header(shape, "<f4")
    size = len(header) + 4 * math.prod(shape)
    for n in names:
        with open(folder / f"{n}.npy", "wb") as f:
            f.write(header)
            f.truncate(size)
    return size


def split_sizes(n: int, tile: int) -> dict[str, int]:
    return {"inputs_f16": n * C * tile * tile * 2, "inputs_f32": n * C * tile * tile * 4, "labels": n * tile * tile * 4}


def clear_old(out: Path, root: Path, overwrite: bool) -> bool:
    """Remove a dataset already in ``out`` (its sources, its store folders, a staging folder left by a killed run)
    when ``overwrite``; False when there is one and no ``overwrite``."""
    manifest = out / MANIFEST
    if not any(p.exists() for p in (out / "inputs", out / "labels", manifest)):
        return True
    if not overwrite:
        return False
    with contextlib.suppress(OSError, ValueError, KeyError):
        for s in json.loads(manifest.read_text())["splits"].values():
            shutil.rmtree(s["path"], ignore_errors=True)
    for d in (out / "inputs", out / "labels", *root.glob(".gpu-scale-*")):
        shutil.rmtree(d, ignore_errors=True)
    manifest.unlink(missing_ok=True)
    return True


def fill_stores(root: Path, keys: dict[str, str], counts: dict[str, int], a: argparse.Namespace, workers: int
                ) -> tuple[dict[str, Path], dict[str, list[dict[str, Any]]]]:  # fmt: skip
    """Each split's ``inputs.npy`` / ``labels.npy`` in a staging folder, filled by ``workers`` forked processes.

    Returns:
        The staging folders and, per split, the workers' sums and counts (one entry per chunk of tiles).
    """
    global _POOL
    _POOL = make_pool(a.pool, a.tile, a.seed)  # before the fork: shared by the workers
    stages: dict[str, Path] = {}
    tasks = []
    for s, n in counts.items():
        stage = stages[s] = root / f".gpu-scale-{keys[s]}-{os.getpid()}"
        stage.mkdir()
        for f, shape, dt in ((INPUTS, (n, C, a.tile, a.tile), np.float16), (LABELS, (n, a.tile, a.tile), np.float32)):
            arr = np.lib.format.open_memmap(stage / f, mode="w+", dtype=dt, shape=shape)  # sparse until filled
            del arr
        chunk = max(1, min(64, n // (workers * 4)))
        paths = str(stage / INPUTS), str(stage / LABELS)
        tasks += [(s, (a.seed, SPLIT_IDS[s], *paths, i, min(n, i + chunk), a.stats_every)) for i in range(0, n, chunk)]
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in counts}
    with mp.get_context("fork").Pool(workers) as pool:
        for (s, _), res in zip(tasks, pool.imap(_fill, [task for _, task in tasks]), strict=True):
            results[s].append(res)
    return stages, results


def finish_split(stage: Path, root: Path, split: str, key: str, names: list[str], tile: int, source: dict[str, str],
                 parts: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """Write ``meta.json`` as ``_pack`` does, rename the staging folder to the key and check it as the store does."""
    n = len(names)
    meta = {
        "format": STORE_FORMAT,
        "key": key,
        "split": split,
        "source": source,
        "dtype": "float16",
        "shape": [n, C, tile, tile],
        "names": names,
        "labelled": sum(r["labelled"] for r in parts),
        "nonfinite": sum(r["nonfinite"] for r in parts),
        "stats": _merge(parts).to_dict(),
        "created": time.time(),
    }
    tmp = stage / (META + ".tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, stage / META)
    path = root / key
    shutil.rmtree(path, ignore_errors=True)
    os.rename(stage, path)
    _check_and_open(path, key, split)  # raises ValueError naming what the store would reject
    return {
        "n": n,
        "key": key,
        "path": str(path),
        "labelled": meta["labelled"],
        "labelled_share": meta["labelled"] / (n * tile * tile),
        "nonfinite": meta["nonfinite"],
        **{f"{k}_bytes": v for k, v in split_sizes(n, tile).items()},
    }


def opened_as_written(root: Path, input_dir: Path, label_dir: Path, splits: dict[str, Any]) -> str:
    """Open the dataset the way the search's driver does (list, key, open; ``TUNE_AGB_STORE`` = ``root``); an empty
    string when it took the stores as written (same keys, same files, no staging folder), else what differed."""
    os.environ["TUNE_AGB_STORE"] = str(root)
    from tune_agb.store import DataSource

    mtimes = {s: (Path(v["path"]) / INPUTS).stat().st_mtime_ns for s, v in splits.items()}
    pinned = DataSource(str(input_dir), str(label_dir), ("train", "val"), in_channels=C, dtype="float16").pinned()
    keys = {s: v["key"] for s, v in splits.items()}
    if dict(pinned.keys) != keys:
        return f"keys {dict(pinned.keys)} != {keys}"
    if any((Path(v["path"]) / INPUTS).stat().st_mtime_ns != mtimes[s] for s, v in splits.items()):
        return "a store was rewritten"
    staging = sorted(p.name for p in root.glob(".staging-*"))
    return f"staging folders {staging}" if staging else ""


def store(a: argparse.Namespace) -> int:
    t_all = time.perf_counter()
    out = a.out.resolve()
    root = (a.store_root or out / "store").resolve()
    input_dir, label_dir = out / "inputs", out / "labels"
    if not clear_old(out, root, a.overwrite):
        print(f"error: {out} already holds a dataset (add --overwrite to replace it)", file=sys.stderr)
        return 2
    counts = {"train": a.train, "val": a.val}
    total = {k: sum(split_sizes(n, a.tile)[k] for n in counts.values()) for k in ("inputs_f16", "inputs_f32", "labels")}
    store_bytes = total["inputs_f16"] + total["labels"]
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < 1.02 * store_bytes:
        print(f"error: {root}: {free / GB:.1f} GB free, the store needs {store_bytes / GB:.1f} GB", file=sys.stderr)
        return 2
    times: dict[str, float] = {}

    t = time.perf_counter()
    names = {s: [f"{s}_{i:06d}" for i in range(n)] for s, n in counts.items()}
    for s in counts:
        write_placeholders(input_dir / s, names[s], (C, a.tile, a.tile))
        write_placeholders(label_dir / s, names[s], (a.tile, a.tile))
    times["placeholders_s"] = time.perf_counter() - t

    t = time.perf_counter()
    keys = {s: split_key(list_tiles(str(input_dir), str(label_dir), s), "float16") for s in counts}
    times["list_and_key_s"] = time.perf_counter() - t

    t = time.perf_counter()
    workers = max(1, min(a.workers, os.cpu_count() or 1))
    stages, results = fill_stores(root, keys, counts, a, workers)
    times["fill_s"] = time.perf_counter() - t

    t = time.perf_counter()
    source = {"input_dir": str(input_dir), "label_dir": str(label_dir)}
    splits = {s: finish_split(stages[s], root, s, keys[s], names[s], a.tile, source, results[s]) for s in counts}
    times["meta_and_check_s"] = time.perf_counter() - t

    t = time.perf_counter()
    problem = opened_as_written(root, input_dir, label_dir, splits)
    times["driver_open_s"] = time.perf_counter() - t
    if problem:
        print(f"error: the search would not take the store as written: {problem}", file=sys.stderr)
        return 1
    times["total_s"] = time.perf_counter() - t_all

    n_all = sum(counts.values())
    manifest = {
        "input_dir": str(input_dir),
        "label_dir": str(label_dir),
        "store_root": str(root),
        "tile": a.tile,
        "channels": C,
        "seed": a.seed,
        "pool": a.pool,
        "workers": workers,
        "stats": "exact (every tile)" if a.stats_every == 1 else f"every {a.stats_every}th tile",
        "splits": splits,
        "gb_float16_store": store_bytes / GB,
        "gb_float16_inputs": total["inputs_f16"] / GB,
        "gb_float32_equivalent": (total["inputs_f32"] + total["labels"]) / GB,
        "seconds": times,
        "tiles_per_s": n_all / times["fill_s"],
        "placeholders": "sparse .npy files of the right size: reading them gives zeros; the store holds the data",
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    shares = ", ".join(f"{s} {v['labelled_share']:.2%}" for s, v in splits.items())
    print(
        f"store: {a.train} train + {a.val} val tiles of {a.tile} px, 14 bands -> {root}\n"
        f"  size: {store_bytes / GB:.2f} GB as stored (inputs float16 {total['inputs_f16'] / GB:.2f} GB + labels "
        f"float32 {total['labels'] / GB:.2f} GB); as float32 {manifest['gb_float32_equivalent']:.2f} GB\n"
        f"  time: {times['total_s']:.1f} s in all: placeholders {times['placeholders_s']:.1f} s, list + keys of "
        f"{n_all} tiles {times['list_and_key_s']:.2f} s, fill {times['fill_s']:.1f} s ({manifest['tiles_per_s']:.0f} "
        f"tiles/s, {store_bytes / GB / times['fill_s']:.2f} GB/s, {workers} workers, pool included), meta + check "
        f"{times['meta_and_check_s']:.1f} s, the driver's open {times['driver_open_s']:.2f} s\n"
        f"  labelled pixels: {shares}; stats: {manifest['stats']}\n"
        f"  manifest: {out / MANIFEST}",
        flush=True,
    )
    return 0


# -- search: the run, the kill, the resume, the sampling --------------------------------------------------------------
def rss_anon_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def cmdline(pid: int | str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class Sampler:
    """Every ``every`` seconds: nvidia-smi's utilisation and memory per GPU, and the RssAnon of the search driver and
    of every ``ray::`` process, to two CSV files and to memory (for the summary)."""

    def __init__(self, out: Path, every: float):
        self.every, self.t0 = every, time.time()
        self.smi = shutil.which("nvidia-smi")
        self.phase, self.driver = "setup", 0
        self.gpu: list[tuple[float, str, int, float, float]] = []  # t, phase, gpu, util %, memory MiB
        self.rss: list[tuple[float, str, int, float, str]] = []  # wall time, phase, pid, RssAnon MB, title
        self.gpu_f = (out / "gpu_timeline.csv").open("w")
        self.gpu_f.write("t_s,phase,gpu,util_pct,mem_used_mib\n")
        self.rss_f = (out / "rss_timeline.csv").open("w")
        self.rss_f.write("t_s,wall_time,phase,pid,rss_anon_mb,title\n")
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.sample()
            except Exception as exc:  # a sampling hiccup must not end the benchmark
                if len(self.errors) < 20:
                    self.errors.append(f"{type(exc).__name__}: {exc}")

    def sample(self) -> None:
        now = time.time()
        rel = now - self.t0
        if self.smi:
            q = [self.smi, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
            try:
                lines = subprocess.run(q, capture_output=True, text=True, timeout=5).stdout.strip().splitlines()
            except (OSError, subprocess.SubprocessError) as exc:
                lines = []
                if len(self.errors) < 20:
                    self.errors.append(f"nvidia-smi: {exc}")
            for i, line in enumerate(lines):
                try:
                    util, mem = (float(v) for v in line.split(","))
                except ValueError:
                    continue
                self.gpu.append((rel, self.phase, i, util, mem))
                self.gpu_f.write(f"{rel:.1f},{self.phase},{i},{util:g},{mem:g}\n")
            self.gpu_f.flush()
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            pid = int(d)
            title = cmdline(pid)
            if pid != self.driver and not title.startswith("ray::"):
                continue
            rss = rss_anon_mb(pid)
            if rss is None:
                continue
            title = "driver" if pid == self.driver else title[:80].replace(",", ";")
            self.rss.append((now, self.phase, pid, rss, title))
            self.rss_f.write(f"{rel:.1f},{now:.2f},{self.phase},{pid},{rss:.1f},{title}\n")
        self.rss_f.flush()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.gpu_f.close()
        self.rss_f.close()


class SearchProcess:
    """``python -m tune_agb.search`` in its own process group, with its own short Ray temp dir."""

    def __init__(self, cmd: list[str], log_path: Path, env: dict[str, str], tag: str):
        self.ray_tmp = f"/tmp/gsc{os.getpid()}{tag}"  # short: Ray's socket paths are limited to 107 bytes
        self.log_path = log_path
        self.started = time.time()
        with log_path.open("w") as f:
            self.proc = subprocess.Popen(
                cmd,
                stdout=f,
                stderr=subprocess.STDOUT,
                env={**env, "RAY_TMPDIR": self.ray_tmp},
                cwd=REPO,
                start_new_session=True,
            )

    def kill(self) -> None:
        """SIGKILL the whole process group (the driver and the Ray processes it started), then the stragglers."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=60)
        self.cleanup()

    def interrupt(self, grace_s: float) -> None:
        """Ctrl-C for the driver (it saves Ray's state and writes the results), then a kill after ``grace_s``."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace_s)
        self.kill()

    def cleanup(self) -> list[int]:
        """Kill what is left of this search's Ray: its process group, and processes naming its temp dir."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        left = []
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) != os.getpid() and self.ray_tmp in cmdline(d):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(d), signal.SIGKILL)
                    left.append(int(d))
        return left

    def keep_logs(self, dest: Path, max_bytes: int = 2_000_000) -> None:
        """Copy Ray's session logs (files up to ``max_bytes``) to ``dest``: what a failed run leaves to read."""
        logs = Path(self.ray_tmp) / "session_latest" / "logs"
        for f in logs.rglob("*") if logs.is_dir() else []:
            with contextlib.suppress(OSError):
                if f.is_file() and f.stat().st_size <= max_bytes:
                    target = dest / f.relative_to(logs)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, target)

    def remove_tmp(self) -> None:
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def write_space(path: Path, a: argparse.Namespace) -> dict[str, Any]:
    import yaml

    space = {
        "experiment": {
            "metric": "val_rmse",
            "mode": "min",
            "num_samples": a.num_samples,
            "max_concurrent": a.max_concurrent,
            "time_budget_s": None,
            "max_failures": 1,
        },
        "scheduler": {
            "type": "asha",
            "max_t": a.max_t,
            "grace_period": 1,
            "reduction_factor": a.reduction_factor,
            "brackets": 1,
        },
        "searcher": {"type": "optuna", "seed": a.seed, "n_startup_trials": max(1, a.num_samples // 2)},
        "resources": {"cpu": a.cpus_per_trial, "gpu": a.gpus_per_trial},
        "fixed": {
            "depth": a.depth,
            "schedule": "wsd",
            "norm": "batch",
            "amp": "auto",
            "augment": True,
            "steps_per_epoch": a.steps_per_epoch,
        },
        "params": {
            "lr": {"type": "float", "low": 3.0e-4, "high": 3.0e-3, "log": True},
            "base_channels": {"type": "categorical", "choices": a.base_channels},
            "batch_size": {"type": "categorical", "choices": a.batch_sizes},
        },
    }
    path.write_text(
        "# bench/gpu_scale.py search: written for this run (issue 30)\n" + yaml.safe_dump(space, sort_keys=False)
    )
    return space


def epochs_reported(exp: Path) -> int:
    from tune_agb.search.experiment import read_trial_rows

    return sum(1 for r in read_trial_rows(str(exp)) if "epoch" in r)


def flops(base: int, depth: int, tile: int) -> tuple[float, float]:
    """FLOPs per sample of the U-Net (base, depth) at ``tile`` px: (forward + backward, forward only)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(REPO / "bench"))
    from train_throughput import count_flops_per_sample

    from tune_agb.engine.config import TrainConfig
    from tune_agb.engine.model import UNet

    cfg = TrainConfig(base_channels=base, depth=depth)
    fb = count_flops_per_sample(cfg, tile)
    model = UNet.from_config(cfg).to("meta").eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(2, C, tile, tile, device="meta"))
    return fb, counter.get_total_flops() / 2


def gpu_summary(s: Sampler) -> dict[str, Any]:
    if not s.smi:
        return {"nvidia_smi": False}
    if not s.gpu:
        return {"nvidia_smi": True, "samples": 0}
    per_t: dict[float, list[tuple[str, float, float]]] = {}
    for t, phase, _, util, mem in s.gpu:
        per_t.setdefault(t, []).append((phase, util, mem))
    rows = [(t, v[0][0], float(np.mean([u for _, u, _ in v])), float(np.sum([m for _, _, m in v]))) for t, v in
            sorted(per_t.items())]  # fmt: skip
    bins: dict[int, list[tuple[str, float, float]]] = {}
    for t, phase, util, mem in rows:
        bins.setdefault(int(t // 10), []).append((phase, util, mem))
    phases = sorted({r[1] for r in rows})
    return {
        "nvidia_smi": True,
        "samples": len(rows),
        "util_mean_pct": float(np.mean([r[2] for r in rows])),
        "util_mean_pct_by_phase": {p: float(np.mean([r[2] for r in rows if r[1] == p])) for p in phases},
        "mem_used_max_mib": float(max(r[3] for r in rows)),
        "bins_10s": [
            {
                "t_s": 10 * b,
                "phase": v[-1][0],
                "util_pct": round(float(np.mean([u for _, u, _ in v])), 1),
                "mem_mib": round(float(np.mean([m for _, _, m in v]))),
            }
            for b, v in sorted(bins.items())
        ],
    }


def rss_per_trial(s: Sampler, df: Any) -> dict[str, Any]:
    """Per trial and process (``pid`` of its reports): RssAnon over the process's time on the trial."""
    samples: dict[int, list[tuple[float, float, str]]] = {}
    for wall, _, pid, rss, title in s.rss:
        samples.setdefault(pid, []).append((wall, rss, title))
    # Which trial had a process when: reports sorted by time; a process may serve several trials (reused actors).
    spans: list[tuple[int, str, float, float]] = []  # pid, trial, first report, last report
    for (pid, trial), g in df.dropna(subset=["pid"]).groupby(["pid", "trial_id"]):
        spans.append((int(pid), str(trial), float(g["wall_time"].min()), float(g["wall_time"].max())))
    out: dict[str, Any] = {}
    for pid, trial, first, last in sorted(spans, key=lambda v: (v[0], v[2])):
        before = [sp[3] for sp in spans if sp[0] == pid and sp[3] < first]
        start = max(before) if before else -math.inf
        window = [(w, r, t) for w, r, t in samples.get(pid, []) if start < w <= last + 1.5]
        if not window:
            out.setdefault(trial, []).append({"pid": pid, "samples": 0})
            continue
        after_first = [(w, r) for w, r, _ in window if w >= first - 1.5]
        at_first = after_first[0][1] if after_first else window[-1][1]
        peak_after = max((r for _, r in after_first), default=at_first)
        out.setdefault(trial, []).append(
            {
                "pid": pid,
                "title": window[-1][2],
                "samples": len(window),
                "rss_first_sample_mb": round(window[0][1], 1),
                "rss_at_first_report_mb": round(at_first, 1),
                "rss_last_mb": round(window[-1][1], 1),
                "rss_max_mb": round(max(r for _, r, _ in window), 1),
                "growth_mb": round(peak_after - at_first, 1),
                "startup_to_first_epoch_s": round(first - window[0][0], 1),
            }
        )
    growth = [p["growth_mb"] for v in out.values() for p in v if "growth_mb" in p]
    drivers = [r for _, _, _, r, t in s.rss if t == "driver"]
    return {
        "trials": out,
        "max_growth_mb": max(growth) if growth else None,
        "flat": bool(growth) and max(growth) < 256,
        "flat_rule": "every trial process: max RssAnon after its first report - at its first report < 256 MB",
        "driver_rss_max_mb": round(max(drivers), 1) if drivers else None,
        "ray_processes_seen": len(samples),
    }


def epoch_summary(df: Any, a: argparse.Namespace, manifest: dict[str, Any]) -> dict[str, Any]:
    """Epochs per trial, seconds per epoch between consecutive reports of one process, and the compute bound."""
    tile = manifest["tile"]
    n_train, n_val = manifest["splits"]["train"]["n"], manifest["splits"]["val"]["n"]
    per_trial: dict[str, Any] = {}
    by_base: dict[int, list[float]] = {}
    for trial, g in df.sort_values(["trial_id", "epoch"]).groupby("trial_id"):
        secs = []
        rows = list(g.itertuples())
        for prev, cur in itertools.pairwise(rows):
            if cur.epoch == prev.epoch + 1 and cur.pid == prev.pid:
                secs.append(float(cur.wall_time - prev.wall_time))
        base = int(g["config/base_channels"].iloc[0])
        batch = int(g["config/batch_size"].iloc[0])
        by_base.setdefault(base, []).extend(secs)
        per_trial[str(trial)] = {
            "epochs": int(g["epoch"].max()),
            "reports": len(g),
            "processes": int(g["pid"].nunique()),
            "base_channels": base,
            "batch_size": batch,
            "lr": float(g["config/lr"].iloc[0]),
            "epoch_s": [round(v, 2) for v in secs],
            "epoch_s_median": round(float(np.median(secs)), 2) if secs else None,
            "val_rmse_first": float(g["val_rmse"].iloc[0]),
            "val_rmse_best": float(g["val_rmse"].min()),
            "gpu_mem_peak_gb": float(g["gpu_mem_peak_gb"].max()) if g["gpu_mem_peak_gb"].notna().any() else None,
            "infeasible": next((v for v in g["infeasible"] if isinstance(v, str) and v), None),
        }
    peak = a.peak_tflops if a.gpus_per_trial > 0 else None
    bound: dict[str, Any] = {"peak_tflops": peak, "train_tiles": n_train, "val_tiles": n_val}
    for base in sorted({v["base_channels"] for v in per_trial.values()} | set(a.base_channels)):
        try:
            fb, fwd = flops(base, a.depth, tile)
        except Exception as exc:  # the FLOP count is a figure of the report, not a step to fail on
            bound[f"base_{base}"] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        entry: dict[str, Any] = {"flops_fwd_bwd_per_sample": fb, "flops_fwd_per_sample": fwd}
        for batch in a.batch_sizes:
            samples = a.steps_per_epoch * batch if a.steps_per_epoch else n_train
            epoch_flops = fb * samples + fwd * n_val
            e: dict[str, Any] = {"samples_per_epoch": samples, "epoch_tflop": epoch_flops / 1e12}
            if peak:
                e["bound_s_whole_card"] = epoch_flops / (peak * 1e12)
                e["bound_s_at_share"] = e["bound_s_whole_card"] / min(1.0, a.gpus_per_trial)
            entry[f"batch_{batch}"] = e
        measured = by_base.get(base) or []
        if measured:
            entry["epoch_s_median"] = float(np.median(measured))
            if peak:
                shares = [
                    entry[f"batch_{v['batch_size']}"]["bound_s_at_share"] / v["epoch_s_median"]
                    for v in per_trial.values()
                    if v["base_channels"] == base and v["epoch_s_median"] and f"batch_{v['batch_size']}" in entry
                ]
                entry["share_of_peak_at_share_median"] = float(np.median(shares)) if shares else None
        bound[f"base_{base}"] = entry
    all_secs = [s for v in by_base.values() for s in v]
    return {
        "per_trial": per_trial,
        "trial_epochs": len(df),
        "epoch_s_median": float(np.median(all_secs)) if all_secs else None,
        "compute_bound": bound,
    }


def trial_statuses(exp: Path) -> dict[str, str] | str:
    try:
        from ray.tune import ExperimentAnalysis

        return {t.trial_id: t.status for t in ExperimentAnalysis(str(exp)).trials}
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def search(a: argparse.Namespace) -> int:
    t0 = time.monotonic()
    deadline = t0 + a.budget_s
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_scale.log").unlink(missing_ok=True)
    summary: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}}
    errors: list[str] = []
    summary["errors"] = errors
    exp = out / "ray" / "scale"

    def step_failed(name: str, exc: BaseException) -> None:
        errors.append(f"{name}: {type(exc).__name__}: {exc}")
        log(out, f"step {name} failed: {type(exc).__name__}: {exc}")

    def write_summary() -> None:
        summary["wall_s"] = round(time.monotonic() - t0, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))

    try:
        manifest = json.loads((a.data.resolve() / MANIFEST).read_text())
        for s, v in manifest["splits"].items():
            _check_and_open(Path(v["path"]), v["key"], s)
            key = split_key(list_tiles(manifest["input_dir"], manifest["label_dir"], s), "float16")
            if key != v["key"]:
                raise ValueError(f"split {s}: the placeholders' key is {key}, the store's {v['key']} (files touched?)")
    except Exception as exc:
        step_failed("open the store", exc)
        log(out, f"no usable store at {a.data} (write it with `python bench/gpu_scale.py store --out {a.data}`)")
        write_summary()
        return 2
    summary["data"] = {k: manifest[k] for k in ("store_root", "tile", "gb_float16_store", "gb_float32_equivalent")}
    summary["data"] |= {"train_tiles": manifest["splits"]["train"]["n"], "val_tiles": manifest["splits"]["val"]["n"]}
    space_path = out / "space.yaml"
    write_space(space_path, a)
    if exp.exists():
        shutil.rmtree(exp)
    cmd = [
        sys.executable, "-m", "tune_agb.search", "--space", str(space_path),
        "--input-dir", manifest["input_dir"], "--label-dir", manifest["label_dir"],
        "--storage", str(out / "ray"), "--name", "scale",
        "--gpus-per-trial", f"{a.gpus_per_trial:g}", "--cpus-per-trial", f"{a.cpus_per_trial:g}",
    ]  # fmt: skip
    summary["command"] = " ".join(cmd)
    env = {
        **os.environ,
        "TUNE_AGB_STORE": manifest["store_root"],
        "TUNE_AGB_STORE_DTYPE": "float16",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    env.pop("RAY_ADDRESS", None)
    resume: dict[str, Any] = {"killed": False}
    summary["resume"] = resume

    with Sampler(out, a.sample_every) as sampler:
        # 1. the search, killed with SIGKILL once --kill-after has passed and an epoch is reported
        first = None
        try:
            log(out, f"search: {' '.join(cmd)}")
            sampler.phase = "first"
            first = SearchProcess(cmd, out / "search_first.log", env, "a")
            sampler.driver = first.proc.pid
            while first.proc.poll() is None:
                elapsed = time.time() - first.started
                if elapsed >= a.kill_after and epochs_reported(exp) > 0:
                    resume.update(killed=True, kill_at_s=round(elapsed, 1), reports_before_kill=epochs_reported(exp))
                    resume["kill_wall_time"] = time.time()
                    log(out, f"SIGKILL to the search's process group after {elapsed:.0f} s")
                    first.kill()
                    break
                if time.monotonic() > deadline - 60:
                    log(out, "budget: interrupting the first run before its kill point")
                    first.interrupt(30)
                    resume["budget_exhausted"] = "first run"
                    break
                time.sleep(1.0)
            resume["first_rc"] = first.proc.poll()
            resume["stragglers_killed"] = first.cleanup()
            if resume["first_rc"] not in (0, 130, -signal.SIGKILL):
                first.keep_logs(out / "ray_logs_first")
            first.remove_tmp()
            log(out, f"first run ended: exit {resume['first_rc']}, {epochs_reported(exp)} reports on disk")
        except Exception as exc:
            step_failed("first run", exc)
            if first is not None:
                first.kill()

        # 2. the same command with --resume, to the end (or to the budget)
        second = None
        if "budget_exhausted" not in resume:
            try:
                sampler.phase = "resume"
                log(out, "resume: the same command with --resume")
                second = SearchProcess([*cmd, "--resume"], out / "search_resume.log", env, "b")
                sampler.driver = second.proc.pid
                while second.proc.poll() is None:
                    if time.monotonic() > deadline - 45:
                        log(out, "budget: interrupting the resumed search (SIGINT, then SIGKILL after 30 s)")
                        second.interrupt(30)
                        resume["budget_exhausted"] = "resume"
                        break
                    time.sleep(1.0)
                resume["resume_rc"] = second.proc.poll()
                resume["resume_s"] = round(time.time() - second.started, 1)
                resume["stragglers_killed_resume"] = second.cleanup()
                if resume["resume_rc"] not in (0, 130):
                    second.keep_logs(out / "ray_logs_resume")
                second.remove_tmp()
                log(out, f"resume ended: exit {resume['resume_rc']} after {resume['resume_s']:.0f} s")
            except Exception as exc:
                step_failed("resume", exc)
                if second is not None:
                    second.kill()
        sampler.phase = "done"
    if sampler.errors:
        summary["sampler_errors"] = sampler.errors

    # 3. the figures
    df = None
    try:
        from tune_agb.engine.config import read_yaml_or_json
        from tune_agb.search.experiment import read_trial_rows
        from tune_agb.search.results import best_row, results_frame
        from tune_agb.search.space import parse_search_space

        space = parse_search_space(read_yaml_or_json(space_path, "search-space file"), source=str(space_path))
        df = results_frame(read_trial_rows(str(exp)), space)
        row = best_row(df, space.metric, space.mode) if len(df) else None
        summary["best"] = (
            None
            if row is None
            else {
                "val_rmse": float(row["val_rmse"]),
                "trial_id": str(row["trial_id"]),
                "epoch": int(row["epoch"]),
                "config": {p.name: _plain(row[f"config/{p.name}"]) for p in space.params},
            }
        )
    except Exception as exc:
        step_failed("read the results", exc)
    for name, fn in (
        ("gpu", lambda: gpu_summary(sampler)),
        ("rss", lambda: rss_per_trial(sampler, df)),
        ("epochs", lambda: epoch_summary(df, a, manifest)),
    ):
        try:
            if df is None and name != "gpu":
                raise RuntimeError("no results to read")
            summary[name] = fn()
        except Exception as exc:
            step_failed(name, exc)
    try:
        statuses = trial_statuses(exp)
        resume["statuses"] = statuses
        trials = df["trial_id"].nunique() if df is not None else 0
        resume["trials_reported"] = int(trials)
        resume["num_samples"] = a.num_samples
        done = (
            all(v == "TERMINATED" for v in statuses.values()) and len(statuses) == a.num_samples
            if isinstance(statuses, dict)
            else trials == a.num_samples
        )
        resume["all_trials_finished"] = bool(resume.get("resume_rc") == 0 and done)
        resume["continued_across_kill"] = continued_trials(df, resume.get("kill_wall_time"))
    except Exception as exc:
        step_failed("trial statuses", exc)
    write_summary()
    print_summary(summary, out)
    return 0 if resume.get("all_trials_finished") and not errors else 1


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def continued_trials(df: Any, kill_wall: float | None) -> dict[str, Any]:
    """The trials that reported both before and after the kill: their last epoch before it, first after it."""
    if kill_wall is None or df is None or not len(df):
        return {}
    out = {}
    for trial, g in df.groupby("trial_id"):
        before, after = g[g["wall_time"] < kill_wall], g[g["wall_time"] >= kill_wall]
        if len(before) and len(after):
            out[str(trial)] = {
                "last_epoch_before": int(before["epoch"].max()),
                "first_epoch_after": int(after["epoch"].min()),
            }
    return out


def print_summary(s: dict[str, Any], out: Path) -> None:
    r, g, e, m = s.get("resume", {}), s.get("gpu", {}), s.get("epochs", {}), s.get("rss", {})
    lines = [
        "",
        "gpu_scale search summary",
        f"- data: {s.get('data')}",
        f"- kill + resume: killed {r.get('killed')} at {r.get('kill_at_s')} s ({r.get('reports_before_kill')} "
        f"reports), first exit {r.get('first_rc')}, resume exit {r.get('resume_rc')} after {r.get('resume_s')} s, "
        f"all {r.get('num_samples')} trials finished: {r.get('all_trials_finished')}"
        + (f", budget ran out in {r['budget_exhausted']}" if "budget_exhausted" in r else "")
        + f"; continued across the kill: {r.get('continued_across_kill')}",
        f"- GPU: mean utilisation {g.get('util_mean_pct')} % by phase {g.get('util_mean_pct_by_phase')}, "
        f"max memory {g.get('mem_used_max_mib')} MiB"
        if g.get("samples")
        else f"- GPU: {g or 'not sampled'}",
    ]
    if g.get("bins_10s"):
        lines.append("  per 10 s: " + " ".join(f"{b['util_pct']:.0f}" for b in g["bins_10s"]))
    if m:
        lines.append(f"- RssAnon: max growth after a first report {m.get('max_growth_mb')} MB (flat: {m.get('flat')})")
        for trial, procs in m.get("trials", {}).items():
            for p in procs:
                if p.get("samples"):
                    lines.append(
                        f"  {trial} pid {p['pid']}: first {p['rss_first_sample_mb']} MB, at its 1st report "
                        f"{p['rss_at_first_report_mb']}, last {p['rss_last_mb']}, max {p['rss_max_mb']}, "
                        f"growth {p['growth_mb']} MB"
                    )
    if e:
        median = e.get("epoch_s_median")
        median = median if median is None else round(median, 2)
        lines.append(
            f"- epochs: {e.get('trial_epochs')} trial-epochs, median {median} s per epoch (between consecutive "
            "reports of one process)"
        )
        for trial, v in e.get("per_trial", {}).items():
            lines.append(
                f"  {trial}: {v['epochs']} epochs, base {v['base_channels']} batch {v['batch_size']}, epoch s "
                f"{v['epoch_s']}, val_rmse {v['val_rmse_first']:.2f} -> {v['val_rmse_best']:.2f}"
            )
        for k, v in e.get("compute_bound", {}).items():
            if k.startswith("base_") and "flops_fwd_bwd_per_sample" in v:
                batches = {b: x for b, x in v.items() if b.startswith("batch_")}
                tflop = {b: round(x["epoch_tflop"], 3) for b, x in batches.items()}
                text = f"  {k}: {v['flops_fwd_bwd_per_sample'] / 1e9:.2f} GFLOP/sample fwd+bwd, {tflop} TFLOP/epoch"
                if e["compute_bound"].get("peak_tflops"):
                    bound = {b: round(x["bound_s_at_share"], 2) for b, x in batches.items()}
                    peak_share = v.get("share_of_peak_at_share_median")
                    text += f"; bound at the trial's share {bound} s; reached {peak_share} of the share's peak"
                measured = v.get("epoch_s_median")
                lines.append(text + f"; measured median {measured if measured is None else round(measured, 2)} s")
    lines.append(f"- best val RMSE: {s.get('best')}")
    if s.get("errors"):
        lines.append(f"- errors: {s['errors']}")
    lines.append(f"- files: {out}/summary.json, gpu_timeline.csv, rss_timeline.csv, search_*.log, gpu_scale.log")
    print("\n".join(lines), flush=True)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    st = sub.add_parser("store", help="write the synthetic placeholders + store")
    st.add_argument("--out", type=Path, required=True, help="dataset folder (inputs/, labels/, store/, manifest)")
    st.add_argument("--train", type=int, default=20000)
    st.add_argument("--val", type=int, default=1000)
    st.add_argument("--tile", type=int, default=244)
    st.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    st.add_argument("--store-root", type=Path, help="where the store folders go (default: OUT/store)")
    st.add_argument("--pool", type=int, default=64, help="random base tiles the tiles are drawn from")
    st.add_argument("--stats-every", type=int, default=1, help="normalisation stats from every K-th tile (1: exact)")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    se = sub.add_parser("search", help="the search with a kill and --resume, sampled")
    se.add_argument("--data", type=Path, required=True, help="the folder `store --out` wrote")
    se.add_argument("--out", type=Path, required=True)
    se.add_argument("--gpus-per-trial", type=float, default=0.25)
    se.add_argument("--cpus-per-trial", type=float, default=3)
    se.add_argument("--max-concurrent", type=int, default=4)
    se.add_argument("--num-samples", type=int, default=8)
    se.add_argument("--max-t", type=int, default=3)
    se.add_argument("--reduction-factor", type=int, default=3)
    se.add_argument("--kill-after", type=float, default=150, help="s after the start; waits for a reported epoch")
    se.add_argument("--budget-s", type=float, default=600, help="the waits end in time for a summary")
    se.add_argument("--base-channels", type=_ints, default=[16, 32], help="choices, e.g. 16,32")
    se.add_argument("--batch-sizes", type=_ints, default=[16, 32], help="choices, e.g. 16,32")
    se.add_argument("--depth", type=int, default=4)
    se.add_argument("--steps-per-epoch", type=int, default=0, help="0: one pass over the train tiles")
    se.add_argument("--peak-tflops", type=float, default=989.0, help="the card's dense bf16 peak (H200: 989)")
    se.add_argument("--sample-every", type=float, default=1.0, help="seconds between samples")
    se.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.command == "store":
        if min(a.train, a.val) < 1 or a.tile < 16 or a.stats_every < 1 or a.pool < 1:
            p.error("--train/--val >= 1, --tile >= 16, --stats-every >= 1, --pool >= 1")
        return store(a)
    return search(a)


if __name__ == "__main__":
    raise SystemExit(main())
