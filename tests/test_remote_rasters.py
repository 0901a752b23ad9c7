"""prepare and predict read rasters and GEDI tables from S3 (moto's S3 server on localhost, tests/s3_server.py) and
over http(s): the same tiles and maps as from local copies, and one clear line for what cannot be read."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import rasterio.shutil

from tests.raster_helpers import grid_transform, known_unet_checkpoint, pixel_lonlat, write_shots, write_tif
from tune_agb import predict, prepare
from tune_agb.errors import TuneAgbError, run_cli
from tune_agb.geo.remote import gdal_network_options, gdal_s3_options, location_stem, raster_location

REPO = Path(__file__).resolve().parents[1]
H, W, C, T = 48, 64, 4, 16


@pytest.fixture
def local(tmp_path: Path) -> dict:
    """Two small 4-band GeoTIFFs side by side (A a Cloud-Optimised GeoTIFF) and GEDI shots over both."""
    rng = np.random.default_rng(5)
    img = rng.normal(size=(C, H, 2 * W)).astype(np.float32)
    img[0] = 1 + np.arange(H * 2 * W, dtype=np.float32).reshape(H, 2 * W)  # band 0: the pixel's position
    plain = write_tif(tmp_path / "plain_a.tif", img[:, :, :W])
    a = tmp_path / "A.tif"
    rasterio.shutil.copy(plain, a, driver="COG", BLOCKSIZE=16)

    b = write_tif(tmp_path / "B.tif", img[:, :, W:], transform=grid_transform(origin=(600_000.0 + 10 * W, 1_650_000.0)))
    flat = rng.choice(H * 2 * W, size=400, replace=False)
    lon, lat = pixel_lonlat(flat // (2 * W) + 0.5, flat % (2 * W) + 0.5)
    flag = (rng.uniform(size=400) > 0.1).astype(np.int8)
    shots = write_shots(
        tmp_path / "shots.parquet",
        {"lon_lowestmode": lon, "lat_lowestmode": lat, "agbd": rng.uniform(5, 300, 400), "l4_quality_flag": flag},
    )
    label = np.full((1, H, W), np.nan, np.float32)
    label[0, flat[:200] // (2 * W), flat[:200] % (2 * W) % W] = rng.uniform(5, 300, 200)
    labels = write_tif(tmp_path / "agb.tif", label)
    return {"dir": tmp_path, "A": a, "B": b, "shots": shots, "labels": labels, "img": img}


@pytest.fixture
def bucket(s3, local) -> dict:
    """The inputs uploaded to a fresh bucket: their s3:// URIs, a presigned and a public http URL of ``B.tif``."""
    name = s3.bucket()
    client = s3.client()
    for key in ("A", "B", "shots", "labels"):
        client.upload_file(str(local[key]), name, f"in/{local[key].name}")
    client.put_object(Bucket=name, Key="in/bad.parquet", Body=b"not a parquet table")
    client.upload_file(str(local["B"]), name, "public/B.tif")
    client.put_object_acl(Bucket=name, Key="public/B.tif", ACL="public-read")
    signed = client.generate_presigned_url("get_object", Params={"Bucket": name, "Key": "in/B.tif"}, ExpiresIn=600)
    return {
        "name": name,
        "A": f"s3://{name}/in/A.tif",
        "B": f"s3://{name}/in/B.tif",
        "shots": f"s3://{name}/in/shots.parquet",
        "labels": f"s3://{name}/in/agb.tif",
        "presigned_B": signed,
        "public_B": f"{s3.endpoint}/{name}/public/B.tif",
    }


