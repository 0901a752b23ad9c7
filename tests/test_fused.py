"""The fused training layers (tune_agb.engine.fused) compute the eager model's function: checked here in float64 on
the CPU with the fused arithmetic run op by op (``FusedOps(compiled=False)``); tests/test_cuda.py checks the compiled
functions on a GPU."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tune_agb.engine.config import config_from_dict
from tune_agb.engine.fused import FusedOps, raise_recompile_limit
from tune_agb.engine.model import UNet
from tune_agb.errors import TuneAgbError


class CountingOps(FusedOps):
    def __init__(self) -> None:
        super().__init__(compiled=False)
        self.calls = 0

    def batchnorm_relu(self, x, bn):
        self.calls += 1
        return super().batchnorm_relu(x, bn)

    def upsample2_cat(self, y, skip):
        self.calls += 1
        return super().upsample2_cat(y, skip)


def _pair(upsampling: str = "bilinear", **kw) -> tuple[UNet, UNet, CountingOps]:
    torch.manual_seed(3)
    eager = UNet(14, 8, 3, upsampling=upsampling, **kw).double().train()
    fused = copy.deepcopy(eager)
    ops = CountingOps()
    fused.fuse(ops)
    return eager, fused, ops


@pytest.mark.parametrize("upsampling", ["bilinear", "transpose"])
def test_fused_training_step_equals_eager_in_float64(upsampling: str) -> None:
    """Outputs, every gradient, and the BatchNorm running statistics (two steps) agree to float64 rounding."""
    eager, fused, ops = _pair(upsampling)
    for step in range(2):
        x = torch.randn(3, 14, 37, 45, dtype=torch.float64)  # padded to 48 x 48 inside: odd sizes at every level
        outs = []
        for m in (eager, fused):
            m.zero_grad()
            mu, logvar = m(x)
            (mu.square().mean() + (logvar * torch.linspace(0, 1, 45, dtype=torch.float64)).mean()).backward()
            outs.append((mu.detach(), logvar.detach()))
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
        for (name, a), (_, b) in zip(eager.named_parameters(), fused.named_parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10, msg=f"gradient of {name}, step {step}")
        for (name, a), (_, b) in zip(eager.named_buffers(), fused.named_buffers(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"buffer {name}, step {step}")
    # 7 DoubleConvs x 2 BatchNorm + ReLU per forward, and 3 upsamplings when they are bilinear; two forwards
    assert ops.calls == 2 * (14 + (3 if upsampling == "bilinear" else 0))
    assert int(fused.inc[1].num_batches_tracked) == 2


def test_upsample2_cat_is_bilinear_interpolation() -> None:
    ops = FusedOps(compiled=False)
    for h, w in ((1, 1), (2, 5), (7, 4)):
        y = torch.randn(2, 3, h, w, dtype=torch.float64)
        skip = torch.randn(2, 4, 2 * h, 2 * w, dtype=torch.float64)
        want = torch.cat([F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False), skip], 1)
        torch.testing.assert_close(ops.upsample2_cat(y, skip), want, rtol=1e-12, atol=1e-12)


def test_fused_model_evaluates_with_the_eager_layers() -> None:
    """In eval mode the fused functions are not called, and the running statistics do not move."""
    eager, fused, ops = _pair()
    eager.eval()
    fused.eval()
    before = fused.inc[1].running_mean.clone()
    x = torch.randn(2, 14, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(eager(x), fused(x), rtol=0, atol=0)
    assert ops.calls == 0
    torch.testing.assert_close(fused.inc[1].running_mean, before)


def test_fuse_switches_back_and_copies_share_the_ops() -> None:
    _, fused, ops = _pair()
    twin = copy.deepcopy(fused)
    assert twin.inc.fused is ops and twin.ups[0].fused is ops
    fused.fuse(None)
    fused(torch.randn(2, 14, 16, 16, dtype=torch.float64))
    assert ops.calls == 0


def test_fused_needs_batchnorm() -> None:
    with pytest.raises(ValueError, match="norm=batch"):
        UNet(14, 8, 2, norm="group").fuse(FusedOps(compiled=False))
    with pytest.raises(TuneAgbError, match="'compile: fused' needs 'norm: batch'"):
        config_from_dict({"compile": "fused", "norm": "none"}, "space.yaml")
    assert config_from_dict({"compile": "fused"}).compile == "fused"


def test_recompile_limit_raised_not_lowered() -> None:
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    old = getattr(cfg, name)
    try:
        setattr(cfg, name, 8)
        raise_recompile_limit(64)
        assert getattr(cfg, name) == 64
        raise_recompile_limit(16)
        assert getattr(cfg, name) == 64
    finally:
        setattr(cfg, name, old)
