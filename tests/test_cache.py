"""The quantised KV cache: storage, blockwise attention, batch operations on packed storage, generate() end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bitnet_a48.cache_argument import GENERATE_CACHE_KEY, output_cache
from bitnet_a48.cache_bitnet_a48 import (
    BitNetA48QuantizedCache,
    BitNetA48QuantizedLayer,
    fake_quantize_query,
    make_generation_cache,
)
from bitnet_a48.kernels_kv_cache import grid_mid

B, H, HQ, D = 3, 2, 4, 16


def reference_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """SDPA over explicit (dequantised) keys and values; (B, q, Hq, D)."""
    g = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(g, 1), values.repeat_interleave(g, 1)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2)


def causal_mask(past: int, q: int, pad: list[int], total: int | None = None) -> torch.Tensor:
    """Bool (B, 1, q, total) mask: causal over past + q keys, the first pad[b] keys of row b masked."""
    kv = past + q
    m = torch.ones(q, kv, dtype=torch.bool).tril(past)[None, None].repeat(len(pad), 1, 1, 1)
    for b, p in enumerate(pad):
        m[b, :, :, :p] = False
    out = torch.zeros(len(pad), 1, q, total or kv, dtype=torch.bool)
    out[..., :kv] = m
    return out


def fill(layer: BitNetA48QuantizedLayer, lengths: list[int], seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for q in lengths:
        layer.append(torch.randn(B, H, q, D, generator=g), torch.randn(B, H, q, D, generator=g))


# ------------------------------------------------------------------------------------------------ attention


@pytest.mark.parametrize(
    ("window", "max_cache_len", "bits"), [(0, None, 3), (4, None, 3), (4, None, 2), (3, None, 8), (0, 64, 3)]
)
@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
def test_attend_equals_attention_over_dequantised_past(
    window: int, max_cache_len: int | None, bits: int, mask_kind: str
) -> None:
    layer = BitNetA48QuantizedLayer(bits=bits, window=window, block_size=8, max_cache_len=max_cache_len)
    past = 0
    pad = [0, 3, 0] if mask_kind != "none" else [0, 0, 0]
    for q in [11, 1, 1, 6, 1, 9]:
        query, k, v = torch.randn(B, HQ, q, D), torch.randn(B, H, q, D), torch.randn(B, H, q, D)
        if past:
            pk, pv = layer.dequantize_all(torch.float32)
            keys, values = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        else:
            keys, values = k, v
        m = causal_mask(past, q, pad)
        full = causal_mask(past, q, pad, layer.get_mask_sizes(q)[0])
        if mask_kind == "float":
            full = torch.zeros(full.shape).masked_fill(~full, torch.finfo(torch.float32).min)
        out = layer.attend(query, k, v, None if mask_kind == "none" else full, 0.3)
        ref = reference_attention(query, keys, values, m, 0.3)  # None means causal, bottom-right aligned
        valid = m.any(-1).transpose(1, 2).unsqueeze(-1)  # (B, q, 1, 1): fully masked padding queries are undefined
        diff = ((out - ref) * valid).abs()
        assert diff.max() < 1e-5, f"max {diff.max():.2e} mean {diff.mean():.2e} at past={past}"
        past += q
        assert int(layer.get_seq_length()) == past


def test_update_returns_dequantised_past_and_new_tokens_in_full_precision() -> None:
    layer = BitNetA48QuantizedLayer(bits=3, window=2)
    fill(layer, [5])
    pk, pv = layer.dequantize_all()
    k, v = torch.randn(B, H, 2, D), torch.randn(B, H, 2, D)
    keys, values = layer.update(k, v)
    assert torch.equal(keys, torch.cat([pk, k], 2)) and torch.equal(values, torch.cat([pv, v], 2))
    assert layer.get_seq_length() == 7 and layer.get_mask_sizes(1) == (8, 0)


def test_window_keeps_recent_tokens_exact_and_older_ones_quantised_once() -> None:
    layer = BitNetA48QuantizedLayer(bits=3, window=4, first_token_bits=None)
    ks = torch.randn(B, H, 12, D)
    layer.append(ks[:, :, :6], ks[:, :, :6])
    snapshot = layer.k_packed[:, :, :2].clone()
    for t in range(6, 12):
        layer.append(ks[:, :, t : t + 1], ks[:, :, t : t + 1])
    assert layer.n_quant == 8 and layer.k_window.shape[2] == 4
    assert torch.equal(layer.k_window, ks[:, :, 8:])  # the window is exact
    assert torch.equal(layer.k_packed[:, :, :2], snapshot)  # quantised once, never rewritten
    deq, _ = layer.dequantize_all()
    step = layer.k_scale[:, :, :8].float().unsqueeze(-1)
    assert ((deq[:, :, :8] - ks[:, :, :8]).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("bits", "window", "lengths"), [(3, 16, [20, 1, 1]), (3, 0, [7, 1]), (4, 2, [5, 1]),
                                                         (2, 4, [1, 1, 1]), (8, 0, [9, 1])])  # fmt: skip
def test_native_decode_attention_equals_blockwise_reference(
    dtype: torch.dtype, bits: int, window: int, lengths: list[int]
) -> None:
    from bitnet_a48.kernels_cpu_native import load_native

    load_native()
    g = torch.Generator().manual_seed(7)
    native, reference = (BitNetA48QuantizedLayer(bits=bits, window=window, impl=impl) for impl in ("auto", "torch"))
    pos = torch.stack([(torch.arange(lengths[0]) - p).clamp(min=0) for p in (0, 2, 0)])  # row 1 left-padded by 2
    for t, q in enumerate(lengths):
        keys = torch.randn(B, H, q, D, generator=g).to(dtype)
        values = torch.randn(B, H, q, D, generator=g).to(dtype)
        query = torch.randn(B, HQ, q, D, generator=g).to(dtype)
        positions = pos if t == 0 else pos[:, -1:] + sum(lengths[1 : t + 1])
        kv = sum(lengths[: t + 1])
        mask = torch.ones(B, 1, q, kv, dtype=torch.bool).tril(kv - q)
        mask[1, ..., :2] = False
        if t == 0 or q > 1:  # prefill: both run the blockwise path
            for layer in (native, reference):
                layer.attend(query, keys, values, mask, 0.25, positions)
            continue
        assert native.native_decode(query) and not reference.native_decode(query)
        got = native.attend(query, keys, values, mask, 0.25, positions)
        want = reference.attend(query, keys, values, mask, 0.25, positions)
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        # fp32: rounding only. bf16: the blockwise path rounds scores and partial outputs to bf16, the kernel not.
        assert err < (1e-5 if dtype == torch.float32 else 2e-2), f"relative difference {err:.2e}"
    assert torch.equal(native.k_packed, reference.k_packed) and torch.equal(native.k_window, reference.k_window)
    if reference.sink_bits is not None:
        assert torch.equal(native.sink_pos, reference.sink_pos) and torch.equal(native.k_sink, reference.k_sink)


def test_peak_attention_block_is_bounded_by_block_size() -> None:
    layer = BitNetA48QuantizedLayer(bits=3, window=0, block_size=8, impl="torch")  # the blockwise torch path
    fill(layer, [40])
    seen: list[int] = []
    original = layer.centered_block

    def spy(start: int, length: int, *args: object) -> tuple[torch.Tensor, ...]:
        seen.append(length)
        return original(start, length, *args)

    layer.centered_block = spy  # type: ignore[method-assign]
    layer.attend(torch.randn(B, HQ, 1, D), torch.randn(B, H, 1, D), torch.randn(B, H, 1, D), None, 0.25)
    assert seen == [8, 8, 8, 8, 8]


# ------------------------------------------------------------------------------------------------ first token


@pytest.mark.parametrize("window", [0, 3])
def test_first_token_kept_at_4_bits_and_left_padding_equals_one_by_one(window: int) -> None:
    g = torch.Generator().manual_seed(1)
    lengths, total = [7, 4, 6], 7
    keys = torch.randn(B, H, total + 5, D, generator=g)
    batched = BitNetA48QuantizedLayer(bits=3, window=window)
    pos = torch.stack([(torch.arange(total) - (total - n)).clamp(min=0) for n in lengths])  # pads at 0, as generate
    batched.append(keys[:, :, :total], keys[:, :, :total], pos)
    for t in range(total, total + 5):
        batched.append(keys[:, :, t : t + 1], keys[:, :, t : t + 1], pos[:, -1:] + 1 + t - total)
    deq_b, _ = batched.dequantize_all()
    for b, n in enumerate(lengths):
        single = BitNetA48QuantizedLayer(bits=3, window=window)
        row = keys[b : b + 1, :, total - n :]
        single.append(row[:, :, :n], row[:, :, :n])
        for t in range(n, n + 5):
            single.append(row[:, :, t : t + 1], row[:, :, t : t + 1])
        deq_s, _ = single.dequantize_all()
        assert torch.equal(deq_b[b, :, total - n :], deq_s[0]), f"row {b}"
        # the first real token is at 4 bits: error within half a 4-bit step, finer than the 3-bit one
        first = row[0, :, 0]
        step4 = first.abs().amax(-1, keepdim=True) / grid_mid(4)
        assert ((deq_s[0, :, 0] - first).abs() <= step4 / 2 * 1.01).all()
    assert batched.sink_pos.tolist() == [total - n for n in lengths]


def test_no_first_token_store_at_4_bits_or_more() -> None:
    layer = BitNetA48QuantizedLayer(bits=4)
    fill(layer, [3])
    assert layer.k_sink is None and layer.sink_pos is None


# ------------------------------------------------------------------------------------------------ batch ops


def make_filled(window: int = 3) -> BitNetA48QuantizedLayer:
    layer = BitNetA48QuantizedLayer(bits=3, window=window, block_size=4)
    fill(layer, [9, 1, 1])
    return layer


@pytest.mark.parametrize("window", [0, 3])
def test_reorder_select_repeat_on_packed_storage_equal_same_op_on_dequantised(window: int) -> None:
    for op, expect_b in [
        (lambda layer: layer.reorder_cache(torch.tensor([2, 0, 0])), 3),
        (lambda layer: layer.batch_select_indices(torch.tensor([1, 2])), 2),
        (lambda layer: layer.batch_repeat_interleave(2), 6),
    ]:
        layer = make_filled(window)
        k0, v0 = layer.dequantize_all()
        idx = {3: torch.tensor([2, 0, 0]), 2: torch.tensor([1, 2]), 6: torch.arange(3).repeat_interleave(2)}[expect_b]
        op(layer)
        k1, v1 = layer.dequantize_all()
        assert torch.equal(k1, k0[idx]) and torch.equal(v1, v0[idx])
        assert layer.batch_size == expect_b and layer.get_seq_length() == 11 and layer.get_mask_sizes(1) == (12, 0)
        # the cache still appends and attends after the operation
        out = layer.attend(torch.randn(expect_b, HQ, 1, D), torch.randn(expect_b, H, 1, D),
                           torch.randn(expect_b, H, 1, D), None, 0.25)  # fmt: skip
        assert out.shape == (expect_b, 1, HQ, D) and layer.get_seq_length() == 12


@pytest.mark.parametrize(("window", "remove"), [(3, -2), (3, -5), (0, -4), (3, -11), (3, 6)])
def test_crop_on_packed_storage_equals_crop_of_dequantised(window: int, remove: int) -> None:
    layer = make_filled(window)
    k0, v0 = layer.dequantize_all()
    layer.crop(remove)
    new_len = 11 + remove if remove <= 0 else remove
    k1, v1 = layer.dequantize_all()
    assert torch.equal(k1, k0[:, :, :new_len]) and torch.equal(v1, v0[:, :, :new_len])
    assert layer.get_seq_length() == new_len and layer.get_mask_sizes(2) == (new_len + 2, 0)
    if new_len == 0:
        assert (layer.sink_pos == -1).all()
    fill(layer, [2], seed=5)
    assert layer.get_seq_length() == new_len + 2


def test_static_layout_reorder_crop_in_place_and_batch_change_refused() -> None:
    layer = BitNetA48QuantizedLayer(bits=3, window=0, max_cache_len=32)
    fill(layer, [9, 1])
    k0, _ = layer.dequantize_all()
    ptr = layer.k_packed.data_ptr()
    layer.reorder_cache(torch.tensor([1, 1, 0]))
    assert layer.k_packed.data_ptr() == ptr and torch.equal(layer.dequantize_all()[0], k0[[1, 1, 0]])
    layer.crop(-3)
    assert int(layer.get_seq_length()) == 7 and layer.get_mask_sizes(1) == (32, 0)
    assert torch.equal(layer.dequantize_all()[0], k0[[1, 1, 0]][:, :, :7])
    with pytest.raises(NotImplementedError, match="static layout"):
        layer.batch_repeat_interleave(2)
    layer.reset()
    assert int(layer.get_seq_length()) == 0 and layer.k_packed.data_ptr() == ptr


# ------------------------------------------------------------------------------------------------ memory


def test_memory_of_2048_tokens_head_dim_128_at_least_4_5x_below_bf16() -> None:
    cache = BitNetA48QuantizedCache(bits=3, num_layers=1)  # default window 16
    k = torch.randn(1, 5, 2048, 128, dtype=torch.bfloat16)
    cache.update(k, k, 0)
    held = sum(cache.memory_bytes().values())
    bf16 = 2 * k.nbytes
    assert bf16 / held >= 4.5, f"{bf16 / held:.2f}x"


# ------------------------------------------------------------------------------------------------ cache object


def test_cache_bits_from_config_and_query_quantisation() -> None:
    from bitnet_a48 import BitNetA48Config

    config = BitNetA48Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=50, kv_cache_bits=2)  # fmt: skip
    cache = make_generation_cache(config, 1, None, "cpu", torch.float32)
    assert isinstance(cache, BitNetA48QuantizedCache) and cache.bits == 2 and len(cache.layers) == 2
    config.kv_cache_bits = None
    assert not isinstance(make_generation_cache(config, 1, None, "cpu", torch.float32), BitNetA48QuantizedCache)
    q = torch.randn(2, 4, 3, 16)
    q4 = fake_quantize_query(q, 4)
    step = q.abs().amax(-1, keepdim=True) / grid_mid(4)
    assert ((q4 - q).abs() <= step / 2 * 1.01).all() and not torch.equal(q4, q)
    cache = BitNetA48QuantizedCache(bits=3, query_bits=4, num_layers=1)
    k = torch.randn(2, 2, 3, 16)
    out = cache.attend(q, k, k, 0, None, 0.25)
    assert out.shape == (2, 3, 4, 16)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(bits=5), "bits must be one of"),
        (dict(bits=3, window=-1), "window"),
        (dict(bits=3, max_cache_len=16, window=4), "static layout"),
        (dict(bits=3, query_bits=3), "query_bits"),
        (dict(bits=3, impl="gpu"), "impl"),
        (dict(bits=3, block_size=0), "block_size"),
    ],
)
def test_bad_cache_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cache = BitNetA48QuantizedCache(num_layers=1, **kwargs)
        cache.update(torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8), 0)


def test_wrong_shapes_raise() -> None:
    layer = BitNetA48QuantizedLayer()
    with pytest.raises(ValueError, match="multiple of 8"):
        layer.append(torch.randn(1, 2, 3, 12), torch.randn(1, 2, 3, 12))
    layer = BitNetA48QuantizedLayer()
    fill(layer, [2])
    with pytest.raises(ValueError, match="kv_heads=2"):
        layer.append(torch.randn(B, 3, 1, D), torch.randn(B, 3, 1, D))
    with pytest.raises(ValueError, match="differ in length"):
        layer.append(torch.randn(B, H, 1, D), torch.randn(B, H, 2, D))
    with pytest.raises(ValueError, match="mask covers"):
        layer.attend(torch.randn(B, HQ, 1, D), torch.randn(B, H, 1, D), torch.randn(B, H, 1, D),
                     torch.ones(B, 1, 1, 2, dtype=torch.bool), 0.25)  # fmt: skip


@pytest.mark.slow
def test_static_decode_step_compiles_fullgraph() -> None:
    caches = [BitNetA48QuantizedCache(bits=3, max_cache_len=32, num_layers=1, block_size=16) for _ in range(2)]
    k = torch.randn(1, H, 5, D)
    for cache in caches:
        cache.attend(torch.randn(1, HQ, 5, D), k, k, 0, None, 0.25)  # prefill (eager)

    def step(cache: BitNetA48QuantizedCache, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(1, 1, 1, 32, dtype=torch.bool)
        return cache.attend(query, key, key, 0, mask, 0.25)

    compiled = torch.compile(step, fullgraph=True)
    for _ in range(3):
        query, key = torch.randn(1, HQ, 1, D), torch.randn(1, H, 1, D)
        out, ref = compiled(caches[0], query, key), step(caches[1], query, key)
        assert (out - ref).abs().max() < 1e-5
    assert int(caches[0].get_seq_length()) == 8
    assert torch.equal(caches[0].layers[0].k_packed, caches[1].layers[0].k_packed)


# ------------------------------------------------------------------------------------------------ generate()


@pytest.fixture
def tiny_model(tiny_config_kwargs: dict):  # noqa: ANN201
    from bitnet_a48 import BitNetA48Config
    from bitnet_a48.modeling_bitnet_a48 import BitNetA48ForCausalLM

    torch.manual_seed(0)
    config = BitNetA48Config(**{**tiny_config_kwargs, "kv_cache_bits": 3})
    return BitNetA48ForCausalLM(config).eval()


def prompts() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Two left-padded prompts (pad id 0) with their mask, and the unpadded prompts."""
    g = torch.Generator().manual_seed(3)
    rows = [torch.cat([torch.tensor([1]), torch.randint(3, 101, (n,), generator=g)]) for n in (8, 5)]
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    return ids, (ids != 0).long(), rows


