"""Helpers for the raster tests: real GeoTIFFs written with rasterio, GEDI-like shot tables, and real checkpoints
of U-Nets whose weights are set by hand so that their output is known exactly."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
import torch
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.warp import transform as warp_points

from tune_agb.engine.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
from tune_agb.engine.config import TrainConfig
from tune_agb.engine.data import NormStats
from tune_agb.engine.model import UNet

CRS_UTM = "EPSG:32647"
ORIGIN = (600_000.0, 1_650_000.0)


def grid_transform(res: float = 10.0, origin: tuple[float, float] = ORIGIN) -> Affine:
    return Affine(res, 0.0, origin[0], 0.0, -res, origin[1])


def write_tif(
    path: Path,
    data: np.ndarray,
    transform: Affine | None = None,
    crs: str | None = CRS_UTM,
    nodata: float | None = float("nan"),
    descriptions: Sequence[str] | None = None,
) -> Path:
    """Write a (C, H, W) array as a GeoTIFF (no CRS / transform when ``crs`` is None)."""
    c, h, w = data.shape
    profile = {"driver": "GTiff", "dtype": data.dtype.name, "count": c, "height": h, "width": w, "nodata": nodata}
    if crs is not None:
        profile.update(crs=crs, transform=transform or grid_transform())
    with warnings.catch_warnings():
        if crs is None:  # wanted here: the bad input the commands must refuse
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
            for i, d in enumerate(descriptions or [], start=1):
                dst.set_band_description(i, d)
    return path


def pixel_lonlat(
    rows: np.ndarray, cols: np.ndarray, transform: Affine | None = None, crs: str = CRS_UTM
) -> tuple[np.ndarray, np.ndarray]:
    """lon/lat (EPSG:4326) of fractional pixel positions (row, col) on a grid (default: the UTM test grid)."""
    x, y = (transform or grid_transform()) @ (np.asarray(cols, float), np.asarray(rows, float))
    lon, lat = warp_points(CRS.from_user_input(crs), CRS.from_epsg(4326), np.asarray(x), np.asarray(y))
    return np.asarray(lon), np.asarray(lat)


def write_shots(path: Path, columns: dict[str, np.ndarray]) -> Path:
    table = pa.table({k: pa.array(v) for k, v in columns.items()})
    if path.suffix == ".csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return path


def known_unet_checkpoint(
    path: Path,
    in_channels: int,
    scale: float = 1.0,
    logvar_bias: float = 0.0,
    target_mean: float = 0.0,
    target_std: float = 1.0,
) -> Path:
    """A real checkpoint of a depth-1 U-Net wired by hand to output mean = scale * band 0 (for band 0 >= 0).

    The only non-zero weights pass band 0 through the first DoubleConv, the skip connection, the decoder
    DoubleConv and the head; the downsampling path is all zeros. With norm stats mean 0 / std 1 the predicted
    mean (label units) is ``target_std * scale * x0 + target_mean`` and the std ``target_std * exp(logvar / 2)``
    with ``logvar = -10 + 20 * sigmoid(logvar_bias)``.
    """
    cfg = TrainConfig(in_channels=in_channels, base_channels=4, depth=1, norm="none", amp="none", channels_last=False)
    model = UNet.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.inc[0].weight[0, 0, 1, 1] = 1.0
        model.inc[3].weight[0, 0, 1, 1] = 1.0
        up = model.ups[0]
        skip0 = up.conv[0].weight.shape[1] - 4  # the skip's channels follow the upsampled ones
        up.conv[0].weight[0, skip0, 1, 1] = 1.0
        up.conv[3].weight[0, 0, 1, 1] = 1.0
        model.head.weight[0, 0, 0, 0] = scale
        model.head.bias[1] = logvar_bias
    return _save(path, cfg, model, NormStats([0.0] * in_channels, [1.0] * in_channels, target_mean, target_std))


def random_unet_checkpoint(path: Path, in_channels: int, depth: int, base_channels: int = 4, seed: int = 0) -> Path:
    """A real checkpoint of a U-Net with random weights (and random batch-norm statistics), predicting AGB-like
    values (target mean 120, std 60): a model with real spatial context, nothing trained."""
    torch.manual_seed(seed)
    cfg = TrainConfig(in_channels=in_channels, base_channels=base_channels, depth=depth, norm="batch", amp="none")
    model = UNet.from_config(cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return _save(path, cfg, model, NormStats([0.0] * in_channels, [1.0] * in_channels, 120.0, 60.0))


def _save(path: Path, cfg: TrainConfig, model: UNet, norm: NormStats) -> Path:
    state = {
        "format": CHECKPOINT_FORMAT,
        "epoch": 1,
        "config": cfg.to_dict(),
        "norm": norm.to_dict(),
        "model": model.state_dict(),
        "optimizer": {},
        "scheduler": {},
        "scaler": {},
        "rng": {},
        "history": [],
        "best": {"epoch": 1, "val_rmse": 0.0},
    }
    save_checkpoint(state, path)
    return path


def known_logvar(bias: float) -> float:
    return -10.0 + 20.0 / (1.0 + np.exp(-bias))
