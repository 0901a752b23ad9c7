"""bench/scene_stats.py: a new region's tiles normalised with their own band statistics, and BatchNorm statistics
re-estimated on them (AdaBN), for a U-Net ensemble and a forest; nothing retrained."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tune_agb.engine.config import TrainConfig
from tune_agb.engine.data import NormStats, TileSet
from tune_agb.engine.inference import Member, Predictor
from tune_agb.engine.model import UNet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import scene_stats as ss

BANDS, SIZE = 3, 16


def tiles(split: str, n: int, seed: int, shift: float = 0.0) -> TileSet:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, (n, BANDS, SIZE, SIZE)).astype(np.float32)
    y = np.full((n, SIZE, SIZE), np.nan, np.float32)
    y[:, ::3, ::3] = 10 + 4 * x[:, 0, ::3, ::3] + rng.normal(0, 1, (n, 6, 6))
    return TileSet(split=split, names=[f"{split}{i}" for i in range(n)], inputs=x + np.float32(shift), labels=y)


def predictor(seed: int = 0) -> Predictor:
    """A tiny U-Net fitted for a few steps to the tiles' labels (so that its output follows band 0)."""
    torch.manual_seed(seed)
    cfg = TrainConfig(in_channels=BANDS, base_channels=4, depth=2)
    model = UNet.from_config(cfg)
    norm = NormStats(mean=[0.0] * BANDS, std=[1.0] * BANDS, target_mean=10.0, target_std=4.0)
    train = tiles("train", 6, 2)
    x, y = torch.from_numpy(train.inputs), (torch.from_numpy(train.labels) - 10.0) / 4.0
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        mu, _ = model(x)
        loss = ((mu - y)[torch.isfinite(y)] ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return Predictor([Member(model.eval(), cfg, norm)], torch.device("cpu"))


def test_restat_swaps_the_band_statistics_and_keeps_the_target() -> None:
    norm = NormStats(mean=[1.0, 2.0], std=[3.0, 4.0], target_mean=10.0, target_std=2.0)
    own = NormStats(mean=[5.0, 6.0], std=[7.0, 8.0])
    assert ss.restat(norm, own, "trained") == norm
    assert ss.restat(norm, own, "own") == NormStats([5.0, 6.0], [7.0, 8.0], 10.0, 2.0)
    assert ss.restat(norm, own, "own_mean") == NormStats([5.0, 6.0], [3.0, 4.0], 10.0, 2.0)


def test_adabn_sets_batchnorm_statistics_to_the_new_tiles_and_leaves_the_model_alone() -> None:
    model = predictor().members[0].model
    first = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = first.running_mean.clone()
    batches = [torch.randn(2, BANDS, SIZE, SIZE) + 2.0 for _ in range(3)]
    seen = []
    adapted = ss.adabn(model, batches)
    a_first = next(m for m in adapted.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # what the first BatchNorm sees: the layers before it, run on the same batches
    hook = a_first.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].detach()))
    with torch.no_grad():
        for x in batches:
            adapted(x)
    hook.remove()
    feats = torch.cat(seen)
    # momentum=None: the plain average over batches of each batch's mean and (unbiased) variance
    batch_var = torch.stack([f.transpose(0, 1).flatten(1).var(1) for f in seen]).mean(0)
    assert not adapted.training and not a_first.training
    torch.testing.assert_close(a_first.running_mean, feats.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a_first.running_var, batch_var, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first.running_mean, before)  # the run's own model is untouched


def test_own_statistics_undo_a_shift_of_the_new_tiles_for_the_unet_and_the_forest() -> None:
    p = predictor()
    plain, shifted = tiles("test", 4, 1), tiles("test", 4, 1, shift=3.0)
    a, b = ss.unet_rows(p, plain), ss.unet_rows(p, shifted)
    for mode in ("own", "own_mean"):
        for key in ("rmse", "bias"):
            assert b[mode][key] == pytest.approx(a[mode][key], rel=1e-4, abs=1e-4), (mode, key)
    moved = abs(b["trained"]["bias"] - a["trained"]["bias"])
    assert moved > 0.5  # the shift does move the predictions under the trained normalisation
    # AdaBN takes most of the shift out (not all: the convolutions' zero padding sees it at the tiles' edges)
    assert abs(b["adabn"]["bias"] - a["adabn"]["bias"]) < moved / 4
    assert a["trained"]["n"] == int(np.isfinite(plain.labels).sum())
    train = tiles("train", 6, 2)
    fa, fb = ss.forest_rows(train, plain)[0], ss.forest_rows(train, shifted)[0]
    assert fb["own_mean"]["rmse"] == pytest.approx(fa["own_mean"]["rmse"], rel=1e-6)
    assert fb["trained"]["rmse"] > fa["trained"]["rmse"] + 0.5
