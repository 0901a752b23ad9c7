"""Tiles on disk -> validated contiguous arrays -> normalised tensors on the training device.

Layout: ``INPUT_DIR/{split}/NAME.npy`` holds a (C, H, W) image, ``LABEL_DIR/{split}/NAME.npy`` the (H, W) or
(1, H, W) label of the same tile, NaN where no GEDI footprint fell.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tune_agb.bands import BAND_NAMES, SPLITS
from tune_agb.errors import TuneAgbError

log = logging.getLogger(__name__)

# Above this many bytes a split is assembled in a memory-mapped file instead of RAM.
MMAP_THRESHOLD_BYTES = int(os.environ.get("TUNE_AGB_MMAP_BYTES", 4 * 1024**3))


@dataclass
class TileSet:
    """All tiles of one split. ``inputs`` (N, C, H, W) raw float32, ``labels`` (N, H, W) float32, NaN = none."""

    split: str
    names: list[str]
    inputs: np.ndarray
    labels: np.ndarray

    @property
    def num_labelled(self) -> int:
        return int(np.isfinite(self.labels).sum())

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class NormStats:
    """Per-band mean/std of the train split (NaN-aware) and the target's mean/std (for standardisation)."""

    mean: list[float]
    std: list[float]
    target_mean: float = 0.0
    target_std: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "target_mean": float(self.target_mean),
            "target_std": float(self.target_std),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NormStats:
        return cls(
            mean=[float(v) for v in d["mean"]],
            std=[float(v) for v in d["std"]],
            target_mean=float(d["target_mean"]),
            target_std=float(d["target_std"]),
        )

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) raw -> standardised float32; non-finite values become 0 (the band mean)."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        x = (x.float() - mean) / std
        return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def _load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise TuneAgbError(f"{path}: not a readable .npy array ({str(exc).splitlines()[0]})") from None
    if not isinstance(arr, np.ndarray):
        raise TuneAgbError(f"{path}: expected one array, found an archive")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TuneAgbError(f"{path}: dtype {arr.dtype} is not numeric (expected float or int)")
    return arr


def list_split(input_dir: Path, label_dir: Path, split: str) -> list[str]:
    """Tile names of one split, checked to exist on both sides with the same names."""
    idir, ldir = Path(input_dir) / split, Path(label_dir) / split
    for d in (idir, ldir):
        if not d.is_dir():
            raise TuneAgbError(f"{d}: split folder '{split}' is missing (expected {{train,val,test}}/NAME.npy)")
    inames = sorted(p.stem for p in idir.glob("*.npy"))
    lnames = sorted(p.stem for p in ldir.glob("*.npy"))
    if not inames:
        raise TuneAgbError(f"{idir}: split '{split}' holds no .npy tiles")
    if inames != lnames:
        only_in = sorted(set(inames) - set(lnames))
        only_lab = sorted(set(lnames) - set(inames))
        parts = []
        if only_in:
            parts.append(f"inputs without labels: {', '.join(only_in[:5])}{' ...' if len(only_in) > 5 else ''}")
        if only_lab:
            parts.append(f"labels without inputs: {', '.join(only_lab[:5])}{' ...' if len(only_lab) > 5 else ''}")
        raise TuneAgbError(f"{idir} vs {ldir}: tile names differ ({'; '.join(parts)})")
    return inames


def load_split(
    input_dir: str | Path,
    label_dir: str | Path,
    split: str,
    in_channels: int | None = None,
    require_labels: bool = True,
) -> TileSet:
    """Validate and load one split into contiguous arrays (memory-mapped when larger than the threshold)."""
    input_dir, label_dir = Path(input_dir), Path(label_dir)
    names = list_split(input_dir, label_dir, split)
    # Headers first (cheap, memory-mapped): every problem is reported before any data is copied.
    first = _load_npy(input_dir / split / f"{names[0]}.npy", mmap=True)
    if first.ndim != 3:
        raise TuneAgbError(f"{input_dir / split / names[0]}.npy: image must be (C, H, W), got shape {first.shape}")
    c, h, w = first.shape
    if in_channels is not None and c != in_channels:
        raise TuneAgbError(
            f"{input_dir / split / names[0]}.npy: has {c} channels, expected {in_channels} "
            f"({' '.join(BAND_NAMES) if in_channels == len(BAND_NAMES) else 'in_channels'})"
        )
    for name in names:
        ipath, lpath = input_dir / split / f"{name}.npy", label_dir / split / f"{name}.npy"
        img = _load_npy(ipath, mmap=True)
        if img.ndim == 3 and img.shape[0] != c:
            raise TuneAgbError(f"{ipath}: has {img.shape[0]} channels, expected {c} like the other tiles")
        if img.shape != (c, h, w):
            raise TuneAgbError(f"{ipath}: shape {img.shape}, expected {(c, h, w)} like the other tiles")
        lab = _load_npy(lpath, mmap=True)
        if lab.shape not in ((h, w), (1, h, w)):
            raise TuneAgbError(
                f"{lpath}: label shape {lab.shape} does not match its image; expected {(h, w)} or {(1, h, w)}"
            )
    n = len(names)
    nbytes = n * c * h * w * 4
    if nbytes > MMAP_THRESHOLD_BYTES:
        fd, tmp = tempfile.mkstemp(prefix=f"tune_agb_{split}_", suffix=".npy")
        os.close(fd)
        inputs = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, c, h, w))
        log.info("split %s: %.1f GB, assembled memory-mapped in %s", split, nbytes / 1e9, tmp)
        # The mapping stays valid after the name is gone (POSIX): the space is freed when the array is, instead of
        # leaving gigabytes in the temp folder after every run. (Windows refuses while mapped: keep the file.)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    else:
        inputs = np.empty((n, c, h, w), dtype=np.float32)
    labels = np.empty((n, h, w), dtype=np.float32)
    for i, name in enumerate(names):
        ipath = input_dir / split / f"{name}.npy"
        inputs[i] = _load_npy(ipath)
        finite = np.isfinite(inputs[i])
        if not finite.any():
            raise TuneAgbError(f"{ipath}: every input value is NaN/inf (expected a finite image)")
        labels[i] = _load_npy(label_dir / split / f"{name}.npy").reshape(h, w)
    labels[~np.isfinite(labels)] = np.nan
    tiles = TileSet(split=split, names=names, inputs=inputs, labels=labels)
    if require_labels and tiles.num_labelled == 0:
        raise TuneAgbError(f"{label_dir / split}: split '{split}' has no labelled pixel (all labels are NaN)")
    return tiles


