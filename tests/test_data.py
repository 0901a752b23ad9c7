"""Dataset layout checks, normalisation, memory-mapped assembly and augmentation (issue 2, point 2)."""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import tune_agb.engine.data as data_mod
from tune_agb.engine.data import NormStats, SplitFeed, compute_norm_stats, count_nonfinite, load_dataset, load_split
from tune_agb.engine.train import augment
from tune_agb.errors import TuneAgbError

C, H, W = 14, 9, 11


def _write(root: Path, tiles: int = 3, seed: int = 0, label_shape: tuple[int, ...] = (H, W)) -> tuple[Path, Path]:
    """A small random dataset: ``tiles`` per split, 14 bands with a few NaN/inf, sparse labels."""
    rng = np.random.default_rng(seed)
    idir, ldir = root / "inputs", root / "labels"
    for s_i, split in enumerate(("train", "val", "test")):
        (idir / split).mkdir(parents=True)
        (ldir / split).mkdir(parents=True)
        for t in range(tiles):
            img = rng.normal(
                loc=np.arange(C)[:, None, None] * (1 + s_i), scale=1 + np.arange(C)[:, None, None] / 4, size=(C, H, W)
            )
            img = img.astype(np.float32)
            img[rng.random((C, H, W)) < 0.05] = np.nan
            img[0, 0, t] = np.inf
            lab = np.full((H, W), np.nan, np.float32)
            pos = rng.random((H, W)) < 0.2
            lab[pos] = rng.gamma(2.0, 50.0, pos.sum())
            lab[t, t] = 100.0 + t
            np.save(idir / split / f"tile_{t:02d}.npy", img)
            np.save(ldir / split / f"tile_{t:02d}.npy", lab.reshape(label_shape))
    return idir, ldir


