"""A deterministic synthetic Sentinel-1/2 + GEDI scene, and the tile dataset cut from it.

The physics is simple but shaped like the real thing:

- land cover: patches of water, grass/crops, young forest and mature forest from a thresholded smooth random
  field; biomass (Mg/ha, 0 to ~400) varies smoothly inside each patch;
- Sentinel-2 reflectance mixes soil and vegetation spectra by a canopy cover that saturates with biomass
  (``1 - exp(-AGB/60)``), plus per-pixel noise;
- Sentinel-1 VV/VH backscatter (dB) rises with log-biomass and saturates much later, with strong speckle
  (multiplicative, gamma-distributed, 4 looks): single pixels are noisy, neighbourhoods are informative;
- GEDI footprints along near-north-south tracks (shots every few pixels, tracks tens of pixels apart, some shots
  lost), each the mean biomass of its ~25 m footprint plus noise that grows with biomass;
- a few clouds blank all Sentinel-2 bands (NaN).

This module is the library. ``python -m tune_agb.demo --out DIR`` (:mod:`tune_agb.demo`) writes
``DIR/inputs/{train,val,test}/NAME.npy`` and ``DIR/labels/{split}/NAME.npy``; every entry point uses
:func:`demo_data_dir` when no data folders are given.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tune_agb.bands import NUM_BANDS
from tune_agb.errors import TuneAgbError
from tune_agb.geo.tiling import assign_blocks, block_of, count_block_tiles, rasterize_points, window_starts

log = logging.getLogger(__name__)

DEMO_VERSION = 1
DEFAULT_TILE = 64
DEFAULT_GRID = (8, 6)  # tiles down, tiles across -> 48 tiles
DEFAULT_SEED = 7

# Soil / green vegetation / water reflectance per Sentinel-2 band (B1 ... B12), loosely after typical spectra.
_SOIL = np.array([0.08, 0.10, 0.13, 0.17, 0.19, 0.21, 0.23, 0.25, 0.26, 0.26, 0.33, 0.28])
_VEG = np.array([0.03, 0.04, 0.07, 0.04, 0.10, 0.28, 0.36, 0.40, 0.42, 0.40, 0.19, 0.09])
_WATER = np.array([0.06, 0.06, 0.05, 0.04, 0.03, 0.02, 0.02, 0.02, 0.02, 0.01, 0.01, 0.01])


@dataclass
class Scene:
    """image (14, H, W) float32; agb (H, W) true biomass in Mg/ha; GEDI shots at fractional pixel positions."""

    image: np.ndarray
    agb: np.ndarray
    landcover: np.ndarray
    shot_row: np.ndarray
    shot_col: np.ndarray
    shot_value: np.ndarray
    shot_quality: np.ndarray  # 1 = good (kept as labels), 0 = flagged (e.g. cloud / low sensitivity)


def _smooth_field(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Gaussian random field with correlation length ~``scale`` px, standardised."""
    noise = rng.normal(size=(h, w))
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    kernel = np.exp(-2 * (np.pi * scale) ** 2 * (fx**2 + fy**2))
    field = np.fft.ifft2(np.fft.fft2(noise) * kernel).real
    return (field - field.mean()) / (field.std() + 1e-12)


def _box_mean(a: np.ndarray, r: int) -> np.ndarray:
    pad = np.pad(a, r, mode="edge")
    c = pad.cumsum(0).cumsum(1)
    c = np.pad(c, ((1, 0), (1, 0)))
    k = 2 * r + 1
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / k**2


