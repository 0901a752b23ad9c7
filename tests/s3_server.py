"""A real S3 endpoint for the tests: moto's S3 server (an HTTP S3 API, the one boto3, pyarrow and GDAL speak) on
localhost, named the way users name an S3-compatible endpoint: ``AWS_ENDPOINT_URL`` and credentials in the
environment. Nothing here mocks a client: every request crosses a socket.

Use the ``s3`` fixture (``tests/conftest.py``): the server runs once per test session; each test gets the
environment set (and restored after it) and a fresh bucket from :meth:`S3Server.bucket`. Subprocesses and Ray
instances started by the test inherit the environment; pass :attr:`S3Server.env` explicitly to anything started
with its own environment.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REGION = "us-east-1"
ACCESS_KEY = "tune-agb-test"
SECRET_KEY = "tune-agb-test-secret"
_counter = itertools.count()


@dataclass
class S3Server:
    """A running moto S3 server: its endpoint URL and the environment that points clients at it."""

    endpoint: str  # http://127.0.0.1:PORT
    server: Any = field(repr=False)

    @property
    def host_port(self) -> str:
        return self.endpoint.split("://", 1)[1]

    @property
    def env(self) -> dict[str, str]:
        """What a user exports for an S3-compatible endpoint (boto3 and pyarrow read ``AWS_ENDPOINT_URL``)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",  # never ask an instance-metadata service for credentials
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )

    def bucket(self, prefix: str = "tune-agb") -> str:
        """Create a new, empty bucket and return its name (unique within the session)."""
        name = f"{prefix}-{next(_counter)}-{os.getpid()}"
        self.client().create_bucket(Bucket=name)
        return name

    def upload_dir(self, local: Path, uri: str) -> str:
        """Copy every file under ``local`` to ``s3://BUCKET/PREFIX`` (``uri``), keeping relative paths; returns uri."""
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        client = self.client()
        for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            key = "/".join(filter(None, [prefix.strip("/"), path.relative_to(local).as_posix()]))
            client.upload_file(str(path), bucket, key)
        return uri

    def keys(self, uri: str) -> list[str]:
        """Object keys under ``s3://BUCKET/PREFIX`` (no bucket), sorted; folder markers (``a/``) left out."""
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.strip("/"))
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/"))

    @contextlib.contextmanager
    def credential_checks(self) -> Iterator[None]:
        """moto checks credentials (IAM) while inside: the tests' access key is then unknown to it (403
        InvalidAccessKeyId), as a wrong key is to a real endpoint. Outside, every request is allowed."""

        def reset_auth(count: bytes) -> None:  # moto's own API: authenticate requests after COUNT more of them
            req = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=count, method="POST")
            req.add_header("Content-Type", "text/plain")  # not a form: moto reads the raw body
            with urllib.request.urlopen(req, timeout=10):
                pass

        reset_auth(b"0")
        try:
            yield
        finally:
            reset_auth(b"inf")

    def read(self, uri: str) -> bytes:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def start_server() -> S3Server:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return S3Server(endpoint=f"http://{host}:{port}", server=server)


def environment(server: S3Server) -> Iterator[None]:
    """Set the server's environment for the duration of a test, then put the old values back."""
    old = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
