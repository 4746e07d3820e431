"""BitNet a4.8 as a transformers causal language model.

The block layout is BitNet b1.58's (LLaMA-like with SubLN, no biases; spec section 1)::

    h = x + o_proj(attn_sub_norm(Attention(RoPE(q_proj(n)), RoPE(k_proj(n)), v_proj(n)))),  n = input_layernorm(x)
    y = h + down_proj(ffn_sub_norm(ReLU²(gate_proj(m)) * up_proj(m))),          m = post_attention_layernorm(h)

Every projection is a ``BitLinear`` whose input quantiser depends on its role and on ``config.quant_mode``
(a4.8: 4-bit q/k/v and gate/up inputs, TopK-sparse INT8 o_proj input, INT8 down_proj input; section 2 of the
paper). Module and state-dict names equal transformers' ``BitNetForCausalLM``, so b1.58 checkpoints map one to one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .bitlinear import BitLinear
from .cache_argument import GENERATE_CACHE_KEY, MASK_CACHE_ARG, OUTPUT_CACHE_FIELD, output_cache, resolve_cache_argument
from .cache_bitnet_a48 import make_generation_cache
from .checkpoint_files import validate_safetensors_files
from .configuration_bitnet_a48 import BitNetA48Config
from .decode_native import decoder_layer_decode
from .head_native import head_logits
from .kernels_cpu_native import rope_native
from .packed_bitlinear import NATIVE_DTYPES, PackedBitLinear, fused_projection, has_forward_hooks, project_shared_input
from .projections import INTERMEDIATE, QUERY, Projection, dimension, is_projection, projections_of
from .projections import PROJECTION_ROLES as PROJECTION_ROLES  # the table's name -> role, kept importable here


def make_projection(config: BitNetA48Config, spec: Projection) -> nn.Module:
    """The projection of table row ``spec`` for ``config.weight_format``: a latent ``BitLinear`` or a packed layer."""
    in_features, out_features = spec.in_features(config), spec.out_features(config)
    kwargs = dict(
        role=spec.role, quant_mode=config.quant_mode, topk_ratio=config.topk_ratio, act4_format=config.act4_format
    )
    if config.weight_format == "packed":
        return PackedBitLinear(in_features, out_features, **kwargs)
    return BitLinear(in_features, out_features, bias=False, **kwargs)


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """One clear error for a token id outside [0, vocab_size) (the embedding lookup would raise a bare IndexError)."""
    if input_ids.numel() == 0 or input_ids.device.type == "meta":  # meta tensors have no values to read
        return
    low, high = (int(v) for v in torch.aminmax(input_ids))  # one pass, one read-back
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"input id {bad} is outside the vocabulary of {vocab_size} tokens (ids must lie in [0, {vocab_size}))"
        )


def _inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / sqrt(mean(x²) + eps)`` of fp32 ``x``, shape (..., 1); the fp32 squares are summed in fp64."""
    total = x.pow(2).sum(-1, keepdim=True, dtype=torch.float64)
    return torch.rsqrt((total / x.shape[-1]).float() + eps)


