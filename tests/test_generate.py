"""generate() on the installed transformers release: the cache goes under the name the release uses, is filled and read.

A model whose forward drops the cache (as ours did when transformers 5.24 renamed `past_key_values` to `cache`)
still returns the right *first* token, so every test here checks several tokens against a full recompute and that
the cache really holds the sequence and was really read.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from bitnet_a48 import BitNetA48Config, BitNetA48ForCausalLM
from bitnet_a48.cache_argument import GENERATE_CACHE_KEY, OUTPUT_CACHE_FIELD, output_cache
from bitnet_a48.cache_bitnet_a48 import BitNetA48QuantizedCache

NEW_TOKENS = 8


def make_model(tiny_config_kwargs: dict, quant_mode: str, packed: bool,
               kv_cache_bits: int | None) -> BitNetA48ForCausalLM:  # fmt: skip
    torch.manual_seed(0)
    config = BitNetA48Config(**{**tiny_config_kwargs, "quant_mode": quant_mode, "kv_cache_bits": kv_cache_bits})
    model = BitNetA48ForCausalLM(config).eval()
    return model.pack() if packed else model


def left_padded_prompts(lengths: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of the given lengths, BOS first, left-padded with pad id 0; (ids, mask) of shape (B, max length)."""
    g = torch.Generator().manual_seed(7)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n] = 1
        ids[row, width - n + 1 :] = torch.randint(3, 101, (n - 1,), generator=g)
    return ids, (ids != 0).long()


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids from a left-padded mask, as generate() makes them (pads get 1)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


@torch.no_grad()
def full_recompute_greedy(model: BitNetA48ForCausalLM, ids: torch.Tensor, mask: torch.Tensor,
                          steps: int) -> torch.Tensor:  # fmt: skip
    """Greedy decoding with no cache: every step runs the whole sequence (positions from the mask, as generate())."""
    for _ in range(steps):
        logits = model(ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


@pytest.mark.parametrize("packed", [False, True], ids=["latent", "packed"])
@pytest.mark.parametrize("quant_mode", ["a8", "a4.8"])
@pytest.mark.parametrize("lengths", [(6,), (9, 4, 6)], ids=["batch1", "left-padded"])
def test_greedy_generate_equals_full_recompute(tiny_config_kwargs: dict, packed: bool, quant_mode: str,
                                               lengths: tuple[int, ...]) -> None:  # fmt: skip
    model = make_model(tiny_config_kwargs, quant_mode, packed, kv_cache_bits=None)
    ids, mask = left_padded_prompts(lengths)
    cache = DynamicCache()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                         **{GENERATE_CACHE_KEY: cache})  # fmt: skip
    assert output_cache(out) is cache, "generate() must fill and return the cache the user passed"
    assert cache.get_seq_length() == ids.shape[1] + NEW_TOKENS - 1, "the cache does not hold the sequence"
    expected = full_recompute_greedy(model, ids, mask, NEW_TOKENS)
    assert torch.equal(out.sequences, expected), f"generate {out.sequences[:, -NEW_TOKENS:].tolist()} " \
                                                 f"vs recompute {expected[:, -NEW_TOKENS:].tolist()}"  # fmt: skip


@pytest.mark.parametrize("packed", [False, True], ids=["latent", "packed"])
def test_default_generate_builds_and_reads_the_3bit_cache(tiny_config_kwargs: dict, packed: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    model = make_model(tiny_config_kwargs, "a4.8", packed, kv_cache_bits=3)
    calls: list[int] = []
    attend = BitNetA48QuantizedCache.attend

    def counting_attend(self, query, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(query.shape[2])  # query length of this call
        return attend(self, query, *args, **kwargs)

    monkeypatch.setattr(BitNetA48QuantizedCache, "attend", counting_attend)
    ids, mask = left_padded_prompts((9, 4))
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         do_sample=False, pad_token_id=0, return_dict_in_generate=True)  # fmt: skip
    cache = output_cache(out)
    assert isinstance(cache, BitNetA48QuantizedCache) and cache.bits == 3
    assert cache.get_seq_length() == out.sequences.shape[1] - 1
    layers = model.config.num_hidden_layers
    # one prefill call over the prompt, then one single-token call per new token, in every layer
    assert calls == [ids.shape[1]] * layers + [1] * (layers * (NEW_TOKENS - 1))

    # generate() steps equal a hand-written loop that feeds the same kind of cache one token at a time
    manual = BitNetA48QuantizedCache(model.config)
    seq, step_mask = ids, mask
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=positions(mask), cache=manual).logits
        for _ in range(NEW_TOKENS):
            token = logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, token], 1)
            step_mask = torch.cat([step_mask, torch.ones_like(token)], 1)
            position = step_mask.sum(-1, keepdim=True) - 1
            logits = model(token, attention_mask=step_mask, position_ids=position, cache=manual).logits
    assert torch.equal(out.sequences, seq)


