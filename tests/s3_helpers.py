"""A local S3 endpoint for object-store tests: moto's threaded server on a free port, with one bucket.

Callers ask for ``s3fs`` and ``moto.server`` first (``ci_helpers.need_module``), so that a missing dev extra is a
skip locally and a failure under CI; this module imports them only when the server starts.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_s3(bucket: str) -> Iterator[dict[str, Any]]:
    """Start moto's S3 server, create ``bucket``, yield the fsspec ``storage_options`` that reach it, stop it.

    Meant for a module-scoped fixture: ``yield from moto_s3("caches")``.
    """
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
            region_name="us-east-1",
        ).create_bucket(Bucket=bucket)
        yield {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    finally:
        server.stop()
