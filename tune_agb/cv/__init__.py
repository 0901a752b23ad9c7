"""Spatial k-fold cross-validation: where the tiles are, blocks of nearby tiles, the blocks' folds, the folds' tiles.

With ~100 validation labels in a few tiles, picking the best of dozens of trials on one validation split mostly picks
noise. Spatial cross-validation (Roberts et al. 2017; Ploton et al. 2020) validates every configuration on all the
labelled tiles instead, fold by fold, with whole blocks of neighbouring tiles held out together so that a model is
never validated next to a tile it trained on.

The steps (:func:`build_assignment` runs them on the train and val tiles of a dataset, in the search's driver):

1. **Positions** (:mod:`tune_agb.cv.positions`, :func:`tile_positions`): each tile's extent, from prepare's
   ``manifest.parquet`` (map coordinates; next to the inputs folder, or the one the ``cv`` section names), else from
   the tile names (``tile_ROW_COL``: tile indices, as the demo data and the real tiles are named; ``rROW_cCOL`` or
   ``RASTER_rROW_cCOL``: pixel offsets, as prepare names them), else one block per tile (a fallback that still never
   splits a tile, but neighbouring tiles may land in different folds). Names are parsed only without a manifest.
2. **Blocks** (:mod:`tune_agb.cv.assignment`, like the steps after it): squares of ``block_size`` x ``block_size``
   tile steps (or ``block_m`` map units), on a grid starting at the origin of the names' grid (tile or pixel 0) or at
   the tiles' top-left corner (manifest). A tile belongs to the block holding its first pixel. Tiles of different
   rasters named ``RASTER_r..._c...`` without a manifest are placed apart (their blocks never mix; the manifest puts
   them on one grid).
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
the k fold models' predictions of the tiles they did not train on (:mod:`tune_agb.cv.oof`, each fold model loaded
by :func:`tune_agb.engine.inference.model_from_state`). The package imports no Ray (pyarrow only to read a
manifest).
"""

from tune_agb.cv.assignment import (
    CV_SPLITS,
    FOLD_DRAWS,
    FOLDS_FORMAT,
    FoldAssignment,
    assign_folds,
    block_of,
    block_side,
    build_assignment,
    fold_tiles,
    merge_train_val,
    overlapping_pairs,
    stack_splits,
    with_stats,
)
from tune_agb.cv.oof import (
    OutOfFold,
    out_of_fold,
)
from tune_agb.cv.positions import (
    MANIFEST_COLUMNS,
    MANIFEST_FILE,
    POSITION_SOURCES,
    PREPARE_FILE,
    Positions,
    TilePlace,
    manifest_location,
    positions_from_manifest,
    positions_from_names,
    positions_per_tile,
    tile_positions,
)

__all__ = [
    "CV_SPLITS",
    "FOLDS_FORMAT",
    "FOLD_DRAWS",
    "MANIFEST_COLUMNS",
    "MANIFEST_FILE",
    "POSITION_SOURCES",
    "PREPARE_FILE",
    "FoldAssignment",
    "OutOfFold",
    "Positions",
    "TilePlace",
    "assign_folds",
    "block_of",
    "block_side",
    "build_assignment",
    "fold_tiles",
    "manifest_location",
    "merge_train_val",
    "out_of_fold",
    "overlapping_pairs",
    "positions_from_manifest",
    "positions_from_names",
    "positions_per_tile",
    "stack_splits",
    "tile_positions",
    "with_stats",
]