def synth_scene(
    height: int, width: int, seed: int = DEFAULT_SEED, track_spacing: int = 20, shot_spacing: int = 3, clouds: int = 3
) -> Scene:
    """Generate a scene of ``height`` x ``width`` pixels (10 m)."""
    rng = np.random.default_rng(seed)
    h, w = height, width
    # Land cover from a large-scale field: water < grass < young forest < mature forest.
    lc_field = _smooth_field(rng, h, w, 18.0)
    cuts = np.quantile(lc_field, [0.06, 0.30, 0.55])
    landcover = np.digitize(lc_field, cuts)  # 0 water, 1 grass, 2 young forest, 3 mature forest
    base = np.array([0.0, 12.0, 90.0, 240.0])[landcover]
    spread = np.array([0.0, 0.5, 0.45, 0.35])[landcover]
    inner = _smooth_field(rng, h, w, 5.0)
    agb = np.clip(base * (1 + spread * inner), 0, 420).astype(np.float64)
    agb = np.clip(_box_mean(agb, 1), 0, 420)  # soften patch edges a little (cumsum round-off: clip)

    # Sentinel-2: canopy cover saturates early with biomass.
    cover = 1 - np.exp(-agb / 60.0)
    shade = 1 - 0.25 * (1 - np.exp(-agb / 250.0))  # taller canopies cast more shadow (weak, late signal)
    refl = (_SOIL[:, None, None] * (1 - cover) + _VEG[:, None, None] * cover) * shade
    water = landcover == 0
    refl = np.where(water, _WATER[:, None, None], refl)
    refl = refl * (1 + 0.08 * rng.normal(size=refl.shape)) + 0.012 * rng.normal(size=refl.shape)
    refl = np.clip(refl, 0.0, 1.0)
    # Sentinel-1: dB rising with log biomass, saturating late; gamma speckle with 4 looks.
    lb = np.log1p(agb / 10.0)
    vv_lin = 10 ** ((-17.0 + 2.6 * lb) / 10) * np.where(water, 0.15, 1.0)
    vh_lin = 10 ** ((-26.0 + 3.4 * lb) / 10) * np.where(water, 0.15, 1.0)
    looks = 4.0
    vv = 10 * np.log10(vv_lin * rng.gamma(looks, 1 / looks, size=(h, w)))
    vh = 10 * np.log10(vh_lin * rng.gamma(looks, 1 / looks, size=(h, w)))
    image = np.concatenate([refl, vv[None], vh[None]]).astype(np.float32)
    # Clouds: blank the optical bands in a few elliptical blobs.
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(clouds):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(4, 12), rng.uniform(4, 12)
        blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        image[:12, blob] = np.nan

    # GEDI: tracks tilted ~6 degrees from north-south, shots every `shot_spacing` px along each track.
    tilt = np.tan(np.deg2rad(6.0))
    rows_all, cols_all = [], []
    offset = rng.uniform(0, track_spacing)
    for x0 in np.arange(-tilt * h + offset, w, track_spacing):
        r = np.arange(rng.uniform(0, shot_spacing), h, shot_spacing)
        c = x0 + tilt * r + rng.normal(0, 0.3, size=r.size)
        keep = (c >= 0) & (c < w)
        rows_all.append(r[keep])
        cols_all.append(c[keep])
    shot_row = np.concatenate(rows_all)
    shot_col = np.concatenate(cols_all)
    footprint = _box_mean(agb, 1)  # a ~25 m footprint averages about 3 x 3 pixels
    truth = footprint[shot_row.astype(int), shot_col.astype(int)]
    value = np.clip(truth + rng.normal(size=truth.size) * (4.0 + 0.12 * truth), 0, None)
    quality = (rng.random(truth.size) > 0.15).astype(np.int8)
    return Scene(
        image, agb.astype(np.float32), landcover.astype(np.uint8), shot_row, shot_col, value.astype(np.float32), quality
    )


def rasterize_shots(scene: Scene) -> np.ndarray:
    """Good-quality shots on the pixel grid (mean of the shots per pixel), NaN elsewhere."""
    h, w = scene.agb.shape
    good = scene.shot_quality == 1
    return rasterize_points(scene.shot_row[good], scene.shot_col[good], scene.shot_value[good], h, w).dense()


