"""``few_row_linear`` against ``F.linear``, and the context manager that installs it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cpd_mtp.ops.few_rows import FEW_ROWS, few_row_linear, few_row_linears


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    d_in=st.integers(1, 40),
    d_out=st.integers(1, 40),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_few_row_linear_is_f_linear_within_its_own_rounding(lead, d_in, d_out, bias, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d_in, generator=gen).to(dtype)
    weight = torch.randn(d_out, d_in, generator=gen).to(dtype)
    b = torch.randn(d_out, generator=gen).to(dtype) if bias else None
    got = few_row_linear(x, weight, b)
    plain = nn.functional.linear(x, weight, b)
    assert got.shape == plain.shape and got.dtype == plain.dtype
    exact = nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
    # Both round the same exact value; the few-row layout may round differently, but its error
    # is of the size of F.linear's own (two roundings of the output's magnitude, at most).
    scale = (x.double().abs() @ weight.double().abs().T) + (0 if b is None else b.double().abs())
    eps = torch.finfo(dtype).eps
    tol = 4 * eps * scale + 1e-300
    assert ((got.double() - exact).abs() <= tol + (plain.double() - exact).abs()).all()


def test_many_rows_take_the_plain_kernel_bit_for_bit():
    x, weight = torch.randn(FEW_ROWS + 1, 8), torch.randn(5, 8)
    assert torch.equal(few_row_linear(x, weight), nn.functional.linear(x, weight))


def test_the_context_patches_only_its_model_and_restores_it_even_on_error():
    torch.manual_seed(0)
    model, other = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 3)), nn.Linear(6, 7)
    x = torch.randn(4, 6)
    expected = model(x)
    calls = []
    model[0].register_forward_hook(lambda *_: calls.append(1))
    with pytest.raises(RuntimeError, match="inside"), few_row_linears(model):
        assert all("forward" in vars(m) for m in (model[0], model[2]))
        assert "forward" not in vars(other)
        torch.testing.assert_close(model(x), expected)
        raise RuntimeError("inside")
    assert calls == [1], "hooks still run on the patched modules"
    assert not any("forward" in vars(m) for m in model.modules())
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize("rows", [1, 2, 5, 9, 15, 17, 33, 64])
def test_padded_row_counts_give_f_linear_for_every_row(rows):
    from cpd_mtp.ops.few_rows import padded_rows

    assert padded_rows(rows) >= rows and (rows == 1 or rows <= 8 or padded_rows(rows) % 8 == 0)
    x, weight = torch.randn(rows, 24, dtype=torch.float64), torch.randn(7, 24, dtype=torch.float64)
    torch.testing.assert_close(few_row_linear(x, weight), nn.functional.linear(x, weight))
    x.requires_grad_()
    few_row_linear(x, weight).sum().backward()  # autograd passes the padding
    torch.testing.assert_close(x.grad, weight.sum(0).expand(rows, -1))


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 64),
    d_in=st.integers(1, 48),
    d_out=st.integers(1, 48),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_the_packed_kernel_of_a_parameter_is_f_linear_within_its_own_rounding(
    rows, d_in, d_out, bias, dtype, seed
):
    from cpd_mtp.ops import few_rows

    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(d_in, d_out, bias=bias).to(dtype)
    x = torch.randn(rows, d_in, generator=gen).to(dtype)
    with torch.no_grad():
        got = few_row_linear(x, layer.weight, layer.bias)
        plain = layer(x)
        exact = nn.functional.linear(
            x.double(), layer.weight.double(), None if bias is False else layer.bias.double()
        )
    if few_rows._ONEDNN[0]:
        assert hasattr(layer.weight, "_cpd_mtp_packed")  # the packed path ran
    scale = x.double().abs() @ layer.weight.double().abs().T
    if bias:
        scale = scale + layer.bias.double().abs()
    tol = 4 * torch.finfo(dtype).eps * scale + 1e-300
    assert ((got.double() - exact).abs() <= tol + (plain.double() - exact).abs()).all()


def test_a_changed_weight_is_packed_again():
    layer = nn.Linear(8, 5, bias=False)
    x = torch.randn(3, 8)
    with torch.no_grad():
        first = few_row_linear(x, layer.weight)
        layer.weight.mul_(2.0)  # in place: a new version of the same tensor
        second = few_row_linear(x, layer.weight)
    torch.testing.assert_close(second, 2 * first)
    x.requires_grad_()
    few_row_linear(x, layer.weight).sum().backward()  # autograd takes the plain path
    torch.testing.assert_close(x.grad, layer.weight.detach().sum(0).expand(3, -1))
