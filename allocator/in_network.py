"""In-network calibration: each layer quantized on the inputs the quantized network gives it.

The statistics phase (`allocator.costs`) fits every layer's rounding and bias correction to its
FP32 inputs, one layer at a time. Once the layers before it are quantized too, a layer sees
other inputs, and the errors of the layers add up in ways no per-layer fit can undo. This module
quantizes a plan the way GPTQ and BRECQ do: layers in the order the network runs them, each one
fitted with the earlier ones already quantized.

Each layer l, with FP32 inputs x_f and the quantized network's inputs x_q on the same samples
and positions, is fitted so that its output on x_q matches the FP32 layer's output on x_f:
minimise E||W x_f - W' x_q||^2, whose least-squares answer is W' = W C_fq C_qq^-1 (centred
cross- and auto-covariances, dampened as GPTQ dampens), then GPTQ rounds W' on the rule's grid
with C_qq, and the bias correction W m_f - Q m_q removes the mean shift the upstream layers and
this one leave (CalibTIP's bias tuning, in closed form). With `target="quantized"` it is plain
sequential GPTQ instead: W' = W, fitted on x_q. The clipping and rounding rule of each (layer,
width) stays the one the statistics phase chose.

A layer is fitted at its plan width and, for `allocator.context_costs`, at the neighbouring
widths (`widths`), in the same context. Layers whose weight is tied to another's, and float16
widths, keep their FP32-input choice.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from allocator import unfold
from allocator.activations import Transform, current_transform, transform_in_thread
from allocator.costs import ROWS_PER_BATCH, QuantChoice
from allocator.layers import Layer, LayerTable
from allocator.quant.gptq import DAMPENING, gptq_quantize, hessian_factor
from allocator.quant.weight import quantize_weight
from allocator.sensitivity.measured import quantized_layer, quantized_layers
from allocator.zoo.base import Inputs, LoadedModel, run_hooked

TARGETS = ("fp32", "quantized")
"""What a layer's quantized output is fitted to: the FP32 layer on FP32 inputs (default), or
the FP32 weights on the quantized network's inputs (plain sequential GPTQ)."""

Choices = Mapping[tuple[str, int], QuantChoice]


class _Captured(Exception):
    """Raised by the capture hook to stop a forward pass once the layer's input is read."""


