"""Masked-patch pretraining (tune_agb.pretrain) and starting a run from weights (the init_weights key)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from tune_agb.engine.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from tune_agb.engine.config import TrainConfig, config_from_dict
from tune_agb.engine.data import TileSet, load_dataset
from tune_agb.engine.model import UNet
from tune_agb.engine.train import init_state, train
from tune_agb.errors import TuneAgbError, run_cli
from tune_agb.pretrain import main, patch_mask, reconstruction_loss
from tune_agb.store import DataSource

TINY = {"base_channels": 4, "depth": 2, "batch_size": 3, "epochs": 1, "lr": 3e-3}


def _data_args(d: Path) -> list[str]:
    return ["--input-dir", str(d / "inputs"), "--label-dir", str(d / "labels")]


@pytest.fixture(scope="module")
def trunk(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trunk pretrained on the tiny dataset's train and val tiles (80 steps)."""
    d = tmp_path_factory.mktemp("trunk")
    (d / "c.yaml").write_text(yaml.safe_dump(TINY))
    out = d / "trunk.pt"
    argv = ["--config", str(d / "c.yaml"), *_data_args(tiny_data), "--out", str(out), "--steps", "80"]
    assert main([*argv, "--device", "cpu", "--no-progress", "--lr", "5e-3"]) == 0
    return out


@pytest.fixture(scope="module")
def tiles(tiny_data: Path) -> dict[str, TileSet]:
    return load_dataset(tiny_data / "inputs", tiny_data / "labels", splits=("train", "val"))


def test_patch_mask_hides_whole_squares_at_the_asked_share() -> None:
    gen = torch.Generator().manual_seed(0)
    m = patch_mask(64, 30, 21, 4, 0.3, torch.device("cpu"), gen)
    assert m.shape == (64, 1, 30, 21) and set(m.unique().tolist()) <= {0.0, 1.0}
    # constant within every 4 x 4 square of the grid from the corner (the last row and column of squares cut)
    for r0 in range(0, 30, 4):
        for c0 in range(0, 21, 4):
            block = m[:, :, r0 : r0 + 4, c0 : c0 + 4]
            assert torch.equal(block.amax((-1, -2)), block.amin((-1, -2)))
    cells = m[:, 0, ::4, ::4]
    assert cells.mean().item() == pytest.approx(0.3, abs=0.03)  # 64 x 8 x 6 squares


def test_reconstruction_loss_counts_the_hidden_pixels_only() -> None:
    x = torch.randn(2, 3, 5, 5)
    mask = torch.zeros(2, 1, 5, 5)
    mask[0, 0, 1:3, 1:3] = 1
    pred = x.clone()
    pred[1] += 100.0  # wrong everywhere in the second tile, which has nothing hidden
    assert reconstruction_loss(pred, x, mask).item() == 0.0
    pred[0, :, 2, 2] += 2.0  # one hidden pixel wrong by 2 in all 3 bands: 12 / (4 pixels x 3 bands)
    assert reconstruction_loss(pred, x, mask).item() == pytest.approx(1.0)
    assert reconstruction_loss(pred, x, torch.zeros_like(mask)).item() == 0.0


def test_pretraining_learns_and_writes_a_trunk(trunk: Path, tiny_data: Path) -> None:
    ckpt = load_checkpoint(trunk)
    assert ckpt["format"] == CHECKPOINT_FORMAT
    info = ckpt["pretrain"]
    assert info["splits"] == ["train", "val"] and info["tiles"] == 12 and info["steps"] == 80
    losses = info["losses"]
    assert len(losses) == 4 and all(np.isfinite(losses))  # one mean per 25 steps, then the last 5
    assert np.mean(losses[-2:]) < 0.8 * losses[0], losses  # reconstruction improves
    cfg = config_from_dict(ckpt["config"])
    want = UNet.from_config(cfg).state_dict()
    assert set(ckpt["model"]) == {k for k in want if not k.startswith("head.")}
    norm = DataSource(str(tiny_data / "inputs"), str(tiny_data / "labels"), splits=("train",)).open().norm()
    assert ckpt["norm"]["mean"] == pytest.approx(norm.mean) and ckpt["norm"]["std"] == pytest.approx(norm.std)


def test_a_run_starts_from_the_trunk_and_its_head_starts_random(
    trunk: Path, tiles: dict[str, TileSet], tmp_path: Path
) -> None:
    saved = load_checkpoint(trunk)["model"]
    firsts: list[dict[str, Any]] = []

    def first_epoch(cfg: TrainConfig) -> dict[str, torch.Tensor]:
        states: list[dict] = []
        train(cfg, tiles, device="cpu", progress=False, on_epoch=lambda r: states.append(r.state()))
        return states[0]["model"]

    # a learning rate too small to move the weights: what the first epoch holds is what the run started from
    still = {**TINY, "lr": 1e-12, "schedule": "constant", "weight_decay": 0.0}
    firsts.append(first_epoch(TrainConfig(**still, init_weights=str(trunk))))
    firsts.append(first_epoch(TrainConfig(**still)))
    for key in ("inc.0.weight", "downs.1.3.weight", "ups.0.conv.0.weight", "ups.1.up.1.weight"):
        assert torch.allclose(firsts[0][key], saved[key], atol=1e-8), key
        assert not torch.allclose(firsts[1][key], saved[key], atol=1e-3), key
    assert "head.weight" not in saved
    # every tensor of a final model, head included, is taken over (a model of another region, fine-tuned here)
    full = tmp_path / "best.pt"
    save_checkpoint({"format": CHECKPOINT_FORMAT, "config": TrainConfig(**TINY).to_dict(), "model": firsts[1]}, full)
    state = init_state(TrainConfig(**TINY, init_weights=str(full)))
    assert state is not None and torch.equal(state["head.weight"], firsts[1]["head.weight"])


