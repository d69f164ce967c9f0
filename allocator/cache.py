"""What a job computed, kept by content, so the same job again or the same model at another
budget does not compute it twice.

A job's costliest steps (the statistics phase's GPTQ candidates, the sensitivity passes, the
in-network fits, every evaluation pass over FP32 and the uniform plans) depend only on the
weights, the data and the quantizer's configuration, not on who asked or which budget. Each is
kept under a key that hashes exactly those: the model's parameters and buffers, the model-ready
calibration and evaluation tensors, the options that change the numbers, and `CODE_VERSION`,
which is raised whenever code changes what a cached step computes. A key never names a file
or a tenant, so two tenants that bring the same model and data share the work and nothing else.

Values are nested dicts, lists and tuples of tensors, numbers and strings, written with
`torch.save` and read back with `torch.load(weights_only=True)`: reading an entry can never run
code, even if the folder were tampered with. An entry that does not read back is dropped and
recomputed. `FolderCache` keeps entries under a size bound, least recently used first out; the
CLI and the workers of one host share `BITPLAN_HOME/cache`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

CODE_VERSION = "2026-12-02.3"
"""Raise when a change to the code alters what any cached step returns for the same input."""
DEFAULT_MAX_BYTES = 20 * 2**30
MAX_ENTRY_BYTES = 2**30
"""An entry larger than this (a causal LM's logits over a long text) is not kept."""

T = TypeVar("T")


class Cache(Protocol):
    """Where a job keeps and finds what it computed, by content key."""

    def get(self, key: str) -> Any | None: ...

    def put(self, key: str, value: Any) -> None: ...


class FolderCache:
    """Entries as files `<root>/<key[:2]>/<key>`; at most `max_bytes` in all.

    Writes go to a temporary file and are renamed into place, so a reader never sees half an
    entry and concurrent writers of one key (two workers, same job) both succeed. Reading an
    entry touches it; `put` then removes the least recently used entries over the bound.
    """

    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes

    def get(self, key: str) -> Any | None:
        path = self._path(key)
        try:
            value = torch.load(path, weights_only=True)
        except FileNotFoundError:
            return None
        except Exception:  # a torn or foreign file: drop it, the caller recomputes
            path.unlink(missing_ok=True)
            return None
        os.utime(path)
        return value

    def put(self, key: str, value: Any) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
        temp = Path(name)
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(value, file)
            if temp.stat().st_size > min(MAX_ENTRY_BYTES, self.max_bytes):
                return
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)
        self._evict()

    def _path(self, key: str) -> Path:
        if len(key) != 64 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"not a cache key: {key[:80]!r}")
        return self.root / key[:2] / key

    def _evict(self) -> None:
        entries = []
        for path in self.root.glob("??/*"):
            if path.name.startswith(".partial-"):
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:  # evicted by another writer meanwhile
                continue
            entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries, key=lambda entry: entry[0]):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size


def cached(
    cache: Cache | None,
    key: str,
    compute: Callable[[], T],
    encode: Callable[[T], Any] = lambda value: value,
    decode: Callable[[Any], T] = lambda value: value,
) -> tuple[T, bool]:
    """`compute()`, or what an earlier call with the same `key` stored; and whether it was
    reused. `encode`/`decode` turn the value into plain containers of tensors and back."""
    if cache is None:
        return compute(), False
    stored = cache.get(key)
    if stored is not None:
        return decode(stored), True
    value = compute()
    cache.put(key, encode(value))
    return value, False


def digest(*parts: object) -> str:
    """A sha256 over `parts`: strings, numbers, None, bytes, tensors, arrays, modules and
    (nested) tuples, lists and mappings, each framed by its type so that no two different
    inputs hash alike by concatenation."""
    hasher = hashlib.sha256()
    for part in parts:
        _feed(hasher, part)
    return hasher.hexdigest()


def _feed(hasher: Any, part: object) -> None:
    if isinstance(part, nn.Module):
        hasher.update(f"module:{type(part).__qualname__}".encode())
        _feed(hasher, part.state_dict())
    elif isinstance(part, torch.Tensor):
        data = part.detach().cpu().contiguous()
        hasher.update(f"tensor:{data.dtype}:{tuple(data.shape)}".encode())
        hasher.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(part, np.ndarray):
        _feed(hasher, torch.from_numpy(np.ascontiguousarray(part)))
    elif isinstance(part, Mapping):
        hasher.update(f"map:{len(part)}".encode())
        for name, value in sorted(part.items(), key=lambda item: str(item[0])):
            _feed(hasher, str(name))
            _feed(hasher, value)
    elif isinstance(part, (tuple, list)):
        _sequence(hasher, part)
    elif isinstance(part, bytes):
        hasher.update(f"bytes:{len(part)}:".encode() + part)
    elif part is None or isinstance(part, (str, int, float, bool)):
        text = repr(part)
        hasher.update(f"{type(part).__name__}:{len(text)}:{text}".encode())
    else:
        raise TypeError(f"cannot key a cache entry on a {type(part).__name__}")


def _sequence(hasher: Any, parts: Iterable[object]) -> None:
    items = list(parts)
    hasher.update(f"seq:{len(items)}".encode())
    for item in items:
        _feed(hasher, item)
