"""Fold assignment: blocks of nearby tiles, each block's fold, the overlap buffer, each fold's normalisation, and
the folds' tiles (views over the stores, no copies). :class:`FoldAssignment` is the ``cv_folds.json`` record.
See :mod:`tune_agb.cv` for the steps. No Ray.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tune_agb.cv.positions import MANIFEST_FILE, Positions, TilePlace, tile_positions
from tune_agb.engine.data import NormStats, StackedRows, StatsAccumulator, TileSet
from tune_agb.errors import TuneAgbError

FOLDS_FORMAT = "tune_agb.cv_folds/1"
CV_SPLITS = ("train", "val")  # the splits whose tiles the folds share; test stays out


def block_side(cv: Mapping[str, Any], positions: Positions) -> tuple[float, float]:
    """A block's side (y, x) in the positions' units: ``block_m`` map units, else ``block_size`` tile steps.

    Args:
        cv: the ``cv`` section (``block_m``, ``block_size``).
        positions: the tiles' positions (their unit and tile step).

    Returns:
        The side (y, x) in the positions' unit.

    Raises:
        TuneAgbError: ``cv.block_m`` without a manifest's map coordinates.
    """
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
    """The id of the block holding the tile's first pixel: ``AREA/ROW/COL`` (``ROW/COL`` for the unnamed area).

    Args:
        place: the tile's place.
        side: a block's side (y, x) in the place's units.
        origin: where the block grid starts (y, x).
    """
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

    Args:
        block_tiles: tiles per block id.
        block_labelled: labelled pixels per block id (a missing block counts 0).
        k: the number of folds.
        seed: the draws' seed.

    Returns:
        The fold (0 .. k-1) of every block id.
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
    cells as large as the largest tile (an overlapping tile starts in the same or a neighbouring cell).

    Args:
        places: each tile's place.

    Returns:
        The pairs ``(a, b)`` with ``a < b``, sorted; tiles of different areas never pair.
    """
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

    Returns:
        The assignment, with each fold's training normalisation sums.

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

    Args:
        plan: an assignment (its stats may be empty).
        tiles: the train and val splits it was made for.
        chunk: tiles read at a time.

    Returns:
        A copy of ``plan`` with ``train_stats`` and ``val_nonfinite`` filled in.
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
    (:class:`~tune_agb.engine.data.StackedRows` over the stores' memory maps).

    Args:
        tiles: the train and val splits.
        plan: their fold assignment.
        j: the fold (0 .. k-1).

    Returns:
        ``{"train": ..., "val": ...}``: the tiles fold ``j`` trains on and validates on.

    Raises:
        TuneAgbError: when the tiles are not those ``plan`` was made for.
    """
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
    splits' arrays), with the splits' labelled pixels summed.

    Args:
        tiles: the splits by name.
        splits: the splits to stack, in order.
    """
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
    ``test`` are passed on as they are (``val`` then lies inside the training data: its metrics are in-sample).

    Args:
        tiles: the splits by name (``train`` and ``val`` at least).

    Returns:
        The splits with ``train`` replaced by train + val.
    """
    return {"train": stack_splits(tiles, CV_SPLITS), **{s: v for s, v in tiles.items() if s != "train"}}
