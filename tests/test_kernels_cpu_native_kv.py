"""Native attention kernels of a decode step (RoPE, attention over the packed KV store, its append) against their
torch references, on every ISA path this machine runs (forced narrower)."""

import pytest
import torch
from conftest import runnable_isas

from bitnet_a48 import kernels_cpu_native as kn
from bitnet_a48.cache_bitnet_a48 import BitNetA48QuantizedLayer
from bitnet_a48.modeling_bitnet_a48 import apply_rotary_pos_emb

kn.load_native()
RUNNABLE_ISAS = runnable_isas()
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROW_TENSORS = ("k_packed", "v_packed", "k_scale", "v_scale", "k_window", "v_window")
SINK_TENSORS = ("k_sink", "v_sink", "k_sink_scale", "v_sink_scale", "sink_pos")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "cos_rows", "seq", "head_dim"), [(1, 1, 1, 128), (3, 3, 1, 64), (2, 1, 5, 8),
                                                                    (2, 2, 7, 32)])  # fmt: skip
def test_rope_equals_reference(dtype: torch.dtype, batch: int, cos_rows: int, seq: int, head_dim: int) -> None:
    g = torch.Generator().manual_seed(seq)
    q = (torch.randn(batch, 4, seq, head_dim, generator=g) * 3).to(dtype)
    k = (torch.randn(batch, 2, seq, head_dim, generator=g) * 3).to(dtype)
    angles = torch.rand(cos_rows, seq, head_dim, generator=g) * 100
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k = kn.rope_native(q, k, cos, sin)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


def test_rope_rejects_mismatched_tables() -> None:
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 1, 16)
    with pytest.raises(RuntimeError, match="rope tables"):
        kn.rope_native(q, k, torch.randn(1, 1, 8), torch.randn(1, 1, 8))
    with pytest.raises(RuntimeError, match="dtype"):
        kn.rope_native(q, k, torch.randn(1, 1, 16).bfloat16(), torch.randn(1, 1, 16).bfloat16())


def _positions(batch: int, length: int, start: int = 0) -> torch.Tensor:
    """(batch, length) positions; row r is left-padded by 2r tokens (position 0 repeated, as generate() does)."""
    return torch.stack([(torch.arange(length) + start - 2 * r).clamp(min=0) for r in range(batch)])


def _assert_same_store(native: BitNetA48QuantizedLayer, reference: BitNetA48QuantizedLayer) -> None:
    assert (native.n_quant, native.cumulative_length) == (reference.n_quant, reference.cumulative_length)
    names = ROW_TENSORS + (SINK_TENSORS if reference.sink_bits is not None else ())
    for name in names:
        got, want = getattr(native, name), getattr(reference, name)
        if name in ("k_packed", "v_packed", "k_scale", "v_scale"):  # capacity may differ: compare the stored slots
            got, want = got[:, :, : reference.n_quant], want[:, :, : reference.n_quant]
        assert torch.equal(got, want), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("bits", "window", "first_token_bits"), [(3, 4, 4), (3, 0, 4), (2, 16, 4), (4, 3, 8),
                                                                  (8, 2, None), (3, 5, None)])  # fmt: skip
@pytest.mark.parametrize("with_positions", [True, False])
def test_native_append_equals_torch_append(
    dtype: torch.dtype, bits: int, window: int, first_token_bits: int | None, with_positions: bool
) -> None:
    g = torch.Generator().manual_seed(bits * 10 + window)
    batch, heads, head_dim, prefill = 3, 2, 16, 3
    native, reference = (
        BitNetA48QuantizedLayer(bits=bits, window=window, first_token_bits=first_token_bits, block_size=4, impl=impl)
        for impl in ("auto", "torch")
    )

    def step(length: int, start: int) -> None:
        keys = (torch.randn(batch, heads, length, head_dim, generator=g) * 2).to(dtype)
        values = (torch.randn(batch, heads, length, head_dim, generator=g) * 2).to(dtype)
        positions = _positions(batch, length, start) if with_positions else None
        if length == 1 and positions is not None and start == 9:
            positions[2] = 0  # row 2's first token arrives in decode (a row whose prompt had no position 0 yet)
        takes_native = native._native_append(keys, values, positions) if native.is_initialized else False
        native.append(keys, values, positions)
        reference.append(keys, values, positions)
        if length == 1 and native.k_window.shape[2] == window and start > prefill + window:
            assert takes_native, "a decode step into a full window should take the native append"
        _assert_same_store(native, reference)

    prompt_positions = _positions(batch, prefill) if with_positions else None
    if prompt_positions is not None:
        prompt_positions[2] += 1  # row 2: no position 0 in its prompt (its first token comes in decode)
    keys = (torch.randn(batch, heads, prefill, head_dim, generator=g) * 2).to(dtype)
    values = (torch.randn(batch, heads, prefill, head_dim, generator=g) * 2).to(dtype)
    for layer in (native, reference):
        layer.append(keys, values, prompt_positions)
    for start in range(prefill, prefill + 24):  # past the window: the first tokens leave it in decode
        step(1, start)
    assert reference.n_quant > 0
    if first_token_bits is not None:
        assert bool((reference.sink_pos >= 0).all())


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize(("bits", "head_dim", "groups"), [(3, 128, 4), (2, 24, 1), (4, 8, 2), (8, 40, 3)])
def test_decode_attention_equals_blockwise_reference_at_length(
    isa: str, dtype: torch.dtype, bits: int, head_dim: int, groups: int
) -> None:
    g = torch.Generator().manual_seed(bits + head_dim)
    batch, heads, prefill, steps = 2, 2, 300, 3
    native, reference = (BitNetA48QuantizedLayer(bits=bits, window=16, impl=impl) for impl in ("auto", "torch"))
    keys = torch.randn(batch, heads, prefill, head_dim, generator=g).to(dtype)
    values = torch.randn(batch, heads, prefill, head_dim, generator=g).to(dtype)
    positions = _positions(batch, prefill)
    for layer in (native, reference):
        layer.append(keys, values, positions)
    for t in range(steps):
        kv = prefill + t + 1
        mask = torch.ones(batch, 1, 1, kv, dtype=torch.bool)
        mask[1, ..., :2] = False  # row 1 is left-padded
        mask[0, ..., 5 : 5 + 17 * (t + 1)] = False  # and a masked run inside the store
        query = (torch.randn(batch, heads * groups, 1, head_dim, generator=g) * 2).to(dtype)
        k_new = torch.randn(batch, heads, 1, head_dim, generator=g).to(dtype)
        v_new = torch.randn(batch, heads, 1, head_dim, generator=g).to(dtype)
        pos = positions[:, -1:] + t + 1
        assert native.native_decode(query)
        got = native.attend(query, k_new, v_new, mask, head_dim**-0.5, pos)
        want = reference.attend(query, k_new, v_new, mask, head_dim**-0.5, pos)
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        # fp32: rounding only (FMA order, the polynomial exp). bf16: the blockwise path rounds scores to bf16.
        assert err < (1e-5 if dtype == torch.float32 else 2e-2), f"{isa}: relative difference {err:.2e}"
    _assert_same_store(native, reference)


