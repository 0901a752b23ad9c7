"""Test-time input statistics on a region not trained on (issue 31): does normalising the new region's bands with its
own statistics, or re-estimating the U-Net's BatchNorm statistics on its tiles (AdaBN), take out the transfer bias?
Nothing is retrained: finished runs of ``bench/region_transfer.py`` are scored again.

    python bench/scene_stats.py --data /work/rt/ba/data --runs /work/rt/ba/runs/recipe_s0 [...] \
        [--forest-seeds 0,1] [--json FILE]

``--data`` is a direction's layout (``ab/data``: train and val of one region, test = every tile of the other). Each
mode changes how the test tiles are normalised, and nothing else:

- ``trained``: the model's own normalisation (the train split's band statistics), what ``predict`` does;
- ``own``: the test tiles' band means and standard deviations (over all their pixels) in place of the train split's;
- ``own_mean``: the test tiles' band means, the train split's standard deviations;
- ``adabn`` (U-Nets only): the trained normalisation, then every BatchNorm layer's running mean and variance
  re-estimated on the test tiles (a copy of each member; the run is not touched).

U-Net runs are scored as their ensembles predict (``Predictor``); the forests are
``tune_agb.baseline.RandomForest`` fitted on the labelled train pixels (train statistics), one per ``--forest-seeds``
seed. Every row gives the RMSE and the bias (mean of prediction − label) on the test tiles' labelled pixels.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tune_agb.baseline import RandomForest, labelled_pixels
from tune_agb.engine.data import NormStats, TileSet, compute_norm_stats, load_split
from tune_agb.engine.inference import Member, Predictor, load_predictor

UNET_MODES = ("trained", "own", "own_mean", "adabn")
FOREST_MODES = ("trained", "own", "own_mean")
BATCH = 4  # tiles per forward pass


def restat(norm: NormStats, own: NormStats, mode: str) -> NormStats:
    """``norm`` with its band statistics replaced by ``own``'s as ``mode`` says (the target's are kept)."""
    if mode == "own":
        return replace(norm, mean=list(own.mean), std=list(own.std))
    if mode == "own_mean":
        return replace(norm, mean=list(own.mean))
    return norm


@torch.no_grad()
def adabn(model: torch.nn.Module, batches: list[torch.Tensor]) -> torch.nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are those of ``batches`` (normalised inputs), averaged
    over all of them with equal weight per batch (``momentum=None``); in eval mode."""
    model = copy.deepcopy(model)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.eval()
    for m in norms:
        m.train()
    for x in batches:
        model(x)
    return model.eval()


def _score(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    err = pred - y
    return {"rmse": float(np.sqrt(np.mean(err**2))), "bias": float(np.mean(err)), "n": int(y.size)}


def unet_rows(predictor: Predictor, test: TileSet, modes: tuple[str, ...] = UNET_MODES) -> dict[str, dict[str, float]]:
    """The ensemble's RMSE and bias on the labelled pixels of ``test`` under each mode: its members with their
    normalisation (and, for ``adabn``, their BatchNorm statistics) changed, predicting as ``Predictor`` does."""
    own = compute_norm_stats(test, standardize_target=False)
    x_raw = torch.as_tensor(np.asarray(test.inputs, dtype=np.float32))
    labels = np.asarray(test.labels, dtype=np.float32)
    mask = np.isfinite(labels)
    chunks = [x_raw[i : i + BATCH] for i in range(0, len(x_raw), BATCH)]
    out = {}
    for mode in modes:
        members = []
        for m in predictor.members:
            norm = restat(m.norm, own, mode)
            model = adabn(m.model, [norm.normalize(x) for x in chunks]) if mode == "adabn" else m.model
            members.append(Member(model, m.config, norm, m.margin))
        changed = Predictor(members, predictor.device)
        mean = torch.cat([changed.predict(x)[0] for x in chunks])
        out[mode] = _score(mean.cpu().numpy()[mask], labels[mask])
    return out


def forest_rows(
    train: TileSet, test: TileSet, seeds: tuple[int, ...] = (0,), modes: tuple[str, ...] = FOREST_MODES
) -> dict[int, dict[str, dict[str, float]]]:
    """Per seed, a random forest fitted on ``train``'s labelled pixels (train statistics), scored on ``test`` in each
    mode (the pixels of each split are read once for all seeds)."""
    norm = compute_norm_stats(train, standardize_target=False)
    own = compute_norm_stats(test, standardize_target=False)
    px = labelled_pixels(train, norm)
    tests = {mode: labelled_pixels(test, restat(norm, own, mode)) for mode in modes}
    out = {}
    for seed in seeds:
        forest = RandomForest(seed=seed).fit(px.x, px.y)
        out[seed] = {mode: _score(forest.predict(tp.x)[0], tp.y) for mode, tp in tests.items()}
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a direction's layout: inputs/ and labels/ with train, val, test")
    p.add_argument("--runs", nargs="*", default=[], help="finished U-Net runs (final_train out dirs)")
    p.add_argument("--forest-seeds", default="", help="comma-separated seeds of forests to fit and score")
    p.add_argument("--json", help="also write the rows to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(2)
    data = Path(a.data)
    test = load_split(data / "inputs", data / "labels", "test")
    rows: list[dict[str, Any]] = []
    for run in a.runs:
        got = unet_rows(load_predictor(run, "cpu"), test)
        rows += [{"model": Path(run).name, "mode": k} | v for k, v in got.items()]
    if a.forest_seeds:
        train = load_split(data / "inputs", data / "labels", "train")
        seeds = tuple(int(s) for s in a.forest_seeds.split(","))
        for seed, got in forest_rows(train, test, seeds).items():
            rows += [{"model": f"rf_s{seed}", "mode": k} | v for k, v in got.items()]
    print("| model | " + " | ".join(UNET_MODES) + " |\n|---|" + "---|" * len(UNET_MODES))
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = {r["mode"]: r for r in rows if r["model"] == model}
        cells = [f"{mine[m]['rmse']:.2f} ({mine[m]['bias']:+.2f})" if m in mine else "–" for m in UNET_MODES]
        print(f"| {model} | " + " | ".join(cells) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0 if rows and all(np.isfinite(r["rmse"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