@dataclass
class _Moments:
    """Per weight group: C_qq, C_fq and the means of the quantized and FP32 input rows."""

    qq: Tensor | None = None
    fq: Tensor | None = None
    mean_q: Tensor | None = None
    mean_f: Tensor | None = None
    rows: int = 0

    def add(self, rows_f: Tensor, rows_q: Tensor) -> None:
        f = rows_f.transpose(0, 1).float()  # (groups, rows, width)
        q = rows_q.transpose(0, 1).float()
        # One batch's products in float32, the running sums in float64.
        parts = tuple(
            p.double() for p in (q.transpose(1, 2) @ q, f.transpose(1, 2) @ q, q.sum(1), f.sum(1))
        )
        if self.qq is None:
            self.qq, self.fq, self.mean_q, self.mean_f = parts
        else:
            self.qq += parts[0]
            self.fq += parts[1]
            self.mean_q += parts[2]
            self.mean_f += parts[3]
        self.rows += f.shape[1]

    def centred(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(C_qq, C_fq, m_q, m_f), centred and divided by the number of rows."""
        assert self.qq is not None and self.fq is not None
        assert self.mean_q is not None and self.mean_f is not None
        n = max(self.rows, 1)
        mq, mf = self.mean_q / n, self.mean_f / n
        cqq = self.qq / n - mq[:, :, None] * mq[:, None, :]
        cfq = self.fq / n - mf[:, :, None] * mq[:, None, :]
        return cqq, cfq, mq, mf


def execution_order(model: LoadedModel, sample: Inputs, names: Iterable[str]) -> list[str]:
    """`names` in the order the model first calls them on `sample` (uncalled ones dropped)."""
    modules = dict(model.module.named_modules())
    order: list[str] = []
    handles = [
        modules[name].register_forward_pre_hook(
            lambda _m, _a, name=name: None if name in order else order.append(name)
        )
        for name in names
    ]
    run_hooked(model, sample, handles)
    return order


def calibrate(
    model: LoadedModel,
    batches: Sequence[Inputs],
    table: LayerTable,
    plan: Mapping[str, int],
    fp32_choices: Choices,
    widths: Callable[[str, int], Sequence[int]] | None = None,
    target: str = "fp32",
    context: Callable[[], AbstractContextManager[object]] | None = None,
    on_layer: Callable[[int, int], None] | None = None,
) -> dict[tuple[str, int], QuantChoice]:
    """Choices for `plan` fitted in network order: for each layer, every width in
    `widths(layer, plan[layer])` (the plan width alone when None), each fitted with the earlier layers at their plan widths.

    `context()` enters what else the quantized network runs with (its activation quantizers).
    Layers that cannot be refitted keep `fp32_choices` at their plan width.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    modules = dict(model.module.named_modules())
    tied = {layer.group for layer in table if layer.group != layer.name}
    refit = [
        layer
        for layer in table
        if plan[layer.name] < 16 and layer.name not in tied and layer.group == layer.name
    ]
    order = execution_order(model, batches[0], [layer.name for layer in refit])
    by_name = {layer.name: layer for layer in table}
    fitted: dict[tuple[str, int], QuantChoice] = {
        (name, b): fp32_choices[(name, b)] for name, b in plan.items()
    }
    fp32 = _fp32_rows(model, batches, [by_name[name] for name in order], modules)
    if fp32 or _weight_bytes(model.module) <= TWIN_MAX_BYTES:
        lockstep = _Lockstep(model, batches, order, by_name, modules, fp32)
        fit = lockstep.run(plan, fitted, fp32_choices, widths, target, context, on_layer)
        if fit is not None:
            return fit
    for index, name in enumerate(order):
        layer, module = by_name[name], modules[name]
        rows = fp32.get(name) or [
            _sampled(module, _capture(model, inputs, module), layer.padding, i)
            for i, inputs in enumerate(batches)
        ]
        moments = _moments(
            model, batches, module, layer.padding, rows, fitted, plan, modules, context
        )
        asked = widths(name, plan[name]) if widths is not None else (plan[name],)
        fitted.update(_fit(module, moments, name, asked, fp32_choices, target))
        if on_layer is not None:
            on_layer(index + 1, len(order))
    return fitted


class _Parted(Exception):
    """The batches of a lockstep pass did not call the same layer next."""


class _Lockstep:
    """All calibration batches through the network at once, one thread each, meeting before
    every layer: there the layer is fitted on all of them and given its quantized weight, and
    they go on. The same fit as one partial pass per layer and batch (each layer sees the same
    inputs), in one pass per batch instead of about half a pass per layer. Where the FP32 rows
    of every layer do not fit in memory (`_fp32_rows` kept none: EfficientNet-Lite1's depthwise
    layers), an FP32 copy of the model runs beside it in lockstep too, one more thread per
    batch, instead of a second partial pass per layer and batch.

    It needs every batch to call the layers in the same order; when one does not (a
    data-dependent branch), the barrier is broken and `run` answers None for the caller to fit
    layer by layer."""

    def __init__(
        self,
        model: LoadedModel,
        batches: Sequence[Inputs],
        order: Sequence[str],
        by_name: Mapping[str, Layer],
        modules: Mapping[str, nn.Module],
        fp32: Mapping[str, list[tuple[Tensor | None, Tensor]]],
    ) -> None:
        self.model, self.batches, self.order = model, batches, list(order)
        self.by_name, self.modules, self.fp32 = by_name, modules, fp32
        self.twin = None if fp32 else replace(model, module=copy.deepcopy(model.module))
        self.arrived: dict[tuple[bool, int], tuple[str, Tensor]] = {}
        self.failures: list[BaseException] = []
        self.thread = threading.local()
        self.transform: Transform | None = None

    def run(
        self,
        plan: Mapping[str, int],
        fitted: dict[tuple[str, int], QuantChoice],
        fp32_choices: Choices,
        widths: Callable[[str, int], Sequence[int]] | None,
        target: str,
        context: Callable[[], AbstractContextManager[object]] | None,
        on_layer: Callable[[int, int], None] | None,
    ) -> dict[tuple[str, int], QuantChoice] | None:
        """`fitted` completed for every layer of the order, or None if the batches parted."""
        done = [0]
        passes = [(False, i) for i in range(len(self.batches))]
        if self.twin is not None:
            passes += [(True, i) for i in range(len(self.batches))]
        with ExitStack() as installed:

            def fit_next() -> None:
                """Runs once per layer, in the last thread to arrive, the others waiting."""
                name = self.order[done[0]]
                if len(self.arrived) != len(passes) or any(
                    arrived != name for arrived, _rows in self.arrived.values()
                ):
                    raise _Parted(name)
                moments = _Moments()
                for index in range(len(self.batches)):
                    rows_f = (
                        self.fp32[name][index][1]
                        if self.twin is None
                        else self.arrived[(True, index)][1]
                    )
                    moments.add(rows_f, self.arrived[(False, index)][1])
                self.arrived = {}
                module = self.modules[name]
                asked = widths(name, plan[name]) if widths is not None else (plan[name],)
                fitted.update(_fit(module, moments, name, asked, fp32_choices, target))
                installed.enter_context(quantized_layer(module, fitted[(name, plan[name])]))
                done[0] += 1
                if on_layer is not None:
                    on_layer(done[0], len(self.order))

            # As a layer-by-layer pass has them: the layers it does not refit (tied weights,
            # float16) at their choices throughout.
            others = {name: fitted[(name, b)] for name, b in plan.items() if name not in self.order}
            installed.enter_context(quantized_layers(self.model.module, others))
            # Then the activation quantizers (on the model, not its FP32 twin), whose input
            # transforms run before the hooks below read a layer's input.
            if context is not None:
                installed.enter_context(context())
            self.transform = current_transform()
            barrier = threading.Barrier(len(passes), action=fit_next)
            networks = [self.modules]
            if self.twin is not None:
                networks.append(dict(self.twin.module.named_modules()))
            handles = [
                modules[name].register_forward_pre_hook(self._arrive(name, barrier))
                for modules in networks
                for name in self.order
            ]
            try:
                threads = [
                    threading.Thread(target=self._forward, args=(twin, index, barrier))
                    for twin, index in passes
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
            finally:
                for handle in handles:
                    handle.remove()
        parted = (threading.BrokenBarrierError, _Parted)
        errors = [error for error in self.failures if not isinstance(error, parted)]
        if errors:
            raise errors[0]
        return None if self.failures or done[0] != len(self.order) else fitted

    def _arrive(self, name: str, barrier: threading.Barrier) -> Callable[..., None]:
        """The pre-hook that stops this thread's pass at `name` (its first call) until every
        pass is there and the layer is fitted."""
        padding = self.by_name[name].padding

        def hook(module: nn.Module, args: tuple) -> None:
            seen = getattr(self.thread, "seen", None)
            if seen is None or name in seen:
                return  # a later call of the layer, or a pass outside the lockstep
            seen.add(name)
            x = args[0].detach()
            key = (self.thread.twin, self.thread.index)
            # The FP32 pass's own positions: `_pick` depends on the shape and batch alone.
            pick = _pick(module, x, padding, key[1])
            self.arrived[key] = (name, unfold.rows(module, x, padding, pick))
            barrier.wait()

        return hook

    def _forward(self, twin: bool, index: int, barrier: threading.Barrier) -> None:
        """One batch's pass, on the FP32 twin or the model being quantized; a pass that ends
        without meeting every layer breaks the barrier (the others would wait forever)."""
        self.thread.twin, self.thread.index, self.thread.seen = twin, index, set()
        model = self.twin if twin and self.twin is not None else self.model
        try:
            with torch.no_grad(), transform_in_thread(None if twin else self.transform):
                model(self.batches[index])
            if len(self.thread.seen) != len(self.order):
                raise _Parted("a batch skipped a layer")
        except BaseException as error:  # the caller raises it, or falls back when parted
            self.failures.append(error)
            barrier.abort()


def _moments(
    model: LoadedModel,
    batches: Sequence[Inputs],
    module: nn.Module,
    padding: str,
    fp32: Sequence[tuple[Tensor | None, Tensor]],
    fitted: Choices,
    plan: Mapping[str, int],
    modules: Mapping[str, nn.Module],
    context: Callable[[], AbstractContextManager[object]] | None,
) -> _Moments:
    """The layer's input moments over `batches`: the FP32 network's sampled rows `fp32` (pick,
    rows) beside the quantized network's at the same positions. Earlier layers are at their
    fitted plan choices; later ones never run (the pass stops at the layer)."""
    moments = _Moments()
    earlier = {name: fitted[(name, b)] for name, b in plan.items() if modules[name] is not module}
    with ExitStack() as stack:
        stack.enter_context(quantized_layers(model.module, earlier))
        if context is not None:
            stack.enter_context(context())
        for inputs, (pick, rows_f) in zip(batches, fp32, strict=True):
            moments.add(rows_f, unfold.rows(module, _capture(model, inputs, module), padding, pick))
    return moments


TWIN_MAX_BYTES = 2 << 30
"""The largest model copied for an FP32 twin (`_Lockstep`, when the FP32 rows do not fit in
`FP32_ROWS_BYTES`); a larger one is fitted layer by layer, a second partial pass per layer, in
the memory it already has."""


def _weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


FP32_ROWS_BYTES = 1 << 30
"""Sampled FP32 input rows of every layer are kept from one pass when they fit in this much
memory (most CNNs and small transformers); above it each layer's are recomputed in its own
partial pass, which costs a second forward per layer."""


def _fp32_rows(
    model: LoadedModel,
    batches: Sequence[Inputs],
    layers: Sequence[Layer],
    modules: Mapping[str, nn.Module],
) -> dict[str, list[tuple[Tensor | None, Tensor]]]:
    """Every layer's sampled FP32 input rows per batch, from one full pass per batch; empty
    when they would not fit in `FP32_ROWS_BYTES`."""
    kept: dict[str, list[tuple[Tensor | None, Tensor]]] = {layer.name: [] for layer in layers}
    index = [0]

    def hook_for(layer: Layer):
        def hook(module: nn.Module, args: tuple) -> None:
            if len(kept[layer.name]) == index[0]:
                kept[layer.name].append(_sampled(module, args[0].detach(), layer.padding, index[0]))

        return hook

    handles = [modules[layer.name].register_forward_pre_hook(hook_for(layer)) for layer in layers]
    try:
        with torch.no_grad():
            for position, inputs in enumerate(batches):
                index[0] = position
                model(inputs)
                used = sum(
                    rows.numel() * rows.element_size() for r in kept.values() for _, rows in r
                )
                if position == 0 and used * len(batches) > FP32_ROWS_BYTES:
                    return {}
    finally:
        for handle in handles:
            handle.remove()
    return kept


def _sampled(
    module: nn.Module, x: Tensor, padding: str, index: int
) -> tuple[Tensor | None, Tensor]:
    """The positions sampled from batch `index` (the same on both networks, None for all) and
    the rows there."""
    pick = _pick(module, x, padding, index)
    return pick, unfold.rows(module, x, padding, pick)


def _pick(module: nn.Module, x: Tensor, padding: str, index: int) -> Tensor | None:
    """The positions sampled from batch `index` (the same on both networks), None for all."""
    total = unfold.positions(module, x, padding)
    if total <= ROWS_PER_BATCH:
        return None
    # Drawn on the CPU, whatever the device: the same rows on every machine.
    generator = torch.Generator().manual_seed(index)
    return torch.randperm(total, generator=generator, device="cpu")[:ROWS_PER_BATCH]


def _capture(model: LoadedModel, inputs: Inputs, module: nn.Module) -> Tensor:
    """The input `module` receives on its first call when the model runs on `inputs`."""
    seen: list[Tensor] = []

    def hook(_m: nn.Module, args: tuple) -> None:
        seen.append(args[0].detach())
        raise _Captured

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(inputs)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError("the layer did not run on the calibration batch")
    return seen[0]


def _fit(
    module: nn.Module,
    moments: _Moments,
    name: str,
    widths: Sequence[int],
    fp32_choices: Choices,
    target: str,
) -> dict[tuple[str, int], QuantChoice]:
    """The layer's choice at each of `widths`, fitted to `moments`."""
    weight = module.weight.detach()
    groups = unfold.groups(module)
    cqq, cfq, mq, mf = moments.centred()
    grouped = unfold.grouped_weight(weight.double(), groups)  # (groups, out/group, width)
    goal = grouped if target == "quantized" else grouped @ cfq @ _damped_inverse(cqq)
    goal_weight = goal.reshape(weight.shape[0], -1).reshape(weight.shape).float()
    factor = hessian_factor(cqq.float())
    signal = max(float(((grouped @ cqq) * grouped).sum()), 1e-30)
    fitted = {}
    usable = [b for b in widths if b < 16 and (name, b) in fp32_choices]
    grids = [quantize_weight(goal_weight, b, fp32_choices[(name, b)].clip) for b in usable]
    rounded = gptq_quantize(goal_weight, factor, grids)
    for b, grid, gptq in zip(usable, grids, rounded, strict=True):
        rule = fp32_choices[(name, b)]
        quantized = gptq.quantized if rule.rounding == "gptq" else grid
        dequantized = unfold.grouped_weight(quantized.dequantize().double(), groups)
        error = dequantized - goal
        per_channel = ((error @ cqq) * error).sum(-1).reshape(-1)
        # The bias that restores each output channel's FP32 mean on the quantized inputs.
        correction = (grouped @ mf[:, :, None] - dequantized @ mq[:, :, None]).reshape(-1)
        fitted[(name, b)] = QuantChoice(
            clip=rule.clip,
            rounding=rule.rounding,
            quantized=quantized,
            output_error=float(per_channel.sum()) / signal,
            channel_error=per_channel.float(),
            weight_error=quantized.dequantize() - weight,
            bias_correction=correction.float(),
        )
    return fitted


def _damped_inverse(covariance: Tensor) -> Tensor:
    """(C + d * mean(diag C) * I)^-1 per group: the least-squares fit stays bounded where few
    rows span a direction (the same dampening GPTQ uses)."""
    eye = torch.eye(covariance.shape[-1], dtype=covariance.dtype, device=covariance.device)
    base = covariance.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)
    damped = covariance + (DAMPENING * base)[:, None, None] * eye
    # Cholesky, not `linalg.inv`: the damped moment is positive definite, and MKL's batched LU
    # once returned invalid pivots on such a batch in CI ("Pivots given to lu_solve ...").
    lower, info = torch.linalg.cholesky_ex(damped)
    inverse = torch.cholesky_inverse(lower)
    failed = info != 0
    if failed.any():
        inverse[failed] = torch.linalg.pinv(damped[failed], hermitian=True)
    return inverse
