"""Cut a Sentinel-1/2 GeoTIFF stack and GEDI labels into the training tiles ``INPUT_DIR/{split}/NAME.npy``.

``python -m tune_agb.prepare --image STACK.tif --gedi SHOTS.parquet --filter "l4_quality_flag==1" --out DIR``
writes ``DIR/inputs/{train,val,test}/NAME.npy`` (C, T, T) float32, ``DIR/labels/{split}/NAME.npy`` (T, T) float32
(NaN = no label), ``DIR/manifest.parquet`` (one row per tile: name, split, offsets, bounds, CRS, labelled pixels)
and ``DIR/prepare.json`` (the summary). Rasters are read window by window, so memory does not grow with their size.

Split by space: the tile grid is grouped into square blocks of ``--block-size`` x ``--block-size`` tile steps and
whole blocks go to one split; a tile that would reach into a block of another split (possible with a stride
smaller than the tile) is dropped, so no pixel is in two splits.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.windows import Window
from tqdm.auto import tqdm

from tune_agb.bands import SPLITS
from tune_agb.errors import TuneAgbError, run_cli
from tune_agb.geo.raster import (
    RasterStack,
    StackOptions,
    add_image_argument,
    add_stack_arguments,
    dn_to_reflectance,
    gdal_env,
    rasterize_map_points,
    staged_dir,
)
from tune_agb.geo.tiling import (
    PointLabels,
    assign_blocks,
    block_of,
    count_block_tiles,
    tile_split,
    window_starts,
)

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


@dataclass
class Summary:
    """What prepare did; printed at the end and saved as ``prepare.json``."""

    tiles: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    tiles_on_grid: int = 0
    skipped_few_labels: int = 0
    skipped_no_input: int = 0
    dropped_at_split_borders: int = 0
    edge_pixels_unused: tuple[int, int] = (0, 0)
    labelled_pixels: int = 0
    shots_read: int | None = None
    shots_outside: int | None = None
    shots_no_value: int | None = None


def parse_filter(text: str, columns: Sequence[str], source: Path) -> pc.Expression:
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


def read_points(
    path: Path,
    value_column: str,
    lon_column: str,
    lat_column: str,
    filters: Sequence[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read (x, y, value) float64 arrays of the shots in ``path`` (parquet or csv) that pass ``filters``."""
    if not path.is_file():
        raise TuneAgbError(f"{path}: GEDI points file not found")
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".pq", ".csv"):
        raise TuneAgbError(f"{path}: GEDI points must be .parquet or .csv, got {suffix or 'no extension'}")
    try:
        ds = pds.dataset(path, format="csv" if suffix == ".csv" else "parquet")
        columns = list(ds.schema.names)
    except (pa.ArrowInvalid, OSError) as exc:
        raise TuneAgbError(f"{path}: not a readable points table ({str(exc).splitlines()[0][:200]})") from None
    for flag, col in (("--value-column", value_column), ("--lon-column", lon_column), ("--lat-column", lat_column)):
        if col not in columns:
            raise TuneAgbError(f"{flag} {col}: {path} has no such column (columns: {', '.join(columns)})")
    expr = None
    for f in filters:
        e = parse_filter(f, columns, path)
        expr = e if expr is None else expr & e
    try:
        table = ds.to_table(columns=[lon_column, lat_column, value_column], filter=expr)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise TuneAgbError(f"{path}: cannot apply --filter ({str(exc).splitlines()[0][:200]})") from None
    if table.num_rows == 0:
        what = " after --filter " + " and ".join(repr(f) for f in filters) if filters else ""
        raise TuneAgbError(f"{path}: no GEDI shots{what} (the points table is empty)")
    out = []
    for col in (lon_column, lat_column, value_column):
        try:
            out.append(table.column(col).to_numpy(zero_copy_only=False).astype(np.float64))
        except (pa.ArrowInvalid, ValueError, TypeError):
            raise TuneAgbError(f"{path}: column {col!r} is not numeric ({table.schema.field(col).type})") from None
    return out[0], out[1], out[2]


