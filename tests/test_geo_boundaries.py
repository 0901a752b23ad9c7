"""Import boundaries of the GeoTIFF side: geo and prepare load neither Ray nor torch, the demo loads neither
rasterio nor Ray, and demo_scene does not import the demo back (each checked in a fresh interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


def loaded_after(*modules: str) -> set[str]:
    """Top-level names of everything in ``sys.modules`` after importing ``modules`` in a fresh interpreter."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {list(modules)!r}:\n"
        "    importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.splitlines()[-1]))


def top_level(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


@pytest.mark.parametrize(
    ("modules", "forbidden"),
    [
        (("tune_agb.geo.raster", "tune_agb.geo.tiling", "tune_agb.prepare"), {"ray", "torch"}),
        (("tune_agb.geo.tiling",), {"ray", "torch", "rasterio", "pyarrow"}),
        (("tune_agb.demo", "tune_agb.demo_data"), {"ray", "rasterio", "torch"}),
    ],
    ids=["geo+prepare", "tiling", "demo"],
)
def test_imports_stay_on_their_side(modules, forbidden):
    assert not top_level(loaded_after(*modules)) & forbidden


def test_demo_scene_does_not_import_the_demo():
    """demo imports demo_scene (lazily, for --scene); demo_scene must not import the demo back."""
    assert not {"tune_agb.demo", "tune_agb.demo_data"} & loaded_after("tune_agb.demo_scene")
