"""Accepting a model or dataset file: validated before it is stored, deduplicated by content.

A file is read by the same code a worker will use (`allocator.zoo.weights.load_state_dict`,
`allocator.data.load_dataset`), on a private copy, before it enters the artifact store: a pickle
that needs code is refused by the restricted unpickler without running anything, and a corrupt
file is refused now instead of failing a job later. Readers pick the format by suffix, so the
copy keeps the client's suffix and the upload row keeps its file name.

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
from allocator.data.readers import IMAGE_SUFFIXES, PAIR_SUFFIXES
from allocator.zoo.weights import load_state_dict
from db import repositories
from db.models import Upload, UploadKind
from db.store import CHUNK_SIZE, ArtifactStore
from service.errors import UnsupportedFormat

MODEL_SUFFIXES = (".safetensors", ".pt", ".pth", ".th", ".bin", ".ckpt")
DATASET_SUFFIXES = IMAGE_SUFFIXES + PAIR_SUFFIXES
MAX_FILENAME = 255


@dataclass(frozen=True)
class UploadFormat:
    """What one kind of upload accepts, how it is read, and what to tell a caller who sent
    something else."""

    suffixes: tuple[str, ...]
    read: Callable[[Path], Any]
    hint: str


FORMATS = {
    UploadKind.MODEL: UploadFormat(
        MODEL_SUFFIXES, load_state_dict, "a .safetensors file, or a torch.save of a state dict"
    ),
    UploadKind.DATASET: UploadFormat(
        DATASET_SUFFIXES,
        load_dataset,
        "an .npz of images (images, labels) or an STS-B style .csv/.tsv",
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
        FORMATS[kind].read(copy)
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


def _suffix(kind: UploadKind, name: str) -> str:
    fmt = FORMATS[kind]
    suffix = Path(name).suffix.lower()
    if suffix not in fmt.suffixes:
        raise UnsupportedFormat(
            f"{kind.value} file name {name!r} must end in one of {', '.join(fmt.suffixes)}: "
            f"the format is chosen by it; send {fmt.hint}"
        )
    return suffix