class _RMSNormFunction(torch.autograd.Function):
    """``w · (x · r).to(dtype)`` with ``r = _inverse_rms(x)``, and its backward written out: with ``g = dy · w``,
    ``dx = g · r - x · r³ · Σ(g · x) / d`` and ``dw = Σ_tokens dy · (x · r)``. It saves the input and r only and
    makes about half the passes of autograd's graph of the same dozen ops (measured: 3.8 against 7.3 ms forward and
    backward for 2048 x 256 on one core); dx equals autograd's up to float rounding (about 1e-7 relative), dw
    exactly."""

    @staticmethod
    def forward(ctx: Any, hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # noqa: D102
        x = hidden_states.float()
        r = _inverse_rms(x, eps)
        ctx.save_for_backward(hidden_states, weight, r)
        return weight * (x * r).to(hidden_states.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:  # noqa: D102
        hidden_states, weight, r = ctx.saved_tensors
        x = hidden_states.float()
        grad_input = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * (x * r).to(hidden_states.dtype)).sum_to_size(weight.shape)
        if ctx.needs_input_grad[0]:
            g = (grad_out * weight).float()
            coef = torch.linalg.vecdot(g, x).unsqueeze(-1) * r.pow(3) * (-1.0 / x.shape[-1])
            grad_input = torch.addcmul(g * r, x, coef).to(hidden_states.dtype)
        return grad_input, grad_weight, None


class BitNetA48RMSNorm(nn.Module):
    """RMSNorm computed in fp32: ``w · x / sqrt(mean(x²) + eps)``.

    The squares are summed in fp64, so the mean is the same whatever order a CPU instruction set or a fused kernel
    adds them in (``kernels_cpu_native`` fuses this norm into the next projection and equals it bit for bit). With a
    gradient to carry, the same arithmetic runs in ``_RMSNormFunction`` (a shorter backward; SubLN puts four of
    these norms in every layer, against LLaMA's two).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (hidden_states.requires_grad or self.weight.requires_grad):
            return _RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)
        x = hidden_states.float()
        return self.weight * (x * _inverse_rms(x, self.variance_epsilon)).to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class ReLUSquared(nn.Module):
    """ReLU²(x) = max(x, 0)², the gate activation of ReLU²GLU (a module of its own so hooks see the gate output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


def make_activation(name: str) -> nn.Module:
    if name == "relu2":
        return ReLUSquared()
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"hidden_act must be 'relu2' or 'silu', got {name!r}")


class BitNetA48MLP(nn.Module):
    """ReLU²GLU with SubLN: ``down(ffn_sub_norm(ReLU²(gate(x)) * up(x)))``."""

    def __init__(self, config: BitNetA48Config) -> None:
        super().__init__()
        for spec in projections_of("mlp"):  # gate_proj, up_proj, down_proj (projections.py)
            self.add_module(spec.name, make_projection(config, spec))
        self.act_fn = make_activation(config.hidden_act)
        self.ffn_sub_norm = BitNetA48RMSNorm(dimension(config, INTERMEDIATE), eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: the normalised input ``m`` (the decoder layer applies ``post_attention_layernorm``)."""
        gate, up = project_shared_input((self.gate_proj, self.up_proj), x)  # one call on packed CPU models
        return self.project_down(self.act_fn(gate) * up)

    def fused_gate_up(self, x: torch.Tensor, input_norm: nn.Module) -> torch.Tensor | None:
        """``ReLU²(gate(m)) · up(m)`` with ``m = input_norm(x)`` in one native call, or None where it does not apply
        (``packed_bitlinear.fused_projection``; the activation must be a hook-free ReLU²)."""
        if type(self.act_fn) is not ReLUSquared or has_forward_hooks(self.act_fn):
            return None
        fused = fused_projection((self.gate_proj, self.up_proj), x, norm=input_norm, relu2_glu=True)
        return None if fused is None else fused[0]

    def project_down(self, hidden: torch.Tensor) -> torch.Tensor:
        """``down_proj(ffn_sub_norm(hidden))`` (one native call when packed)."""
        out = fused_projection((self.down_proj,), hidden, norm=self.ffn_sub_norm)
        return out[0] if out is not None else self.down_proj(self.ffn_sub_norm(hidden))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE, rotate-half convention. q, k: (B, H, T, D); cos, sin: (B, T, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, T, D) -> (B, H_kv * n_rep, T, D) for grouped-query attention."""
    if n_rep == 1:
        return hidden_states
    b, h, t, d = hidden_states.shape
    return hidden_states[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ · scaling + mask) v. query: (B, H, T, D); key/value: (B, H_kv, S, D); returns (B, T, H, D)."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask[:, :, :, : key.shape[-2]]
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class BitNetA48Attention(nn.Module):
    """Grouped-query attention with RoPE and SubLN before o_proj."""

    def __init__(self, config: BitNetA48Config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        for spec in projections_of("self_attn"):  # q_proj, k_proj, v_proj, o_proj (projections.py)
            self.add_module(spec.name, make_projection(config, spec))
        self.attn_sub_norm = BitNetA48RMSNorm(dimension(config, QUERY), eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        projected_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``hidden_states``: the normalised input; or, with ``projected_qkv`` (the q/k/v projections the decoder
        layer computed in one fused call, see ``project_qkv``), the layer's input, of which only the shape is used."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        if projected_qkv is None:
            projected_qkv = project_shared_input((self.q_proj, self.k_proj, self.v_proj), hidden_states)
        query, key, value = projected_qkv
        query_states = query.view(hidden_shape).transpose(1, 2)  # (B, H, T, D)
        key_states = key.view(hidden_shape).transpose(1, 2)  # (B, H_kv, T, D)
        value_states = value.view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        if self._native_rope(query_states, key_states, cos, sin):
            query_states, key_states = rope_native(query_states, key_states, cos, sin)  # one call, equal bit for bit
        else:
            query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        attention_interface: Callable = eager_attention_forward
        own_attention = getattr(cache, "attention_implementation", None)
        if own_attention is not None:
            # A cache that reads its own store (the packed low-bit KV, paper section 2.4: attention over the packed
            # past, no dequantised copy): its attention function takes the new keys and values and stores them
            attention_interface = ALL_ATTENTION_FUNCTIONS[own_attention]
            kwargs["cache"] = cache
        else:
            if cache is not None:
                key_states, value_states = cache.update(key_states, value_states, self.layer_idx)
            if self.config._attn_implementation not in (None, "eager"):
                attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self._output_projection(attn_output), attn_weights

    def _native_rope(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
        """Whether RoPE runs as one native call: packed CPU models on the native path (``q_proj.backend``), no
        gradient asked for, q, k and the tables of one native dtype in the shapes ``apply_rotary_pos_emb`` takes."""
        return (
            q.device.type == "cpu"
            and q.dtype in NATIVE_DTYPES
            and q.dtype == k.dtype == cos.dtype == sin.dtype
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))
            and cos.dim() == 3
            and cos.shape == sin.shape
            and cos.shape[0] in (1, q.shape[0])
            and cos.shape[1:] == q.shape[2:]
            and type(self.q_proj) is PackedBitLinear
            and self.q_proj.backend(q) == "native"
        )

    def project_qkv(self, x: torch.Tensor, input_norm: nn.Module) -> list[torch.Tensor] | None:
        """q, k, v of ``input_norm(x)`` in one native call, or None where it does not apply (hooks on this module,
        latent weights, other devices: ``packed_bitlinear.fused_projection``)."""
        if has_forward_hooks(self):
            return None
        return fused_projection((self.q_proj, self.k_proj, self.v_proj), x, norm=input_norm)

    def _output_projection(self, attn_output: torch.Tensor) -> torch.Tensor:
        """``o_proj(attn_sub_norm(attn_output))``: SubLN before o_proj, as b1.58 (one native call when packed)."""
        fused = fused_projection((self.o_proj,), attn_output, norm=self.attn_sub_norm)
        return fused[0] if fused is not None else self.o_proj(self.attn_sub_norm(attn_output))


class BitNetA48DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: BitNetA48Config, layer_idx: int) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = BitNetA48Attention(config=config, layer_idx=layer_idx)
        self.mlp = BitNetA48MLP(config)
        self.input_layernorm = BitNetA48RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = BitNetA48RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Packed CPU models in decode: the whole layer in one native call where every part has a native path
        fused = decoder_layer_decode(self, hidden_states, attention_mask, position_ids, cache, position_embeddings)
        if fused is not None:
            return fused, None
        residual = hidden_states
        # Packed CPU models: each input norm is fused into the projections that read it (one native call); only
        # tensors are passed between modules, so hooks (accelerate's offload among them) see what they expect.
        qkv = self.self_attn.project_qkv(hidden_states, self.input_layernorm)
        hidden_states, attn_weights = self.self_attn(
            hidden_states=hidden_states if qkv is not None else self.input_layernorm(hidden_states),
            projected_qkv=None if qkv is None else tuple(qkv),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        glu = None
        if not has_forward_hooks(self.mlp):
            glu = self.mlp.fused_gate_up(hidden_states, self.post_attention_layernorm)
        if glu is None:
            mlp_out = self.mlp(self.post_attention_layernorm(hidden_states))
        else:
            mlp_out = self.mlp.project_down(glu)
        hidden_states = hidden_states + mlp_out
        return hidden_states, attn_weights


class BitNetA48RotaryEmbedding(nn.Module):
    """cos/sin tables of RoPE for the positions asked (transformers' rope types through ROPE_INIT_FUNCTIONS)."""

    inv_freq: torch.Tensor

    def __init__(self, config: BitNetA48Config) -> None:
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        if self.rope_type == "default":
            inv_freq, self.attention_scaling = self.compute_default_rope_parameters(config)
        else:
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[self.rope_type](config, None)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(
        config: BitNetA48Config, device: torch.device | None = None, seq_len: int | None = None
    ) -> tuple[torch.Tensor, float]:
        """inv_freq[i] = theta^(-2i/D) for i < D/2."""
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
        inv_freq = 1.0 / (base**exponents)
        return inv_freq, 1.0

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


class BitNetA48PreTrainedModel(PreTrainedModel):
    config_class = BitNetA48Config
    config: BitNetA48Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BitNetA48DecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]  # both names of the KV-cache argument
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether activation checkpointing is on in any layer.

        transformers 5.24 renamed this `is_activation_checkpointing` and warns on the old name, which PEFT (0.21) still
        reads when it wraps a model; answered here from the layers' own flags, under both names, without a warning.
        """
        return any(getattr(module, "gradient_checkpointing", False) for module in self.modules())


class BitNetA48Model(BitNetA48PreTrainedModel):
    def __init__(self, config: BitNetA48Config) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [BitNetA48DecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = BitNetA48RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = BitNetA48RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """The decoder stack; `cache` is the KV cache (`past_key_values`, its name before transformers 5.24, too)."""
        cache = resolve_cache_argument(cache, past_key_values, kwargs)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, sequence), got {tuple(input_ids.shape)}")
        if input_ids is not None and not torch.compiler.is_compiling():
            check_token_ids(input_ids, self.config.vocab_size)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        kwargs.pop("return_dict", None)
        kwargs.pop("cache_position", None)  # positions come from position_ids and the cache length

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{MASK_CACHE_ARG: cache},
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        all_hidden_states: tuple[torch.Tensor, ...] | None = () if output_hidden_states else None
        all_attentions: tuple[torch.Tensor, ...] | None = () if output_attentions else None
        for decoder_layer in self.layers:
            if all_hidden_states is not None:
                all_hidden_states += (hidden_states,)
            hidden_states, attn_weights = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache if use_cache else None,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
            if all_attentions is not None:
                all_attentions += (attn_weights,)
        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states += (hidden_states,)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            **{OUTPUT_CACHE_FIELD: cache if use_cache else None},
        )


class BitNetA48ForCausalLM(BitNetA48PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # No `_tp_plan`, not even for lm_head: see `BitNetA48Config.base_model_tp_plan`.

    def __init__(self, config: BitNetA48Config) -> None:
        super().__init__(config)
        self.model = BitNetA48Model(config)
        self.vocab_size = config.vocab_size
        # The embeddings and lm_head stay in high precision (not quantised), as in b1.58 and a4.8.
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Causal LM forward; `labels` (B, T) give the shifted next-token loss through `self.loss_function`.

        `cache` is the KV cache (`past_key_values`, its name before transformers 5.24, works too); the output carries
        it in the field the installed transformers names (`cache` from 5.24, `past_key_values` before).
        """
        outputs = self.model(  # the base model resolves the two cache names (and refuses foreign ones)
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:, :] if logits_to_keep > 0 else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep, :]
        logits = head_logits(self.lm_head, hidden_states)  # a decode step's few rows: the native GEMV

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{OUTPUT_CACHE_FIELD: output_cache(outputs)},
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()

    def _prepare_cache_for_generation(
        self, generation_config: Any, model_kwargs: dict, *args: Any, **kwargs: Any
    ) -> Any:
        """generate() builds the quantised KV cache (cache_bitnet_a48.py) by default when `config.kv_cache_bits` is set.

        Private transformers API, pinned by tests/test_generate.py on every release CI runs. generate() keeps its cache
        in `model_kwargs` under `GENERATE_CACHE_KEY` (`cache` from 5.24, `past_key_values` before). A cache passed by
        the user (which generate() then fills and returns), a `cache_implementation` or `use_cache=False` keep
        transformers' behaviour.
        """
        if (
            getattr(self.config, "kv_cache_bits", None) is not None
            and model_kwargs.get(GENERATE_CACHE_KEY) is None
            and generation_config.use_cache is not False
            and generation_config.cache_implementation is None
        ):
            batch_size = args[1] if len(args) > 1 else kwargs.get("batch_size", 1)
            max_cache_len = args[2] if len(args) > 2 else kwargs.get("max_cache_length")
            model_kwargs[GENERATE_CACHE_KEY] = make_generation_cache(
                self.config, batch_size, max_cache_len, self.device, self.dtype
            )
            return None
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' `from_pretrained`, made strict: a missing or mis-shaped tensor is an error naming it.

        transformers only warns about missing weights and initialises them at random; a quantised model that loads
        half-random gives plausible-looking garbage, so here it is refused. Weights load from safetensors only, and the
        files of a local folder are checked first (`checkpoint_files.py`): a truncated file or a bad header is one
        `ValueError` naming the file.
        """
        if kwargs.get("use_safetensors") is False:
            raise ValueError(f"{cls.__name__} loads safetensors weights only (use_safetensors=False was passed)")
        kwargs["use_safetensors"] = True  # never unpickle a checkpoint
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if source is not None and os.path.isdir(source):  # a local folder: one clear line for a bad file
            validate_safetensors_files(os.path.join(source, kwargs.get("subfolder") or ""))
        want_info = kwargs.pop("output_loading_info", False)
        # Let transformers collect the mismatched shapes (instead of failing with a generic message) and refuse below.
        kwargs["ignore_mismatched_sizes"] = True
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = [f"missing tensor {key!r}" for key in sorted(info.get("missing_keys", ()))]
        for entry in info.get("mismatched_keys", ()):
            if isinstance(entry, (tuple, list)) and len(entry) == 3:
                key, found, expected = entry
                problems.append(f"tensor {key!r} has shape {tuple(found)} where the model needs {tuple(expected)}")
            else:
                problems.append(f"tensor {entry!r} has a mismatched shape")
        if problems:
            raise ValueError(
                f"{cls.__name__}: the checkpoint does not fit the model ({'; '.join(problems)}). "
                "Convert b1.58 or LLaMA checkpoints with `bitnet-a48 convert`."
            )
        for name, module in model.projections().items():
            if hasattr(module, "validate"):  # packed layers: no invalid 2-bit code 3, a finite scale
                try:
                    module.validate()
                except ValueError as error:
                    raise ValueError(f"{cls.__name__}: corrupted checkpoint tensor {name}.{error}") from None
        return (model, info) if want_info else model

    def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' `save_pretrained`, refused while the head is the int8 inference copy (`quantize_lm_head`)."""
        from .int8_linear import Int8Linear

        if isinstance(self.lm_head, Int8Linear):
            raise ValueError(
                "the model's lm_head is the int8 inference copy made by quantize_lm_head('int8'), which is not "
                "saved; save the model before quantizing its head (the embeddings keep the high-precision weights)"
            )
        return super().save_pretrained(*args, **kwargs)

    def quantize_lm_head(self, head_format: str = "int8") -> BitNetA48ForCausalLM:
        """Replace the high-precision lm_head by an int8 copy for CPU decode (`int8_linear.py`), in place.

        An explicit inference option, off by default: a4.8 keeps the head in high precision. With tied embeddings the
        embedding keeps its weights (the input side is unchanged); an untied head's high-precision weights are freed.
        """
        from .int8_linear import Int8Linear

        if head_format != "int8":
            raise ValueError(f"quantize_lm_head supports head_format='int8', got {head_format!r}")
        if isinstance(self.lm_head, Int8Linear):
            raise ValueError("the lm_head is already int8")
        self.lm_head = Int8Linear.from_linear(self.lm_head)
        return self

    def push_to_hub(self, repo_id: str, *, metrics: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """Upload what `save_pretrained` writes, with this project's model card as the repository's README.md.

        transformers' own `push_to_hub` writes its generic card over README.md after saving; this one saves, fills
        `model_card.md` from the config (and `metrics`, e.g. validation perplexity) and uploads in one commit.
        Keyword arguments: `tokenizer`, `private`, `token`, `revision`, `create_pr`, `commit_message`, and card
        fields (`recipe`, `data`, `model_name`); see `hub.push_to_hub_with_card`.
        """
        from .hub import push_to_hub_with_card

        return push_to_hub_with_card(self, repo_id, metrics, **kwargs)

    # -----------------------------------------------------------------------------------------------------
    # Quantisation controls
    # -----------------------------------------------------------------------------------------------------

    def set_quant_mode(
        self, quant_mode: str, topk_ratio: float | None = None, act4_format: str | None = None
    ) -> BitNetA48ForCausalLM:
        """Switch every projection to "a4.8", "a8" or "none" (and optionally the TopK ratio and 4-bit format).

        The config is updated too, so `save_pretrained` records the mode. The two-stage recipe calls
        `set_quant_mode("a8")` for stage 1 and `set_quant_mode("a4.8")` for stage 2 on the same model.
        """
        new_config = self.config.to_dict()
        new_config["quant_mode"] = quant_mode
        if topk_ratio is not None:
            new_config["topk_ratio"] = topk_ratio
        if act4_format is not None:
            new_config["act4_format"] = act4_format
        BitNetA48Config(**{k: v for k, v in new_config.items() if k != "model_type"})  # validates all fields
        for module in self.modules():
            if hasattr(module, "set_quant_mode") and module is not self:
                module.set_quant_mode(quant_mode, topk_ratio=topk_ratio, act4_format=act4_format)
        self.config.quant_mode = quant_mode
        if topk_ratio is not None:
            self.config.topk_ratio = float(topk_ratio)
        if act4_format is not None:
            self.config.act4_format = act4_format
        return self

    def pack(self) -> BitNetA48ForCausalLM:
        """Replace every latent `BitLinear` by a `PackedBitLinear` (2-bit ternary codes + per-tensor scale), in place.

        The packed model is for inference: it keeps the current `quant_mode` ("a4.8" or "a8") and `save_pretrained`
        writes the packed tensors, which `from_pretrained` loads back into packed modules (`weight_format="packed"`).
        """
        if self.config.weight_format == "packed":
            raise ValueError("the model is already packed (config.weight_format == 'packed')")
        if self.config.quant_mode == "none":
            raise ValueError("packing needs a quantised mode ('a4.8' or 'a8'); quant_mode is 'none'")
        for name, module in list(self.projections().items()):
            parent_name, child_name = name.rsplit(".", 1)
            setattr(self.get_submodule(parent_name), child_name, PackedBitLinear.from_bitlinear(module))
        self.config.weight_format = "packed"
        return self

    def projections(self) -> dict[str, nn.Module]:
        """Every quantised projection by its qualified name (q/k/v/o/gate/up/down of every layer)."""
        return {name: module for name, module in self.named_modules() if is_projection(name)}
