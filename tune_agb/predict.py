"""Wall-to-wall prediction: a trained model (or ensemble) over a GeoTIFF stack -> a mean / std biomass GeoTIFF.

``python -m tune_agb.predict --model OUT_DIR --image STACK.tif --out MAP.tif`` slides windows of ``--tile-size``
px over the raster, ``--overlap`` px apart from their neighbours, and keeps of each window only its core: half the
overlap is discarded at every inner edge, so that every kept pixel saw all the context the model looks at, and the
cores tile the raster exactly. The overlap defaults to twice the model's seam margin (measured once per model, see
:mod:`tune_agb.engine.seams`, stored in final_train's checkpoints), and windows start on the model's downsampling
grid (multiples of ``2 ** depth`` px from the raster origin). The map then equals predicting the whole raster in one
window, to floating-point noise, whatever the tile size: ``--tile-size`` trades memory for speed and nothing else.
Windows touching the raster's edges keep their pixels up to the edge.

Rows of the map are written as soon as no later window touches them, so memory stays at a few strips of the
raster's width whatever its height. The output is float32 with two bands, ``mean`` and ``std`` (label units,
e.g. Mg/ha), on the input's CRS and transform, NaN where the input has no data in any band, tiled and
DEFLATE-compressed (``--cog``: a Cloud-Optimised GeoTIFF).

The ``std`` band is calibrated with the model's ``calibration.json`` (fitted by final_train on the validation split,
see :mod:`tune_agb.engine.calibration`) when it has one; ``--calibration none`` writes the model's raw std,
``--calibration FILE`` applies another file.

Many scenes (``--scenes``, see :mod:`tune_agb.maps`): ``--scenes 'tiles/*.tif' --out MAPS/`` maps every scene on Ray
(``--address`` joins a cluster; ``--workers``, ``--cpus-per-worker``, ``--gpus-per-worker``), block by block on the
same window grid, into one Cloud-Optimised GeoTIFF per scene and one mosaic VRT per CRS; a rerun resumes.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.windows import Window
from tqdm.auto import tqdm

from tune_agb.bands import BAND_NAMES
from tune_agb.engine.calibration import IDENTITY, Calibration
from tune_agb.engine.inference import Predictor, load_predictor
from tune_agb.errors import TuneAgbError, run_cli
from tune_agb.forest_mix import ForestPart, load_forest_part
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
from tune_agb.runs import load_calibration, model_calibration

log = logging.getLogger(__name__)

OUTPUT_BANDS = ("mean", "std")
# how a finished GeoTIFF (or VRT) is copied into a Cloud-Optimised GeoTIFF
COG_OPTIONS = {"driver": "COG", "COMPRESS": "DEFLATE", "PREDICTOR": "YES", "BIGTIFF": "IF_SAFER"}
BLOCK = 256  # output GeoTIFF tile size (px); rows are flushed in whole block rows so no block is written twice


def window_plan(size: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Windows along one axis of ``size`` px: ``(start, stop, keep_start, keep_stop)`` for each.

    Windows of ``tile`` px start every ``tile - overlap`` px; each keeps ``[keep_start, keep_stop)``: all but
    ``overlap // 2`` px at its inner edges (the rest of the overlap at the far edge), so the kept parts tile
    ``[0, size)`` exactly. The first window keeps from 0 and the last one (clipped at ``size``) to ``size``.
    """
    if tile >= size:
        return [(0, size, 0, size)]
    cut_lo, cut_hi, stride = overlap // 2, overlap - overlap // 2, tile - overlap
    plan, start = [], 0
    while True:
        stop = min(start + tile, size)
        plan.append((start, stop, 0 if start == 0 else start + cut_lo, size if stop == size else stop - cut_hi))
        if stop == size:
            return plan
        start += stride


