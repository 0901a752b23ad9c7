"""python -m tune_agb.predict on real GeoTIFFs with real checkpoints of hand-wired U-Nets (known outputs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio

from tests.ensemble_helpers import precision_mixture
from tests.raster_helpers import (
    CRS_UTM,
    grid_transform,
    known_logvar,
    known_unet_checkpoint,
    random_unet_checkpoint,
    write_tif,
)
from tune_agb.engine.calibration import Calibration, fit_calibration
from tune_agb.engine.inference import load_predictor
from tune_agb.errors import run_cli
from tune_agb.predict import main
from tune_agb.runs import CALIBRATION_FILE, save_calibration

H, W, C = 100, 130, 4


def position_image(h: int = H, w: int = W, c: int = C) -> np.ndarray:
    """Band 0 encodes each pixel's position (1 + row * w + col, unique); other bands are noise."""
    rng = np.random.default_rng(0)
    img = rng.normal(size=(c, h, w)).astype(np.float32)
    img[0] = 1 + np.arange(h * w, dtype=np.float32).reshape(h, w)
    return img


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = run_cli(main, [*argv, "--no-progress", "--device", "cpu"])
    return code, capsys.readouterr().err


def no_partials(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".partial" in p.name]


@pytest.mark.parametrize(("tile", "overlap"), [(32, 8), (48, 0), (256, 16)])
def test_map_reproduces_known_model_at_the_right_pixels(tmp_path, capsys, tile, overlap):
    # A translated origin (not the default) checks that the output keeps the input's georeferencing.
    transform = grid_transform(origin=(612_340.0, 1_701_230.0))
    img = position_image()
    img[:, 40:50, 60:75] = np.nan  # no data in any band -> NaN in the map
    img[1:, 5, 5] = np.nan  # only some bands missing -> still predicted
    img[0, 7, 9] = np.nan  # band 0 missing -> normalised to 0 -> mean = target_mean
    src = write_tif(tmp_path / "in.tif", img, transform=transform)
    ckpt = known_unet_checkpoint(tmp_path / "m.pt", C, scale=1.0, logvar_bias=0.5, target_mean=3.0, target_std=2.0)
    out = tmp_path / "map.tif"
    code, err = run(["--model", str(ckpt), "--image", str(src), "--out", str(out), "--tile-size", str(tile),
                     "--overlap", str(overlap), "--batch-size", "3"], capsys)  # fmt: skip
    assert code == 0, err
    with rasterio.open(out) as ds:
        assert ds.crs.to_string() == CRS_UTM
        assert ds.transform == transform
        assert (ds.count, ds.height, ds.width) == (2, H, W)
        assert ds.descriptions == ("mean", "std")
        assert ds.dtypes == ("float32", "float32")
        assert np.isnan(ds.nodata)
        assert ds.profile["tiled"] and ds.profile["compress"] == "deflate"
        mean, std = ds.read()
        # Georeferenced check: the pixel at a map coordinate holds the value of the input pixel there.
        x, y = transform @ (100.5, 20.5)
        row, col = ds.index(x, y)
    expected = 2.0 * img[0] + 3.0
    expected[7, 9] = 3.0
    nodata = np.zeros((H, W), bool)
    nodata[40:50, 60:75] = True
    expected[nodata] = np.nan
    np.testing.assert_allclose(mean, expected, rtol=1e-5, atol=1e-4)
    assert (row, col) == (20, 100) and mean[row, col] == pytest.approx(2.0 * (1 + 20 * W + 100) + 3.0, rel=1e-6)
    sd = 2.0 * np.exp(known_logvar(0.5) / 2)
    assert np.isnan(std[nodata]).all()
    np.testing.assert_allclose(std[~nodata], sd, rtol=1e-5)
    assert no_partials(tmp_path)