def test_generate_uses_the_quantised_cache_by_default(tiny_model) -> None:  # noqa: ANN001
    ids, mask, _ = prompts()
    out = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                              return_dict_in_generate=True)  # fmt: skip
    cache = output_cache(out)
    assert isinstance(cache, BitNetA48QuantizedCache) and cache.bits == 3
    assert cache.get_seq_length() == out.sequences.shape[1] - 1


def test_greedy_left_padded_batch_equals_one_by_one(tiny_model) -> None:  # noqa: ANN001
    ids, mask, rows = prompts()
    def windowed() -> dict:
        return {GENERATE_CACHE_KEY: BitNetA48QuantizedCache(tiny_model.config, window=4)}

    batched = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **windowed())
    for b, row in enumerate(rows):
        single = tiny_model.generate(row[None], max_new_tokens=10, do_sample=False, **windowed())
        assert torch.equal(batched[b, -10:], single[0, -10:]), f"row {b}"


def test_eight_bit_cache_tracks_full_precision_logits(tiny_model) -> None:  # noqa: ANN001
    from transformers import DynamicCache

    ids, mask, _ = prompts()
    logits = {}
    for name, cache in (("dyn", DynamicCache()), ("q8", BitNetA48QuantizedCache(tiny_model.config, bits=8))):
        out = tiny_model(ids[:, :6], attention_mask=mask[:, :6], cache=cache)
        out = tiny_model(ids[:, 6:], attention_mask=mask, cache=output_cache(out))
        logits[name] = out.logits[mask[:, 6:].bool()]
    rel = (logits["q8"] - logits["dyn"]).norm() / logits["dyn"].norm()
    assert rel < 1e-2, f"relative error {rel:.2e}"


