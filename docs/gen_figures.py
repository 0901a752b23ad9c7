"""Write the documentation's figures into docs/figures/ from a real run on the demo data.

Regenerate them (about 4 minutes on 2 CPU cores; needs the package installed and Debian's ``chromium`` for the
report page screenshot) from the repository root, then commit the PNGs:

    python docs/gen_figures.py

It runs, in a temporary folder, what the tutorial shows: a small demo search (8 trials), the final training of its
best configuration, the demo scene and the map of it. Everything runs with relative paths in that folder, with the
demo tiles cached there too (``TUNE_AGB_CACHE=cache``); the report page names its data folders by absolute path, so
the page is screenshotted with that folder's path cut from it: no path of this machine appears in a figure. The PNGs
are stored with a 256-colour palette to keep them small. Writes:

- ``report.png``: the final run's report page, as headless Chromium renders it;
- ``search-curves.png``: validation RMSE per epoch of every trial of the search (from its ``results.parquet``);
- ``demo-map.png``: the predicted mean biomass of the demo scene next to its true biomass.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "figures"


def sh(*args: str, cwd: Path) -> None:
    """Run ``python -m ARGS`` in ``cwd`` with the repository importable; stop on failure."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env["TUNE_AGB_CACHE"] = str(cwd / "cache")
    print("$ python -m", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, check=True)


def search_curves(results: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tune_agb.location import read_table

    table = read_table(str(results))
    assert table is not None, results
    df = table.to_pandas()
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    best = df.loc[df["val_rmse"].idxmin(), "trial_id"]
    for trial_id, g in df.groupby("trial_id"):
        g = g.sort_values("epoch")
        is_best = trial_id == best
        ax.plot(
            g["epoch"],
            g["val_rmse"],
            marker="o",
            ms=3,
            lw=2.2 if is_best else 1,
            alpha=1 if is_best else 0.6,
            color="C3" if is_best else "C0",
            label=f"best trial {best}" if is_best else None,
        )
        ax.plot(g["epoch"].iloc[-1], g["val_rmse"].iloc[-1], "x", color="k", ms=5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation RMSE (Mg/ha)")
    ax.set_title("demo search: one line per trial, x where ASHA stopped it or it ended")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def demo_map(pred: Path, truth: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import rasterio

    with rasterio.open(pred) as src:
        mean, std = src.read(1), src.read(2)
    with rasterio.open(truth) as src:
        true = src.read(1)
    vmax = float(np.nanpercentile(true, 99))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), dpi=80)
    for ax, (title, img, cmap, top) in zip(
        axes,
        [
            ("true biomass", true, "viridis", vmax),
            ("predicted mean", mean, "viridis", vmax),
            ("predicted std", std, "magma", float(np.nanpercentile(std, 99))),
        ],
        strict=True,
    ):
        im = ax.imshow(img, cmap=cmap, vmin=0, vmax=top)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, shrink=0.8, label="Mg/ha")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def screenshot(page: Path, png: Path, work: Path) -> None:
    """Headless Chromium's view of ``page`` with the path of ``work`` cut from its text."""
    shown = work / "shown.html"
    shown.write_text(page.read_text().replace(f"{work}/", "").replace(str(work), "."))
    page = shown
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is not installed: apt-get install chromium")
    args = ["--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={work / 'chromium'}"]
    args += ["--window-size=1280,1600", "--hide-scrollbars", f"--screenshot={png}", page.as_uri()]
    subprocess.run([chromium, *args], check=True, capture_output=True, timeout=120)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tune_agb_figures_") as tmp:
        work = Path(tmp)
        space = str(REPO / "search_spaces" / "demo.yaml")
        sh(
            "tune_agb.search",
            "--space",
            space,
            "--storage",
            "ray_results",
            "--name",
            "demo",
            "--num-samples",
            "8",
            "--set",
            "scheduler.brackets=1",
            cwd=work,
        )
        sh("tune_agb.final_train", "--experiment", "ray_results/demo", "--out-dir", "runs/demo-final", cwd=work)
        sh("tune_agb.demo", "--scene", "--out", "demo_scene", cwd=work)
        sh(
            "tune_agb.predict",
            "--model",
            "runs/demo-final",
            "--image",
            "demo_scene/scene.tif",
            "--out",
            "demo_agb.tif",
            cwd=work,
        )
        search_curves(work / "ray_results" / "demo" / "results.parquet", OUT / "search-curves.png")
        demo_map(work / "demo_agb.tif", work / "demo_scene" / "agb_truth.tif", OUT / "demo-map.png")
        screenshot(work / "runs" / "demo-final" / "report" / "index.html", OUT / "report.png", work)
    from PIL import Image

    for png in sorted(OUT.glob("*.png")):
        with Image.open(png) as img:
            small = img.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        small.save(png, optimize=True)
        print(f"{png.relative_to(REPO)}: {png.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
