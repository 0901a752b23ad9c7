"""Spatial k-fold cross-validation: where the tiles are, blocks of nearby tiles, the blocks' folds, the folds' tiles.

With ~100 validation labels in a few tiles, picking the best of dozens of trials on one validation split mostly picks
noise. Spatial cross-validation (Roberts et al. 2017; Ploton et al. 2020) validates every configuration on all the
labelled tiles instead, fold by fold, with whole blocks of neighbouring tiles held out together so that a model is
never validated next to a tile it trained on.

The steps (:func:`build_assignment` runs them on the train and val tiles of a dataset, in the search's driver):

1. **Positions** (:func:`tile_positions`): each tile's extent, from prepare's ``manifest.parquet`` (map coordinates;
   next to the inputs folder, or the one the ``cv`` section names), else from the tile names (``tile_ROW_COL``: tile
   indices, as the demo data and the real tiles are named; ``rROW_cCOL`` or ``RASTER_rROW_cCOL``: pixel offsets, as
   prepare names them), else one block per tile (a fallback that still never splits a tile, but neighbouring tiles
   may land in different folds).
2. **Blocks**: squares of ``block_size`` x ``block_size`` tile steps (or ``block_m`` map units), on a grid starting
   at the origin of the names' grid (tile or pixel 0) or at the tiles' top-left corner (manifest). A tile belongs
   to the block holding its first pixel. Tiles of different rasters named ``RASTER_r..._c...`` without a manifest
   are placed apart (their blocks never mix; the manifest puts them on one grid).
3. **Folds** (:func:`assign_folds`): the blocks in a seeded random order, each to the fold with the fewest labelled
   pixels so far (the most balanced of several such draws), so the folds hold about as many labels each. A block
   goes whole to one fold, a tile with its block, every tile to exactly one fold.
4. **Buffer**: a tile that overlaps a tile of fold j (a stride smaller than the tile) is left out of fold j's
   training, so no ground is both trained on and validated in a fold.
5. **Normalisation**: per fold, the input bands' and the target's mean and std over that fold's training tiles (one
   pass over the tiles), so a fold's validation labels never reach its standardisation.

The result, a :class:`FoldAssignment`, is saved in the experiment as ``cv_folds.json`` (:meth:`FoldAssignment.to_dict`)
and reused by ``--resume``; trials build their folds' tiles from it (:func:`fold_tiles`) without copying the store.
For a final training, :func:`merge_train_val` gives the tiles of a retrain on train + val and :func:`out_of_fold`
the k fold models' predictions of the tiles they did not train on. This module imports no Ray (pyarrow only to read
a manifest).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tune_agb.engine.data import NormStats, StackedRows, StatsAccumulator, TileSet
from tune_agb.errors import TuneAgbError
from tune_agb.location import exists, read_bytes

log = logging.getLogger(__name__)

FOLDS_FORMAT = "tune_agb.cv_folds/1"
POSITION_SOURCES = ("auto", "manifest", "names", "tiles")
MANIFEST_FILE = "manifest.parquet"  # written by tune_agb.prepare next to inputs/ and labels/
PREPARE_FILE = "prepare.json"
CV_SPLITS = ("train", "val")  # the splits whose tiles the folds share; test stays out
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


# -- positions ---------------------------------------------------------------------------------------------------
def positions_from_names(names: Iterable[str], tile_hw: tuple[int, int]) -> Positions | None:
    """Positions read from tile names, or None when the names do not all follow one of the known patterns.

    ``tile_ROW_COL`` gives tile indices (unit: tiles); ``rROW_cCOL`` and ``RASTER_rROW_cCOL`` give pixel offsets in
    the tile's raster (unit: px, one step = the tile's size ``tile_hw``), each raster its own area.
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


def positions_per_tile(names: Iterable[str]) -> Positions:
    """The fallback: every tile its own area and block (folds by whole tiles, neighbours may be apart)."""
    places = {n: TilePlace(n, 0.0, 0.0, 1.0, 1.0, 0.0) for n in names}
    return Positions("tiles", "one block per tile (no manifest, tile names without positions)", "tiles", (1.0, 1.0),
                     (0.0, 0.0), places)  # fmt: skip