def test_decode_attention_paths_agree_on_a_fully_masked_row() -> None:
    g = torch.Generator().manual_seed(0)
    layer = BitNetA48QuantizedLayer(bits=3, window=4)
    layer.append(torch.randn(1, 1, 40, 16, generator=g), torch.randn(1, 1, 40, 16, generator=g))
    query = torch.randn(1, 2, 1, 16, generator=g)
    bias = torch.full((1, 41), -torch.inf)
    outs = []
    for path in RUNNABLE_ISAS:
        kn.set_cpu_isa(path)
        outs.append(kn.kv_decode_attention_native(query, layer, torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16),
                                                  bias, 0.25))  # fmt: skip
    kn.set_cpu_isa(RUNNABLE_ISAS[-1])
    for out in outs:
        assert torch.equal(out, torch.zeros_like(out))  # every weight 0: no NaN from exp(-inf - -inf)


@pytest.mark.parametrize("threads", [2, 3])
def test_decode_attention_split_over_threads_equals_reference(isa: str, threads: int) -> None:
    """Batch 1 with few KV heads: the store is split into chunks across threads and the partials merged."""
    g = torch.Generator().manual_seed(threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        native, reference = (BitNetA48QuantizedLayer(bits=3, window=16, impl=impl) for impl in ("auto", "torch"))
        keys, values = torch.randn(1, 2, 1500, 32, generator=g), torch.randn(1, 2, 1500, 32, generator=g)
        for layer in (native, reference):
            layer.append(keys, values, _positions(1, 1500))
        mask = torch.ones(1, 1, 1, 1501, dtype=torch.bool)
        mask[..., 700:1300] = False  # one chunk almost all masked
        query = torch.randn(1, 8, 1, 32, generator=g)
        k_new, v_new = torch.randn(1, 2, 1, 32, generator=g), torch.randn(1, 2, 1, 32, generator=g)
        got = native.attend(query, k_new, v_new, mask, 32**-0.5, torch.tensor([[1500]]))
        want = reference.attend(query, k_new, v_new, mask, 32**-0.5, torch.tensor([[1500]]))
    finally:
        torch.set_num_threads(before)
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-5, f"{isa}, {threads} threads: relative difference {err:.2e}"


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_decode_attention_of_a_left_padded_row_equals_the_row_alone(isa: str, dtype: torch.dtype) -> None:
    """Padding in front of a row (masked, so exact zeros in the softmax) leaves its output bit for bit as it is
    alone: what a server batching requests of different lengths relies on to match generate()."""
    g = torch.Generator().manual_seed(5)
    n, pad, heads, groups, head_dim = 301, 37, 2, 4, 64
    keys, values = (torch.randn(1, heads, n, head_dim, generator=g).to(dtype) for _ in range(2))
    alone, batched = (BitNetA48QuantizedLayer(bits=3, window=16) for _ in range(2))
    alone.append(keys, values, torch.arange(n).view(1, -1))
    junk = lambda: torch.randn(1, heads, pad, head_dim, generator=g).to(dtype)  # noqa: E731
    other_k, other_v = (torch.randn(1, heads, n + pad, head_dim, generator=g).to(dtype) for _ in range(2))
    positions = torch.stack([torch.arange(n + pad), (torch.arange(n + pad) - pad).clamp(min=0)])
    batched.append(torch.cat([other_k, torch.cat([junk(), keys], 2)]),
                   torch.cat([other_v, torch.cat([junk(), values], 2)]), positions)  # fmt: skip
    query = torch.randn(1, heads * groups, 1, head_dim, generator=g).to(dtype)
    k_new, v_new = (torch.randn(1, heads, 1, head_dim, generator=g).to(dtype) for _ in range(2))
    mask = torch.ones(2, 1, 1, n + pad + 1, dtype=torch.bool)
    mask[1, ..., :pad] = False
    want = alone.attend(query, k_new, v_new, None, head_dim**-0.5, torch.tensor([[n]]))
    got = batched.attend(torch.cat([query, query]), torch.cat([k_new, k_new]), torch.cat([v_new, v_new]), mask,
                         head_dim**-0.5, torch.tensor([[n + pad], [n]]))  # fmt: skip
    assert torch.equal(got[1:], want)
