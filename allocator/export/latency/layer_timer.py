"""One weight layer timed alone at each candidate (weight width, activation width).

Widths that give the same graph run the same kernel, so each distinct kernel (`variant`) is
timed once and shared. ONNX Runtime entries are net of its per-call overhead, which a model
pays once per run, not once per layer; torch runs the dequantized layer, so every weight width
is the same float kernel there.

Imports torch and onnx.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn

from allocator.export.latency.layer_graph import INPUT, identity_graph, layer_graph
from allocator.export.latency.timing import median_ms, onnx_timer
from allocator.latency_table import FLOAT_WIDTH
from allocator.quant.activation import ActQuantizer, calibrate
from allocator.quant.weight import FLOAT_BITS


class LayerTimer:
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
        open_axes: Sequence[int] = (),
    ) -> None:
        self.runtime, self.name, self.module, self.x = runtime, name, module, x
        self.open_axes = tuple(open_axes)
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
        """The milliseconds of `variant`, measured on its first request."""
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
        graph = layer_graph(self.name, self.module, self.x, weight_bits, act_bits, self.open_axes)
        measured = self._onnx_ms(graph, "layer.onnx")
        return max(measured - self.overhead, 0.0)

    @property
    def overhead(self) -> float:
        """ONNX Runtime's per-call cost on this input: an Identity graph, timed alike."""
        if self._overhead is None:
            self._overhead = self._onnx_ms(identity_graph(self.x.shape), "identity.onnx")
        return self._overhead

    def _onnx_ms(self, graph: onnx.ModelProto, file_name: str) -> float:
        path = self.folder / file_name
        onnx.save(graph, str(path))
        feed = {INPUT: self.x.numpy()}
        return median_ms(onnx_timer(path, feed, self.threads), self.warmup, self.repeats)


def _on_device(quantizer: ActQuantizer, device: str) -> ActQuantizer:
    return dataclasses.replace(quantizer, lo=quantizer.lo.to(device), hi=quantizer.hi.to(device))
