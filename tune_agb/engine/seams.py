"""How far a window's edge reaches into a U-Net's output: the margin that tiled prediction must discard.

A pixel near a window's edge sees the model's zero padding instead of its real neighbours. Beyond some distance
from the edge (the receptive field, in practice less: distant pixels weigh almost nothing) the output no longer
depends on what lies outside the window. :func:`measure_margin` measures that distance for a trained model once, by
comparing the output of a window with the output of a much larger image around it. Windows must also start on the
model's downsampling grid (multiples of ``2 ** depth``), or max-pooling sees a shifted grid and even window
interiors differ from the whole-image map: :func:`grid_step` gives that step.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tune_agb.engine.model import UNet

# Tolerance relative to the size of the model's outputs (mean and log-variance): far below any map's noise.
MARGIN_TOLERANCE = 1e-4


def grid_step(model: UNet) -> int:
    """Windows of ``model`` must start on multiples of this many pixels (its total downsampling)."""
    return 2**model.depth


def receptive_radius_bound(depth: int) -> int:
    """An upper bound of the U-Net's receptive-field radius (px): two 3x3 convs per level on the way down and up,
    each pooling and upsampling step, summed at each level's pixel size; with slack."""
    return 10 * 2**depth + 4


@torch.no_grad()
def measure_margin(
    model: UNet, in_channels: int, device: torch.device | str = "cpu", tol: float = MARGIN_TOLERANCE, seed: int = 0
) -> int | None:
    """Pixels from a window's edge beyond which ``model``'s output equals the whole-image output (to ``tol``).

    A grid-aligned window of twice the receptive-field bound is cut from the middle of a random (standard normal,
    i.e. normalised) image large enough that the image's own edges cannot reach it; both are predicted in float32
    and the margin is the smallest distance from the window's edge beyond which mean and log-variance agree to
    ``tol`` times their size over the window (the larger of their spread and their mean absolute value).

    Returns:
        The margin rounded up to the model's grid step, or None when no margin inside the window makes the outputs
        agree (e.g. instance or group normalisation, whose statistics are taken over the whole window).
    """
    step = grid_step(model)
    bound = receptive_radius_bound(model.depth)
    offset = math.ceil((bound + step) / step) * step
    window = math.ceil(2 * (bound + step) / step) * step
    size = window + 2 * offset
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, in_channels, size, size, generator=gen).to(device)
    was_training = model.training
    model.eval()
    try:
        whole = model(x)
        part = model(x[..., offset : offset + window, offset : offset + window])
    finally:
        model.train(was_training)
    diff = np.zeros((window, window))
    for w, p in zip(whole, part, strict=True):
        w = w[0, offset : offset + window, offset : offset + window].float()
        # relative to the output's size: its spread or its level, whichever is larger (a fresh model's are tiny)
        scale = max(float(w.std()), float(w.abs().mean()), 1e-2)
        diff = np.maximum(diff, ((w - p[0].float()).abs() / scale).cpu().numpy())
    edge = np.minimum(np.arange(window), window - 1 - np.arange(window))
    dist = np.minimum(edge[:, None], edge[None, :])
    worst_at = np.zeros(window // 2)
    np.maximum.at(worst_at, dist.ravel(), diff.ravel())
    # worst difference among the pixels at distance >= k from the edge, for every k
    worst = np.maximum.accumulate(worst_at[::-1])[::-1]
    ok = np.flatnonzero(worst <= tol)
    # The receptive field ends within the bound: agreement only beyond it is chance (window-wide normalisation).
    if len(ok) == 0 or ok[0] > bound:
        return None
    return math.ceil(int(ok[0]) / step) * step
