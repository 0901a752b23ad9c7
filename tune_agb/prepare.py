"""Cut Sentinel-1/2 GeoTIFF stacks and GEDI labels into the training tiles ``INPUT_DIR/{split}/NAME.npy``.

``python -m tune_agb.prepare --image STACK.tif --gedi SHOTS.parquet --filter "l4_quality_flag==1" --out DIR``
writes ``DIR/inputs/{train,val,test}/NAME.npy`` (C, T, T) float32, ``DIR/labels/{split}/NAME.npy`` (T, T) float32
(NaN = no label), ``DIR/manifest.parquet`` (one row per tile: name, raster, split, offsets, bounds, CRS, labelled
pixels) and ``DIR/prepare.json`` (the summary). ``--scene A.tif [A_S1.tif ...]``, repeated, takes one raster per
Sentinel-2 tile or date instead of the one ``--image`` stack; the rasters must share a CRS. Rasters are read window
by window and one after another, so memory does not grow with their size or number. Rasters may be remote
(``s3://``, ``https://``, ``/vsis3/``, read by GDAL) and ``--gedi`` an ``s3://`` table (:mod:`tune_agb.geo.remote`).

GEDI shots are read from the parquet (or csv) with a filter pushed down into the reader: the user's ``--filter``
and the rasters' footprints in lon/lat, so shots elsewhere on the orbit are never reprojected; shots outside every
raster (or at an invalid position) are counted, never fatal.

Split by space: the first raster sets a lattice of tiles (every ``--stride`` px from its top-left corner, in map
coordinates) and of square blocks of ``--block-size`` x ``--block-size`` tile steps. Rasters whose pixels line up
with it cut their tiles on it. Whole blocks go to one split and a tile goes with the block of its first pixel; a
tile that would reach into a block of another split (a stride smaller than the tile, a raster off the lattice) is
dropped, so no ground area is in two splits, however the rasters overlap or abut.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.windows import Window
from tqdm.auto import tqdm

from tune_agb.bands import SPLITS
from tune_agb.errors import TuneAgbError, run_cli
from tune_agb.geo.raster import (
    Grid,
    RasterStack,
    StackOptions,
    add_image_argument,
    add_stack_arguments,
    dn_to_reflectance,
    gdal_env,
    rasterize_map_points,
    reproject_points,
    staged_dir,
)
from tune_agb.geo.remote import location_stem, s3_object_problem
from tune_agb.geo.tiling import (
    PointLabels,
    anchor_block,
    assign_blocks,
    claim_blocks,
    count_block_tiles,
    span_split,
    window_starts,
)
from tune_agb.location import FILE_SCHEME, is_uri, open_location

log = logging.getLogger(__name__)

GEDI_NODATA = -9999.0  # GEDI L4A / L2A fill value
_FILTER_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(==|!=|>=|<=|>|<)\s*(.+?)\s*$")
_OPS = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
}
_SNAP_PX = 1e-6  # block-grid coordinates this close to a whole pixel are that pixel (affine round-off)


@dataclass
class Summary:
    """What prepare did; printed at the end and saved as ``prepare.json``. Counts are summed over the rasters.

    ``shots_outside`` counts the shots that passed ``--filter`` but lie in no raster (also those at a missing or
    invalid position, or one the raster's projection cannot hold); ``shots_no_value`` the shots inside a raster
    whose value is missing or the GEDI fill value."""

    tiles: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    tiles_per_raster: dict[str, int] = field(default_factory=dict)
    tiles_on_grid: int = 0
    skipped_few_labels: int = 0
    skipped_no_input: int = 0
    dropped_at_split_borders: int = 0
    edge_pixels_unused: tuple[int, int] = (0, 0)
    labelled_pixels: int = 0
    shots_read: int | None = None
    shots_outside: int | None = None
    shots_no_value: int | None = None


@dataclass
class Shots:
    """GEDI shots read from a table: positions (x = lon, y = lat in the points CRS) and values, float64 (N,);
    ``passed`` counts the rows that passed ``--filter``, including those outside the footprint that were not read."""

    x: np.ndarray
    y: np.ndarray
    value: np.ndarray
    passed: int


@dataclass
class Scene:
    """One input raster (a band-wise stack of one or more GeoTIFFs) and where it sits on the block grid.

    ``to_block_grid`` maps this raster's (col, row) pixel positions to those of the first raster, whose pixel grid
    the blocks are counted on."""

    name: str
    paths: list[str]
    stack: RasterStack
    to_block_grid: Affine

    @property
    def grid(self) -> Grid:
        return self.stack.grid

    def tile_starts(self, tile: int, stride: int) -> tuple[list[int], list[int]]:
        """Row and column offsets of the whole tiles in this raster. They lie on the first raster's tile lattice
        (every ``stride`` px from its corner) when this raster's pixels line up with the first raster's (same pixel
        size, whole-pixel offset, give or take half a pixel), so that its tiles fall inside blocks."""
        a, grid = self.to_block_grid, self.grid
        phase = (0, 0)
        if max(abs(a.a - 1), abs(a.e - 1), abs(a.b), abs(a.d)) < 1e-6:
            phase = (round(-a.f) % stride, round(-a.c) % stride)
        rows = window_starts(grid.height - phase[0], tile, stride, cover_edge=False)
        cols = window_starts(grid.width - phase[1], tile, stride, cover_edge=False)
        return [phase[0] + r for r in rows], [phase[1] + c for c in cols]

    def block_span(self, row: int, col: int, tile: int) -> tuple[float, float, float, float]:
        """(row0, col0, row1, col1) on the first raster's pixel grid of the ``tile`` px tile at (``row``, ``col``)."""
        corners = [self.to_block_grid @ p for p in ((col, row), (col + tile, row), (col, row + tile))]
        corners.append(self.to_block_grid @ (col + tile, row + tile))
        cols, rows = (_snap(v) for v in zip(*corners, strict=True))
        return min(rows), min(cols), max(rows), max(cols)


def _snap(values: Sequence[float]) -> list[float]:
    return [float(round(v)) if abs(v - round(v)) < _SNAP_PX else v for v in values]


def parse_filter(text: str, columns: Sequence[str], source: str | Path) -> pc.Expression:
    """``"col==1"``, ``"col>=0.5"``, ``"col!=abc"`` -> a pyarrow expression (pushed down into the parquet reader)."""
    m = _FILTER_RE.match(text)
    if not m:
        raise TuneAgbError(f'--filter {text!r}: expected "COLUMN OP VALUE" with OP one of == != >= <= > <')
    col, op, raw = m.groups()
    if col not in columns:
        raise TuneAgbError(f"--filter {text!r}: {source} has no column {col!r} (columns: {', '.join(columns)})")
    raw = raw.strip("'\"")
    value: int | float | str
    try:
        value = int(raw)
    except ValueError:
        try:
            value = float(raw)
        except ValueError:
            value = raw
    return _OPS[op](pc.field(col), pc.scalar(value))


def footprint_filter(
    boxes: Sequence[tuple[float, float, float, float]], lon_column: str, lat_column: str
) -> pc.Expression:
    """Rows whose (lon, lat) lies in one of ``boxes`` (xmin, ymin, xmax, ymax), as a pyarrow expression; rows with a
    null or NaN position never match."""
    expr = None
    for xmin, ymin, xmax, ymax in dict.fromkeys(boxes):  # dates of one tile share a box: test it once
        lon, lat = pc.field(lon_column), pc.field(lat_column)
        box = (lon >= xmin) & (lon <= xmax) & (lat >= ymin) & (lat <= ymax)
        expr = box if expr is None else expr | box
    assert expr is not None
    return expr


def read_points(
    path: str | Path,
    value_column: str,
    lon_column: str,
    lat_column: str,
    filters: Sequence[str],
    boxes: Sequence[tuple[float, float, float, float]] | None = None,
) -> Shots:
    """Read the shots in ``path`` (parquet or csv; a local path or a URI such as ``s3://bucket/shots.parquet``) that
    pass ``filters`` and lie in one of ``boxes`` (xmin, ymin, xmax, ymax in the lon/lat columns' CRS; None:
    everywhere). Both are pushed down into the reader, so on parquet row groups outside the boxes are skipped by
    their statistics (on S3 they are never downloaded)."""
    source = str(path)
    remote = is_uri(source)
    suffix = PurePosixPath(urlsplit(source).path if remote else source).suffix.lower()
    if suffix not in (".parquet", ".pq", ".csv"):
        raise TuneAgbError(f"{source}: GEDI points must be .parquet or .csv, got {suffix or 'no extension'}")
    if source.startswith(("http://", "https://")):
        raise TuneAgbError(
            f"{source}: --gedi reads a local file or an s3:// (gs://, ...) URI, not http(s); download it"
        )
    if remote:
        problem = s3_object_problem(source, "GEDI points") if source.startswith("s3://") else None
        if problem is not None:
            raise TuneAgbError(problem)
    elif not Path(source.removeprefix(FILE_SCHEME)).expanduser().is_file():
        raise TuneAgbError(f"{source}: GEDI points file not found")
    fs, where_in_fs = open_location(source, label=f"--gedi {source}")
    try:
        ds = pds.dataset(where_in_fs, filesystem=fs, format="csv" if suffix == ".csv" else "parquet")
        columns = list(ds.schema.names)
    except (pa.ArrowInvalid, OSError) as exc:
        raise TuneAgbError(f"{source}: not a readable points table ({str(exc).splitlines()[0][:200]})") from None
    for flag, col in (("--value-column", value_column), ("--lon-column", lon_column), ("--lat-column", lat_column)):
        if col not in columns:
            raise TuneAgbError(f"{flag} {col}: {source} has no such column (columns: {', '.join(columns)})")
        kind = ds.schema.field(col).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)):
            raise TuneAgbError(f"{flag} {col}: column of {source} is not numeric ({kind})")
    user = None
    for f in filters:
        e = parse_filter(f, columns, source)
        user = e if user is None else user & e
    where = user if boxes is None else footprint_filter(boxes, lon_column, lat_column)
    if boxes is not None and user is not None:
        where = user & where
    try:
        passed = ds.count_rows(filter=user) if boxes is not None else None
        table = ds.to_table(columns=[lon_column, lat_column, value_column], filter=where)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise TuneAgbError(f"{source}: cannot apply --filter ({str(exc).splitlines()[0][:200]})") from None
    except OSError as exc:  # a remote table that cannot be read after all (connection, permissions)
        raise TuneAgbError(f"{source}: cannot read the points table ({str(exc).splitlines()[0][:200]})") from None
    passed = table.num_rows if passed is None else passed
    if passed == 0:
        what = " after --filter " + " and ".join(repr(f) for f in filters) if filters else ""
        raise TuneAgbError(f"{source}: no GEDI shots{what} (the points table is empty)")
    x, y, v = (table.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in table.column_names)
    return Shots(x, y, v, passed)