@pytest.fixture
def ds(tmp_path: Path) -> tuple[Path, Path]:
    return _write(tmp_path / "ds")


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(TuneAgbError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, "errors are one line"
    return msg


def test_loads_all_splits(ds: tuple[Path, Path]) -> None:
    idir, ldir = ds
    out = load_dataset(idir, ldir, in_channels=C)
    assert list(out) == ["train", "val", "test"]
    for split, t in out.items():
        assert t.split == split and t.names == ["tile_00", "tile_01", "tile_02"]
        assert t.inputs.shape == (3, C, H, W) and t.inputs.dtype == np.float32 and t.inputs.flags.c_contiguous
        assert t.labels.shape == (3, H, W) and t.labels.dtype == np.float32
        np.testing.assert_array_equal(t.inputs[1], np.load(idir / split / "tile_01.npy"))
        np.testing.assert_array_equal(t.labels[2], np.load(ldir / split / "tile_02.npy"))
        assert t.num_labelled == int(np.isfinite(t.labels).sum()) > 0


def test_one_by_h_by_w_labels_and_integer_inputs_are_accepted(tmp_path: Path) -> None:
    idir, ldir = _write(tmp_path / "a", label_shape=(1, H, W))
    ref_i, ref_l = _write(tmp_path / "b")
    t = load_split(idir, ldir, "val")
    np.testing.assert_array_equal(t.labels, load_split(ref_i, ref_l, "val").labels)
    np.save(idir / "val" / "tile_00.npy", np.arange(C * H * W, dtype=np.int16).reshape(C, H, W))
    t = load_split(idir, ldir, "val")
    assert t.inputs.dtype == np.float32 and t.inputs[0, 0, 0, 1] == 1.0


def test_infinite_labels_become_unlabelled(ds: tuple[Path, Path]) -> None:
    idir, ldir = ds
    lab = np.load(ldir / "val" / "tile_00.npy")
    lab[1, 1], lab[2, 2] = np.inf, -np.inf
    np.save(ldir / "val" / "tile_00.npy", lab)
    t = load_split(idir, ldir, "val")
    assert np.isnan(t.labels[0, 1, 1]) and np.isnan(t.labels[0, 2, 2])


def test_missing_split(ds: tuple[Path, Path]) -> None:
    idir, ldir = ds
    (ldir / "val").rename(ldir / "validation")
    msg = _error(load_dataset, idir, ldir)
    assert str(ldir / "val") in msg and "missing" in msg


def test_empty_split(ds: tuple[Path, Path]) -> None:
    idir, ldir = ds
    for p in (idir / "test").glob("*.npy"):
        p.unlink()
    msg = _error(load_dataset, idir, ldir)
    assert str(idir / "test") in msg and "no .npy" in msg


def test_names_differ(ds: tuple[Path, Path]) -> None:
    idir, ldir = ds
    (ldir / "train" / "tile_01.npy").rename(ldir / "train" / "tile_1.npy")
    msg = _error(load_split, idir, ldir, "train")
    assert "tile names differ" in msg and "tile_01" in msg and "tile_1" in msg


def test_wrong_channel_count(ds: tuple[Path, Path]) -> None:
    idir, ldir = ds
    msg = _error(load_split, idir, ldir, "train", in_channels=12)
    assert "tile_00.npy" in msg and "14 channels" in msg and "expected 12" in msg
    # One tile with a band fewer than the others.
    np.save(idir / "val" / "tile_02.npy", np.zeros((C - 1, H, W), np.float32))
    msg = _error(load_split, idir, ldir, "val", in_channels=C)
    assert str(idir / "val" / "tile_02.npy") in msg and f"{C - 1}" in msg and f"{C}" in msg


def test_label_shape_mismatch(ds: tuple[Path, Path]) -> None:
    idir, ldir = ds
    np.save(ldir / "test" / "tile_01.npy", np.zeros((H, W - 1), np.float32))
    msg = _error(load_split, idir, ldir, "test")
    assert str(ldir / "test" / "tile_01.npy") in msg and str((H, W)) in msg and str((1, H, W)) in msg


@pytest.mark.parametrize("how", ["garbage", "truncated", "empty"])
def test_corrupt_npy(ds: tuple[Path, Path], how: str) -> None:
    idir, ldir = ds
    path = idir / "train" / "tile_01.npy"
    raw = path.read_bytes()
    path.write_bytes({"garbage": b"not a numpy file at all" * 10, "truncated": raw[: len(raw) // 2], "empty": b""}[how])
    msg = _error(load_split, idir, ldir, "train")
    assert str(path) in msg and "not a readable .npy" in msg


def test_corrupt_label_npy(ds: tuple[Path, Path]) -> None:
    idir, ldir = ds
    path = ldir / "val" / "tile_00.npy"
    path.write_bytes(path.read_bytes()[:100])
    assert str(path) in _error(load_split, idir, ldir, "val")


def test_all_nan_labels(ds: tuple[Path, Path]) -> None:
    idir, ldir = ds
    for p in (ldir / "val").glob("*.npy"):
        np.save(p, np.full((H, W), np.nan, np.float32))
    msg = _error(load_dataset, idir, ldir)
    assert str(ldir / "val") in msg and "no labelled pixel" in msg


@pytest.mark.parametrize("fill", [np.nan, np.inf])
def test_all_nonfinite_inputs(ds: tuple[Path, Path], fill: float) -> None:
    idir, ldir = ds
    path = idir / "test" / "tile_02.npy"
    np.save(path, np.full((C, H, W), fill, np.float32))
    msg = _error(load_split, idir, ldir, "test")
    assert str(path) in msg and "NaN/inf" in msg


def test_band_nonfinite_everywhere_in_train(ds: tuple[Path, Path]) -> None:
    idir, ldir = ds
    for p in (idir / "train").glob("*.npy"):
        img = np.load(p)
        img[12] = np.nan
        np.save(p, img)
    train = load_split(idir, ldir, "train")
    msg = _error(compute_norm_stats, train)
    assert "VV" in msg and "train" in msg


@pytest.mark.parametrize(
    "arr", [np.full((C, H, W), "a"), np.zeros((C, H, W), dtype=complex), np.zeros((C, H, W), bool)]
)
def test_non_numeric_dtype(ds: tuple[Path, Path], arr: np.ndarray) -> None:
    idir, ldir = ds
    path = idir / "val" / "tile_01.npy"
    np.save(path, arr)
    msg = _error(load_split, idir, ldir, "val")
    assert str(path) in msg and str(arr.dtype) in msg and "numeric" in msg


def test_object_array_is_refused_without_unpickling(ds: tuple[Path, Path]) -> None:
    idir, ldir = ds
    path = ldir / "train" / "tile_00.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert str(path) in _error(load_split, idir, ldir, "train")


def test_norm_stats_nan_aware_from_train_only(ds: tuple[Path, Path]) -> None:
    idir, ldir = ds
    out = load_dataset(idir, ldir)
    train = out["train"]
    stats = compute_norm_stats(train, standardize_target=True, chunk=2)  # chunked: 2 + 1 tiles
    x = np.where(np.isfinite(train.inputs), train.inputs, np.nan).astype(np.float64)
    np.testing.assert_allclose(stats.mean, np.nanmean(x, axis=(0, 2, 3)), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(stats.std, np.nanstd(x, axis=(0, 2, 3)), rtol=1e-7)
    lab = train.labels[np.isfinite(train.labels)].astype(np.float64)
    assert stats.target_mean == pytest.approx(lab.mean()) and stats.target_std == pytest.approx(lab.std())
    # The val/test values (here drawn with other means) do not move the stats.
    assert not np.allclose(
        np.nanmean(np.where(np.isfinite(out["val"].inputs), out["val"].inputs, np.nan), axis=(0, 2, 3)), stats.mean
    )
    plain = compute_norm_stats(train, standardize_target=False)
    assert (plain.target_mean, plain.target_std) == (0.0, 1.0) and plain.mean == pytest.approx(stats.mean)
    assert NormStats.from_dict(stats.to_dict()) == stats


def test_constant_band_gets_unit_std(ds: tuple[Path, Path]) -> None:
    idir, ldir = ds
    train = load_split(idir, ldir, "train")
    train.inputs[:, 3] = 7.0
    stats = compute_norm_stats(train)
    assert stats.mean[3] == pytest.approx(7.0) and stats.std[3] == 1.0


@pytest.mark.parametrize("mode", ["resident", "stream"])
def test_feed_normalises_and_replaces_nonfinite(ds: tuple[Path, Path], mode: str) -> None:
    idir, ldir = ds
    out = load_dataset(idir, ldir)
    stats = compute_norm_stats(out["train"], standardize_target=True)
    val = out["val"]
    bad = ~np.isfinite(val.inputs)
    assert count_nonfinite(val) == int(bad.sum()) > 0
    feed = SplitFeed(val, stats, torch.device("cpu"), mode=mode, prefetch=1)
    assert feed.mode == mode
    order = [np.array([2, 0]), np.array([1]), np.array([0, 1, 2])]
    got = list(feed.batches(order))
    assert len(got) == 3
    mean = np.asarray(stats.mean)[None, :, None, None]
    std = np.asarray(stats.std)[None, :, None, None]
    for idx, (xb, yb) in zip(order, got, strict=True):
        x = xb.numpy()
        assert x.shape == (len(idx), C, H, W) and np.isfinite(x).all()
        want = (val.inputs[idx].astype(np.float64) - mean) / std
        np.testing.assert_allclose(x[~bad[idx]], want[~bad[idx]], rtol=1e-5, atol=1e-5)
        assert (x[bad[idx]] == 0).all()  # replaced after normalisation: 0 is the band mean
        # Target standardisation round trip: standardised units, NaN kept where there is no label.
        y = yb.numpy().astype(np.float64)
        np.testing.assert_array_equal(np.isnan(y), np.isnan(val.labels[idx]))
        lab = np.isfinite(val.labels[idx])
        np.testing.assert_allclose(y[lab] * stats.target_std + stats.target_mean, val.labels[idx][lab], rtol=1e-5)
    assert abs(stats.target_mean) > 1 and stats.target_std > 1  # the round trip is not an identity


@pytest.mark.parametrize("fail", [False, True])
def test_stream_abandoned_with_a_full_queue_closes(
    ds: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, fail: bool
) -> None:
    """A consumer that stops early (an exception in the training step, a test's timeout) while the producer waits on a
    full queue with its last item (the end marker, or its own error) gets its close() back: no join on a thread that
    blocks forever."""
    idir, ldir = ds
    val = load_dataset(idir, ldir)["val"]
    feed = SplitFeed(val, compute_norm_stats(val), torch.device("cpu"), mode="stream", prefetch=1)
    if fail:  # the producer's third batch fails: its error waits behind the second batch
        read, calls = data_mod._Reader.read, []

        def flaky(self: object, idx: np.ndarray, out: np.ndarray) -> None:
            calls.append(1)
            if len(calls) > 4:  # inputs and labels of batches 0 and 1 read, batch 2 fails
                raise OSError("disk gone")
            read(self, idx, out)

        monkeypatch.setattr(data_mod._Reader, "read", flaky)
    gen = feed.batches([np.array([i]) for i in range(3 if fail else 2)])
    next(gen)  # batch 0 taken: the producer fills the queue (prefetch 1) and then blocks on its last put
    time.sleep(0.5)
    closer = threading.Thread(target=gen.close, daemon=True)
    closer.start()
    closer.join(timeout=10)
    assert not closer.is_alive(), "closing the stream hangs on its producer thread"


def test_memory_mapped_assembly_over_threshold(ds: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    idir, ldir = ds
    in_ram = load_split(idir, ldir, "train")
    assert not isinstance(in_ram.inputs, np.memmap)
    monkeypatch.setattr(data_mod, "MMAP_THRESHOLD_BYTES", 100)
    before = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))
    mapped = load_split(idir, ldir, "train")
    assert isinstance(mapped.inputs, np.memmap)
    np.testing.assert_array_equal(mapped.inputs, in_ram.inputs)
    np.testing.assert_array_equal(mapped.labels, in_ram.labels)
    # The stats and the device copy work from the mapped array the same way: per-band mean/std array by array, then
    # the target's two scalars (approx takes flat numbers only, no dict of lists).
    a, b = compute_norm_stats(mapped, chunk=1), compute_norm_stats(in_ram)
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-12)
    np.testing.assert_allclose(a.std, b.std, rtol=1e-12)
    assert (a.target_mean, a.target_std) == pytest.approx((b.target_mean, b.target_std), rel=1e-12)
    if os.name == "posix":  # the backing file is unlinked at once: nothing piles up in the temp folder
        after = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))
        assert not [f for f in after - before if f.startswith("tune_agb_train_")]


def _ids(b: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose every band holds a unique pixel id, and labels = that id on a sparse set of pixels."""
    ids = torch.arange(b * h * w, dtype=torch.float32).view(b, h, w)
    x = torch.stack([ids, -ids, ids * 2], dim=1)
    g = torch.Generator().manual_seed(0)
    y = torch.where(torch.rand(b, h, w, generator=g) < 0.3, ids, torch.full_like(ids, float("nan")))
    return x, y


@pytest.mark.parametrize(("h", "w"), [(6, 6), (5, 7)])
def test_augment_moves_labels_with_their_pixels(h: int, w: int) -> None:
    combos = list(itertools.product([False, True], repeat=3))
    x, y = _ids(len(combos), h, w)
    flags = torch.tensor(combos)
    xa, ya = augment(x, y, flags)
    assert xa.shape == x.shape and ya.shape == y.shape
    lab = torch.isfinite(ya)
    assert lab.sum() == torch.isfinite(y).sum()
    torch.testing.assert_close(ya[lab], xa[:, 0][lab])  # each label still sits on its own image pixel
    torch.testing.assert_close(xa[:, 1], -xa[:, 0])  # every band moved the same way
    for i, (fh, fv, tr) in enumerate(combos):
        want = x[i]
        if fh:
            want = want.flip(-1)
        if fv:
            want = want.flip(-2)
        if tr and h == w:
            want = want.transpose(-1, -2)
        torch.testing.assert_close(xa[i], want)
    if h == w:  # the 8 flag combinations give the 8 distinct symmetries of a square
        assert len({tuple(xa[i, 0].flatten().tolist()) for i in range(8)}) == 8


def test_augment_keeps_channels_last() -> None:
    x, y = _ids(4, 8, 8)
    x = x.contiguous(memory_format=torch.channels_last)
    xa, _ = augment(x, y, torch.tensor([[True, False, True]] * 4))
    torch.testing.assert_close(xa.contiguous(), x.flip(-1).transpose(-1, -2).contiguous())