def split_tiles(
    offsets: Iterable[tuple[int, int]], tile: int, split: tuple[float, float, float], seed: int
) -> dict[tuple[int, int], str]:
    """The split of each tile (by its (row, col) offset in px): tiles are grouped into blocks of 2 x 2 tiles, and
    ``round(fraction * blocks)`` blocks (at least one) go to val and to test, the rest to train; which ones is drawn
    with ``seed``. Every block counts one, whatever its number of tiles, so the train fraction is not used."""
    offsets = list(offsets)
    block_px = 2 * tile
    blocks = count_block_tiles(offsets, block_px)
    n = len(blocks)
    n_val, n_test = max(1, round(split[1] * n)), max(1, round(split[2] * n))
    # With unit weights and fractions k / n, assign_blocks hands out exactly k blocks to val and to test.
    fractions = (1 - (n_val + n_test) / n, n_val / n, n_test / n)
    block_split = assign_blocks(dict.fromkeys(blocks, 1), fractions, seed)
    return {(r, c): block_split[block_of(r, c, block_px)] for r, c in offsets}


def write_demo_dataset(
    out: str | Path,
    tile: int = DEFAULT_TILE,
    grid: tuple[int, int] = DEFAULT_GRID,
    seed: int = DEFAULT_SEED,
    split: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> Path:
    """Cut the scene into tiles and split them by 2 x 2 blocks of tiles (no pixel in two splits)."""
    out = Path(out)
    rows, cols = grid
    scene = synth_scene(rows * tile, cols * tile, seed)
    label = rasterize_shots(scene)
    offsets = [
        (r, c)
        for r in window_starts(rows * tile, tile, tile, cover_edge=False)
        for c in window_starts(cols * tile, tile, tile, cover_edge=False)
    ]
    for (r, c), s in split_tiles(offsets, tile, split, seed + 1).items():
        name = f"tile_{r // tile:02d}_{c // tile:02d}"
        win = (slice(r, r + tile), slice(c, c + tile))
        for kind, arr in (("inputs", scene.image[:, win[0], win[1]]), ("labels", label[win])):
            d = out / kind / s
            d.mkdir(parents=True, exist_ok=True)
            np.save(d / f"{name}.npy", np.ascontiguousarray(arr))
    (out / "demo.json").write_text(
        json.dumps({"version": DEMO_VERSION, "tile": tile, "grid": list(grid), "seed": seed, "bands": NUM_BANDS})
    )
    return out


def cache_dir() -> Path:
    base = os.environ.get("TUNE_AGB_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "tune_agb")
    return Path(base).expanduser()


def demo_data_dir() -> Path:
    """The demo dataset, generated once into the cache folder (atomically: a half-written cache is never used)."""
    target = cache_dir() / f"demo-v{DEMO_VERSION}"
    if (target / "demo.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".demo-"))
    try:
        write_demo_dataset(tmp)
        with contextlib.suppress(OSError):  # another process won the race
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("demo data written to %s", target)
    return target


def data_dirs(
    input_dir: str | Path | None, label_dir: str | Path | None, default: tuple[str | Path, str | Path] | None = None
) -> tuple[str, str]:
    """The tile folders a command works on: ``--input-dir``/``--label-dir`` when given, else ``default`` (the folders
    a space file or an experiment names), else the demo dataset (generated once into the cache). As given: a local
    path, or a ``s3://``/``gs://`` URI (kept whole: never made a ``Path``).

    Raises:
        TuneAgbError: when only one of the two flags is given.
    """
    if (input_dir is None) != (label_dir is None):
        raise TuneAgbError("--input-dir and --label-dir go together (give both, or neither for the demo data)")
    if input_dir is not None and label_dir is not None:
        return str(input_dir), str(label_dir)
    if default is not None:
        return str(default[0]), str(default[1])
    demo = demo_data_dir()
    return str(demo / "inputs"), str(demo / "labels")