def parse_split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(v) for v in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or any(p < 0 or not math.isfinite(p) for p in parts) or abs(sum(parts) - 1) > 1e-6:
        raise TuneAgbError(f"--split {text!r}: expected three non-negative fractions TRAIN,VAL,TEST summing to 1")
    return parts  # type: ignore[return-value]


def scene_names(groups: Sequence[Sequence[str]]) -> list[str]:
    """One unique name per raster, from its first file's stem (``stem-2``, ``stem-3`` ... for repeated stems)."""
    names: list[str] = []
    for files in groups:
        stem = location_stem(files[0])
        name, k = stem, 1
        while name in names:
            k += 1
            name = f"{stem}-{k}"
        names.append(name)
    return names


def open_scenes(
    groups: Sequence[Sequence[str]], options: StackOptions, tile: int, stack: contextlib.ExitStack
) -> list[Scene]:
    """Open every raster (metadata only; pixels are read later, window by window) and check that they share the
    first one's CRS and band count and hold at least one tile."""
    scenes: list[Scene] = []
    for name, files in zip(scene_names(groups), groups, strict=True):
        raster = stack.enter_context(options.open(files))
        grid = raster.grid
        if scenes:
            first = scenes[0]
            if grid.crs != first.grid.crs:
                raise TuneAgbError(
                    f"{files[0]}: CRS {grid.crs.to_string()} differs from {first.paths[0]}'s "
                    f"{first.grid.crs.to_string()}; all rasters must share one CRS (reproject it with gdalwarp -t_srs)"
                )
            if raster.count != first.stack.count:
                raise TuneAgbError(
                    f"{files[0]}: {raster.count} bands, but {first.paths[0]} has {first.stack.count}; "
                    "every raster must give the same bands (use --bands)"
                )
        if grid.height < tile or grid.width < tile:
            raise TuneAgbError(
                f"{files[0]}: raster is {grid.height} x {grid.width} px, smaller than --tile-size {tile}"
            )
        to_block_grid = ~scenes[0].grid.transform @ grid.transform if scenes else Affine.identity()
        scenes.append(Scene(name, [str(f) for f in files], raster, to_block_grid))
    return scenes


