"""The training loop on CPU with tiny models (issue 2, point 7)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tune_agb.engine.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from tune_agb.engine.config import TrainConfig
from tune_agb.engine.data import TileSet, load_dataset
from tune_agb.engine.train import EpochReport, StopTraining, train
from tune_agb.errors import DivergenceError, TuneAgbError

TINY = {"base_channels": 4, "depth": 2, "batch_size": 3, "epochs": 3, "lr": 3e-3}


@pytest.fixture(scope="module")
def tiles(tiny_data: Path) -> dict[str, TileSet]:
    return load_dataset(tiny_data / "inputs", tiny_data / "labels", splits=("train", "val"))


def _cfg(**kw: Any) -> TrainConfig:
    return TrainConfig(**{**TINY, **kw})


def _assert_same_history(a: list[dict[str, float]], b: list[dict[str, float]]) -> None:
    assert len(a) == len(b)
    for ha, hb in zip(a, b, strict=True):
        assert set(ha) == set(hb)
        for k in ha:
            assert ha[k] == pytest.approx(hb[k], rel=1e-6, abs=1e-9, nan_ok=True), (ha["epoch"], k)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("optimizer", "schedule"),
    [("adam", "constant"), ("adamw", "cosine"), ("sgd", "onecycle"), ("adam", "cyclic"), ("sgd", "constant")],
)
def test_each_optimizer_and_schedule_trains(tiles: dict[str, TileSet], optimizer: str, schedule: str) -> None:
    cfg = _cfg(optimizer=optimizer, schedule=schedule, epochs=4, cyclic_step_epochs=1, weight_decay=1e-3)
    res = train(cfg, tiles, device="cpu", progress=False)
    h = res.history
    assert [m["epoch"] for m in h] == [1, 2, 3, 4]
    assert all(math.isfinite(m["train_loss"]) and math.isfinite(m["val_rmse"]) for m in h)
    assert all(m["val_n"] == tiles["val"].num_labelled for m in h)
    assert res.best_epoch == 1 + min(range(4), key=lambda i: h[i]["val_rmse"])
    assert res.best_val_rmse == h[res.best_epoch - 1]["val_rmse"]
    lrs = [m["lr"] for m in h]  # the lr after each epoch's last step
    if schedule == "constant":
        assert lrs == [cfg.lr] * 4
    elif schedule == "cosine":
        assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(cfg.lr * 0.01)
    elif schedule == "onecycle":
        # warm up to max_lr within the first 30 % of the steps, then anneal far below the start
        assert cfg.lr / 2 < lrs[0] <= cfg.lr and lrs == sorted(lrs, reverse=True) and lrs[-1] < cfg.lr / 25
    elif schedule == "cyclic":  # triangular2: up one epoch, down the next, the peak halved every cycle
        assert lrs[0] == pytest.approx(cfg.lr) and lrs[1] == pytest.approx(cfg.lr / 10)
        assert lrs[2] == pytest.approx(cfg.lr / 10 + (cfg.lr - cfg.lr / 10) / 2)
    with torch.no_grad():
        mu, _ = res.model.eval()(torch.zeros(1, 14, 32, 32))
    assert torch.isfinite(mu).all()


@pytest.mark.slow
def test_seeded_runs_repeat_and_seeds_differ(tiles: dict[str, TileSet]) -> None:
    cfg = _cfg(epochs=2, dropout=0.2)
    a = train(cfg, tiles, device="cpu", progress=False).history
    b = train(cfg, tiles, device="cpu", progress=False).history
    c = train(cfg.replace(seed=1), tiles, device="cpu", progress=False).history
    _assert_same_history(a, b)
    assert a[-1]["val_rmse"] != c[-1]["val_rmse"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        {"optimizer": "adamw", "schedule": "onecycle"},
        {"optimizer": "sgd", "schedule": "cyclic", "cyclic_step_epochs": 1, "norm": "group"},
        # 8 train tiles in batches of 2: 4 batches a pass, 3 an epoch; epoch 2 ends in the middle of pass 2.
        {"optimizer": "adam", "schedule": "cosine", "steps_per_epoch": 3, "batch_size": 2},
        {"optimizer": "adamw", "schedule": "wsd"},
    ],
)
def test_resume_after_epoch_k_matches_uninterrupted_run(tiles: dict[str, TileSet], tmp_path: Path, extra: dict) -> None:
    """Stop after epoch 2 of 4, save, reload through torch.load(weights_only=True), resume: same metrics."""
    cfg = _cfg(epochs=4, augment=True, dropout=0.3, **extra)
    full = train(cfg, tiles, device="cpu", progress=False)

    path = tmp_path / "ckpt.pt"

    def stop_at_2(report: EpochReport) -> None:
        if report.epoch == 2:
            save_checkpoint(report.state(), path)
            raise StopTraining("test stop")

    first = train(cfg, tiles, device="cpu", progress=False, on_epoch=stop_at_2)
    assert first.stopped == "test stop" and len(first.history) == 2
    state = load_checkpoint(path)
    assert state["epoch"] == 2 and state["format"] == CHECKPOINT_FORMAT
    assert state["config"] == cfg.to_dict() and len(state["history"]) == 2
    seen: list[int] = []
    rest = train(cfg, tiles, device="cpu", progress=False, resume=state, on_epoch=lambda r: seen.append(r.epoch))
    assert seen == [3, 4]
    _assert_same_history(rest.history, full.history)
    assert rest.best_epoch == full.best_epoch
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(rest.model.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_wsd_warms_up_holds_the_lr_then_decays_to_a_hundredth() -> None:
    """100 steps (10 epochs of 10): warm-up over 5 steps, the full lr to step 80, a cosine to lr/100 at step 100."""
    from tune_agb.engine.optim import build_optimizer, build_scheduler

    cfg = _cfg(schedule="wsd", epochs=10, lr=1e-2)
    opt = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2))])
    sched = build_scheduler(cfg, opt, steps_per_epoch=10)
    lrs = [opt.param_groups[0]["lr"]]  # lrs[s]: the lr of the step after s steps
    for _ in range(100):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(cfg.lr / 6) and lrs[4] == pytest.approx(cfg.lr * 5 / 6)
    assert lrs[:6] == sorted(lrs[:6]) and len(set(lrs[:6])) == 6  # a strictly rising linear warm-up
    assert lrs[5:81] == [pytest.approx(cfg.lr)] * 76  # the plateau
    assert lrs[90] == pytest.approx(cfg.lr * (0.01 + 0.99 * 0.5))  # half-way down the cosine
    assert lrs[80:] == sorted(lrs[80:], reverse=True) and lrs[81] < cfg.lr
    assert lrs[100] == pytest.approx(cfg.lr * 0.01)


@pytest.mark.parametrize("total", [1, 2, 3, 7, 20])
def test_wsd_reaches_the_floor_at_the_horizon_for_short_runs(total: int) -> None:
    from tune_agb.engine.optim import wsd_factor

    f = [wsd_factor(s, total) for s in range(total + 3)]
    assert 0 < f[0] < 1 and max(f) <= 1.0
    assert f[total:] == [pytest.approx(0.01)] * 3  # at the horizon and past it (a run extended on resume)
    peak = f.index(max(f))
    assert f[: peak + 1] == sorted(f[: peak + 1]) and f[peak:] == sorted(f[peak:], reverse=True)


@pytest.mark.slow
def test_resume_refuses_another_architecture(tiles: dict[str, TileSet], tmp_path: Path) -> None:
    states: list[dict] = []
    train(_cfg(epochs=1), tiles, device="cpu", progress=False, on_epoch=lambda r: states.append(r.state()))
    with pytest.raises(TuneAgbError, match="base_channels"):
        train(_cfg(epochs=2, base_channels=8), tiles, device="cpu", progress=False, resume=states[0])
    with pytest.raises(TuneAgbError, match=r"upsampling='bilinear'.*'transpose'"):
        train(_cfg(epochs=2, upsampling="transpose"), tiles, device="cpu", progress=False, resume=states[0])


@pytest.mark.slow
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_autocast_options_run_on_cpu(tiles: dict[str, TileSet], amp: str) -> None:
    cfg = _cfg(amp=amp, epochs=2)
    states: list[dict] = []
    try:
        res = train(cfg, tiles, device="cpu", progress=False, on_epoch=lambda r: states.append(r.state()))
    except RuntimeError as exc:  # an older torch without CPU autocast for this dtype
        pytest.skip(f"{amp} autocast not supported on CPU by torch {torch.__version__}: {exc}")
    assert res.amp == {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]
    assert all(math.isfinite(m["val_rmse"]) for m in res.history)
    scaler_state = states[-1]["scaler"]
    if amp == "fp16":  # the scaler is used and its state checkpointed
        assert scaler_state and scaler_state["scale"] > 0
    else:
        assert scaler_state == {}


@pytest.mark.slow
def test_auto_amp_is_full_precision_on_cpu(tiles: dict[str, TileSet]) -> None:
    assert train(_cfg(epochs=1), tiles, device="cpu", progress=False).amp is None


@pytest.mark.slow
def test_divergence_raises_a_clear_error(tiles: dict[str, TileSet]) -> None:
    cfg = _cfg(optimizer="sgd", lr=1e6, grad_clip=0.0, schedule="constant", epochs=3)
    with pytest.raises(DivergenceError) as info:
        train(cfg, tiles, device="cpu", progress=False)
    msg = str(info.value)
    assert "\n" not in msg and "not finite" in msg and "diverged" in msg and "lr=1e+06" in msg
    assert info.value.metrics["epoch"] in (1, 2, 3)
    assert not math.isfinite(info.value.metrics["train_loss"]) or not math.isfinite(info.value.metrics["val_rmse"])


@pytest.mark.slow
def test_on_epoch_stop_training_ends_the_run(tiles: dict[str, TileSet]) -> None:
    reports: list[EpochReport] = []

    def cb(report: EpochReport) -> None:
        reports.append(report)
        if report.epoch == 2:
            raise StopTraining

    res = train(_cfg(epochs=5), tiles, device="cpu", progress=False, on_epoch=cb)
    assert [r.epoch for r in reports] == [1, 2] and len(res.history) == 2
    assert res.stopped == "stopped by callback"
    rep = reports[-1]
    assert rep.metrics == res.history[-1] and rep.val.mean.shape == (tiles["val"].num_labelled,)
    assert rep.val.maps[0][0].shape == tiles["val"].labels.shape[1:]
    assert rep.is_best == (res.best_epoch == 2)


@pytest.mark.slow
def test_checkpoint_round_trip_and_refusals(tiles: dict[str, TileSet], tmp_path: Path) -> None:
    states: list[dict] = []
    res = train(_cfg(epochs=1), tiles, device="cpu", progress=False, on_epoch=lambda r: states.append(r.state()))
    path = tmp_path / "sub" / "a.pt"
    save_checkpoint(states[0], path)
    assert [p.name for p in path.parent.iterdir()] == ["a.pt"]  # no temporary file left behind
    back = load_checkpoint(path)
    for k, v in res.model.state_dict().items():
        torch.testing.assert_close(back["model"][k], v)
    assert back["norm"] == res.norm.to_dict() and back["best"]["epoch"] == 1

    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(TuneAgbError, match="not a tune_agb checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "broken.pt").write_bytes(b"garbage")
    with pytest.raises(TuneAgbError, match=r"broken\.pt"):
        load_checkpoint(tmp_path / "broken.pt")
    with pytest.raises(TuneAgbError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


class _Payload:
    """Pickles to a call of ``open(marker, 'w')``: loading it with full pickle would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def test_checkpoint_with_pickled_object_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "epoch": 1, "model": {}, "x": _Payload(marker)}, path)
    with pytest.raises(TuneAgbError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("schedule", ["onecycle", "cyclic"])
def test_sgd_momentum_is_the_configured_one_under_cycling_schedules(schedule: str) -> None:
    """Cycling schedules move momentum between 0.85 m and m, never above the configured m (0 = no momentum)."""
    from tune_agb.engine.optim import build_optimizer, build_scheduler

    for m in (0.0, 0.5):
        cfg = _cfg(optimizer="sgd", momentum=m, schedule=schedule, epochs=3)
        opt = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))])
        sched = build_scheduler(cfg, opt, steps_per_epoch=4)
        seen = []
        for _ in range(12):
            opt.step()
            sched.step()
            seen.append(opt.param_groups[0]["momentum"])
        assert max(seen) <= m + 1e-9 and min(seen) >= 0.85 / 0.95 * m - 1e-9


def test_tiles_too_small_for_the_depth_are_a_clear_error(tiles: dict[str, TileSet]) -> None:
    with pytest.raises(TuneAgbError, match=r"depth=5 needs tiles larger than 32 px.*32 x 32"):
        train(_cfg(depth=5, epochs=1), tiles, device="cpu", progress=False)