@pytest.mark.parametrize("mode", ["sample", "beam"])
def test_sampling_and_beam_search_with_num_return_sequences(tiny_model, mode: str) -> None:  # noqa: ANN001
    ids, mask, _ = prompts()
    kwargs = dict(do_sample=True, top_k=20) if mode == "sample" else dict(num_beams=3, do_sample=False)
    cache = BitNetA48QuantizedCache(tiny_model.config, window=2)
    out = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, num_return_sequences=2,
                              **{GENERATE_CACHE_KEY: cache}, return_dict_in_generate=True, **kwargs)  # fmt: skip
    assert out.sequences.shape == (4, ids.shape[1] + 6)  # min_new_tokens: no row ends early on EOS
    assert ((out.sequences >= 0) & (out.sequences < 101)).all()
    assert output_cache(out) is cache  # the cache passed in is the one generate() filled
    # beams keep num_beams rows per prompt in the cache, samples num_return_sequences; each holds every step's key
    assert [layer.batch_size for layer in cache.layers] == [4 if mode == "sample" else 6] * len(cache.layers)
    assert [int(layer.get_seq_length()) for layer in cache.layers] == [out.sequences.shape[1] - 1] * len(cache.layers)


def test_continue_generation_from_returned_cache_equals_one_run(tiny_model) -> None:  # noqa: ANN001
    ids, mask, _ = prompts()
    one = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                              **{GENERATE_CACHE_KEY: BitNetA48QuantizedCache(tiny_model.config)})  # fmt: skip
    first = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                **{GENERATE_CACHE_KEY: BitNetA48QuantizedCache(tiny_model.config)},
                                return_dict_in_generate=True)  # fmt: skip
    assert isinstance(output_cache(first), BitNetA48QuantizedCache)
    mask2 = torch.cat([mask, torch.ones(2, 4, dtype=torch.long)], 1)
    second = tiny_model.generate(first.sequences, attention_mask=mask2, max_new_tokens=6, do_sample=False,
                                 **{GENERATE_CACHE_KEY: output_cache(first)})  # fmt: skip
    assert torch.equal(second, one)


