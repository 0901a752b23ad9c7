"""Maps written to remote storage (``s3://``, ``gs://`` ... through :mod:`tune_agb.location`): every file is made in
a local work folder first (blocks staged, COG assembled and validated there), then uploaded; an object store makes
an upload visible only once it is complete, so no half-written map is ever seen at the destination.
"""

from __future__ import annotations

import re
from pathlib import Path

from tune_agb.errors import TuneAgbError
from tune_agb.location import exists, first_line, is_uri, join, open_location

CHUNK = 8 * 1024 * 1024  # bytes per read while uploading: memory stays bounded whatever the COG's size
WORK_ROOT = ".tune_agb_maps"  # default local work folder of a remote --out, in the current folder


def default_work_dir(uri: str) -> Path:
    """The local work folder of a remote output: ``./.tune_agb_maps/<the URI as a file name>`` (stable, so a rerun
    finds the blocks staged by the last one)."""
    return Path(WORK_ROOT).absolute() / re.sub(r"[^A-Za-z0-9._-]+", "_", uri.rstrip("/"))


def final_location(out: str, name: str) -> str:
    """Where the file ``name`` of a map goes: under the URI, or in the local folder."""
    return join(out, name) if is_uri(out) else str(Path(out) / name)


def upload(local: Path, uri: str) -> None:
    """Copy the local file to ``uri`` in chunks.

    Raises:
        TuneAgbError: one line naming the destination when it cannot be written.
    """
    fs, path = open_location(uri)
    try:
        parent = path.rsplit("/", 1)[0]
        if parent:
            fs.create_dir(parent, recursive=True)
        with open(local, "rb") as src, fs.open_output_stream(path) as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
    except OSError as exc:
        raise TuneAgbError(f"{uri}: cannot write it ({first_line(exc)})") from None


def remote_exists(uri: str) -> bool:
    return exists(uri)