def error_line(err: str) -> str:
    """The one ``error:`` line of a CLI run (moto's request log may share stderr)."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def run_prepare(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = run_cli(prepare.main, [*argv, "--no-progress", "--no-pack"])
    return code, capsys.readouterr().err


def run_predict(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = run_cli(predict.main, [*argv, "--no-progress", "--device", "cpu"])
    return code, capsys.readouterr().err


def prepare_args(images: list[str], shots: str, out: Path) -> list[str]:
    scenes = [a for img in images for a in ("--scene", img)]
    return [*scenes, "--gedi", shots, "--filter", "l4_quality_flag==1", "--out", str(out), "--tile-size", str(T),
            "--block-size", "1", "--min-labels", "1"]  # fmt: skip


def same_dataset(a: Path, b: Path) -> int:
    """Assert two prepared datasets hold the same tiles (inputs and labels) and manifest rows; returns the tiles."""
    rows_a, rows_b = (pq.read_table(d / "manifest.parquet").to_pylist() for d in (a, b))
    drop = lambda rows: [{k: v for k, v in r.items() if k != "raster_path"} for r in rows]  # noqa: E731
    assert drop(rows_a) == drop(rows_b)
    for r in rows_a:
        for part in ("inputs", "labels"):
            x = np.load(a / part / r["split"] / f"{r['name']}.npy")
            y = np.load(b / part / r["split"] / f"{r['name']}.npy")
            np.testing.assert_array_equal(x, y)
    return len(rows_a)


@pytest.fixture
def auth_on(s3) -> Iterator[None]:
    """moto checks credentials (IAM) while the test runs: unknown access keys get 403 InvalidAccessKeyId."""
    with s3.credential_checks():
        yield


def test_gdal_s3_settings_follow_the_endpoint_and_keep_exported_ones():
    moto = gdal_s3_options({"AWS_ENDPOINT_URL": "http://127.0.0.1:5000/"})
    assert moto == {"AWS_S3_ENDPOINT": "127.0.0.1:5000", "AWS_HTTPS": "NO", "AWS_VIRTUAL_HOSTING": "FALSE"}
    aws = gdal_s3_options({"AWS_ENDPOINT_URL": "https://s3.eu-west-1.amazonaws.com"})
    assert aws == {"AWS_S3_ENDPOINT": "s3.eu-west-1.amazonaws.com", "AWS_HTTPS": "YES"}  # virtual hosting stays on
    kept = gdal_s3_options({"AWS_ENDPOINT_URL": "https://minio.lan:9000", "AWS_VIRTUAL_HOSTING": "TRUE"})
    assert kept == {"AWS_S3_ENDPOINT": "minio.lan:9000", "AWS_HTTPS": "YES"}
    specific = {"AWS_ENDPOINT_URL": "http://a:1", "AWS_ENDPOINT_URL_S3": "http://b:2"}
    assert gdal_s3_options(specific)["AWS_S3_ENDPOINT"] == "b:2"
    assert gdal_s3_options({"AWS_ENDPOINT_URL": "http://a:1", "AWS_S3_ENDPOINT": "c:3"}) == {}
    assert gdal_s3_options({}) == {}
    assert gdal_network_options({"GDAL_HTTP_MAX_RETRY": "0"})["GDAL_HTTP_RETRY_DELAY"] == "1"
    assert "GDAL_HTTP_MAX_RETRY" not in gdal_network_options({"GDAL_HTTP_MAX_RETRY": "0"})
    with pytest.raises(TuneAgbError, match="AWS_ENDPOINT_URL='localhost:9000': expected an http"):
        gdal_s3_options({"AWS_ENDPOINT_URL": "localhost:9000"})


def test_uris_keep_their_form_and_name():
    assert raster_location("s3://b/x/A.tif") == "s3://b/x/A.tif"
    assert raster_location("/vsis3/b/x/A.tif") == "/vsis3/b/x/A.tif"
    assert raster_location("file:///data/A.tif") == "/data/A.tif"
    assert location_stem("s3://b/x/A.tif") == "A"
    assert location_stem("https://h/x/B.tif?X-Amz-Credential=k/20260101/us-east-1/s3&X-Amz-Signature=f") == "B"
    assert location_stem("/vsis3/b/x/C.tif") == "C"


def test_prepare_from_s3_equals_prepare_from_local_files(s3, local, bucket, capsys):
    """The CLI, in its own process with the environment a user exports, reads both rasters and the GEDI table from S3
    (one raster through a presigned https URL): the same tiles, labels and manifest as from the local files."""
    out_local, out_s3 = local["dir"] / "ds_local", local["dir"] / "ds_s3"
    code, err = run_prepare(prepare_args([str(local["A"]), str(local["B"])], str(local["shots"]), out_local), capsys)
    assert code == 0, err
    argv = prepare_args([bucket["A"], bucket["presigned_B"]], bucket["shots"], out_s3)
    env = {**os.environ, **s3.env, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "tune_agb.prepare", *argv, "--no-progress", "--no-pack"],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    n = same_dataset(out_local, out_s3)
    assert n >= 8
    rows = pq.read_table(out_s3 / "manifest.parquet").to_pylist()
    assert {r["raster"] for r in rows} == {"A", "B"}  # scene names from the URIs, query string left out
    assert {r["raster_path"] for r in rows} == {bucket["A"], bucket["presigned_B"]}


def test_prepare_with_a_label_raster_on_s3(local, bucket, capsys):
    out_local, out_s3 = local["dir"] / "ds_local", local["dir"] / "ds_s3"
    for image, labels, out in ((local["A"], local["labels"], out_local), (bucket["A"], bucket["labels"], out_s3)):
        argv = ["--image", str(image), "--labels", str(labels).replace("s3://", "/vsis3/"), "--out", str(out),
                "--tile-size", str(T), "--block-size", "1"]  # fmt: skip
        code, err = run_prepare(argv, capsys)
        assert code == 0, err
    assert same_dataset(out_local, out_s3) >= 4


def test_predict_from_s3_vsis3_and_http_urls_equals_the_local_map(local, bucket, capsys):
    ckpt = known_unet_checkpoint(local["dir"] / "m.pt", C, scale=1.0, logvar_bias=0.5, target_mean=3.0)
    maps = {}
    sources = {
        "local": str(local["B"]),
        "s3": bucket["B"],
        "vsis3": bucket["B"].replace("s3://", "/vsis3/"),
        "presigned": bucket["presigned_B"],
        "public": bucket["public_B"],
    }
    for kind, src in sources.items():
        out = local["dir"] / f"map_{kind}.tif"
        code, err = run_predict(["--model", str(ckpt), "--image", src, "--out", str(out), "--tile-size", "32"], capsys)
        assert code == 0, err
        with rasterio.open(out) as ds:
            maps[kind] = ds.read()
    expected_mean = 3.0 + local["img"][0, :, W:]  # the known model: mean = target_mean + band 0
    np.testing.assert_allclose(maps["local"][0], expected_mean, rtol=1e-5)
    for kind in sources:
        np.testing.assert_array_equal(maps[kind], maps["local"], err_msg=kind)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("s3://{bucket}/in/nope.tif", "s3://{bucket}/in/nope.tif: image file not found"),
        ("/vsis3/{bucket}/in/nope.tif", "/vsis3/{bucket}/in/nope.tif: image file not found"),
        (
            "s3://no-such-bucket-zz/in/A.tif",
            "s3://no-such-bucket-zz/in/A.tif: the bucket no-such-bucket-zz does not exist",
        ),
        ("s3://{bucket}/in", "s3://{bucket}/in: is a folder (an S3 prefix), not a file"),
        ("s3://{bucket}/in/bad.parquet", "s3://{bucket}/in/bad.parquet: not a readable raster ("),
        ("{endpoint}/{bucket}/public/nope.tif", "{endpoint}/{bucket}/public/nope.tif: image file not found (HTTP 404)"),
        ("{endpoint}/{bucket}/in/B.tif", "{endpoint}/{bucket}/in/B.tif: access denied (HTTP response code: 403)"),
    ],
    ids=["s3-key", "vsis3-key", "bucket", "prefix", "not-a-raster", "https-404", "https-private"],
)
def test_remote_image_that_cannot_be_read_is_one_line(s3, local, bucket, capsys, image, message):
    ckpt = known_unet_checkpoint(local["dir"] / "m.pt", C)
    fill = {"bucket": bucket["name"], "endpoint": s3.endpoint}
    out = local["dir"] / "map.tif"
    code, err = run_predict(["--model", str(ckpt), "--image", image.format(**fill), "--out", str(out)], capsys)
    assert code == 2
    assert error_line(err).startswith(f"error: {message.format(**fill)}")
    assert not out.exists()


def test_unreachable_endpoint_and_exported_settings_win(s3, local, bucket, capsys, monkeypatch):
    ckpt = known_unet_checkpoint(local["dir"] / "m.pt", C)
    out = str(local["dir"] / "map.tif")
    # The user's own GDAL setting is kept: virtual hosting sends GDAL to BUCKET.127.0.0.1, which does not resolve.
    monkeypatch.setenv("AWS_VIRTUAL_HOSTING", "TRUE")
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "0")
    code, err = run_predict(["--model", str(ckpt), "--image", bucket["A"], "--out", out], capsys)
    assert code == 2
    assert error_line(err).startswith(f"error: {bucket['A']}: cannot reach the server (")
    monkeypatch.delenv("AWS_VIRTUAL_HOSTING")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    code, err = run_predict(["--model", str(ckpt), "--image", bucket["A"], "--out", out], capsys)
    assert code == 2
    assert "check the URL or AWS_ENDPOINT_URL" in error_line(err)


def test_wrong_credentials_are_one_line(s3, local, bucket, capsys, monkeypatch, auth_on):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    ckpt = known_unet_checkpoint(local["dir"] / "m.pt", C)
    code, err = run_predict(
        ["--model", str(ckpt), "--image", bucket["A"], "--out", str(local["dir"] / "m.tif")], capsys
    )
    assert code == 2
    line = error_line(err)
    assert line.startswith(f"error: {bucket['A']}: access denied; check AWS_ACCESS_KEY_ID"), line
    code, err = run_prepare(prepare_args([str(local["A"])], bucket["shots"], local["dir"] / "ds"), capsys)
    assert code == 2
    assert error_line(err).startswith(f"error: {bucket['shots']}: access denied; check AWS_ACCESS_KEY_ID")


@pytest.mark.parametrize(
    ("shots", "message"),
    [
        ("s3://{bucket}/in/nope.parquet", "s3://{bucket}/in/nope.parquet: GEDI points file not found"),
        (
            "s3://no-such-bucket-zz/s.parquet",
            "s3://no-such-bucket-zz/s.parquet: the bucket no-such-bucket-zz does not exist",
        ),
        ("s3://{bucket}/in/bad.parquet", "s3://{bucket}/in/bad.parquet: not a readable points table ("),
        ("https://h/s.parquet", "https://h/s.parquet: --gedi reads a local file or an s3:// (gs://, ...) URI, not"),
    ],
    ids=["missing", "bucket", "not-parquet", "https"],
)
def test_gedi_table_on_s3_that_cannot_be_read_is_one_line(local, bucket, capsys, shots, message):
    code, err = run_prepare(
        prepare_args([str(local["A"])], shots.format(bucket=bucket["name"]), local["dir"] / "d"), capsys
    )
    assert code == 2
    assert error_line(err).startswith(f"error: {message.format(bucket=bucket['name'])}")
    assert not (local["dir"] / "d").exists()
