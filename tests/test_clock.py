"""The job clock: seconds, model calls, samples and peak memory per phase."""

from __future__ import annotations

import copy

import torch
from torch import nn

from allocator.clock import Clock


def test_each_phase_counts_the_model_calls_and_samples_made_inside_it() -> None:
    clock = Clock()
    model = nn.Linear(3, 2)
    clock.watch(model)
    model(torch.zeros(1, 3))  # outside any phase: counted in no phase
    with clock.phase("first"):
        model(torch.zeros(5, 3))
        model(input=torch.zeros(7, 3))
    with clock.phase("second"):
        copy.deepcopy(model)(torch.zeros(4, 3))  # a quantized copy of the model counts too
    assert clock.phases["first"]["forwards"] == 2
    assert clock.phases["first"]["samples"] == 12
    assert clock.phases["second"]["samples"] == 4
    assert clock.phases["first"]["seconds"] == clock.timings["first"]


def test_the_peak_memory_is_the_phases_own() -> None:
    clock = Clock()
    with clock.phase("big"):
        block = torch.ones(64 * 2**20 // 4)  # 64 MB touched
        del block
    with clock.phase("small"):
        pass
    big, small = clock.phases["big"]["peak_mb"], clock.phases["small"]["peak_mb"]
    assert big is not None and small is not None
    assert big >= small + 50


def test_the_gpu_peak_is_recorded_per_phase_where_a_gpu_was_used(monkeypatch) -> None:
    """On the CPU there is no `gpu_peak_mb`; once torch has put something on a GPU each phase
    resets the GPU peak at its start and records it at its end (a stand-in for torch.cuda
    here: this machine has no GPU)."""
    clock = Clock()
    with clock.phase("cpu"):
        pass
    assert "gpu_peak_mb" not in clock.phases["cpu"]

    class FakeCuda:
        peak = 0

        def is_available(self) -> bool:
            return True

        def is_initialized(self) -> bool:
            return True

        def reset_peak_memory_stats(self) -> None:
            self.peak = 0

        def max_memory_allocated(self) -> int:
            return self.peak

    cuda = FakeCuda()
    monkeypatch.setattr(torch, "cuda", cuda)
    with clock.phase("first"):
        cuda.peak = 300 * 2**20
    with clock.phase("second"):
        cuda.peak += 5 * 2**20
    assert clock.phases["first"]["gpu_peak_mb"] == 300.0
    assert clock.phases["second"]["gpu_peak_mb"] == 5.0
