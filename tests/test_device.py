"""The device plumbing, tested without a GPU: `JobSpec.device`, the one-line refusal of CUDA on a
machine without it, GPU batch sizes from free memory, and a whole job that creates no tensor off
the model's device.

No GPU is needed for any of this, and none of it proves a GPU run works (docs/design.md, "GPU
workers", says what has not been run on one). What it does prove: with the job's tensors on the
CPU and every tensor created *without* an explicit device sent to the meta device (set once the
model and data are loaded, as a GPU job would have them on the GPU), a job gives exactly the
result of a plain CPU run. A tensor allocator/ makes without `device=` either meets a CPU tensor
("Tensor on device meta is not on the expected device cpu!"), is read (`.item()` on meta), or
indexes a CPU tensor with garbage, which changes the result: any of the three fails the test.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from allocator import device as devices
from allocator.apply import read_packed
from allocator.device import BatchSizes, DeviceMemory, batch_sizes, resolve
from allocator.errors import BadSpec, DeviceUnavailable
from allocator.job import MAX_DEVICE_INDEX, JobSpec
from allocator.memory import ACTIVATION_COPIES, MemoryEstimate
from allocator.pipeline import run
from allocator.prepare import device_batch_sizes
from service.cli.output import print_summary
from tests.test_quant_activation import images, tiny_job  # noqa: F401  (a fixture by name)

NO_CUDA = not torch.cuda.is_available()


# --- the spec -----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", [None, "cpu", "cuda", "cuda:0", f"cuda:{MAX_DEVICE_INDEX}"])
def test_a_spec_may_name_the_cpu_or_a_gpu(device: str | None) -> None:
    JobSpec(model="m", calib="c", device=device).validate()


@pytest.mark.parametrize(
    "device",
    ["gpu", "CUDA", "cuda:", "cuda:-1", f"cuda:{MAX_DEVICE_INDEX + 1}", "cuda:999", "mps", "cpu:0",
     "cuda:0 ", 3, ""],
)  # fmt: skip
def test_any_other_device_is_refused_in_one_line(device: object) -> None:
    with pytest.raises(BadSpec, match="is not cpu, cuda or cuda:N") as refused:
        JobSpec(model="m", calib="c", device=device).validate()  # type: ignore[arg-type]
    assert "\n" not in str(refused.value)


def test_the_device_survives_the_wire_form() -> None:
    spec = JobSpec(model="m", calib="c", device="cuda:1")
    assert JobSpec.from_dict(spec.to_dict()) == spec
    assert JobSpec.from_dict({"model": "m", "calib": "c"}).device is None  # jobs stored before


# --- a device this machine lacks ----------------------------------------------------------------


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_cuda_without_cuda_fails_at_once_saying_what_to_do(resnet20_job: JobSpec) -> None:
    def no_phase(phase: str, _fraction: float, _message: str) -> None:
        raise AssertionError(f"the job started ({phase}) before refusing its device")

    with pytest.raises(DeviceUnavailable) as refused:
        run(replace(resnet20_job, device="cuda"), no_phase)
    message = str(refused.value)
    assert "\n" not in message
    assert "asks for cuda" in message
    assert "--device cpu" in message and "bitplan worker --queue gpu --device cuda" in message


def test_a_gpu_index_past_the_last_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DeviceUnavailable, match=r"has 2 GPU\(s\), cuda:0 to cuda:1"):
        resolve("cuda:2")
    assert resolve("cuda") == torch.device("cuda", 0)
    assert resolve("cuda:1") == torch.device("cuda", 1)
    assert resolve(None) == resolve("cpu") == torch.device("cpu")


def test_a_gpu_job_computes_float32_as_float32() -> None:
    """cuDNN's TF32 default would put GPU statistics about 1e-3 away from the CPU's."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        devices.full_float32(torch.device("cpu"))
        assert torch.backends.cudnn.allow_tf32  # the CPU's flags are nobody's business here
        devices.full_float32(torch.device("cuda", 0))
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# --- batch sizes from free device memory --------------------------------------------------------

GIB = 1 << 30