def shots_on_scenes(args: argparse.Namespace, scenes: Sequence[Scene], summary: Summary) -> list[PointLabels]:
    """Read the GEDI shots over the rasters' footprints and rasterise them on each raster's grid (in order)."""
    try:
        points_crs = CRS.from_user_input(args.points_crs)
    except CRSError:
        raise TuneAgbError(f"--points-crs {args.points_crs!r}: not a CRS (e.g. EPSG:4326)") from None
    boxes: list[tuple[float, float, float, float]] | None = []
    for scene in scenes:
        found = scene.grid.bounds_in(points_crs)
        if found is None:  # a footprint PROJ cannot bound: read every shot, reprojection sorts them out
            log.warning("%s: footprint not expressible in %s; reading every GEDI shot", scene.paths[0], points_crs)
            boxes = None
            break
        boxes += found
    gedi = str(args.gedi)
    shots = read_points(gedi, args.value_column, args.lon_column, args.lat_column, args.filter or [], boxes)
    x, y = reproject_points(shots.x, shots.y, points_crs, scenes[0].grid.crs)
    inside = np.zeros(x.shape, bool)
    for scene in scenes:
        inside |= scene.grid.contains(x, y)
    with np.errstate(invalid="ignore"):
        usable = inside & np.isfinite(shots.value) & (shots.value != GEDI_NODATA)
    summary.shots_read = shots.passed
    summary.shots_outside = shots.passed - int(inside.sum())
    summary.shots_no_value = int((inside & ~usable).sum())
    if not usable.any():
        where = scenes[0].paths[0] if len(scenes) == 1 else f"any of the {len(scenes)} rasters"
        raise TuneAgbError(
            f"{gedi}: none of the {shots.passed} shots falls inside {where} "
            f"({summary.shots_outside} outside, {summary.shots_no_value} without a value); check CRS and extent"
        )
    log.info("%d shots, %d outside the rasters", shots.passed, summary.shots_outside)
    x, y, value = x[usable], y[usable], shots.value[usable]
    return [rasterize_map_points(x, y, value, scene.grid) for scene in scenes]