def test_init_weights_is_stored_as_an_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict({"init_weights": "Runs/Trunk.pt"})
    assert cfg.init_weights == str(tmp_path / "Runs" / "Trunk.pt")  # absolute, case kept
    assert config_from_dict({"init_weights": ""}).init_weights == ""
    assert config_from_dict(cfg.to_dict()).init_weights == cfg.init_weights
    with pytest.raises(TuneAgbError, match="'init_weights' must be a checkpoint path"):
        config_from_dict({"init_weights": 3})


def test_init_weights_of_another_architecture_or_missing_is_one_error(
    trunk: Path, tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tune_agb.final_train import main as final_main

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("earlier output")
    cases = [
        ({"base_channels": 8}, trunk, rf"init_weights {trunk}: holds a model with base_channels=4, but the config"),
        ({"texture_windows": "3"}, trunk, "texture_windows=''"),
        ({}, tmp_path / "nowhere.pt", f"{tmp_path / 'nowhere.pt'}: checkpoint file not found"),
    ]
    for changes, path, expected in cases:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump({**TINY, **changes, "init_weights": str(path)}))
        argv = ["--config", str(cfg), *_data_args(tiny_data), "--out-dir", str(out), "--device", "cpu", "--overwrite"]
        assert run_cli(final_main, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (expected, err)
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # a trunk is not a run to resume
    argv = ["--train_mode", "resume", "--model_weights_path", str(trunk), *_data_args(tiny_data), "--out-dir", str(out)]
    assert run_cli(final_main, argv) == 2
    err = capsys.readouterr().err
    assert f"{trunk}: a pretrained trunk" in err and "init_weights" in err
    # weights whose tensors do not fit (same keys, another model's shapes)
    odd = tmp_path / "odd.pt"
    state = load_checkpoint(trunk)
    state["model"] = {**state["model"], "inc.0.weight": torch.zeros(4, 3, 3, 3)}
    save_checkpoint(state, odd)
    with pytest.raises(TuneAgbError, match=r"1 of another shape tensors, first 'inc.0.weight'"):
        init_state(TrainConfig(**TINY, init_weights=str(odd)))


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--mask-ratio", "1"], "--mask-ratio: must be in (0, 1)"),
        (["--splits", "train,holdout"], "--splits: distinct names among train, val, test"),
        (["--steps", "0"], "--steps: must be >= 1"),
        (["--batch-size", "1"], "--batch-size: must be >= 2"),
    ],
)
def test_bad_pretrain_flags_are_one_line(
    flags: list[str], expected: str, tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "trunk.pt"
    assert run_cli(main, [*_data_args(tiny_data), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {expected}"] or (len(err) == 1 and expected in err[0]), err
    assert not out.exists()


def test_an_existing_trunk_is_kept_without_overwrite(
    trunk: Path, tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "trunk.pt"
    shutil.copy(trunk, out)
    before = out.read_bytes()
    assert run_cli(main, [*_data_args(tiny_data), "--out", str(out), "--steps", "2"]) == 2
    assert "already exists; use --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_a_search_with_a_missing_init_weights_fails_before_ray_starts(tiny_data: Path, tmp_path: Path) -> None:
    import ray

    from tests.search_helpers import tiny_space, write_space
    from tune_agb.search.cli import main as search_main
    from tune_agb.search.space import load_search_space

    missing = tmp_path / "trunk.pt"
    space = write_space(tmp_path / "s.yaml", tiny_space(fixed__init_weights="trunk.pt"))
    argv = ["--space", str(space), *_data_args(tiny_data), "--storage", str(tmp_path / "st")]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)  # the space names it relative to where the search starts
        assert load_search_space(space).base_config().init_weights == str(missing)
        with pytest.raises(TuneAgbError, match=f"{missing}: checkpoint file not found"):
            search_main(argv)
    assert not ray.is_initialized() and not (tmp_path / "st").exists()


def test_a_run_started_from_a_trunk_resumes_without_it(trunk: Path, tiles: dict[str, TileSet], tmp_path: Path) -> None:
    copy = tmp_path / "trunk.pt"
    shutil.copy(trunk, copy)
    cfg = TrainConfig(**{**TINY, "epochs": 2}, init_weights=str(copy))
    ckpt = tmp_path / "epoch1.pt"

    def keep_first(report: Any) -> None:
        if report.epoch == 1:
            save_checkpoint(report.state(), ckpt)

    full = train(cfg, tiles, device="cpu", progress=False, on_epoch=keep_first)
    copy.unlink()  # the checkpoint holds the weights: the trunk is not needed any more
    resumed = train(cfg, tiles, device="cpu", progress=False, resume=load_checkpoint(ckpt))
    assert resumed.history[-1]["val_rmse"] == pytest.approx(full.history[-1]["val_rmse"], rel=1e-6)
    with pytest.raises(TuneAgbError, match="checkpoint file not found"):
        train(cfg, tiles, device="cpu", progress=False)  # a fresh start does need it