def test_the_evaluation_batch_fills_the_free_memory_up_to_its_bound() -> None:
    memory = DeviceMemory(
        free=10 * GIB,
        weights=2 * GIB,
        calibration_per_sample=60 << 20,
        evaluation_per_sample=4 << 20,
    )
    sizes = batch_sizes(memory, calibration=32)
    room = int(10 * GIB * devices.HEADROOM) - 2 * GIB
    assert sizes == BatchSizes(calibration=32, evaluation=min(room // (4 << 20), 1024))
    assert sizes.evaluation == 1024  # 1,536 fit
    tight = replace(memory, free=3 * GIB)  # 0.4 GiB of room: 102 evaluation samples, 6 calibration
    assert batch_sizes(tight, calibration=32) == BatchSizes(calibration=6, evaluation=102)


def test_the_spec_batch_size_is_kept_when_it_fits_and_never_raised() -> None:
    memory = DeviceMemory(
        free=80 * GIB, weights=GIB, calibration_per_sample=1 << 20, evaluation_per_sample=1 << 20
    )
    assert batch_sizes(memory, calibration=8).calibration == 8


def test_weights_that_do_not_fit_are_one_line_naming_the_way_out() -> None:
    memory = DeviceMemory(
        free=4 * GIB, weights=4 * GIB, calibration_per_sample=1 << 20, evaluation_per_sample=1 << 20
    )
    with pytest.raises(DeviceUnavailable, match="--device cpu") as refused:
        batch_sizes(memory, calibration=32, device="cuda:0")
    assert "4.0 GiB free" in str(refused.value) and "\n" not in str(refused.value)


def test_a_job_on_a_gpu_sizes_its_batches_from_mem_get_info(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The code path `prepare` takes on a GPU, with `torch.cuda.mem_get_info` answering 8 GiB
    free: the memory estimate's terms as the device holds them decide."""
    estimate = MemoryEstimate(
        params=10_000_000,
        activation_bytes_per_sample=2 << 20,
        input_bytes_per_sample=600_000,
        widths=6,
        batch_size=32,
        samples=256,
    )
    asked: list[torch.device] = []

    def mem_get_info(device: torch.device) -> tuple[int, int]:
        asked.append(device)
        return 8 * GIB, 16 * GIB

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    spec = JobSpec(model="m", calib="c", batch_size=32)
    sizes = device_batch_sizes(spec, torch.device("cuda", 0), estimate)
    assert asked == [torch.device("cuda", 0)]
    room = int(8 * GIB * devices.HEADROOM) - estimate.param_bytes
    per_eval = (2 << 20) + 600_000
    assert sizes == BatchSizes(calibration=32, evaluation=min(room // per_eval, 1024))
    on_device = estimate.on_device(8 * GIB)
    assert on_device.calibration_per_sample == (2 << 20) * ACTIVATION_COPIES + 600_000
    cpu = device_batch_sizes(spec, torch.device("cpu"), estimate)
    assert cpu == BatchSizes(32, 128) and len(asked) == 1  # the CPU keeps what jobs always used


# --- a whole job creates no tensor off the model's device ---------------------------------------


@contextmanager
def default_device_after_load(device: str) -> Iterator[Any]:
    """A progress callback that makes `device` torch's default once the job has loaded its model
    and data (the "layers" phase starts) until it packs, and restores the CPU afterwards.

    Packing and the ONNX export run on the CPU by design (`export_checked` moves a copy of the
    model there): the tracer and ONNX Runtime's feeds create tensors where the default is."""

    def progress(phase: str, fraction: float, _message: str) -> None:
        if phase == "layers" and fraction == 0.0:
            torch.set_default_device(device)
        elif phase == "pack" and fraction == 0.0:
            torch.set_default_device(None)

    try:
        yield progress
    finally:
        torch.set_default_device(None)


TIMES = ("job_id", "timings", "phases", "artifacts", "seconds", "wall_seconds")
"""What differs between two runs of one job: ids, paths and clocks."""


def comparable(value: Any) -> Any:
    """A result's JSON without what differs between two runs of the same job."""
    if hasattr(value, "to_json"):
        value = value.to_json()
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if k not in TIMES}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def assert_no_tensor_off_device(spec: JobSpec, tmp_path: Path) -> None:
    plain = run(spec, workdir=tmp_path / "plain")
    with default_device_after_load("meta") as progress:
        strict = run(spec, progress, workdir=tmp_path / "strict")
    assert torch.zeros(1).device.type == "cpu"
    assert comparable(strict) == comparable(plain)
    first, second = (read_packed(result.artifacts["model"]) for result in (plain, strict))
    assert first.plan == second.plan
    for name, codes in first.codes.items():
        assert torch.equal(codes.codes, second.codes[name].codes)
    assert first.others.keys() == second.others.keys()
    assert all(torch.equal(t, second.others[k]) for k, t in first.others.items())


@pytest.mark.slow
def test_a_resnet_job_creates_no_tensor_off_the_models_device(
    resnet20_job: JobSpec, tmp_path: Path
) -> None:
    """Every phase: statistics (GPTQ, both rule sets), lrp + fisher + hessian + measured
    sensitivity, in-network fits and a round of costs in context, 8-bit activations, evaluation,
    packing and the ONNX export with its parity check."""
    spec = replace(
        resnet20_job,
        method="lrp+fisher+hessian+measured",
        bits=(2, 4, 8),
        act_bits=8,
        act_quantizers="baseline",
        calibration="in-network",
        context_rounds=1,
        budget="avg-bits=3",
        export=("onnx",),
        reuse=False,
    )
    assert_no_tensor_off_device(spec, tmp_path)


@pytest.mark.slow
def test_a_vit_job_creates_no_tensor_off_the_models_device(
    images: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A transformer: LRP through attention, the activation bench choosing quantizers per role
    (post-LayerNorm channel ranges, post-Softmax log quantizers) and joint allocation."""
    spec = tiny_job(
        images,
        budget="match=W4A6",
        act_bits="auto",
        method="lrp+fisher+hessian",
        report_widths=False,
        reuse=False,
    )
    assert_no_tensor_off_device(spec, tmp_path)


# --- what the CLI prints ------------------------------------------------------------------------


def test_the_summary_names_the_gpu_and_leaves_a_cpu_jobs_lines_as_they_were(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.test_result_summaries import payload

    cpu = {"device": "cpu", "calibration_batch_size": 32, "evaluation_batch_size": 128}
    print_summary({**payload(), "device": cpu})
    assert not any(line.startswith("device") for line in capsys.readouterr().out.splitlines())
    gpu = {
        "device": "cuda:0",
        "gpu": "NVIDIA H200",
        "gpu_memory_gb": 150.0,
        "calibration_batch_size": 32,
        "evaluation_batch_size": 1024,
    }
    print_summary({**payload(), "device": gpu})
    assert capsys.readouterr().out.splitlines()[1] == (
        "device cuda:0 (NVIDIA H200, 150.0 GB)  batch sizes: calibration 32, evaluation 1024"
    )
