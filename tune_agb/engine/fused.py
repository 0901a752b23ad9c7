"""The U-Net's memory-bound work in fewer passes: BatchNorm + ReLU, and bilinear upsampling + concatenation, each
one compiled function; the convolutions stay with cuDNN.

On an H200 the convolutions of a training step ran at ~580 TFLOP/s, but BatchNorm, ReLU, the upsampling, the
concatenation and the copies between them took twice their time (bench/RESULTS.md, "Where the time goes"), and a
``torch.compile`` of the whole model was slower than eager. Here only those memory-bound pieces are compiled:

- :meth:`FusedOps.batchnorm_relu`: training-mode BatchNorm (batch statistics, the running statistics updated exactly as
  ``nn.BatchNorm2d`` does) and ReLU: one reduction and one elementwise pass forward, the same backward, instead of
  BatchNorm's kernels plus a separate ReLU each way;
- :meth:`FusedOps.upsample2_cat`: bilinear upsampling by 2 (``align_corners=False``) written as fixed 0.25/0.75
  blends of neighbours, so that its backward is elementwise too (the native backward accumulates with atomics), written
  straight into the concatenation with the skip connection.

Both are the same functions as the eager layers (tests/test_fused.py checks them in float64 on the CPU, run op by
op; tests/test_cuda.py checks the compiled ones on a GPU), so a model trained either way has the same weights,
state_dict keys and checkpoints. :meth:`UNet.fuse <tune_agb.engine.model.UNet.fuse>` switches a model to them; only
training-mode forwards use them (evaluation runs the eager layers). The config key ``compile: fused`` selects this
path for training. Measured on an H200 (bench/RESULTS.md): 25 % less device time per step, but 22 guarded compiled
calls per step add host time, so it pays only where the device work hides the host (batch 32 and up).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _batchnorm_relu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """relu(batch_norm(x)) in training mode, statistics in float32 (or x's wider dtype), the result in x's dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    var, mean = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
    n = xf.numel() // xf.shape[1]
    with torch.no_grad():  # nn.BatchNorm2d's update: the running variance is the unbiased one
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        running_var.lerp_((var * (n / max(n - 1, 1))).to(running_var.dtype), momentum)
        num_batches_tracked.add_(1)
    scale = weight.to(xf.dtype) * torch.rsqrt(var + eps)
    shift = bias.to(xf.dtype) - mean * scale
    return torch.relu(xf * scale[None, :, None, None] + shift[None, :, None, None]).to(x.dtype)


def _upsample2(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Bilinear (align_corners=False) upsampling by 2 along ``dim``: output 2i is 0.25 x[i-1] + 0.75 x[i], output
    2i+1 is 0.75 x[i] + 0.25 x[i+1], the neighbours clamped at the edges (as ``F.interpolate`` clamps)."""
    n = x.shape[dim]
    prev = torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, n - 1)], dim)
    nxt = torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 1, 1)], dim)
    even, odd = 0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt
    return torch.stack([even, odd], dim + 1).flatten(dim, dim + 1)


def _upsample2_cat(y: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """cat([bilinear_x2(y), skip], channels), in skip's dtype and memory layout."""
    up = _upsample2(_upsample2(y.to(torch.promote_types(y.dtype, torch.float32)), 2), 3).to(skip.dtype)
    out = torch.cat([up, skip], 1)
    if skip.is_contiguous(memory_format=torch.channels_last) and not skip.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


class FusedOps:
    """The two functions, compiled (``torch.compile``, static shapes) or as plain torch code (``compiled=False``: the
    same arithmetic op by op, for checking on any device)."""

    def __init__(self, compiled: bool = True):
        self.compiled = compiled
        if compiled:
            raise_recompile_limit()
            self._bn_relu: Callable[..., torch.Tensor] = torch.compile(_batchnorm_relu, dynamic=False)
            self._up_cat: Callable[..., torch.Tensor] = torch.compile(_upsample2_cat, dynamic=False)
        else:
            self._bn_relu, self._up_cat = _batchnorm_relu, _upsample2_cat

    def __deepcopy__(self, memo: dict) -> FusedOps:
        return self  # no state: a copied model shares the compiled functions

    def batchnorm_relu(self, x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
        """``relu(bn(x))`` for a BatchNorm layer in training mode (its running statistics updated)."""
        return self._bn_relu(
            x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum, bn.eps
        )

    def upsample2_cat(self, y: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``cat([upsample_bilinear_x2(y), skip], 1)`` (align_corners=False)."""
        return self._up_cat(y, skip)


# One U-Net has a BatchNorm + ReLU at 5 shapes (base width x 2**level at tile / 2**level) and an upsampling at 4, per
# batch size; torch's default of 8 compiled versions per function would send the rest back to eager silently.
RECOMPILE_LIMIT = 64


def raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    """Let each compiled function keep ``limit`` shape-specialised versions. torch has no public setting for this:
    ``torch._dynamo.config.recompile_limit`` (``cache_size_limit`` before torch 2.6) is the one place we touch it."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), limit))
