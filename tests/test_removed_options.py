"""Options removed in tune_agb 0.2 (measured no gain, bench/RESULTS.md): old config files and checkpoints load when
they held them at their neutral value, and fail with one line naming the key otherwise, through the loaders the
product uses (config files, checkpoints, init_weights, resume, the predictor)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tune_agb.engine.checkpoint import load_checkpoint, load_checkpoint_bytes, save_checkpoint
from tune_agb.engine.config import REMOVED_KEYS, TrainConfig, config_from_dict, load_config
from tune_agb.engine.data import TileSet, load_dataset
from tune_agb.engine.folds_loop import folds_state
from tune_agb.engine.inference import load_predictor
from tune_agb.engine.train import train
from tune_agb.errors import TuneAgbError

TINY = {"base_channels": 4, "depth": 2, "batch_size": 3, "epochs": 1, "lr": 3e-3}
# What the engine of tune_agb 0.1 wrote for each removed key when it was off.
OLD_NEUTRAL = {"nll_beta": 0.0, "aug_gain": 0.0, "aug_offset": 0.0, "band_dropout": 0.0, "ema_decay": 0.0,
               "texture_windows": ""}  # fmt: skip
# A value of each that changed the model or its training.
OLD_ACTIVE = {"nll_beta": 1.0, "aug_gain": 0.2, "aug_offset": 0.5, "band_dropout": 0.2, "ema_decay": 0.9,
              "texture_windows": "3,7,15"}  # fmt: skip


@pytest.fixture(scope="module")
def tiles(tiny_data: Path) -> dict[str, TileSet]:
    return load_dataset(tiny_data / "inputs", tiny_data / "labels", splits=("train", "val"))


@pytest.fixture(scope="module")
def state(tiles: dict[str, TileSet]) -> dict[str, Any]:
    """A checkpoint after one epoch, as the engine writes it."""
    states: list[dict[str, Any]] = []
    train(TrainConfig(**TINY), tiles, device="cpu", progress=False, on_epoch=lambda r: states.append(r.state()))
    return states[0]


def _old(state: dict[str, Any], **config: Any) -> dict[str, Any]:
    """``state`` as tune_agb 0.1 wrote it: its config with every removed key, overridden by ``config``."""
    return {**state, "config": {**state["config"], **OLD_NEUTRAL, **config}}


def test_the_removed_keys_are_those_measured() -> None:
    assert REMOVED_KEYS == OLD_NEUTRAL
    assert not set(REMOVED_KEYS) & set(TrainConfig().to_dict())


def test_an_old_config_with_the_removed_keys_off_loads_as_today(tmp_path: Path) -> None:
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({**OLD_NEUTRAL, "lr": 1e-3, "aug_gain": 0}))  # an integer 0 is off too
    assert load_config(path) == TrainConfig(lr=1e-3)
    assert config_from_dict({**OLD_NEUTRAL, "texture_windows": " "}) == TrainConfig()


@pytest.mark.parametrize("key", sorted(OLD_ACTIVE))
def test_an_old_config_that_used_a_removed_key_is_one_line_naming_it(key: str, tmp_path: Path) -> None:
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"lr": 1e-3, key: OLD_ACTIVE[key]}))
    with pytest.raises(TuneAgbError) as info:
        load_config(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path}: '{key}' was removed in tune_agb 0.2")
    assert f"this config uses {key}={OLD_ACTIVE[key]!r}" in msg and "bench/RESULTS.md" in msg


def test_an_old_checkpoint_with_the_removed_keys_off_loads_resumes_and_predicts(
    state: dict[str, Any], tiles: dict[str, TileSet], tmp_path: Path
) -> None:
    path = tmp_path / "old.pt"
    save_checkpoint(_old(state), path)
    loaded = load_checkpoint(path)
    assert loaded["config"] == state["config"]
    assert load_checkpoint_bytes(path.read_bytes(), "old.pt")["config"] == state["config"]
    cfg = TrainConfig(**{**TINY, "epochs": 2})
    resumed = train(cfg, tiles, device="cpu", progress=False, resume=loaded)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    predictor = load_predictor(path, device="cpu")
    mean, std = predictor.predict(torch.zeros(1, cfg.in_channels, 16, 16))
    assert mean.shape == std.shape == (1, 16, 16) and torch.isfinite(mean).all()
    # a run started from it (init_weights) takes its weights
    start = train(cfg.replace(init_weights=str(path), epochs=1, lr=1e-12), tiles, device="cpu", progress=False)
    w = "inc.0.weight"
    torch.testing.assert_close(start.model.state_dict()[w], state["model"][w], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("key", sorted(OLD_ACTIVE))
def test_an_old_checkpoint_that_used_a_removed_key_fails_in_every_loader(
    key: str, state: dict[str, Any], tiles: dict[str, TileSet], tmp_path: Path
) -> None:
    path = tmp_path / "old.pt"
    old = _old(state, **{key: OLD_ACTIVE[key]})
    if key == "ema_decay":  # a weight average's checkpoint also held the trained weights and the step count
        old |= {"train_model": state["model"], "ema_steps": 3}
    save_checkpoint(old, path)
    want = rf"^{path}: '{key}' was removed in tune_agb 0.2 .*this checkpoint uses {key}="
    for load in (
        lambda: load_checkpoint(path),
        lambda: load_predictor(path, device="cpu"),
        lambda: train(TrainConfig(**TINY, init_weights=str(path)), tiles, device="cpu", progress=False),
    ):
        with pytest.raises(TuneAgbError, match=want):
            load()


def test_a_cross_validation_checkpoint_names_the_fold_that_used_a_removed_key(
    state: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "folds.pt"
    cfg = TrainConfig(**TINY)
    save_checkpoint(folds_state(cfg, [_old(state), _old(state)], [], {"epoch": 0, "val_rmse": 1.0}), path)
    assert [f["config"] for f in load_checkpoint(path)["folds"]] == [state["config"]] * 2
    save_checkpoint(folds_state(cfg, [_old(state), _old(state, ema_decay=0.9)], [], {}), path)
    with pytest.raises(TuneAgbError, match=rf"^{path} fold 1: 'ema_decay' was removed"):
        load_checkpoint(path)


def test_a_pretrained_trunk_is_refused_with_one_line(state: dict[str, Any], tmp_path: Path) -> None:
    """tune_agb.pretrain's output (no head, a 'pretrain' record) was removed with the command."""
    path = tmp_path / "trunk.pt"
    trunk = {k: v for k, v in state["model"].items() if not k.startswith("head.")}
    save_checkpoint({**_old(state), "model": trunk, "pretrain": {"steps": 600}}, path)
    with pytest.raises(TuneAgbError, match=rf"^{path}: 'pretrain': a trunk of tune_agb.pretrain, which was removed"):
        load_checkpoint(path)
