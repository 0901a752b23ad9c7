"""The packed tile store: each split of ``INPUT_DIR/{split}/NAME.npy`` packed once into two contiguous, memory-mappable
``.npy`` files, shared by every process of a node through the page cache.

The ``NAME.npy`` layout stays the user's format; the store is a cache, rebuilt whenever the tiles change.

- **Where:** ``$TUNE_AGB_STORE`` if set, else ``$TUNE_AGB_CACHE/store``, else ``~/.cache/tune_agb/store``: one folder
  per split, named by its key. Put it on a node-local disk; on a cluster every node packs its own copy once.
- **Keyed by content:** the key hashes each tile's name, byte size and modification time (input and label), the
  storage dtype and the store format. Any changed, added or removed tile gives a new key, hence a new store; the
  older store of the same source folder is then removed.
- **What it holds:** ``inputs.npy`` (N, C, H, W) in the storage dtype (float16 by default: half the bytes of the
  float32 tiles; float32 when a finite value would overflow float16), ``labels.npy`` (N, H, W) float32 exactly as
  given (NaN = no label), and ``meta.json`` (names, shapes, counts of labelled pixels and non-finite inputs, and the
  running sums of the normalisation statistics, computed while packing).
- **How it is built:** tile by tile (memory bounded by one tile), with a progress bar, into a staging folder that is
  renamed into place once complete (``meta.json`` last). A pack killed midway leaves only a staging folder, which the
  next builder deletes. A lock file per key makes concurrent starters wait for one builder.
- **Checked when opened:** format, key, file sizes, shapes and dtypes. A store that fails is rebuilt (logged).

Sources may be local folders or URIs that ``pyarrow.fs`` opens (``s3://``, ``gs://``, ``file://``, ``hdfs://``): only
the small :class:`DataSource` travels to Ray trials, each of which opens (or, on a new node, builds) its store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from tune_agb.bands import BAND_NAMES, SPLITS
from tune_agb.engine.data import NormStats, StatsAccumulator, TileSet, check_npy, list_split, unreadable_npy
from tune_agb.errors import TuneAgbError
from tune_agb.location import check_bucket, failure, open_location

log = logging.getLogger(__name__)

STORE_FORMAT = 1
STORAGE_DTYPES = ("float16", "float32")
FLOAT16_MAX = float(np.finfo(np.float16).max)
META = "meta.json"
INPUTS = "inputs.npy"
LABELS = "labels.npy"


def store_root() -> Path:
    """Where stores live: ``$TUNE_AGB_STORE``, else ``$TUNE_AGB_CACHE/store``, else ``~/.cache/tune_agb/store``."""
    if os.environ.get("TUNE_AGB_STORE"):
        return Path(os.environ["TUNE_AGB_STORE"]).expanduser()
    base = os.environ.get("TUNE_AGB_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "tune_agb")
    return Path(base).expanduser() / "store"


# -- the source tiles: a local folder or a pyarrow filesystem URI ------------------------------------------------------
@dataclass(frozen=True)
class TileFile:
    name: str
    input_path: str
    label_path: str
    stamp: tuple[int, int, int, int]  # input size, input mtime (ns), label size, label mtime (ns)


def _has_scheme(path: str) -> bool:
    """Whether a source is read through pyarrow's filesystem (any ``scheme://``, ``file://`` included, so that a
    local ``file://`` source takes the same code path as ``s3://``/``gs://``; opened by :func:`open_location`)."""
    return "://" in path


def _list_uri(input_dir: str, label_dir: str, split: str) -> list[TileFile]:
    import pyarrow.fs as pafs

    found = {}
    for kind, uri in (("input", input_dir), ("label", label_dir)):
        fs, root = open_location(uri)
        folder = f"{root.rstrip('/')}/{split}"
        try:
            infos = fs.get_file_info(pafs.FileSelector(folder, recursive=False))
        except FileNotFoundError:
            check_bucket(uri)  # a missing bucket is said as such
            raise TuneAgbError(
                f"{uri.rstrip('/')}/{split}: split folder '{split}' is missing (expected {{train,val,test}}/NAME.npy)"
            ) from None
        except OSError as exc:  # what the object store answered (access denied, no such bucket, ...)
            raise failure(f"{uri.rstrip('/')}/{split}", "cannot list the tiles", exc) from None
        found[kind] = {
            i.base_name[:-4]: (f"{uri.rstrip('/')}/{split}/{i.base_name}", i.size or 0, int(i.mtime_ns or 0))
            for i in infos
            if i.type == pafs.FileType.File and i.base_name.endswith(".npy")
        }
    names = sorted(found["input"])
    if not names:
        raise TuneAgbError(f"{input_dir.rstrip('/')}/{split}: split '{split}' holds no .npy tiles")
    if names != sorted(found["label"]):
        diff = sorted(set(names) ^ set(found["label"]))
        raise TuneAgbError(
            f"{input_dir} vs {label_dir}: tile names of split '{split}' differ ({', '.join(diff[:5])}"
            f"{' ...' if len(diff) > 5 else ''})"
        )
    return [
        TileFile(n, found["input"][n][0], found["label"][n][0], (*found["input"][n][1:], *found["label"][n][1:]))
        for n in names
    ]


