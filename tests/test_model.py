"""The U-Net: any tile size, every architecture option, bounded log-variance (issue 2, point 4)."""

from __future__ import annotations

import itertools

import pytest
import torch

from tune_agb.engine.config import CHOICES, TrainConfig
from tune_agb.engine.model import UNet


def _count(model: torch.nn.Module, cls: type) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


@pytest.mark.parametrize(
    ("h", "w", "depth", "upsampling", "norm"),
    [
        (37, 53, 1, "bilinear", "batch"),
        (37, 53, 4, "transpose", "group"),
        (64, 64, 4, "bilinear", "instance"),
        (64, 64, 2, "transpose", "none"),
        (45, 31, 3, "bilinear", "group"),
        (33, 40, 2, "transpose", "batch"),
        (50, 19, 1, "transpose", "instance"),
    ],
)
def test_any_size_every_option_shapes_and_grads(h: int, w: int, depth: int, upsampling: str, norm: str) -> None:
    torch.manual_seed(0)
    model = UNet(in_channels=5, base_channels=4, depth=depth, upsampling=upsampling, dropout=0.2, norm=norm)
    x = torch.randn(2, 5, h, w, requires_grad=True)
    mean, logvar = model(x)
    assert mean.shape == (2, h, w) and logvar.shape == (2, h, w)
    assert mean.dtype == torch.float32 and logvar.dtype == torch.float32
    (mean.square().mean() + logvar.mean()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # The crop keeps the top-left H x W: the last row/column of the input influences the output.
    assert x.grad[:, :, -1, -1].abs().sum() > 0


def test_all_norm_and_upsampling_choices_build() -> None:
    """Every value the config allows builds a model with the layers it names."""
    layer = {"batch": torch.nn.BatchNorm2d, "group": torch.nn.GroupNorm, "instance": torch.nn.InstanceNorm2d}
    for norm, up in itertools.product(CHOICES["norm"], CHOICES["upsampling"]):
        model = UNet.from_config(TrainConfig(in_channels=3, base_channels=4, depth=2, norm=norm, upsampling=up))
        if norm in layer:
            assert _count(model, layer[norm]) == 2 * (1 + 2 + 2)  # DoubleConv: inc, 2 downs, 2 ups
        else:
            assert _count(model, torch.nn.BatchNorm2d) == _count(model, torch.nn.GroupNorm) == 0
        assert (_count(model, torch.nn.ConvTranspose2d) == 2) == (up == "transpose")
        assert model(torch.randn(2, 3, 20, 12))[0].shape == (2, 20, 12)


@pytest.mark.parametrize("base", [4, 6, 12, 20])
def test_group_norm_with_widths_not_divisible_by_eight(base: int) -> None:
    model = UNet(in_channels=3, base_channels=base, depth=2, norm="group")
    for m in model.modules():
        if isinstance(m, torch.nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0 and m.num_groups <= 8
    assert model(torch.randn(1, 3, 16, 16))[0].shape == (1, 16, 16)


def test_depth_sets_the_number_of_levels() -> None:
    for depth in range(1, 5):
        model = UNet(in_channels=2, base_channels=4, depth=depth)
        assert len(model.downs) == len(model.ups) == depth
        assert model.downs[-1][0].out_channels == 4 * 2**depth


@pytest.mark.parametrize("lo_hi", [(-10.0, 10.0), (-3.0, 2.0)])
def test_logvar_stays_inside_its_range(lo_hi: tuple[float, float]) -> None:
    lo, hi = lo_hi
    torch.manual_seed(0)
    model = UNet(in_channels=3, base_channels=4, depth=2, norm="none", logvar_min=lo, logvar_max=hi).eval()
    x = torch.randn(4, 3, 24, 24) * 100
    seen = []
    for push in (-1e4, 0.0, 1e4):  # drive the raw head far into both tails, and leave it alone
        with torch.no_grad():
            model.head.bias[1] = push
            _, logvar = model(x)
        assert logvar.min() >= lo and logvar.max() <= hi
        seen.append(logvar)
    # Both ends are actually reached (within float32 of the sigmoid), i.e. the range is the clamp, not luck.
    assert seen[0].max() < lo + 0.01 and seen[2].min() > hi - 0.01
    assert lo < seen[1].mean() < hi


def test_dropout_active_in_train_mode_only() -> None:
    torch.manual_seed(0)
    model = UNet(in_channels=3, base_channels=4, depth=2, dropout=0.5, norm="group")
    x = torch.randn(2, 3, 16, 16)
    model.train()
    assert not torch.equal(model(x)[0], model(x)[0])
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])
    no_drop = UNet(in_channels=3, base_channels=4, depth=2, dropout=0.0, norm="group")
    assert _count(no_drop, torch.nn.Dropout2d) == 0 and _count(model, torch.nn.Dropout2d) == 3


@pytest.mark.parametrize("upsampling", ["bilinear", "transpose"])
def test_channels_last_gives_the_same_result(upsampling: str) -> None:
    torch.manual_seed(0)
    model = UNet(in_channels=14, base_channels=8, depth=3, upsampling=upsampling).eval()
    x = torch.randn(2, 14, 40, 36)
    ref_mu, ref_lv = model(x)
    model_cl = model.to(memory_format=torch.channels_last)
    mu, lv = model_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(mu, ref_mu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lv, ref_lv, rtol=1e-4, atol=1e-4)


def test_from_config_uses_every_architecture_field() -> None:
    cfg = TrainConfig(in_channels=7, base_channels=6, depth=3, upsampling="transpose", dropout=0.1, norm="group")
    cfg = cfg.replace(logvar_min=-4.0, logvar_max=3.0)
    model = UNet.from_config(cfg)
    assert model.inc[0].in_channels == 7 and model.inc[0].out_channels == 6
    assert model.depth == 3 and (model.logvar_min, model.logvar_max) == (-4.0, 3.0)
    assert _count(model, torch.nn.ConvTranspose2d) == 3 and _count(model, torch.nn.Dropout2d) == 4


def test_bilinear_up_convolves_before_upsampling_with_the_same_function() -> None:
    """Up (bilinear) runs its 1x1 convolution at the coarse resolution, then upsamples: the same function as
    upsampling first (the order of the Sequential ``up``, whose weights checkpoints keep), in float64."""
    from tune_agb.engine.model import Up

    torch.manual_seed(3)
    up = Up(16, 8, 8, "bilinear", "batch", 0.0).double().eval()
    with torch.no_grad():
        up.conv[1].running_mean.uniform_(-0.5, 0.5)  # a non-trivial BatchNorm in eval mode
        up.up[1].bias.uniform_(-1.0, 1.0)  # the bias commutes too: the bilinear weights sum to 1
    x, skip = torch.randn(2, 16, 7, 9, dtype=torch.float64), torch.randn(2, 8, 14, 18, dtype=torch.float64)
    reference = up.drop(up.conv(torch.cat([up.up(x), skip], dim=1)))  # upsample, then convolve
    seen: list[tuple[int, ...]] = []
    hook = up.up[1].register_forward_hook(lambda _m, inp, _out: seen.append(tuple(inp[0].shape[-2:])))
    out = up(x, skip)
    hook.remove()
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    assert seen == [(7, 9)]  # the 1x1 convolution ran at the coarse resolution
    assert [k for k in up.state_dict() if k.startswith("up.")] == ["up.1.weight", "up.1.bias"]