def parse_split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(v) for v in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or any(p < 0 or not math.isfinite(p) for p in parts) or abs(sum(parts) - 1) > 1e-6:
        raise TuneAgbError(f"--split {text!r}: expected three non-negative fractions TRAIN,VAL,TEST summing to 1")
    return parts  # type: ignore[return-value]


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

    options = StackOptions.from_args(args)
    with gdal_env(), options.open(args.image) as stack:
        grid = stack.grid
        if grid.height < tile or grid.width < tile:
            raise TuneAgbError(
                f"{args.image[0]}: raster is {grid.height} x {grid.width} px, smaller than --tile-size {tile}"
            )
        s2_pos = options.s2_positions(stack)
        label_stack: RasterStack | None = None
        points: PointLabels | None = None
        if args.labels:
            label_stack = RasterStack([args.labels], resampling="nearest", what="label raster")
            if label_stack.count != 1:
                label_stack.close()
                raise TuneAgbError(f"{args.labels}: label raster has {label_stack.count} bands, expected 1")
        else:
            try:
                points_crs = CRS.from_user_input(args.points_crs)
            except CRSError:
                raise TuneAgbError(f"--points-crs {args.points_crs!r}: not a CRS (e.g. EPSG:4326)") from None
            gedi = Path(args.gedi)
            x, y, v = read_points(gedi, args.value_column, args.lon_column, args.lat_column, args.filter or [])
            points = rasterize_map_points(x, y, v, grid, points_crs, gedi, nodata=GEDI_NODATA)
            summary.shots_read, summary.shots_outside = points.shots_read, points.shots_outside
            summary.shots_no_value = points.shots_no_value
            if points.pixel.size == 0:
                raise TuneAgbError(
                    f"{gedi}: none of the {points.shots_read} shots falls inside {args.image[0]} "
                    f"({points.shots_outside} outside, {points.shots_no_value} without a value); check CRS and extent"
                )
            log.info("%d shots, %d outside the raster", points.shots_read, points.shots_outside)

        try:
            rows = window_starts(grid.height, tile, stride, cover_edge=False)
            cols = window_starts(grid.width, tile, stride, cover_edge=False)
            summary.tiles_on_grid = len(rows) * len(cols)
            summary.edge_pixels_unused = (grid.height - rows[-1] - tile, grid.width - cols[-1] - tile)
            block_px = args.block_size * stride

            def label_of(r: int, c: int) -> np.ndarray:
                if points is not None:
                    return points.window(r, c, tile, tile)
                assert label_stack is not None
                return label_stack.read(Window(c, r, tile, tile))[0]

            # Pass 1 (labels only, cheap): which tiles have enough labels, and how many per block.
            candidates: list[tuple[int, int, int]] = []
            for r in rows:
                for c in cols:
                    n = int(np.isfinite(label_of(r, c)).sum())
                    if n < args.min_labels:
                        summary.skipped_few_labels += 1
                    else:
                        candidates.append((r, c, n))
            if not candidates:
                raise TuneAgbError(
                    f"no tile of {tile} px has >= {args.min_labels} labelled pixels "
                    f"({summary.tiles_on_grid} tiles on the grid); lower --min-labels or check the labels"
                )
            block_tiles = count_block_tiles(((r, c) for r, c, _ in candidates), block_px)
            block_split = assign_blocks(block_tiles, fractions, args.seed)

            records: list[dict] = []
            crs_text = grid.crs.to_string()
            with staged_dir(out) as stage:
                for s in SPLITS:
                    (stage / "inputs" / s).mkdir(parents=True)
                    (stage / "labels" / s).mkdir(parents=True)
                bar = tqdm(candidates, desc="prepare", unit="tile", disable=not args.progress)
                for r, c, n in bar:
                    split = tile_split(r, c, tile, block_px, block_split)
                    if split is None:
                        summary.dropped_at_split_borders += 1
                        continue
                    win = Window(c, r, tile, tile)
                    image = stack.read(win)
                    if not np.isfinite(image).any():
                        summary.skipped_no_input += 1
                        continue
                    if s2_pos:
                        dn_to_reflectance(image, s2_pos, options.s2_offset)
                    name = f"r{r:06d}_c{c:06d}"
                    np.save(stage / "inputs" / split / f"{name}.npy", image)
                    np.save(stage / "labels" / split / f"{name}.npy", label_of(r, c))
                    left, bottom, right, top = grid.window_bounds(win)
                    block_row, block_col = block_of(r, c, block_px)
                    records.append(
                        {
                            "name": name,
                            "split": split,
                            "row_off": r,
                            "col_off": c,
                            "height": tile,
                            "width": tile,
                            "block_row": block_row,
                            "block_col": block_col,
                            "left": left,
                            "bottom": bottom,
                            "right": right,
                            "top": top,
                            "crs": crs_text,
                            "n_labelled": n,
                        }
                    )
                    summary.tiles[split] += 1
                    summary.labelled_pixels += n
                missing = [s for s, f in zip(SPLITS, fractions, strict=True) if f > 0 and summary.tiles[s] == 0]
                if missing:
                    raise TuneAgbError(
                        f"split {', '.join(missing)} got no tile ({len(block_tiles)} blocks hold labelled tiles); "
                        "lower --block-size or --tile-size, or give more labels"
                    )
                pq.write_table(pa.Table.from_pylist(records), stage / "manifest.parquet")
                meta = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "summary": asdict(summary)}
                meta["bands"] = stack.band_names
                (stage / "prepare.json").write_text(json.dumps(meta, indent=2, default=str))
                _commit(stage, out)
        finally:
            if label_stack is not None:
                label_stack.close()
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
    add_image_argument(p)
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
        print(
            f"GEDI shots: {s.shots_read} passed the filters, {s.shots_outside} of them outside the raster, "
            f"{s.shots_no_value} without a value"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
