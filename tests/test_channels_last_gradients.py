"""Parameter gradients of channels-last convolutions (issue 11's fastvit crash).

oneDNN's AVX2 weight-gradient kernel for a 1x1, stride-2 convolution with 2 to 7 input channels
corrupts the heap when its input or weight is channels-last: FastViT's stem has one, and image
calibration batches are channels-last views, so the Hutchinson step died natively (SIGABRT or
SIGSEGV) on CPUs without AVX-512. `ONEDNN_MAX_CPU_ISA=AVX2` selects that kernel on any x86 CPU
with AVX2 (on others it changes nothing and the tests pass trivially). A native crash kills the
interpreter, so the cases run in a child process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from allocator.layers import build_layer_table
from allocator.sensitivity.hessian import hessian_traces
from allocator.sensitivity.layout import channels_first_convolutions
from allocator.zoo.base import LoadedModel

REPO_ROOT = Path(__file__).resolve().parent.parent
AVX2_ONEDNN = {"ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}


def _stem_model(channels_last_weights: bool = False) -> LoadedModel:
    """A 1x1 stride-2 convolution on RGB, as in FastViT's stem, then a small classifier."""
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(3, 8, 1, stride=2), nn.GELU(), nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).eval()  # fmt: skip
    if channels_last_weights:
        module = module.to(memory_format=torch.channels_last)
    return LoadedModel(ref="stem", module=module, task="classification", input_kind="image")


def _channels_last_batch() -> torch.Tensor:
    """Four images as the data pipeline hands them over: an NCHW view of HWC pixels."""
    return torch.randn(4, 32, 32, 3, generator=torch.Generator().manual_seed(1)).permute(0, 3, 1, 2)


CHILD = textwrap.dedent(
    """
    import sys
    import torch
    from tests.test_channels_last_gradients import _channels_last_batch, _stem_model
    from allocator.layers import build_layer_table
    from allocator.sensitivity.hessian import hessian_traces
    from allocator.sensitivity.lrp import conservation

    torch.set_num_threads(1)
    step, weights = sys.argv[1], sys.argv[2]
    model = _stem_model(channels_last_weights=weights == "channels-last")
    x = _channels_last_batch()
    if weights == "channels-last":
        x = x.contiguous()
    if step == "hessian":
        table = build_layer_table(model, x[:1], pin_first_last=False)
        print(hessian_traces(model, [x], table, max_probes=3, min_probes=1).trace)
    else:
        print(conservation(model, x).relative_error)
    """
)


@pytest.mark.parametrize("weights", ["contiguous", "channels-last"])
@pytest.mark.parametrize("step", ["hessian", "conservation"])
def test_parameter_gradients_of_a_channels_last_stem_do_not_crash(step: str, weights: str) -> None:
    """Hutchinson takes weight gradients and the conservation check bias gradients: both went
    through the broken kernel with a channels-last input (or weight) and died."""
    child = subprocess.run(
        [sys.executable, "-c", CHILD, step, weights],
        cwd=REPO_ROOT,
        env={**os.environ, **AVX2_ONEDNN},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, f"exit code {child.returncode}\n{child.stderr[-2000:]}"


def test_convolutions_run_channels_first_and_the_model_is_left_as_it_was() -> None:
    model = _stem_model(channels_last_weights=True)
    first = model.module[0]
    weight, strides = first.weight, first.weight.stride()
    seen: list[bool] = []
    first.register_forward_hook(lambda _m, args, _out: seen.append(args[0].is_contiguous()))
    hooks = len(first._forward_pre_hooks)
    with channels_first_convolutions(model.module):
        assert first.weight.stride() == (3, 1, 1, 1)
        model(_channels_last_batch())
    assert seen == [True]
    assert first.weight is weight and first.weight.stride() == strides != (3, 1, 1, 1)
    assert len(first._forward_pre_hooks) == hooks


def test_hutchinson_traces_do_not_depend_on_the_batch_layout() -> None:
    model = _stem_model()
    x = _channels_last_batch()
    table = build_layer_table(model, x[:1], pin_first_last=False)
    nhwc = hessian_traces(model, [x], table, max_probes=4, min_probes=4)
    nchw = hessian_traces(model, [x.contiguous()], table, max_probes=4, min_probes=4)
    assert nhwc.probes == nchw.probes == 4
    for name in table.names:
        assert nhwc.trace[name] == pytest.approx(nchw.trace[name], rel=1e-4, abs=1e-12)


@pytest.mark.slow
def test_the_fastvit_coverage_row_survives_avx2_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's own case: bench/coverage.py's tiny fastvit row, in a child process."""
    from bench.coverage import FAMILIES, STEPS, run_isolated

    for name, value in AVX2_ONEDNN.items():
        monkeypatch.setenv(name, value)
    row = run_isolated(FAMILIES["fastvit"], tiny=True, images=2)
    assert row.steps == dict.fromkeys(STEPS, "ok"), row.steps