def load_dataset(
    input_dir: str | Path, label_dir: str | Path, splits: tuple[str, ...] = SPLITS, in_channels: int | None = None
) -> dict[str, TileSet]:
    """Load and validate several splits; all splits must share channel count and tile shape."""
    out = {s: load_split(input_dir, label_dir, s, in_channels=in_channels) for s in splits}
    shapes = {s: t.inputs.shape[1:] for s, t in out.items()}
    ref = next(iter(shapes.values()))
    for s, shp in shapes.items():
        if shp[0] != ref[0]:
            raise TuneAgbError(f"{Path(input_dir) / s}: {shp[0]} channels, but other splits have {ref[0]}")
    return out


def compute_norm_stats(train: TileSet, standardize_target: bool = True, chunk: int = 64) -> NormStats:
    """NaN-aware per-band mean/std over the train split, accumulated in float64 chunk by chunk."""
    c = train.inputs.shape[1]
    s = np.zeros(c)
    ss = np.zeros(c)
    cnt = np.zeros(c)
    for i in range(0, len(train), chunk):
        block = np.asarray(train.inputs[i : i + chunk], dtype=np.float64)
        fin = np.isfinite(block)
        block = np.where(fin, block, 0.0)
        s += block.sum(axis=(0, 2, 3))
        ss += (block**2).sum(axis=(0, 2, 3))
        cnt += fin.sum(axis=(0, 2, 3))
    bands = BAND_NAMES if c == len(BAND_NAMES) else [str(i) for i in range(c)]
    for b in range(c):
        if cnt[b] == 0:
            raise TuneAgbError(f"train split: band {bands[b]} is NaN/inf in every tile; cannot normalise it")
    mean = s / cnt
    std = np.sqrt(np.maximum(ss / cnt - mean**2, 0.0))
    std = np.where(std > 1e-6, std, 1.0)
    tmean, tstd = 0.0, 1.0
    if standardize_target:
        lab = train.labels[np.isfinite(train.labels)].astype(np.float64)
        tmean = float(lab.mean())
        tstd = float(lab.std()) if lab.size > 1 and lab.std() > 1e-6 else 1.0
    return NormStats(mean=mean.tolist(), std=std.tolist(), target_mean=tmean, target_std=tstd)


def count_nonfinite(tiles: TileSet, chunk: int = 64) -> int:
    return int(sum((~np.isfinite(tiles.inputs[i : i + chunk])).sum() for i in range(0, len(tiles), chunk)))


class DeviceTiles:
    """One split, normalised once and kept on the device when it fits there (else in pinned host memory).

    ``x`` is (N, C, H, W) float32 (channels_last when asked), ``y`` (N, H, W) float32 in standardised target
    units with NaN where there is no label.
    """

    def __init__(
        self, tiles: TileSet, norm: NormStats, device: torch.device, channels_last: bool = True, chunk: int = 64
    ):
        self.split = tiles.split
        self.names = tiles.names
        n, c, h, w = tiles.inputs.shape
        self.shape = (n, c, h, w)
        nbytes = n * (c + 1) * h * w * 4
        resident = device.type != "cuda" or nbytes < 0.6 * torch.cuda.mem_get_info(device)[0]
        self.device = device
        store = device if resident else torch.device("cpu")
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.x = torch.empty((n, c, h, w), dtype=torch.float32, device=store, memory_format=fmt)
        for i in range(0, n, chunk):
            block = torch.from_numpy(np.ascontiguousarray(tiles.inputs[i : i + chunk])).to(store)
            self.x[i : i + chunk] = norm.normalize(block)
        y = torch.from_numpy(np.ascontiguousarray(tiles.labels)).to(store)
        self.y = (y - norm.target_mean) / norm.target_std
        if not resident:
            self.x, self.y = self.x.pin_memory(), self.y.pin_memory()
        self.resident = resident

    def __len__(self) -> int:
        return self.shape[0]

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather tiles ``idx`` (a tensor on the storage device) and return them on the training device."""
        x, y = self.x[idx], self.y[idx]
        if not self.resident:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return x, y
