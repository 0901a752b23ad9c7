"""Tiling on a pixel grid: where windows start, which split a tile goes to, and point labels averaged per pixel.

``prepare`` (GeoTIFF -> training tiles), ``predict`` (windows over a GeoTIFF) and the synthetic demo dataset
share these helpers. The module needs numpy only (no rasterio), so the numpy-only demo can use it; everything
here works in pixel coordinates (row, col), with row 0 at the top.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np


def window_starts(size: int, tile: int, stride: int, cover_edge: bool = True) -> list[int]:
    """Start offsets of windows of ``tile`` px every ``stride`` px along an axis of ``size`` px.

    With ``cover_edge`` (prediction: every pixel is covered), one more window sits flush with the far edge when the
    regular steps leave a remainder, and a ``size <= tile`` axis is one window at 0 (the caller clips it to
    ``size``). Without it (training tiles: all of one shape), only whole windows inside the axis are returned and
    the remainder at the far edge is left out (none when ``size < tile``).
    """
    starts = list(range(0, size - tile + 1, stride))
    if cover_edge:
        if not starts:
            return [0]
        if starts[-1] + tile < size:
            starts.append(size - tile)
    return starts


def block_of(row: float, col: float, block_px: int) -> tuple[int, int]:
    """The (block row, block col) of a tile starting at pixel (``row``, ``col``); blocks are ``block_px`` px square."""
    return math.floor(row / block_px), math.floor(col / block_px)


def count_block_tiles(offsets: Iterable[tuple[float, float]], block_px: int) -> dict[tuple[int, int], int]:
    """Tiles per block, each tile counted in the block of its first pixel (``offsets`` are (row, col) starts)."""
    counts: dict[tuple[int, int], int] = {}
    for r, c in offsets:
        key = block_of(r, c, block_px)
        counts[key] = counts.get(key, 0) + 1
    return counts


def assign_blocks(
    block_tiles: Mapping[tuple[int, int], int], fractions: tuple[float, float, float], seed: int
) -> dict[tuple[int, int], str]:
    """Shuffle the blocks and hand them out until val and test hold their share of the tiles; the rest is train.

    ``block_tiles`` maps a block to its tile count (blocks without tiles are left out). The blocks are sorted,
    shuffled with ``seed``, and each in turn goes to val, else test, while that split is empty or, with the block,
    holds at most half a block more than its share (``fraction * total tiles``). When every block counts 1 and the
    fractions are ``k / n_blocks``, exactly ``k`` blocks go to val (test) for ``k >= 1``. With a train fraction of
    0, leftover blocks go to the last split asked for.
    """
    keys = sorted(k for k, n in block_tiles.items() if n > 0)
    rng = np.random.default_rng(seed)
    order = [keys[i] for i in rng.permutation(len(keys))]
    total = sum(block_tiles[k] for k in keys)
    out: dict[tuple[int, int], str] = {}
    want = {"val": fractions[1] * total, "test": fractions[2] * total}
    got = {"val": 0, "test": 0}
    for k in order:
        for s in ("val", "test"):
            if want[s] > 0 and (got[s] == 0 or got[s] + block_tiles[k] / 2 <= want[s]):
                out[k] = s
                got[s] += block_tiles[k]
                break
        else:
            out[k] = "train"
    if fractions[0] == 0:  # nothing asked for train: leftovers go to the last split asked for
        last = "test" if fractions[2] > 0 else "val"
        out = {k: (last if s == "train" else s) for k, s in out.items()}
    return out


def tile_split(row: int, col: int, tile: int, block_px: int, block_split: Mapping[tuple[int, int], str]) -> str | None:
    """The split of the ``tile`` px tile at (``row``, ``col``) (see :func:`span_split`)."""
    return span_split(row, col, row + tile, col + tile, block_px, block_split)


def anchor_block(row0: float, col0: float, block_px: int) -> tuple[int, int]:
    """The block of a tile whose first pixel starts at (``row0``, ``col0``): the block holding that pixel's centre
    (for whole-pixel positions, the block of :func:`block_of`)."""
    return block_of(row0 + 0.5, col0 + 0.5, block_px)


def blocks_spanned(row0: float, col0: float, row1: float, col1: float, block_px: int) -> Iterator[tuple[int, int]]:
    """The blocks that the pixel rectangle [``row0``, ``row1``) x [``col0``, ``col1``) overlaps by half a pixel or
    more (at least one pixel wide).

    Coordinates may be fractional (a tile of a raster whose pixels do not line up with the block grid's) and
    negative (left of or above the grid's origin). A sliver of less than half a pixel does not count: there, two
    rasters' pixels overlap only in part whatever the split. For whole-pixel rectangles this is plain overlap.
    """
    for br in range(math.floor((row0 + 0.5) / block_px), math.ceil((row1 - 0.5) / block_px)):
        for bc in range(math.floor((col0 + 0.5) / block_px), math.ceil((col1 - 0.5) / block_px)):
            yield br, bc


def span_split(
    row0: float, col0: float, row1: float, col1: float, block_px: int, block_split: Mapping[tuple[int, int], str]
) -> str | None:
    """The split of the tile over [``row0``, ``row1``) x [``col0``, ``col1``) (pixels of the block grid): that of
    its :func:`anchor_block` (train if absent), or None when it reaches into a block of another split.

    Other blocks absent from ``block_split`` (no tile starts in them) are free; a tile that is kept claims them
    with :func:`claim_blocks`, so that no tile of another split reaches into them later.
    """
    split = block_split.get(anchor_block(row0, col0, block_px), "train")
    for b in blocks_spanned(row0, col0, row1, col1, block_px):
        if block_split.get(b, split) != split:
            return None
    return split


def claim_blocks(
    row0: float,
    col0: float,
    row1: float,
    col1: float,
    block_px: int,
    split: str,
    block_split: dict[tuple[int, int], str],
) -> None:
    """Give the free blocks (absent from ``block_split``) that a kept tile of ``split`` overlaps to that split."""
    for b in blocks_spanned(row0, col0, row1, col1, block_px):
        block_split.setdefault(b, split)


@dataclass
class PointLabels:
    """Point labels (e.g. GEDI shots) on a grid, stored sparsely: sorted linear pixel index (row * width + col) and
    the mean value of the points in that pixel. ``shots_*`` count the points given, outside the grid (or without a
    finite position) and, when the caller filtered them, without a value."""

    pixel: np.ndarray  # (P,) int64, sorted, unique
    value: np.ndarray  # (P,) float32, mean of the points in that pixel
    height: int
    width: int
    shots_read: int = 0
    shots_outside: int = 0
    shots_no_value: int = 0

    def window(self, row: int, col: int, height: int, width: int) -> np.ndarray:
        """(height, width) float32 labels of the window at (``row``, ``col``), NaN where no point fell."""
        out = np.full((height, width), np.nan, dtype=np.float32)
        lo, hi = np.searchsorted(self.pixel, [row * self.width, (row + height) * self.width])
        pix = self.pixel[lo:hi]
        rows, cols = pix // self.width - row, pix % self.width - col
        keep = (cols >= 0) & (cols < width)
        out[rows[keep], cols[keep]] = self.value[lo:hi][keep]
        return out

    def dense(self) -> np.ndarray:
        """(height, width) float32 labels of the whole grid, NaN where no point fell."""
        out = np.full(self.height * self.width, np.nan, dtype=np.float32)
        out[self.pixel] = self.value
        return out.reshape(self.height, self.width)


def pixels_inside(row: np.ndarray, col: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N,) bool: which fractional pixel positions fall in a pixel of a ``height`` x ``width`` grid (NaN: none)."""
    row, col = np.asarray(row, dtype=np.float64), np.asarray(col, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return (row >= 0) & (row < height) & (col >= 0) & (col < width)


def rasterize_points(row: np.ndarray, col: np.ndarray, value: np.ndarray, height: int, width: int) -> PointLabels:
    """Average point values per pixel of a ``height`` x ``width`` grid.

    ``row``/``col`` are fractional pixel positions (a point at 3.7 lies in pixel 3); points outside the grid or at a
    non-finite position are left out and counted in ``shots_outside``. Values are summed in float64 in the order
    given.
    """
    row_i, col_i = np.floor(np.asarray(row, dtype=np.float64)), np.floor(np.asarray(col, dtype=np.float64))
    value = np.asarray(value)
    inside = pixels_inside(row_i, col_i, height, width)
    lin = row_i[inside].astype(np.int64) * width + col_i[inside].astype(np.int64)
    pixel, inverse = np.unique(lin, return_inverse=True)
    sums = np.bincount(inverse, weights=value[inside], minlength=pixel.size)
    counts = np.bincount(inverse, minlength=pixel.size)
    return PointLabels(
        pixel=pixel,
        value=(sums / np.maximum(counts, 1)).astype(np.float32),
        height=height,
        width=width,
        shots_read=int(value.size),
        shots_outside=int((~inside).sum()),
    )
