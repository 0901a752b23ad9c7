"""python -m tune_agb.prepare on real GeoTIFFs (written here with rasterio) and real GEDI-like parquet/csv tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.raster_helpers import CRS_UTM, grid_transform, pixel_lonlat, write_shots, write_tif
from tune_agb.engine.data import load_dataset
from tune_agb.errors import run_cli
from tune_agb.prepare import main
from tune_agb.store import DataSource

H, W, C = 100, 130, 4
T = 16


@pytest.fixture
def inputs(tmp_path: Path) -> dict:
    """A 4-band 100 x 130 px stack (a nodata hole over tile (0, 0)) and GEDI shots with known pixels."""
    rng = np.random.default_rng(1)
    img = rng.normal(size=(C, H, W)).astype(np.float32)
    img[:, :T, :T] = np.nan  # tile (0, 0) has no input at all
    img[2, 50:60, 50:60] = np.nan  # a cloud in one band stays NaN in the tiles
    image = write_tif(tmp_path / "stack.tif", img)
    # 300 good shots at pixel centres (unique pixels), a pixel with two shots, flagged shots, shots outside.
    flat = rng.choice(H * W, size=320, replace=False)
    rows, cols = flat // W, flat % W
    good_r, good_c = rows[:300], cols[:300]
    values = rng.uniform(5, 300, size=300)
    flag_r, flag_c = rows[300:], cols[300:]
    label = np.full((H, W), np.nan, np.float32)
    label[good_r, good_c] = values
    dup_r, dup_c = good_r[0], good_c[0]
    label[dup_r, dup_c] = (values[0] + 10.0) / 2  # mean of the two shots in that pixel
    r_all = np.concatenate([good_r + 0.5, [dup_r + 0.9], flag_r + 0.5, [-5.0, 50.0, H + 3.0], [10.5]])
    c_all = np.concatenate([good_c + 0.5, [dup_c + 0.1], flag_c + 0.5, [10.0, W + 7.0, 20.0], [10.5]])
    lon, lat = pixel_lonlat(r_all, c_all)
    agbd = np.concatenate([values, [10.0], np.full(20, 999.0), [1.0, 2.0, 3.0], [-9999.0]])
    flag = np.concatenate([np.ones(301), np.zeros(20), np.ones(4)]).astype(np.int8)
    columns = {"lon_lowestmode": lon, "lat_lowestmode": lat, "agbd": agbd, "l4_quality_flag": flag}
    shots = write_shots(tmp_path / "shots.parquet", columns)
    return {"dir": tmp_path, "image": image, "img": img, "label": label, "shots": shots, "columns": columns}


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = run_cli(main, [*argv, "--no-progress"])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def base_args(inp: dict, out: Path, *extra: str) -> list[str]:
    return ["--image", str(inp["image"]), "--gedi", str(inp["shots"]), "--filter", "l4_quality_flag==1",
            "--out", str(out), "--tile-size", str(T), *extra]  # fmt: skip


def manifest(out: Path) -> list[dict]:
    return pq.read_table(out / "manifest.parquet").to_pylist()


def test_tiles_equal_source_windows_and_labels_sit_on_their_shots(inputs, capsys):
    out = inputs["dir"] / "ds"
    code, stdout, err = run(base_args(inputs, out, "--min-labels", "0"), capsys)
    assert code == 0, err
    rows = manifest(out)
    summary = json.loads((out / "prepare.json").read_text())["summary"]
    # Every whole 16 px tile except the all-nodata one; 100 x 130 leaves 4 rows and 2 columns untiled.
    assert summary["tiles_on_grid"] == (H // T) * (W // T)
    assert summary["skipped_no_input"] == 1 and len(rows) == (H // T) * (W // T) - 1
    assert summary["edge_pixels_unused"] == [H % T, W % T]
    assert summary["shots_outside"] == 3 and summary["shots_no_value"] == 1
    assert "3 of them outside the raster" in stdout
    covered = np.zeros((H, W), bool)
    for m in rows:
        r, c = m["row_off"], m["col_off"]
        x = np.load(out / "inputs" / m["split"] / f"{m['name']}.npy")
        y = np.load(out / "labels" / m["split"] / f"{m['name']}.npy")
        assert x.dtype == np.float32 and x.shape == (C, T, T) and y.shape == (T, T)
        np.testing.assert_array_equal(x, inputs["img"][:, r : r + T, c : c + T])
        np.testing.assert_array_equal(y, inputs["label"][r : r + T, c : c + T])
        assert m["n_labelled"] == int(np.isfinite(y).sum())
        assert m["crs"] == CRS_UTM
        bounds = (*(grid_transform() @ (c, r + T)), *(grid_transform() @ (c + T, r)))
        assert (m["left"], m["bottom"], m["right"], m["top"]) == pytest.approx(bounds)
        covered[r : r + T, c : c + T] = True
    # All good shots inside the tiled area are labels; flagged shots (value 999) are not.
    lab = inputs["label"]
    assert (
        np.isfinite(lab[covered]).sum() + np.isfinite(lab[:T, :T]).sum()
        == np.isfinite(lab[: H - H % T, : W - W % T]).sum()
    )
    tiles = load_dataset(out / "inputs", out / "labels", in_channels=C)
    all_labels = np.concatenate([t.labels.ravel() for t in tiles.values()])
    assert not np.any(all_labels == 999.0)
    # The training store was packed too: search and final_train open it without packing.
    stores = [Path(p) for p in stdout.split("training store packed: ")[1].split()[0:3]]
    packed = DataSource(str(out / "inputs"), str(out / "labels")).open()
    assert sorted(str(p).rstrip(",") for p in stores) == sorted(str(p) for p in packed.paths.values())
    for split, t in tiles.items():
        np.testing.assert_array_equal(packed.tiles[split].labels, t.labels)


@pytest.mark.parametrize("stride", [T, T // 2])
def test_splits_do_not_share_pixels(inputs, capsys, stride):
    out = inputs["dir"] / f"ds{stride}"
    code, _, err = run(base_args(inputs, out, "--stride", str(stride), "--block-size", "2", "--seed", "3"), capsys)
    assert code == 0, err
    rows = manifest(out)
    owner = np.full((H, W), -1)
    splits = ["train", "val", "test"]
    for m in rows:
        r, c, s = m["row_off"], m["col_off"], splits.index(m["split"])
        win = owner[r : r + T, c : c + T]
        assert np.all((win == -1) | (win == s)), f"tile {m['name']} shares pixels with another split"
        win[...] = s
        assert (out / "inputs" / m["split"] / f"{m['name']}.npy").is_file()
    assert {m["split"] for m in rows} == set(splits)
    summary = json.loads((out / "prepare.json").read_text())["summary"]
    if stride < T:  # overlapping tiles that reach into another split's block are dropped
        assert summary["dropped_at_split_borders"] > 0
    names = sorted(p.stem for s in splits for p in (out / "inputs" / s).glob("*.npy"))
    assert names == sorted(m["name"] for m in rows)


def test_min_labels_skips_and_counts_sparse_tiles(inputs, capsys):
    out = inputs["dir"] / "ds"
    code, _, err = run(base_args(inputs, out, "--min-labels", "5", "--block-size", "1"), capsys)
    assert code == 0, err
    rows = manifest(out)
    summary = json.loads((out / "prepare.json").read_text())["summary"]
    lab = inputs["label"]
    counts = [
        int(np.isfinite(lab[r : r + T, c : c + T]).sum())
        for r in range(0, H - T + 1, T)
        for c in range(0, W - T + 1, T)
    ]
    assert summary["skipped_few_labels"] == sum(n < 5 for n in counts) > 0
    assert all(m["n_labelled"] >= 5 for m in rows)
    assert len(rows) + summary["skipped_few_labels"] + summary["skipped_no_input"] == len(counts)


def test_several_images_are_stacked_and_warped_onto_the_first_grid(inputs, capsys):
    rng = np.random.default_rng(5)
    coarse = rng.normal(size=(1, H // 2, W // 2)).astype(np.float32)  # 20 m, same origin
    second = write_tif(inputs["dir"] / "coarse.tif", coarse, transform=grid_transform(res=20.0))
    same = rng.normal(size=(2, H, W)).astype(np.float32)
    third = write_tif(inputs["dir"] / "same.tif", same, descriptions=["VV", "VH"])
    out = inputs["dir"] / "ds"
    argv = base_args(inputs, out, "--image", str(second), "--image", str(third), "--resampling", "nearest")
    code, _, err = run(argv, capsys)
    assert code == 0, err
    warped = np.repeat(np.repeat(coarse[0], 2, axis=0), 2, axis=1)
    for m in manifest(out):
        r, c = m["row_off"], m["col_off"]
        x = np.load(out / "inputs" / m["split"] / f"{m['name']}.npy")
        assert x.shape == (C + 3, T, T)
        np.testing.assert_array_equal(x[:C], inputs["img"][:, r : r + T, c : c + T])
        np.testing.assert_array_equal(x[C], warped[r : r + T, c : c + T])
        np.testing.assert_array_equal(x[C + 1 :], same[:, r : r + T, c : c + T])
    assert json.loads((out / "prepare.json").read_text())["bands"][-2:] == ["VV", "VH"]


def test_label_raster_dn_scaling_and_band_selection(tmp_path, capsys):
    rng = np.random.default_rng(2)
    dn = rng.integers(1, 12000, size=(3, 48, 48)).astype(np.uint16)
    dn[:, 0, 0] = 0  # nodata -> NaN
    image = write_tif(tmp_path / "dn.tif", dn, nodata=0, descriptions=["B2", "B3", "VV"])
    label = np.full((1, 48, 48), np.nan, np.float32)
    label[0, ::5, ::7] = rng.uniform(0, 100, size=label[0, ::5, ::7].shape)
    labels = write_tif(tmp_path / "gedi.tif", label)
    out = tmp_path / "ds"
    argv = ["--image", str(image), "--labels", str(labels), "--out", str(out), "--tile-size", "16", "--block-size",
            "1", "--bands", "VV", "B3", "--s2-dn"]  # fmt: skip
    code, _, err = run(argv, capsys)
    assert code == 0, err
    for m in manifest(out):
        r, c = m["row_off"], m["col_off"]
        x = np.load(out / "inputs" / m["split"] / f"{m['name']}.npy")
        y = np.load(out / "labels" / m["split"] / f"{m['name']}.npy")
        vv = dn[2, r : r + 16, c : c + 16].astype(np.float32)
        b3 = (dn[1, r : r + 16, c : c + 16].astype(np.float32) - 1000.0) / 10000.0
        if r == 0 and c == 0:
            vv[0, 0] = b3[0, 0] = np.nan
        np.testing.assert_allclose(x[0], vv)  # VV is not Sentinel-2: left as it is
        np.testing.assert_allclose(x[1], b3, rtol=1e-6)
        np.testing.assert_array_equal(y, label[0, r : r + 16, c : c + 16])


def test_csv_points_with_other_column_names(inputs, capsys):
    cols = inputs["columns"]
    csv = write_shots(inputs["dir"] / "shots.csv", {"x": cols["lon_lowestmode"], "y": cols["lat_lowestmode"],
                                                   "rh98": cols["agbd"], "q": cols["l4_quality_flag"]})  # fmt: skip
    out = inputs["dir"] / "ds"
    argv = ["--image", str(inputs["image"]), "--gedi", str(csv), "--value-column", "rh98", "--lon-column", "x",
            "--lat-column", "y", "--filter", "q == 1", "--out", str(out), "--tile-size", str(T)]  # fmt: skip
    code, _, err = run(argv, capsys)
    assert code == 0, err
    for m in manifest(out):
        r, c = m["row_off"], m["col_off"]
        y = np.load(out / "labels" / m["split"] / f"{m['name']}.npy")
        np.testing.assert_allclose(y, inputs["label"][r : r + T, c : c + T], rtol=1e-6)


@pytest.mark.parametrize(
    ("problem", "expect"),
    [
        ("missing_image", "stack_missing.tif: image file not found"),
        ("no_crs", "has no CRS"),
        ("empty_points", "no GEDI shots after --filter"),
        ("missing_value_column", "--value-column biomass"),
        ("missing_filter_column", "has no column 'quality'"),
        ("band_out_of_range", "--bands: band 9 does not exist"),
        ("two_band_labels", "label raster has 2 bands, expected 1"),
        ("bad_split", "--split"),
        ("shots_elsewhere", "none of the"),
    ],
)
def test_bad_inputs_fail_with_one_line_and_leave_nothing(inputs, capsys, problem, expect):
    d = inputs["dir"]
    out = d / "ds"
    argv = base_args(inputs, out)
    if problem == "missing_image":
        argv[1] = str(d / "stack_missing.tif")
    elif problem == "no_crs":
        argv[1] = str(write_tif(d / "nocrs.tif", inputs["img"], crs=None))
    elif problem == "empty_points":
        argv += ["--filter", "agbd>1e6"]
    elif problem == "missing_value_column":
        argv += ["--value-column", "biomass"]
    elif problem == "missing_filter_column":
        argv += ["--filter", "quality==1"]
    elif problem == "band_out_of_range":
        argv += ["--bands", "1", "9"]
    elif problem == "two_band_labels":
        lab = write_tif(d / "lab2.tif", np.zeros((2, H, W), np.float32))
        argv = ["--image", str(inputs["image"]), "--labels", str(lab), "--out", str(out), "--tile-size", "16"]
    elif problem == "bad_split":
        argv += ["--split", "0.5,0.5"]
    else:
        far = {k: v.copy() for k, v in inputs["columns"].items()}
        far["lon_lowestmode"] = far["lon_lowestmode"] + 5.0
        argv[3] = str(write_shots(d / "far.parquet", far))
    code, _, err = run(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], err
    assert not out.exists()
    assert not [p for p in d.iterdir() if ".partial" in p.name]


def test_existing_dataset_is_kept_unless_overwrite_succeeds(inputs, capsys):
    out = inputs["dir"] / "ds"
    assert run(base_args(inputs, out), capsys)[0] == 0
    before = manifest(out)
    code, _, err = run(base_args(inputs, out, "--tile-size", "20"), capsys)
    assert code == 2 and "not empty" in err and "--overwrite" in err
    # A failing re-run with --overwrite leaves the old, complete dataset in place.
    code, _, err = run(base_args(inputs, out, "--overwrite", "--value-column", "nope"), capsys)
    assert code == 2 and manifest(out) == before
    code, _, err = run([*base_args(inputs, out, "--overwrite"), "--tile-size", "20"], capsys)
    assert code == 0, err
    after = manifest(out)
    assert after and all(m["height"] == 20 for m in after)
    n_files = sum(1 for s in ("train", "val", "test") for _ in (out / "inputs" / s).glob("*.npy"))
    assert n_files == len(after)
