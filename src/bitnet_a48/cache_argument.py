"""The name of the KV-cache argument across the transformers releases we admit.

transformers 5.24 renamed the cache argument of `forward`, `generate` and the mask functions, and the cache field of
the model outputs, from `past_key_values` to `cache` (the old name stays deprecated until 5.40). Our forwards take
`cache` and accept `past_key_values` as the older name; everything we hand *to* transformers (the cache key in
generate's `model_kwargs`, the output field, `create_causal_mask`'s argument) uses the name the installed release
reads. The names are read off the installed release's own objects, not off its version number.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from transformers.cache_utils import Cache
from transformers.generation import utils as generation_utils
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast


def _newest_name(names: set[str]) -> str:
    return "cache" if "cache" in names else "past_key_values"


# The field of `CausalLMOutputWithPast` / `BaseModelOutputWithPast` that holds the cache.
OUTPUT_CACHE_FIELD: str = _newest_name({field.name for field in dataclasses.fields(CausalLMOutputWithPast)})
# The key under which generate() keeps the cache in `model_kwargs` (and passes it to forward).
GENERATE_CACHE_KEY: str = _newest_name(set(getattr(generation_utils, "ALL_CACHE_NAMES", ())))
# The keyword of `create_causal_mask` that takes the cache.
MASK_CACHE_ARG: str = _newest_name(set(inspect.signature(create_causal_mask).parameters))

# Cache arguments of other models or older releases: passed to our forward they would be silently ignored.
FOREIGN_CACHE_NAMES = ("cache_params", "layer_past", "past", "mems", "state", "past_buckets_states")


def resolve_cache_argument(cache: Cache | None, past_key_values: Cache | None, kwargs: dict[str, Any]) -> Cache | None:
    """The cache a forward was given, under either name; a cache under any other name is an error, not dropped."""
    if past_key_values is not None:
        if cache is not None:
            raise ValueError("got both `cache` and `past_key_values` (its older name): pass the KV cache once")
        cache = past_key_values
    for name, value in kwargs.items():
        if name in FOREIGN_CACHE_NAMES or isinstance(value, Cache):
            raise TypeError(
                f"unknown cache argument {name!r}: BitNet a4.8 takes its KV cache as `cache` "
                "(or `past_key_values`, the name before transformers 5.24)"
            )
    return cache


def output_cache(outputs: Any) -> Cache | None:
    """The cache field of a model output, read under the installed release's name (no deprecation warning)."""
    return getattr(outputs, OUTPUT_CACHE_FIELD)
