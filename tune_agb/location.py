"""Where a file or folder is: a local path, a ``file://`` URI, or remote storage (``s3://``, ``gs://``, ... through
``pyarrow.fs``). The one opener of a location for the whole package, with one rule for ``file://``: it is a local
path (the prefix removed); local paths are made absolute (``~`` expanded); any other ``scheme://`` is remote.

Writes go next to their target first and are moved in place, so a reader (or a process killed mid-write) never sees
half a file. Importing this module imports neither Ray nor torch.

Remote storage is opened the way AWS's own tools open it: credentials and region from the environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``/``AWS_DEFAULT_REGION``, or a profile/instance role)
and an S3-compatible server (MinIO, Ceph, a cloud vendor's S3) named by ``AWS_ENDPOINT_URL``. What an object store
answers (access denied, no such bucket, unknown key, endpoint unreachable) is worded once, by :func:`failure`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import yaml

from tune_agb.errors import TuneAgbError

FILE_SCHEME = "file://"
TMP_SUFFIX = ".tmp"

Folder = tuple[pafs.FileSystem, str]


def is_uri(location: str) -> bool:
    """Whether ``location`` names remote storage (``s3://``, ``gs://``, ...); ``file://`` and plain paths are local."""
    return "://" in location and not location.startswith(FILE_SCHEME)


def resolve(location: str) -> str:
    """A location as stored and passed on: local paths (and ``file://`` URIs) as an absolute path, URIs as given."""
    if is_uri(location):
        return location
    return str(Path(location.removeprefix(FILE_SCHEME)).expanduser().resolve())


def open_location(location: str, label: str | None = None) -> Folder:
    """The filesystem and the path in it of a location.

    Args:
        location: a folder or file: a local path or ``file://`` URI (made absolute), or ``s3://``/``gs://``/...
        label: how the error names it (default: ``location``), e.g. ``--storage s3://bucket``.

    Raises:
        TuneAgbError: one line when it cannot be opened (unknown scheme, no credentials, ...).
    """
    try:
        if is_uri(location):
            return pafs.FileSystem.from_uri(location)
        return pafs.LocalFileSystem(), str(Path(location.removeprefix(FILE_SCHEME)).expanduser().absolute())
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise failure(label or location, "cannot open it", exc) from None


def join(location: str, *names: str) -> str:
    """``location/name/...`` (one ``/`` between parts, whatever the location ends with)."""
    return "/".join([location.rstrip("/"), *(n.strip("/") for n in names)])


def location_of(like: str, path: str) -> str:
    """A pyarrow filesystem ``path`` as a location like ``like``: a URI with its scheme, or an absolute local path."""
    if is_uri(like):
        return f"{like.split('://', 1)[0]}://{path}"
    return str(Path(path).resolve())


def read_path(fs: pafs.FileSystem, path: str) -> bytes | None:
    """The bytes of the file ``path`` of ``fs``; None when there is no file there (other errors raise ``OSError``)."""
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read()


def write_path_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` of ``fs`` next to it first (``PATH.tmp``), then move it in place.

    A reader sees the old content or the new one, never part of it; a failed write leaves the old content.
    """
    tmp = f"{path}{TMP_SUFFIX}"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise


def read_bytes(location: str) -> bytes | None:
    """The bytes of the file at ``location``; None when there is none.

    Raises:
        TuneAgbError: when the location cannot be opened or the file cannot be read (one line naming it).
    """
    fs, path = open_location(location)
    try:
        data = read_path(fs, path)
        if data is None and is_uri(location):
            check_bucket(location)  # a missing bucket is said as such, not as a missing file
        return data
    except OSError as exc:
        raise failure(location, "cannot read it", exc) from None


def read_table(location: str, columns: list[str] | None = None) -> pa.Table | None:
    """The parquet file at ``location`` as an Arrow table (only ``columns`` when given); None when there is none.

    Raises:
        TuneAgbError: one line naming the file when it cannot be read or is not a parquet table.
    """
    import pyarrow.parquet as pq

    data = read_bytes(location)
    if data is None:
        return None
    try:
        return pq.read_table(io.BytesIO(data), columns=columns)
    except (OSError, ValueError, KeyError) as exc:  # ArrowInvalid is a ValueError
        raise TuneAgbError(f"{location}: not a readable parquet table ({first_line(exc)})") from None


def parse_document(data: bytes, where: str, fmt: str) -> Any:
    """JSON (``fmt="json"``) or YAML (``"yaml"``) bytes read from ``where`` as Python data.

    Raises:
        TuneAgbError: one line naming ``where`` when the bytes are not valid JSON / YAML text.
    """
    try:
        return json.loads(data) if fmt == "json" else yaml.safe_load(data.decode())
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise TuneAgbError(f"{where}: not valid {fmt.upper()} ({first_line(exc)})") from None


def read_document(location: str, fmt: str) -> Any | None:
    """The JSON or YAML file at ``location`` as Python data; None when there is none (see :func:`parse_document`)."""
    data = read_bytes(location)
    return None if data is None else parse_document(data, location, fmt)


def write_atomic(location: str, data: bytes) -> None:
    """Write ``data`` to the file at ``location`` atomically (:func:`write_path_atomic`), creating its folder.

    Raises:
        TuneAgbError: when the location cannot be opened or written (one line naming it).
    """
    fs, path = open_location(location)
    try:
        parent = path.rsplit("/", 1)[0]
        if parent:
            fs.create_dir(parent, recursive=True)
        write_path_atomic(fs, path, data)
    except OSError as exc:
        raise failure(location, "cannot write it", exc) from None


def exists(location: str) -> bool:
    """Whether a file is at ``location`` (False when it cannot be opened or looked at)."""
    try:
        fs, path = open_location(location)
        return fs.get_file_info(path).type == pafs.FileType.File
    except (OSError, TuneAgbError):
        return False


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# What object stores answer, in pyarrow's words (``AWS Error ACCESS_DENIED during HeadObject operation: ...``), as
# (pattern, the words users see). HEAD requests carry no error body: a wrong key then reads as ACCESS_DENIED.
CREDENTIALS_HINT = "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and the bucket's permissions"
_STORE_ANSWERS: tuple[tuple[str, str], ...] = (
    (
        r"INVALID_ACCESS_KEY_ID|InvalidAccessKeyId|Access Key Id you provided does not exist",
        "the access key is not known to the endpoint; " + CREDENTIALS_HINT,
    ),
    (
        r"SIGNATURE_DOES_NOT_MATCH|SignatureDoesNotMatch|signature we calculated does not match",
        "the secret key does not fit the access key; " + CREDENTIALS_HINT,
    ),
    (r"ACCESS_DENIED|AccessDenied|Forbidden|HTTP response code: 403", "access denied; " + CREDENTIALS_HINT),
    (r"EXPIRED_TOKEN|ExpiredToken", "the session token has expired; renew the credentials (AWS_SESSION_TOKEN)"),
    (r"NO_SUCH_BUCKET|NoSuchBucket|Bucket '[^']*' not found", "the bucket{bucket} does not exist"),
    (
        r"NETWORK_CONNECTION|curlCode: [67]\b|Could not connect|Couldn't resolve host",
        "cannot reach the S3 endpoint{endpoint}",
    ),
)
_BUCKET_IN_MESSAGE = re.compile(r"[Bb]ucket '([^']+)'")


def store_answer(exc: BaseException | str) -> str | None:
    """An object store's answer in a filesystem error (or an error message: pyarrow's, GDAL's), in plain words with
    what to check; None when it holds none.

    Example: ``... AWS Error ACCESS_DENIED during HeadObject operation: ...`` becomes ``access denied; check
    AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and the bucket's permissions``.
    """
    text = str(exc)
    for pattern, words in _STORE_ANSWERS:
        if re.search(pattern, text):
            bucket = _BUCKET_IN_MESSAGE.search(text)
            endpoint = os.environ.get("AWS_ENDPOINT_URL")
            where = f" AWS_ENDPOINT_URL={endpoint}" if endpoint else " (AWS_ENDPOINT_URL names an S3-compatible one)"
            return words.format(bucket=f" {bucket.group(1)}" if bucket else "", endpoint=where)
    return None


def failure(location: str, doing: str, exc: BaseException) -> TuneAgbError:
    """The one-line error of a failed filesystem call on ``location``: ``LOCATION: ANSWER`` for an object store's
    answer (``s3://b/x: access denied; check ...``), else ``LOCATION: DOING (first line of the message)``."""
    answer = store_answer(exc)
    return TuneAgbError(f"{location}: {answer}" if answer else f"{location}: {doing} ({first_line(exc)})")


def check_bucket(location: str, label: str | None = None) -> None:
    """Fail with one line when the bucket of a remote ``location`` does not exist or cannot be reached with the
    credentials at hand (nothing is checked for a local path, which is created as needed).

    Args:
        location: a folder or file, e.g. ``s3://bucket/runs``.
        label: how the error names it (default: ``location``), e.g. ``--storage s3://bucket/runs``.

    Raises:
        TuneAgbError: ``LABEL: the bucket BUCKET does not exist ...``, or what the store answered (:func:`failure`).
    """
    if not is_uri(location):
        return
    fs, path = open_location(location, label)
    bucket = path.split("/", 1)[0]
    try:
        found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
    except OSError as exc:
        raise failure(label or location, "cannot look at its bucket", exc) from None
    if not found:
        raise TuneAgbError(no_bucket(label or location, bucket))


def no_bucket(label: str, bucket: str) -> str:
    """The one line for a location whose bucket does not exist."""
    endpoint = " and AWS_ENDPOINT_URL" if os.environ.get("AWS_ENDPOINT_URL") else ""
    return f"{label}: the bucket {bucket} does not exist (create it first, or check its name{endpoint})"