def list_tiles(input_dir: str, label_dir: str, split: str) -> list[TileFile]:
    """The tiles of one split with their sizes and modification times (the store's key), checked to pair up."""
    if _has_scheme(input_dir) or _has_scheme(label_dir):
        return _list_uri(input_dir, label_dir, split)
    names = list_split(Path(input_dir), Path(label_dir), split)
    out = []
    for n in names:
        ip, lp = Path(input_dir) / split / f"{n}.npy", Path(label_dir) / split / f"{n}.npy"
        si, sl = ip.stat(), lp.stat()
        out.append(TileFile(n, str(ip), str(lp), (si.st_size, si.st_mtime_ns, sl.st_size, sl.st_mtime_ns)))
    return out


def _read_npy(path: str) -> np.ndarray:
    """One tile, whole (local file or URI); a bad file is one error naming it."""
    try:
        if _has_scheme(path):
            fs, p = open_location(path)
            with fs.open_input_file(p) as f:
                arr = np.load(io.BytesIO(f.readall()), allow_pickle=False)
        else:
            arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise unreadable_npy(path, exc) from None
    return check_npy(path, arr)


def split_key(tiles: list[TileFile], dtype: str) -> str:
    h = hashlib.sha256(json.dumps([STORE_FORMAT, dtype, [(t.name, t.stamp) for t in tiles]]).encode())
    return h.hexdigest()[:24]


# -- one packed split -------------------------------------------------------------------------------------------------
class _Float16Overflow(Exception):  # noqa: N818 (internal signal)
    pass


@dataclass
class PackedSplit:
    """An opened store folder: the split as a :class:`TileSet` of read-only memory maps, and its ``meta.json``."""

    path: Path
    meta: dict[str, Any]
    tiles: TileSet

    @property
    def stats(self) -> StatsAccumulator:
        return StatsAccumulator.from_dict(self.meta["stats"])


