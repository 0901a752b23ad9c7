"""Maps at scale: three scenes (two overlapping in one CRS, one in another) mapped block by block on a real 2-node
Ray cluster (``ray.cluster_utils.Cluster``) give COGs that rio-cogeo validates, equal to the single-process map, and
a mosaic per CRS without seams; a map killed mid-way resumes without recomputing its staged blocks; a missing scene,
a band-count mismatch and an unreadable model are refused in one line before Ray starts."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from tests.conftest import REPO
from tests.raster_helpers import grid_transform, random_unet_checkpoint, write_tif
from tune_agb.engine.calibration import Calibration
from tune_agb.engine.checkpoint import load_checkpoint, save_checkpoint
from tune_agb.engine.inference import load_predictor, member_from_state
from tune_agb.errors import run_cli
from tune_agb.maps import block_plan, map_scenes, parse_scenes
from tune_agb.maps.plan import STAGING_DIR, Staging
from tune_agb.predict import main, predict_map, resolve_windows
from tune_agb.runs import CALIBRATION_FILE, save_calibration

C = 4
TILE = 48
X_SHIFT = 96  # px between the two overlapping scenes: a multiple of the model's grid step (4)


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    """Two real Ray nodes on this machine, one CPU each, small object stores."""
    from ray.cluster_utils import Cluster

    old = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_AUTH_MODE")}
    os.environ["RAY_TMPDIR"] = f"/tmp/rmp_{os.getpid()}"  # short: unix socket paths are limited to 107 bytes
    os.environ["RAY_AUTH_MODE"] = "disabled"
    node = {"num_cpus": 1, "num_gpus": 0, "object_store_memory": 80 * 1024**2}
    c = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    c.add_node(**node)
    c.wait_for_nodes()
    try:
        yield c
    finally:
        c.shutdown()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A depth-2 U-Net with random weights (real spatial context), its seam margin stored as final_train does."""
    path = random_unet_checkpoint(tmp_path_factory.mktemp("model") / "m.pt", C, depth=2, seed=3)
    state = load_checkpoint(path)
    margin = member_from_state(state, torch.device("cpu")).margin
    save_checkpoint({**state, "seam_margin": margin}, path)
    return path


def _image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(C, h, w)).astype(np.float32)
    img += np.cumsum(rng.normal(size=(C, h, 1)), axis=1).astype(np.float32) * 0.1
    return img


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


def _close(a: np.ndarray, b: np.ndarray, ref: float) -> None:
    """Equal where both have data (p99 and max of |a - b| under 0.1 % of ``ref``), NaN at the same pixels."""
    assert a.shape == b.shape
    assert (np.isnan(a) == np.isnan(b)).all()
    diff = np.abs(a - b)[np.isfinite(a)]
    assert np.percentile(diff, 99) < 1e-3 * ref and diff.max() < 1e-3 * ref, diff.max()


