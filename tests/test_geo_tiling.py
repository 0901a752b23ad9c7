"""tune_agb.geo.tiling: window starts, the block split, point labels per pixel; and the stack flags that prepare
and predict share."""

from __future__ import annotations

import numpy as np
import pytest

from tune_agb.bands import SPLITS
from tune_agb.demo_data import split_tiles
from tune_agb.geo.tiling import (
    assign_blocks,
    count_block_tiles,
    rasterize_points,
    tile_split,
    window_starts,
)


@pytest.mark.parametrize(
    ("size", "tile", "stride", "cover", "expect"),
    [
        (10, 4, 4, True, [0, 4, 6]),  # last window flush with the edge
        (10, 4, 4, False, [0, 4]),  # whole tiles only: 2 px left out
        (12, 4, 4, True, [0, 4, 8]),  # no remainder: nothing added
        (12, 4, 4, False, [0, 4, 8]),
        (10, 6, 3, True, [0, 3, 4]),
        (4, 4, 2, True, [0]),
        (4, 4, 2, False, [0]),
        (3, 4, 2, True, [0]),  # smaller than one window: one (clipped) window
        (3, 4, 2, False, []),  # ... but no whole tile
    ],
)
def test_window_starts(size, tile, stride, cover, expect):
    assert window_starts(size, tile, stride, cover_edge=cover) == expect


def test_window_starts_cover_every_pixel_and_stay_inside():
    for size in range(1, 60):
        for tile in range(1, 20):
            for stride in range(1, tile + 1):
                starts = window_starts(size, tile, stride)
                covered = np.zeros(size, bool)
                for s in starts:
                    assert s >= 0 and (s + tile <= size or size <= tile)
                    covered[s : s + tile] = True
                assert covered.all()
                assert starts == sorted(set(starts))


def test_assign_blocks_hands_out_exact_counts_with_unit_weights():
    """The property the demo relies on: unit weights and fractions k / n give exactly k blocks (k >= 1)."""
    for n in range(1, 40):
        blocks = {(i, 0): 1 for i in range(n)}
        for n_val in range(1, n + 1):
            for n_test in range(1, n + 2 - n_val):
                split = assign_blocks(blocks, (1 - (n_val + n_test) / n, n_val / n, n_test / n), seed=n)
                counts = {s: list(split.values()).count(s) for s in SPLITS}
                assert counts["val"] == n_val
                assert counts["test"] == min(n_test, n - n_val)
                assert counts["train"] == max(0, n - n_val - n_test)


def test_assign_blocks_by_tile_share_and_seed():
    blocks = {(r, c): 4 for r in range(4) for c in range(5)}  # 20 blocks, 80 tiles
    a = assign_blocks(blocks, (0.7, 0.15, 0.15), seed=1)
    assert a == assign_blocks(dict(reversed(blocks.items())), (0.7, 0.15, 0.15), seed=1)  # order of the dict: none
    assert a != assign_blocks(blocks, (0.7, 0.15, 0.15), seed=2)
    tiles = {s: 4 * list(a.values()).count(s) for s in SPLITS}
    assert tiles == {"train": 56, "val": 12, "test": 12}
    assert set(assign_blocks(blocks, (0.0, 0.5, 0.5), seed=0).values()) == {"val", "test"}
    assert set(assign_blocks({**blocks, (9, 9): 0}, (1.0, 0.0, 0.0), seed=0).values()) == {"train"}
    assert (9, 9) not in assign_blocks({**blocks, (9, 9): 0}, (0.7, 0.15, 0.15), seed=0)


def test_tile_split_drops_tiles_across_split_borders():
    block_split = {(0, 0): "val", (0, 1): "train", (1, 0): "test"}
    assert tile_split(0, 0, 10, 10, block_split) == "val"
    assert tile_split(0, 5, 10, 10, block_split) is None  # reaches from val into train
    assert tile_split(10, 10, 10, 10, block_split) == "train"  # block (1, 1) absent: train
    assert tile_split(0, 10, 10, 10, block_split) == "train"
    assert count_block_tiles([(0, 0), (0, 5), (10, 0), (19, 19)], 10) == {(0, 0): 2, (1, 0): 1, (1, 1): 1}


def old_demo_split(rows: int, cols: int, seed: int, split: tuple[float, float, float]) -> dict:
    """The demo's split rule as it was written before it used assign_blocks (kept here to pin it)."""
    rng = np.random.default_rng(seed)
    blocks = [(br, bc) for br in range(0, rows, 2) for bc in range(0, cols, 2)]
    order = rng.permutation(len(blocks))
    n_val = max(1, round(split[1] * len(blocks)))
    n_test = max(1, round(split[2] * len(blocks)))
    by_block = {}
    for k, i in enumerate(order):
        by_block[blocks[i]] = "val" if k < n_val else "test" if k < n_val + n_test else "train"
    return {(r, c): by_block[(r // 2 * 2, c // 2 * 2)] for r in range(rows) for c in range(cols)}


@pytest.mark.parametrize("split", [(0.7, 0.15, 0.15), (1.0, 0.0, 0.0), (0.5, 0.25, 0.25), (0.0, 0.5, 0.5)])
def test_demo_split_is_the_old_demo_rule(split):
    tile = 8
    for rows in range(1, 15):
        for cols in range(1, 15):
            offsets = [(r * tile, c * tile) for r in range(rows) for c in range(cols)]
            for seed in (0, 8):
                got = {(r // tile, c // tile): s for (r, c), s in split_tiles(offsets, tile, split, seed).items()}
                assert got == old_demo_split(rows, cols, seed, split), (rows, cols, seed)


def test_rasterize_points_averages_per_pixel_and_counts_the_rest():
    row = np.array([0.2, 0.9, 2.5, 2.99, -0.5, 1.0, np.nan, 3.0, 1.5])
    col = np.array([1.1, 1.8, 0.0, 0.5, 1.0, 4.0, 1.0, 0.0, 3.999])
    val = np.array([10.0, 20.0, 5.0, 7.0, 99.0, 99.0, 99.0, 99.0, 3.0])
    labels = rasterize_points(row, col, val, 3, 4)  # 3 rows x 4 cols
    expect = np.full((3, 4), np.nan, np.float32)
    expect[0, 1] = 15.0  # two points in one pixel: their mean
    expect[2, 0] = 6.0
    expect[1, 3] = 3.0
    np.testing.assert_array_equal(labels.dense(), expect)
    assert labels.shots_read == 9 and labels.shots_outside == 4  # row -0.5, col 4, NaN row, row 3
    assert labels.pixel.tolist() == [1, 7, 8] and labels.value.dtype == np.float32
    # Windows, also ones reaching past the grid's right edge, read the same labels.
    np.testing.assert_array_equal(labels.window(1, 2, 2, 2), expect[1:3, 2:4])
    np.testing.assert_array_equal(labels.window(0, 0, 3, 4), expect)
    win = labels.window(0, 3, 2, 3)
    assert win.shape == (2, 3) and win[1, 0] == 3.0 and np.isnan(win).sum() == 5


def test_prepare_and_predict_share_the_stack_flags():
    from tune_agb.predict import build_parser as predict_parser
    from tune_agb.prepare import build_parser as prepare_parser

    def flags(parser):
        return {
            a.dest: (a.option_strings, a.default, a.choices, a.help, a.nargs, a.type)
            for a in parser._actions
            if a.dest in ("image", "bands", "resampling", "s2_dn", "s2_offset")
        }

    assert flags(prepare_parser()) == flags(predict_parser())
    assert len(flags(prepare_parser())) == 5