def test_raster_smaller_than_one_window(tmp_path, capsys):
    img = position_image(20, 25)
    src = write_tif(tmp_path / "small.tif", img)
    ckpt = known_unet_checkpoint(tmp_path / "m.pt", C, scale=0.5)
    out = tmp_path / "map.tif"
    code, err = run(["--model", str(ckpt), "--image", str(src), "--out", str(out), "--tile-size", "64"], capsys)
    assert code == 0, err
    with rasterio.open(out) as ds:
        assert (ds.height, ds.width) == (20, 25)
        np.testing.assert_allclose(ds.read(1), 0.5 * img[0], rtol=1e-5)


def test_ensemble_folder_gives_mean_and_total_std(tmp_path, capsys):
    img = position_image(40, 50)
    img[0] /= 1000.0  # keep the spread between members moderate
    src = write_tif(tmp_path / "in.tif", img)
    ens = tmp_path / "ens"
    known_unet_checkpoint(ens / "members" / "member_00" / "best.pt", C, scale=1.0)
    known_unet_checkpoint(ens / "members" / "member_01" / "best.pt", C, scale=3.0)
    out = tmp_path / "map.tif"
    code, err = run(["--model", str(ens), "--image", str(src), "--out", str(out), "--tile-size", "32",
                     "--overlap", "4", "--cog"], capsys)  # fmt: skip
    assert code == 0, err
    with rasterio.open(out) as ds:
        mean, std = ds.read()
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert ds.descriptions == ("mean", "std")
    x0 = img[0]
    # Members predict x0 and 3 x0, both with variance exp(0) = 1: mean 2 x0, total variance 1 + x0^2.
    np.testing.assert_allclose(mean, 2 * x0, rtol=1e-5)
    np.testing.assert_allclose(std, np.sqrt(1 + x0.astype(np.float64) ** 2), rtol=1e-5)
    assert no_partials(tmp_path)


