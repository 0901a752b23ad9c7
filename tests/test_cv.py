"""Spatial k-fold cross-validation without Ray: tile positions (manifest, names, fallback), blocks and folds, the cv
section's errors, the folds' tiles over the store without copies, and the k fold models trained in step exactly as
each would train alone (resumable)."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.search_helpers import tiny_space
from tune_agb.cv import (
    FoldAssignment,
    assign_folds,
    build_assignment,
    fold_tiles,
    merge_train_val,
    overlapping_pairs,
    positions_from_names,
)
from tune_agb.engine.config import TrainConfig
from tune_agb.engine.data import SplitFeed, StackedRows, TileSet, compute_norm_stats
from tune_agb.engine.folds_loop import fold_summary, train_folds
from tune_agb.engine.metric_names import fold_metric_names
from tune_agb.engine.train import train
from tune_agb.errors import TuneAgbError
from tune_agb.search.space import parse_search_space
from tune_agb.store import DataSource

CV = {"k": 3, "block_size": 2, "block_m": None, "seed": 0, "positions": "auto", "manifest": None}


def make_tiles(names: dict[str, list[str]], hw: int = 8, channels: int = 3, seed: int = 0) -> dict[str, TileSet]:
    """Random tiles with a few labelled pixels each (more in some), in memory."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, ns in names.items():
        x = rng.normal(size=(len(ns), channels, hw, hw)).astype(np.float32)
        y = np.full((len(ns), hw, hw), np.nan, np.float32)
        for i in range(len(ns)):
            n = int(rng.integers(1, 12))
            y[i].flat[rng.choice(hw * hw, n, replace=False)] = rng.uniform(0, 300, n)
        out[split] = TileSet(split, list(ns), x, y)
    return out


def grid_names(rows: int, cols: int, fmt: str = "tile_{r:02d}_{c:02d}") -> list[str]:
    return [fmt.format(r=r, c=c) for r in range(rows) for c in range(cols)]


def split_names(names: list[str], every: int = 4) -> dict[str, list[str]]:
    return {
        "train": [n for i, n in enumerate(names) if i % every],
        "val": [n for i, n in enumerate(names) if not i % every],
    }


def check_folds(plan: FoldAssignment, tiles: dict[str, TileSet]) -> None:
    """Every tile in exactly one fold; a block in one fold only; a fold never trains on a tile it validates."""
    all_names = [n for s in ("train", "val") for n in tiles[s].names]
    assert sorted(plan.names) == sorted(all_names)
    val_sets = [set(plan.val_names(j)) for j in range(plan.k)]
    assert sorted(n for v in val_sets for n in v) == sorted(all_names)  # each tile validated exactly once
    fold_of_block: dict[str, set[int]] = {}
    for b, f in zip(plan.blocks, plan.folds, strict=True):
        fold_of_block.setdefault(b, set()).add(f)
    assert all(len(f) == 1 for f in fold_of_block.values())  # blocks are never split
    for j in range(plan.k):
        assert val_sets[j] and not set(plan.train_names(j)) & val_sets[j]


def test_names_give_positions_and_unknown_names_fall_back() -> None:
    pos = positions_from_names(["tile_115_5", "tile_116_10"], (128, 128))
    assert pos is not None and pos.unit == "tiles"
    assert (pos.places["tile_116_10"].y0, pos.places["tile_116_10"].x0) == (116, 10)
    pos = positions_from_names(["r000064_c000128", "r000000_c000000"], (64, 32))
    assert pos is not None and pos.unit == "px" and pos.step == (64.0, 32.0)
    assert (pos.places["r000064_c000128"].y1, pos.places["r000064_c000128"].x1) == (128, 160)
    pos = positions_from_names(["T47_2022_r000000_c000064", "T48_r000064_c000000"], (64, 64))
    assert pos is not None and {p.area for p in pos.places.values()} == {"T47_2022", "T48"}
    assert positions_from_names(["tile_1_2", "r000000_c000000"], (8, 8)) is None  # mixed patterns
    assert positions_from_names(["forest", "plot7"], (8, 8)) is None