def resolve_windows(
    tile: int, overlap: int | None, predictor: Predictor, forest: ForestPart | None = None
) -> tuple[int, int]:
    """The window side and overlap actually used: the side rounded down and the overlap up to the model's grid step;
    the overlap defaults to twice the model's seam margin (or the forest part's texture margin, if larger).

    Raises:
        TuneAgbError: when the overlap leaves nothing of a window.
    """
    step, margin = predictor.step, predictor.margin
    if forest is not None and margin is not None:
        margin = max(margin, forest.margin)
    side = max(step, tile // step * step)
    if overlap is None:
        if margin is None:
            overlap = side // 4
            log.warning(
                "the model normalises over the whole window (norm=%s): tiled maps depend on the window; "
                "use a --tile-size as large as memory allows",
                predictor.members[0].config.norm,
            )
        else:
            overlap = 2 * margin
    elif margin is not None and overlap < 2 * margin:
        log.warning("--overlap %d is under twice the model's seam margin (%d px): seams may show", overlap, margin)
    overlap = -(-overlap // step) * step
    if overlap >= side:
        raise TuneAgbError(
            f"--tile-size {tile}: a window must be larger than the overlap ({overlap} px"
            + (f", twice the model's seam margin of {margin} px" if margin is not None else "")
            + f"); use --tile-size {overlap + 4 * step} or more"
        )
    return side, overlap


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


def predict_row(
    predictor: Predictor,
    stack: RasterStack,
    row: tuple[int, int, int, int],
    cols: Sequence[tuple[int, int, int, int]],
    batch_size: int = 8,
    s2_pos: Sequence[int] = (),
    s2_offset: float | None = None,
    calibration: Calibration = IDENTITY,
    done: Callable[[int], object] | None = None,
    forest: ForestPart | None = None,
) -> np.ndarray:
    """The kept parts of one row of windows: float32 (2, keep rows, keep cols) of mean and calibrated std.

    Args:
        predictor: the model(s).
        stack: the input rasters.
        row: ``(start, stop, keep_start, keep_stop)`` of the row of windows (an entry of :func:`window_plan`).
        cols: consecutive column windows of :func:`window_plan` (all of them for a full strip); the result spans
            ``cols[0]``'s keep start to ``cols[-1]``'s keep stop.
        batch_size: windows per forward pass.
        s2_pos: positions of the Sentinel-2 bands to scale from digital numbers with ``s2_offset`` (none: as read).
        s2_offset: the digital-number offset (used when ``s2_pos`` is not empty).
        calibration: applied to the predicted std.
        done: called with the number of windows after each forward pass (a progress bar's ``update``).
        forest: the model's forest part (:mod:`tune_agb.forest_mix`), mixed in after calibration; None: none.
    """
    r0, r1, kr0, kr1 = row
    x0 = cols[0][2]
    strip = np.full((2, kr1 - kr0, cols[-1][3] - x0), np.nan, dtype=np.float32)
    # windows of one width go through the model together (the last column can be narrower)
    for width in sorted({c1 - c0 for c0, c1, _, _ in cols}, reverse=True):
        same = [c for c in cols if c[1] - c[0] == width]
        for k in range(0, len(same), batch_size):
            batch = same[k : k + batch_size]
            x = np.stack([stack.read(Window(c0, r0, width, r1 - r0)) for c0, _, _, _ in batch])
            if s2_pos:
                for xi in x:
                    dn_to_reflectance(xi, s2_pos, s2_offset)  # type: ignore[arg-type]
            mean, std = predictor.predict(x)
            bands = np.moveaxis(x, 1, 0) if calibration.needs_bands else None  # (C, B, h, w): as the tiles read
            mean_np, std_cal = mean.float().cpu().numpy(), calibration.std(std.float().cpu().numpy(), bands)
            if forest is not None:
                mean_np, std_cal = forest.mix(x, mean_np, std_cal)
            out = np.stack([mean_np, std_cal], axis=1)
            out[np.broadcast_to(~np.isfinite(x).any(axis=1, keepdims=True), out.shape)] = np.nan
            for i, (c0, _, kc0, kc1) in enumerate(batch):
                strip[:, :, kc0 - x0 : kc1 - x0] = out[i, :, kr0 - r0 : kr1 - r0, kc0 - c0 : kc1 - c0]
            if done is not None:
                done(len(batch))
    return strip


def predict_raster(
    predictor: Predictor,
    stack: RasterStack,
    dst: rasterio.io.DatasetWriter,
    tile: int = 512,
    overlap: int | None = None,
    batch_size: int = 8,
    s2_offset: float | None = None,
    progress: bool = True,
    calibration: Calibration = IDENTITY,
    forest: ForestPart | None = None,
) -> int:
    """Predict every window of ``stack`` and write mean/std into ``dst`` (same grid). Returns the window count.

    Args:
        predictor: model(s) with ``predict(x (B, C, h, w) raw) -> (mean, std) (B, h, w)``, ``step`` and ``margin``.
        stack: input rasters on one grid, ``predictor.in_channels`` bands.
        dst: open 2-band float32 writer on the stack's grid.
        tile: window side (px); rounded down to the model's grid step.
        overlap: px shared by neighbouring windows, half discarded by each (None: twice the model's seam margin).
        batch_size: windows per forward pass.
        s2_offset: when set, Sentinel-2 digital numbers are scaled to reflectance with this offset first.
        progress: show a progress bar.
        calibration: applied to the predicted std (default: none).
        forest: the model's forest part, mixed in after calibration (None: none).
    """
    h, w = stack.grid.height, stack.grid.width
    tile, overlap = resolve_windows(tile, overlap, predictor, forest)
    rows, cols = window_plan(h, tile, overlap), window_plan(w, tile, overlap)
    s2_pos = s2_band_positions(stack.band_names, stack.count) if s2_offset is not None else []
    pending: list[np.ndarray] = []  # (2, rows, w) strips of finished rows not yet written
    written = 0

    def write(final: bool) -> None:
        """Write the pending rows in whole output blocks (all of them at the end)."""
        nonlocal written, pending
        if not pending:
            return
        strip = np.concatenate(pending, axis=1)
        n = strip.shape[1] if final else strip.shape[1] // BLOCK * BLOCK
        if n:
            dst.write(strip[:, :n], window=Window(0, written, w, n))
            written += n
        pending = [strip[:, n:]] if n < strip.shape[1] else []

    bar = tqdm(total=len(rows) * len(cols), desc="predict", unit="window", disable=not progress)
    for row in rows:
        strip = predict_row(predictor, stack, row, cols, batch_size, s2_pos, s2_offset, calibration, bar.update, forest)
        pending.append(strip)
        write(final=False)
    bar.close()
    write(final=True)
    return len(rows) * len(cols)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tune_agb.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint .pt, final-train OUT_DIR, or ensemble OUT_DIR")
    what = p.add_mutually_exclusive_group(required=True)
    add_image_argument(what, required=False)
    what.add_argument(
        "--scenes",
        action="append",
        metavar="SCENES",
        help="many scenes, mapped on Ray (repeatable): a glob (every match is a scene), a .txt file (a scene per "
        "line), or one scene; images separated by commas are stacked band-wise. --out is then a folder: one COG "
        "per scene and one mosaic VRT per CRS",
    )
    p.add_argument("--out", required=True, help="output GeoTIFF (bands: mean, std); with --scenes an output folder")
    p.add_argument("--tile-size", type=int, default=512, help="window side in px (default 512)")
    p.add_argument(
        "--overlap",
        type=int,
        default=None,
        help="px shared by neighbouring windows, half discarded by each (default: twice the model's seam margin)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto: the GPU if any)")
    p.add_argument(
        "--calibration",
        default="auto",
        help="variance calibration applied to the std band: auto (the model's calibration.json, if any; default), "
        "none, or a calibration.json file",
    )
    add_stack_arguments(p)
    p.add_argument("--cog", action="store_true", help="write a Cloud-Optimised GeoTIFF (always so with --scenes)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out (with --scenes: map finished scenes again)"
    )
    ray = p.add_argument_group("many scenes on Ray (with --scenes)")
    ray.add_argument("--address", default=None, help="join a running Ray cluster: auto or HOST:PORT (default: local)")
    ray.add_argument("--workers", type=int, default=None, help="Ray workers (default: as many as the cluster holds)")
    ray.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray CPUs per worker (default 1)")
    ray.add_argument("--gpus-per-worker", type=float, default=0.0, help="Ray GPUs per worker, e.g. 0.25 (default 0)")
    ray.add_argument(
        "--block-size", type=int, default=2048, help="px per side of the blocks a worker maps at once (default 2048)"
    )
    ray.add_argument(
        "--work-dir",
        default=None,
        help="local folder for staged blocks and COGs before upload (default: --out when local, else "
        "./.tune_agb_maps/<--out as a name>)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def check_band_count(raster: RasterStack, predictor: Predictor, model: str | Path, paths: Sequence[str]) -> None:
    """Refuse a stack whose band count is not the model's input channels.

    Raises:
        TuneAgbError: one line naming the images, their band count and the model's.
    """
    if raster.count != predictor.in_channels:
        expected = f" ({' '.join(BAND_NAMES)})" if predictor.in_channels == len(BAND_NAMES) else ""
        raise TuneAgbError(
            f"{', '.join(map(str, paths))}: {raster.count} bands, but the model {model} expects "
            f"{predictor.in_channels}{expected}; pick bands with --bands"
        )


def resolve_calibration(model: str, option: str) -> Calibration:
    """The calibration ``--calibration`` asks for: ``auto`` (the model's own, identity without one), ``none``, or a
    file (checked; errors name it)."""
    if option == "none":
        return IDENTITY
    if option != "auto":
        cal = load_calibration(option)
    else:
        cal, path = model_calibration(model)
        if path is None:
            log.info("%s: no calibration.json with the model; the std band is the model's own", model)
            return cal
    log.info("calibration: %s", cal.describe())
    return cal


@dataclass(frozen=True)
class MapSummary:
    """What :func:`predict_map` wrote: the GeoTIFF, the windows predicted, the models averaged, where, and the
    calibration applied to the std band."""

    out: Path
    windows: int
    members: int
    device: str
    calibration: Calibration


def predict_map(
    model: str | Path,
    images: Sequence[str | Path],
    out: str | Path,
    *,
    tile_size: int = 512,
    overlap: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    calibration: str = "auto",
    stack: StackOptions | None = None,
    cog: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> MapSummary:
    """Map a stack of GeoTIFFs with a trained model: a GeoTIFF with bands ``mean`` and ``std`` (target units) on the
    stack's grid, nodata where an input pixel has none.

    Args:
        model: a checkpoint ``.pt``, a final training's out dir, or an ensemble's out dir (``members/``).
        images: GeoTIFFs stacked band-wise (the model's channels, in its order; pick with ``stack.bands``).
        out: the output GeoTIFF; written to a staging file and moved into place when complete.
        tile_size: window side (px); windows overlap by ``overlap`` px, half discarded by each (default: twice the
            model's seam margin, so the map equals whole-image prediction).
        batch_size: windows per forward pass.
        device: ``auto`` (the GPU if any), ``cpu``, ``cuda`` or ``cuda:N``.
        calibration: ``auto`` (the model's ``calibration.json`` if any), ``none``, or a calibration.json path.
        stack: band selection, resampling and Sentinel-2 digital-number scaling of the inputs.
        cog: write a Cloud-Optimised GeoTIFF.
        overwrite: replace an existing ``out``.
        progress: show a progress bar.

    Raises:
        TuneAgbError: one line naming the flag, file or model that is wrong; nothing is left at ``out``.
    """
    if tile_size < 16:
        raise TuneAgbError(f"--tile-size: must be >= 16 px, got {tile_size}")
    if overlap is not None and not 0 <= overlap < tile_size:
        raise TuneAgbError(f"--overlap: must be >= 0 and smaller than --tile-size ({tile_size}), got {overlap}")
    if batch_size < 1:
        raise TuneAgbError(f"--batch-size: must be >= 1, got {batch_size}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise TuneAgbError(f"--out {out}: exists (use --overwrite to replace it)")
    options = stack or StackOptions()
    cal = resolve_calibration(str(model), calibration)
    paths = [str(p) for p in images]
    with gdal_env(), options.open(paths) as raster:
        predictor = load_predictor(model, device=device)
        check_band_count(raster, predictor, model, paths)
        forest = load_forest_part(model)
        with staged_file(out, overwrite) as tmp:
            gtiff = tmp
            if cog:  # the COG driver only copies a finished dataset: write a plain GeoTIFF first
                fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".gtiff.partial")
                os.close(fd)
                gtiff = Path(name)
            try:
                with rasterio.open(gtiff, "w", **output_profile(raster)) as dst:
                    for i, band in enumerate(OUTPUT_BANDS, start=1):
                        dst.set_band_description(i, band)
                    dst.update_tags(model=str(model), members=str(len(predictor.members)), calibration=cal.describe())
                    if forest is not None:
                        dst.update_tags(forest=f"texture forest, weight {forest.weight}")
                    n = predict_raster(
                        predictor,
                        raster,
                        dst,
                        tile=tile_size,
                        overlap=overlap,
                        batch_size=batch_size,
                        s2_offset=options.s2_offset,
                        progress=progress,
                        calibration=cal,
                        forest=forest,
                    )
                if cog:
                    rasterio.shutil.copy(gtiff, tmp, **COG_OPTIONS)
            finally:
                if gtiff != tmp and gtiff.exists():
                    gtiff.unlink()
    return MapSummary(out, n, len(predictor.members), str(predictor.device), cal)


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.scenes:
        return _main_scenes(a)
    ray_flags = ("address", "workers", "block_size", "work_dir")
    used = [f"--{f.replace('_', '-')}" for f in ray_flags if getattr(a, f) != build_parser().get_default(f)]
    if used:
        raise TuneAgbError(f"{', '.join(used)}: for many scenes on Ray, give them with --scenes (not --image)")
    done = predict_map(
        a.model,
        a.image,
        a.out,
        tile_size=a.tile_size,
        overlap=a.overlap,
        batch_size=a.batch_size,
        device=a.device,
        calibration=a.calibration,
        stack=StackOptions.from_args(a),
        cog=a.cog,
        overwrite=a.overwrite,
        progress=a.progress,
    )
    models = f"{done.members} model{'s' if done.members > 1 else ''}"
    print(
        f"{done.out}: mean and std from {done.windows} windows ({models}, {done.device}; "
        f"calibration {done.calibration.method})"
    )
    return 0


def _main_scenes(a: argparse.Namespace) -> int:
    """``--scenes``: many scenes on Ray (see :func:`tune_agb.maps.map_scenes`)."""
    from tune_agb.maps import map_scenes, parse_scenes

    done = map_scenes(
        a.model,
        parse_scenes(a.scenes),
        a.out,
        tile_size=a.tile_size,
        overlap=a.overlap,
        block_size=a.block_size,
        batch_size=a.batch_size,
        device=a.device,
        calibration=a.calibration,
        stack=StackOptions.from_args(a),
        address=a.address,
        workers=a.workers,
        cpus_per_worker=a.cpus_per_worker,
        gpus_per_worker=a.gpus_per_worker,
        overwrite=a.overwrite,
        progress=a.progress,
        work_dir=a.work_dir,
    )
    for r in done.scenes:
        print(f"{r.final}: {'kept (already mapped)' if r.kept else f'{len(r.plan)} blocks, {r.computed} computed now'}")
    for m in done.mosaics:
        print(f"{m}: mosaic")
    print(
        f"{len(done.scenes)} scenes: {done.computed} of {done.blocks} blocks computed "
        f"({done.blocks - done.computed} already done) on {done.workers} workers"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
