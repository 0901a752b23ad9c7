"""GPU checks: bf16 autocast, channels_last, data resident on the device, no host sync per batch.

Marked ``cuda`` and skipped cleanly without a CUDA device (nothing here is mocked: on a CPU-only machine these
tests simply do not run). Run them on a GPU host with ``python -m pytest -m cuda tests/test_cuda.py``.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tune_agb.engine.checkpoint import load_checkpoint, save_checkpoint
from tune_agb.engine.config import TrainConfig
from tune_agb.engine.data import SplitFeed, TileSet, compute_norm_stats, load_dataset
from tune_agb.engine.model import UNet
from tune_agb.engine.train import EpochReport, train

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]


@pytest.fixture(scope="module")
def tiles(tiny_data: Path) -> dict[str, TileSet]:
    return load_dataset(tiny_data / "inputs", tiny_data / "labels", splits=("train", "val"))


def _cfg(**kw) -> TrainConfig:
    base = {"base_channels": 8, "depth": 2, "epochs": 2, "batch_size": 4, "norm": "group", "channels_last": True}
    return TrainConfig(**{**base, **kw})


def test_feeds_resident_and_streamed_on_cuda_match_cpu(tiles: dict[str, TileSet]) -> None:
    """auto keeps a small split resident on the card; the streamed path (pinned buffers, side-stream copies) gives
    the same batches as the resident one and as the CPU."""
    norm = compute_norm_stats(tiles["train"])
    dev = torch.device("cuda")
    resident = SplitFeed(tiles["train"], norm, dev)
    assert resident.mode == "resident" and resident.x.device.type == "cuda"
    streamed = SplitFeed(tiles["train"], norm, dev, mode="stream")
    cpu = SplitFeed(tiles["train"], norm, torch.device("cpu"))
    order = [np.array([3, 1]), np.array([0, 2, 5])] * 3
    for (xr, yr), (xs, ys), (xc, yc) in zip(
        resident.batches(order), streamed.batches(order), cpu.batches(order), strict=True
    ):
        assert xr.device.type == xs.device.type == "cuda"
        torch.testing.assert_close(xr, xs)
        torch.testing.assert_close(yr, ys, equal_nan=True)
        torch.testing.assert_close(xs.cpu(), xc)
        torch.testing.assert_close(ys.cpu(), yc, equal_nan=True)


def test_bf16_autocast_channels_last_forward(tiles: dict[str, TileSet]) -> None:
    model = UNet(in_channels=14, base_channels=8, depth=3).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(2, 14, 37, 45, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mu, logvar = model(x)
    assert mu.dtype == logvar.dtype == torch.float32 and mu.shape == (2, 37, 45)
    assert torch.isfinite(mu).all() and (logvar >= model.logvar_min).all() and (logvar <= model.logvar_max).all()


def test_training_epoch_bf16_channels_last_on_cuda(tiles: dict[str, TileSet], tmp_path: Path) -> None:
    states: list[dict] = []

    def keep(report: EpochReport) -> None:
        assert report.val.mean.device.type == "cuda"  # predictions stay on the device
        states.append(report.state())

    res = train(_cfg(), tiles, device="cuda", progress=False, on_epoch=keep)
    assert res.amp == torch.bfloat16 and res.device.type == "cuda"
    assert all(math.isfinite(m["train_loss"]) and math.isfinite(m["val_rmse"]) for m in res.history)
    conv = res.model.inc[0].weight
    assert conv.is_cuda and conv.is_contiguous(memory_format=torch.channels_last)
    assert res.history[-1]["val_n"] == tiles["val"].num_labelled
    path = tmp_path / "gpu.pt"
    save_checkpoint(states[-1], path)
    state = load_checkpoint(path)  # weights_only=True, mapped to the CPU
    assert len(state["rng"]["cuda"]) == torch.cuda.device_count()
    assert state["model"]["inc.0.weight"].device.type == "cpu"


def test_fp16_with_grad_scaler_on_cuda(tiles: dict[str, TileSet]) -> None:
    states: list[dict] = []
    res = train(_cfg(amp="fp16"), tiles, device="cuda", progress=False, on_epoch=lambda r: states.append(r.state()))
    assert res.amp == torch.float16 and states[-1]["scaler"]["scale"] > 0
    assert math.isfinite(res.history[-1]["val_rmse"])


def _count_syncs(cfg: TrainConfig, tiles: dict[str, TileSet]) -> int:
    """Host-device synchronisations during a whole ``train`` call, as reported by torch's sync debug mode."""
    train(cfg.replace(epochs=1), tiles, device="cuda", progress=False)  # warm-up: lazy CUDA/cuDNN init syncs
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train(cfg, tiles, device="cuda", progress=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("data_mode", ["resident", "stream"])
def test_no_host_sync_per_batch(tiles: dict[str, TileSet], data_mode: str) -> None:
    """8 train tiles: batch 8 gives 1 step per epoch, batch 1 gives 8. Syncs must not grow with the steps.

    The loop syncs a few times per run (model and data to the device) and per epoch (the shuffle and flip flags
    go to the device, the epoch's sums and the validation metrics come back); any per-batch ``.item()``,
    boolean-mask gather or pageable host copy, in training or in the batched evaluation (4 val batches against
    1), would add at least one sync per extra step.
    """
    n = len(tiles["train"])
    epochs = 2
    few = _count_syncs(_cfg(batch_size=n, epochs=epochs, data_mode=data_mode), tiles)
    many = _count_syncs(_cfg(batch_size=1, epochs=epochs, data_mode=data_mode), tiles)
    extra_steps = epochs * (n - 1)
    assert many - few < extra_steps, f"syncs: {few} with {epochs} steps, {many} with {n * epochs} steps"


def test_memory_fit_is_measured_by_a_dry_step_on_cuda() -> None:
    """The dry step's peak grows with the batch; a share too small for it is reported as infeasible."""
    from tune_agb.engine.memory import check_memory_fit
    from tune_agb.errors import InfeasibleError

    small = check_memory_fit(_cfg(base_channels=32, depth=3, batch_size=2), (256, 256), torch.device("cuda"), 1.0)
    large = check_memory_fit(_cfg(base_channels=32, depth=3, batch_size=16), (256, 256), torch.device("cuda"), 1.0)
    assert small is not None and large is not None
    assert 0 < small.step_peak < large.step_peak < 8 * 2**30
    # 14 more samples hold at least 14 more bf16 outputs of the first convolution (32 x 256 x 256 each).
    assert large.step_peak - small.step_peak > 14 * 32 * 256 * 256 * 2
    with pytest.raises(InfeasibleError, match="infeasible: needs"):
        check_memory_fit(
            _cfg(base_channels=32, depth=3, batch_size=16),
            (256, 256),
            torch.device("cuda"),
            1.0,
            total_memory=large.required,
        )


def test_compiled_training_on_cuda_matches_eager(tiles: dict[str, TileSet]) -> None:
    """torch.compile (default mode) of the training forward: same first-epoch loss as eager within bf16 noise, and
    the model that is checkpointed is the plain one (no ``_orig_mod.`` keys)."""
    states: list[dict] = []
    eager = train(_cfg(epochs=1, augment=False), tiles, device="cuda", progress=False)
    comp = train(
        _cfg(epochs=1, augment=False, compile="default"),
        tiles,
        device="cuda",
        progress=False,
        on_epoch=lambda r: states.append(r.state()),
    )
    a, b = eager.history[0]["train_loss"], comp.history[0]["train_loss"]
    assert math.isfinite(b) and abs(a - b) <= 0.05 * abs(a) + 0.05
    assert all(not k.startswith("_orig_mod") for k in states[-1]["model"])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_fused_compiled_layers_match_eager_on_cuda(amp: torch.dtype | None) -> None:
    """compile: fused (BatchNorm + ReLU and upsampling + concatenation compiled) computes the eager model's function:
    against a float64 reference of the same model, the fused model's outputs, gradients and running statistics are
    as close as the eager model's in the same precision (float32 with TF32 off, or bf16 autocast). Measured, not
    assumed: a fixed tolerance between two float32 runs failed on an H200 (a first-layer gradient that is mostly
    cancellation in BatchNorm's backward differed by 5e-3 between two correct float32 computations)."""
    import copy

    from tune_agb.engine.fused import FusedOps

    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        torch.manual_seed(0)
        eager = UNet(14, 16, 3).cuda().to(memory_format=torch.channels_last).train()
        fused = copy.deepcopy(eager).fuse(FusedOps())
        ref = copy.deepcopy(eager).double().to(memory_format=torch.contiguous_format)
        floor = 1e-6 if amp is None else 1e-3
        for step in range(2):
            x = torch.randn(4, 14, 61, 64, device="cuda")
            w = torch.randn(2, 4, 61, 64, device="cuda", dtype=torch.float64)  # gradients without cancellation
            got = {}
            for name, m in (("ref", ref), ("eager", eager), ("fused", fused)):
                m.zero_grad()
                xin = x.double() if m is ref else x.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp is not None and m is not ref):
                    mu, logvar = m(xin)
                (mu.double() * w[0] + logvar.double() * w[1]).sum().backward()
                got[name] = {"mu": mu.detach(), "logvar": logvar.detach()}
                got[name] |= {f"grad {k}": v.grad for k, v in m.named_parameters()}
                got[name] |= {f"buffer {k}": v for k, v in m.named_buffers() if v.is_floating_point()}
            for key, want in got["ref"].items():
                e_eager, e_fused = _rel(got["eager"][key], want), _rel(got["fused"][key], want)
                assert e_fused <= 3 * e_eager + floor, f"{key}, step {step}: fused {e_fused:.2e}, eager {e_eager:.2e}"
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def test_training_epoch_with_fused_layers_on_cuda(tiles: dict[str, TileSet]) -> None:
    """train() with compile: fused: the epoch's loss is the eager run's (bf16 rounding apart), and the checkpoint's
    state has the eager model's keys."""
    states: list[dict] = []
    cfg = _cfg(epochs=1, augment=False, norm="batch")
    eager = train(cfg, tiles, device="cuda", progress=False)
    fused = train(cfg.replace(compile="fused"), tiles, device="cuda", progress=False,
                  on_epoch=lambda r: states.append(r.state()))  # fmt: skip
    a, b = eager.history[0]["train_loss"], fused.history[0]["train_loss"]
    assert math.isfinite(b) and abs(a - b) <= 0.05 * abs(a) + 0.05
    assert set(states[-1]["model"]) == set(eager.model.state_dict())