def test_fold_assignment_is_reproducible_balanced_and_keeps_blocks_whole(tmp_path: Path) -> None:
    names = grid_names(8, 8)
    tiles = make_tiles(split_names(names))
    plan = build_assignment(CV, tiles, str(tmp_path / "inputs"))
    assert plan.positions == "tile names (tile_ROW_COL)"
    check_folds(plan, tiles)
    assert len(set(plan.blocks)) == 16  # 2 x 2 tiles per block
    for name, block in zip(plan.names, plan.blocks, strict=True):
        r, c = (int(v) for v in name.split("_")[1:])
        assert block == f"{r // 2}/{c // 2}"
    assert plan == build_assignment(CV, tiles, str(tmp_path / "inputs"))  # same tiles and seed: same folds
    other = build_assignment({**CV, "seed": 1}, tiles, str(tmp_path / "inputs"))
    assert other.folds != plan.folds and other.blocks == plan.blocks
    check_folds(other, tiles)
    # balanced by labelled pixels: the folds differ by less than the largest block
    per_block: dict[str, int] = {}
    for b, lab in zip(plan.blocks, plan.labelled, strict=True):
        per_block[b] = per_block.get(b, 0) + lab
    per_fold = [sum(lab for lab, f in zip(plan.labelled, plan.folds, strict=True) if f == j) for j in range(3)]
    assert max(per_fold) - min(per_fold) <= max(per_block.values())
    # the saved form reads back equal
    assert FoldAssignment.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_assign_folds_opens_every_fold_and_balances_labels() -> None:
    blocks = {f"b{i}": 1 for i in range(10)}
    labels = {f"b{i}": (i + 1) * 10 for i in range(10)}
    got = assign_folds(blocks, labels, 4, seed=5)
    assert set(got.values()) == {0, 1, 2, 3} and got == assign_folds(blocks, labels, 4, seed=5)
    loads = [sum(labels[b] for b, f in got.items() if f == j) for j in range(4)]
    assert max(loads) - min(loads) <= max(labels.values())


def test_fallback_is_one_block_per_tile_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tiles = make_tiles({"train": ["a", "b", "c", "d"], "val": ["e", "f"]})
    with caplog.at_level(logging.WARNING):
        plan = build_assignment({**CV, "k": 2}, tiles, str(tmp_path / "inputs"))
    assert "every tile is its own block" in caplog.text
    assert plan.positions.startswith("one block per tile") and len(set(plan.blocks)) == 6
    check_folds(plan, tiles)
    with pytest.raises(TuneAgbError, match=r"space.yaml: cv\.k: 7 folds, but the 6 train\+val tiles lie in only 6 "):
        build_assignment({**CV, "k": 7}, tiles, str(tmp_path / "inputs"), source="space.yaml")
    with pytest.raises(TuneAgbError, match=r"cv\.positions: names asked for, but tile 'a' is not named"):
        build_assignment({**CV, "positions": "names"}, tiles, str(tmp_path / "inputs"))
    with pytest.raises(TuneAgbError, match=r"cv\.positions: manifest asked for, but there is no manifest\.parquet"):
        build_assignment({**CV, "positions": "manifest"}, tiles, str(tmp_path / "inputs"))
    with pytest.raises(TuneAgbError, match=r"cv\.block_m: a block size in map units needs prepare's manifest"):
        build_assignment({**CV, "block_size": None, "block_m": 500.0}, tiles, str(tmp_path / "inputs"))


