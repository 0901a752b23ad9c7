"""Where the tiles are: each train/val tile's extent, and the grid their cross-validation blocks are laid on.

Positions come from prepare's ``manifest.parquet`` (map bounds, one row per tile) wherever there is one; the tile
names (``tile_ROW_COL``, ``[RASTER_]rROW_cCOL``) are parsed only for datasets without a manifest, and a set of names
without positions gets one block per tile (where only some names give positions, each of the others does). See
:mod:`tune_agb.cv` for the steps. No Ray, no torch (pyarrow only to read a manifest, which may lie on ``s3://`` or
``gs://`` like the tiles).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tune_agb.errors import TuneAgbError
from tune_agb.location import exists, read_bytes, read_table

log = logging.getLogger(__name__)

POSITION_SOURCES = ("auto", "manifest", "names", "tiles")
MANIFEST_FILE = "manifest.parquet"  # written by tune_agb.prepare next to inputs/ and labels/
PREPARE_FILE = "prepare.json"
MANIFEST_COLUMNS = ("name", "left", "right", "top", "bottom", "width", "height")

_TILE_INDEX = re.compile(r"^tile_(\d+)_(\d+)$")  # tile_ROW_COL: row and column of the tile on the tile grid
_PIXEL_OFFSET = re.compile(r"^(?:(?P<raster>.+)_)?r(?P<row>\d+)_c(?P<col>\d+)$")  # prepare's [RASTER_]rROW_cCOL


@dataclass(frozen=True)
class TilePlace:
    """Where a tile lies: ``[y0, y1) x [x0, x1)`` (rows downwards) in its positions' units, in ``area`` (tiles of
    different areas never share ground); ``tol``: half a pixel in those units (overlaps thinner than that do not
    count)."""

    area: str
    y0: float
    x0: float
    y1: float
    x1: float
    tol: float


@dataclass
class Positions:
    """The places of a set of tiles and the grid their blocks are laid on.

    ``kind`` is ``manifest``, ``names`` or ``tiles`` (the fallback: every tile its own block); ``source`` says where
    the positions came from (for people); ``step`` is one tile step (y, x) in the positions' ``unit``; ``origin``
    (y, x) is where the block grid starts.
    """

    kind: str
    source: str
    unit: str
    step: tuple[float, float]
    origin: tuple[float, float]
    places: dict[str, TilePlace]


def positions_from_names(names: Iterable[str], tile_hw: tuple[int, int]) -> Positions | None:
    """Positions read from tile names, or None when the names do not all follow one of the known patterns.

    ``tile_ROW_COL`` gives tile indices (unit: tiles); ``rROW_cCOL`` and ``RASTER_rROW_cCOL`` give pixel offsets in
    the tile's raster (unit: px, one step = the tile's size ``tile_hw``), each raster its own area. Used only where
    there is no manifest (:func:`tile_positions`).

    Args:
        names: the tile names.
        tile_hw: a tile's height and width in pixels.

    Returns:
        The positions (kind ``names``), or None when a name matches none of the patterns or the names mix them.
    """
    names = list(names)
    h, w = tile_hw
    tiles = [_TILE_INDEX.match(n) for n in names]
    if names and all(tiles):
        places = {
            n: TilePlace("", float(m[1]), float(m[2]), float(m[1]) + 1, float(m[2]) + 1, 0.5 / max(h, w))
            for n, m in zip(names, tiles, strict=True)
        }
        return Positions("names", "tile names (tile_ROW_COL)", "tiles", (1.0, 1.0), (0.0, 0.0), places)
    pixels = [_PIXEL_OFFSET.match(n) for n in names]
    if names and all(pixels):
        places = {}
        for n, m in zip(names, pixels, strict=True):
            r, c = float(m["row"]), float(m["col"])
            places[n] = TilePlace(m["raster"] or "", r, c, r + h, c + w, 0.5)
        rasters = sorted({p.area for p in places.values()})
        source = "tile names (rROW_cCOL)" if rasters == [""] else "tile names (RASTER_rROW_cCOL)"
        if len(rasters) > 1:
            log.warning(
                "cv: tile names give pixel offsets in %d rasters; without prepare's %s they are placed apart (blocks "
                "never mix rasters), so rasters that overlap (dates of one area) could share ground across folds",
                len(rasters),
                MANIFEST_FILE,
            )
        return Positions("names", source, "px", (float(h), float(w)), (0.0, 0.0), places)
    return None


def positions_in_part(names: Iterable[str], tile_hw: tuple[int, int]) -> Positions | None:
    """Positions where only some names give them (datasets pooled from sources named differently): the names that
    follow the pattern most of them follow are placed by it, every other tile is its own block; None when no name
    follows a pattern.

    Args:
        names: the tile names.
        tile_hw: a tile's height and width in pixels.

    Returns:
        The positions (kind ``names``), or None.
    """
    names = list(names)
    counts = {pattern: sum(bool(pattern.match(n)) for n in names) for pattern in (_TILE_INDEX, _PIXEL_OFFSET)}
    pattern = max(counts, key=counts.__getitem__)
    placed = [n for n in names if pattern.match(n)]
    if not placed:
        return None
    found = positions_from_names(placed, tile_hw)
    assert found is not None  # every name in placed follows the pattern
    rest = [n for n in names if not pattern.match(n)]
    log.warning(
        "cv: no manifest; %d of %d tile names give positions (%s), the other %d (%s ...) are each their own block",
        len(placed), len(names), found.source, len(rest), rest[0],
    )  # fmt: skip
    found.places |= positions_per_tile(rest).places
    found.source += f", {len(rest)} tiles one block each"
    return found


def positions_per_tile(names: Iterable[str]) -> Positions:
    """The fallback: every tile its own area and block (folds by whole tiles, neighbours may be apart).

    Args:
        names: the tile names.

    Returns:
        Positions of kind ``tiles``: each tile a unit square at the origin of an area named after it.
    """
    places = {n: TilePlace(n, 0.0, 0.0, 1.0, 1.0, 0.0) for n in names}
    return Positions("tiles", "one block per tile (no manifest, tile names without positions)", "tiles", (1.0, 1.0),
                     (0.0, 0.0), places)  # fmt: skip


def positions_from_manifest(location: str, names: Iterable[str]) -> Positions:
    """Positions in map coordinates from prepare's ``manifest.parquet`` at ``location`` (a path or a URI).

    One tile step is the tile's width in map units (scaled by prepare's ``--stride`` when ``prepare.json`` lies next
    to the manifest). Every tile of ``names`` must have a row.

    Args:
        location: the manifest (local path, ``file://`` or a pyarrow URI such as ``s3://``).
        names: the tiles to place.

    Returns:
        Positions of kind ``manifest``: rows are ``-top .. -bottom`` and columns ``left .. right`` in map units; the
        block grid starts at the tiles' top-left corner.

    Raises:
        TuneAgbError: one line naming ``location``: missing or unreadable, without prepare's columns, without a row
            for a tile, tiles in several CRSs, or an empty extent.
    """
    table = read_table(location)
    if table is None:
        raise TuneAgbError(f"{location}: manifest not found")
    rows = table.to_pylist()
    missing_cols = [c for c in MANIFEST_COLUMNS if rows and c not in rows[0]]
    if not rows or missing_cols:
        raise TuneAgbError(f"{location}: expected prepare's manifest with columns {', '.join(MANIFEST_COLUMNS)}")
    by_name = {str(r["name"]): r for r in rows}
    names = list(names)
    absent = [n for n in names if n not in by_name]
    if absent:
        raise TuneAgbError(
            f"{location}: no row for tile {absent[0]}{f' (and {len(absent) - 1} more)' if len(absent) > 1 else ''}; "
            "is this the manifest of these tiles? (set cv.positions: names to ignore it)"
        )
    crs = {str(by_name[n].get("crs")) for n in names}
    if len(crs) > 1:
        raise TuneAgbError(
            f"{location}: tiles in several CRSs ({', '.join(sorted(crs))}); cannot place them on one grid"
        )
    places = {}
    widths, heights = [], []
    for n in names:
        r = by_name[n]
        width_map, height_map = float(r["right"]) - float(r["left"]), float(r["top"]) - float(r["bottom"])
        if not (width_map > 0 and height_map > 0 and r["width"] and r["height"]):
            raise TuneAgbError(f"{location}: tile {n} has an empty extent (left/right/top/bottom)")
        pixel = width_map / float(r["width"])
        places[n] = TilePlace("", -float(r["top"]), float(r["left"]), -float(r["bottom"]), float(r["right"]), pixel / 2)
        widths.append(width_map)
        heights.append(height_map)
    stride_scale = _prepare_stride_scale(location)
    step = (float(np.median(heights)) * stride_scale, float(np.median(widths)) * stride_scale)
    origin = (min(p.y0 for p in places.values()), min(p.x0 for p in places.values()))
    unit = f"map units ({crs.pop()})" if crs else "map units"
    return Positions("manifest", f"manifest {location}", unit, step, origin, places)


def _prepare_stride_scale(manifest: str) -> float:
    """prepare's ``--stride / --tile-size`` from the ``prepare.json`` beside the manifest (1 without one)."""
    data = read_bytes(f"{manifest.rsplit('/', 1)[0]}/{PREPARE_FILE}")
    try:
        args = json.loads(data)["args"] if data else {}
        tile = float(args["tile_size"])
        stride = float(args.get("stride") or tile)
        return stride / tile if tile > 0 and stride > 0 else 1.0
    except (KeyError, TypeError, ValueError):
        return 1.0


def manifest_location(cv: Mapping[str, Any], input_dir: str) -> str | None:
    """The manifest to read: ``cv.manifest`` when given (it must exist), else ``manifest.parquet`` next to the inputs
    folder (prepare's layout ``DIR/inputs``, ``DIR/manifest.parquet``) or inside it; None when there is none.

    Args:
        cv: the ``cv`` section (its ``manifest`` entry, if any).
        input_dir: the inputs folder (a path or a URI).

    Returns:
        The manifest's location, or None.

    Raises:
        TuneAgbError: when ``cv.manifest`` is given but not found.
    """
    if cv.get("manifest"):
        location = str(cv["manifest"])
        if read_bytes(location) is None:
            raise TuneAgbError(f"cv.manifest: {location} not found")
        return location
    base = input_dir.rstrip("/")
    for candidate in (f"{base.rsplit('/', 1)[0]}/{MANIFEST_FILE}", f"{base}/{MANIFEST_FILE}"):
        if exists(candidate):
            return candidate
    return None


def tile_positions(cv: Mapping[str, Any], names: list[str], tile_hw: tuple[int, int], input_dir: str) -> Positions:
    """The positions ``cv.positions`` asks for: ``manifest`` (required), ``names`` (required to parse), ``tiles``
    (the fallback), or ``auto``: the manifest where there is one, else the names, else the fallback.

    Where a manifest is found (``auto``, ``manifest``), the bounds are prepare's and the names are not parsed.

    Args:
        cv: the ``cv`` section (``positions``, ``manifest``).
        names: the train and val tile names.
        tile_hw: a tile's height and width in pixels (for names with pixel offsets).
        input_dir: the inputs folder (where the manifest is looked for).

    Returns:
        The tiles' positions.

    Raises:
        TuneAgbError: one line naming ``cv.positions`` or ``cv.manifest`` when the asked-for source is unavailable.
    """
    how = cv.get("positions", "auto")
    if how == "tiles":
        return positions_per_tile(names)
    if how in ("auto", "manifest"):
        location = manifest_location(cv, input_dir)
        if location is not None:
            return positions_from_manifest(location, names)
        if how == "manifest":
            raise TuneAgbError(
                f"cv.positions: manifest asked for, but there is no {MANIFEST_FILE} next to {input_dir} "
                "(give its path as cv.manifest)"
            )
    found = positions_from_names(names, tile_hw)
    if found is not None:
        return found
    if how == "names":
        bad = next(n for n in names if not (_TILE_INDEX.match(n) or _PIXEL_OFFSET.match(n)))
        raise TuneAgbError(
            f"cv.positions: names asked for, but tile {bad!r} is not named tile_ROW_COL, rROW_cCOL or RASTER_rROW_cCOL"
        )
    found = positions_in_part(names, tile_hw)
    if found is not None:
        return found
    log.warning("cv: no manifest and the tile names give no positions: every tile is its own block")
    return positions_per_tile(names)
