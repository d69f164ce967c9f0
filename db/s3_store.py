"""The artifact store in an S3-compatible bucket, for machines that share nothing else.

An API process and a GPU worker on another host see different disks; what one stores the other
must read. Objects are keyed `<prefix>/sha256/<hex>` and named by the same `cas://sha256/<hex>`
URIs as the folder store, so rows never say which backend holds the bytes.

A local read-through cache (`$BITPLAN_HOME/store-cache`, a `FolderStore`) sits in front of the
bucket, for two reasons. Consumers need a file, not a stream (torch and the dataset readers seek;
`FileResponse` serves ranges), so `path` materialises an object there once: downloaded while
hashed, renamed into place only if the digest matches the name. And writes need the digest
before the key is known: `put_stream` hashes into the cache in one pass, then asks the bucket
whether it already holds that content (a dedupe costs one HEAD, no upload) and otherwise uploads
the cached file in parts. Memory stays at a few chunks whatever the object's size, no temporary
keys are left in the bucket by a writer that dies, and a job's own artifacts are on its worker's
disk already when `record_success` asks for their paths.

A cached file's mtime is set to a fixed stamp once its digest has been checked; any later write
to it changes the mtime, so a copy that was modified is hashed again and fetched anew if it no
longer matches, without hashing every file on every read. The cache may be deleted at any time.

Errors from boto3 are logged here in full and raised as `StoreUnavailable` (or `UnknownObject`
for a missing object) with messages that name no bucket, endpoint, key or credential: they reach
tenants through API responses and job errors.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from db.store import (
    CHUNK_SIZE,
    ArtifactStore,
    FolderStore,
    StoredObject,
    StoreUnavailable,
    UnknownObject,
    check_namespace,
    parse_s3_url,
    sha256_of,
    spool,
)

log = logging.getLogger(__name__)

PART_BYTES = 16 << 20
TRANSFER = TransferConfig(
    multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES, max_concurrency=4
)
"""Uploads above 16 MiB go in 16 MiB parts, four at a time (s3transfer widens the parts of a
file that would need more than S3's 10,000)."""
CACHE_STAMP_NS = 1_000_000_000 * 1_000_000_000
"""The mtime (2001-09-09, whole seconds so every filesystem keeps it) of a cached file whose
digest has been checked."""
DEFAULT_REGION = "us-east-1"
PROBE_SECONDS = 2.0
MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


class S3Store(ArtifactStore):
    """`cas://` URIs over `s3://<bucket>/<prefix>/sha256/<hex>`, with a local file cache."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        cache_root: Path,
        *,
        endpoint_url: str | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.cache = FolderStore(cache_root)
        self.endpoint_url = endpoint_url
        self._client_lock = threading.Lock()
        self._client_pid: int | None = None
        self._client_value: Any = None

    @classmethod
    def from_url(cls, url: str, *, cache_root: Path, endpoint_url: str | None = None) -> S3Store:
        bucket, prefix = parse_s3_url(url)
        return cls(bucket, prefix, cache_root, endpoint_url=endpoint_url)

    @property
    def _client(self) -> Any:
        """One client per process, made on first use: a Celery worker builds its store before
        forking, and a connection pool used from two processes corrupts both."""
        with self._client_lock:
            if self._client_pid != os.getpid():
                self._client_value = self._new_client(connect=10, read=120, attempts=5)
                self._client_pid = os.getpid()
            return self._client_value

    def _new_client(self, *, connect: float, read: float, attempts: int) -> Any:
        session = boto3.session.Session()
        return session.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=session.region_name or DEFAULT_REGION,
            config=Config(
                connect_timeout=connect,
                read_timeout=read,
                retries={"max_attempts": attempts, "mode": "standard"},
                # MinIO and most S3-compatible servers serve buckets as paths.
                s3={"addressing_style": "path"} if self.endpoint_url else {},
            ),
        )

    def key(self, sha256: str) -> str:
        return f"{self.prefix}/sha256/{sha256}" if self.prefix else f"sha256/{sha256}"

    # --- writing -------------------------------------------------------------------------------

    def put_stream(self, source: BinaryIO) -> StoredObject:
        stored = self.cache.put_stream(source)
        cached = self.cache.location(stored.sha256)
        _stamp(cached)
        with self._translated(stored.uri):
            if self._remote_size(stored.sha256) != stored.size:
                self._client.upload_file(
                    str(cached),
                    self.bucket,
                    self.key(stored.sha256),
                    ExtraArgs={"Metadata": {"sha256": stored.sha256}},
                    Config=TRANSFER,
                )
        return stored

    def _remote_size(self, sha256: str) -> int | None:
        """The stored object's size, None when the bucket lacks it (a size that differs from
        ours means a damaged object, which the caller replaces)."""
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=self.key(sha256))
        except ClientError as error:
            if _error_code(error) in MISSING_CODES:
                return None
            raise
        return int(head["ContentLength"])

    # --- reading -------------------------------------------------------------------------------

    def path(self, uri: str) -> Path:
        sha256 = sha256_of(uri)
        cached = self._cached(sha256)
        if cached is not None:
            return cached
        with self._translated(uri):
            body = self._client.get_object(Bucket=self.bucket, Key=self.key(sha256))["Body"]
            with closing(body), spool(body, self.cache.temp_dir) as spooled:
                if spooled.sha256 != sha256:
                    raise _mismatch(uri)
                self.cache.keep(spooled)
        cached = self.cache.location(sha256)
        _stamp(cached)
        return cached

    def open(self, uri: str) -> BinaryIO:
        """The cached file if there is one, else the object streamed from the bucket (nothing
        written to disk), its digest checked when the stream reaches its end."""
        sha256 = sha256_of(uri)
        cached = self._cached(sha256)
        if cached is not None:
            return cached.open("rb")
        with self._translated(uri):
            body = self._client.get_object(Bucket=self.bucket, Key=self.key(sha256))["Body"]
        return io.BufferedReader(_VerifiedStream(body, uri, sha256, self._translated), CHUNK_SIZE)

    def check(self) -> None:
        """One quick attempt: a readiness probe must answer within seconds, not retry."""
        client = self._new_client(connect=PROBE_SECONDS, read=PROBE_SECONDS, attempts=1)
        try:
            with self._translated("the bucket"):
                client.head_bucket(Bucket=self.bucket)
        except UnknownObject:
            raise StoreUnavailable("the artifact store's bucket does not exist") from None

    def delete(self, uri: str) -> None:
        """Remove the object and this machine's copy; other machines' copies stay until their
        cache folder is cleared, and no row names them any more."""
        sha256 = sha256_of(uri)
        with self._translated(uri):
            self._client.delete_object(Bucket=self.bucket, Key=self.key(sha256))
        self.cache.delete(uri)

    def namespace(self, name: str) -> S3Store:
        check_namespace(name)
        prefix = f"{self.prefix}/{name}" if self.prefix else name
        return S3Store(self.bucket, prefix, self.cache.root / name, endpoint_url=self.endpoint_url)

    def _cached(self, sha256: str) -> Path | None:
        """The cached copy if it holds the bytes its name says; a copy modified since it was
        checked is hashed again and dropped if it no longer matches."""
        path = self.cache.location(sha256)
        try:
            stamped = path.stat().st_mtime_ns == CACHE_STAMP_NS
        except FileNotFoundError:
            return None
        if stamped:
            return path
        with path.open("rb") as source:
            matches = hashlib.file_digest(source, "sha256").hexdigest() == sha256
        if matches:
            _stamp(path)
            return path
        log.warning("artifact cache: %s does not match its name; fetching it again", path)
        path.unlink(missing_ok=True)
        return None

    @contextmanager
    def _translated(self, what: str) -> Iterator[None]:
        """boto3's errors as the store's own, logged in full here and told without locations."""
        try:
            yield
        except ClientError as error:
            code = _error_code(error)
            if code in MISSING_CODES:
                raise UnknownObject(f"{what} is not in the artifact store") from None
            log.warning("artifact store s3://%s/%s: %s", self.bucket, self.prefix, error)
            raise StoreUnavailable(f"the artifact store refused the request ({code})") from None
        except (BotoCoreError, Boto3Error) as error:
            log.warning("artifact store s3://%s/%s: %r", self.bucket, self.prefix, error)
            raise StoreUnavailable(
                f"the artifact store is unavailable ({type(error).__name__})"
            ) from None


class _VerifiedStream(io.RawIOBase):
    """An object's body read from the bucket, hashed as it goes: reaching the end with bytes
    that do not match the name raises rather than ending the stream quietly."""

    def __init__(self, body: Any, uri: str, sha256: str, translated: Any) -> None:
        self.body = body
        self.uri = uri
        self.sha256 = sha256
        self.translated = translated
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        with self.translated(self.uri):
            data = self.body.read(len(buffer))
        if not data and self.digest.hexdigest() != self.sha256:
            raise _mismatch(self.uri)
        self.digest.update(data)
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.body.close()
        super().close()


def _mismatch(uri: str) -> StoreUnavailable:
    return StoreUnavailable(
        f"{uri}: the artifact store returned bytes that do not match their name; the stored "
        "object is damaged (store the file again)"
    )


def _stamp(path: Path) -> None:
    os.utime(path, ns=(CACHE_STAMP_NS, CACHE_STAMP_NS))


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code") or "unknown")
