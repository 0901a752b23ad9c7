"""Does a configuration fit its share of the GPU? Answered before training, by one dry step, measured.

Trials that share a card (``resources.gpu: 0.25``) each get a cap on the memory they may allocate
(``torch.cuda.set_per_process_memory_fraction``). A configuration whose working set exceeds its cap would otherwise
train until the first out-of-memory error. :func:`check_memory_fit` runs one forward and backward pass of a fresh
model at the configuration's batch size and tile size. It reads the peak of the caching allocator, and adds the
optimiser's state (allocated at the first ``step``) and the prefetched batches. When that is above
:data:`HEADROOM` of the share, it raises :class:`~tune_agb.errors.InfeasibleError` with the figures.

Off CUDA there is no cap to respect (a CPU trial's memory is the node's RAM), so nothing is measured there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tune_agb.engine.config import TrainConfig
from tune_agb.engine.device import autocast, memory_format, resolve_amp
from tune_agb.engine.losses import LOSSES
from tune_agb.engine.model import UNet
from tune_agb.errors import InfeasibleError

log = logging.getLogger(__name__)

# Share of the cap the measured working set may take: the rest is for allocator fragmentation, cuDNN workspaces
# of other algorithms and evaluation's buffers.
HEADROOM = 0.9
# Extra float32 copies of the weights the optimiser keeps (AdamW: two moments; SGD: the momentum buffer).
OPTIMIZER_COPIES = {"adam": 2, "adamw": 2, "sgd": 1}
GiB = 2**30


@dataclass
class MemoryFit:
    """A configuration's measured working set on its device share, in bytes."""

    step_peak: int  # weights, gradients, activations and workspaces of one training step
    optimizer_state: int  # the optimiser's state
    batches: int  # the batches in flight (prefetched inputs and labels)
    available: int  # the share: device_share x the card's memory

    @property
    def required(self) -> int:
        return self.step_peak + self.optimizer_state + self.batches

    @property
    def fits(self) -> bool:
        return self.required <= HEADROOM * self.available

    def describe(self, cfg: TrainConfig, tile_hw: tuple[int, int]) -> str:
        return (
            f"needs {self.required / GiB:.2f} GiB (one training step {self.step_peak / GiB:.2f} GiB, optimiser "
            f"state {self.optimizer_state / GiB:.2f} GiB) at batch_size {cfg.batch_size}, {tile_hw[0]}x{tile_hw[1]} "
            f"px, base_channels {cfg.base_channels}, depth {cfg.depth}; its GPU share is "
            f"{self.available / GiB:.2f} GiB (at most {HEADROOM:.0%} of it for training)"
        )


def measure_step_peak(cfg: TrainConfig, tile_hw: tuple[int, int], device: torch.device) -> int:
    """Peak bytes allocated on ``device`` by one training step's forward and backward of a fresh model, at
    ``cfg.batch_size``, in the precision and memory layout training uses. Raises ``torch.OutOfMemoryError`` when
    the step does not fit (under a per-process cap, when it exceeds the cap)."""
    h, w = tile_hw
    fmt = memory_format(cfg, device)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    model = x = y = None
    try:
        with torch.device(device):  # built on the card: no host copy of a large model
            model = UNet.from_config(cfg).to(memory_format=fmt).train()
        x = torch.randn(cfg.batch_size, cfg.in_channels, h, w, device=device).contiguous(memory_format=fmt)
        y = torch.randn(cfg.batch_size, h, w, device=device)
        with autocast(device, resolve_amp(cfg, device)):
            mu, logvar = model(x)
        LOSSES[cfg.loss](mu.float(), logvar.float(), y).backward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    finally:
        del model, x, y
        torch.cuda.empty_cache()


def check_memory_fit(
    cfg: TrainConfig,
    tile_hw: tuple[int, int],
    device: torch.device,
    device_share: float = 1.0,
    *,
    total_memory: int | None = None,
    prefetch: int = 2,
    measure: Callable[[TrainConfig, tuple[int, int], torch.device], int] = measure_step_peak,
) -> MemoryFit | None:
    """Measure ``cfg``'s working set on ``device`` and check it against ``device_share`` of the card.

    Returns the :class:`MemoryFit` (None off CUDA, where nothing is measured). Raises
    :class:`~tune_agb.errors.InfeasibleError` when it does not fit, or when the dry step itself runs out of memory.
    ``total_memory``: the card's bytes (None: asked from CUDA); ``measure``: the dry step (replaceable in tests).
    """
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory if total_memory is None else total_memory
    available = int(min(1.0, device_share) * total)
    with torch.device("meta"):  # shapes only: nothing allocated or initialised
        n_params = sum(p.numel() for p in UNet.from_config(cfg).parameters())
    opt_state = OPTIMIZER_COPIES.get(cfg.optimizer, 2) * 4 * n_params  # the optimiser's copies of the weights
    h, w = tile_hw
    batches = (prefetch + 1) * cfg.batch_size * (cfg.in_channels + 1) * h * w * 4
    try:
        peak = measure(cfg, tile_hw, device)
    except torch.OutOfMemoryError:
        raise InfeasibleError(
            f"infeasible: one training step at batch_size {cfg.batch_size} ({h}x{w} px, base_channels "
            f"{cfg.base_channels}, depth {cfg.depth}) ran out of memory within its GPU share of "
            f"{available / GiB:.2f} GiB; lower batch_size or base_channels, or give trials a larger share",
            None,
            available,
        ) from None
    fit = MemoryFit(peak, opt_state, batches, available)
    log.info("memory fit: %s", fit.describe(cfg, tile_hw))
    if not fit.fits:
        raise InfeasibleError(
            f"infeasible: {fit.describe(cfg, tile_hw)}; lower batch_size or base_channels, or give trials a larger "
            "share",
            fit.required,
            available,
        )
    return fit