@pytest.mark.slow
def test_three_scenes_on_two_nodes_give_valid_cogs_and_seamless_mosaics(cluster, model, tmp_path):
    whole = _image(150, 260, seed=1)
    whole[:, 20:30, 40:50] = np.nan  # a no-data hole
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    a = write_tif(scenes / "a.tif", whole[:, :, :160])
    x0, y0 = 600_000.0, 1_650_000.0
    b = write_tif(scenes / "b.tif", whole[:, :, X_SHIFT:], transform=grid_transform(origin=(x0 + 10 * X_SHIFT, y0)))
    c = write_tif(scenes / "c.tif", _image(100, 120, seed=2), crs="EPSG:32648")
    out = tmp_path / "maps"
    t0 = time.perf_counter()
    done = map_scenes(
        model,
        parse_scenes([str(scenes / "*.tif")]),
        out,
        tile_size=TILE,
        block_size=TILE,
        device="cpu",
        address=cluster.address,
        progress=False,
    )
    print(f"3 scenes, {done.blocks} blocks on {done.workers} workers: {time.perf_counter() - t0:.1f} s")
    assert [r.out.name for r in done.scenes] == ["a.tif", "b.tif", "c.tif"]
    assert done.computed == done.blocks > 3 * 4 and done.workers == 2
    assert len(done.nodes) == 2  # blocks ran on both nodes
    assert sorted(p.name for p in out.iterdir()) == [
        "a.tif",
        "b.tif",
        "c.tif",
        "mosaic_EPSG32647.vrt",
        "mosaic_EPSG32648.vrt",
    ]
    # the COGs: valid for rio-cogeo's command, two described bands, NaN nodata, calibration noted
    rio = Path(sys.executable).with_name("rio")  # rasterio's command, with rio-cogeo's subcommand
    proc = subprocess.run([str(rio), "cogeo", "validate", str(out / "a.tif")], capture_output=True, text=True)
    assert proc.returncode == 0 and "is a valid cloud optimized GeoTIFF" in proc.stdout, proc.stdout + proc.stderr
    from rio_cogeo.cogeo import cog_validate

    for r in done.scenes:
        assert cog_validate(str(r.out), quiet=True)[0], r.out
        with rasterio.open(r.out) as ds:
            assert ds.descriptions == ("mean", "std") and np.isnan(ds.nodata)
            assert ds.tags()["calibration"] and ds.tags()["scene"] == r.scene.name
    # each scene equals today's single-process map of it
    maps = {}
    for src in (a, b, c):
        single = predict_map(
            model, [src], tmp_path / f"single_{src.name}", tile_size=TILE, device="cpu", progress=False
        )
        maps[src.stem] = _read(out / src.name)
        ref = float(np.nanmean(maps[src.stem][0]))
        _close(maps[src.stem], _read(single.out), ref)
    assert np.isnan(maps["a"][:, 20:30, 40:50]).all()
    # the UTM 47 mosaic spans both scenes and equals predicting the whole image at once: no seam where they join
    predictor = load_predictor(model, device="cpu")
    mean_all, std_all = (t.numpy()[0] for t in predictor.predict(whole[None]))
    expected = np.stack([mean_all, std_all])
    expected[:, np.isnan(whole).any(axis=0)] = np.nan
    with rasterio.open(out / "mosaic_EPSG32647.vrt") as ds:
        assert (ds.height, ds.width) == (150, 260) and ds.crs.to_epsg() == 32647
        assert ds.transform == grid_transform() and ds.descriptions == ("mean", "std")
        mosaic = ds.read()
    ref = float(np.nanmean(mean_all))
    _close(mosaic, expected, ref)
    overlap = slice(X_SHIFT, 160)
    _close(mosaic[:, :, :X_SHIFT], maps["a"][:, :, :X_SHIFT], ref)
    _close(mosaic[:, :, 160:], maps["b"][:, :, 160 - X_SHIFT :], ref)
    # where they overlap the mosaic equals both scenes away from their edges (and either one's seam would show)
    m = predictor.margin
    _close(mosaic[:, m:-m, X_SHIFT + m : 160 - m], maps["a"][:, m:-m, X_SHIFT + m : 160 - m], ref)
    _close(mosaic[:, m:-m, X_SHIFT + m : 160 - m], maps["b"][:, m:-m, m : 160 - X_SHIFT - m], ref)
    edge_b = np.abs(maps["b"][0, :, :2] - mean_all[:, overlap][:, :2])  # scene b's own left edge: no context
    assert np.nanmax(edge_b) > 5e-3 * ref
    with rasterio.open(out / "mosaic_EPSG32648.vrt") as ds:
        _close(ds.read(), maps["c"], float(np.nanmean(maps["c"][0])))


def _staged(out: Path) -> int:
    return sum(1 for _ in (out / STAGING_DIR).glob("*/blocks/*.tif"))