def labelled_tiles(
    scenes: Sequence[Scene],
    label_of: Callable[[int, int, int], np.ndarray],
    tile: int,
    stride: int,
    min_labels: int,
    summary: Summary,
) -> list[tuple[int, int, int, int]]:
    """Pass 1 (labels only, cheap): the tiles with at least ``min_labels`` labelled pixels, as (raster index, row,
    col, labelled pixels), raster by raster; counts the tiles on the grid, those skipped and the px left untiled."""
    candidates: list[tuple[int, int, int, int]] = []
    unused = [0, 0]
    for k, scene in enumerate(scenes):
        rows, cols = scene.tile_starts(tile, stride)
        summary.tiles_on_grid += len(rows) * len(cols)
        unused[0] += scene.grid.height - (len(rows) - 1) * stride - tile if rows else scene.grid.height
        unused[1] += scene.grid.width - (len(cols) - 1) * stride - tile if cols else scene.grid.width
        for r in rows:
            for c in cols:
                n = int(np.isfinite(label_of(k, r, c)).sum())
                if n < min_labels:
                    summary.skipped_few_labels += 1
                else:
                    candidates.append((k, r, c, n))
    summary.edge_pixels_unused = (unused[0], unused[1])
    return candidates


def manifest_row(scene: Scene, name: str, split: str, win: Window, block: tuple[int, int], n_labelled: int) -> dict:
    """The manifest's row for one tile: its raster, split, pixel offsets, block and map bounds."""
    left, bottom, right, top = scene.grid.window_bounds(win)
    return {
        "name": name,
        "raster": scene.name,
        "raster_path": scene.paths[0],
        "split": split,
        "row_off": int(win.row_off),
        "col_off": int(win.col_off),
        "height": int(win.height),
        "width": int(win.width),
        "block_row": block[0],
        "block_col": block[1],
        "left": left,
        "bottom": bottom,
        "right": right,
        "top": top,
        "crs": scene.grid.crs.to_string(),
        "n_labelled": n_labelled,
    }


