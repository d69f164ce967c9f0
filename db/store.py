"""The content-addressed artifact store: uploaded models and datasets, packed weights, reports.

Files are named by their sha256, so identical content is stored once, a URI never points at
changed bytes, and a half-written file can never appear under a final name (writes go to a
temporary file in the same folder tree and are renamed into place). URIs (`cas://sha256/<hex>`)
name content, not a location, so the same URI is valid whichever backend holds the bytes:

- `FolderStore`, a local folder: the embedded default (`$BITPLAN_HOME/artifacts`);
- `db.s3_store.S3Store`, an S3-compatible bucket (`BITPLAN_STORE_URL=s3://bucket/prefix`), for
  API processes and workers on machines that share nothing but the database and the broker.

Every process builds its store with `open_store`, so the API, the CLI and every worker agree on
where bytes live. This module holds no database rows; `db.repositories` records which tenant or
job refers to which URI. Never import FastAPI, Celery, torch or SQLAlchemy here (nor boto3: only
a deployment that names a bucket pays for importing it).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

from db.home import bitplan_home

URI_PREFIX = "cas://sha256/"
CHUNK_SIZE = 1 << 20
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

STORE_URL_ENV = "BITPLAN_STORE_URL"
S3_ENDPOINT_ENV = "BITPLAN_S3_ENDPOINT_URL"
S3_SCHEME = "s3://"
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX = re.compile(r"[A-Za-z0-9!_.*'()/-]*")


class StoredObject(NamedTuple):
    sha256: str
    size: int
    uri: str


class UnknownObject(LookupError):
    """A URI that is malformed or names content this store does not hold."""


class StoreUnavailable(RuntimeError):
    """The store's backend failed (unreachable, refused, returned bytes that do not match their
    name). The message is safe to show a tenant: it names no bucket, endpoint, credential or
    server path (the full error goes to the server's log). Worth a retry, unlike UnknownObject."""


def sha256_uri(sha256: str) -> str:
    return URI_PREFIX + sha256


def sha256_of(uri: str) -> str:
    """The digest a URI names. Validating it also keeps a crafted URI from naming a path outside
    a folder or a key outside a bucket prefix."""
    sha256 = uri.removeprefix(URI_PREFIX)
    if not uri.startswith(URI_PREFIX) or not _SHA256_HEX.fullmatch(sha256):
        raise UnknownObject(f"not an artifact URI: {uri!r} (expected {URI_PREFIX}<64 hex digits>)")
    return sha256


class ArtifactStore(ABC):
    """What every consumer uses: put bytes in, get a `cas://` URI back; turn a URI into a local
    file (`path`: torch, readers and `FileResponse` need one) or a stream (`open`)."""

    def put_file(self, path: Path) -> StoredObject:
        with open(path, "rb") as source:
            return self.put_stream(source)

    def put_bytes(self, data: bytes) -> StoredObject:
        return self.put_stream(io.BytesIO(data))

    @abstractmethod
    def put_stream(self, source: BinaryIO) -> StoredObject:
        """Store everything `source` yields, reading it once in fixed-size chunks."""

    @abstractmethod
    def path(self, uri: str) -> Path:
        """A local file holding the bytes `uri` names; UnknownObject if the store lacks them."""

    @abstractmethod
    def open(self, uri: str) -> BinaryIO:
        """The bytes `uri` names as a binary stream; UnknownObject if the store lacks them."""

    @abstractmethod
    def check(self) -> None:
        """Raise StoreUnavailable if the store cannot be used now (for `/readyz`)."""

    @abstractmethod
    def delete(self, uri: str) -> None:
        """Remove the bytes `uri` names (nothing if they are absent). Only for a namespace whose
        rows know every reference (`db.cache`): artifacts and uploads are shared by content
        across tenants and jobs and are never deleted."""

    @abstractmethod
    def namespace(self, name: str) -> ArtifactStore:
        """A store of the same kind beside this one's objects whose content is never shared with
        them (`<root>/<name>`, `<prefix>/<name>`), so what is deleted there cannot be an object
        an upload or an artifact refers to."""


class Spooled(NamedTuple):
    """A temporary file and the digest and size of what was written to it."""

    path: Path
    sha256: str
    size: int


@contextmanager
def spool(source: BinaryIO, folder: Path) -> Iterator[Spooled]:
    """Copy and hash `source` into a temporary file in `folder` in one pass of fixed-size chunks,
    so a multi-GB stream never sits in memory and is read once. The file is removed when the
    block ends unless it was renamed away (`FolderStore.keep`)."""
    folder.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=folder, prefix=".partial-")
    temp_path = Path(name)
    digest = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(handle, "wb") as temp:
            while chunk := source.read(CHUNK_SIZE):
                digest.update(chunk)
                temp.write(chunk)
                size += len(chunk)
            temp.flush()
            os.fsync(temp.fileno())
        yield Spooled(temp_path, digest.hexdigest(), size)
    finally:
        temp_path.unlink(missing_ok=True)


