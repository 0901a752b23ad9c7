"""A small U-Net that predicts a mean and a log-variance per pixel.

Input (B, C, H, W) of any H, W: it is padded (replicate) to a multiple of 2**depth and the output cropped back.
Output (B, 2, H, W): channel 0 the mean, channel 1 the log-variance, squashed smoothly into
[logvar_min, logvar_max] (default [-10, 10] in standardised target units: sigma from 0.007 to 148 target stds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tune_agb.engine.config import TrainConfig
from tune_agb.engine.fused import FusedOps


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        # The most groups (up to 8) that divide the width: GroupNorm(8, 12) fails, e.g. for base_channels=12.
        return nn.GroupNorm(max(g for g in range(1, 9) if channels % g == 0), channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


class DoubleConv(nn.Sequential):
    """(3x3 conv -> norm -> ReLU) twice. With ``fused`` set (:meth:`UNet.fuse`) and in training mode, each norm +
    ReLU pair runs as one fused function (:mod:`tune_agb.engine.fused`)."""

    fused: FusedOps | None = None

    def __init__(self, cin: int, cout: int, norm: str):
        bias = norm == "none"
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=bias),
            norm_layer(norm, cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=bias),
            norm_layer(norm, cout),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is None or not self.training:
            return super().forward(x)
        conv1, bn1, _, conv2, bn2, _ = self
        return self.fused.batchnorm_relu(conv2(self.fused.batchnorm_relu(conv1(x), bn1)), bn2)


class Up(nn.Module):
    """Upsample by 2, concatenate the skip connection, DoubleConv. With ``fused`` set and in training mode, the
    bilinear upsampling and the concatenation run as one fused function."""

    fused: FusedOps | None = None

    def __init__(self, cin: int, cskip: int, cout: int, upsampling: str, norm: str, dropout: float):
        super().__init__()
        if upsampling == "bilinear":
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), nn.Conv2d(cin, cin // 2, 1)
            )
        else:
            self.up = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
        self.conv = DoubleConv(cin // 2 + cskip, cout, norm)
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if isinstance(self.up, nn.Sequential):
            # Bilinear: the 1x1 convolution first, at the coarse resolution, then the upsampling. Both are linear
            # and the bilinear weights of each output pixel sum to 1, so the order gives the same function (and the
            # same weights, ``up.1``) at a quarter of the convolution's work and half the upsampling's bytes: the
            # upsampling and its backward were 18 % of a CUDA step at 244 px (bench/RESULTS.md).
            upsample, conv = self.up
            if self.fused is not None and self.training:
                return self.drop(self.conv(self.fused.upsample2_cat(conv(x), skip)))
            up = upsample(conv(x))
        else:
            up = self.up(x)
        return self.drop(self.conv(torch.cat([up, skip], dim=1)))


class UNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 14,
        base_channels: int = 32,
        depth: int = 4,
        upsampling: str = "bilinear",
        dropout: float = 0.0,
        norm: str = "batch",
        logvar_min: float = -10.0,
        logvar_max: float = 10.0,
    ):
        super().__init__()
        self.depth = depth
        self.logvar_min, self.logvar_max = logvar_min, logvar_max
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.inc = DoubleConv(in_channels, widths[0], norm)
        self.downs = nn.ModuleList(DoubleConv(widths[i], widths[i + 1], norm) for i in range(depth))
        self.mid_drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.ups = nn.ModuleList(
            Up(widths[i + 1], widths[i], widths[i], upsampling, norm, dropout) for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], 2, 1)

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> UNet:
        return cls(
            cfg.in_channels,
            cfg.base_channels,
            cfg.depth,
            cfg.upsampling,
            cfg.dropout,
            cfg.norm,
            cfg.logvar_min,
            cfg.logvar_max,
        )

    def fuse(self, ops: FusedOps | None) -> UNet:
        """Train with ``ops``' fused BatchNorm + ReLU and upsampling + concatenation (None: the eager layers again).
        Only models with BatchNorm qualify; the weights, state_dict and evaluation are unchanged."""
        if ops is not None:
            norms = [m[1] for m in self.modules() if isinstance(m, DoubleConv)]
            if not all(isinstance(n, nn.BatchNorm2d) and n.affine and n.momentum is not None for n in norms):
                raise ValueError("fused training needs norm=batch (BatchNorm with affine weights and a momentum)")
        for m in self.modules():
            if isinstance(m, DoubleConv | Up):
                m.fused = ops
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> the last decoder layer's features (B, base_channels, H, W): what the 1x1 head reads."""
        h, w = x.shape[-2:]
        m = 2**self.depth
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        y = self.mid_drop(skips.pop())
        for up in self.ups:
            y = up(y, skips.pop())
        return y[..., :h, :w]  # the head is 1x1: cropping before it gives the same output

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) -> (mean (B, H, W), log-variance (B, H, W))."""
        out = self.head(self.features(x)).float()
        mean = out[:, 0]
        logvar = self.logvar_min + (self.logvar_max - self.logvar_min) * torch.sigmoid(out[:, 1])
        return mean, logvar
