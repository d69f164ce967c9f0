"""Properties of the per-channel weight quantizer that the cost table and packing rely on."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from allocator.errors import UnknownMethod
from allocator.quant.gptq import DAMPENING, gptq_quantize, hessian_factor
from allocator.quant.weight import (
    CLIP_RULES,
    SUPPORTED_BITS,
    QuantizedWeight,
    fake_quantize,
    quantize_weight,
)

INT_BITS = [b for b in SUPPORTED_BITS if b < 16]


def _weight(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _channel_mse(w: torch.Tensor, bits: int, clip: str) -> torch.Tensor:
    err = fake_quantize(w, bits, clip) - w
    return err.square().reshape(w.shape[0], -1).mean(dim=1)


@pytest.mark.parametrize("clip", sorted(CLIP_RULES))
@pytest.mark.parametrize("bits", INT_BITS)
def test_codes_in_range_and_scale_is_float16_per_channel(bits: int, clip: str) -> None:
    w = _weight(8, 3, 3, 3)
    q = quantize_weight(w, bits, clip)
    assert q.codes.dtype == torch.int8
    assert q.codes.shape == w.shape
    assert int(q.codes.min()) >= -(2 ** (bits - 1))
    assert int(q.codes.max()) <= 2 ** (bits - 1) - 1
    assert q.scale is not None
    assert q.scale.dtype == torch.float16
    assert q.scale.shape == (8,)


@pytest.mark.parametrize("clip", sorted(CLIP_RULES))
def test_dequantize_uses_only_codes_and_float16_scale(clip: str) -> None:
    w = _weight(16, 32)
    q = quantize_weight(w, 4, clip)
    rebuilt = q.codes.float() * q.scale.float()[:, None]
    deq = q.dequantize()
    assert deq.dtype == torch.float32
    assert torch.equal(deq, rebuilt)
    assert torch.equal(fake_quantize(w, 4, clip), deq)


@pytest.mark.parametrize("clip", sorted(CLIP_RULES))
def test_error_decreases_with_bits(clip: str) -> None:
    w = _weight(32, 64)
    errors = [float(_channel_mse(w, bits, clip).mean()) for bits in INT_BITS]
    assert all(a > b for a, b in pairwise(errors))


def test_max_clip_rounds_to_nearest() -> None:
    w = _weight(32, 64)
    q = quantize_weight(w, 3, "max")
    half_step = q.scale.float()[:, None] / 2
    assert bool(((q.dequantize() - w).abs() <= half_step * (1 + 1e-5)).all())


@pytest.mark.parametrize("bits", INT_BITS)
def test_mse_clip_never_worse_than_max_per_channel(bits: int) -> None:
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((64, 128))
    assert bool((_channel_mse(w, bits, "mse") <= _channel_mse(w, bits, "max") * (1 + 1e-6)).all())


def test_mse_clip_helps_heavy_tailed_weights() -> None:
    torch.manual_seed(0)
    w = torch.distributions.StudentT(2.0).sample((64, 256))
    assert float(_channel_mse(w, 3, "mse").mean()) < 0.9 * float(_channel_mse(w, 3, "max").mean())


@pytest.mark.parametrize("clip", sorted(CLIP_RULES))
def test_channels_are_quantized_independently(clip: str) -> None:
    w = _weight(6, 40)
    changed = w.clone()
    changed[2] *= 50.0
    a, b = quantize_weight(w, 4, clip), quantize_weight(changed, 4, clip)
    keep = [0, 1, 3, 4, 5]
    assert torch.equal(a.codes[keep], b.codes[keep])
    assert torch.equal(a.scale[keep], b.scale[keep])
    assert not torch.equal(a.scale[2], b.scale[2])


@pytest.mark.parametrize("clip", sorted(CLIP_RULES))
@pytest.mark.parametrize("bits", INT_BITS)
def test_zero_and_tiny_channels_stay_finite(bits: int, clip: str) -> None:
    w = _weight(4, 10)
    w[1] = 0.0
    w[3] = 1e-12
    q = quantize_weight(w, bits, clip)
    deq = q.dequantize()
    assert bool(torch.isfinite(deq).all())
    assert bool(torch.isfinite(q.scale.float()).all())
    assert float(q.scale[1]) == 0.0
    assert bool((deq[1] == 0).all())
    assert float(q.scale[3]) > 0.0


def test_sixteen_bits_keeps_float16_weight() -> None:
    w = _weight(5, 7, 3, 3)
    q = quantize_weight(w, 16)
    assert q.scale is None
    assert q.codes.dtype == torch.float16
    assert torch.equal(q.dequantize(), w.half().float())
    assert torch.equal(fake_quantize(w, 16, "mse"), w.half().float())


def test_unknown_clip_lists_known_rules() -> None:
    with pytest.raises(UnknownMethod, match=r"\['max', 'mse'\]"):
        quantize_weight(_weight(2, 2), 4, "percentile")


@pytest.mark.parametrize("bits", [1, 7, 32])
def test_unsupported_bits_rejected(bits: int) -> None:
    with pytest.raises(ValueError, match="weight bits"):
        quantize_weight(_weight(2, 2), bits)


def test_mse_search_in_blocks_matches_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    w = _weight(37, 50)
    whole = quantize_weight(w, 3, "mse")
    monkeypatch.setattr("allocator.quant.weight.MSE_BLOCK_ELEMENTS", 200)
    blocked = quantize_weight(w, 3, "mse")
    assert torch.equal(whole.codes, blocked.codes)
    assert torch.equal(whole.scale, blocked.scale)


# --- GPTQ (allocator.quant.gptq) -----------------------------------------------------------------


def _output_error(delta: torch.Tensor, moment: torch.Tensor) -> float:
    flat = delta.reshape(delta.shape[0], -1)
    return float(((flat @ moment) * flat).sum())


def test_gptq_batches_grids_without_mixing_them_and_beats_nearest() -> None:
    w = _weight(6, 4, 3, 3)
    x = _weight(400, 36, seed=1) @ _weight(36, 36, seed=2)  # correlated inputs
    moment = x.T @ x / len(x)
    factor = hessian_factor(moment[None])
    grids = [quantize_weight(w, b, c) for b in (2, 3, 16) for c in sorted(CLIP_RULES)]
    together = gptq_quantize(w, factor, grids)
    for grid, batched in zip(grids, together, strict=True):
        (alone,) = gptq_quantize(w, factor, [grid])
        assert torch.equal(batched.quantized.codes, alone.quantized.codes)
        assert batched.quantized.scale is grid.scale and batched.quantized.bits == grid.bits
        if grid.bits < 16:
            gptq = _output_error(batched.quantized.dequantize() - w, moment)
            assert gptq < _output_error(grid.dequantize() - w, moment)
            # The loop's own error is the undampened output error, per output channel.
            assert batched.channel_error is not None
            assert float(batched.channel_error.sum()) == pytest.approx(gptq, rel=1e-5)
        else:
            assert batched.channel_error is None


def _textbook_gptq(w: torch.Tensor, moment: torch.Tensor, grid: QuantizedWeight) -> torch.Tensor:
    """GPTQ as its paper writes it (act order, upper Cholesky factor of the dampened inverse,
    one column at a time), for a dense layer: the codes the LDL form must reproduce."""
    hessian = moment.double().clone()
    order = torch.argsort(hessian.diagonal(), descending=True)
    hessian = hessian[order][:, order]
    hessian += DAMPENING * hessian.diagonal().mean() * torch.eye(len(hessian), dtype=torch.float64)
    inverse = torch.linalg.cholesky(
        torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True
    )
    weight = w.double()[:, order].clone()
    scale = grid.scale.double()[:, None]  # type: ignore[union-attr]
    qmax = 2 ** (grid.bits - 1) - 1
    codes = torch.empty_like(weight)
    for i in range(weight.shape[1]):
        codes[:, i] = torch.clamp(torch.round(weight[:, i : i + 1] / scale), -qmax - 1, qmax)[:, 0]
        error = (weight[:, i] - codes[:, i] * scale[:, 0]) / inverse[i, i]
        weight[:, i:] -= error[:, None] * inverse[i, i:][None, :]
    restored = torch.empty_like(codes)
    restored[:, order] = codes
    return restored.to(torch.int8)


def test_gptq_ldl_form_gives_the_codes_of_textbook_gptq() -> None:
    """The LDL form (one Cholesky of C, errors for free) is GPTQ, not an approximation of it."""
    w = _weight(16, 40)
    x = _weight(300, 40, seed=3) @ _weight(40, 40, seed=4)
    moment = x.T @ x / len(x)
    factor = hessian_factor(moment[None])
    for bits in (2, 3, 4):
        grid = quantize_weight(w, bits, "mse")
        (rounded,) = gptq_quantize(w, factor, [grid])
        assert torch.equal(rounded.quantized.codes, _textbook_gptq(w, moment, grid))


def test_gptq_dampens_more_where_a_covariance_is_not_positive_definite() -> None:
    """A covariance E[xx^T] - mm^T computed in float32 can come out slightly indefinite; the
    group is retried with more dampening instead of failing the job."""
    indefinite = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(indefinite.double() + 0.01 * torch.eye(2, dtype=torch.float64))
    factor = hessian_factor(torch.stack([indefinite, torch.eye(2)]))
    assert torch.isfinite(factor.feedback).all() and torch.isfinite(factor.pivots).all()
    assert factor.dampening[0] > factor.dampening[1]
    w = _weight(4, 2)
    (rounded,) = gptq_quantize(w, factor, [quantize_weight(w, 3)])
    assert rounded.quantized.codes.shape == w.shape