def positions_from_manifest(location: str, names: Iterable[str]) -> Positions:
    """Positions in map coordinates from prepare's ``manifest.parquet`` at ``location`` (a path or a URI).

    One tile step is the tile's width in map units (scaled by prepare's ``--stride`` when ``prepare.json`` lies next
    to the manifest). Every tile of ``names`` must have a row.
    """
    import pyarrow.parquet as pq

    data = read_bytes(location)
    if data is None:
        raise TuneAgbError(f"{location}: manifest not found")
    try:
        rows = pq.read_table(io.BytesIO(data)).to_pylist()
    except (OSError, ValueError) as exc:
        raise TuneAgbError(f"{location}: not a readable parquet manifest ({str(exc).splitlines()[0]})") from None
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
    folder (prepare's layout ``DIR/inputs``, ``DIR/manifest.parquet``) or inside it; None when there is none."""
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
    (the fallback), or ``auto``: the manifest where there is one, else the names, else the fallback."""
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
    log.warning("cv: no manifest and the tile names give no positions: every tile is its own block")
    return positions_per_tile(names)


# -- blocks and folds --------------------------------------------------------------------------------------------
def block_side(cv: Mapping[str, Any], positions: Positions) -> tuple[float, float]:
    """A block's side (y, x) in the positions' units: ``block_m`` map units, else ``block_size`` tile steps."""
    if cv.get("block_m") is not None:
        if positions.kind != "manifest":
            raise TuneAgbError(
                f"cv.block_m: a block size in map units needs prepare's {MANIFEST_FILE} (positions come from "
                f"{positions.source}); give cv.block_size in tiles instead"
            )
        return float(cv["block_m"]), float(cv["block_m"])
    size = float(cv.get("block_size", 2))
    return size * positions.step[0], size * positions.step[1]


def block_of(place: TilePlace, side: tuple[float, float], origin: tuple[float, float]) -> str:
    """The id of the block holding the tile's first pixel: ``AREA/ROW/COL`` (``ROW/COL`` for the unnamed area)."""
    by = math.floor((place.y0 + place.tol - origin[0]) / side[0])
    bx = math.floor((place.x0 + place.tol - origin[1]) / side[1])
    return f"{place.area}/{by}/{bx}" if place.area else f"{by}/{bx}"


# Random orders tried by assign_folds (the most balanced wins); fewer for very many blocks.
FOLD_DRAWS = 64


def assign_folds(
    block_tiles: Mapping[str, int], block_labelled: Mapping[str, int], k: int, seed: int
) -> dict[str, int]:
    """The fold of each block, balanced by labelled pixels, drawn with ``seed``.

    A draw takes the blocks (sorted ids) in a random order and gives each to the fold with the fewest labelled pixels
    so far (ties: fewer tiles, then the lower fold), so the first k blocks open the k folds. Of
    :data:`FOLD_DRAWS` draws from one seeded generator, the one whose folds' labelled pixels differ least is kept
    (the first such). The same blocks and seed give the same folds.
    """
    blocks = sorted(block_tiles)
    labels = [int(block_labelled.get(b, 0)) for b in blocks]
    sizes = [int(block_tiles[b]) for b in blocks]
    rng = np.random.default_rng(seed)
    best: tuple[int, list[int]] | None = None
    for _ in range(max(1, min(FOLD_DRAWS, 2_000_000 // max(1, len(blocks) * k)))):
        labelled, tiles = [0] * k, [0] * k
        fold = [0] * len(blocks)
        for i in rng.permutation(len(blocks)):
            j = min(range(k), key=lambda f: (labelled[f], tiles[f], f))
            fold[i] = j
            labelled[j] += labels[i]
            tiles[j] += sizes[i]
        spread = max(labelled) - min(labelled)
        if best is None or spread < best[0]:
            best = (spread, fold)
    assert best is not None
    return dict(zip(blocks, best[1], strict=True))


def overlapping_pairs(places: Mapping[str, TilePlace]) -> list[tuple[str, str]]:
    """Pairs of tiles that share ground (overlap by more than half a pixel both ways), found through a grid of
    cells as large as the largest tile (an overlapping tile starts in the same or a neighbouring cell)."""
    if not places:
        return []
    cell = (max(p.y1 - p.y0 for p in places.values()), max(p.x1 - p.x0 for p in places.values()))
    grid: dict[tuple[str, int, int], list[str]] = {}
    for n, p in places.items():
        grid.setdefault((p.area, math.floor(p.y0 / cell[0]), math.floor(p.x0 / cell[1])), []).append(n)
    pairs = []
    for (area, cy, cx), members in grid.items():
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                for b in grid.get((area, cy + dy, cx + dx), []):
                    for a in members:
                        if a < b and _overlap(places[a], places[b]):
                            pairs.append((a, b))
    return sorted(set(pairs))


def _overlap(a: TilePlace, b: TilePlace) -> bool:
    tol = max(a.tol, b.tol)
    return min(a.y1, b.y1) - max(a.y0, b.y0) > tol and min(a.x1, b.x1) - max(a.x0, b.x0) > tol


# -- the assignment ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FoldAssignment:
    """The folds of a cross-validation over the train and val tiles (``cv_folds.json`` in an experiment).

    Per tile, in the stores' order (train tiles, then val tiles): ``names``, ``splits`` (the split it came from),
    ``blocks``, ``folds`` (0 .. k-1) and ``labelled`` pixels. Per fold: ``excluded`` (tiles of other folds left out
    of its training because they overlap its tiles), ``train_stats`` (the normalisation sums of its training tiles,
    :meth:`~tune_agb.engine.data.StatsAccumulator.to_dict`) and ``val_nonfinite`` (non-finite inputs of its tiles).
    ``settings`` is the ``cv`` section it was made with; ``positions`` says where the tile positions came from;
    ``data_keys`` are the store keys of the tiles it was computed on.
    """

    k: int
    settings: dict[str, Any]
    positions: str
    names: tuple[str, ...]
    splits: tuple[str, ...]
    blocks: tuple[str, ...]
    folds: tuple[int, ...]
    labelled: tuple[int, ...]
    excluded: tuple[tuple[str, ...], ...]
    train_stats: tuple[dict[str, Any], ...]
    val_nonfinite: tuple[int, ...]
    data_keys: dict[str, str]

    def val_names(self, j: int) -> list[str]:
        """The tiles fold ``j`` validates on (its blocks' tiles)."""
        return [n for n, f in zip(self.names, self.folds, strict=True) if f == j]

    def train_names(self, j: int) -> list[str]:
        """The tiles fold ``j`` trains on: every other fold's, less the ones overlapping fold ``j``'s tiles."""
        out = set(self.excluded[j])
        return [n for n, f in zip(self.names, self.folds, strict=True) if f != j and n not in out]

    def train_norm(self, j: int, standardize_target: bool = True) -> NormStats:
        """The normalisation stats of fold ``j``'s training tiles."""
        return StatsAccumulator.from_dict(self.train_stats[j]).result(standardize_target, split=f"cv fold {j} train")

    def describe(self) -> list[str]:
        """One line per fold: blocks, tiles and labelled pixels it validates on, tiles it trains on."""
        lines = []
        for j in range(self.k):
            val = [i for i, f in enumerate(self.folds) if f == j]
            blocks = len({self.blocks[i] for i in val})
            lab = sum(self.labelled[i] for i in val)
            buffer = f", {len(self.excluded[j])} overlapping tiles left out" if self.excluded[j] else ""
            lines.append(
                f"fold {j}: validates on {blocks} blocks, {len(val)} tiles, {lab} labelled px; trains on "
                f"{len(self.train_names(j))} tiles{buffer}"
            )
        return lines

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``cv_folds.json``: one record per tile and one per fold."""
        tiles = [
            {"name": n, "split": s, "block": b, "fold": f, "labelled": lab}
            for n, s, b, f, lab in zip(self.names, self.splits, self.blocks, self.folds, self.labelled, strict=True)
        ]
        folds = []
        for j in range(self.k):
            val = self.val_names(j)
            folds.append(
                {
                    "fold": j,
                    "val_tiles": len(val),
                    "val_blocks": len({b for b, f in zip(self.blocks, self.folds, strict=True) if f == j}),
                    "val_labelled": sum(lab for lab, f in zip(self.labelled, self.folds, strict=True) if f == j),
                    "train_tiles": len(self.train_names(j)),
                    "excluded": list(self.excluded[j]),
                    "val_nonfinite": int(self.val_nonfinite[j]),
                    "train_stats": self.train_stats[j],
                }
            )
        return {
            "format": FOLDS_FORMAT,
            "k": self.k,
            "settings": dict(self.settings),
            "positions": self.positions,
            "data_keys": dict(self.data_keys),
            "folds": folds,
            "tiles": tiles,
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "cv_folds.json") -> FoldAssignment:
        """Read :meth:`to_dict`'s form back, checked (one error line naming ``source``)."""
        try:
            if not isinstance(d, dict) or d.get("format") != FOLDS_FORMAT:
                raise ValueError(f"expected format {FOLDS_FORMAT}")
            k, tiles, folds = int(d["k"]), d["tiles"], sorted(d["folds"], key=lambda f: int(f["fold"]))
            out = cls(
                k=k,
                settings=dict(d["settings"]),
                positions=str(d["positions"]),
                names=tuple(str(t["name"]) for t in tiles),
                splits=tuple(str(t["split"]) for t in tiles),
                blocks=tuple(str(t["block"]) for t in tiles),
                folds=tuple(int(t["fold"]) for t in tiles),
                labelled=tuple(int(t["labelled"]) for t in tiles),
                excluded=tuple(tuple(str(n) for n in f["excluded"]) for f in folds),
                train_stats=tuple(dict(f["train_stats"]) for f in folds),
                val_nonfinite=tuple(int(f["val_nonfinite"]) for f in folds),
                data_keys={str(a): str(b) for a, b in dict(d.get("data_keys") or {}).items()},
            )
            if len(folds) != k or set(out.folds) != set(range(k)):
                raise ValueError(f"{k} folds expected, tiles name folds {sorted(set(out.folds))}")
            return out
        except (KeyError, TypeError, ValueError) as exc:
            raise TuneAgbError(f"{source}: not a valid fold assignment ({exc})") from None

    def check_tiles(self, tiles: Mapping[str, TileSet], source: str = "cv_folds.json") -> None:
        """Fail when the train and val tiles are not the ones the assignment was made for."""
        names = tuple(n for s in CV_SPLITS for n in tiles[s].names)
        splits = tuple(s for s in CV_SPLITS for _ in tiles[s].names)
        if (names, splits) != (self.names, self.splits):
            gone = sorted(set(self.names) - set(names))
            new = sorted(set(names) - set(self.names))
            parts = [f"{len(gone)} gone, e.g. {gone[0]}"] if gone else []
            parts += [f"{len(new)} new, e.g. {new[0]}"] if new else []
            what = "; ".join(parts)
            raise TuneAgbError(
                f"{source}: the train and val tiles differ from those the folds were made for "
                f"({what or 'moved between splits'}); start a new search for the new tiles"
            )


def build_assignment(
    cv: Mapping[str, Any],
    tiles: Mapping[str, TileSet],
    input_dir: str,
    data_keys: Mapping[str, str] | None = None,
    source: str = "search space",
) -> FoldAssignment:
    """The folds of the ``cv`` settings (the space file's ``cv`` section, validated) over ``tiles['train']`` and
    ``tiles['val']``, with each fold's training normalisation (one pass over the tiles).

    Args:
        cv: ``k``, ``block_size``, ``block_m``, ``seed``, ``positions``, ``manifest``.
        tiles: the packed train and val splits.
        input_dir: the inputs folder (where prepare's manifest is looked for).
        data_keys: the stores' keys (recorded, so a resume can tell whether the tiles changed).
        source: the space file, for error messages.

    Raises:
        TuneAgbError: one line naming the ``cv`` field: more folds than blocks, a fold without labels, no manifest.
    """
    names = [n for s in CV_SPLITS for n in tiles[s].names]
    splits = [s for s in CV_SPLITS for _ in tiles[s].names]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise TuneAgbError(f"{input_dir}: tile {dup} is in both train and val; names must be unique across splits")
    hw = tuple(int(v) for v in tiles["train"].inputs.shape[-2:])
    try:
        positions = tile_positions(cv, names, (hw[0], hw[1]), input_dir)
        side = block_side(cv, positions)
    except TuneAgbError as exc:
        raise TuneAgbError(f"{source}: {exc}") from None
    labelled = np.concatenate([_labelled_per_tile(tiles[s]) for s in CV_SPLITS])
    blocks = [block_of(positions.places[n], side, positions.origin) for n in names]
    block_tiles: dict[str, int] = {}
    block_labels: dict[str, int] = {}
    for b, lab in zip(blocks, labelled, strict=True):
        block_tiles[b] = block_tiles.get(b, 0) + 1
        block_labels[b] = block_labels.get(b, 0) + int(lab)
    k = int(cv["k"])
    grid = "one block per tile" if positions.kind == "tiles" else _describe_block(cv, positions)
    if k > len(block_tiles):
        raise TuneAgbError(
            f"{source}: cv.k: {k} folds, but the {len(names)} train+val tiles lie in only {len(block_tiles)} blocks "
            f"({grid}, positions from {positions.source}); lower cv.k to at most {len(block_tiles)}"
            + ("" if positions.kind == "tiles" else " or lower cv.block_size")
        )
    fold_of_block = assign_folds(block_tiles, block_labels, k, int(cv.get("seed", 0)))
    folds = [fold_of_block[b] for b in blocks]
    excluded: list[set[str]] = [set() for _ in range(k)]
    fold_of = dict(zip(names, folds, strict=True))
    for a, b in overlapping_pairs(positions.places):
        if fold_of[a] != fold_of[b]:
            excluded[fold_of[b]].add(a)
            excluded[fold_of[a]].add(b)
    for j in range(k):
        val_lab = sum(int(lab) for lab, f in zip(labelled, folds, strict=True) if f == j)
        train_lab = sum(
            int(lab) for n, lab, f in zip(names, labelled, folds, strict=True) if f != j and n not in excluded[j]
        )
        if val_lab == 0 or train_lab == 0:
            where = "validation" if val_lab == 0 else "training"
            raise TuneAgbError(
                f"{source}: cv.k: fold {j} gets no labelled pixel for {where} ({len(block_tiles)} blocks, {grid}); "
                "lower cv.k or cv.block_size, or change cv.seed"
            )
    settings = {key: cv.get(key) for key in ("k", "block_size", "block_m", "seed", "positions", "manifest")}
    ordered_excluded = tuple(tuple(n for n in names if n in excluded[j]) for j in range(k))
    plan = FoldAssignment(k, settings, positions.source, tuple(names), tuple(splits), tuple(blocks), tuple(folds),
                          tuple(int(v) for v in labelled), ordered_excluded, (), (), dict(data_keys or {}))  # fmt: skip
    return with_stats(plan, tiles)


def _describe_block(cv: Mapping[str, Any], positions: Positions) -> str:
    if cv.get("block_m") is not None:
        return f"blocks of {cv['block_m']:g} x {cv['block_m']:g} {positions.unit}"
    size = cv.get("block_size", 2)
    return f"blocks of {size} x {size} tiles"


def _labelled_per_tile(tiles: TileSet, chunk: int = 64) -> np.ndarray:
    counts = [
        np.isfinite(np.asarray(tiles.labels[i : i + chunk])).sum(axis=(1, 2)) for i in range(0, len(tiles), chunk)
    ]
    return np.concatenate(counts).astype(np.int64) if counts else np.zeros(0, dtype=np.int64)


def with_stats(plan: FoldAssignment, tiles: Mapping[str, TileSet], chunk: int = 8) -> FoldAssignment:
    """``plan`` with each fold's training normalisation sums and its tiles' non-finite input count, from one pass
    over the train and val tiles (each tile's sums added to every fold it trains).

    The sums are those :class:`~tune_agb.engine.data.StatsAccumulator` makes (float64, non-finite inputs left out),
    so fold j's stats equal ``compute_norm_stats`` of its training tiles.
    """
    k = plan.k
    index = {n: i for i, n in enumerate(plan.names)}
    trains = np.zeros((len(plan.names), k), dtype=np.float64)  # tile i is in fold j's training
    for j in range(k):
        trains[[index[n] for n in plan.train_names(j)], j] = 1.0
    c = tiles["train"].inputs.shape[1]
    s, ss, cnt = np.zeros((k, c)), np.zeros((k, c)), np.zeros((k, c))
    t = np.zeros((k, 3))
    nonfinite_train = np.zeros(k, dtype=np.int64)
    val_nonfinite = np.zeros(k, dtype=np.int64)
    for split in CV_SPLITS:
        ts = tiles[split]
        for i in range(0, len(ts), chunk):
            rows = np.array([index[n] for n in ts.names[i : i + chunk]])
            block = np.asarray(ts.inputs[i : i + chunk], dtype=np.float64)
            fin = np.isfinite(block)
            block = np.where(fin, block, 0.0)
            tile_cnt = fin.sum(axis=(2, 3)).astype(np.float64)
            tile_nonfinite = (fin[0].size - tile_cnt.sum(axis=1)).astype(np.int64)
            lab = np.asarray(ts.labels[i : i + chunk], dtype=np.float64)
            lfin = np.isfinite(lab)
            lab = np.where(lfin, lab, 0.0)
            tile_t = np.stack([lfin.sum(axis=(1, 2)), lab.sum(axis=(1, 2)), (lab**2).sum(axis=(1, 2))], axis=1)
            m = trains[rows]  # (B, k)
            s += m.T @ block.sum(axis=(2, 3))
            ss += m.T @ (block**2).sum(axis=(2, 3))
            cnt += m.T @ tile_cnt
            t += m.T @ tile_t
            nonfinite_train += (m.T @ tile_nonfinite.astype(np.float64)).round().astype(np.int64)
            np.add.at(val_nonfinite, np.asarray([plan.folds[r] for r in rows]), tile_nonfinite)
    stats = []
    for j in range(k):
        acc = StatsAccumulator(c)
        acc.s, acc.ss, acc.cnt, acc.t, acc.nonfinite = s[j], ss[j], cnt[j], t[j], int(nonfinite_train[j])
        stats.append({**acc.to_dict(), "nonfinite": int(nonfinite_train[j])})
    return dataclasses.replace(plan, train_stats=tuple(stats), val_nonfinite=tuple(int(v) for v in val_nonfinite))


def fold_tiles(tiles: Mapping[str, TileSet], plan: FoldAssignment, j: int) -> dict[str, TileSet]:
    """Fold ``j``'s ``train`` and ``val`` TileSets, drawn from the train and val splits without copying them
    (:class:`~tune_agb.engine.data.StackedRows` over the stores' memory maps)."""
    plan.check_tiles(tiles)
    index = {n: (s, i) for s in CV_SPLITS for i, n in enumerate(tiles[s].names)}
    labelled = dict(zip(plan.names, plan.labelled, strict=True))

    def subset(names: list[str], label: str, nonfinite: int) -> TileSet:
        parts = [(s, [index[n][1] for n in names if index[n][0] == s]) for s in CV_SPLITS]
        parts = [(s, rows) for s, rows in parts if rows]
        inputs = StackedRows([(tiles[s].inputs, rows) for s, rows in parts])
        labels = StackedRows([(tiles[s].labels, rows) for s, rows in parts])
        ordered = [tiles[s].names[i] for s, rows in parts for i in rows]
        return TileSet(label, ordered, inputs, labels, sum(labelled[n] for n in ordered), nonfinite)

    train_nonfinite = int(plan.train_stats[j].get("nonfinite", 0)) if plan.train_stats else None
    val_nonfinite = int(plan.val_nonfinite[j]) if plan.val_nonfinite else None
    return {
        "train": subset(plan.train_names(j), f"fold{j}-train", train_nonfinite),
        "val": subset(plan.val_names(j), f"fold{j}-val", val_nonfinite),
    }


def stack_splits(tiles: Mapping[str, TileSet], splits: Sequence[str]) -> TileSet:
    """The tiles of ``splits``, in that order, as one TileSet named ``"a+b"`` (no copy: :class:`StackedRows` over the
    splits' arrays), with the splits' labelled pixels summed."""
    parts = [(s, np.arange(len(tiles[s]))) for s in splits]
    return TileSet(
        "+".join(splits),
        [n for s in splits for n in tiles[s].names],
        StackedRows([(tiles[s].inputs, rows) for s, rows in parts]),
        StackedRows([(tiles[s].labels, rows) for s, rows in parts]),
        sum(tiles[s].num_labelled for s in splits),
        None,
    )


def merge_train_val(tiles: Mapping[str, TileSet]) -> dict[str, TileSet]:
    """The tiles of a retrain on train + val: ``train`` is the train and val tiles together (no copy), ``val`` and
    ``test`` are passed on as they are (``val`` then lies inside the training data: its metrics are in-sample)."""
    return {"train": stack_splits(tiles, CV_SPLITS), **{s: v for s, v in tiles.items() if s != "train"}}


@dataclass
class OutOfFold:
    """Every labelled train/val pixel predicted by the fold model that validated on it (never trained on it), in
    target units: per pixel ``tile`` (name), ``flat`` (row * W + col), ``fold``, label ``y``, ``mean`` and ``var``
    (float64 host arrays, folds in order). The honest sample to fit a variance calibration on when no split is left
    out of the final training."""

    tile: np.ndarray
    flat: np.ndarray
    fold: np.ndarray
    y: np.ndarray
    mean: np.ndarray
    var: np.ndarray


def out_of_fold(
    states: list[dict[str, Any]],
    tiles: Mapping[str, TileSet],
    plan: FoldAssignment,
    device: str = "cpu",
    batch_size: int | None = None,
) -> OutOfFold:
    """Predict each fold's validation tiles with that fold's model.

    Args:
        states: the k fold checkpoints (e.g. :meth:`tune_agb.search.experiment.CVBest.fold_states`), in fold order;
            each is predicted with its own config and normalisation stats.
        tiles: the train and val splits (the store's, as the search saw them).
        plan: the fold assignment of the search.
        device: where to predict (``cpu``, ``cuda``, ``auto``).
        batch_size: tiles per batch (None: each model's training batch size).
    """
    import torch

    from tune_agb.engine.config import config_from_dict
    from tune_agb.engine.data import SplitFeed
    from tune_agb.engine.device import memory_format, resolve_amp, resolve_device
    from tune_agb.engine.model import UNet
    from tune_agb.engine.train import evaluate_split

    if len(states) != plan.k:
        raise TuneAgbError(f"out_of_fold: {len(states)} fold models for a {plan.k}-fold assignment")
    dev = resolve_device(device)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("tile", "flat", "fold", "y", "mean", "var")}
    for j, state in enumerate(states):
        cfg = config_from_dict(state["config"], source=f"fold {j} checkpoint config")
        norm = NormStats.from_dict(state["norm"])
        model = UNet.from_config(cfg)
        model.load_state_dict(state["model"])
        model.to(dev, memory_format=memory_format(cfg, dev)).eval()
        val = fold_tiles(tiles, plan, j)["val"]
        feed = SplitFeed(val, norm, dev, cfg.data_mode)
        ev = evaluate_split(model, feed, cfg, norm, batch_size or cfg.batch_size, resolve_amp(cfg, dev), keep=())
        parts["tile"].append(np.asarray(val.names)[ev.tile])
        parts["flat"].append(ev.flat)
        parts["fold"].append(np.full(ev.tile.size, j))
        for key, t in (("y", ev.y), ("mean", ev.mean), ("var", ev.var)):
            parts[key].append(t.to(torch.float64).cpu().numpy())
    return OutOfFold(**{k: np.concatenate(v) for k, v in parts.items()})
