"""Configuration of BitNet a4.8 models (arXiv 2411.04965), shaped like transformers' ``BitNetConfig``."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from .quantization import ACT4_FORMATS, QUANT_MODES

HIDDEN_ACTS = ("relu2", "silu")
KV_CACHE_BITS = (2, 3, 4, 8)
WEIGHT_FORMATS = ("latent", "packed")


class BitNetA48Config(PretrainedConfig):
    r"""
    Configuration of a [`BitNetA48ForCausalLM`]: a LLaMA-like decoder with SubLN, ternary (1.58-bit) weights and the
    hybrid 4-bit / sparse 8-bit activations of BitNet a4.8. Field names follow transformers' `BitNetConfig`, so a
    `model_type: "bitnet"` checkpoint converts by copying them.

    Args:
        vocab_size (`int`, *optional*, defaults to 32000):
            Vocabulary size, the number of rows of `embed_tokens` and `lm_head`.
        hidden_size (`int`, *optional*, defaults to 2048):
            Dimension of the hidden states.
        intermediate_size (`int`, *optional*, defaults to 5460):
            Dimension of the gated feed-forward (GLU) layer.
        num_hidden_layers (`int`, *optional*, defaults to 24):
            Number of decoder layers.
        num_attention_heads (`int`, *optional*, defaults to 32):
            Number of query heads; must divide `hidden_size` unless `head_dim` is given.
        num_key_value_heads (`int`, *optional*):
            Number of key/value heads for grouped-query attention; must divide `num_attention_heads`.
            Defaults to `num_attention_heads` (multi-head attention).
        head_dim (`int`, *optional*):
            Dimension of one attention head. Defaults to `hidden_size // num_attention_heads`.
        hidden_act (`str`, *optional*, defaults to `"relu2"`):
            Gate activation of the GLU: `"relu2"` (ReLU², the paper's ReLU²GLU) or `"silu"` (models converted from
            LLaMA).
        max_position_embeddings (`int`, *optional*, defaults to 2048):
            Longest sequence the rotary embedding is meant for.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of projection and embedding weights.
        rms_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of every RMSNorm (including the SubLN norms `attn_sub_norm` and `ffn_sub_norm`).
        use_cache (`bool`, *optional*, defaults to `True`):
            Whether the model returns past key/values for faster decoding.
        pad_token_id (`int`, *optional*):
            Padding token id.
        bos_token_id (`int`, *optional*, defaults to 1):
            Beginning-of-sequence token id.
        eos_token_id (`int` or `list[int]`, *optional*, defaults to 2):
            End-of-sequence token id(s).
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            Whether `lm_head` shares the weight of `embed_tokens`.
        rope_theta (`float`, *optional*, defaults to 10000.0):
            Base of the rotary embedding; stored in `rope_parameters["rope_theta"]`.
        rope_parameters (`dict`, *optional*):
            transformers' RoPE parameters (`rope_type`, `rope_theta`, scaling fields). Built from `rope_theta` when
            not given.
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the attention probabilities during training.
        quant_mode (`str`, *optional*, defaults to `"a4.8"`):
            Quantisation arithmetic. `"a4.8"`: ternary weights, 4-bit inputs to q/k/v and gate/up, TopK-sparse INT8
            input to o_proj, INT8 input to down_proj (stage 2). `"a8"`: ternary weights and INT8 inputs everywhere
            (stage 1, the b1.58 arithmetic with ReLU²GLU). `"none"`: full precision (baseline). Switch at run time
            with `model.set_quant_mode(...)`.
        topk_ratio (`float`, *optional*, defaults to 0.5):
            Share of the o_proj input entries kept per token by TopK in `"a4.8"`, in (0, 1].
        act4_format (`str`, *optional*, defaults to `"int4"`):
            4-bit activation format of `"a4.8"`: `"int4"` (absmean) or `"fp4"` (E2M1, MinMax).
        kv_cache_bits (`int`, *optional*, defaults to 3):
            Bits of the quantised KV cache used by `generate()` (2, 3, 4 or 8; the first token of each sequence is
            kept at 4 bits when this is below 4). `None` keeps a full-precision cache.
        weight_format (`str`, *optional*, defaults to `"latent"`):
            `"latent"`: high-precision trainable weights quantised on the fly. `"packed"`: 2-bit ternary codes for
            inference, written by `model.pack()`.
    """

    model_type = "bitnet_a48"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    # No tensor-parallel plan: sharded projections would compute other numbers. The weight scale is the absmean of
    # the WHOLE weight, the INT8/INT4 activation scales the absmax/absmean of a token's whole input, and TopK chooses
    # among the whole o_proj input: a shard of the outputs (colwise) gets another weight scale, a shard of the inputs
    # (rowwise) other activation scales and TopK choices as well. And the packed layout puts output rows r, R+r,
    # 2R+r, 3R+r in byte row r, so a slice of its rows is not a block of outputs. Without a plan, tp_plan="auto" on
    # several processes stops with transformers' "has no `tp_plan`" error (tests/test_config.py) instead of
    # sharding wrongly.
    base_model_tp_plan = None

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 2048,
        intermediate_size: int = 5460,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "relu2",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0,
        rope_parameters: dict[str, Any] | None = None,
        attention_dropout: float = 0.0,
        quant_mode: str = "a4.8",
        topk_ratio: float = 0.5,
        act4_format: str = "int4",
        kv_cache_bits: int | None = 3,
        weight_format: str = "latent",
        **kwargs: Any,
    ) -> None:
        if kwargs.get("quantization_config") is not None:
            raise ValueError(
                "BitNetA48Config does not take a `quantization_config`: transformers' own BitNet quantizer would "
                "replace every linear layer. Convert a `bitnet` checkpoint with `bitnet-a48 convert` instead."
            )
        kwargs.pop("quantization_config", None)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.attention_dropout = attention_dropout
        self.attention_bias = False  # BitNet has no biases (section 1 of the spec)
        self.rope_parameters = dict(rope_parameters) if rope_parameters else {"rope_type": "default"}
        self.rope_parameters.setdefault("rope_type", "default")
        self.rope_parameters.setdefault("rope_theta", float(rope_theta))
        self.quant_mode = quant_mode
        self.topk_ratio = topk_ratio
        self.act4_format = act4_format
        self.kv_cache_bits = kv_cache_bits
        self.weight_format = weight_format
        if self.head_dim is None and isinstance(num_attention_heads, int) and num_attention_heads > 0:
            if isinstance(hidden_size, int) and hidden_size % num_attention_heads == 0:
                self.head_dim = hidden_size // num_attention_heads
        self._check_fields()  # before transformers' own checks, so errors name our fields
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _check_fields(self) -> None:
        """Raise `ValueError` naming the first invalid field and the values it accepts."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        if self.head_dim is None:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must divide `hidden_size` ({self.hidden_size}) "
                "unless `head_dim` is given"
            )
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"`head_dim` must be a positive even integer (RoPE rotates pairs), got {self.head_dim!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"`num_key_value_heads` ({self.num_key_value_heads}) must divide `num_attention_heads` "
                f"({self.num_attention_heads})"
            )
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"`hidden_act` must be one of {HIDDEN_ACTS}, got {self.hidden_act!r}")
        if self.quant_mode not in QUANT_MODES:
            raise ValueError(f"`quant_mode` must be one of {QUANT_MODES}, got {self.quant_mode!r}")
        if isinstance(self.topk_ratio, bool) or not isinstance(self.topk_ratio, (int, float)) or not (
            0.0 < self.topk_ratio <= 1.0
        ):
            raise ValueError(f"`topk_ratio` must be a number in (0, 1], got {self.topk_ratio!r}")
        if self.act4_format not in ACT4_FORMATS:
            raise ValueError(f"`act4_format` must be one of {ACT4_FORMATS}, got {self.act4_format!r}")
        if self.kv_cache_bits is not None and self.kv_cache_bits not in KV_CACHE_BITS:
            raise ValueError(f"`kv_cache_bits` must be one of {KV_CACHE_BITS} or None, got {self.kv_cache_bits!r}")
        if self.weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"`weight_format` must be one of {WEIGHT_FORMATS}, got {self.weight_format!r}")
        if not (isinstance(self.rms_norm_eps, float) and self.rms_norm_eps > 0):
            raise ValueError(f"`rms_norm_eps` must be a positive float, got {self.rms_norm_eps!r}")
        if not 0.0 <= float(self.attention_dropout) < 1.0:
            raise ValueError(f"`attention_dropout` must lie in [0, 1), got {self.attention_dropout!r}")
        if self.rope_parameters.get("rope_theta", 0) <= 0:
            raise ValueError(f"`rope_theta` must be positive, got {self.rope_parameters.get('rope_theta')!r}")


# Paper sizes (section 3 of the spec: hidden / GLU / heads / layers; LLaMA-2 vocabulary, untied) and the shape of
# microsoft/bitnet-b1.58-2B-4T (LLaMA-3 vocabulary, GQA, tied).
PRESETS: dict[str, dict[str, Any]] = {
    "700M": dict(hidden_size=1536, intermediate_size=4096, num_attention_heads=24, num_hidden_layers=24),
    "1.3B": dict(hidden_size=2048, intermediate_size=5460, num_attention_heads=32, num_hidden_layers=24),
    "3B": dict(hidden_size=3200, intermediate_size=8640, num_attention_heads=32, num_hidden_layers=26),
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32),
    "2B-4T": dict(
        vocab_size=128256,
        hidden_size=2560,
        intermediate_size=6912,
        num_attention_heads=20,
        num_key_value_heads=5,
        num_hidden_layers=30,
        max_position_embeddings=4096,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
}


def config_from_preset(name: str, **overrides: Any) -> BitNetA48Config:
    """A `BitNetA48Config` of a named preset (`"700M"`, `"1.3B"`, `"3B"`, `"7B"`, `"2B-4T"`), fields overridable."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return BitNetA48Config(**{**PRESETS[name], **overrides})
