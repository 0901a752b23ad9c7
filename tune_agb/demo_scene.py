"""The synthetic demo scene as a user would have it: a GeoTIFF stack and a table of GEDI shots.

:func:`write_demo_scene` writes a scene made by :func:`tune_agb.demo_data.synth_scene` into one folder:

- ``scene.tif``: its 14-band Sentinel-1/2 stack (float32, band descriptions B1 ... B12 VV VH, NaN nodata under the
  clouds) on a 10 m UTM grid (EPSG:32647, central Thailand by default);
- ``gedi_shots.parquet``: one row per GEDI shot with GEDI L4A's column names ``lon_lowestmode``,
  ``lat_lowestmode`` (EPSG:4326 degrees), ``agbd`` (Mg/ha) and ``l4_quality_flag`` (1 good, 0 flagged);
- ``agb_truth.tif``: the true biomass (Mg/ha) the shots were sampled from, to judge a predicted map.

``python -m tune_agb.demo --scene --out DIR`` calls it. This module does not import :mod:`tune_agb.demo` (the
scene is passed in), so the numpy-only demo can import it lazily for ``--scene`` without an import cycle.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import transform as warp_points

from tune_agb.bands import BAND_NAMES

if TYPE_CHECKING:  # annotations only: tune_agb.demo_data imports this module (for --scene), not the other way round
    from tune_agb.demo_data import Scene

DEMO_CRS = "EPSG:32647"  # WGS 84 / UTM zone 47N
DEMO_ORIGIN = (600_000.0, 1_650_000.0)  # upper-left corner (m), about 100.0 E, 14.9 N
DEMO_RESOLUTION = 10.0  # m per pixel
SCENE_FILE = "scene.tif"
SHOTS_FILE = "gedi_shots.parquet"
TRUTH_FILE = "agb_truth.tif"


def scene_transform(origin: tuple[float, float] = DEMO_ORIGIN, resolution: float = DEMO_RESOLUTION) -> Affine:
    """North-up affine transform: pixel (col, row) -> map (x, y) in metres."""
    return Affine(resolution, 0.0, origin[0], 0.0, -resolution, origin[1])


def shots_table(scene: Scene, transform: Affine, crs: str) -> pa.Table:
    """The scene's shots at their map positions, as lon/lat (EPSG:4326) in GEDI L4A column names."""
    x, y = transform @ (scene.shot_col, scene.shot_row)
    lon, lat = warp_points(CRS.from_user_input(crs), CRS.from_epsg(4326), np.asarray(x), np.asarray(y))
    return pa.table(
        {
            "shot_number": pa.array(np.arange(scene.shot_value.size, dtype=np.int64)),
            "lon_lowestmode": pa.array(np.asarray(lon, dtype=np.float64)),
            "lat_lowestmode": pa.array(np.asarray(lat, dtype=np.float64)),
            "agbd": pa.array(scene.shot_value.astype(np.float32)),
            "l4_quality_flag": pa.array(scene.shot_quality.astype(np.int8)),
        }
    )


def write_demo_scene(
    out: str | Path,
    scene: Scene,
    crs: str = DEMO_CRS,
    origin: tuple[float, float] = DEMO_ORIGIN,
    resolution: float = DEMO_RESOLUTION,
) -> dict[str, Path]:
    """Write ``scene.tif``, ``gedi_shots.parquet`` and ``agb_truth.tif`` of ``scene`` (e.g.
    ``synth_scene(512, 384)``: 512 x 384 px), its upper-left corner at ``origin`` in ``crs``.

    Returns:
        Paths by kind: ``image``, ``shots``, ``truth``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    height, width = scene.agb.shape
    transform = scene_transform(origin, resolution)
    profile = {
        "driver": "GTiff",
        "dtype": "float32",
        "height": height,
        "width": width,
        "crs": crs,
        "transform": transform,
        "nodata": float("nan"),
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "predictor": 3,
    }
    paths = {"image": out / SCENE_FILE, "shots": out / SHOTS_FILE, "truth": out / TRUTH_FILE}
    with rasterio.open(paths["image"], "w", count=scene.image.shape[0], **profile) as dst:
        dst.write(scene.image)
        for i, name in enumerate(BAND_NAMES, start=1):
            dst.set_band_description(i, name)
    with rasterio.open(paths["truth"], "w", count=1, **profile) as dst:
        dst.write(scene.agb[None])
        dst.set_band_description(1, "agb")
    pq.write_table(shots_table(scene, transform, crs), paths["shots"])
    return paths