def test_names_that_give_positions_in_part_keep_their_blocks_and_the_rest_are_one_block_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # two datasets pooled: one named on its tile grid, the other by ids (as ../shared's regions A and B)
    grid = grid_names(4, 4)
    ids = [f"tile_b{i}" for i in range(5)]
    tiles = make_tiles(split_names(grid + ids))
    with caplog.at_level(logging.WARNING):
        plan = build_assignment(CV, tiles, str(tmp_path / "inputs"))
    assert "16 of 21 tile names give positions" in caplog.text and "the other 5 (tile_b" in caplog.text
    assert plan.positions == "tile names (tile_ROW_COL), 5 tiles one block each"
    check_folds(plan, tiles)
    block = dict(zip(plan.names, plan.blocks, strict=True))
    for name in grid:  # neighbours on the grid share a block of 2 x 2 tiles, as without the other dataset
        r, c = (int(v) for v in name.split("_")[1:])
        assert block[name] == f"{r // 2}/{c // 2}"
    assert len({block[n] for n in ids}) == 5 and not {block[n] for n in ids} & {block[n] for n in grid}
    assert len(set(plan.blocks)) == 4 + 5
    with pytest.raises(TuneAgbError, match=r"cv\.positions: names asked for, but tile 'tile_b"):
        build_assignment({**CV, "positions": "names"}, tiles, str(tmp_path / "inputs"))  # asked for: still refused


def test_more_folds_than_blocks_and_a_fold_without_labels_fail_naming_the_field(tmp_path: Path) -> None:
    tiles = make_tiles(split_names(grid_names(4, 4)))  # 4 blocks of 2 x 2 tiles
    with pytest.raises(TuneAgbError, match=r"cv\.k: 5 folds, .* only 4 blocks .*lower cv\.k to at most 4"):
        build_assignment({**CV, "k": 5}, tiles, str(tmp_path / "inputs"))
    for t in tiles.values():
        t.labels[:] = np.nan
    tiles["train"].labels[0, 0, 0] = 1.0
    with pytest.raises(TuneAgbError, match=r"cv\.k: fold \d gets no labelled pixel"):
        build_assignment({**CV, "k": 2}, tiles, str(tmp_path / "inputs"))


