"""The engine's layout: it loads neither Ray, rasterio nor pyarrow; its shared helpers (device and precision, the one
prediction-to-target-units function, scheduler resume, equal-count bins, loss names) behave as the callers need."""

from __future__ import annotations

import ast
import contextlib
import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO
from tune_agb.engine.config import CHOICES, LOSS_ALIASES, TrainConfig, loss_name
from tune_agb.engine.data import NormStats
from tune_agb.engine.device import autocast, memory_format, resolve_amp, resolve_device
from tune_agb.engine.inference import Member, Predictor, model_from_state, predict_target_units
from tune_agb.engine.losses import LOSSES
from tune_agb.engine.metrics import equal_count_bins, uncertainty_calibration_error
from tune_agb.engine.model import UNet
from tune_agb.engine.optim import build_optimizer, build_scheduler, resume_scheduler
from tune_agb.engine.train import predict_tiles
from tune_agb.errors import TuneAgbError

ENGINE = REPO / "tune_agb" / "engine"
FORBIDDEN = ("ray", "rasterio", "pyarrow")


def _imported_modules(path: Path) -> set[str]:
    """Every module an engine file imports, at any level (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_engine_sources_import_neither_ray_rasterio_nor_pyarrow() -> None:
    """Static: no engine module names them, and the engine uses no part of the package outside it but the shared
    leaves (errors, band names)."""
    files = sorted(ENGINE.glob("*.py"))
    assert {p.stem for p in files} >= {"config", "data", "device", "inference", "metrics", "plots", "train"}
    for path in files:
        for mod in _imported_modules(path):
            assert mod.split(".")[0] not in FORBIDDEN, (path.name, mod)
            if mod.startswith("tune_agb"):
                assert mod.startswith("tune_agb.engine.") or mod in ("tune_agb.errors", "tune_agb.bands"), (
                    path.name,
                    mod,
                )


@pytest.mark.slow
def test_importing_every_engine_module_loads_neither_ray_rasterio_nor_pyarrow() -> None:
    """At run time, in a fresh interpreter (third-party imports included)."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import tune_agb.engine as engine\n"
        "names = [m.name for m in pkgutil.iter_modules(engine.__path__)]\n"
        "for name in names:\n"
        "    importlib.import_module('tune_agb.engine.' + name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(len(names), ' '.join(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    count, _, loaded = proc.stdout.strip().partition(" ")
    assert int(count) >= 10 and loaded == "", proc.stdout


