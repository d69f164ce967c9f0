"""Reading user-supplied weights without ever running code from them, and fitting them strictly.

Weights arrive as uploads, so a pickle that names a callable must be refused, not executed:
`.safetensors` files are read by safetensors, everything else by `torch.load(weights_only=True)`.
Checkpoints come wrapped in many ways (training dicts, `DataParallel` prefixes); they are reduced
to one flat name -> tensor dict here so every source fits weights the same way. Fitting is strict,
because a silently half-loaded model would make every later number meaningless.

Never imports a model source: sources import this module.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from allocator.errors import UnsafeWeights, WeightsMismatch

WRAPPER_KEYS = ("state_dict", "model")
"""Keys under which training checkpoints commonly nest the state dict."""

PARALLEL_PREFIX = "module."
"""What `nn.DataParallel` / DDP put in front of every key."""

SHOWN_KEYS = 5
"""How many keys of each kind a mismatch message names before giving only the count."""

RESAVE_HINT = (
    "re-save it with safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')"
)


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a weights file into a flat, unprefixed name -> tensor dict, refusing code."""
    path = Path(path)
    if not path.is_file():
        raise WeightsMismatch(f"weights file {path} does not exist; pass an existing file")
    raw = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    return _strip_prefix(_tensors_only(_unwrap(raw), path))


def load_into(module: nn.Module, state_dict: Mapping[str, torch.Tensor], ref: str) -> None:
    """Copy `state_dict` into `module`, or raise `WeightsMismatch` naming every kind of misfit.

    torch's own strict error is a wall of text; users need the counts and a few names to see
    whether they picked the wrong architecture, the wrong head size or the wrong file.
    """
    expected = module.state_dict()
    # BatchNorm fills `num_batches_tracked` itself for checkpoints saved before it existed.
    missing = [
        key for key in expected if key not in state_dict and not key.endswith("num_batches_tracked")
    ]
    unexpected = [key for key in state_dict if key not in expected]
    wrong_shape = [
        f"{key} file {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
        for key, value in state_dict.items()
        if key in expected and value.shape != expected[key].shape
    ]
    problems = [
        _describe(kind, keys)
        for kind, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrongly shaped", wrong_shape),
        )
        if keys
    ]
    if problems:
        raise WeightsMismatch(
            f"weights do not fit {ref}: {'; '.join(problems)}; "
            "check the model reference and its options (e.g. num_classes) match the file"
        )
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise WeightsMismatch(f"weights do not fit {ref}: {first_line(exc)}") from None


def load_weights_file(module: nn.Module, path: str | os.PathLike[str], ref: str) -> None:
    """The whole `--weights` step for a source that builds its module first."""
    load_into(module, load_state_dict(path), ref)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsMismatch(
            f"{path} is not a readable .safetensors file ({first_line(exc)}); "
            "check the upload is complete"
        ) from None


def _read_torch(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch wraps the restricted unpickler's refusal; the inner error names the culprit.
        # Its advice on how to allow-list that culprit is cut: it is not ours to give.
        reason = first_line(exc.__context__ or exc).split(" was not an allowed global")[0]
        if "global" in reason.lower():
            raise UnsafeWeights(
                f"{path} needs code to unpickle ({reason}); refused, {RESAVE_HINT}"
            ) from None
        raise UnsafeWeights(
            f"{path} is not a plain tensor checkpoint ({reason}): it is corrupt or needs code "
            f"to unpickle; {RESAVE_HINT}"
        ) from None
    except Exception as exc:  # torch.load reports a damaged file through many exception types
        raise WeightsMismatch(
            f"{path} is not a readable torch.save file ({type(exc).__name__}: {first_line(exc)});"
            " check the upload is complete or save it as .safetensors"
        ) from None


def _unwrap(obj: object) -> object:
    """Descend through training-checkpoint wrappers such as {"epoch": 3, "state_dict": {...}}."""
    while isinstance(obj, Mapping):
        nested = next((obj[key] for key in WRAPPER_KEYS if isinstance(obj.get(key), Mapping)), None)
        if nested is None:
            return obj
        obj = nested
    return obj


def _tensors_only(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsMismatch(
            f"{path} holds {type(obj).__name__}, not a state dict of named tensors; "
            "save model.state_dict()"
        )
    bad = [str(key) for key, value in obj.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise WeightsMismatch(
            f"{path} has entries that are not tensors: {_describe('non-tensor', bad)}; "
            "save model.state_dict()"
        )
    return {str(key): value for key, value in obj.items()}


def _strip_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if all(key.startswith(PARALLEL_PREFIX) for key in state_dict):
        return {key.removeprefix(PARALLEL_PREFIX): value for key, value in state_dict.items()}
    return state_dict


def _describe(kind: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    more = f", ... {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return f"{len(keys)} {kind} ({shown}{more})"


def first_line(exc: BaseException) -> str:
    """Library errors can run to pages; a user-facing message keeps their first line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