def _write_manifest(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _manifest_row(name: str, raster: str, row: int, col: int, tile: int, res: float = 10.0) -> dict:
    left, top = 500_000.0 + col * res, 2_000_000.0 - row * res
    return {"name": name, "raster": raster, "split": "train", "row_off": row, "col_off": col, "height": tile,
            "width": tile, "left": left, "bottom": top - tile * res, "right": left + tile * res, "top": top,
            "crs": "EPSG:32647", "n_labelled": 1}  # fmt: skip


def test_manifest_places_the_rasters_of_one_area_on_one_grid(tmp_path: Path) -> None:
    """Two dates of one area (same ground, rasters named apart): the manifest puts each pair of tiles in one block,
    so no fold validates on ground another date of it trained on; the names alone would place them apart."""
    rows, names = [], []
    for date in ("T47_2022", "T47_2023"):
        for r in range(4):
            for c in range(4):
                name = f"{date}_r{r * 16:06d}_c{c * 16:06d}"
                rows.append(_manifest_row(name, date, r * 16, c * 16, 16))
                names.append(name)
    data = tmp_path / "ds"
    _write_manifest(data / "manifest.parquet", rows)
    tiles = make_tiles(split_names(names, every=3), hw=16)
    plan = build_assignment({**CV, "k": 2}, tiles, str(data / "inputs"))
    assert plan.positions == f"manifest {data / 'manifest.parquet'}"
    check_folds(plan, tiles)
    fold = dict(zip(plan.names, plan.folds, strict=True))
    for n in names[:16]:
        twin = n.replace("2022", "2023")
        assert fold[n] == fold[twin]  # same ground, same fold
    assert len(set(plan.blocks)) == 4
    # positions: names ignores the manifest and keeps the rasters apart (blocks per raster)
    by_names = build_assignment({**CV, "k": 2, "positions": "names"}, tiles, str(data / "inputs"))
    assert len(set(by_names.blocks)) == 8
    # block_m in map units: 160 m blocks = 1 tile
    plan_m = build_assignment({**CV, "k": 2, "block_size": None, "block_m": 160.0}, tiles, str(data / "inputs"))
    assert len(set(plan_m.blocks)) == 16
    # a manifest that does not know a tile is an error, not a silent fallback
    _write_manifest(data / "manifest.parquet", rows[1:])
    with pytest.raises(TuneAgbError, match=r"manifest\.parquet: no row for tile T47_2022_r000000_c000000"):
        build_assignment({**CV, "k": 2}, tiles, str(data / "inputs"))


def test_prepare_manifest_with_overlapping_tiles_never_trains_a_fold_on_its_ground(tmp_path: Path) -> None:
    """prepare with a stride of half a tile: tiles overlap. Whatever the positions (its manifest, or its tile names
    once the manifest is gone), no fold trains on a pixel of a tile it validates on."""
    from tests.raster_helpers import pixel_lonlat, write_shots, write_tif
    from tune_agb.errors import run_cli
    from tune_agb.prepare import main as prepare_main

    h, w, t = 96, 128, 16
    rng = np.random.default_rng(2)
    image = write_tif(tmp_path / "stack.tif", rng.normal(size=(3, h, w)).astype(np.float32))
    flat = rng.choice(h * w, size=400, replace=False)
    lon, lat = pixel_lonlat(flat // w + 0.5, flat % w + 0.5)
    shots = write_shots(tmp_path / "shots.parquet", {"lon_lowestmode": lon, "lat_lowestmode": lat,
                                                      "agbd": rng.uniform(5, 300, 400)})  # fmt: skip
    out = tmp_path / "ds"
    argv = ["--image", str(image), "--gedi", str(shots), "--out", str(out), "--tile-size", str(t), "--stride",
            str(t // 2), "--block-size", "4", "--no-pack", "--no-progress"]  # fmt: skip
    assert run_cli(prepare_main, argv) == 0
    manifest = {r["name"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    data = DataSource(str(out / "inputs"), str(out / "labels"), splits=("train", "val")).open()
    for how in ("manifest", "names"):
        if how == "names":
            (out / "manifest.parquet").rename(out / "elsewhere.parquet")
        plan = build_assignment({**CV, "k": 3, "positions": "auto"}, data.tiles, str(out / "inputs"))
        assert plan.positions.startswith("manifest" if how == "manifest" else "tile names (rROW_cCOL)")
        check_folds(plan, data.tiles)
        assert any(plan.excluded)  # overlapping tiles of other folds are left out of training
        for j in range(3):
            ground = np.zeros((h, w), bool)
            for n in plan.val_names(j):
                r, c = manifest[n]["row_off"], manifest[n]["col_off"]
                ground[r : r + t, c : c + t] = True
            for n in plan.train_names(j):
                r, c = manifest[n]["row_off"], manifest[n]["col_off"]
                assert not ground[r : r + t, c : c + t].any(), (how, j, n)


def test_overlapping_pairs_ignore_slivers_under_half_a_pixel() -> None:
    from tune_agb.cv import TilePlace

    places = {
        "a": TilePlace("", 0, 0, 10, 10, 0.5),
        "b": TilePlace("", 0, 9.6, 10, 19.6, 0.5),  # 0.4 px overlap: no
        "c": TilePlace("", 5, 5, 15, 15, 0.5),  # overlaps a and b
        "d": TilePlace("other", 0, 0, 10, 10, 0.5),  # another area
    }
    assert overlapping_pairs(places) == [("a", "c"), ("b", "c")]


@pytest.mark.parametrize(
    ("cv", "expect"),
    [
        ({"k": 1}, r"cv\.k: must be an integer >= 2 \(folds\), got 1"),
        ({"k": 2.5}, r"cv\.k: must be an integer, got 2\.5"),
        ({"block_size": 2}, r"cv\.k: is required: the number of folds, an integer >= 2"),
        ({"k": 3, "folds": 3}, r"cv\.folds: unknown key; allowed: k, block_size, block_m, seed, positions, manifest"),
        ({"k": 3, "block_size": 0}, r"cv\.block_size: must be an integer >= 1"),
        ({"k": 3, "block_size": 2, "block_m": 500.0}, r"cv\.block_m: give the block size once"),
        ({"k": 3, "block_m": -1.0}, r"cv\.block_m: must be > 0"),
        ({"k": 3, "positions": "gps"}, r"cv\.positions: must be one of auto, manifest, names, tiles, got 'gps'"),
        ({"k": 3, "block_m": 500.0, "positions": "names"}, r"cv\.block_m: needs map coordinates"),
        ([3], r"cv: must be a mapping"),
    ],
)
def test_bad_cv_sections_fail_with_one_line_naming_the_field(cv: object, expect: str) -> None:
    with pytest.raises(TuneAgbError, match=rf"^space\.yaml: {expect}"):
        parse_search_space(tiny_space(cv=cv), source="space.yaml")


def test_cv_section_defaults_and_round_trip() -> None:
    space = parse_search_space(tiny_space(cv={"k": 3}), source="s")
    assert space.cv == CV
    assert space.reported[-len(fold_metric_names(3)) :] == fold_metric_names(3)
    assert parse_search_space(space.to_dict(), source="again").to_dict() == space.to_dict()
    plain = parse_search_space(tiny_space(), source="s")
    assert plain.cv is None and "cv" not in plain.to_dict()
    assert fold_metric_names(2) == ("val_rmse_sd", "val_r2_sd", "val_rmse_fold0", "val_rmse_fold1", "val_r2_fold0",
                                    "val_r2_fold1")  # fmt: skip


def test_stacked_rows_read_like_the_copied_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=np.float16, shape=(5, 2, 4, 4))
    a[:] = rng.normal(size=a.shape)
    a.flush()
    a = np.load(tmp_path / "a.npy", mmap_mode="r")
    b = rng.normal(size=(3, 2, 4, 4)).astype(np.float32)  # another dtype, in memory
    stacked = StackedRows([(a, [4, 0, 2]), (b, [1, 2])])
    want = np.concatenate([a[[4, 0, 2]].astype(np.float32), b[[1, 2]]])
    assert stacked.shape == (5, 2, 4, 4) and stacked.dtype == np.float32 and len(stacked) == 5
    assert stacked.nbytes == want.nbytes
    np.testing.assert_array_equal(stacked[1:4], want[1:4])
    np.testing.assert_array_equal(stacked[np.array([4, 0])], want[[4, 0]])
    np.testing.assert_array_equal(stacked[3], want[3])
    from tune_agb.engine.data import _Reader

    out = np.empty((3, 2, 4, 4), np.float32)
    reader = _Reader(stacked)
    reader.read(np.array([3, 0, 2]), out)
    reader.close()
    np.testing.assert_array_equal(out, want[[3, 0, 2]])
    same = StackedRows([(a, [1, 3])])
    out16 = np.empty((2, 2, 4, 4), np.float16)
    reader = _Reader(same)  # one dtype: positional reads from the memory map
    assert reader.parts[0].fd is not None
    reader.read(np.array([1, 0]), out16)
    reader.close()
    np.testing.assert_array_equal(out16, a[[3, 1]])


@pytest.fixture(scope="module")
def packed_tiny(tiny_data: Path) -> tuple[DataSource, dict[str, TileSet]]:
    src = DataSource(str(tiny_data / "inputs"), str(tiny_data / "labels"), splits=("train", "val")).pinned()
    return src, src.open().tiles


def test_fold_tiles_are_the_stores_rows_and_their_norms_the_training_tiles(
    packed_tiny: tuple[DataSource, dict[str, TileSet]], tiny_data: Path
) -> None:
    src, tiles = packed_tiny
    plan = build_assignment({**CV, "block_size": 1}, tiles, str(tiny_data / "inputs"), dict(src.keys))
    assert plan.data_keys == dict(src.keys)
    by_name = {n: (s, i) for s in ("train", "val") for i, n in enumerate(tiles[s].names)}
    for j in range(plan.k):
        ft = fold_tiles(tiles, plan, j)
        assert sorted(ft["val"].names) == sorted(plan.val_names(j))
        assert sorted(ft["train"].names) == sorted(plan.train_names(j))
        for part in ("train", "val"):
            got = ft[part]
            want_x = np.stack([tiles[by_name[n][0]].inputs[by_name[n][1]] for n in got.names])
            np.testing.assert_array_equal(got.inputs[:], want_x)
            assert got.labelled == int(np.isfinite(got.labels[:]).sum())
            assert got.nonfinite == int((~np.isfinite(got.inputs[:])).sum())
        copied = TileSet("copy", ft["train"].names, ft["train"].inputs[:], ft["train"].labels[:])
        want, got = compute_norm_stats(copied), plan.train_norm(j)
        np.testing.assert_allclose(got.mean, want.mean, rtol=1e-9)
        np.testing.assert_allclose(got.std, want.std, rtol=1e-9)
        assert got.target_mean == pytest.approx(want.target_mean) and got.target_std == pytest.approx(want.target_std)
    merged = merge_train_val(tiles)
    assert merged["train"].names == tiles["train"].names + tiles["val"].names
    assert merged["val"] is tiles["val"] and len(merged["train"]) == 12
    assert merged["train"].labelled == tiles["train"].num_labelled + tiles["val"].num_labelled
    np.testing.assert_array_equal(merged["train"].labels[len(tiles["train"]) :], tiles["val"].labels)


def test_fold_tiles_stream_as_their_copies(packed_tiny: tuple[DataSource, dict[str, TileSet]], tiny_data: Path) -> None:
    _, tiles = packed_tiny
    plan = build_assignment(CV, tiles, str(tiny_data / "inputs"))
    ft = fold_tiles(tiles, plan, 1)["train"]
    copy = TileSet("copy", ft.names, ft.inputs[:], ft.labels[:])
    norm = plan.train_norm(1)
    batches = [np.array([3, 0]), np.array([1, 2, 7])]
    for mode in ("stream", "resident"):
        a = list(SplitFeed(ft, norm, torch.device("cpu"), mode).batches(batches))
        b = list(SplitFeed(copy, norm, torch.device("cpu"), mode).batches(batches))
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            torch.testing.assert_close(xa, xb)
            torch.testing.assert_close(ya, yb, equal_nan=True)


def test_fold_summary_means_spreads_and_per_fold_values() -> None:
    folds = [
        {"epoch": 3, "val_rmse": 10.0, "val_r2": 0.5, "val_n": 40.0, "train_loss": 1.0, "lr": 0.1},
        {"epoch": 3, "val_rmse": 14.0, "val_r2": 0.7, "val_n": 60.0, "train_loss": 2.0, "lr": 0.1},
    ]
    got = fold_summary(folds)
    assert got["epoch"] == 3 and got["val_rmse"] == 12.0 and got["val_r2"] == pytest.approx(0.6)
    assert got["val_n"] == 100.0 and got["train_loss"] == 1.5
    assert got["val_rmse_sd"] == pytest.approx(np.std([10.0, 14.0], ddof=1))
    assert got["val_r2_sd"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert (got["val_rmse_fold0"], got["val_rmse_fold1"], got["val_r2_fold1"]) == (10.0, 14.0, 0.7)
    diverged = fold_summary([folds[0], {**folds[1], "val_rmse": math.nan}])
    assert math.isnan(diverged["val_rmse"]) and diverged["val_rmse_sd"] == math.inf


@pytest.mark.slow
def test_fold_models_train_in_step_exactly_as_alone_and_resume(
    packed_tiny: tuple[DataSource, dict[str, TileSet]], tiny_data: Path
) -> None:
    """train_folds gives each fold the numbers a train() of that fold alone gives (dropout included: each fold has
    its own RNG stream), and a run resumed from its epoch-2 checkpoint ends where the uninterrupted one does."""
    _, tiles = packed_tiny
    plan = build_assignment({**CV, "k": 2, "block_size": 1}, tiles, str(tiny_data / "inputs"))
    cfg = TrainConfig(base_channels=4, depth=2, batch_size=3, epochs=4, dropout=0.2, schedule="cosine", seed=3)
    folds = [fold_tiles(tiles, plan, j) for j in range(2)]
    norms = [plan.train_norm(j) for j in range(2)]
    seen, states = [], {}

    def on_epoch(rep) -> None:
        seen.append(rep.metrics)
        states[rep.epoch] = copy.deepcopy(rep.state())  # a state holds the live weights: copy them now
        assert [f.epoch for f in rep.folds] == [rep.epoch, rep.epoch]

    train_folds(cfg, folds, norms=norms, device="cpu", on_epoch=on_epoch, progress=False)
    assert [m["epoch"] for m in seen] == [1, 2, 3, 4]
    for j in range(2):
        alone = train(cfg, folds[j], norm=norms[j], device="cpu", progress=False)
        assert [h["val_rmse"] for h in alone.history] == [m[f"val_rmse_fold{j}"] for m in seen]
        assert [h["val_r2"] for h in alone.history] == [m[f"val_r2_fold{j}"] for m in seen]
    for m in seen:
        assert m["val_rmse"] == pytest.approx((m["val_rmse_fold0"] + m["val_rmse_fold1"]) / 2)
        assert m["val_rmse_sd"] == pytest.approx(abs(m["val_rmse_fold0"] - m["val_rmse_fold1"]) / math.sqrt(2))
    state = states[2]
    assert state["epoch"] == 2 and len(state["folds"]) == 2 and [h["epoch"] for h in state["history"]] == [1, 2]
    assert all(f["epoch"] == 2 and f["norm"] == n.to_dict() for f, n in zip(state["folds"], norms, strict=True))
    resumed = []
    train_folds(cfg, folds, norms=norms, device="cpu", resume=state, on_epoch=lambda r: resumed.append(r.metrics),
                progress=False)  # fmt: skip
    assert resumed == seen[2:]


def test_the_driver_makes_the_folds_once_and_a_resume_reuses_them(tiny_data: Path, tmp_path: Path) -> None:
    import shutil

    from tune_agb.runs import read_folds, write_folds
    from tune_agb.search.experiment import Experiment
    from tune_agb.search.launch import make_folds

    data_dir = shutil.copytree(tiny_data, tmp_path / "data")
    space = parse_search_space(tiny_space(cv={"k": 3, "block_size": 1}), source=str(tmp_path / "s.yaml"))
    exp = Experiment.at(str(tmp_path / "st"), "exp")
    src = DataSource(str(data_dir / "inputs"), str(data_dir / "labels"), splits=("train", "val")).pinned()
    plan, write = make_folds(space, exp, src, str(data_dir / "inputs"), resume=False)
    assert write and plan is not None and plan.data_keys == dict(src.keys)
    write_folds(exp.uri, plan)
    assert read_folds(exp.uri) == plan
    assert make_folds(space, exp, src, str(data_dir / "inputs"), resume=True) == (plan, False)
    # a resume reuses the saved folds even where a new draw would differ (here: a hand-made assignment)
    swapped = dataclasses.replace(plan, folds=tuple((f + 1) % 3 for f in plan.folds), positions="by hand")
    write_folds(exp.uri, swapped)
    assert make_folds(space, exp, src, str(data_dir / "inputs"), resume=True) == (swapped, False)
    # tiles changed in content (same names): the folds stay, their normalisation is made again
    x = np.load(data_dir / "inputs" / "train" / "tile_00_02.npy")
    np.save(data_dir / "inputs" / "train" / "tile_00_02.npy", x * 2)
    changed = DataSource(str(data_dir / "inputs"), str(data_dir / "labels"), splits=("train", "val")).pinned()
    got, write = make_folds(space, exp, changed, str(data_dir / "inputs"), resume=True)
    assert write and got.folds == swapped.folds and got.data_keys == dict(changed.keys)
    assert got.train_stats != swapped.train_stats
    # other tiles: one clear error
    (data_dir / "inputs" / "val" / "tile_02_02.npy").unlink()
    (data_dir / "labels" / "val" / "tile_02_02.npy").unlink()
    fewer = DataSource(str(data_dir / "inputs"), str(data_dir / "labels"), splits=("train", "val")).pinned()
    with pytest.raises(TuneAgbError, match=r"cv_folds\.json: the train and val tiles differ .*1 gone, e.g. tile_02_02"):
        make_folds(space, exp, fewer, str(data_dir / "inputs"), resume=True)
    # without cv there are no folds
    plain = parse_search_space(tiny_space(), source="s")
    assert make_folds(plain, exp, src, str(data_dir / "inputs"), resume=False) == (None, False)