def _check_and_open(path: Path, key: str, split: str) -> PackedSplit:
    """Open a store folder, or raise ``ValueError`` saying what is wrong with it."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{META} unreadable ({exc})") from None
    if meta.get("format") != STORE_FORMAT or meta.get("key") != key:
        raise ValueError(f"format/key {meta.get('format')}/{meta.get('key')} != {STORE_FORMAT}/{key}")
    n, c, h, w = meta["shape"]
    try:
        inputs = np.load(path / INPUTS, mmap_mode="r", allow_pickle=False)
        labels = np.load(path / LABELS, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"array files unreadable ({str(exc).splitlines()[0]})") from None
    if inputs.shape != (n, c, h, w) or str(inputs.dtype) != meta["dtype"]:
        raise ValueError(f"{INPUTS} is {inputs.shape} {inputs.dtype}, meta says {(n, c, h, w)} {meta['dtype']}")
    if labels.shape != (n, h, w) or labels.dtype != np.float32:
        raise ValueError(f"{LABELS} is {labels.shape} {labels.dtype}, expected {(n, h, w)} float32")
    if len(meta["names"]) != n:
        raise ValueError(f"{len(meta['names'])} names for {n} tiles")
    tiles = TileSet(split, list(meta["names"]), inputs, labels, meta["labelled"], meta["nonfinite"])
    return PackedSplit(path, meta, tiles)


def _pack(tiles: list[TileFile], split: str, dtype: str, stage: Path, source: dict[str, str], key: str) -> None:
    """Write the split into ``stage`` tile by tile: inputs in ``dtype``, labels float32, then ``meta.json``."""
    first = _read_npy(tiles[0].input_path)
    if first.ndim != 3:
        raise TuneAgbError(f"{tiles[0].input_path}: image must be (C, H, W), got shape {first.shape}")
    c, h, w = first.shape
    n = len(tiles)
    inputs = np.lib.format.open_memmap(stage / INPUTS, mode="w+", dtype=np.dtype(dtype), shape=(n, c, h, w))
    labels = np.lib.format.open_memmap(stage / LABELS, mode="w+", dtype=np.float32, shape=(n, h, w))
    acc = StatsAccumulator(c)
    labelled = 0
    bar = tqdm(tiles, desc=f"pack {split}", unit="tile", leave=False, disable=n < 50 or None)
    for i, t in enumerate(bar):
        img = first if i == 0 else _read_npy(t.input_path)
        if img.ndim != 3 or img.shape[0] != c:
            got = f"{img.shape[0]} channels" if img.ndim == 3 else f"shape {img.shape}"
            raise TuneAgbError(f"{t.input_path}: has {got}, expected {c} channels like the other tiles")
        if img.shape != (c, h, w):
            raise TuneAgbError(f"{t.input_path}: shape {img.shape}, expected {(c, h, w)} like the other tiles")
        lab = _read_npy(t.label_path)
        if lab.shape not in ((h, w), (1, h, w)):
            raise TuneAgbError(
                f"{t.label_path}: label shape {lab.shape} does not match its image; expected {(h, w)} or {(1, h, w)}"
            )
        img32 = img.astype(np.float32, copy=False)
        fin = np.isfinite(img32)
        if not fin.any():
            raise TuneAgbError(f"{t.input_path}: every input value is NaN/inf (expected a finite image)")
        if dtype == "float16" and np.abs(img32[fin]).max() > FLOAT16_MAX:
            raise _Float16Overflow(t.input_path)
        lab32 = lab.reshape(h, w).astype(np.float32)
        lab32[~np.isfinite(lab32)] = np.nan
        acc.add(img32[None], lab32[None])
        labelled += int(np.isfinite(lab32).sum())
        inputs[i] = img32
        labels[i] = lab32
    for arr in (inputs, labels):
        arr.flush()
    del inputs, labels
    for f in (INPUTS, LABELS):
        with open(stage / f, "rb+") as fh:
            os.fsync(fh.fileno())
    meta = {
        "format": STORE_FORMAT,
        "key": key,
        "split": split,
        "source": source,
        "dtype": dtype,
        "shape": [n, c, h, w],
        "names": [t.name for t in tiles],
        "labelled": labelled,
        "nonfinite": acc.nonfinite,
        "stats": acc.to_dict(),
        "created": time.time(),
    }
    tmp = stage / (META + ".tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, stage / META)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (waits, saying so, while another process holds it)."""
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: another process is packing this split; waiting for it", path.with_suffix(""))
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _prune_older(root: Path, keep: str, source: dict[str, str], split: str) -> None:
    """Remove the other stores of the same source folders and split (an older state of the tiles)."""
    for meta_path in root.glob(f"*/{META}"):
        d = meta_path.parent
        if d.name == keep:
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if meta.get("source") == source and meta.get("split") == split:
            with open(root / f"{d.name}.lock", "a") as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # being (re)built right now: leave it
                shutil.rmtree(d, ignore_errors=True)
                log.info("removed the older store %s of %s", d, source["input_dir"])