def test_assisted_decoding_crops_the_packed_cache(tiny_model) -> None:  # noqa: ANN001
    _, _, rows = prompts()
    prompt = torch.cat([rows[0], rows[0][1:]])[None]  # repeated n-grams give lookup candidates
    cache = BitNetA48QuantizedCache(tiny_model.config, window=0)
    out = tiny_model.generate(prompt, max_new_tokens=8, do_sample=False, prompt_lookup_num_tokens=3,
                              **{GENERATE_CACHE_KEY: cache}, return_dict_in_generate=True)  # fmt: skip
    assert cache.get_seq_length() == out.sequences.shape[1] - 1
    assert all(int(layer.get_seq_length()) == cache.get_seq_length() for layer in cache.layers)


# ------------------------------------------------------------------------------------------------ quality


from make_copy_model import OUT as COPY_MODEL  # noqa: E402  (tests/ is on sys.path)
from make_copy_model import copy_corpus  # noqa: E402


@pytest.fixture(scope="module")
def trained_model():  # noqa: ANN201
    """A tiny a4.8 model trained 250 steps on `copy_corpus`; fixed weights (tests/make_copy_model.py wrote them).

    Trained in the test, the model (and so its 3-bit perplexity gap) depended on the CPU's vector instructions.
    """
    from bitnet_a48.modeling_bitnet_a48 import BitNetA48ForCausalLM

    return BitNetA48ForCausalLM.from_pretrained(COPY_MODEL).eval()


