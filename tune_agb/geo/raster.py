"""Raster helpers shared by prepare and predict: open and validate GeoTIFFs, stack them on one grid, read windows,
put map points on the grid, and the command-line options that say how the input stack is read.

rasterio is imported here (and in the CLI modules that use it), never by the training engine, so hosts without
GDAL can still train.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import CRSError, NotGeoreferencedWarning, RasterioIOError
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform as warp_points
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from tune_agb.bands import S2_BANDS
from tune_agb.errors import TuneAgbError
from tune_agb.geo.remote import (
    gdal_network_options,
    is_remote,
    location_stem,
    raster_location,
    raster_open_error,
    remote_open_options,
)
from tune_agb.geo.tiling import PointLabels, pixels_inside, rasterize_points, window_starts

# GDAL's block cache defaults to 5 % of RAM; a small fixed cache keeps the resident memory bounded and is enough
# for window-by-window access (a strip of windows of a 14-band, 8192 px wide float32 stack is ~120 MB).
GDAL_CACHE_MB = int(os.environ.get("TUNE_AGB_GDAL_CACHE_MB", 256))
# Sentinel-2 L2A digital numbers: reflectance = (DN + offset) / 10000; products from 25 Jan 2022 (processing
# baseline 04.00) carry BOA_ADD_OFFSET = -1000.
S2_QUANTIFICATION = 10000.0
S2_OFFSET_2022 = -1000.0
RESAMPLING = ("nearest", "bilinear", "cubic", "average")


def gdal_env() -> rasterio.Env:
    """A rasterio environment with a bounded block cache and the settings for remote reads: the S3 endpoint derived
    from ``AWS_ENDPOINT_URL`` and retries of transient HTTP errors (:func:`tune_agb.geo.remote.gdal_network_options`;
    settings exported in the environment win)."""
    return rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB, **gdal_network_options())


def open_raster(path: str | Path, what: str = "image") -> rasterio.DatasetReader:
    """Open a georeferenced raster or raise one clear :class:`TuneAgbError` (missing, unreadable, no CRS).

    Args:
        path: a local path (or ``file://`` URI), or a raster GDAL reads over the network: ``s3://bucket/key``,
            ``https://host/x.tif`` (also a presigned URL), ``/vsis3/bucket/key``, ``/vsicurl/URL`` ... Give URIs as
            strings (``Path`` turns ``s3://`` into ``s3:/``).
        what: how errors name it (``image``, ``label raster``).

    Raises:
        TuneAgbError: one line naming the location: missing file, object or bucket, access denied, server
            unreachable, not a raster, no georeference.
    """
    location = raster_location(path)
    remote = is_remote(location)
    if not remote and not Path(location).is_file():
        raise TuneAgbError(f"{location}: {what} file not found")
    try:
        with warnings.catch_warnings(), rasterio.Env(**remote_open_options(location)):
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # reported below as the one error line
            ds = rasterio.open(location)
    except RasterioIOError as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if remote:
            raise TuneAgbError(raster_open_error(location, what, message)) from None
        raise TuneAgbError(f"{location}: not a readable raster ({message[:200]})") from None
    if ds.crs is None:
        ds.close()
        raise TuneAgbError(f"{path}: has no CRS (a georeferenced GeoTIFF with a coordinate reference system is needed)")
    if ds.transform == Affine.identity():
        ds.close()
        raise TuneAgbError(f"{path}: has no geotransform (pixel-to-map mapping); georeference it first")
    return ds


@dataclass(frozen=True)
class Grid:
    """The pixel grid everything is read on: CRS, affine transform (map units per pixel), height and width (px)."""

    crs: CRS
    transform: Affine
    height: int
    width: int

    @classmethod
    def of(cls, ds: rasterio.io.DatasetReaderBase) -> Grid:
        return cls(ds.crs, ds.transform, ds.height, ds.width)

    def same_as(self, other: Grid) -> bool:
        return (
            self.crs == other.crs
            and self.height == other.height
            and self.width == other.width
            and self.transform.almost_equals(other.transform, precision=1e-9 * max(1.0, abs(self.transform.a)))
        )

    def pixel_of(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fractional (row, col) of map positions ``x``, ``y`` (grid CRS); a point at row 3.7 lies in pixel row 3."""
        col, row = ~self.transform @ (np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
        return np.asarray(row), np.asarray(col)

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(N,) bool: which map positions ``x``, ``y`` (grid CRS) fall in a pixel of the grid (NaN: no)."""
        return pixels_inside(*self.pixel_of(x, y), self.height, self.width)

    def bounds_in(self, crs: CRS, pad_px: float = 1.0) -> list[tuple[float, float, float, float]] | None:
        """Boxes (xmin, ymin, xmax, ymax) in ``crs`` that together hold the grid grown by ``pad_px`` pixels.

        The grid's edges are densified (100 points each) before they are transformed, so the boxes hold the whole
        footprint even where its edges curve in ``crs``. In a geographic ``crs`` a footprint across the antimeridian
        gives two boxes, one each side of 180 degrees. None when the bounds cannot be transformed.
        """
        left, bottom, right, top = self.window_bounds(
            Window(-pad_px, -pad_px, self.width + 2 * pad_px, self.height + 2 * pad_px)
        )
        if crs == self.crs:
            return [(left, bottom, right, top)]
        try:
            xmin, ymin, xmax, ymax = transform_bounds(self.crs, crs, left, bottom, right, top, densify_pts=100)
        except Exception:  # GDAL/PROJ raise several types for impossible transformations
            return None
        if not all(math.isfinite(v) for v in (xmin, ymin, xmax, ymax)):
            return None
        if xmin > xmax:  # PROJ's way of saying the footprint crosses the antimeridian
            return [(xmin, ymin, 180.0, ymax), (-180.0, ymin, xmax, ymax)] if crs.is_geographic else None
        return [(xmin, ymin, xmax, ymax)]

    def window_bounds(self, window: Window) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) of a window in map units (the extremes of its four corners)."""
        c0, r0 = window.col_off, window.row_off
        c1, r1 = c0 + window.width, r0 + window.height
        xs, ys = zip(*(self.transform @ p for p in ((c0, r0), (c1, r0), (c0, r1), (c1, r1))), strict=True)
        return min(xs), min(ys), max(xs), max(ys)


def _float_nodata(ds: rasterio.io.DatasetReaderBase) -> float:
    return float(ds.nodata) if ds.nodata is not None else float("nan")


def warp_onto(ds: rasterio.DatasetReader, grid: Grid, resampling: str) -> WarpedVRT:
    """A virtual float32 view of ``ds`` resampled onto ``grid``; pixels outside ``ds`` read as nodata (NaN)."""
    try:
        return WarpedVRT(
            ds,
            crs=grid.crs,
            transform=grid.transform,
            height=grid.height,
            width=grid.width,
            resampling=Resampling[resampling],
            src_nodata=ds.nodata,
            nodata=float("nan"),
            dtype="float32",
        )
    except Exception as exc:  # GDAL raises several types for impossible transformations
        raise TuneAgbError(
            f"{ds.name}: cannot warp onto the image grid ({grid.crs}): {str(exc).splitlines()[0][:200]}"
        ) from None


class RasterStack:
    """Several rasters stacked band-wise on the grid of the first one, or on ``grid`` when given (rasters on another
    grid are warped onto it).

    Reads return float32 (C, h, w) with nodata (and pixels masked by the file) as NaN.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        bands: Sequence[str] | None = None,
        resampling: str = "bilinear",
        what: str = "image",
        grid: Grid | None = None,
    ):
        if not paths:
            raise TuneAgbError(f"no {what} given")
        self._opened: list[rasterio.io.DatasetReaderBase] = []
        self.sources: list[tuple[rasterio.io.DatasetReaderBase, list[int]]] = []
        try:
            datasets = [open_raster(p, what) for p in paths]
            self._opened.extend(datasets)
            self.grid = grid or Grid.of(datasets[0])
            names: list[str] = []
            origin: list[tuple[int, int]] = []
            for k, ds in enumerate(datasets):
                for b in range(1, ds.count + 1):
                    desc = ds.descriptions[b - 1]
                    names.append(desc if desc else f"{location_stem(ds.name)}:{b}")
                    origin.append((k, b))
            select = self._select(bands, names, paths) if bands else list(range(len(names)))
            self.band_names = [names[i] for i in select]
            views: list[rasterio.io.DatasetReaderBase] = []
            for ds in datasets:
                if Grid.of(ds).same_as(self.grid):
                    views.append(ds)
                else:
                    vrt = warp_onto(ds, self.grid, resampling)
                    self._opened.append(vrt)
                    views.append(vrt)
            # Keep the requested band order: consecutive bands of one source are read together.
            self.order: list[tuple[int, list[int]]] = []
            for i in select:
                k, b = origin[i]
                if self.order and self.order[-1][0] == k:
                    self.order[-1][1].append(b)
                else:
                    self.order.append((k, [b]))
            self.views = views
            self.names = [ds.name for ds in datasets]
            self.nodata = [_float_nodata(ds) for ds in datasets]
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _select(bands: Sequence[str], names: list[str], paths: Sequence[str | Path]) -> list[int]:
        """Band selection by 1-based index over the stacked bands or by band description."""
        out = []
        for b in bands:
            if b.isdigit():
                i = int(b) - 1
                if not 0 <= i < len(names):
                    raise TuneAgbError(f"--bands: band {b} does not exist; the stacked images have {len(names)} bands")
                out.append(i)
            elif b in names:
                out.append(names.index(b))
            else:
                raise TuneAgbError(
                    f"--bands: no band named {b!r} in {', '.join(map(str, paths))} "
                    f"(bands: {', '.join(names)}; or give 1-based indices)"
                )
        return out

    @property
    def count(self) -> int:
        return len(self.band_names)

    def read(self, window: Window) -> np.ndarray:
        """(C, h, w) float32 of ``window`` (pixels of the grid), nodata and masked pixels as NaN.

        Raises:
            TuneAgbError: when a source cannot be read (e.g. a remote one that went away): one line naming it.
        """
        parts = []
        for k, idx in self.order:
            try:
                arr = self.views[k].read(idx, window=window, masked=True, out_dtype="float32", boundless=False)
            except RasterioIOError as exc:
                raise TuneAgbError(
                    f"{self.names[k]}: cannot read window (row {window.row_off}, col {window.col_off}, "
                    f"{window.height} x {window.width} px): {str(exc).strip()[:200]}"
                ) from None
            parts.append(np.ma.filled(arr, np.nan).astype(np.float32, copy=False))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def close(self) -> None:
        for ds in reversed(self._opened):
            with contextlib.suppress(Exception):
                ds.close()
        self._opened.clear()

    def __enter__(self) -> RasterStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def s2_band_positions(band_names: Sequence[str], count: int) -> list[int]:
    """Positions of the Sentinel-2 bands in a stack: by band description, or the first 12 of a 14-band stack."""
    named = [i for i, n in enumerate(band_names) if n in S2_BANDS]
    if named:
        return named
    if count == len(S2_BANDS) + 2:
        return list(range(len(S2_BANDS)))
    raise TuneAgbError(
        "--s2-dn: cannot tell which bands are Sentinel-2 (no band descriptions B1 ... B12 and not a 14-band stack)"
    )


def dn_to_reflectance(x: np.ndarray, positions: Sequence[int], offset: float) -> np.ndarray:
    """Scale Sentinel-2 digital numbers in place: reflectance = (DN + offset) / 10000 (offset -1000 from 2022)."""
    x[list(positions)] = (x[list(positions)] + offset) / S2_QUANTIFICATION
    return x


def reproject_points(x: np.ndarray, y: np.ndarray, src: CRS, dst: CRS) -> tuple[np.ndarray, np.ndarray]:
    """Map positions ``x``, ``y`` (N,) in ``src`` -> float64 (N,) positions in ``dst``.

    Never raises for a point: one at a non-finite position, outside the domain of ``dst``'s projection (e.g. lon 0
    for a UTM zone 47 grid) or that PROJ cannot transform for another reason comes back as NaN. PROJ fails a whole
    call for one such point, so a failing batch is split in halves until the points that fail are alone.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if src == dst:
        return x.copy(), y.copy()
    out_x, out_y = np.full(x.shape, np.nan), np.full(y.shape, np.nan)
    todo = [np.flatnonzero(np.isfinite(x) & np.isfinite(y))]
    while todo:
        idx = todo.pop()
        if idx.size == 0:
            continue
        try:
            tx, ty = warp_points(src, dst, x[idx], y[idx])
        except CRSError as exc:  # not a CRS pair PROJ can transform at all: not the fault of one point
            raise TuneAgbError(f"cannot transform points from {src} to {dst} ({exc})") from None
        except Exception:  # GDAL raises its own types (CPLE_AppDefinedError: "Point outside of projection domain")
            if idx.size > 1:
                todo += [idx[: idx.size // 2], idx[idx.size // 2 :]]
            continue
        out_x[idx], out_y[idx] = tx, ty
    bad = ~(np.isfinite(out_x) & np.isfinite(out_y))
    out_x[bad] = out_y[bad] = np.nan
    return out_x, out_y


def rasterize_map_points(x: np.ndarray, y: np.ndarray, value: np.ndarray, grid: Grid) -> PointLabels:
    """Points at map positions ``x``, ``y`` (grid CRS) averaged per pixel of ``grid``; points outside the grid or at
    a non-finite position are left out and counted in ``shots_outside``."""
    row, col = grid.pixel_of(x, y)
    return rasterize_points(row, col, value, grid.height, grid.width)


def add_image_argument(parser: argparse.ArgumentParser | argparse._ActionsContainer, required: bool = True) -> None:
    """``--image`` (repeatable): the GeoTIFFs stacked band-wise (not required inside a mutually exclusive group)."""
    parser.add_argument(
        "--image", action="append", required=required, help="input GeoTIFF (repeat to stack more, band-wise)"
    )


def add_stack_arguments(parser: argparse.ArgumentParser) -> None:
    """``--bands --resampling --s2-dn --s2-offset``: how the ``--image`` stack is read (see :class:`StackOptions`)."""
    parser.add_argument("--bands", nargs="+", help="bands to use, by 1-based index over the stack or by description")
    parser.add_argument("--resampling", choices=RESAMPLING, default="bilinear", help="for images on another grid")
    parser.add_argument(
        "--s2-dn", action="store_true", help="Sentinel-2 bands are digital numbers: scale to reflectance"
    )
    parser.add_argument(
        "--s2-offset",
        type=float,
        default=S2_OFFSET_2022,
        help="reflectance = (DN + offset) / 10000; -1000 for products from 2022 on (default), 0 before",
    )


@dataclass(frozen=True)
class StackOptions:
    """How an input stack is read: band selection, resampling of images on another grid, and the offset of the
    Sentinel-2 digital numbers (None: the bands are used as they are)."""

    bands: tuple[str, ...] | None = None
    resampling: str = "bilinear"
    s2_offset: float | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> StackOptions:
        """From the flags of :func:`add_stack_arguments`."""
        return cls(
            bands=tuple(args.bands) if args.bands else None,
            resampling=args.resampling,
            s2_offset=args.s2_offset if args.s2_dn else None,
        )

    def open(self, paths: Sequence[str | Path], what: str = "image") -> RasterStack:
        return RasterStack(paths, bands=self.bands, resampling=self.resampling, what=what)

    def s2_positions(self, stack: RasterStack) -> list[int]:
        """Positions of the bands to scale from digital numbers (none unless :attr:`s2_offset` is set)."""
        return s2_band_positions(stack.band_names, stack.count) if self.s2_offset is not None else []


def iter_windows(height: int, width: int, tile: int, stride: int) -> Iterator[Window]:
    """Windows covering a ``height`` x ``width`` grid (see :func:`tune_agb.geo.tiling.window_starts`)."""
    for r in window_starts(height, tile, stride):
        for c in window_starts(width, tile, stride):
            yield Window(c, r, min(tile, width), min(tile, height))


@contextlib.contextmanager
def staged_file(path: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only when the block succeeds."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise TuneAgbError(f"{path}: exists (use --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def staged_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``path`` (removed if the block fails)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
