"""Canopy texture features: each band's local standard deviation over square windows.

The texture forest (``python -m tune_agb.baseline --texture-windows 3,7,15``) adds them to each pixel's bands; on
the real tiles it is the best baseline (bench/RESULTS.md, "Canopy texture"). The U-Net does not use them: as extra
input channels they measured no gain on region A's 17 tiles, and that option was removed in tune_agb 0.2; given
to the shipped recipe on both regions' 47 tiles (``bench/texture_tiles.py``) they did not help either
(bench/RESULTS.md, "Two regions, seventh run").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tune_agb.errors import TuneAgbError


def parse_windows(value: Any, source: str = "config") -> tuple[int, ...]:
    """Window sizes (px) from "3,7,15", 7, or "" (none). Each must be an odd integer >= 3, given once.

    Raises:
        TuneAgbError: naming ``source``, for anything else.
    """
    text = str(value).strip()
    parts = [p.strip() for p in text.split(",")] if text else []
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        sizes = ()
    if (
        len(sizes) != len(parts)
        or isinstance(value, (bool, float))
        or any(w < 3 or w % 2 == 0 for w in sizes)
        or len(set(sizes)) != len(sizes)
    ):
        raise TuneAgbError(
            f"{source}: 'texture_windows' must be distinct odd window sizes >= 3, comma-separated (e.g. \"3,7,15\"), "
            f'or "" for none; got {value!r}'
        )
    return sizes


class Texture(nn.Module):
    """The input bands, followed by each band's local standard deviation over square windows (reflect-padded at the
    edges), window by window: (B, C, H, W) -> (B, C * (1 + len(windows)), H, W). No weights; computed in float32
    (a variance from E[x^2] - E[x]^2 loses too much in bf16)."""

    def __init__(self, windows: tuple[int, ...]):
        super().__init__()
        self.windows = tuple(windows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.windows:
            return x
        xf = x.float()
        sq = xf * xf
        out = [x]
        for w in self.windows:
            r = w // 2
            pad = (r, r, r, r)
            m = F.avg_pool2d(F.pad(xf, pad, mode="reflect"), w, stride=1)
            m2 = F.avg_pool2d(F.pad(sq, pad, mode="reflect"), w, stride=1)
            out.append((m2 - m * m).clamp_min(0).sqrt().to(x.dtype))
        return torch.cat(out, 1)