@pytest.mark.parametrize(("data_mode", "compile"), [("resident", "none"), ("stream", "none"), ("resident", "fused")])
def test_training_steps_run_under_sync_debug_error(tiles: dict[str, TileSet], data_mode: str, compile: str) -> None:
    """The steps themselves, with train()'s CUDA settings (fused AdamW, cudnn.benchmark, bf16, channels_last), run
    with ``torch.cuda.set_sync_debug_mode("error")``: any host sync inside a step or between batches raises. The
    fused layers (``compile: fused``, BatchNorm) too."""
    from tune_agb.engine.device import compile_for_training, resolve_amp, tune_cuda
    from tune_agb.engine.optim import build_optimizer, build_scheduler
    from tune_agb.engine.train import TrainStep

    cfg = _cfg(batch_size=2, compile=compile, norm="batch" if compile == "fused" else "group")
    dev = torch.device("cuda")
    tune_cuda(dev)
    norm = compute_norm_stats(tiles["train"])
    feed = SplitFeed(tiles["train"], norm, dev, mode=data_mode)
    model = UNet.from_config(cfg).to(dev, memory_format=torch.channels_last)
    opt = build_optimizer(cfg, model.parameters(), fused=True)
    step = TrainStep(model, opt, build_scheduler(cfg, opt, 8), None, cfg, resolve_amp(cfg, dev), dev,
                     compile_for_training(model, cfg))  # fmt: skip
    n = len(feed)
    order = [np.random.default_rng(i).permutation(n)[:2] for i in range(12)]
    flags = torch.rand((24, 3), generator=torch.Generator().manual_seed(0)).lt(0.5).to(dev)
    batches = feed.batches(order)
    for i in range(3):  # warm-up outside the check: cuDNN autotuning, the index copy of the pass
        x, y = next(batches)
        step(x, y, flags[2 * i : 2 * i + 2])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, (x, y) in enumerate(batches, start=3):
            step(x, y, flags[2 * i : 2 * i + 2])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    loss, _ = step.read()
    assert math.isfinite(loss)
