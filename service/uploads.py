"""Accepting a model or dataset file: validated before it is stored, deduplicated by content.

A file is read by the same code a worker will use (`allocator.zoo.weights.load_state_dict`,
`allocator.data.load_dataset`), on a private copy, before it enters the artifact store: a pickle
that needs code is refused by the restricted unpickler without running anything, and a corrupt
file is refused now instead of failing a job later. Readers pick the format by suffix, so the
copy keeps the client's suffix and the upload row keeps its file name. A dataset is read under the
operator's `Limits`, the same bound a worker applies, so a decompression bomb is refused from its
headers before it costs the API any memory. Errors name the client's file, never the private copy.

Never imports FastAPI: the size limit is enforced on the request stream (`service.middleware.BodyLimit`),
and this module sees a finished file.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy.orm import Session

from allocator.data import load_dataset
from allocator.data.readers import DATASET_SUFFIXES
from allocator.errors import BitplanError
from allocator.job import UploadKind
from allocator.limits import Limits
from allocator.zoo.weights import load_state_dict
from db import repositories
from db.models import Upload
from db.store import CHUNK_SIZE, ArtifactStore
from service.errors import UnsupportedFormat

MODEL_SUFFIXES = (".safetensors", ".pt", ".pth", ".th", ".bin", ".ckpt")
MAX_FILENAME = 255
DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class UploadFormat:
    """What one kind of upload accepts, how it is read, and what to tell a caller who sent
    something else."""

    suffixes: tuple[str, ...]
    read: Callable[[Path, Limits], Any]
    hint: str


def _read_model(path: Path, limits: Limits) -> Any:
    """`Limits` bounds no weights file: the request body limit is what bounds an upload of them."""
    return load_state_dict(path)


def _read_dataset(path: Path, limits: Limits) -> Any:
    return load_dataset(path, max_bytes=limits.max_dataset_bytes)


FORMATS = {
    UploadKind.MODEL: UploadFormat(
        MODEL_SUFFIXES, _read_model, "a .safetensors file, or a torch.save of a state dict"
    ),
    UploadKind.DATASET: UploadFormat(
        DATASET_SUFFIXES,
        _read_dataset,
        "an .npz of images (images, labels), an STS-B style .csv/.tsv or a .txt of text",
    ),
}


def accept_upload(
    session: Session,
    store: ArtifactStore,
    *,
    tenant: str,
    kind: UploadKind,
    source: BinaryIO,
    filename: str | None,
    scratch: Path,
    limits: Limits = DEFAULT_LIMITS,
) -> tuple[Upload, bool]:
    """Validate, store and record one file; returns the upload and whether it is new."""
    name = "".join(char for char in Path(filename or "").name if char.isprintable())
    name = name[-MAX_FILENAME:]
    suffix = _suffix(kind, name)
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch, prefix="upload-") as folder:
        copy = Path(folder) / f"file{suffix}"
        with copy.open("wb") as target:
            shutil.copyfileobj(source, target, CHUNK_SIZE)
        _validate(kind, copy, name, limits)
        stored = store.put_file(copy)
    return repositories.add_upload(
        session,
        tenant=tenant,
        kind=kind,
        sha256=stored.sha256,
        size=stored.size,
        uri=stored.uri,
        filename=name,
    )


def _validate(kind: UploadKind, copy: Path, name: str, limits: Limits) -> None:
    """The readers name the file they read, here a private copy under the server's home; the
    client knows its file by `name`, and the server's folders are none of its business. Only
    one-message errors (`BadDataset`, `WeightsMismatch`, `UnsafeWeights`) come from the readers,
    so each is raised again as its own type."""
    try:
        FORMATS[kind].read(copy, limits)
    except BitplanError as exc:
        raise type(exc)(str(exc).replace(str(copy), name)) from None


def _suffix(kind: UploadKind, name: str) -> str:
    fmt = FORMATS[kind]
    suffix = Path(name).suffix.lower()
    if suffix not in fmt.suffixes:
        raise UnsupportedFormat(
            f"{kind.value} file name {name!r} must end in one of {', '.join(fmt.suffixes)}: "
            f"the format is chosen by it; send {fmt.hint}"
        )
    return suffix
