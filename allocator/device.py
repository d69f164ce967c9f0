"""Where a job's tensors live: the device a spec names, checked, and the moves to and from it.

A job runs on one device (`JobSpec.device`: "cpu", "cuda" or "cuda:N"). The model moves there
once (`LoadedModel.to`); calibration, held-out and evaluation batches stay prepared on the CPU,
where the cache's keys hash them, and move one batch at a time where the model is called
(`LoadedModel.__call__`, `LoadedModel.inputs`); every tensor the allocator creates is made on
the device of the tensor it meets; what leaves a job (metrics, cached entries, the packed
artifact, reports) is brought back to the CPU. On the CPU every move is a no-op, so a CPU job's
numbers are bit for bit those of the code before devices existed.

The default device is the front end's business (`bitplan run --device`, `bitplan worker
--device`, `BITPLAN_DEVICE`): nothing in `allocator/` reads the environment.

Imports torch only.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from allocator.errors import DeviceUnavailable

CPU = torch.device("cpu")
T = TypeVar("T")

NO_CUDA_ADVICE = (
    'run it with --device cpu (device: "cpu" in the spec), or on a GPU worker '
    "(`bitplan worker --queue gpu --device cuda`, and submit with --queue gpu)"
)


def resolve(name: str | None) -> torch.device:
    """The torch device a spec's `device` names (None: the CPU), once this machine is known to
    have it; otherwise `DeviceUnavailable`, one line saying what to do instead.

    The spec's syntax is checked by `JobSpec.validate`; this answers whether *this* machine can
    run it, which only the worker that got the job knows.
    """
    if name is None or name == "cpu":
        return CPU
    device = torch.device(name)
    if device.type != "cuda":
        raise DeviceUnavailable(f"device {name!r} is not cpu or cuda; {NO_CUDA_ADVICE}")
    if not torch.cuda.is_available():
        build = (
            f"torch {torch.__version__} is built without CUDA"
            if torch.version.cuda is None
            else "torch.cuda.is_available() is false here (no GPU, or no driver)"
        )
        raise DeviceUnavailable(f"the job asks for {name} but {build}; {NO_CUDA_ADVICE}")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceUnavailable(
            f"the job asks for {name} but this machine has {count} GPU(s), cuda:0 to "
            f"cuda:{count - 1}; name one of those, or plain cuda"
        )
    return torch.device("cuda", device.index if device.index is not None else 0)


def full_float32(device: torch.device) -> None:
    """Make CUDA compute float32 as float32 in this process: cuDNN convolutions default to
    TF32 on Ampere and later GPUs (10 mantissa bits, about 1e-3 relative error), which would
    move statistics, costs and fits well beyond the float rounding a GPU job may differ from
    the CPU's by. Matrix products already default to full float32; that is made sure too.
    Process-wide, as torch's flags are: a worker's jobs all want it. Nothing on the CPU."""
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def cuda_devices_without_init() -> int:
    """How many GPUs this machine has, asked through NVML where it can be, so that a parent
    process that forks job processes afterwards (a Celery prefork worker) has not initialised
    CUDA: a child of a process that did cannot use CUDA at all."""
    if torch.version.cuda is None:
        return 0
    return max(torch.cuda.device_count(), 0)


def to_device(value: T, device: torch.device) -> T:
    """`value` (a tensor, or mappings, lists and tuples of them) with every tensor on `device`;
    a tensor already there is returned as it is, without a call a tracer would record (the
    ONNX export traces the model's calls), so on the CPU nothing changes at all."""
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device)  # type: ignore[return-value]
    if isinstance(value, Mapping):
        return {key: to_device(item, device) for key, item in value.items()}  # type: ignore[return-value]
    if isinstance(value, list):
        return [to_device(item, device) for item in value]  # type: ignore[return-value]
    if isinstance(value, tuple):
        return tuple(to_device(item, device) for item in value)  # type: ignore[return-value]
    return value


def to_cpu(value: T) -> T:
    """`to_device(value, CPU)`: what a cache entry, a metric or an artifact must hold, so that a
    machine without the job's device can read it."""
    return to_device(value, CPU)


def device_of(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU for one that has none)."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return CPU


@dataclass(frozen=True)
class DeviceMemory:
    """What a GPU has free for a job, and what the job's terms need (bytes)."""

    free: int
    weights: int
    """The FP32 weights and the copies a job keeps of them on the device."""
    calibration_per_sample: int
    """Activations, their gradients and the inputs of one calibration sample."""
    evaluation_per_sample: int
    """Activations, inputs and outputs of one sample in an evaluation pass (no gradients)."""


HEADROOM = 0.8
"""Share of the free device memory batches are sized to fill: the CUDA caching allocator
fragments, kernels take workspaces (cuBLAS, cuDNN), and the estimate counts only the terms that
grow with what a tenant controls (`allocator.memory`)."""
MAX_EVAL_BATCH = 1024
"""Largest evaluation batch chosen for a GPU: beyond it a pass is no faster, and a batch of
vocabulary-wide causal-LM logits gets large."""


@dataclass(frozen=True)
class BatchSizes:
    calibration: int
    evaluation: int


def batch_sizes(memory: DeviceMemory, calibration: int, device: str = "cuda") -> BatchSizes:
    """The calibration and evaluation batch sizes of a job on a GPU, given its memory terms.

    Evaluation outputs do not depend on how samples are batched (up to float rounding), so the
    evaluation batch is as large as fits, up to `MAX_EVAL_BATCH`. The calibration batch is the
    spec's `batch_size` (`calibration`): the statistics sample rows per batch, so another size
    would be another job; it is lowered only when it cannot fit, the one way the job can run.
    Raises `DeviceUnavailable` when the weights and one sample do not fit.
    """
    room = int(memory.free * HEADROOM) - memory.weights
    if room < max(memory.calibration_per_sample, memory.evaluation_per_sample, 1):
        raise DeviceUnavailable(
            f"the job needs about {_gib(memory.weights)} for its weights plus "
            f"{_gib(memory.calibration_per_sample)} per calibration sample on {device}, which "
            f"has {_gib(memory.free)} free; use a GPU with more free memory, or run it with "
            "--device cpu"
        )
    fits_calibration = room // max(memory.calibration_per_sample, 1)
    fits_evaluation = room // max(memory.evaluation_per_sample, 1)
    return BatchSizes(
        calibration=max(1, min(calibration, fits_calibration)),
        evaluation=max(1, min(fits_evaluation, MAX_EVAL_BATCH)),
    )


def free_memory(device: torch.device) -> int:
    """Bytes free on a CUDA device now (`torch.cuda.mem_get_info`), for `batch_sizes`."""
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def describe(device: torch.device) -> dict[str, Any]:
    """The device as a result records it: its name, and the GPU's model and memory."""
    if device.type != "cuda":
        return {"device": str(device)}
    properties = torch.cuda.get_device_properties(device)
    return {
        "device": str(device),
        "gpu": properties.name,
        "gpu_memory_gb": round(properties.total_memory / 1e9, 1),
    }


def _gib(nbytes: int) -> str:
    return f"{nbytes / (1 << 30):.1f} GiB"