def prepare(args: argparse.Namespace) -> Summary:
    """Validate everything, cut the tiles into a staging folder, then move them into ``args.out``."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise TuneAgbError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise TuneAgbError(f"--out {out}: folder is not empty (use --overwrite to replace the dataset in it)")
    tile, stride = args.tile_size, args.stride or args.tile_size
    if tile < 8:
        raise TuneAgbError(f"--tile-size: must be >= 8 px, got {tile}")
    if stride < 1:
        raise TuneAgbError(f"--stride: must be >= 1 px, got {stride}")
    if args.block_size < 1:
        raise TuneAgbError(f"--block-size: must be >= 1 (tile steps per block side), got {args.block_size}")
    if args.min_labels < 0:
        raise TuneAgbError(f"--min-labels: must be >= 0, got {args.min_labels}")
    fractions = parse_split(args.split)
    summary = Summary()
    groups = args.scene or [args.image]
    options = StackOptions.from_args(args)
    with gdal_env(), contextlib.ExitStack() as opened:
        scenes = open_scenes(groups, options, tile, opened)
        s2_pos = options.s2_positions(scenes[0].stack)
        points: list[PointLabels] | None = None
        label_stacks: list[RasterStack] = []
        if args.labels:
            for scene in scenes:
                lab = opened.enter_context(
                    RasterStack([args.labels], resampling="nearest", what="label raster", grid=scene.grid)
                )
                if lab.count != 1:
                    raise TuneAgbError(f"{args.labels}: label raster has {lab.count} bands, expected 1")
                label_stacks.append(lab)
        else:
            points = shots_on_scenes(args, scenes, summary)

        def label_of(k: int, r: int, c: int) -> np.ndarray:
            if points is not None:
                return points[k].window(r, c, tile, tile)
            return label_stacks[k].read(Window(c, r, tile, tile))[0]

        candidates = labelled_tiles(scenes, label_of, tile, stride, args.min_labels, summary)
        if not candidates:
            raise TuneAgbError(
                f"no tile of {tile} px has >= {args.min_labels} labelled pixels "
                f"({summary.tiles_on_grid} tiles on the grid); lower --min-labels or check the labels"
            )
        block_px = args.block_size * stride
        spans = [scenes[k].block_span(r, c, tile) for k, r, c, _ in candidates]
        block_tiles = count_block_tiles(((s[0] + 0.5, s[1] + 0.5) for s in spans), block_px)
        block_split = assign_blocks(block_tiles, fractions, args.seed)

        records: list[dict] = []
        several = len(scenes) > 1
        with staged_dir(out) as stage:
            for s in SPLITS:
                (stage / "inputs" / s).mkdir(parents=True)
                (stage / "labels" / s).mkdir(parents=True)
            summary.tiles_per_raster = dict.fromkeys((scene.name for scene in scenes), 0)
            bar = tqdm(zip(candidates, spans, strict=True), total=len(candidates), desc="prepare", unit="tile",
                       disable=not args.progress)  # fmt: skip
            for (k, r, c, n), span in bar:  # raster by raster, each window by window
                scene = scenes[k]
                split = span_split(*span, block_px, block_split)
                if split is None:
                    summary.dropped_at_split_borders += 1
                    continue
                win = Window(c, r, tile, tile)
                image = scene.stack.read(win)
                if not np.isfinite(image).any():
                    summary.skipped_no_input += 1
                    continue
                claim_blocks(*span, block_px, split, block_split)
                if s2_pos:
                    dn_to_reflectance(image, s2_pos, options.s2_offset)
                name = f"{scene.name}_r{r:06d}_c{c:06d}" if several else f"r{r:06d}_c{c:06d}"
                np.save(stage / "inputs" / split / f"{name}.npy", image)
                np.save(stage / "labels" / split / f"{name}.npy", label_of(k, r, c))
                records.append(manifest_row(scene, name, split, win, anchor_block(span[0], span[1], block_px), n))
                summary.tiles[split] += 1
                summary.tiles_per_raster[scene.name] += 1
                summary.labelled_pixels += n
            missing = [s for s, f in zip(SPLITS, fractions, strict=True) if f > 0 and summary.tiles[s] == 0]
            if missing:
                raise TuneAgbError(
                    f"split {', '.join(missing)} got no tile ({len(block_tiles)} blocks hold labelled tiles); "
                    "lower --block-size or --tile-size, or give more labels"
                )
            pq.write_table(pa.Table.from_pylist(records), stage / "manifest.parquet")
            meta = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "summary": asdict(summary)}
            meta["bands"] = scenes[0].stack.band_names
            meta["rasters"] = [
                {"name": sc.name, "files": sc.paths, "height": sc.grid.height, "width": sc.grid.width} for sc in scenes
            ]
            (stage / "prepare.json").write_text(json.dumps(meta, indent=2, default=str))
            _commit(stage, out)
    return summary


def _commit(stage: Path, out: Path) -> None:
    """Replace the dataset in ``out`` by the staged one (the old one stays until the new one is complete)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("inputs", "labels", "manifest.parquet", "prepare.json"):
        old = out / name
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
    for name in ("inputs", "labels", "prepare.json", "manifest.parquet"):  # manifest last: it marks completeness
        (stage / name).replace(out / name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tune_agb.prepare", description=__doc__.split("\n\n")[0])
    rasters = p.add_mutually_exclusive_group(required=True)
    add_image_argument(rasters, required=False)
    rasters.add_argument(
        "--scene",
        action="append",
        nargs="+",
        metavar="TIF",
        help="one raster (a Sentinel-2 tile or date): its GeoTIFFs, stacked band-wise; repeat for more rasters, "
        "which must share a CRS",
    )
    lab = p.add_mutually_exclusive_group(required=True)
    lab.add_argument("--labels", help="label raster (one band, NaN/nodata where no label)")
    lab.add_argument("--gedi", help="GEDI shots table (.parquet or .csv)")
    p.add_argument("--value-column", default="agbd", help="label column of the shots table (default agbd)")
    p.add_argument("--lon-column", default="lon_lowestmode")
    p.add_argument("--lat-column", default="lat_lowestmode")
    p.add_argument("--points-crs", default="EPSG:4326", help="CRS of the lon/lat columns (default EPSG:4326)")
    p.add_argument(
        "--filter", action="append", help='row filter "COLUMN OP VALUE", e.g. "l4_quality_flag==1" (repeatable)'
    )
    p.add_argument("--out", required=True, help="output folder (inputs/, labels/, manifest.parquet)")
    p.add_argument("--tile-size", type=int, default=244, help="tile side in px (default 244)")
    p.add_argument("--stride", type=int, default=None, help="tile step in px (default: the tile size, no overlap)")
    p.add_argument("--split", default="0.7,0.15,0.15", help="train,val,test fractions of the tiles")
    p.add_argument("--block-size", type=int, default=2, help="block side in tile steps; blocks go whole to a split")
    p.add_argument("--min-labels", type=int, default=1, help="skip tiles with fewer labelled pixels (default 1)")
    add_stack_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the block-to-split assignment")
    p.add_argument("--overwrite", action="store_true", help="replace the dataset in a non-empty --out")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument(
        "--no-pack",
        dest="pack",
        action="store_false",
        help="do not pack the training store now (search and final_train pack it on first use)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    s = prepare(args)
    total = sum(s.tiles.values())
    print(
        f"{total} tiles written to {args.out} (train {s.tiles['train']}, val {s.tiles['val']}, test {s.tiles['test']});"
        f" {s.labelled_pixels} labelled pixels"
    )
    print(
        f"skipped: {s.skipped_few_labels} with < {args.min_labels} labels, {s.skipped_no_input} without input data, "
        f"{s.dropped_at_split_borders} across split borders; edge px not tiled (rows, cols): {s.edge_pixels_unused}"
    )
    if s.shots_read is not None:
        where = "raster" if len(s.tiles_per_raster) <= 1 else f"{len(s.tiles_per_raster)} rasters"
        print(
            f"GEDI shots: {s.shots_read} passed the filters, {s.shots_outside} of them outside the {where}, "
            f"{s.shots_no_value} without a value"
        )
    if args.pack:  # the store search/final_train read (tune_agb.store), so that their first start does not pack
        from tune_agb.store import packed_split

        out = Path(args.out)
        paths = [packed_split(out / "inputs", out / "labels", sp).path for sp in SPLITS if s.tiles[sp] > 0]
        print(f"training store packed: {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
