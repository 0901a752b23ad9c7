"""``python -m tune_agb.demo``: write the synthetic demo dataset (tiles) or its scene (GeoTIFF + GEDI shots).

The dataset itself is made by :mod:`tune_agb.demo_data`, which every command uses when no data folders are given.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from pathlib import Path

from tune_agb.demo_data import DEFAULT_GRID, DEFAULT_SEED, DEFAULT_TILE, synth_scene, write_demo_dataset
from tune_agb.errors import TuneAgbError, run_cli

DESCRIPTION = "Write the synthetic Sentinel-1/2 + GEDI demo dataset (tiles) or its scene."


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tune_agb.demo",
        description="Write the synthetic Sentinel-1/2 + GEDI demo dataset (tiles) or its scene.",
    )
    p.add_argument("--out", required=True, help="folder to write the tile dataset into")
    p.add_argument("--tile-size", type=int, default=DEFAULT_TILE)
    p.add_argument("--grid", type=int, nargs=2, default=DEFAULT_GRID, metavar=("ROWS", "COLS"))
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--scene",
        action="store_true",
        help="write the scene (GRID x TILE_SIZE px) as scene.tif + gedi_shots.parquet + agb_truth.tif instead of tiles",
    )
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.exists() and any(out.iterdir()) and not a.overwrite:
        raise TuneAgbError(f"{out}: folder is not empty (use --overwrite to replace its tiles)")
    if a.tile_size < 8:
        raise TuneAgbError(f"--tile-size: must be >= 8, got {a.tile_size}")
    if a.scene:
        from tune_agb.demo_scene import write_demo_scene  # rasterio is needed only here (demo_scene imports no demo)

        paths = write_demo_scene(out, synth_scene(a.grid[0] * a.tile_size, a.grid[1] * a.tile_size, a.seed))
        print(f"demo scene written: {paths['image']}, {paths['shots']}, {paths['truth']}")
        return 0
    for kind in ("inputs", "labels"):
        shutil.rmtree(out / kind, ignore_errors=True)
    write_demo_dataset(out, a.tile_size, tuple(a.grid), a.seed)
    print(f"demo dataset written to {out}/inputs and {out}/labels")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
