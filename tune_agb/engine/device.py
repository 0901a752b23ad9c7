"""Where and in what precision a model runs: the device, mixed precision (AMP) and the tensor memory layout.

One place for these choices so that training, evaluation and inference run a model the same way.
"""

from __future__ import annotations

import contextlib

import torch

from tune_agb.engine.config import TrainConfig
from tune_agb.errors import TuneAgbError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; an unusable name is one error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TuneAgbError(f"--device {name}: CUDA is not available on this machine (use auto or cpu)")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise TuneAgbError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}")
    return torch.device(name)


def resolve_amp(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``cfg.amp`` on ``device`` (None: full precision).

    auto: bf16 on CUDA, full precision on CPU (bf16 autocast on CPU is slower than fp32 on most CPUs)."""
    if cfg.amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[cfg.amp]


def autocast(device: torch.device, amp: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``amp`` on ``device``'s type, or a no-op context when ``amp`` is None."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp)


def memory_format(cfg: TrainConfig, device: torch.device) -> torch.memory_format:
    """channels_last where it pays: on CUDA (tensor cores). On CPU it measured 10-14 % slower at 244 px
    (bench/RESULTS.md), so CPU runs keep the contiguous layout whatever ``cfg.channels_last`` says."""
    return torch.channels_last if cfg.channels_last and device.type == "cuda" else torch.contiguous_format


def tune_cuda(device: torch.device, benchmark: bool = True) -> None:
    """Process-wide CUDA settings for training: ``cudnn.benchmark`` picks the fastest convolution algorithms for
    the (fixed) tile and batch shapes once, on the first step of each shape. No effect off CUDA."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = benchmark


def compile_for_training(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """The callable training steps run: ``model`` itself (``fused``: switched to its fused layers, see
    :meth:`UNet.fuse <tune_agb.engine.model.UNet.fuse>`), or ``torch.compile(model)`` in ``cfg.compile``'s mode.

    The compiled wrapper shares the model's parameters and buffers (checkpoints save ``model``, never the wrapper).
    It compiles on its first call, once per process and shape; evaluation runs ``model`` uncompiled."""
    if cfg.compile == "none":
        return model
    if cfg.compile == "fused":
        from tune_agb.engine.fused import FusedOps

        return model.fuse(FusedOps())
    return torch.compile(model, mode=cfg.compile, dynamic=False)