@pytest.mark.slow
def test_a_killed_map_resumes_without_recomputing_staged_blocks(cluster, model, tmp_path):
    src = write_tif(tmp_path / "big.tif", _image(240, 240, seed=4))
    tile, overlap = resolve_windows(TILE, None, load_predictor(model, device="cpu"))
    total = len(block_plan(240, 240, tile, overlap, 16))
    out = tmp_path / "maps"
    argv = [sys.executable, "-m", "tune_agb.predict", "--model", str(model), "--scenes", str(src), "--out", str(out)]
    argv += ["--tile-size", str(TILE), "--block-size", "16", "--address", cluster.address, "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([*argv, "--workers", "1", "--no-progress"], env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _staged(out) < 10 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # the driver and, with it, its workers
    proc.wait()
    staged = _staged(out)
    print(f"killed with {staged} of {total} blocks staged")
    assert 10 <= staged < total, (staged, total)
    assert not (out / "big.tif").exists()  # no half-made COG
    rerun = subprocess.run([*argv, "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{total - staged} of {total} blocks computed ({staged} already done)" in rerun.stdout, rerun.stdout
    assert not (out / STAGING_DIR).exists()
    single = predict_map(model, [src], tmp_path / "single.tif", tile_size=TILE, device="cpu", progress=False)
    resumed = _read(out / "big.tif")
    _close(resumed, _read(single.out), float(np.nanmean(resumed[0])))
    # a third run keeps the finished scene
    again = subprocess.run([*argv, "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "kept (already mapped)" in again.stdout, again.stdout + again.stderr


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert run_cli(main, argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_missing_scene_band_mismatch_and_unreadable_model_are_one_line_errors(model, tmp_path, capsys):
    good = write_tif(tmp_path / "good.tif", _image(40, 40, seed=5))
    three = write_tif(tmp_path / "three.tif", _image(40, 40, seed=6)[:3])
    out = str(tmp_path / "maps")
    base = ["--model", str(model), "--out", out, "--no-progress"]
    err = _error(capsys, [*base, "--scenes", str(good), "--scenes", str(tmp_path / "gone.tif")])
    assert err.startswith("error: ") and "gone.tif: image file not found" in err
    err = _error(capsys, [*base, "--scenes", f"{good},{three}"])  # two images stacked: 7 bands
    assert "7 bands, but the model" in err and "expects 4" in err
    err = _error(capsys, [*base, "--scenes", str(three)])
    assert "three.tif: 3 bands" in err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    err = _error(capsys, ["--model", str(bad), "--out", out, "--scenes", str(good)])
    assert "bad.pt: not a loadable tune_agb checkpoint" in err
    err = _error(capsys, [*base, "--scenes", str(tmp_path / "nothing*.tif")])
    assert "matches no file" in err
    err = _error(capsys, [*base, "--image", str(good), "--workers", "2"])
    assert "--workers" in err and "--scenes" in err
    assert not (tmp_path / "maps" / STAGING_DIR).exists()


def test_blocks_tile_each_scene_exactly_and_scene_lists_name_their_images(tmp_path):
    for h, w, tile, ov, size in [(100, 130, 32, 8, 32), (100, 130, 32, 8, 70), (37, 500, 64, 16, 1000)]:
        kept = np.zeros((h, w), int)
        for blk in block_plan(h, w, tile, ov, size):
            win = blk.window
            kept[win.row_off : win.row_off + win.height, win.col_off : win.col_off + win.width] += 1
        assert (kept == 1).all()
    listing = tmp_path / "scenes.txt"
    listing.write_text("# two scenes\nt1_s2.tif, t1_s1.tif\n\n/abs/t2.tif\n")
    scenes = parse_scenes([str(listing)])
    assert [s.name for s in scenes] == ["t1_s2", "t2"]
    assert scenes[0].images == (str(tmp_path / "t1_s2.tif"), str(tmp_path / "t1_s1.tif"))
    with pytest.raises(Exception, match="two scenes are named t2"):
        parse_scenes([str(listing), "/other/t2.tif"])


@pytest.mark.slow
def test_maps_to_s3_are_made_locally_uploaded_calibrated_and_kept_on_rerun(cluster, model, s3, tmp_path):
    whole = _image(64, 140, seed=7)
    a = write_tif(tmp_path / "a.tif", whole[:, :, :100])
    b = write_tif(tmp_path / "b.tif", whole[:, :, 40:], transform=grid_transform(origin=(600_400.0, 1_650_000.0)))
    run_dir = tmp_path / "run"  # a final training's out dir, with its calibration
    run_dir.mkdir()
    shutil.copy(model, run_dir / "best.pt")
    save_calibration(Calibration("scale", 3.0, split="val", n=50), run_dir / CALIBRATION_FILE)
    uri = f"s3://{s3.bucket()}/maps"
    work = tmp_path / "work"
    kwargs = {"tile_size": TILE, "block_size": TILE, "device": "cpu", "address": cluster.address, "progress": False}
    done = map_scenes(run_dir, parse_scenes([str(a), str(b)]), uri, work_dir=work, **kwargs)
    assert done.mosaics == [f"{uri}/mosaic_EPSG32647.vrt"]
    assert s3.keys(uri) == ["maps/a.tif", "maps/b.tif", "maps/mosaic_EPSG32647.vrt"]
    assert list(work.iterdir()) == []  # nothing left locally: no staging, no COG, no VRT
    local = tmp_path / "down"
    local.mkdir()
    for key in s3.keys(uri):
        (local / key.rsplit("/", 1)[1]).write_bytes(s3.read(f"{uri}/{key.rsplit('/', 1)[1]}"))
    from rio_cogeo.cogeo import cog_validate

    single = predict_map(model, [a], tmp_path / "single_a.tif", tile_size=TILE, device="cpu", progress=False)
    assert cog_validate(str(local / "a.tif"), quiet=True)[0]
    expected = _read(single.out) * np.array([1.0, 3.0], dtype=np.float32)[:, None, None]  # the std calibrated
    _close(_read(local / "a.tif"), expected, float(np.nanmean(expected[0])))
    with rasterio.open(local / "a.tif") as ds:
        assert ds.tags()["calibration"] == "scale: sigma x 3 (fitted on 50 val pixels)"
    with rasterio.open(local / "mosaic_EPSG32647.vrt") as ds:  # the VRT names the scenes next to it
        assert (ds.height, ds.width) == (64, 140)
        assert np.isfinite(ds.read(1)).all()
    again = map_scenes(run_dir, parse_scenes([str(a), str(b)]), uri, work_dir=work, **kwargs)
    assert [r.kept for r in again.scenes] == [True, True] and again.computed == 0


def _worker_pids() -> list[int]:
    """The pids of this machine's map workers (Ray names their processes ``ray::BlockWorker...``)."""
    proc = subprocess.run(["pgrep", "-f", "ray::BlockWorker"], capture_output=True, text=True)
    return [int(p) for p in proc.stdout.split()]


@pytest.mark.slow
def test_a_worker_killed_mid_map_is_restarted_and_the_map_completes(cluster, model, tmp_path):
    src = write_tif(tmp_path / "w.tif", _image(200, 200, seed=8))
    out = tmp_path / "maps"
    argv = [sys.executable, "-m", "tune_agb.predict", "--model", str(model), "--scenes", str(src), "--out", str(out)]
    argv += ["--tile-size", str(TILE), "--block-size", "16", "--address", cluster.address, "--device", "cpu"]
    before = set(_worker_pids())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [*argv, "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while _staged(out) < 5 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    ours = sorted(set(_worker_pids()) - before)
    assert ours and proc.poll() is None, "the map ended before a worker could be killed"
    os.kill(ours[0], signal.SIGKILL)  # one worker of this map, mid-map
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert "already done" in stdout
    single = predict_map(model, [src], tmp_path / "single.tif", tile_size=TILE, device="cpu", progress=False)
    _close(_read(out / "w.tif"), _read(single.out), float(np.nanmean(_read(single.out)[0])))


def test_staging_keeps_blocks_of_the_same_plan_only_and_drops_partial_files(tmp_path):
    blocks = block_plan(100, 100, 48, 32, 16)
    staging = Staging(tmp_path, "scene")
    assert staging.prepare({"tile": 48, "model": ["m.pt", 1, 2]}) is False
    staging.block_path(blocks[0]).write_bytes(b"done")
    (staging.blocks / f"{blocks[1].name}.tif.partial").write_bytes(b"half")  # a process killed mid-write
    assert staging.prepare({"tile": 48, "model": ["m.pt", 1, 2]}) is True
    assert staging.finished(blocks) == {blocks[0].name}
    assert not list(staging.blocks.glob("*.partial"))
    assert staging.prepare({"tile": 48, "model": ["m.pt", 1, 3]}) is False  # the model file changed
    assert staging.finished(blocks) == set()
    staging.remove()
    assert not (tmp_path / STAGING_DIR).exists()


@pytest.mark.slow
def test_map_workers_mix_the_models_forest_part(cluster, model, tmp_path):
    """A final run's folder with a forest part (``final_train --forest``): the Ray workers' map is the mixture, as
    the single-process map is, and it differs from the U-Net's alone."""
    from tune_agb.baseline import RandomForest
    from tune_agb.engine.data import NormStats
    from tune_agb.forest_mix import WINDOWS, ForestPart, save_forest_part

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(model, run / "best.pt")
    rng = np.random.default_rng(5)
    x = rng.normal(size=(600, C * (1 + len(WINDOWS))))
    forest = RandomForest(trees=20, seed=0).fit(x, 20 + 5 * x[:, 0] + rng.normal(size=600))
    norm = NormStats(mean=[0.0] * C, std=[1.0] * C)
    save_forest_part(ForestPart(forest, norm, Calibration("scale", 1.5, split="val", n=100), 0.4), run)
    src = write_tif(tmp_path / "f.tif", _image(120, 140, seed=9))
    out = tmp_path / "maps"
    done = map_scenes(
        run, parse_scenes([str(src)]), out, tile_size=TILE, block_size=TILE, device="cpu", address=cluster.address,
        progress=False,
    )  # fmt: skip
    assert done.computed == done.blocks > 1
    mapped = _read(out / "f.tif")
    single = _read(predict_map(run, [src], tmp_path / "single.tif", tile_size=TILE, device="cpu", progress=False).out)
    ref = float(np.nanmean(single[0]))
    _close(mapped, single, ref)
    alone = _read(predict_map(model, [src], tmp_path / "alone.tif", tile_size=TILE, device="cpu", progress=False).out)
    assert np.nanmax(np.abs(alone[0] - mapped[0])) > 0.05 * ref
