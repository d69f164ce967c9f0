"""Turn a bit plan into a quantized model (`apply`) and into a packed artifact (`pack`), and back.

`apply` gives the float model whose planned weights are replaced by their dequantized values: what
evaluation measures. `pack` stores the same model as integer codes plus float16 scales, and
`load_packed` rebuilds it from the artifact alone, bit for bit equal to `apply`'s result, so the
numbers reported for a plan are the numbers a user of the artifact gets.

Artifact layout (`bitplan-packed-v1`, one .safetensors file): per planned layer `<layer>.codes`
(uint8, the layer's b-bit codes offset by 2^(b-1) to be unsigned and packed densely, least
significant bit first) and `<layer>.scale` (float16 per output channel), or `<layer>.weight`
(float16) for a 16-bit layer; every other state_dict entry under its own key (floating ones as
float32); the plan JSON and the planned weight shapes in the metadata.

Imports torch, numpy and safetensors; never anything from the service, database or worker layers.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from allocator.errors import WeightsMismatch
from allocator.layers import WEIGHT_LAYER_TYPES
from allocator.plan import BitPlan
from allocator.quant.weight import (
    FLOAT_BITS,
    QuantizedWeight,
    quantize_weight,
    quantize_with_scale,
)

PACK_FORMAT = "bitplan-packed-v1"
_APPLIED_ATTR = "bitplan"
"""Attribute under which `apply` and `load_packed` leave an `_Applied` on the module."""


@dataclass(frozen=True, eq=False)
class _Applied:
    """What a quantized model remembers: its plan, and each layer's float16 scales (None at 16
    bits) so that `pack` can read the exact codes back off the weights instead of quantizing
    again, which would not reproduce them."""

    plan: BitPlan
    scales: dict[str, Tensor | None]


def apply(
    module: nn.Module,
    plan: BitPlan,
    inplace: bool = False,
    quantized: Mapping[str, QuantizedWeight] | None = None,
) -> nn.Module:
    """Return the model quantized as `plan` says (a deep copy unless `inplace`).

    Planned weights become their dequantized float values (16 bits: float16-rounded); a layer with
    `bias_correction` gets it added to its bias, which is created if the layer has none. The plan
    stays readable on the result through `applied_plan`. `quantized` supplies codes chosen
    elsewhere (error-feedback rounding needs calibration data this module never sees) for some
    layers; they must match the plan's width and clip rule. Applying to an already quantized model
    is refused: it would quantize twice and add the bias corrections twice.
    """
    if applied_plan(module) is not None:
        raise ValueError(
            "this model already has a bit plan applied; apply plans to the float model"
        )
    target = module if inplace else copy.deepcopy(module)
    layers = _planned_layers(target, plan)
    given = dict(quantized or {})
    quantized = {
        name: given.get(name) or quantize_weight(layers[name].weight, entry.weight_bits, entry.clip)
        for name, entry in plan.layers.items()
    }
    for name, entry in plan.layers.items():
        if quantized[name].bits != entry.weight_bits:
            raise ValueError(
                f"codes given for {name} are {quantized[name].bits}-bit, plan says "
                f"{entry.weight_bits}"
            )
    with torch.no_grad():
        for name, entry in plan.layers.items():
            layers[name].weight.copy_(quantized[name].dequantize())
            if entry.bias_correction is not None:
                bias = _ensure_bias(layers[name])
                bias.add_(torch.tensor(entry.bias_correction, dtype=bias.dtype, device=bias.device))
    setattr(target, _APPLIED_ATTR, _Applied(plan, {n: q.scale for n, q in quantized.items()}))
    return target


def applied_plan(module: nn.Module) -> BitPlan | None:
    """The plan `apply` or `load_packed` gave this module, or None for a float model."""
    applied = getattr(module, _APPLIED_ATTR, None)
    return applied.plan if applied is not None else None


def pack(module: nn.Module, plan: BitPlan, path: str | os.PathLike[str]) -> dict[str, int]:
    """Write the model quantized as `plan` says to `path`, atomically.

    `module` is the float model or `apply(float_model, plan)` (or `load_packed`'s result): a float
    model is applied to a copy first, a quantized one is encoded as it is. Returns the sizes in
    bytes: the file, the packed codes, the scales, the float16 weights of 16-bit layers and every
    other tensor.
    """
    current = applied_plan(module)
    if current is None:
        module = apply(module, plan)
    elif current != plan:
        raise ValueError("the model has a different bit plan applied than the one to pack")
    quantized = _read_codes(module, getattr(module, _APPLIED_ATTR))
    encoded = _encode(quantized)
    planned_keys = {f"{name}.weight" for name in quantized}
    others = {
        key: _stored(value) for key, value in module.state_dict().items() if key not in planned_keys
    }
    clash = encoded.keys() & others.keys()
    if clash:
        raise ValueError(f"artifact keys collide with model state_dict keys: {sorted(clash)}")
    metadata = {
        "bitplan": json.dumps(plan.to_dict()),
        "format": PACK_FORMAT,
        "shapes": json.dumps({name: list(q.codes.shape) for name, q in quantized.items()}),
    }
    path = Path(path)
    _save_atomic({**encoded, **others}, metadata, path)
    return {
        "file_bytes": path.stat().st_size,
        "code_bytes": _nbytes(v for k, v in encoded.items() if k.endswith(".codes")),
        "scale_bytes": _nbytes(v for k, v in encoded.items() if k.endswith(".scale")),
        "float16_bytes": _nbytes(v for k, v in encoded.items() if k.endswith(".weight")),
        "other_bytes": _nbytes(others.values()),
    }


def load_packed(path: str | os.PathLike[str], module: nn.Module) -> tuple[nn.Module, BitPlan]:
    """Rebuild the quantized model from an artifact into `module`, in place, and return its plan.

    `module` only supplies the architecture: every tensor comes from the artifact, and a missing,
    extra or wrongly shaped one raises `WeightsMismatch`.
    """
    packed = read_packed(path)
    plan, tensors = packed.plan, packed.others
    layers = _planned_layers(module, plan)
    scales: dict[str, Tensor | None] = {}
    for name, entry in plan.layers.items():
        quantized = packed.codes[name]
        tensors[f"{name}.weight"] = quantized.dequantize()
        scales[name] = quantized.scale
        if entry.bias_correction is not None:
            _ensure_bias(layers[name])
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise WeightsMismatch(f"artifact {path} does not fit the model: {exc}") from exc
    setattr(module, _APPLIED_ATTR, _Applied(plan, scales))
    return module, plan


@dataclass(frozen=True, eq=False)
class PackedArtifact:
    """A `bitplan-packed-v1` artifact as stored: its plan, each planned layer's codes and scales
    exactly as packed, and every other tensor by its state_dict key.

    Exporters read the codes from here rather than off a rebuilt model, so what they write is
    the artifact's own integers, not a re-quantization of its float weights."""

    plan: BitPlan
    codes: dict[str, QuantizedWeight]
    others: dict[str, Tensor]


def read_packed(path: str | os.PathLike[str]) -> PackedArtifact:
    """Decode an artifact without a model; a missing or wrongly sized entry raises
    `WeightsMismatch`."""
    tensors, metadata = _read(Path(path))
    plan = BitPlan.from_dict(json.loads(metadata["bitplan"]))
    shapes = json.loads(metadata["shapes"])
    codes = {
        name: _decode(tensors, name, entry.weight_bits, entry.clip, shapes[name])
        for name, entry in plan.layers.items()
    }
    return PackedArtifact(plan, codes, tensors)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack signed b-bit codes densely into uint8, least significant bit first.

    Code c is stored as c + 2^(b-1), so every b-bit pattern is a valid code and 8-bit codes are
    their offset bytes unchanged. The last byte is zero-padded.
    """
    _check_packable(bits)
    offset = (codes.detach().cpu().reshape(-1).to(torch.int16) + 2 ** (bits - 1)).numpy()
    planes = (offset[:, None] >> np.arange(bits, dtype=np.int16)) & 1
    return torch.from_numpy(np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little"))


def unpack_codes(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of `pack_codes`: the first `count` signed codes, as a flat int8 tensor."""
    _check_packable(bits)
    expected = (count * bits + 7) // 8
    if packed.numel() != expected:
        raise WeightsMismatch(
            f"{packed.numel()} packed bytes cannot hold {count} {bits}-bit codes "
            f"({expected} expected)"
        )
    stream = np.unpackbits(packed.cpu().numpy(), count=count * bits, bitorder="little")
    planes = stream.reshape(count, bits)
    offset = np.zeros(count, dtype=np.int16)
    for bit in range(bits):
        offset |= planes[:, bit].astype(np.int16) << bit
    return torch.from_numpy((offset - 2 ** (bits - 1)).astype(np.int8))


def _read_codes(module: nn.Module, applied: _Applied) -> dict[str, QuantizedWeight]:
    """The codes of an applied model, checked to rebuild its weights exactly."""
    layers = _planned_layers(module, applied.plan)
    quantized = {}
    for name, entry in applied.plan.layers.items():
        weight = layers[name].weight.detach()
        scale = applied.scales[name]
        scale = None if scale is None else scale.to(weight.device)
        q = quantize_with_scale(weight, scale, entry.weight_bits, entry.clip)
        if not torch.equal(q.dequantize(), weight.float()):
            raise WeightsMismatch(
                f"the weight of {name} is off its quantization grid: changed after apply, or held "
                "in a dtype narrower than float32"
            )
        quantized[name] = q
    return quantized


def _planned_layers(module: nn.Module, plan: BitPlan) -> dict[str, nn.Module]:
    """Resolve the plan's layer names, refusing any the model lacks or cannot quantize."""
    modules = dict(module.named_modules(remove_duplicate=False))
    missing = [
        name for name in plan.layers if not isinstance(modules.get(name), WEIGHT_LAYER_TYPES)
    ]
    if missing:
        raise WeightsMismatch(
            f"the plan names layers that are not nn.Linear / nn.Conv2d in this model: {missing}"
        )
    for name, entry in plan.layers.items():
        channels = modules[name].weight.shape[0]
        if entry.bias_correction is not None and len(entry.bias_correction) != channels:
            raise WeightsMismatch(
                f"bias correction for {name} has {len(entry.bias_correction)} values, "
                f"the layer has {channels} output channels"
            )
    return {name: modules[name] for name in plan.layers}


def _ensure_bias(layer: nn.Module) -> Tensor:
    """The layer's bias, created as zeros when it has none, so a correction has somewhere to go."""
    if layer.bias is None:
        weight = layer.weight
        layer.bias = nn.Parameter(
            torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        )
    return layer.bias


def _encode(quantized: dict[str, QuantizedWeight]) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    for name, q in quantized.items():
        if q.scale is None:
            tensors[f"{name}.weight"] = q.codes.cpu().contiguous()
        else:
            tensors[f"{name}.codes"] = pack_codes(q.codes, q.bits)
            tensors[f"{name}.scale"] = q.scale.cpu().contiguous()
    return tensors


def _decode(
    tensors: dict[str, Tensor], name: str, bits: int, clip: str, shape: list[int]
) -> QuantizedWeight:
    """Take one layer's stored tensors out of `tensors` and rebuild its `QuantizedWeight`."""
    keys = [f"{name}.weight"] if bits == FLOAT_BITS else [f"{name}.codes", f"{name}.scale"]
    absent = [key for key in keys if key not in tensors]
    if absent:
        raise WeightsMismatch(f"artifact lacks {absent} for the {bits}-bit layer {name}")
    if bits == FLOAT_BITS:
        return QuantizedWeight(codes=tensors.pop(keys[0]), scale=None, bits=bits, clip=clip)
    codes = unpack_codes(tensors.pop(keys[0]), bits, int(np.prod(shape))).reshape(shape)
    return QuantizedWeight(codes=codes, scale=tensors.pop(keys[1]), bits=bits, clip=clip)


def _stored(value: Tensor) -> Tensor:
    """A standalone CPU copy (safetensors refuses shared storage); floating tensors as float32."""
    dtype = torch.float32 if value.is_floating_point() else value.dtype
    return value.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()


def _nbytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _check_packable(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"only 1- to 8-bit codes are packed, got {bits}")


def _save_atomic(tensors: dict[str, Tensor], metadata: dict[str, str], path: Path) -> None:
    """Write next to `path` and rename, so a reader never sees a half-written artifact."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != PACK_FORMAT:
        raise WeightsMismatch(f"{path} is not a {PACK_FORMAT} artifact")
    return load_file(path), metadata
