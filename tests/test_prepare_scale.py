"""python -m tune_agb.prepare at real scale: GEDI shots from a whole orbit (far away, invalid, across the
antimeridian), several rasters sharing a CRS, and rasters read window by window. Real GeoTIFFs (rasterio) and real
parquet tables (pyarrow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.warp import transform as warp_points
from rasterio.windows import Window

from tests.raster_helpers import CRS_UTM, ORIGIN, grid_transform, pixel_lonlat, write_shots, write_tif
from tune_agb.errors import run_cli
from tune_agb.geo.raster import reproject_points
from tune_agb.geo.tiling import blocks_spanned, claim_blocks, span_split
from tune_agb.prepare import main, read_points

REPO = Path(__file__).resolve().parents[1]
C, T = 3, 16
SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}
# (lon, lat) of shots that no raster in UTM zone 47N can hold, each one a way a whole-orbit GEDI file goes wrong.
BAD_SHOTS = {
    "lon 0, lat 0 (outside the projection's domain)": (0.0, 0.0),
    "lat 95": (99.93, 95.0),
    "lat -91": (99.93, -91.0),
    "lon 279": (279.0, 14.92),
    "lon -200": (-200.0, 14.92),
    "NaN lon": (np.nan, 14.92),
    "NaN lat": (99.93, np.nan),
    "south pole": (0.0, -90.0),
    "antipode": (-80.07, -14.92),
}


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = run_cli(main, [*argv, "--no-progress"])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def summary_of(out: Path) -> dict:
    return json.loads((out / "prepare.json").read_text())["summary"]


def manifest(out: Path) -> list[dict]:
    return pq.read_table(out / "manifest.parquet").to_pylist()


def tile_arrays(out: Path, m: dict) -> tuple[np.ndarray, np.ndarray]:
    x = np.load(out / "inputs" / m["split"] / f"{m['name']}.npy")
    y = np.load(out / "labels" / m["split"] / f"{m['name']}.npy")
    return x, y


def shot_columns(lon: np.ndarray, lat: np.ndarray, agbd: np.ndarray) -> dict[str, np.ndarray]:
    return {"lon_lowestmode": np.asarray(lon, float), "lat_lowestmode": np.asarray(lat, float), "agbd": agbd}


# --- shots far away or at invalid positions ------------------------------------------------------------------------


@pytest.fixture
def scene(tmp_path: Path) -> dict:
    """A 64 x 80 px, 3-band UTM 47N raster and 200 shots at pixel centres of distinct pixels."""
    rng = np.random.default_rng(11)
    h, w = 64, 80
    img = rng.normal(size=(C, h, w)).astype(np.float32)
    flat = rng.choice(h * w, size=200, replace=False)
    lon, lat = pixel_lonlat(flat // w + 0.5, flat % w + 0.5)
    good = shot_columns(lon, lat, rng.uniform(5, 300, size=flat.size))
    return {"dir": tmp_path, "image": write_tif(tmp_path / "s2.tif", img), "good": good}


def test_shots_outside_the_projection_domain_are_counted_not_fatal(scene, capsys):
    """One shot at lon 0 / lat 0 used to kill prepare ("Point outside of projection domain"); now every shot no
    raster can hold is counted as outside and the tiles are those of a run without it."""
    d, good = scene["dir"], scene["good"]
    bad_lon, bad_lat = (np.array(v) for v in zip(*BAD_SHOTS.values(), strict=True))
    bad_value = np.full(bad_lon.size, 50.0)
    bad_value[0] = -9999.0  # a fill value far away is outside, not "without a value"
    dirty = {k: np.concatenate([good[k], b]) for k, b in zip(good, (bad_lon, bad_lat, bad_value), strict=True)}
    results = {}
    for name, cols in (("clean", good), ("dirty", dirty)):
        out = d / name
        argv = ["--image", str(scene["image"]), "--gedi", str(write_shots(d / f"{name}.parquet", cols)),
                "--out", str(out), "--tile-size", str(T), "--block-size", "1"]  # fmt: skip
        code, stdout, err = run(argv, capsys)
        assert code == 0, err
        results[name] = (out, stdout)
    (clean, _), (dirty_out, stdout) = results["clean"], results["dirty"]
    s_clean, s_dirty = summary_of(clean), summary_of(dirty_out)
    assert s_clean["shots_outside"] == 0 and s_clean["shots_read"] == 200
    assert s_dirty["shots_read"] == 200 + len(BAD_SHOTS)
    assert s_dirty["shots_outside"] == len(BAD_SHOTS) and s_dirty["shots_no_value"] == 0
    assert f"{len(BAD_SHOTS)} of them outside the raster" in stdout
    assert s_dirty["labelled_pixels"] == s_clean["labelled_pixels"] > 0
    assert manifest(dirty_out) == manifest(clean)
    for m in manifest(clean):
        for a, b in zip(tile_arrays(clean, m), tile_arrays(dirty_out, m), strict=True):
            np.testing.assert_array_equal(a, b)


def test_reproject_points_turns_points_outside_the_domain_into_nan():
    rng = np.random.default_rng(3)
    lon, lat = rng.uniform(99.0, 100.5, 1000), rng.uniform(14.0, 15.5, 1000)
    bad = rng.choice(1000, size=7, replace=False)
    lon[bad[:3]], lat[bad[:3]] = 0.0, 0.0  # PROJ fails the whole call for any one of these
    lat[bad[3]] = np.nan
    lat[bad[4:]] = 95.0
    src, dst = CRS.from_epsg(4326), CRS.from_user_input(CRS_UTM)
    x, y = reproject_points(lon, lat, src, dst)
    ok = np.ones(1000, bool)
    ok[bad] = False
    assert np.isnan(x[bad]).all() and np.isnan(y[bad]).all()
    ex, ey = warp_points(src, dst, lon[ok], lat[ok])
    np.testing.assert_array_equal(x[ok], ex)
    np.testing.assert_array_equal(y[ok], ey)


def test_read_points_keeps_the_shots_in_the_boxes_and_counts_the_rest(tmp_path):
    """The footprint filter is applied in the parquet read (with --filter); rows with a null or NaN position or
    outside every box are not returned, but every row that passed --filter is counted."""
    rng = np.random.default_rng(4)
    n = 5000
    lon, lat = rng.uniform(-180, 180, n), rng.uniform(-60, 60, n)
    lon[:10] = np.nan
    flag = rng.integers(0, 2, n).astype(np.int8)
    path = tmp_path / "orbit.parquet"
    cols = {"lon_lowestmode": lon, "lat_lowestmode": lat, "agbd": np.arange(n, dtype=float), "q": flag}
    pq.write_table(pq.read_table(write_shots(path, cols)), path, row_group_size=500)
    boxes = [(10.0, -5.0, 30.0, 5.0), (170.0, 0.0, 180.0, 20.0), (-180.0, 0.0, -175.0, 20.0)]
    shots = read_points(path, "agbd", "lon_lowestmode", "lat_lowestmode", ["q==1"], boxes)
    in_box = np.zeros(n, bool)
    for x0, y0, x1, y1 in boxes:
        in_box |= (lon >= x0) & (lon <= x1) & (lat >= y0) & (lat <= y1)
    want = in_box & (flag == 1)
    assert 0 < want.sum() < 400
    assert shots.passed == int((flag == 1).sum())
    np.testing.assert_array_equal(np.sort(shots.value), np.flatnonzero(want).astype(float))
    np.testing.assert_array_equal(shots.x, lon[shots.value.astype(int)])


def test_a_raster_across_the_antimeridian_keeps_shots_on_both_sides(tmp_path, capsys):
    """UTM 60N, 200 km wide around lon 180: its lon/lat footprint is two boxes, one each side of 180 degrees."""
    crs = "EPSG:32660"
    transform = grid_transform(res=5000.0, origin=(700_000.0, 1_200_000.0))
    rng = np.random.default_rng(6)
    h = w = 40
    image = write_tif(tmp_path / "t60.tif", rng.normal(size=(C, h, w)).astype(np.float32), transform, crs=crs)
    flat = rng.choice(h * w, size=300, replace=False)
    lon, lat = pixel_lonlat(flat // w + 0.5, flat % w + 0.5, transform, crs=crs)
    assert (lon > 179).any() and (lon < -179).any()
    shots = write_shots(tmp_path / "shots.parquet", shot_columns(lon, lat, rng.uniform(5, 300, flat.size)))
    out = tmp_path / "ds"
    argv = ["--image", str(image), "--gedi", str(shots), "--out", str(out), "--tile-size", "8", "--block-size", "1",
            "--min-labels", "0"]  # fmt: skip
    code, _, err = run(argv, capsys)
    assert code == 0, err
    s = summary_of(out)
    assert s["shots_outside"] == 0 and s["labelled_pixels"] == 300  # 40 px = 5 whole tiles: every pixel is tiled


# --- several rasters -------------------------------------------------------------------------------------------------

# Offsets (rows, cols) of each raster's origin on the first raster's pixel grid, and its size: B abuts A on the east
# but sits 5 px lower; C is another date over A, shifted by (3, 7) px. Neither lines up with A's blocks.
RASTERS = {"A": ((0, 0), (64, 80)), "B": ((5, 80), (64, 48)), "C": ((3, 7), (48, 64))}
UNION = (69, 128)


@pytest.fixture
def mosaic(tmp_path: Path) -> dict:
    """Three rasters sharing UTM 47N at 10 m, labels from shots at pixel centres of the union grid."""
    rng = np.random.default_rng(8)
    images, paths = {}, {}
    for name, ((dr, dc), (h, w)) in RASTERS.items():
        images[name] = rng.normal(size=(C, h, w)).astype(np.float32)
        origin = (ORIGIN[0] + 10.0 * dc, ORIGIN[1] - 10.0 * dr)
        paths[name] = write_tif(tmp_path / f"{name}.tif", images[name], grid_transform(origin=origin))
    flat = rng.choice(UNION[0] * UNION[1], size=1500, replace=False)
    rows, cols = flat // UNION[1], flat % UNION[1]
    covered = np.zeros(UNION, bool)
    for (dr, dc), (h, w) in RASTERS.values():
        covered[dr : dr + h, dc : dc + w] = True
    keep = covered[rows, cols]
    rows, cols = rows[keep], cols[keep]
    values = rng.uniform(5, 300, rows.size)
    label = np.full(UNION, np.nan, np.float32)
    label[rows, cols] = values
    lon, lat = pixel_lonlat(rows + 0.5, cols + 0.5)
    shots = write_shots(tmp_path / "shots.parquet", shot_columns(lon, lat, values))
    return {"dir": tmp_path, "images": images, "paths": paths, "label": label, "shots": shots}


def mosaic_args(mosaic: dict, out: Path, names: str = "ABC", *extra: str) -> list[str]:
    argv = ["--gedi", str(mosaic["shots"]), "--out", str(out), "--tile-size", str(T), "--block-size", "1", *extra]
    for name in names:
        argv += ["--scene", str(mosaic["paths"][name])]
    return argv


def test_several_rasters_give_tiles_from_each_with_unique_names_and_their_source(mosaic, capsys):
    out = mosaic["dir"] / "ds"
    code, stdout, err = run(mosaic_args(mosaic, out, "ABC", "--seed", "2"), capsys)
    assert code == 0, err
    rows = manifest(out)
    names = [m["name"] for m in rows]
    assert len(set(names)) == len(names)
    on_disk = sorted(p.stem for s in SPLIT_INDEX for p in (out / "inputs" / s).glob("*.npy"))
    assert on_disk == sorted(names)
    per_raster = summary_of(out)["tiles_per_raster"]
    assert set(per_raster) == set(RASTERS) and all(n > 0 for n in per_raster.values())
    assert sum(per_raster.values()) == len(rows)
    for m in rows:
        src, r, c = m["raster"], m["row_off"], m["col_off"]
        (dr, dc), _ = RASTERS[src]
        assert m["name"] == f"{src}_r{r:06d}_c{c:06d}" and m["raster_path"] == str(mosaic["paths"][src])
        assert per_raster[src] == sum(1 for o in rows if o["raster"] == src)
        x, y = tile_arrays(out, m)
        np.testing.assert_array_equal(x, mosaic["images"][src][:, r : r + T, c : c + T])
        np.testing.assert_array_equal(y, mosaic["label"][dr + r : dr + r + T, dc + c : dc + c + T])
        # Tiles sit on the first raster's tile lattice; blocks are counted on its pixel grid, from its corner.
        assert (dr + r) % T == 0 and (dc + c) % T == 0
        assert (m["block_row"], m["block_col"]) == ((dr + r) // T, (dc + c) // T)
    assert "outside the 3 rasters" in stdout and summary_of(out)["shots_outside"] == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_ground_is_in_two_splits_across_overlapping_and_abutting_rasters(mosaic, capsys, seed):
    out = mosaic["dir"] / f"ds{seed}"
    argv = [*mosaic_args(mosaic, out, "ABC", "--seed", str(seed), "--stride", "8"), "--block-size", "3"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    owner = np.full(UNION, -1)
    for m in manifest(out):
        (dr, dc), _ = RASTERS[m["raster"]]
        r, c, s = dr + m["row_off"], dc + m["col_off"], SPLIT_INDEX[m["split"]]
        win = owner[r : r + T, c : c + T]
        assert np.all((win == -1) | (win == s)), f"{m['name']} shares ground with a tile of another split"
        win[...] = s
    assert set(np.unique(owner)) == {-1, 0, 1, 2}
    assert summary_of(out)["dropped_at_split_borders"] > 0


def test_the_first_raster_keeps_its_single_raster_tiles_and_splits(mosaic, capsys):
    """Adding rasters renames the first one's tiles (prefix) but keeps their blocks; a single raster keeps the
    names and blocks of earlier versions (rROW_cCOL, blocks from its own pixel offsets)."""
    alone, together = mosaic["dir"] / "alone", mosaic["dir"] / "together"
    assert run(mosaic_args(mosaic, alone, "A"), capsys)[0] == 0
    assert run(mosaic_args(mosaic, together, "AB"), capsys)[0] == 0
    single = {(m["row_off"], m["col_off"]): m for m in manifest(alone)}
    assert all(m["name"] == f"r{m['row_off']:06d}_c{m['col_off']:06d}" for m in single.values())
    assert all((m["block_row"], m["block_col"]) == (m["row_off"] // T, m["col_off"] // T) for m in single.values())
    first = {(m["row_off"], m["col_off"]): m for m in manifest(together) if m["raster"] == "A"}
    assert first.keys() <= single.keys() and first
    assert all((m["block_row"], m["block_col"]) == (single[k]["block_row"], single[k]["block_col"]) for k, m in
               first.items())  # fmt: skip


def test_a_raster_half_a_pixel_off_keeps_its_tiles_in_the_blocks(mosaic, capsys):
    """D is A shifted by half a pixel (5 m east, 5 m south): its tiles overlap the blocks of A's grid by a sliver
    of half a pixel at most, which does not count, so none is dropped; tiles of two splits share no more."""
    d = mosaic["dir"]
    shifted = write_tif(d / "D.tif", mosaic["images"]["A"], grid_transform(origin=(ORIGIN[0] + 5, ORIGIN[1] - 5)))
    out = d / "ds"
    argv = [*mosaic_args(mosaic, out, "A", "--min-labels", "0"), "--scene", str(shifted)]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    s, rows = summary_of(out), manifest(out)
    assert s["dropped_at_split_borders"] == 0 and s["tiles_per_raster"]["D"] == s["tiles_per_raster"]["A"] > 0
    assert len({m["split"] for m in rows if m["raster"] == "D"}) == 3
    for i, a in enumerate(rows):
        for b in rows[i + 1 :]:
            if a["split"] != b["split"]:
                dx = min(a["right"], b["right"]) - max(a["left"], b["left"])
                dy = min(a["top"], b["top"]) - max(a["bottom"], b["bottom"])
                assert min(dx, dy) <= 5.0, f"{a['name']} and {b['name']} share more than a sliver"


@pytest.mark.parametrize(
    ("problem", "expect"),
    [("crs", ["EPSG:32648", "EPSG:32647", "share one CRS"]), ("bands", ["2 bands", "has 3"])],
)
def test_a_raster_that_does_not_fit_fails_with_one_line_and_keeps_the_dataset(mosaic, capsys, problem, expect):
    d = mosaic["dir"]
    out = d / "ds"
    assert run(mosaic_args(mosaic, out, "AB"), capsys)[0] == 0
    before = manifest(out)
    data = mosaic["images"]["B"] if problem == "crs" else mosaic["images"]["B"][:2]
    odd = write_tif(d / "odd.tif", data, crs="EPSG:32648" if problem == "crs" else CRS_UTM)
    code, _, err = run([*mosaic_args(mosaic, out, "AB", "--overwrite"), "--scene", str(odd)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {odd}: "), err
    assert all(e in lines[0] for e in expect), err
    assert manifest(out) == before
    assert not [p for p in d.iterdir() if ".partial" in p.name]


def test_label_raster_on_another_grid_is_warped_onto_each_raster(mosaic, capsys):
    """--labels on a 20 m grid, nearest-resampled onto each 10 m raster (all tiles in train: C's tiles straddle A's
    blocks)."""
    d = mosaic["dir"]
    rng = np.random.default_rng(9)
    coarse = np.where(rng.random((1, 40, 70)) < 0.3, rng.uniform(5, 300, (1, 40, 70)), np.nan).astype(np.float32)
    labels = write_tif(d / "agb20.tif", coarse, grid_transform(res=20.0))
    fine = np.repeat(np.repeat(coarse[0], 2, axis=0), 2, axis=1)
    out = d / "ds"
    argv = ["--scene", str(mosaic["paths"]["A"]), "--scene", str(mosaic["paths"]["C"]), "--labels", str(labels),
            "--out", str(out), "--tile-size", str(T), "--split", "1,0,0"]  # fmt: skip
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert {m["raster"] for m in manifest(out)} == {"A", "C"}
    for m in manifest(out):
        (dr, dc), _ = RASTERS[m["raster"]]
        r, c = dr + m["row_off"], dc + m["col_off"]
        np.testing.assert_array_equal(tile_arrays(out, m)[1], fine[r : r + T, c : c + T])


# --- blocks on fractional positions ----------------------------------------------------------------------------------


def test_blocks_spanned_by_tiles_off_the_block_grid():
    assert list(blocks_spanned(0, 0, 16, 16, 16)) == [(0, 0)]
    assert list(blocks_spanned(16, 32, 32, 48, 16)) == [(1, 2)]  # ends exactly on a block edge: one block
    assert list(blocks_spanned(15.4, -0.6, 31.4, 15.4, 16)) == [(0, -1), (0, 0), (1, -1), (1, 0)]
    assert list(blocks_spanned(15.5, -0.5, 31.5, 15.5, 16)) == [(1, 0)]  # slivers under half a pixel: ignored
    split = {(0, 0): "val", (1, 0): "val", (0, -1): "test"}
    assert span_split(0.5, 0, 20, 16, 16, split) == "val"
    assert span_split(0.4, -0.6, 16, 15.4, 16, split) is None
    assert span_split(40, 40, 56, 56, 16, split) == "train"  # a tile in a block without tiles: train


def test_a_kept_tile_claims_the_free_blocks_it_reaches_into():
    """Tiles of two splits, anchored in their own blocks, overlap in a block where no tile starts (1, 0): the first
    one kept claims it, so the second is dropped instead of sharing ground with it."""
    block_split = {(0, 0): "val", (1, -1): "test"}
    first, second = (5, 5, 20, 20), (12, -5, 27, 10)  # (row0, col0, row1, col1); they share rows 12-20, cols 5-10
    kept = []
    for span in (first, second):
        split = span_split(*span, 10, block_split)
        if split is not None:
            claim_blocks(*span, 10, split, block_split)
            kept.append((span, split))
    assert kept == [(first, "val")] and block_split[(1, 0)] == block_split[(1, 1)] == "val"


# --- memory ----------------------------------------------------------------------------------------------------------

# VmHWM (peak resident memory of this process image): unlike ru_maxrss it does not carry over the forking parent's.
_MEASURE = """
import re, sys
from pathlib import Path
from tune_agb.prepare import main
main(sys.argv[1:])
print("peak_rss_mb", int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024)
"""


@pytest.mark.slow
def test_rasters_are_read_window_by_window(tmp_path):
    """Two 4-band 6000 x 6000 float32 rasters (576 MB each when read whole; a few MB deflated) with shots in three
    tiles each: prepare's peak memory stays far below one raster, because only the labelled tiles' windows are read
    (GDAL's block cache capped at 32 MB). Memory bounded at any scale is not shown here, only windowed reading."""
    bands, size, block = 4, 6000, 512
    profile = {"driver": "GTiff", "dtype": "float32", "count": bands, "height": size, "width": size,
               "crs": CRS_UTM, "tiled": True, "blockxsize": block, "blockysize": block, "compress": "deflate",
               "nodata": np.nan}  # fmt: skip
    paths = []
    for k in range(2):
        origin = (ORIGIN[0] + k * 10.0 * size, ORIGIN[1])
        path = tmp_path / f"big{k}.tif"
        with rasterio.open(path, "w", transform=grid_transform(origin=origin), **profile) as dst:
            ones = np.full((bands, block, block), k + 1, np.float32)
            for r in range(0, size, block):
                for c in range(0, size, block):
                    h, w = min(block, size - r), min(block, size - c)
                    dst.write(ones[:, :h, :w], window=Window(c, r, w, h))
        paths.append(path)
    rows = np.array([10.5, 3000.5, 5800.5])
    # big1 is 6000 px east of big0, so its tiles start at col 144 (on big0's lattice of 256 px tiles).
    cols = np.concatenate([rows, np.array([200.5, 3000.5, 5500.5]) + size])
    lon, lat = pixel_lonlat(np.tile(rows, 2), cols)
    shots = write_shots(tmp_path / "shots.parquet", shot_columns(lon, lat, np.arange(1.0, 7.0)))
    out = tmp_path / "ds"
    argv = ["--scene", str(paths[0]), "--scene", str(paths[1]), "--gedi", str(shots), "--out", str(out),
            "--tile-size", "256", "--block-size", "1", "--split", "0.34,0.33,0.33", "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "TUNE_AGB_GDAL_CACHE_MB": "32"}
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *argv], env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    peak = float(proc.stdout.split("peak_rss_mb")[-1])
    assert len(manifest(out)) == 6 and summary_of(out)["tiles_per_raster"] == {"big0": 3, "big1": 3}
    assert peak < 400, f"peak RSS {peak:.0f} MB: prepare read more than the labelled windows"
