"""Remote inputs: rasters GDAL reads over the network (``s3://``, ``https://``, ``/vsis3/``, ``/vsicurl/`` ...) and
S3 tables read through :mod:`tune_agb.location`.

The GDAL settings for an S3-compatible endpoint follow from the endpoint users name for every other client
(``AWS_ENDPOINT_URL``, read by boto3, pyarrow and the AWS CLI): :func:`gdal_s3_options` is the one place that turns
it into GDAL's ``AWS_S3_ENDPOINT`` / ``AWS_HTTPS`` / ``AWS_VIRTUAL_HOSTING``. Errors of remote reads become one line
saying what is wrong (no such object or bucket, access denied, server unreachable). Imports neither rasterio nor
Ray nor torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from tune_agb.errors import TuneAgbError
from tune_agb.location import (
    CREDENTIALS_HINT,
    FILE_SCHEME,
    check_bucket,
    failure,
    no_bucket,
    open_location,
    store_answer,
)

# AWS's own S3 hosts take virtual-hosted requests (bucket.s3.amazonaws.com); other S3-compatible servers (MinIO,
# Ceph, moto, ...) are addressed path-style (host/bucket/key), as boto3 does for a custom endpoint.
AWS_HOST_SUFFIXES = (".amazonaws.com", ".amazonaws.com.cn")
# GDAL retries of transient HTTP errors (429, 500, 502, 503, 504) of remote reads; never retried: 403 / 404.
HTTP_RETRY = {"GDAL_HTTP_MAX_RETRY": "3", "GDAL_HTTP_RETRY_DELAY": "1"}
# GDAL lists a remote raster's "folder" to look for side-car files (.aux.xml, .ovr, .msk): one request per open at
# best, a long listing (or a wait on a presigned URL) at worst. Remote opens skip it.
REMOTE_OPEN = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}


def is_remote(location: str) -> bool:
    """Whether a raster location is not a plain local path but is left to GDAL's virtual file systems: a URI
    (``s3://``, ``https://``, ...; ``file://`` is local) or a GDAL path (``/vsis3/``, ``/vsicurl/``, ``/vsizip/``)."""
    return location.startswith("/vsi") or ("://" in location and not location.startswith(FILE_SCHEME))


def raster_location(path: str | Path) -> str:
    """A raster location as handed to GDAL: remote locations unchanged, a ``file://`` URI or ``~`` as a local path.

    Pass URIs as strings: ``Path("s3://b/k")`` has already lost a slash (``s3:/b/k``).
    """
    text = str(path)
    if is_remote(text):
        return text
    return str(Path(text.removeprefix(FILE_SCHEME)).expanduser())


def location_stem(location: str) -> str:
    """The file name of a location without its extension: ``s3://b/x/A.tif`` and ``https://h/x/A.tif?sig=..`` ->
    ``A`` (a URI's query string and fragment are not part of the name)."""
    if "://" in location:
        return PurePosixPath(urlsplit(location).path).stem
    return Path(location).stem


def s3_uri(location: str) -> str | None:
    """``s3://bucket/key`` of an S3 raster location (``s3://`` or ``/vsis3/``), None for any other location."""
    if location.startswith("s3://"):
        return location
    if location.startswith("/vsis3/"):
        return "s3://" + location.removeprefix("/vsis3/")
    return None


def gdal_s3_options(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """GDAL's settings for the S3 endpoint named by ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``.

    ``http://minio:9000`` gives ``AWS_S3_ENDPOINT=minio:9000`` (host:port, no scheme), ``AWS_HTTPS=NO`` (``YES`` for
    ``https://``) and, for a server other than AWS's own, ``AWS_VIRTUAL_HOSTING=FALSE`` (path-style requests).
    A setting exported in the environment is kept (never overridden); an exported ``AWS_S3_ENDPOINT`` means GDAL is
    configured by hand and nothing is derived.

    Args:
        environ: the environment to read (default ``os.environ``).

    Returns:
        The settings to pass to ``rasterio.Env``; empty without an endpoint.

    Raises:
        TuneAgbError: when the endpoint is not an ``http(s)://host[:port]`` URL.
    """
    env = os.environ if environ is None else environ
    name = "AWS_ENDPOINT_URL_S3" if env.get("AWS_ENDPOINT_URL_S3") else "AWS_ENDPOINT_URL"
    endpoint = env.get(name, "").strip()
    if not endpoint or env.get("AWS_S3_ENDPOINT"):
        return {}
    url = urlsplit(endpoint)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise TuneAgbError(f"{name}={endpoint!r}: expected an http(s):// URL such as http://localhost:9000")
    derived = {
        "AWS_S3_ENDPOINT": url.netloc + url.path.rstrip("/"),
        "AWS_HTTPS": "NO" if url.scheme == "http" else "YES",
    }
    if not url.hostname.endswith(AWS_HOST_SUFFIXES):
        derived["AWS_VIRTUAL_HOSTING"] = "FALSE"
    return {k: v for k, v in derived.items() if k not in env}


def gdal_network_options(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """GDAL settings for remote reads: the S3 endpoint (:func:`gdal_s3_options`) and retries of transient HTTP
    errors (:data:`HTTP_RETRY`), each unless exported in the environment."""
    env = os.environ if environ is None else environ
    return {**{k: v for k, v in HTTP_RETRY.items() if k not in env}, **gdal_s3_options(env)}


def remote_open_options(location: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """GDAL settings for opening ``location``: :func:`gdal_network_options`, and for a remote location no listing
    of its folder (:data:`REMOTE_OPEN`, unless exported)."""
    env = os.environ if environ is None else environ
    if not is_remote(location):
        return {}
    return {**gdal_network_options(env), **{k: v for k, v in REMOTE_OPEN.items() if k not in env}}


def s3_object_problem(uri: str, what: str) -> str | None:
    """Why the S3 object ``uri`` cannot be read, as one line (no such object or bucket, a prefix, access denied);
    None when it is there. Asked through pyarrow's S3 client, which reads the same endpoint and credentials.

    Raises:
        TuneAgbError: when no S3 client can be made for ``uri``.
    """
    fs, path = open_location(uri)
    try:
        kind = fs.get_file_info(path).type
    except OSError as exc:
        return str(failure(uri, "cannot read it", exc))
    if kind == pafs.FileType.File:
        return None
    try:
        check_bucket(uri)
    except TuneAgbError as exc:
        return str(exc)
    if kind == pafs.FileType.Directory:
        return f"{uri}: is a folder (an S3 prefix), not a file"
    return f"{uri}: {what} file not found"


def raster_open_error(location: str, what: str, message: str) -> str:
    """One line for GDAL's error opening the remote raster ``location`` (``message``: the first line of it).

    GDAL's own words are used where they are clear; an S3 object GDAL calls "not recognized" or "does not exist" is
    asked about again through pyarrow (:func:`s3_object_problem`), since GDAL says so too for a 403 response.
    """
    low = message.lower()
    uri = s3_uri(location)
    if "bucket does not exist" in low:
        bucket = uri.removeprefix("s3://").split("/", 1)[0] if uri else ""
        return no_bucket(location, bucket) if bucket else f"{location}: {message}"
    if "response code: 404" in low:
        return f"{location}: {what} file not found (HTTP 404)"
    if "response code: 401" in low or "response code: 403" in low:
        return f"{location}: access denied ({message}); the URL is not public, or its signature expired"
    if "could not resolve host" in low or "failed to connect" in low or "could not connect" in low:
        return f"{location}: cannot reach the server ({message[:200]}); check the URL or AWS_ENDPOINT_URL"
    if "aws_secret_access_key" in low and "not defined" in low:
        return f"{location}: no AWS credentials found; {CREDENTIALS_HINT} (or AWS_NO_SIGN_REQUEST=YES: public bucket)"
    if uri is not None:
        if any(s in low for s in ("not recognized", "does not exist", "access key id", "signature", "access denied")):
            problem = s3_object_problem(uri, what)
            if problem is not None:
                return problem.replace(uri, location, 1)
            if "not recognized" not in low:
                answer = store_answer(message)
                return f"{location}: {answer}" if answer else f"{location}: cannot read it ({message[:200]})"
    elif "does not exist in the file system" in low:
        return f"{location}: {what} file not found"
    return f"{location}: not a readable raster ({message[:200]})"