def test_user_cache_is_filled_and_continued(tiny_config_kwargs: dict) -> None:
    model = make_model(tiny_config_kwargs, "a8", packed=False, kv_cache_bits=3)
    ids, mask = left_padded_prompts((7,))
    cache = BitNetA48QuantizedCache(model.config, bits=8)
    first = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, min_new_tokens=4,
                           return_dict_in_generate=True, **{GENERATE_CACHE_KEY: cache})  # fmt: skip
    assert output_cache(first) is cache and cache.get_seq_length() == ids.shape[1] + 3
    whole = model.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, min_new_tokens=9,
                           **{GENERATE_CACHE_KEY: BitNetA48QuantizedCache(model.config, bits=8)})  # fmt: skip
    more = model.generate(first.sequences, max_new_tokens=5, do_sample=False, min_new_tokens=5,
                          **{GENERATE_CACHE_KEY: cache})  # fmt: skip
    assert torch.equal(more, whole)


def test_forward_takes_both_cache_names_and_returns_the_versions_field(tiny_config_kwargs: dict) -> None:
    model = make_model(tiny_config_kwargs, "a8", packed=False, kv_cache_bits=None)
    ids = torch.randint(3, 101, (2, 9))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        for name in ("cache", "past_key_values"):
            cache = DynamicCache()
            first = model(ids[:, :5], **{name: cache})
            assert getattr(first, OUTPUT_CACHE_FIELD) is cache and cache.get_seq_length() == 5
            rest = model(ids[:, 5:], **{name: cache}).logits
            assert torch.allclose(rest, full[:, 5:], atol=1e-5), name
            assert cache.get_seq_length() == 9
        base = model.model(ids[:, :3], cache=DynamicCache())
        assert getattr(base, OUTPUT_CACHE_FIELD).get_seq_length() == 3


@pytest.mark.parametrize("name", ["cache_params", "layer_past", "my_cache"])
def test_unknown_cache_argument_raises(tiny_config_kwargs: dict, name: str) -> None:
    model = make_model(tiny_config_kwargs, "a8", packed=False, kv_cache_bits=None)
    with pytest.raises(TypeError, match=f"unknown cache argument '{name}'"):
        model(torch.randint(3, 101, (1, 4)), **{name: DynamicCache()})


def test_both_cache_names_at_once_raise(tiny_config_kwargs: dict) -> None:
    model = make_model(tiny_config_kwargs, "a8", packed=False, kv_cache_bits=None)
    with pytest.raises(ValueError, match="both `cache` and `past_key_values`"):
        model(torch.randint(3, 101, (1, 4)), cache=DynamicCache(), past_key_values=DynamicCache())


@pytest.mark.parametrize("bad", [101, 5000, -1])
def test_token_id_outside_the_vocabulary_is_one_clear_error(tiny_config_kwargs: dict, bad: int) -> None:
    model = make_model(tiny_config_kwargs, "a8", packed=False, kv_cache_bits=None)
    ids = torch.tensor([[1, 5, bad, 7]])
    message = rf"input id {bad} is outside the vocabulary of 101 tokens"
    with pytest.raises(ValueError, match=message):
        model(ids)
    with pytest.raises(ValueError, match=message):
        model.generate(ids, max_new_tokens=2, do_sample=False)
