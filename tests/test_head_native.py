"""The native dense GEMV of the lm_head (head_native.py) against its fp64 reference, and where the model uses it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitnet_a48 import create_model
from bitnet_a48.head_native import MAX_NATIVE_HEAD_ROWS, dense_linear_torch, head_logits, native_head_applies
from bitnet_a48.kernels_cpu_native import dense_linear_native, native_available

pytestmark = pytest.mark.skipif(not native_available(), reason="needs the native kernels (a C++ compiler)")

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}


def assert_within_dot_error(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """|y - x·w| <= gamma_K · Σ|x_k w_k| (fp32 sums in any order) + the rounding of the result to y's dtype."""
    k = x.shape[1]
    gamma = k * 2.0**-24 / (1 - k * 2.0**-24)
    exact = x.double() @ w.double().T
    bound = gamma * (x.double().abs() @ w.double().abs().T)
    bound = bound + (exact.abs() + bound) * UNIT_ROUNDOFF[y.dtype]
    error = (y.double() - exact).abs()
    assert (error <= bound).all(), f"largest error {error.max().item():.3g} over the bound"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m, k, n", [(1, 2560, 257), (2, 67, 130), (7, 1, 5), (16, 100, 33), (3, 16, 64)])
def test_dense_linear_within_the_dot_product_error(isa: str, dtype: torch.dtype, m: int, k: int, n: int) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + k)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    y = dense_linear_native(x, w)
    assert y.dtype == dtype and y.shape == (m, n)
    assert_within_dot_error(y, x, w)
    # the reference is that exact sum, rounded once
    assert_within_dot_error(dense_linear_torch(x, w), x, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_does_not_depend_on_the_batch_or_the_threads(isa: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(MAX_NATIVE_HEAD_ROWS, 333, generator=gen).to(dtype)
    w = torch.randn(1000, 333, generator=gen).to(dtype)
    together = dense_linear_native(x, w)
    alone = torch.cat([dense_linear_native(x[i : i + 1], w) for i in range(x.shape[0])])
    assert torch.equal(together, alone)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(dense_linear_native(x, w), together)
    finally:
        torch.set_num_threads(threads)


def test_dense_linear_refuses_bad_inputs() -> None:
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="one dtype"):
        dense_linear_native(x, w.to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        dense_linear_native(x.half(), w.half())
    with pytest.raises(RuntimeError, match=r"x \[M, K\] and weight \[N, K\]"):
        dense_linear_native(x, torch.randn(4, 9))


def test_head_logits_takes_the_gemv_only_where_it_applies() -> None:
    head = nn.Linear(32, 50, bias=False)
    few, many = torch.randn(3, 1, 32), torch.randn(MAX_NATIVE_HEAD_ROWS + 1, 1, 32)
    with torch.no_grad():
        assert native_head_applies(head, few)
        assert not native_head_applies(head, many)  # prefill / training rows: F.linear
        assert not native_head_applies(head, few.half())  # another dtype than the weight
        assert not native_head_applies(nn.Linear(32, 50), few)  # a bias
        out = head_logits(head, few)
        assert out.shape == (3, 1, 50)
        assert_within_dot_error(out.view(3, 50), few.view(3, 32), head.weight)
        assert torch.equal(head_logits(head, many), head(many))
    assert not native_head_applies(head, few)  # gradients wanted: the module (autograd)
    calls = []
    handle = head.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    with torch.no_grad():
        head_logits(head, few)
    handle.remove()
    assert calls == [(3, 1, 50)]  # a hooked head is called as a module


def test_the_model_forward_and_generate_use_the_gemv() -> None:
    torch.manual_seed(0)
    model = create_model(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=300, max_position_embeddings=128,
    ).eval()  # fmt: skip
    ids = torch.randint(3, 300, (2, 5))
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state  # (2, 5, 64): 10 rows
        logits = model(input_ids=ids).logits
        assert_within_dot_error(logits.reshape(10, 300), hidden.reshape(10, 64), model.lm_head.weight)
        with torch.profiler.profile() as prof:
            model.generate(ids, max_new_tokens=3, do_sample=False)
    calls = [e for e in prof.events() if e.name == "bitnet_a48_native::dense_linear"]
    assert len(calls) == 3  # the prefill's last position and two decode steps
