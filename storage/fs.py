"""Filesystem helpers: one code path for local folders and fsspec URLs (``s3://``, ``gs://``, ``memory://``).

Atomicity differs by filesystem, and the cache relies on it:

- local: a shard is built under a temporary name in the same folder and ``os.rename``-d into place, which is
  atomic on POSIX; single files (manifest) are written to ``name.tmp-<random>`` then renamed.
- object stores: there is no rename, but a single ``PUT`` is atomic. A shard's objects are written first and its
  completion marker last; readers treat a shard without its marker as absent, and a rerun deletes and rewrites
  it.

``Location`` pairs an fsspec filesystem with a root path so the rest of the code joins relative paths and never
parses URLs itself.

Object stores and caching: fsspec filesystems such as s3fs cache directory listings per process, and other
processes (dask workers, job-array tasks) write shards behind that cache's back. Every listing or existence test
here (``exists``, ``listdir``, ``files``) therefore drops the cached entries of the path and everything below it
first: one more LIST/HEAD request per call, in exchange for never deciding completeness from a stale listing.

Credentials and endpoints: opening a remote ``Location`` (``Location.parse``) probes the root once and turns a
missing credential, a refused or unreachable endpoint or a denied request into a one-line ``CacheError`` naming
the URL, what failed and the environment variables that fix it, instead of a botocore traceback.

Parquet and threads: every parquet read goes through ``Location.read_parquet`` / ``open_parquet``, synchronous
on the calling thread (``pre_buffer=False``, ``use_threads=False``). ``pq.read_table(python_file)`` (and
``ParquetFile``'s default ``pre_buffer=True``) reads through Arrow's I/O thread pool, whose callbacks can hold
the last reference to a buffer of Python bytes or to the Python file after the call has returned; when that
reference drops while the interpreter finalizes, the Arrow thread asks for the GIL, CPython ends the thread
with ``pthread_exit``, the unwind meets a ``noexcept`` C++ frame and the process aborts with "terminate called
without an active exception" after printing its result (``logitcache verify``, about one run in 60 on a busy
machine; the core dump's aborting thread was in ``arrow::py::PyBuffer::~PyBuffer`` under
``ReadRangeCache::LazyImpl::~LazyImpl``). Local files are opened by path, so Arrow reads them natively.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec

from .errors import CacheError

#: Exception class names (botocore, aiohttp, google-auth, ...) that mean "no usable credentials".
_CREDENTIAL_ERRORS = {
    "NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "NoAuthTokenError",
    "DefaultCredentialsError", "RefreshError", "UnauthorizedSSOTokenError", "TokenRetrievalError",
}
#: Exception class names that mean "the endpoint cannot be reached".
_CONNECT_ERRORS = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ClientConnectorError", "ServerTimeoutError", "ProxyConnectionError", "SSLError", "InvalidEndpointError",
    "ConnectionRefusedError", "ConnectionError", "TimeoutError", "gaierror", "ClientOSError",
}
#: Error codes in a server's answer that mean "these credentials are refused".
_DENIED_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken",
                 "Forbidden", "403")


def _fix_hint(protocol: str) -> str:
    if protocol in ("s3", "s3a"):
        return (
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), AWS_ENDPOINT_URL for a non-AWS "
            "endpoint, AWS_DEFAULT_REGION, or the same as storage options "
            '(key, secret, client_kwargs={"endpoint_url": ...}; FSSPEC_S3=\'{...}\' from the shell)'
        )
    if protocol in ("gs", "gcs"):
        return "set GOOGLE_APPLICATION_CREDENTIALS (or run `gcloud auth application-default login`) or pass token=..."
    return f"check the {protocol} filesystem's credentials and endpoint (storage options or FSSPEC_{protocol.upper()})"


def remote_error(url: str, protocol: str, error: BaseException) -> CacheError | None:
    """A one-line ``CacheError`` for a credential/endpoint failure talking to ``url``, or None if it is not one."""
    chain: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    names = {type(x).__name__ for x in chain}
    text = " ".join(str(x) for x in chain)
    detail = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".strip().rstrip(":")
    if names & _CREDENTIAL_ERRORS:
        what = "no usable credentials"
    elif names & _CONNECT_ERRORS:
        what = "cannot connect to the endpoint"
    elif isinstance(error, PermissionError) or any(code in text for code in _DENIED_CODES):
        what = "the credentials were refused"
    else:
        return None
    return CacheError(f"{url}: {what} ({detail}); {_fix_hint(protocol)}")


@dataclass(frozen=True)
class Location:
    """A folder on some filesystem. ``url`` is what the user gave; ``root`` is the filesystem-native path."""

    fs: Any
    root: str
    url: str
    options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @staticmethod
    def parse(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> Location:
        text = os.fspath(url)
        if "://" not in text or text.startswith("file://"):
            local = Path(text.removeprefix("file://")).expanduser().absolute()
            return Location(fsspec.filesystem("file"), str(local), str(local))
        fs, root = fsspec.core.url_to_fs(text, **(storage_options or {}))
        loc = Location(fs, root.rstrip("/"), text.rstrip("/"), dict(storage_options or {}))
        loc.probe()
        return loc

    @property
    def protocol(self) -> str:
        protocol = self.fs.protocol
        return protocol if isinstance(protocol, str) else protocol[0]

    def probe(self) -> None:
        """One request to the root, so credential and endpoint failures surface here as a one-line ``CacheError``."""
        try:
            self.fs.exists(self.root)
        except Exception as e:
            err = remote_error(self.url, self.protocol, e)
            if err is None:
                raise
            raise err from None

    def refresh(self, *parts: str) -> None:
        """Drop fsspec's cached listings of ``parts`` and everything below it (no-op for local folders)."""
        if self.is_local:
            return
        path = self.path(*parts)
        try:
            self.fs.invalidate_cache(path)
        except Exception:  # a filesystem without a listing cache
            return
        cache = getattr(self.fs, "dircache", None)
        if cache is not None:
            prefix = self.fs._strip_protocol(path).rstrip("/") + "/"
            for key in [k for k in list(cache) if k.startswith(prefix)]:
                cache.pop(key, None)

    @property
    def is_local(self) -> bool:
        protocol = self.fs.protocol
        protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
        return "file" in protocols or "local" in protocols

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *[p.strip("/") for p in parts if p]])

    def url_of(self, *parts: str) -> str:
        return "/".join([self.url, *[p.strip("/") for p in parts if p]])

    def child(self, *parts: str) -> Location:
        return Location(self.fs, self.path(*parts), self.url_of(*parts), self.options)

    def exists(self, *parts: str) -> bool:
        self.refresh(*parts)
        return bool(self.fs.exists(self.path(*parts)))

    def read_bytes(self, *parts: str) -> bytes:
        return bytes(self.fs.cat_file(self.path(*parts)))

    def open_parquet(self, *parts: str, **options: Any) -> Any:
        """A ``pyarrow.parquet.ParquetFile`` on the file at ``parts`` that reads on the calling thread only.

        Read it with ``use_threads=False`` (see the module docstring, "Parquet and threads"); ``options`` go to
        ``ParquetFile`` (e.g. ``page_checksum_verification=True``)."""
        import pyarrow.parquet as pq

        if self.is_local:
            return pq.ParquetFile(self.path(*parts), pre_buffer=False, **options)
        return pq.ParquetFile(self.fs.open(self.path(*parts), "rb"), pre_buffer=False, **options)

    def read_parquet(self, *parts: str, columns: list[str] | None = None) -> Any:
        """The parquet file at ``parts`` as a ``pyarrow.Table``, read on the calling thread (never Arrow's pools)."""
        pf = self.open_parquet(*parts)
        try:
            return pf.read(columns=columns, use_threads=False)
        finally:
            pf.close()

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts).decode("utf-8"))

    def write_bytes_atomic(self, data: bytes, *parts: str) -> None:
        """Write one file so that readers see either the old content or the new, never a prefix."""
        target = self.path(*parts)
        if self.is_local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        else:
            self.fs.pipe_file(target, data)

    def write_json_atomic(self, obj: Any, *parts: str) -> None:
        self.write_bytes_atomic((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"), *parts)

    def listdir(self, *parts: str) -> list[str]:
        """Names (not paths) of the entries directly under ``parts``; empty if it does not exist."""
        path = self.path(*parts)
        self.refresh(*parts)
        if not self.fs.exists(path):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False))

    def rm(self, *parts: str) -> None:
        path = self.path(*parts)
        if self.is_local:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.remove(path)
        elif self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def files(self, *parts: str) -> dict[str, int]:
        """Every file below ``parts`` as ``{relative path: size in bytes}`` (sorted by path)."""
        base = self.path(*parts)
        self.refresh(*parts)
        if not self.fs.exists(base):
            return {}
        found = self.fs.find(base, detail=True)
        out = {}
        for path, info in found.items():
            if info.get("type", "file") == "directory":
                continue
            rel = path[len(base.rstrip("/")) + 1 :] if path.startswith(base) else path
            out[rel] = int(info.get("size") or 0)
        return dict(sorted(out.items()))


def upload_dir(local_dir: str, dest: Location) -> None:
    """Copy every file of a local folder to ``dest`` (an object-store prefix), preserving relative paths."""
    for dirpath, _, filenames in os.walk(local_dir):
        for name in sorted(filenames):
            src = os.path.join(dirpath, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            if dest.is_local:
                os.makedirs(os.path.dirname(dest.path(rel)), exist_ok=True)
            dest.fs.put_file(src, dest.path(rel))
