"""Issue 30: the synthetic packed store that ``bench/gpu_scale.py search`` measures a search on.

    python bench/synthetic_store.py --out DIR --train 20000 --val 1000 --tile 244 [--workers 16]

``python bench/gpu_scale.py store ...`` runs the same, with the same arguments.

Writes a synthetic dataset of 14-band tiles fast (20,000 tiles of 244 px: 33.3 GB of float16 inputs,
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
  ``DIR/gpu_scale_store.json`` (the manifest ``bench/gpu_scale.py search`` reads).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
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


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="dataset folder (inputs/, labels/, store/, manifest)")
    p.add_argument("--train", type=int, default=20000)
    p.add_argument("--val", type=int, default=1000)
    p.add_argument("--tile", type=int, default=244)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--store-root", type=Path, help="where the store folders go (default: OUT/store)")
    p.add_argument("--pool", type=int, default=64, help="random base tiles the tiles are drawn from")
    p.add_argument("--stats-every", type=int, default=1, help="normalisation stats from every K-th tile (1: exact)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    a = p.parse_args(argv)
    if min(a.train, a.val) < 1 or a.tile < 16 or a.stats_every < 1 or a.pool < 1:
        p.error("--train/--val >= 1, --tile >= 16, --stats-every >= 1, --pool >= 1")
    return store(a)


if __name__ == "__main__":
    raise SystemExit(main())