def test_device_helpers() -> None:
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(TuneAgbError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(TuneAgbError, match="CUDA is not available"):
            resolve_device("cuda:0")
    amps = {a: resolve_amp(TrainConfig(amp=a), cpu) for a in CHOICES["amp"]}
    assert amps == {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
    assert resolve_amp(TrainConfig(amp="auto"), torch.device("cuda")) == torch.bfloat16
    assert isinstance(autocast(cpu, None), contextlib.nullcontext)
    with autocast(cpu, torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
    assert memory_format(TrainConfig(channels_last=True), cpu) == torch.contiguous_format
    assert memory_format(TrainConfig(channels_last=True), torch.device("cuda")) == torch.channels_last
    assert memory_format(TrainConfig(channels_last=False), torch.device("cuda")) == torch.contiguous_format


def _norm(target_mean: float, target_std: float) -> NormStats:
    return NormStats([0.0] * 14, [1.0] * 14, target_mean, target_std)


@pytest.mark.parametrize("loss", ["gaussian_nll", "laplacian_nll"])
def test_predict_target_units_is_what_evaluation_and_inference_use(loss: str) -> None:
    cfg = TrainConfig(base_channels=4, depth=2, loss=loss, norm="group")
    torch.manual_seed(0)
    model = UNet.from_config(cfg).eval()
    norm = _norm(120.0, 40.0)
    x = torch.randn(3, 14, 16, 16)
    mean, var = predict_target_units(model, x, cfg, norm, None)
    with torch.no_grad():
        mu, logvar = model(x)
    torch.testing.assert_close(mean, mu * 40.0 + 120.0)
    torch.testing.assert_close(var, torch.exp(logvar) * (2.0 if loss == "laplacian_nll" else 1.0) * 1600.0)
    # In batches during training and evaluation ...
    m2, v2 = predict_tiles(model, x, cfg, norm, 2, None, torch.device("cpu"))
    torch.testing.assert_close(m2, mean, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(v2, var, rtol=1e-5, atol=1e-3)
    # ... and for raw inputs in the Predictor (the identity normalisation here), which returns the std.
    m3, s3 = Predictor([Member(model, cfg, norm)], torch.device("cpu")).predict(x)
    torch.testing.assert_close(m3, mean)
    torch.testing.assert_close(s3**2, var)


def _lr_and_momentum(opt: torch.optim.Optimizer) -> tuple[float, float]:
    g = opt.param_groups[0]
    return g["lr"], g["momentum"] if "momentum" in g else g["betas"][0]


@pytest.mark.parametrize("schedule", CHOICES["schedule"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("extend", [False, True])
def test_resumed_scheduler_continues_the_schedule(schedule: str, optimizer: str, extend: bool) -> None:
    """Resume after 5 of 12 steps (3 epochs of 4): the same lr and momentum sequence as the uninterrupted schedule;
    with epochs extended to 5, the lr in force is the checkpoint's and the following steps take the longer horizon."""
    cfg = TrainConfig(schedule=schedule, optimizer=optimizer, epochs=3, cyclic_step_epochs=1, lr=1e-2)

    def make(c: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        opt = build_optimizer(c, [torch.nn.Parameter(torch.zeros(2))])
        return opt, build_scheduler(c, opt, steps_per_epoch=4)

    def steps(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, n: int) -> list:
        seen = []
        for _ in range(n):
            opt.step()
            sched.step()
            seen.append(_lr_and_momentum(opt))
        return seen

    opt, sched = make(cfg)
    steps(opt, sched, 5)
    saved_opt, saved_sched, in_force = opt.state_dict(), sched.state_dict(), _lr_and_momentum(opt)
    longer = cfg.replace(epochs=5) if extend else cfg
    new_opt = build_optimizer(longer, [torch.nn.Parameter(torch.zeros(2))])
    resumed = resume_scheduler(longer, new_opt, 4, saved_sched, saved_opt)
    assert resumed.last_epoch == sched.last_epoch == 5
    assert _lr_and_momentum(new_opt) == in_force
    if not extend:
        assert steps(new_opt, resumed, 7) == steps(opt, sched, 7)
        return
    got = steps(new_opt, resumed, 15)  # to the end of the longer horizon (20 steps): no error past the old one
    ref_opt, ref_sched = make(longer)
    ref = steps(ref_opt, ref_sched, 20)[5:]
    if schedule in ("onecycle", "cyclic", "constant", "wsd"):  # closed-form schedules: exactly the longer schedule
        np.testing.assert_allclose(got, ref, rtol=1e-12)
    else:  # cosine anneals recursively from the lr in force, down to eta_min at the new horizon
        assert got[-1][0] == pytest.approx(cfg.lr * 0.01)
        assert all(a[0] >= b[0] for a, b in itertools.pairwise(got))


def test_equal_count_bins_and_their_users(tmp_path: Path) -> None:
    values = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 0.0, 6.0])
    bins = equal_count_bins(values, 3)
    assert [b.tolist() for b in bins] == [[5, 1, 3], [4, 2], [0, 6]]  # sizes as np.array_split: 3, 2, 2
    assert [len(b) for b in equal_count_bins(values, 10)] == [1] * 7 + [0] * 3
    # UCE is computed over these bins.
    err = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.0, 2.0], dtype=torch.float64)
    var = values.double() + 1
    want = sum(len(b) / 7 * abs((err[b] ** 2).mean() - var[b].mean()) for b in equal_count_bins(var, 3))
    assert float(uncertainty_calibration_error(err, var, bins=3)) == pytest.approx(float(want))
    # ... and so is the calibration plot.
    from tune_agb.engine.plots import calibration_plot

    rng = np.random.default_rng(0)
    std = rng.uniform(1, 10, 50)
    label = rng.normal(0, 1, 50) * std
    calibration_plot(label, np.zeros(50), std, tmp_path / "cal.png", "calibration", bins=4)
    assert (tmp_path / "cal.png").stat().st_size > 0


def test_loss_names_and_aliases_in_one_place() -> None:
    assert set(LOSSES) == set(CHOICES["loss"]) == set(LOSS_ALIASES.values())
    assert not set(LOSS_ALIASES) & set(CHOICES["loss"])
    for name in CHOICES["loss"]:
        assert loss_name(name) == name and loss_name(name.upper().replace("_", "-")) == name
    assert loss_name("Laplacian") == "laplacian_nll" and loss_name("L1") == "mae" and loss_name("nll") == "gaussian_nll"
    assert loss_name("huber") is None
    assert math.isfinite(float(LOSSES["gaussian_nll"](torch.zeros(2), torch.zeros(2), torch.ones(2))))


def test_model_from_state_is_the_checkpoint_model_ready_to_predict() -> None:
    """The one checkpoint-to-model function (prediction members and out-of-fold prediction load through it): the same
    outputs as the model the state was taken from, in eval mode; a bad config is one line naming the checkpoint."""
    cfg = TrainConfig(base_channels=4, depth=2, norm="batch")
    torch.manual_seed(0)
    trained = UNet.from_config(cfg)
    trained(torch.randn(4, 14, 16, 16))  # batch-norm running stats move: eval mode must use them
    trained.eval()
    norm = _norm(120.0, 40.0)
    state = {"model": trained.state_dict(), "config": cfg.to_dict(), "norm": norm.to_dict()}
    model, got_cfg, got_norm = model_from_state(state, torch.device("cpu"), source="fold 1 checkpoint")
    assert not model.training and got_cfg == cfg and got_norm == norm
    x = torch.randn(2, 14, 16, 16)
    torch.testing.assert_close(
        predict_target_units(model, x, got_cfg, got_norm, None), predict_target_units(trained, x, cfg, norm, None)
    )
    with pytest.raises(TuneAgbError, match=r"^fold 1 checkpoint config.*depth"):
        model_from_state(
            {**state, "config": {**cfg.to_dict(), "depth": "deep"}}, torch.device("cpu"), "fold 1 checkpoint"
        )
