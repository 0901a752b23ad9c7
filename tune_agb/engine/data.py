"""Tiles on disk -> validated contiguous arrays -> normalised tensors on the training device.

Layout: ``INPUT_DIR/{split}/NAME.npy`` holds a (C, H, W) image, ``LABEL_DIR/{split}/NAME.npy`` the (H, W) or
(1, H, W) label of the same tile, NaN where no GEDI footprint fell.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
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
    """All tiles of one split. ``inputs`` (N, C, H, W) raw (float32 in RAM, or a read-only memory map of the packed
    store in its storage dtype), ``labels`` (N, H, W) float32, NaN = none.

    ``labelled`` and ``nonfinite`` are the counts of labelled pixels and of non-finite input values when already
    known (the store records them while packing); None: counted from the arrays when asked."""

    split: str
    names: list[str]
    inputs: np.ndarray | StackedRows
    labels: np.ndarray | StackedRows
    labelled: int | None = None
    nonfinite: int | None = None

    @property
    def num_labelled(self) -> int:
        if self.labelled is None:
            self.labelled = int(sum(np.isfinite(self.labels[i : i + 256]).sum() for i in range(0, len(self), 256)))
        return self.labelled

    def __len__(self) -> int:
        return len(self.names)


class StackedRows:
    """Chosen rows of several arrays, seen as one read-only array (N, ...) without copying them: a cross-validation
    fold's tiles, drawn from the train and val splits' stores.

    ``parts`` are ``(array, rows)`` pairs: the rows (int indices along the first axis) of each array, in order; all
    arrays share their trailing shape. It has what the loaders use: ``shape``, ``dtype`` (the arrays' common type),
    ``nbytes``, ``len`` and indexing by an int, a slice or an int array (which gathers those rows into a new array);
    the streaming reader reads its rows from each part's memory map directly.
    """

    def __init__(self, parts: Sequence[tuple[np.ndarray, Sequence[int] | np.ndarray]]):
        if not parts:
            raise ValueError("StackedRows needs at least one part")
        self.parts = [(arr, np.asarray(rows, dtype=np.int64).reshape(-1)) for arr, rows in parts]
        trailing = {tuple(arr.shape[1:]) for arr, _ in self.parts}
        if len(trailing) != 1:
            raise ValueError(f"StackedRows: parts differ in shape {sorted(trailing)}")
        self.dtype = np.result_type(*[arr.dtype for arr, _ in self.parts])
        sizes = [len(rows) for _, rows in self.parts]
        self.shape = (sum(sizes), *trailing.pop())
        self.part_of = np.repeat(np.arange(len(self.parts)), sizes)  # per row: its part ...
        self.row_of = np.concatenate([rows for _, rows in self.parts])  # ... and its row there

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: int | slice | np.ndarray) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return np.asarray(self[np.array([key])][0])
        idx = np.arange(self.shape[0])[key] if isinstance(key, slice) else np.asarray(key, dtype=np.int64)
        out = np.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
        parts = self.part_of[idx]
        for p in np.unique(parts):
            sel = parts == p
            out[sel] = self.parts[p][0][self.row_of[idx[sel]]]
        return out


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
        raise unreadable_npy(path, exc) from None
    return check_npy(path, arr)


def unreadable_npy(path: Path | str, exc: BaseException) -> TuneAgbError:
    return TuneAgbError(f"{path}: not a readable .npy array ({str(exc).splitlines()[0]})")


def check_npy(path: Path | str, arr: object) -> np.ndarray:
    """``arr`` as loaded from the tile file ``path``: one numeric array, else one error naming the file."""
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


class StatsAccumulator:
    """NaN-aware running sums for the normalisation stats, in float64: per-band sum, sum of squares and count of the
    inputs, and the same for the finite labels. Fed block by block (:meth:`add`), so memory does not grow with the
    dataset; :meth:`result` gives the :class:`NormStats`. The packed store and :func:`compute_norm_stats` share it."""

    def __init__(self, channels: int):
        self.s, self.ss, self.cnt = np.zeros(channels), np.zeros(channels), np.zeros(channels)
        self.t = np.zeros(3)  # labels: count, sum, sum of squares
        self.nonfinite = 0

    def add(self, inputs: np.ndarray, labels: np.ndarray | None = None) -> None:
        """``inputs`` (B, C, H, W) raw values, ``labels`` (B, H, W) with NaN where none."""
        block = np.asarray(inputs, dtype=np.float64)
        fin = np.isfinite(block)
        block = np.where(fin, block, 0.0)
        self.s += block.sum(axis=(0, 2, 3))
        self.ss += (block**2).sum(axis=(0, 2, 3))
        cnt = fin.sum(axis=(0, 2, 3))
        self.cnt += cnt
        self.nonfinite += int(fin.size - cnt.sum())
        if labels is not None:
            lab = np.asarray(labels, dtype=np.float64)
            lab = lab[np.isfinite(lab)]
            self.t += (lab.size, lab.sum(), (lab**2).sum())

    def to_dict(self) -> dict[str, Any]:
        return {"s": self.s.tolist(), "ss": self.ss.tolist(), "cnt": self.cnt.tolist(), "t": self.t.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StatsAccumulator:
        acc = cls(len(d["s"]))
        acc.s, acc.ss, acc.cnt, acc.t = (np.asarray(d[k], dtype=np.float64) for k in ("s", "ss", "cnt", "t"))
        return acc

    def result(self, standardize_target: bool = True, split: str = "train") -> NormStats:
        c = self.s.size
        bands = BAND_NAMES if c == len(BAND_NAMES) else [str(i) for i in range(c)]
        for b in range(c):
            if self.cnt[b] == 0:
                raise TuneAgbError(f"{split} split: band {bands[b]} is NaN/inf in every tile; cannot normalise it")
        mean = self.s / self.cnt
        std = np.sqrt(np.maximum(self.ss / self.cnt - mean**2, 0.0))
        std = np.where(std > 1e-6, std, 1.0)
        tmean, tstd = 0.0, 1.0
        n, ts, tss = self.t
        if standardize_target and n > 0:
            tmean = ts / n
            var = max(tss / n - tmean**2, 0.0)
            tstd = math.sqrt(var) if n > 1 and math.sqrt(var) > 1e-6 else 1.0
        return NormStats(mean=mean.tolist(), std=std.tolist(), target_mean=float(tmean), target_std=float(tstd))


def compute_norm_stats(train: TileSet, standardize_target: bool = True, chunk: int = 64) -> NormStats:
    """NaN-aware per-band mean/std over the train split, accumulated in float64 chunk by chunk."""
    acc = StatsAccumulator(train.inputs.shape[1])
    for i in range(0, len(train), chunk):
        acc.add(train.inputs[i : i + chunk], train.labels[i : i + chunk])
    return acc.result(standardize_target)


def count_nonfinite(tiles: TileSet, chunk: int = 64) -> int:
    """Non-finite input values of a split (the recorded count when the store knows it)."""
    if tiles.nonfinite is None:
        tiles.nonfinite = int(
            sum((~np.isfinite(tiles.inputs[i : i + chunk])).sum() for i in range(0, len(tiles), chunk))
        )
    return tiles.nonfinite


# How a split reaches the training device: ``auto`` picks per device (see :func:`choose_mode`).
DATA_MODES = ("auto", "resident", "stream")
# Share of a trial's device memory that resident tiles may take; the rest is for the model's working set.
RESIDENT_SHARE = 0.6


def choose_mode(
    mode: str,
    nbytes: int,
    device: torch.device,
    device_share: float = 1.0,
    total_memory: int | None = None,
    reserved: int = 0,
) -> str:
    """``resident`` or ``stream`` for a split of ``nbytes`` (inputs + labels as stored).

    ``auto``: on CUDA resident when the split takes at most :data:`RESIDENT_SHARE` of the trial's share of the card
    (``device_share`` x its total memory; the rest is the model's working set) and, with the ``reserved`` bytes
    (the measured working set, other resident splits), within the share; else streamed. On CPU streamed: the
    packed store's memory map *is* the resident copy there, held once per node in the page cache and shared by all
    trials, while a private copy would grow every process with the dataset. ``total_memory``: the card's bytes
    (None: asked from CUDA).
    """
    if mode not in DATA_MODES:
        raise TuneAgbError(f"data_mode must be one of {', '.join(DATA_MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "stream"
    total = torch.cuda.get_device_properties(device).total_memory if total_memory is None else total_memory
    share = device_share * total
    return "resident" if nbytes <= min(RESIDENT_SHARE * share, share - reserved) else "stream"


class _Labelled:
    """Where the labelled pixels of a split are, found once from its labels: per tile, the flat pixel positions
    (CSR: ``ptr`` (N + 1), ``flat``) and their values, so evaluation picks them out of each batch's maps with an
    index whose size is known on the host (no boolean mask, no host sync)."""

    def __init__(self, labels: np.ndarray, chunk: int = 256):
        n = labels.shape[0]
        counts = np.zeros(n + 1, dtype=np.int64)
        flats, values = [], []
        for i in range(0, n, chunk):
            block = np.asarray(labels[i : i + chunk], dtype=np.float32).reshape(min(chunk, n - i), -1)
            fin = np.isfinite(block)
            counts[i + 1 : i + 1 + block.shape[0]] = fin.sum(axis=1)
            t, f = np.nonzero(fin)
            flats.append(f)
            values.append(block[t, f])
        self.ptr = np.cumsum(counts)
        self.flat = np.concatenate(flats).astype(np.int64)
        self.values = np.concatenate(values).astype(np.float32)
        self.tile = np.repeat(np.arange(n), np.diff(self.ptr))

    def counts(self) -> np.ndarray:
        return np.diff(self.ptr)


class SplitFeed:
    """One split as the training loop consumes it: batches of normalised inputs (B, C, H, W) float32 and
    standardised labels (B, H, W) float32 (NaN = no label) on the training device.

    Two modes, giving the same numbers (the same stored values, normalised by the same code on the device):

    - ``resident``: the split is copied once to the device in its storage dtype; batches are gathered there by index.
    - ``stream``: batches are gathered from the arrays (the store's memory maps) by a background thread with positional
      reads that release the GIL, into a ring of (pinned, on CUDA) host buffers, copied to the device asynchronously
      on a side stream, ``prefetch`` batches ahead. Memory is a few batches, whatever the dataset's size.
    """

    def __init__(
        self,
        tiles: TileSet,
        norm: NormStats,
        device: torch.device,
        mode: str = "auto",
        device_share: float = 1.0,
        prefetch: int = 2,
        chunk: int = 64,
        reserved: int = 0,
    ):
        self.split, self.names, self.device, self.norm = tiles.split, tiles.names, device, norm
        self.tiles = tiles
        n, c, h, w = tiles.inputs.shape
        self.shape = (n, c, h, w)
        self.nbytes = tiles.inputs.nbytes + tiles.labels.nbytes
        self.mode = choose_mode(mode, self.nbytes, device, device_share, reserved=reserved)
        self.prefetch = max(1, prefetch)
        self._mean = torch.tensor(norm.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self._std = torch.tensor(norm.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self._labelled: _Labelled | None = None
        if self.mode == "resident":
            dtype = _torch_dtype(tiles.inputs.dtype)
            self.x = torch.empty((n, c, h, w), dtype=dtype, device=device)
            self.y = torch.empty((n, h, w), dtype=torch.float32, device=device)
            for i in range(0, n, chunk):
                self.x[i : i + chunk] = torch.from_numpy(
                    np.array(tiles.inputs[i : i + chunk], dtype=tiles.inputs.dtype)
                )
                self.y[i : i + chunk] = torch.from_numpy(np.array(tiles.labels[i : i + chunk], dtype=np.float32))

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def labelled(self) -> _Labelled:
        if self._labelled is None:
            self._labelled = _Labelled(self.tiles.labels)
        return self._labelled

    def _finish(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw stored values on the device -> normalised inputs (non-finite -> 0, the band mean) and standardised
        labels: the one place both modes normalise."""
        x = torch.nan_to_num((x.float() - self._mean) / self._std, nan=0.0, posinf=0.0, neginf=0.0)
        return x, (y - self.norm.target_mean) / self.norm.target_std

    def batches(self, index_batches: list[np.ndarray]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of tiles ``index_batches`` (host int arrays), in that order."""
        if self.mode == "resident":
            # All the indices go to the device in one copy (a host copy per batch would sync per batch).
            sizes = [len(i) for i in index_batches]
            flat = np.concatenate([np.asarray(i, dtype=np.int64) for i in index_batches]) if sizes else np.empty(0)
            every = torch.from_numpy(flat.astype(np.int64)).to(self.device)
            at = 0
            for b in sizes:
                it = every[at : at + b]
                at += b
                yield self._finish(self.x[it], self.y[it])
            return
        yield from _stream(self, index_batches)


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}.get(
        np.dtype(dtype), torch.float32
    )


class _Reader:
    """Copies rows of an array into a buffer: positional reads (``os.preadv``, GIL released) from the file of a
    C-contiguous memory map, else numpy's ``take``; for :class:`StackedRows`, each row from its part."""

    def __init__(self, arr: np.ndarray | StackedRows):
        self.arr = arr
        self.fd = None
        self.parts: list[_Reader] = []
        if isinstance(arr, StackedRows):
            self.parts = [_Reader(a) for a, _ in arr.parts]
        elif isinstance(arr, np.memmap) and arr.filename and arr.flags.c_contiguous and hasattr(os, "preadv"):
            self.fd = os.open(arr.filename, os.O_RDONLY)
            self.offset = arr.offset
            self.row = arr[0].nbytes if arr.shape[0] else 0

    def read(self, idx: np.ndarray, out: np.ndarray) -> None:
        if isinstance(self.arr, StackedRows):
            for j, i in enumerate(idx):
                p = int(self.arr.part_of[i])
                self.parts[p].read(self.arr.row_of[i : i + 1], out[j : j + 1])
            return
        if out.dtype != self.arr.dtype:  # a part of a StackedRows of mixed dtypes: numpy converts
            out[...] = self.arr[np.asarray(idx)]
            return
        if self.fd is None:
            np.take(self.arr, idx, axis=0, out=out)
            return
        for j, i in enumerate(idx):
            view = memoryview(out[j].reshape(-1).view(np.uint8))
            pos = self.offset + int(i) * self.row
            done = 0
            while done < self.row:
                got = os.preadv(self.fd, [view[done:]], pos + done)
                if got <= 0:
                    raise TuneAgbError(f"{self.arr.filename}: short read at tile {int(i)} (store truncated?)")
                done += got

    def close(self) -> None:
        for part in self.parts:
            part.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _stream(feed: SplitFeed, index_batches: list[np.ndarray]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Producer thread: read batch k into host buffer k % ring, copy it to the device (side stream on CUDA), queue
    it. Consumer: wait for the copy on the compute stream (no host sync), normalise, yield."""
    cuda = feed.device.type == "cuda"
    _, c, h, w = feed.shape
    bmax = max((len(i) for i in index_batches), default=0)
    ring = feed.prefetch + 2  # a buffer is refilled only after the consumer has moved past it
    xdt = _torch_dtype(feed.tiles.inputs.dtype)
    xbuf = [torch.empty((bmax, c, h, w), dtype=xdt, pin_memory=cuda) for _ in range(ring)]
    ybuf = [torch.empty((bmax, h, w), dtype=torch.float32, pin_memory=cuda) for _ in range(ring)]
    copied: list[Any] = [None] * ring  # CUDA events: the buffer's last copy to the device is done
    rx, ry = _Reader(feed.tiles.inputs), _Reader(feed.tiles.labels)
    q: queue.Queue = queue.Queue(maxsize=feed.prefetch)
    stop = threading.Event()
    side = torch.cuda.Stream(feed.device) if cuda else None

    def put(item: Any) -> None:
        """Queue ``item`` unless the consumer has stopped: a blocking put on a full queue that nobody reads any more
        would hang the consumer's join (an exception in the training step, a timeout) for good."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def produce() -> None:
        try:
            for k, idx in enumerate(index_batches):
                if stop.is_set():
                    return
                slot, b = k % ring, len(idx)
                if copied[slot] is not None:
                    while not copied[slot].query():  # polled, not synchronised: no host sync is recorded
                        time.sleep(0.0002)
                xs, ys = xbuf[slot][:b], ybuf[slot][:b]
                rx.read(np.asarray(idx), xs.numpy())
                ry.read(np.asarray(idx), ys.numpy())
                if cuda:
                    with torch.cuda.stream(side):
                        xd, yd = xs.to(feed.device, non_blocking=True), ys.to(feed.device, non_blocking=True)
                        ev = torch.cuda.Event()
                        ev.record(side)
                    copied[slot] = ev
                    item = (xd, yd, ev)
                else:
                    item = (xs, ys, None)
                put(item)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)
        else:
            put(None)

    thread = threading.Thread(target=produce, name=f"tune_agb-stream-{feed.split}", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            x, y, ev = item
            if ev is not None:
                torch.cuda.current_stream(feed.device).wait_event(ev)
                x.record_stream(torch.cuda.current_stream(feed.device))
                y.record_stream(torch.cuda.current_stream(feed.device))
            yield feed._finish(x, y)
    finally:
        stop.set()
        thread.join()
        rx.close()
        ry.close()