@torch.no_grad()
def chunked_perplexity(model, data: torch.Tensor, make_cache, chunk: int) -> float:  # noqa: ANN001
    """Perplexity of ``data`` fed ``chunk`` tokens at a time through one cache (the decode-time access pattern)."""
    cache = make_cache()
    logits = torch.cat([model(data[:, i : i + chunk], cache=cache).logits
                        for i in range(0, data.shape[1], chunk)], 1)  # fmt: skip
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), data[:, 1:].reshape(-1))
    return float(nll.exp())


@pytest.mark.slow
def test_chunked_perplexity_close_to_dynamic_cache_and_ordered_by_bits(trained_model) -> None:  # noqa: ANN001
    from transformers import DynamicCache

    data = copy_corpus(16, seed=10_000)
    base = chunked_perplexity(trained_model, data, DynamicCache, chunk=16)
    assert base < 8.0, f"the model did not learn to copy (perplexity {base:.2f})"
    ppl = {bits: chunked_perplexity(trained_model, data, lambda b=bits: BitNetA48QuantizedCache(
        trained_model.config, bits=b), chunk=16) for bits in (2, 3, 4, 8)}  # fmt: skip
    gap = {bits: abs(p / base - 1) for bits, p in ppl.items()}
    assert gap[3] < 0.03, f"3-bit perplexity {ppl[3]:.3f} vs {base:.3f}"
    assert gap[8] < 0.005 and gap[4] < gap[3] < gap[2], f"gaps {gap}"


@pytest.mark.slow
def test_greedy_continuations_agree_with_dynamic_cache(trained_model) -> None:  # noqa: ANN001
    from transformers import DynamicCache

    prompt = copy_corpus(8, seed=20_000)[:, :30]  # BOS, one segment, the start of its repeat
    kw = dict(max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(prompt))
    ref = trained_model.generate(prompt, **{GENERATE_CACHE_KEY: DynamicCache()}, **kw)[:, 30:]
    out = trained_model.generate(prompt, **kw)[:, 30:]  # default cache: 3 bits
    agree = (out == ref).float().mean()
    assert agree >= 0.8, f"only {agree:.0%} of greedy tokens agree"