class FolderStore(ArtifactStore):
    """Files at `<root>/<sha[:2]>/<sha>`; the two-character fan-out keeps folders small."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else bitplan_home() / "artifacts"

    @property
    def temp_dir(self) -> Path:
        """Inside the root, so the final rename never crosses a filesystem."""
        return self.root / "tmp"

    def put_stream(self, source: BinaryIO) -> StoredObject:
        # The name is known only once everything is read, hence the spool and the rename.
        with spool(source, self.temp_dir) as spooled:
            return self.keep(spooled)

    def keep(self, spooled: Spooled) -> StoredObject:
        """Rename a spooled file into place under its digest."""
        final = self.location(spooled.sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        # Same content, same bytes: replacing an existing copy is harmless and lets two
        # concurrent writers of one file both succeed without a lock.
        os.replace(spooled.path, final)
        _fsync_dir(final.parent)
        return StoredObject(spooled.sha256, spooled.size, sha256_uri(spooled.sha256))

    def path(self, uri: str) -> Path:
        path = self.location(sha256_of(uri))
        if not path.is_file():
            raise UnknownObject(f"{uri} is not in the artifact store at {self.root}")
        return path

    def open(self, uri: str) -> BinaryIO:
        return self.path(uri).open("rb")

    def check(self) -> None:
        """Nothing to ask: a local folder's faults surface, with their paths, in the server's
        log at the first write, and readiness answers unauthenticated callers."""

    def delete(self, uri: str) -> None:
        self.location(sha256_of(uri)).unlink(missing_ok=True)

    def namespace(self, name: str) -> FolderStore:
        check_namespace(name)
        return FolderStore(self.root / name)

    def location(self, sha256: str) -> Path:
        """Where the file of this digest is or would be; says nothing about whether it exists."""
        return self.root / sha256[:2] / sha256


@dataclass(frozen=True)
class StoreConfig:
    """Where artifacts live: `url` empty for the folder under the home, `s3://bucket/prefix`
    for a bucket; `s3_endpoint_url` for an S3-compatible server other than AWS (MinIO).
    Credentials and the region come from the usual AWS variables and files, read by boto3."""

    url: str = ""
    s3_endpoint_url: str = ""

    def __post_init__(self) -> None:
        if self.url:
            parse_s3_url(self.url)  # a bad value fails at start-up, naming the variable

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> StoreConfig:
        return cls(
            url=environ.get(STORE_URL_ENV, "").strip(),
            s3_endpoint_url=environ.get(S3_ENDPOINT_ENV, "").strip(),
        )


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix"); ValueError naming the variable."""
    bucket, _, prefix = url.removeprefix(S3_SCHEME).partition("/")
    prefix = prefix.strip("/")
    if not (url.startswith(S3_SCHEME) and _BUCKET.fullmatch(bucket) and _PREFIX.fullmatch(prefix)):
        raise ValueError(
            f"{STORE_URL_ENV}={url!r} is not valid: give s3://<bucket>/<optional prefix> (bucket "
            "names are 3-63 lower-case letters, digits, dots and hyphens), or leave it unset "
            "for the folder under BITPLAN_HOME"
        )
    return bucket, prefix


def open_store(config: StoreConfig | None = None, home: Path | None = None) -> ArtifactStore:
    """The store a process should use: the one place that turns configuration into a backend,
    so the API, the CLI and every worker read bytes where the others wrote them. Defaults come
    from the environment (`BITPLAN_STORE_URL`, `BITPLAN_S3_ENDPOINT_URL`, `BITPLAN_HOME`)."""
    config = config if config is not None else StoreConfig.from_env()
    home = home if home is not None else bitplan_home()
    if not config.url:
        return FolderStore(home / "artifacts")
    from db.s3_store import S3Store

    return S3Store.from_url(
        config.url, cache_root=home / "store-cache", endpoint_url=config.s3_endpoint_url or None
    )


def check_namespace(name: str) -> None:
    """A namespace is one plain folder or key segment longer than the fan-out's two characters,
    so it can never be mistaken for a fan-out folder or step outside the store."""
    if not re.fullmatch(r"[a-z][a-z0-9-]{2,31}", name) or name == "tmp":
        raise ValueError(f"not a store namespace: {name!r}")


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable, so a power loss cannot leave a row whose file vanished."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