def test_band_count_mismatch_is_one_clear_line(tmp_path, capsys):
    src = write_tif(tmp_path / "three.tif", position_image(c=3))
    ckpt = known_unet_checkpoint(tmp_path / "m.pt", C)
    out = tmp_path / "map.tif"
    code, err = run(["--model", str(ckpt), "--image", str(src), "--out", str(out)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "3 bands" in lines[0] and "expects 4" in lines[0]
    assert not out.exists() and no_partials(tmp_path)


@pytest.mark.parametrize("problem", ["missing_image", "no_crs", "missing_model", "out_exists"])
def test_bad_inputs_fail_with_one_line(tmp_path, capsys, problem):
    src = write_tif(tmp_path / "in.tif", position_image(30, 30))
    ckpt = known_unet_checkpoint(tmp_path / "m.pt", C)
    out = tmp_path / "map.tif"
    expect = {"missing_image": "file not found", "no_crs": "no CRS", "missing_model": "no model found",
              "out_exists": "exists"}[problem]  # fmt: skip
    if problem == "missing_image":
        src = tmp_path / "nope.tif"
    elif problem == "no_crs":
        src = write_tif(tmp_path / "nocrs.tif", position_image(30, 30), crs=None)
    elif problem == "missing_model":
        ckpt = tmp_path / "no_model_here"
        ckpt.mkdir()
    else:
        out.write_bytes(b"keep me")
    code, err = run(["--model", str(ckpt), "--image", str(src), "--out", str(out)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], err
    if problem == "out_exists":
        assert out.read_bytes() == b"keep me"
    else:
        assert not out.exists()
    assert no_partials(tmp_path)


def read_map(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    with rasterio.open(path) as ds:
        mean, std = ds.read()
        return mean, std, ds.tags()


def test_the_models_calibration_is_applied_to_the_std_band(tmp_path, capsys):
    """A final-train out dir's calibration.json scales the std band (out dir or its best.pt); a model saved without
    one (older runs) keeps its std; --calibration none / FILE override it; the mean never changes."""
    img = position_image(40, 50)
    src = write_tif(tmp_path / "in.tif", img)
    run_dir = tmp_path / "run"
    known_unet_checkpoint(run_dir / "best.pt", C, scale=1.0, logvar_bias=0.5, target_std=2.0)
    raw_sd = 2.0 * np.exp(known_logvar(0.5) / 2)

    def predict(name: str, *extra: str) -> tuple[np.ndarray, np.ndarray, dict]:
        out = tmp_path / f"{name}.tif"
        code, err = run(["--image", str(src), "--out", str(out), "--tile-size", "32", *extra], capsys)
        assert code == 0, err
        return read_map(out)

    mean, std, tags = predict("old", "--model", str(run_dir))  # no calibration.json: the model's own std
    np.testing.assert_allclose(std, raw_sd, rtol=1e-5)
    assert tags["calibration"].startswith("none")
    save_calibration(Calibration("scale", 3.0, split="val", n=50), run_dir / CALIBRATION_FILE)
    for name, model in (("dir", run_dir), ("best", run_dir / "best.pt")):
        m, std, tags = predict(name, "--model", str(model))
        np.testing.assert_allclose(std, 3.0 * raw_sd, rtol=1e-5)
        np.testing.assert_array_equal(m, mean)
        assert tags["calibration"] == "scale: sigma x 3 (fitted on 50 val pixels)"
    _, std, _ = predict("none", "--model", str(run_dir), "--calibration", "none")
    np.testing.assert_allclose(std, raw_sd, rtol=1e-5)
    iso = Calibration("isotonic", 1.0, (0.0, 1.0), (0.5, 2.0))  # raw_sd^2 is beyond the knots: ratio e^1
    save_calibration(iso, tmp_path / "iso.json")
    _, std, _ = predict("iso", "--model", str(run_dir), "--calibration", str(tmp_path / "iso.json"))
    np.testing.assert_allclose(std, np.sqrt(iso.variance(np.float64(raw_sd) ** 2)), rtol=1e-5)
    assert np.sqrt(iso.variance(np.float64(raw_sd) ** 2)) == pytest.approx(raw_sd * np.exp(0.5), rel=1e-9)
    # distance: each pixel's std widened by its own bands' distance from the train pixels' (here: the noise bands'
    # mean and unit covariance, band 0's position values far off except near row 0, col 0)
    ref = np.random.default_rng(1).normal(size=(5_000, C))
    ref[:, 0] += 50.0
    y, mean, var = np.ones(10), np.zeros(10), np.ones(10)
    dist = fit_calibration("distance", y, mean, var, bands=np.zeros((C, 10)), reference=ref)
    save_calibration(dist, tmp_path / "dist.json")
    _, std, tags = predict("dist", "--model", str(run_dir), "--calibration", str(tmp_path / "dist.json"))
    g = dist.widening(img)
    assert g.min() == 1.0 and g.max() > 10.0  # the widening varies across the map
    np.testing.assert_allclose(std, raw_sd * dist.scale * g, rtol=1e-5)
    assert tags["calibration"].startswith("distance: sigma x")


def test_ensemble_calibration_scales_the_total_std(tmp_path, capsys):
    img = position_image(40, 50)
    img[0] /= 1000.0
    src = write_tif(tmp_path / "in.tif", img)
    ens = tmp_path / "ens"
    known_unet_checkpoint(ens / "members" / "member_00" / "best.pt", C, scale=1.0)
    known_unet_checkpoint(ens / "members" / "member_01" / "best.pt", C, scale=3.0)
    save_calibration(Calibration("scale", 0.5), ens / CALIBRATION_FILE)
    out = tmp_path / "map.tif"
    code, err = run(["--model", str(ens), "--image", str(src), "--out", str(out), "--tile-size", "32"], capsys)
    assert code == 0, err
    mean, std, _ = read_map(out)
    np.testing.assert_allclose(mean, 2 * img[0], rtol=1e-5)
    np.testing.assert_allclose(std, 0.5 * np.sqrt(1 + img[0].astype(np.float64) ** 2), rtol=1e-5)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"format": "tune_agb.calibration/1", "method": "scale", "scale": -1}', "'scale' must be a finite number > 0"),
        (
            '{"format": "tune_agb.calibration/1", "method": "platt"}',
            "'method' must be one of none, scale, isotonic, distance",
        ),
        ("not json", "not a readable calibration JSON file"),
    ],
)
def test_bad_calibration_file_is_one_line_naming_it(tmp_path, capsys, content, message):
    src = write_tif(tmp_path / "in.tif", position_image(30, 30))
    run_dir = tmp_path / "run"
    known_unet_checkpoint(run_dir / "best.pt", C)
    (run_dir / CALIBRATION_FILE).write_text(content)
    out = tmp_path / "map.tif"
    code, err = run(["--model", str(run_dir), "--image", str(src), "--out", str(out)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {run_dir / CALIBRATION_FILE}: {message}"), err
    assert not out.exists() and no_partials(tmp_path)


def test_ensemble_of_different_configurations(tmp_path, capsys):
    """Members with their own configs (depth, width: an ensemble of a search's best trials): each runs as it was
    trained, and the map is their mean and total std; the window grid is the coarsest member's."""
    img = position_image(48, 56)
    img[0] /= 1000.0
    src = write_tif(tmp_path / "in.tif", img)
    ens = tmp_path / "ens"
    shapes = [(2, 4), (3, 8)]  # (depth, base_channels)
    for k, (depth, base) in enumerate(shapes):
        random_unet_checkpoint(
            ens / "members" / f"member_{k:02d}" / "best.pt", C, depth=depth, base_channels=base, seed=k
        )
    predictor = load_predictor(ens, device="cpu")
    assert [(m.config.depth, m.config.base_channels) for m in predictor.members] == shapes
    assert predictor.step == 2**3
    alone = [load_predictor(ens / "members" / f"member_{k:02d}", device="cpu").predict(img[None]) for k in range(2)]
    means = np.stack([a[0][0].numpy() for a in alone]).astype(np.float64)
    varis = np.stack([a[1][0].numpy() for a in alone]).astype(np.float64) ** 2
    assert np.abs(means[0] - means[1]).mean() > 0.1  # two different models
    out = tmp_path / "map.tif"
    code, err = run(["--model", str(ens), "--image", str(src), "--out", str(out)], capsys)
    assert code == 0, err
    mean, std, _ = read_map(out)
    want_mean, want_var = precision_mixture(means, varis)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(std, np.sqrt(want_var), rtol=1e-5, atol=1e-3)


def test_predict_map_is_the_python_api_of_the_command(tmp_path):
    """predict_map writes the same map as the command and says what it did; a bad argument is one error line
    naming the flag, and nothing is written."""
    from tune_agb.errors import TuneAgbError
    from tune_agb.geo.raster import StackOptions
    from tune_agb.predict import predict_map

    img = position_image()
    src = write_tif(tmp_path / "in.tif", img)
    ckpt = known_unet_checkpoint(tmp_path / "m.pt", C, scale=1.0, logvar_bias=0.5, target_mean=3.0, target_std=2.0)
    done = predict_map(ckpt, [src], tmp_path / "api.tif", tile_size=48, overlap=8, device="cpu", progress=False)
    assert (done.out, done.members, done.device, done.calibration.method) == (tmp_path / "api.tif", 1, "cpu", "none")
    assert done.windows == 12  # 100 x 130 px in 48-px windows overlapping by 8: 3 rows x 4 columns
    code = run_cli(main, ["--model", str(ckpt), "--image", str(src), "--out", str(tmp_path / "cli.tif"),
                          "--tile-size", "48", "--overlap", "8", "--no-progress", "--device", "cpu"])  # fmt: skip
    assert code == 0
    with rasterio.open(tmp_path / "api.tif") as a, rasterio.open(tmp_path / "cli.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())
    # two of the four bands, picked by index: the model expects four, so this is refused before anything is written
    with pytest.raises(TuneAgbError, match=r"2 bands, but the model .* expects 4; pick bands with --bands"):
        predict_map(ckpt, [src], tmp_path / "bad.tif", stack=StackOptions(bands=("1", "2")), progress=False)
    with pytest.raises(TuneAgbError, match=r"^--batch-size: must be >= 1, got 0$"):
        predict_map(ckpt, [src], tmp_path / "bad.tif", batch_size=0)
    assert not (tmp_path / "bad.tif").exists() and no_partials(tmp_path)


def test_combine_members_weights_each_member_by_its_precision_at_each_pixel():
    import torch

    from tune_agb.engine.inference import combine_members

    # two members agree within their sigma; a third runs away at pixel 1 and says so with a large variance there
    means = torch.tensor([[10.0, 12.0], [11.0, 13.0], [10.5, -80.0]], dtype=torch.float64)
    varis = torch.tensor([[4.0, 4.0], [4.0, 4.0], [4.0, 400.0]], dtype=torch.float64)
    mean, var = combine_members(means, varis)
    want_mean, want_var = precision_mixture(means.numpy(), varis.numpy())
    np.testing.assert_allclose(mean.numpy(), want_mean)
    np.testing.assert_allclose(var.numpy(), want_var)
    assert mean[0] == pytest.approx(10.5) and var[0] == pytest.approx(4.0 + 1 / 6)  # equal variances: the plain mean
    assert 11.0 < mean[1] < 12.5  # the plain mean would be -18.3: the unsure member counts 1/100 of the others
    assert var[1] > 4.0 + 0.5 * (13.0 - 12.0) ** 2 / 2  # its spread still widens the interval a little
    one_mean, one_var = combine_members(means[:1], varis[:1])
    assert torch.equal(one_mean, means[0]) and torch.equal(one_var, varis[0])  # one member: as it is


def test_combine_members_bounds_an_overconfident_members_weight():
    import torch

    from tune_agb.engine.inference import MAX_WEIGHT_RATIO, combine_members

    # pixel 0: member 0 is far off and claims sigma 0.1 m (the failure seen on real tiles); pixel 1: the variances
    # differ by less than the bound, so the weights are the plain precision ones
    means = torch.tensor([[-1.3, 10.0], [30.0, 11.0], [31.0, 12.0]], dtype=torch.float64)
    varis = torch.tensor([[0.01, 2.0], [50.0, 4.0], [60.0, 6.0]], dtype=torch.float64)
    mean, var = combine_members(means, varis)
    w = np.array([MAX_WEIGHT_RATIO / 50, 1 / 50, 1 / 60])  # member 0 floored at a quarter of the median variance
    assert mean[0].item() == pytest.approx((w * means[:, 0].numpy()).sum() / w.sum())
    assert abs(30.0 - mean[0].item()) / var[0].sqrt().item() < 2  # the others' spread keeps label 30 inside 2 sigma
    unbounded = precision_mixture(means.numpy(), varis.numpy(), ratio=None)
    assert abs(30.0 - unbounded[0][0]) / np.sqrt(unbounded[1][0]) > 20  # what plain precision weights gave
    np.testing.assert_allclose(mean[1].item(), unbounded[0][1])
    np.testing.assert_allclose(var[1].item(), unbounded[1][1])
    # two members: the median is their mean variance
    m2, _ = combine_members(means[:2, :1], varis[:2, :1])
    w2 = np.array([1 / max(0.01, 25.005 / MAX_WEIGHT_RATIO), 1 / 50])
    assert m2.item() == pytest.approx((w2 * np.array([-1.3, 30.0])).sum() / w2.sum())
