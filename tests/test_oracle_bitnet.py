"""External oracle: transformers' own BitNetForCausalLM on the same weights.

With quant_mode="a8" our model runs the b1.58 arithmetic (ternary absmean weights, INT8 absmax inputs), which is
what transformers' `AutoBitLinear` does in online mode; with quant_mode="none" both are plain full-precision models.
"""

import pytest
import torch
from transformers import BitNetConfig, BitNetForCausalLM
from transformers.integrations.bitnet import replace_with_bitnet_linear
from transformers.utils.quantization_config import BitNetQuantConfig

from bitnet_a48 import create_model

SHAPE = dict(vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# Quantised logits agree up to float rounding: the dequantisation multiplies where transformers divides.
LOGITS_ATOL = 1e-5


@pytest.fixture(scope="module")
def pair() -> tuple[BitNetForCausalLM, torch.nn.Module]:
    torch.manual_seed(0)
    reference = BitNetForCausalLM(BitNetConfig(**SHAPE, rope_parameters={"rope_type": "default",
                                                                          "rope_theta": 500000.0})).eval()
    ours = create_model(**SHAPE, rope_theta=500000.0, quant_mode="none", kv_cache_bits=None).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)  # same names, one to one
    return reference, ours


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"max {(a - b).abs().max().item():.3g}, mean {(a - b).abs().mean().item():.3g}"


def test_full_precision_equals_transformers(pair) -> None:
    reference, ours = pair
    ids = torch.randint(3, 101, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits
    assert torch.allclose(a, b, atol=LOGITS_ATOL), _max_diff(a, b)


def test_a8_equals_transformers_autobitlinear_online(pair) -> None:
    reference, ours = pair
    quantized = BitNetForCausalLM(reference.config).eval()
    replace_with_bitnet_linear(
        quantized, modules_to_not_convert=["lm_head"],
        quantization_config=BitNetQuantConfig(linear_class="autobitlinear", quantization_mode="online"),
    )
    quantized = quantized.to_empty(device="cpu")
    quantized.load_state_dict(reference.state_dict(), strict=True)
    quantized.model.rotary_emb.inv_freq.copy_(reference.model.rotary_emb.inv_freq)
    ours.set_quant_mode("a8")
    ids = torch.randint(3, 101, (3, 16))
    # transformers wraps its quantisers in torch.compile; eager execution is the same arithmetic and faster to test.
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        a, b = ours(ids).logits, quantized(ids).logits
        full = reference(ids).logits
    assert torch.allclose(a, b, atol=LOGITS_ATOL), _max_diff(a, b)
    assert not torch.allclose(a, full, atol=1e-3), "the quantised logits should differ from full precision"