def packed_split(
    input_dir: str | Path,
    label_dir: str | Path,
    split: str,
    dtype: str = "float16",
    root: Path | None = None,
    pinned: str | None = None,
) -> PackedSplit:
    """The store of one split, built first when there is none for the tiles' current state (see the module doc).

    ``pinned``: the key a search's driver packed; a store with that key is opened without listing the source, and a
    source that no longer has that key (tiles changed since) is an error rather than other data.
    """
    if dtype not in STORAGE_DTYPES:
        raise TuneAgbError(f"store dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    input_dir, label_dir = str(input_dir), str(label_dir)
    root = store_root() if root is None else root
    if pinned is not None:
        with contextlib.suppress(ValueError):
            return _check_and_open(root / pinned, pinned, split)
    tiles = list_tiles(input_dir, label_dir, split)
    source = {"input_dir": input_dir, "label_dir": label_dir}
    root.mkdir(parents=True, exist_ok=True)
    for want in (dtype, "float32") if dtype == "float16" else (dtype,):
        key = split_key(tiles, want)
        if pinned is not None and key != pinned and split_key(tiles, "float32") != pinned:
            raise TuneAgbError(
                f"{input_dir}: the tiles of split '{split}' changed since the search started (packed as {pinned}, now "
                f"{key}); restart the search, or --resume it to use the new tiles"
            )
        path = root / key
        with contextlib.suppress(ValueError):
            return _check_and_open(path, key, split)  # the common case: built before, no lock needed
        with _locked(root / f"{key}.lock"):
            if path.exists():
                try:
                    return _check_and_open(path, key, split)  # built while we waited
                except ValueError as exc:
                    log.warning("store %s is damaged (%s): rebuilding it", path, exc)
                    shutil.rmtree(path)
            for stale in root.glob(f".staging-{key}-*"):  # a pack killed midway (we hold the lock: none runs)
                log.info("removing %s, left by an interrupted pack", stale)
                shutil.rmtree(stale, ignore_errors=True)
            stage = root / f".staging-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            stage.mkdir()
            t0 = time.monotonic()
            try:
                _pack(tiles, split, want, stage, source, key)
            except _Float16Overflow as exc:
                log.warning("%s: a value exceeds float16's range; storing split '%s' as float32", exc, split)
                continue
            finally:
                if not (stage / META).exists():
                    shutil.rmtree(stage, ignore_errors=True)
            os.rename(stage, path)
            log.info("packed split '%s' (%d tiles, %s) into %s in %.1f s", split, len(tiles), want, path,
                     time.monotonic() - t0)  # fmt: skip
            _prune_older(root, key, source, split)
            return _check_and_open(path, key, split)
    raise AssertionError("unreachable: the float32 pass never overflows")


# -- a dataset: several splits and their normalisation ----------------------------------------------------------------
@dataclass(frozen=True)
class DataSource:
    """Where the tiles are, as given by the user: all that travels to Ray trials (a few hundred bytes)."""

    input_dir: str
    label_dir: str
    splits: tuple[str, ...] = SPLITS
    in_channels: int | None = None
    dtype: str = field(default_factory=lambda: os.environ.get("TUNE_AGB_STORE_DTYPE", "float16"))
    keys: tuple[tuple[str, str], ...] = ()  # (split, store key) pinned by the driver

    def open(self) -> PackedDataset:
        return open_dataset(self)

    def pinned(self) -> DataSource:
        """This source packed now, with its store keys pinned: what trials get, so that they open the same data
        (without listing the tiles again on this node)."""
        data = self.open()
        return dataclasses.replace(self, keys=tuple((s, p.name) for s, p in data.paths.items()))


@dataclass
class PackedDataset:
    tiles: dict[str, TileSet]
    stats: StatsAccumulator  # the train split's
    paths: dict[str, Path]

    def norm(self, standardize_target: bool = True) -> NormStats:
        return self.stats.result(standardize_target)


def open_dataset(src: DataSource) -> PackedDataset:
    """Open (packing first where needed) every split of ``src``, checked to share channels and tile size."""
    keys = dict(src.keys)
    parts = {s: packed_split(src.input_dir, src.label_dir, s, src.dtype, pinned=keys.get(s)) for s in src.splits}
    shapes = {s: p.tiles.inputs.shape[1:] for s, p in parts.items()}
    ref_split = "train" if "train" in parts else next(iter(parts))
    c = shapes[ref_split][0]
    if src.in_channels is not None and c != src.in_channels:
        first = parts[ref_split].tiles.names[0]
        raise TuneAgbError(
            f"{src.input_dir.rstrip('/')}/{ref_split}/{first}.npy: has {c} channels, expected {src.in_channels} "
            f"({' '.join(BAND_NAMES) if src.in_channels == len(BAND_NAMES) else 'in_channels'})"
        )
    for s, shp in shapes.items():
        if shp != shapes[ref_split]:
            raise TuneAgbError(
                f"{src.input_dir.rstrip('/')}/{s}: tiles are {tuple(shp)} (C, H, W), but split '{ref_split}' has "
                f"{tuple(shapes[ref_split])}"
            )
    for s, p in parts.items():
        if p.tiles.num_labelled == 0:
            raise TuneAgbError(
                f"{src.label_dir.rstrip('/')}/{s}: split '{s}' has no labelled pixel (all labels are NaN)"
            )
    return PackedDataset(
        {s: p.tiles for s, p in parts.items()}, parts[ref_split].stats, {s: p.path for s, p in parts.items()}
    )
