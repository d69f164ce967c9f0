"""Measure a latency table: each weight layer alone, at each candidate (weight width, activation
width or float), on this machine's runtime, with warm-up, repeats and the median.

What is timed, per runtime:

- `onnxruntime-cpu`: a one-layer ONNX model with the QDQ pattern `allocator.export.onnx_qdq`
  writes for a plan (its own `_weight_nodes` and `_qdq_nodes`): `DequantizeLinear` of INT4
  codes (2-4 bits) or INT8 codes (5-8 bits) with per-channel scales, a FLOAT16 weight cast to
  float (16 bits) or the float weight (FP32), feeding the layer's Conv or MatMul + Add, with
  `[Clip ->] QuantizeLinear -> DequantizeLinear` on its input when the activation is quantized
  (scale and zero point from the input's range, as a min-max quantizer sets them). Sessions
  are opened as parity opens them (`allocator.export.parity.session`), so the kernels are the
  ones the checked export runs. Widths that give the same graph (2, 3 and 4 bits are all
  INT4; 5 to 8 all INT8; 4 and 6-bit activations are both clipped UINT8) run the same kernel
  and share one measurement; `settings["variants"]` says which. Each entry is net of the
  runtime's per-call overhead (an Identity graph on the same input, timed alike), which is
  paid once per model run and so belongs to `rest_ms`.
- `torch-cpu` / `torch-cuda`: the layer as bitplan's quantized model runs it: dequantized float
  weights (torch has no low-bit kernels, so every weight width runs the same float kernel and
  the table is flat in weight width: the table says so in `flat` and `notes`), with the
  input fake-quantized when the activation is.

`rest_ms` is the FP32 model timed end to end (exported to ONNX without QDQ, or the torch
module) less the sum of its layers' FP32 entries: pooling, additions, normalisation and
activation functions, and the call overhead. `end_to_end_ms` times a whole exported model the
same way, for the predicted-against-measured figures of a job's report.

Timings are what this machine did, nothing more: on a CPU without fast int8 or int4 paths,
ONNX Runtime's QDQ kernels can be slower than float, and the table will say so.

Imports torch, onnx and onnxruntime; never anything from the service, database or worker layers.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from allocator.cache import digest
from allocator.errors import BadSpec
from allocator.export.onnx_qdq import (
    OUTPUT_NAME,
    _qdq_nodes,
    _qdq_params,
    _quiet_exporter,
    _Traced,
    _weight_nodes,
    feeds,
)
from allocator.export.parity import session
from allocator.latency_table import (
    FLOAT_WIDTH,
    LatencyTable,
    act_width,
    check_runtime,
    choice_key,
)
from allocator.layers import build_layer_table, weight_layers
from allocator.quant.activation import ActQuantizer, calibrate
from allocator.quant.weight import FLOAT_BITS, quantize_weight
from allocator.zoo.base import Inputs, LoadedModel, run_hooked

WARMUP = 10
REPEATS = 50
WEIGHT_WIDTHS = (2, 3, 4, 5, 6, 8, 16)
ACT_WIDTHS = (4, 6, 8, FLOAT_WIDTH)
ONNX_OPSET = 21
ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_int8",
    "amx_bf16",
    "asimd",
    "asimddp",
    "sve",
    "i8mm",
)
"""The instruction sets that decide which low-bit and float kernels a runtime can use."""
FLAT_NOTE = (
    "{runtime} has no low-bit kernels: bitplan's quantized model runs dequantized float "
    "weights, so every weight width runs the same float kernel and this table is flat in "
    "weight width (only fake-quantized activations add time); a latency budget on it can "
    "only be met by plans that are no slower than float"
)


# --- keys ---------------------------------------------------------------------------------------


def machine(runtime: str, threads: int | None = None) -> dict[str, Any]:
    """What decides the timings besides the model: CPU model, cores, the ISA flags that select
    kernels, intra-op threads, and the GPU for torch-cuda. Its sha256 is part of a table's key."""
    flags: set[str] = set()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Hardware") and cpu in ("", platform.machine()):
                cpu = value.strip()
            elif key in ("flags", "Features"):
                flags.update(value.split())
    except OSError:
        pass
    found: dict[str, Any] = {
        "cpu": cpu,
        "arch": platform.machine(),
        "cores": os.cpu_count() or 1,
        "flags": sorted(flag for flag in ISA_FLAGS if flag in flags),
        "threads": threads or torch.get_num_threads(),
    }
    if runtime == "torch-cuda":
        found["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return found


def runtime_version(runtime: str) -> str:
    if runtime == "onnxruntime-cpu":
        return f"onnxruntime {ort.__version__}"
    cuda = f" cuda {torch.version.cuda}" if runtime == "torch-cuda" else ""
    return f"torch {torch.__version__}{cuda}"


def model_digest(model: LoadedModel) -> str:
    """The model's content key (architecture class and every parameter and buffer)."""
    return digest("latency-model", model.module)


# --- inputs -------------------------------------------------------------------------------------


def example_input(model: LoadedModel, shape: Sequence[int], seed: int = 0) -> Inputs:
    """A model-ready batch of `shape`: normal noise for an image model (N, C, H, W); token ids
    (N, T) for a causal LM; sentences of about T tokens for a sentence model."""
    generator = torch.Generator().manual_seed(seed)
    if model.input_kind == "image":
        if len(shape) != 4:
            raise BadSpec(f"{model.ref} takes images: give an input shape N,C,H,W, got {shape}")
        return torch.randn(tuple(shape), generator=generator)
    if len(shape) != 2:
        raise BadSpec(f"{model.ref} takes tokens: give an input shape N,T, got {shape}")
    batch, tokens = shape
    if model.encode is not None:
        return model.prepare_windows(
            torch.randint(0, 1000, (batch, tokens), generator=generator).numpy()
        )
    return model.prepare_text([" ".join(["word"] * max(tokens - 2, 1))] * batch)


def _ensure_device(batch: Inputs, device: str) -> Inputs:
    if isinstance(batch, Tensor):
        return batch.to(device)
    return {key: value.to(device) for key, value in batch.items()}


# --- timing -------------------------------------------------------------------------------------


def median_ms(
    call: Callable[[], object],
    warmup: int = WARMUP,
    repeats: int = REPEATS,
    sync: Callable[[], None] = lambda: None,
) -> float:
    """The median wall time of `call` in milliseconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        call()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        call()
        sync()
        times.append((time.perf_counter_ns() - start) / 1e6)
    return statistics.median(times)


def _onnx_timer(path: Path, feed: Mapping[str, np.ndarray], threads: int) -> Callable[[], object]:
    runtime = session(path, threads=threads)
    return lambda: runtime.run(None, dict(feed))


def end_to_end_ms(
    runtime: str,
    model: LoadedModel | Path,
    batch: Inputs,
    *,
    names: Sequence[str] = ("input",),
    warmup: int = WARMUP,
    repeats: int = REPEATS,
    threads: int | None = None,
    activations: Callable[[], Any] | None = None,
) -> float:
    """A whole model's median milliseconds: an ONNX file (`model` a path) in ONNX Runtime, or
    a `LoadedModel` in torch (inside `activations()`, a context that quantizes its activation
    sites, when given)."""
    threads = threads or torch.get_num_threads()
    if isinstance(model, Path):
        return median_ms(_onnx_timer(model, feeds(names, batch), threads), warmup, repeats)
    device = "cuda" if runtime == "torch-cuda" else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    module = model.module.to(device)
    inputs = _ensure_device(batch, device)
    try:
        with torch.no_grad(), activations() if activations else _nothing():
            return median_ms(lambda: model(inputs), warmup, repeats, sync)
    finally:
        module.to("cpu")


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def export_float(model: LoadedModel, batch: Inputs, path: Path) -> tuple[str, ...]:
    """The FP32 model as plain ONNX (no QDQ), traced as `allocator.export.onnx_qdq` traces;
    its input names."""
    names = ("input",) if isinstance(batch, Tensor) else tuple(sorted(batch))
    tensors = (batch,) if isinstance(batch, Tensor) else tuple(batch[n] for n in names)
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(
            _Traced(model, names),
            tensors,
            str(path),
            dynamo=False,
            opset_version=20,
            input_names=list(names),
            output_names=[OUTPUT_NAME],
        )
    return names


# --- the table ----------------------------------------------------------------------------------


def measure_table(
    model: LoadedModel,
    input_shape: Sequence[int],
    runtime: str,
    *,
    weight_widths: Sequence[int] = WEIGHT_WIDTHS,
    act_widths: Sequence[int] = ACT_WIDTHS,
    warmup: int = WARMUP,
    repeats: int = REPEATS,
    threads: int | None = None,
    progress: Callable[[float, str], None] = lambda _f, _m: None,
) -> LatencyTable:
    """Time every weight layer of `model` at every (weight width, activation width) of the
    candidates, and the FP32 model end to end, on `runtime` at `input_shape`."""
    check_runtime(runtime)
    if runtime == "torch-cuda" and not torch.cuda.is_available():
        raise BadSpec("torch-cuda: this machine has no CUDA device; run it on one that has")
    threads = threads or torch.get_num_threads()
    key = model_digest(model)
    batch = example_input(model, input_shape)
    table = build_layer_table(model, batch, pin_first_last=False)
    inputs = _layer_inputs(model, batch, table.names)
    weights = sorted({int(w) for w in weight_widths} | {FLOAT_WIDTH})
    acts = sorted({act_width(int(a)) for a in act_widths} | {FLOAT_WIDTH})
    modules = dict(model.module.named_modules())
    entries: dict[str, dict[str, float]] = {}
    variants: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bitplan-latency-") as tmp:
        for index, name in enumerate(table.names):
            progress(index / len(table.names), name)
            timer = _LayerTimer(
                runtime, name, modules[name], inputs[name], Path(tmp), threads, warmup, repeats
            )
            row = {}
            for w in weights:
                for a in acts:
                    variant = timer.variant(w, a)
                    variants[choice_key(w, a)] = variant
                    row[choice_key(w, a)] = timer.ms(variant, w, a)
            entries[name] = row
        progress(1.0, "end to end")
        fp32 = _fp32_end_to_end(runtime, model, batch, Path(tmp), threads, warmup, repeats)
    layer_sum = sum(row[choice_key(FLOAT_WIDTH, FLOAT_WIDTH)] for row in entries.values())
    flat = runtime != "onnxruntime-cpu"
    notes = [FLAT_NOTE.format(runtime=runtime)] if flat else []
    if fp32 < layer_sum:
        notes.append(
            f"the FP32 model ran in {fp32:.4g} ms end to end, less than its layers' summed "
            f"{layer_sum:.4g} ms alone (the runtime overlaps or fuses work across layers): "
            "rest_ms is 0 and predictions run high"
        )
    return LatencyTable(
        model_sha256=key,
        input_shape=tuple(int(v) for v in input_shape),
        runtime=runtime,
        runtime_version=runtime_version(runtime),
        machine=machine(runtime, threads),
        entries=entries,
        rest_ms=max(fp32 - layer_sum, 0.0),
        fp32_measured_ms=fp32,
        flat=flat,
        settings={
            "warmup": warmup,
            "repeats": repeats,
            "threads": threads,
            "statistic": "median",
            "variants": variants,
            "net_of_call_overhead": runtime == "onnxruntime-cpu",
        },
        notes=tuple(notes),
    )


def _fp32_end_to_end(
    runtime: str,
    model: LoadedModel,
    batch: Inputs,
    folder: Path,
    threads: int,
    warmup: int,
    repeats: int,
) -> float:
    if runtime != "onnxruntime-cpu":
        return end_to_end_ms(runtime, model, batch, warmup=warmup, repeats=repeats, threads=threads)
    path = folder / "fp32.onnx"
    names = export_float(model, batch, path)
    return end_to_end_ms(
        runtime, path, batch, names=names, warmup=warmup, repeats=repeats, threads=threads
    )


def _layer_inputs(model: LoadedModel, batch: Inputs, names: Sequence[str]) -> dict[str, Tensor]:
    """Each layer's input on `batch` (its first call), as the runtime will feed it alone."""
    seen: dict[str, Tensor] = {}
    wanted = set(names)

    def keep(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple, _out: object) -> None:
            seen.setdefault(name, args[0].detach().clone())

        return hook

    handles = [
        module.register_forward_hook(keep(name))
        for name, module in weight_layers(model.module)
        if name in wanted
    ]
    run_hooked(model, batch, handles)
    return seen


class _LayerTimer:
    """One layer's measurements, each distinct kernel (`variant`) timed once."""

    def __init__(
        self,
        runtime: str,
        name: str,
        module: nn.Module,
        x: Tensor,
        folder: Path,
        threads: int,
        warmup: int,
        repeats: int,
    ) -> None:
        self.runtime, self.name, self.module, self.x = runtime, name, module, x
        self.folder, self.threads = folder, threads
        self.warmup, self.repeats = warmup, repeats
        self.measured: dict[str, float] = {}
        self._overhead: float | None = None

    def variant(self, weight_bits: int, act_bits: int) -> str:
        """The kernel a choice runs: equal names, equal graphs (so one measurement)."""
        act = "float" if act_bits >= FLOAT_WIDTH else ("uint8" if act_bits == 8 else "uint8-clip")
        if self.runtime != "onnxruntime-cpu":
            return f"float-kernel/{'float' if act == 'float' else 'fake-quant'}"
        if weight_bits >= FLOAT_WIDTH:
            weight = "float"
        elif weight_bits >= FLOAT_BITS:
            weight = "float16"
        else:
            weight = "int4" if weight_bits <= 4 else "int8"
        return f"{weight}/{act}"

    def ms(self, variant: str, weight_bits: int, act_bits: int) -> float:
        if variant not in self.measured:
            self.measured[variant] = (
                self._onnx(weight_bits, act_bits)
                if self.runtime == "onnxruntime-cpu"
                else self._torch(act_bits)
            )
        return self.measured[variant]

    # torch: the dequantized layer, the input fake-quantized when the activation is

    def _torch(self, act_bits: int) -> float:
        device = "cuda" if self.runtime == "torch-cuda" else "cpu"
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        layer = copy.deepcopy(self.module).to(device).eval()
        x = self.x.to(device)
        quantizer = None
        if act_bits < FLOAT_WIDTH:
            quantizer = calibrate("minmax", self.x, act_bits, axis=1 if x.dim() == 4 else -1)
            quantizer = _on_device(quantizer, device)

        def call() -> Tensor:
            return layer(quantizer(x) if quantizer is not None else x)

        with torch.no_grad():
            return median_ms(call, self.warmup, self.repeats, sync)

    # ONNX Runtime: the layer alone with the export's QDQ nodes

    def _onnx(self, weight_bits: int, act_bits: int) -> float:
        path = self.folder / "layer.onnx"
        onnx.save(self._graph(weight_bits, act_bits), str(path))
        feed = {"x": self.x.numpy()}
        measured = median_ms(_onnx_timer(path, feed, self.threads), self.warmup, self.repeats)
        return max(measured - self.overhead, 0.0)

    @property
    def overhead(self) -> float:
        """ONNX Runtime's per-call cost on this input: an Identity graph, timed alike."""
        if self._overhead is None:
            path = self.folder / "identity.onnx"
            x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(self.x.shape))
            y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(self.x.shape))
            graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id", [x], [y])
            onnx.save(_model(graph), str(path))
            feed = {"x": self.x.numpy()}
            self._overhead = median_ms(
                _onnx_timer(path, feed, self.threads), self.warmup, self.repeats
            )
        return self._overhead

    def _graph(self, weight_bits: int, act_bits: int) -> onnx.ModelProto:
        module, name = self.module, self.name
        linear = isinstance(module, nn.Linear)
        nodes: list[onnx.NodeProto] = []
        inits: list[TensorProto] = []
        source = "x"
        if act_bits < FLOAT_WIDTH:
            quantizer = calibrate("minmax", self.x, act_bits)
            nodes, inits = _qdq_nodes(f"{name}.act", "x", "x_dq", _qdq_params(quantizer))
            source = "x_dq"
        weight = module.weight.detach().float()
        if weight_bits >= FLOAT_WIDTH:
            value = weight.t().contiguous() if linear else weight
            inits.append(numpy_helper.from_array(value.numpy(), "w"))
        else:
            quantized = quantize_weight(weight, _stored_width(weight_bits))
            w_nodes, w_inits, _ = _weight_nodes(name, quantized, linear, "w")
            nodes += w_nodes
            inits += w_inits
        bias = module.bias
        inputs = [source, "w"]
        if bias is not None:
            inits.append(numpy_helper.from_array(bias.detach().float().numpy(), "b"))
        if linear:
            out = "mm" if bias is not None else "y"
            nodes.append(helper.make_node("MatMul", [source, "w"], [out]))
            if bias is not None:
                nodes.append(helper.make_node("Add", ["mm", "b"], ["y"]))
        else:
            nodes.append(
                helper.make_node(
                    "Conv", [*inputs, *(["b"] if bias is not None else [])], ["y"], **_conv(module)
                )
            )
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(self.x.shape))
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
        return _model(helper.make_graph(nodes, name, [x], [y], initializer=inits))


def _conv(module: nn.Module) -> dict[str, Any]:
    """The Conv attributes of an nn.Conv2d (its own padding rule; 'same' as SAME_UPPER)."""
    attrs: dict[str, Any] = {
        "kernel_shape": list(module.kernel_size),
        "strides": list(module.stride),
        "dilations": list(module.dilation),
        "group": module.groups,
    }
    if module.padding == "same":
        attrs["auto_pad"] = "SAME_UPPER"
    elif module.padding == "valid":
        attrs["pads"] = [0, 0, 0, 0]
    else:
        top, left = module.padding
        attrs["pads"] = [top, left, top, left]
    return attrs


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    proto.ir_version = 10
    return proto


def _stored_width(bits: int) -> int:
    """A width with the same ONNX storage that the weight quantizer supports (7 bits is INT8
    like 8; the codes' values do not change the kernel)."""
    if bits >= FLOAT_BITS:
        return FLOAT_BITS
    return bits if bits != 7 else 8


def _on_device(quantizer: ActQuantizer, device: str) -> ActQuantizer:
    return dataclasses.replace(quantizer, lo=quantizer.lo.to(device), hi=quantizer.hi.to(device))
