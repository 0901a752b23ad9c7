"""tune_agb.location: the one opener of local paths, ``file://`` and pyarrow URIs, and its atomic writes (on local
temporary folders; ``s3://``/``gs://`` need a network and are only parsed here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest

from tune_agb.errors import TuneAgbError
from tune_agb.location import (
    exists,
    is_uri,
    join,
    location_of,
    open_location,
    read_bytes,
    read_table,
    resolve,
    write_atomic,
    write_path_atomic,
)

LOCAL = pafs.LocalFileSystem()


# -- locations --------------------------------------------------------------------------------------------------
def test_uris_stay_as_given_and_local_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_uri("s3://bucket/st") and is_uri("gs://bucket/st")
    assert not is_uri("/abs/st") and not is_uri("rel/st") and not is_uri("file:///abs/st")
    assert resolve("s3://bucket/st/") == "s3://bucket/st/"
    monkeypatch.chdir(tmp_path)
    assert resolve("st") == str(tmp_path.resolve() / "st")
    assert resolve(f"file://{tmp_path}/st") == str(tmp_path.resolve() / "st")
    # a pyarrow path back as a location like the experiment's
    assert (
        location_of("s3://bucket/st/exp", "bucket/st/exp/t/checkpoint_000001")
        == "s3://bucket/st/exp/t/checkpoint_000001"
    )
    assert location_of(str(tmp_path), "st/x") == str(tmp_path.resolve() / "st" / "x")
    # a relative local experiment opens at the absolute path
    fs, path = open_location("st/exp")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path.resolve() / "st" / "exp")


def test_a_location_that_cannot_be_opened_is_one_line_naming_it_or_its_label() -> None:
    with pytest.raises(TuneAgbError) as err:
        open_location("nosuchscheme://bucket/st", label="--storage nosuchscheme://bucket/st")
    msg = str(err.value)
    assert msg.startswith("--storage nosuchscheme://bucket/st: cannot open it (") and "\n" not in msg
    with pytest.raises(TuneAgbError, match=r"^nosuchscheme://b/x: cannot open it \("):
        open_location("nosuchscheme://b/x")


# -- atomic writes ----------------------------------------------------------------------------------------------
class _WatchedFS:
    """A LocalFileSystem whose output streams write in small chunks, record what a reader of ``target`` sees after
    each chunk, and can fail part-way (a full disk, a lost connection)."""

    def __init__(self, target: Path, fail_after_chunks: int | None = None):
        self.target, self.fail_after = target, fail_after_chunks
        self.seen: list[bytes | None] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(LOCAL, name)

    def open_output_stream(self, path: str) -> _ChunkedStream:
        return _ChunkedStream(self, LOCAL.open_output_stream(path))


class _ChunkedStream:
    def __init__(self, fs: _WatchedFS, inner: Any):
        self.fs, self.inner = fs, inner

    def __enter__(self) -> _ChunkedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.close()

    def write(self, data: bytes) -> None:
        for i in range(0, len(data), 10):
            if self.fs.fail_after is not None and i // 10 == self.fs.fail_after:
                raise OSError("injected: no space left on device")
            self.inner.write(data[i : i + 10])
            self.inner.flush()
            self.fs.seen.append(self.fs.target.read_bytes() if self.fs.target.exists() else None)


def test_atomic_write_shows_readers_the_old_content_until_the_new_one_is_complete(tmp_path: Path) -> None:
    target = tmp_path / "best.yaml"
    old, new = b"old content " * 10, b"new content, longer than the old one " * 10
    target.write_bytes(old)
    fs = _WatchedFS(target)
    write_path_atomic(fs, str(target), new)
    assert len(fs.seen) == -(-len(new) // 10) and set(fs.seen) == {old}  # never a part of the new content
    assert target.read_bytes() == new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.yaml"]  # the temporary file was moved in place


def test_a_failed_atomic_write_leaves_the_old_content_and_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "results.parquet"
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="no space left"):
        write_path_atomic(_WatchedFS(target, fail_after_chunks=3), str(target), b"x" * 100)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.parquet"]
    # a first write that fails leaves no file at all
    with pytest.raises(OSError):
        write_path_atomic(_WatchedFS(tmp_path / "new.yaml", fail_after_chunks=1), str(tmp_path / "new.yaml"), b"y" * 50)
    assert not (tmp_path / "new.yaml").exists()


def test_file_uri_and_plain_path_open_the_same_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "st").mkdir()
    by_path, by_uri = open_location("st"), open_location(f"file://{tmp_path}/st")
    assert by_path[1] == by_uri[1] == str(tmp_path.resolve() / "st")
    assert isinstance(by_path[0], pafs.LocalFileSystem) and isinstance(by_uri[0], pafs.LocalFileSystem)
    write_atomic(f"file://{tmp_path}/st/a.txt", b"through the URI")
    assert read_bytes("st/a.txt") == b"through the URI" == read_bytes(str(tmp_path / "st" / "a.txt"))


def test_read_bytes_is_none_for_a_missing_file_and_write_atomic_creates_the_folder(tmp_path: Path) -> None:
    assert read_bytes(str(tmp_path / "nothing.json")) is None and not exists(str(tmp_path / "nothing.json"))
    assert read_bytes(str(tmp_path)) is None  # a folder is not a file
    target = join(str(tmp_path), "new", "deep/", "x.bin")
    assert target == f"{tmp_path}/new/deep/x.bin"
    write_atomic(target, b"\x00\x01")
    assert read_bytes(target) == b"\x00\x01" and exists(target)
    assert sorted(p.name for p in (tmp_path / "new" / "deep").iterdir()) == ["x.bin"]
    assert not exists("nosuchscheme://b/x")  # cannot be opened: not there


def test_read_table_reads_a_parquet_file_by_path_or_file_uri_and_names_a_bad_one(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"name": ["a", "b"], "n": [1, 2]}), tmp_path / "t.parquet")
    assert read_table(str(tmp_path / "t.parquet")).to_pydict() == {"name": ["a", "b"], "n": [1, 2]}
    assert read_table(f"file://{tmp_path}/t.parquet", columns=["n"]).to_pydict() == {"n": [1, 2]}
    assert read_table(str(tmp_path / "missing.parquet")) is None
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(TuneAgbError, match=r"bad\.parquet: not a readable parquet table \(") as err:
        read_table(str(tmp_path / "bad.parquet"))
    assert "\n" not in str(err.value)
