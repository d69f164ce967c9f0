"""The one-layer graphs a latency table times run the kernel ONNX Runtime runs for that layer in
a whole exported plan: their input axes are open where the export's are, because the runtime
fuses an 8-bit layer into an integer kernel on an open (batch, sequence) input and not on a
static one."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from torch import nn

from allocator.export.latency.layer_graph import layer_graph
from allocator.export.latency.table import _grown, _layer_inputs, _open_axes
from allocator.export.latency.timing import example_input
from allocator.export.runtime import DISABLED_OPTIMIZERS, SESSION_CONFIG
from allocator.layers import build_layer_table
from allocator.zoo import load_model

TINY_VIT = "timm:vit_tiny_patch16_224?img_size=16&patch_size=8&embed_dim=32&depth=1&num_heads=2"


def _optimized_ops(graph: onnx.ModelProto, folder: Path) -> list[str]:
    """The node types ONNX Runtime runs for `graph`, opened as the timings open it."""
    options = ort.SessionOptions()
    for key, value in SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    ort.InferenceSession(
        graph.SerializeToString(),
        options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(DISABLED_OPTIMIZERS),
    )
    return [node.op_type for node in onnx.load(str(folder / "optimized.onnx")).graph.node]


def test_an_8_bit_layer_on_open_axes_runs_the_integer_kernel(tmp_path: Path) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 96)
    x = torch.randn(1, 8, 64)
    fused = _optimized_ops(layer_graph("fc", layer, x, 8, 8, open_axes=(0, 1)), tmp_path)
    assert "MatMulIntegerToFloat" in fused, fused
    static = _optimized_ops(layer_graph("fc", layer, x, 8, 8), tmp_path)
    assert "MatMulIntegerToFloat" not in static, static


def test_open_axes_are_those_the_export_leaves_open() -> None:
    """A ViT's token count is fixed by its image size: only the batch axis is open."""
    model = load_model(TINY_VIT)
    batch = example_input(model, (1, 3, 16, 16))
    names = build_layer_table(model, batch, pin_first_last=False).names
    axes = _open_axes(
        _layer_inputs(model, batch, names),
        _layer_inputs(model, _grown(model, (1, 3, 16, 16)), names),
    )
    assert axes["patch_embed.proj"] == (0,)
    assert axes["blocks.0.attn.qkv"] == (0,)
    assert axes["head"] == (0,)


def test_an_8_bit_convolution_is_timed_as_the_integer_kernel_the_export_runs(
    tmp_path: Path,
) -> None:
    """INT8 weights and an 8-bit input: INT32 bias and a requantized output, so QLinearConv;
    INT4 weights have no integer convolution and keep the dequantized float kernel."""
    torch.manual_seed(0)
    layer = nn.Conv2d(16, 24, 1)
    x = torch.randn(1, 16, 12, 12)
    assert "QLinearConv" in _optimized_ops(layer_graph("c", layer, x, 8, 8, (0,)), tmp_path)
    assert "QLinearConv" not in _optimized_ops(layer_graph("c", layer, x, 4, 8, (0,)), tmp_path)
