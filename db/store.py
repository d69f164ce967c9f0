"""The content-addressed artifact store: uploaded models and datasets, packed weights, reports.

Files are named by their sha256, so identical content is stored once, a URI never points at
changed bytes, and a half-written file can never appear under a final name (writes go to a
temporary file in the same folder tree and are renamed into place). URIs (`cas://sha256/<hex>`)
name content, not a location, so the store's folder can move and an S3-compatible backend can
take the same URIs later.

This module holds no database rows; `db.repositories` records which tenant or job refers to
which URI. Never import FastAPI, Celery, torch or SQLAlchemy here.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, NamedTuple

from db.home import bitplan_home

URI_PREFIX = "cas://sha256/"
CHUNK_SIZE = 1 << 20
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class StoredObject(NamedTuple):
    sha256: str
    size: int
    uri: str


class UnknownObject(LookupError):
    """A URI that is malformed or names content this store does not hold."""


def sha256_uri(sha256: str) -> str:
    return URI_PREFIX + sha256


class ArtifactStore:
    """Files at `<root>/<sha[:2]>/<sha>`; the two-character fan-out keeps folders small."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else bitplan_home() / "artifacts"

    def put_file(self, path: Path) -> StoredObject:
        with open(path, "rb") as source:
            return self.put_stream(source)

    def put_bytes(self, data: bytes) -> StoredObject:
        return self.put_stream(io.BytesIO(data))

    def put_stream(self, source: BinaryIO) -> StoredObject:
        """Copy and hash in one pass of fixed-size chunks, so a multi-GB upload never sits in
        memory and is read once; the name is known only at the end, hence the rename."""
        digest = hashlib.sha256()
        size = 0
        temp_dir = self.root / "tmp"
        temp_dir.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=temp_dir, prefix=".partial-")
        temp_path = Path(name)
        try:
            with os.fdopen(handle, "wb") as temp:
                while chunk := source.read(CHUNK_SIZE):
                    digest.update(chunk)
                    temp.write(chunk)
                    size += len(chunk)
                temp.flush()
                os.fsync(temp.fileno())
            sha256 = digest.hexdigest()
            final = self._path_for(sha256)
            final.parent.mkdir(parents=True, exist_ok=True)
            # Same content, same bytes: replacing an existing copy is harmless and lets two
            # concurrent writers of one file both succeed without a lock.
            os.replace(temp_path, final)
        finally:
            temp_path.unlink(missing_ok=True)
        _fsync_dir(final.parent)
        return StoredObject(sha256, size, sha256_uri(sha256))

    def path(self, uri: str) -> Path:
        """The local file behind `uri`; raises UnknownObject if the store does not hold it."""
        path = self._path_for(_sha256_of(uri))
        if not path.is_file():
            raise UnknownObject(f"{uri} is not in the artifact store at {self.root}")
        return path

    def open(self, uri: str) -> BinaryIO:
        return self.path(uri).open("rb")

    def _path_for(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256


def _sha256_of(uri: str) -> str:
    """Validating the digest also keeps a crafted URI from naming a path outside the root."""
    sha256 = uri.removeprefix(URI_PREFIX)
    if not uri.startswith(URI_PREFIX) or not _SHA256_HEX.fullmatch(sha256):
        raise UnknownObject(f"not an artifact URI: {uri!r} (expected {URI_PREFIX}<64 hex digits>)")
    return sha256


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable, so a power loss cannot leave a row whose file vanished."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
