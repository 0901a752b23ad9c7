"""The weight average (``ema_decay``): its arithmetic, and what training does with it (validates, checkpoints and
predicts with the average; resumes with both weights)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from tune_agb.engine.checkpoint import load_checkpoint, save_checkpoint
from tune_agb.engine.config import TrainConfig, config_from_dict
from tune_agb.engine.data import SplitFeed, TileSet, load_dataset
from tune_agb.engine.ema import WeightAverage, lerp_all
from tune_agb.engine.inference import member_from_state
from tune_agb.engine.train import EpochReport, StopTraining, evaluate_split, train
from tune_agb.errors import TuneAgbError

TINY = {"base_channels": 4, "depth": 2, "batch_size": 3, "epochs": 3, "lr": 3e-3}


@pytest.fixture(scope="module")
def tiles(tiny_data: Path) -> dict[str, TileSet]:
    return load_dataset(tiny_data / "inputs", tiny_data / "labels", splits=("train", "val"))


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))


def _set(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            t.fill_(value if t.is_floating_point() else int(value))


def test_lerp_all_is_one_lerp_per_tensor() -> None:
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g, dtype=torch.float64)]
    b = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g, dtype=torch.float64)]
    want = [x.lerp(y, 0.3) for x, y in zip(a, b, strict=True)]
    lerp_all(a, b, 0.3)
    for got, w in zip(a, want, strict=True):
        torch.testing.assert_close(got, w)


def test_average_is_a_plain_mean_at_first_then_exponential() -> None:
    """Weights set to 1, 2, 3, ... before each update: the average is their running mean until 1 / t falls below
    1 - decay (t = 4 at decay 0.75), then it moves by a quarter of the gap each step. Buffers (BatchNorm's running
    statistics) are averaged too; the integer batch counter is copied."""
    model = _net()
    avg = WeightAverage(model, decay=0.75)
    want = None
    for t in range(1, 8):
        _set(model, float(t))
        avg.update(model)
        want = t / 2 + 0.5 if t <= 4 else want + 0.25 * (t - want)
        for name, v in avg.model.state_dict().items():
            if v.is_floating_point():
                assert torch.allclose(v, torch.full_like(v, want)), (t, name)
            else:
                assert int(v) == t, name
    assert avg.steps == 7
    assert not any(p.requires_grad for p in avg.model.parameters())


def test_zero_decay_follows_the_model_and_decay_one_is_refused() -> None:
    model = _net()
    avg = WeightAverage(model, decay=0.0)
    for t in (3.0, -2.0):
        _set(model, t)
        avg.update(model)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in avg.model.state_dict().items())
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        WeightAverage(model, decay=1.0)


@pytest.mark.parametrize(("key", "value"), [("ema_decay", 1.0), ("ema_decay", -0.1)])
def test_config_range_errors_name_the_key(key: str, value: float) -> None:
    with pytest.raises(TuneAgbError, match=rf"'{key}' must be"):
        config_from_dict({key: value})


def test_training_validates_and_checkpoints_the_average(tiles: dict[str, TileSet], tmp_path: Path) -> None:
    """With ema_decay, each epoch's val metrics are the average's; the checkpoint's ``model`` is the average (so
    every reader of checkpoints predicts with it) and ``train_model`` the trained weights; the run differs from one
    without it."""
    cfg = TrainConfig(**TINY, ema_decay=0.6)
    states: list[dict] = []
    res = train(cfg, tiles, device="cpu", progress=False, on_epoch=lambda r: states.append(r.state()))
    plain = train(TrainConfig(**TINY), tiles, device="cpu", progress=False)
    assert [h["val_rmse"] for h in res.history] != [h["val_rmse"] for h in plain.history]
    # the run's training itself is the same: only what is validated differs
    assert [h["train_loss"] for h in res.history] == pytest.approx([h["train_loss"] for h in plain.history])
    path = tmp_path / "ckpt.pt"
    save_checkpoint(states[-1], path)
    state = load_checkpoint(path)
    steps = sum(1 for _ in range(0, len(tiles["train"]), cfg.batch_size)) * cfg.epochs
    assert state["ema_steps"] == steps
    assert any(not torch.equal(v, state["train_model"][k]) for k, v in state["model"].items())
    for k, v in res.model.state_dict().items():  # the result's model is the average
        assert torch.equal(v, state["model"][k])

    def val_rmse(weights: dict) -> float:
        member = member_from_state({**state, "model": weights, "seam_margin": 0}, torch.device("cpu"))
        feed = SplitFeed(tiles["val"], member.norm, torch.device("cpu"), "stream")
        return evaluate_split(member.model, feed, cfg, member.norm, 3, None, keep=()).metrics["rmse"]

    assert val_rmse(state["model"]) == pytest.approx(res.history[-1]["val_rmse"], rel=1e-5)
    assert val_rmse(state["train_model"]) != pytest.approx(res.history[-1]["val_rmse"], rel=1e-3)


def test_a_plain_checkpoint_resumed_with_an_average_starts_it_there(tiles: dict[str, TileSet], tmp_path: Path) -> None:
    """Switching the average on at resume: the trained weights go on from the checkpoint's, the average starts from
    them (step count 0), and the run finishes with both in its checkpoint."""
    cfg = TrainConfig(**TINY)

    def stop_at_1(report: EpochReport) -> None:
        save_checkpoint(report.state(), tmp_path / "c.pt")
        raise StopTraining("stop")

    train(cfg, tiles, device="cpu", progress=False, on_epoch=stop_at_1)
    first = load_checkpoint(tmp_path / "c.pt")
    assert "train_model" not in first and "ema_steps" not in first
    states: list[dict] = []
    rest = train(cfg.replace(ema_decay=0.5), tiles, device="cpu", progress=False, resume=first,
                 on_epoch=lambda r: states.append(r.state()))  # fmt: skip
    assert [h["epoch"] for h in rest.history] == [1, 2, 3]
    per_epoch = sum(1 for _ in range(0, len(tiles["train"]), cfg.batch_size))
    assert states[-1]["ema_steps"] == 2 * per_epoch
    assert all(math.isfinite(h["val_rmse"]) for h in rest.history)
