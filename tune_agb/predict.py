"""Wall-to-wall prediction: a trained model (or ensemble) over a GeoTIFF stack -> a mean / std biomass GeoTIFF.

``python -m tune_agb.predict --model OUT_DIR --image STACK.tif --out MAP.tif`` slides windows of ``--tile-size``
px with ``--overlap`` px over the raster (the last row and column of windows sit flush with the edges; a raster
smaller than one window is one window) and blends the seams: every window's mean and variance are weighted by a
ramp that falls towards the window's edges over the overlap, so neighbouring windows fade into each other.

Rows of the map are written as soon as no later window touches them, so memory stays at a few strips of the
raster's width whatever its height. The output is float32 with two bands, ``mean`` and ``std`` (label units,
e.g. Mg/ha), on the input's CRS and transform, NaN where the input has no data in any band, tiled and
DEFLATE-compressed (``--cog``: a Cloud-Optimised GeoTIFF).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.windows import Window
from tqdm.auto import tqdm

from tune_agb.bands import BAND_NAMES
from tune_agb.engine.inference import Predictor, load_predictor
from tune_agb.errors import TuneAgbError, run_cli
from tune_agb.geo.raster import (
    RasterStack,
    StackOptions,
    add_image_argument,
    add_stack_arguments,
    dn_to_reflectance,
    gdal_env,
    s2_band_positions,
    staged_file,
)
from tune_agb.geo.tiling import window_starts

log = logging.getLogger(__name__)

OUTPUT_BANDS = ("mean", "std")
BLOCK = 256  # output GeoTIFF tile size (px); rows are flushed in whole block rows so no block is written twice


def blend_weights(length: int, overlap: int) -> np.ndarray:
    """(length,) float64 ramp: 1 in the middle, falling linearly to 1/(overlap+1) at both ends (never 0)."""
    i = np.arange(length)
    ramp = np.minimum(i + 1, length - i) / (overlap + 1)
    return np.clip(ramp, 1.0 / (overlap + 1), 1.0)


def output_profile(stack: RasterStack) -> dict:
    g = stack.grid
    return {
        "driver": "GTiff",
        "dtype": "float32",
        "count": len(OUTPUT_BANDS),
        "height": g.height,
        "width": g.width,
        "crs": g.crs,
        "transform": g.transform,
        "nodata": float("nan"),
        "tiled": True,
        "blockxsize": BLOCK,
        "blockysize": BLOCK,
        "compress": "deflate",
        "predictor": 3,  # floating-point predictor: much better DEFLATE ratios on smooth float maps
        "BIGTIFF": "IF_SAFER",
    }


def predict_raster(
    predictor: Predictor,
    stack: RasterStack,
    dst: rasterio.io.DatasetWriter,
    tile: int = 512,
    overlap: int = 64,
    batch_size: int = 8,
    s2_offset: float | None = None,
    progress: bool = True,
) -> int:
    """Predict every window of ``stack`` and write mean/std into ``dst`` (same grid). Returns the window count.

    Args:
        predictor: model(s) with ``predict(x (B, C, h, w) raw) -> (mean, std) (B, h, w)``.
        stack: input rasters on one grid, ``predictor.in_channels`` bands.
        dst: open 2-band float32 writer on the stack's grid.
        tile: window side (px); clipped to the raster size.
        overlap: px shared by neighbouring windows (blended).
        batch_size: windows per forward pass.
        s2_offset: when set, Sentinel-2 digital numbers are scaled to reflectance with this offset first.
        progress: show a progress bar.
    """
    h, w = stack.grid.height, stack.grid.width
    th, tw = min(tile, h), min(tile, w)
    rows = window_starts(h, th, max(1, th - overlap))
    cols = window_starts(w, tw, max(1, tw - overlap))
    weight = blend_weights(th, overlap)[:, None] * blend_weights(tw, overlap)[None, :]
    s2_pos = s2_band_positions(stack.band_names, stack.count) if s2_offset is not None else []
    # Accumulators over rows [base, base + th + BLOCK): weighted mean, weighted variance, weights, valid input.
    acc_h = th + BLOCK
    acc_m = np.zeros((acc_h, w))
    acc_v = np.zeros((acc_h, w))
    acc_w = np.zeros((acc_h, w))
    valid = np.zeros((acc_h, w), dtype=bool)
    base = 0

    def flush(n: int) -> None:
        """Write rows [base, base + n) and shift the accumulators up by n."""
        nonlocal base
        if n <= 0:
            return
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = acc_m[:n] / acc_w[:n]
            std = np.sqrt(acc_v[:n] / acc_w[:n])
        mean[~valid[:n]] = np.nan
        std[~valid[:n]] = np.nan
        dst.write(np.stack([mean, std]).astype(np.float32), window=Window(0, base, w, n))
        for a in (acc_m, acc_v, acc_w, valid):
            a[:-n] = a[n:]
            a[-n:] = 0
        base += n

    bar = tqdm(total=len(rows) * len(cols), desc="predict", unit="window", disable=not progress)
    for r in rows:
        # Rows above r are final; write them in whole output blocks.
        flush((r - base) // BLOCK * BLOCK)
        for k in range(0, len(cols), batch_size):
            batch_cols = cols[k : k + batch_size]
            x = np.stack([stack.read(Window(c, r, tw, th)) for c in batch_cols])
            if s2_pos:
                for xi in x:
                    dn_to_reflectance(xi, s2_pos, s2_offset)  # type: ignore[arg-type]
            mean, std = predictor.predict(x)
            mean, var = mean.float().cpu().numpy(), (std.float() ** 2).cpu().numpy()
            has_data = np.isfinite(x).any(axis=1)
            for i, c in enumerate(batch_cols):
                rr = slice(r - base, r - base + th)
                cc = slice(c, c + tw)
                acc_m[rr, cc] += weight * mean[i]
                acc_v[rr, cc] += weight * var[i]
                acc_w[rr, cc] += weight
                valid[rr, cc] |= has_data[i]
            bar.update(len(batch_cols))
    bar.close()
    flush(h - base)
    return len(rows) * len(cols)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tune_agb.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint .pt, final-train OUT_DIR, or ensemble OUT_DIR")
    add_image_argument(p)
    p.add_argument("--out", required=True, help="output GeoTIFF (bands: mean, std)")
    p.add_argument("--tile-size", type=int, default=512, help="window side in px (default 512)")
    p.add_argument(
        "--overlap", type=int, default=None, help="px shared by neighbouring windows (default: tile size / 8)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto: the GPU if any)")
    add_stack_arguments(p)
    p.add_argument("--cog", action="store_true", help="write a Cloud-Optimised GeoTIFF")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.tile_size < 16:
        raise TuneAgbError(f"--tile-size: must be >= 16 px, got {a.tile_size}")
    if a.overlap is None:
        a.overlap = a.tile_size // 8
    if not 0 <= a.overlap < a.tile_size // 2:
        raise TuneAgbError(f"--overlap: must be >= 0 and < half the tile size ({a.tile_size // 2}), got {a.overlap}")
    if a.batch_size < 1:
        raise TuneAgbError(f"--batch-size: must be >= 1, got {a.batch_size}")
    out = Path(a.out)
    if out.exists() and not a.overwrite:
        raise TuneAgbError(f"--out {out}: exists (use --overwrite to replace it)")
    options = StackOptions.from_args(a)
    with gdal_env(), options.open(a.image) as stack:
        predictor = load_predictor(a.model, device=a.device)
        if stack.count != predictor.in_channels:
            expected = f" ({' '.join(BAND_NAMES)})" if predictor.in_channels == len(BAND_NAMES) else ""
            raise TuneAgbError(
                f"{', '.join(a.image)}: {stack.count} bands, but the model {a.model} expects "
                f"{predictor.in_channels}{expected}; pick bands with --bands"
            )
        with staged_file(out, a.overwrite) as tmp:
            gtiff = tmp
            if a.cog:  # the COG driver only copies a finished dataset: write a plain GeoTIFF first
                fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".gtiff.partial")
                os.close(fd)
                gtiff = Path(name)
            try:
                with rasterio.open(gtiff, "w", **output_profile(stack)) as dst:
                    for i, name in enumerate(OUTPUT_BANDS, start=1):
                        dst.set_band_description(i, name)
                    dst.update_tags(model=str(a.model), members=str(len(predictor.members)))
                    n = predict_raster(
                        predictor,
                        stack,
                        dst,
                        tile=a.tile_size,
                        overlap=a.overlap,
                        batch_size=a.batch_size,
                        s2_offset=options.s2_offset,
                        progress=a.progress,
                    )
                if a.cog:
                    rasterio.shutil.copy(
                        gtiff, tmp, driver="COG", COMPRESS="DEFLATE", PREDICTOR="YES", BIGTIFF="IF_SAFER"
                    )
            finally:
                if gtiff != tmp and gtiff.exists():
                    gtiff.unlink()
    members = len(predictor.members)
    print(f"{out}: mean and std from {n} windows ({members} model{'s' if members > 1 else ''}, {predictor.device})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
