"""The optional int8 lm_head: layer against its reference, the model option, and its effect on a trained model."""

import pytest
import torch
import torch.nn.functional as F
from make_copy_model import OUT as COPY_MODEL  # tests/ is on sys.path
from make_copy_model import copy_corpus
from torch import nn

from bitnet_a48.int8_linear import Int8Linear, int8_linear_torch
from bitnet_a48.modeling_bitnet_a48 import BitNetA48ForCausalLM
from bitnet_a48.quantization import quantize_weight_int8_rows


def test_weight_quantizer_is_symmetric_per_row() -> None:
    w = torch.randn(7, 33) * torch.arange(1, 8).view(7, 1)
    codes, scale = quantize_weight_int8_rows(w)
    assert codes.dtype == torch.int8 and scale.shape == (7,)
    assert codes.abs().max() == 127 and (codes.abs().amax(-1) == 127).all()
    err = (codes.float() * scale.view(7, 1) - w).abs().amax(-1)
    assert (err <= scale / 2 * 1.0001).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_equals_reference_and_approximates_the_linear(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 50, bias=False).to(dtype)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(2, 3, 96, dtype=dtype)
    y = layer(x)
    want = int8_linear_torch(x.reshape(6, 96), layer.weight_int8, layer.weight_scale).reshape(2, 3, 50)
    assert y.dtype == dtype and torch.equal(y, want)
    ref = linear(x).float()
    rel = ((y.float() - ref).norm() / ref.norm()).item()
    assert rel < 0.02, f"int8 head relative error {rel:.4f}"


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="with a bias"):
        Int8Linear.from_linear(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="takes an nn.Linear"):
        Int8Linear.from_linear(nn.Conv1d(4, 4, 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="last dimension 8"):
        Int8Linear(8, 4)(torch.randn(2, 5))


@pytest.fixture(scope="module")
def copy_model() -> BitNetA48ForCausalLM:
    return BitNetA48ForCausalLM.from_pretrained(COPY_MODEL).eval()


def test_model_option_keeps_greedy_tokens_and_perplexity(copy_model: BitNetA48ForCausalLM, tmp_path) -> None:  # noqa: ANN001
    int8 = BitNetA48ForCausalLM.from_pretrained(COPY_MODEL).eval().quantize_lm_head("int8")
    assert isinstance(int8.lm_head, Int8Linear)
    data = copy_corpus(8, seed=10_000)
    with torch.no_grad():
        nll = [F.cross_entropy(m(data).logits[:, :-1].flatten(0, 1), data[:, 1:].flatten()).item()
               for m in (copy_model, int8)]  # fmt: skip
        prompt = data[:, :30]
        kw = dict(max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(prompt))
        agree = (copy_model.generate(prompt, **kw) == int8.generate(prompt, **kw)).float().mean().item()
    assert abs(nll[1] / nll[0] - 1) < 0.01, f"log-perplexity {nll[1]:.4f} against {nll[0]:.4f}"
    assert agree >= 0.95, f"only {agree:.0%} of greedy tokens agree"
    with pytest.raises(ValueError, match="int8 inference copy"):
        int8.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="already int8"):
        int8.quantize_lm_head("int8")
    with pytest.raises(ValueError, match="head_format='int8'"):
        copy_model.quantize_lm_head("int4")


def test_tied_embeddings_survive_weight_tying() -> None:
    from conftest import TINY_CONFIG

    from bitnet_a48 import BitNetA48Config

    config = BitNetA48Config(**TINY_CONFIG, tie_word_embeddings=True)
    model = BitNetA48ForCausalLM(config).eval()
    embedding = model.model.embed_tokens.weight.detach().clone()
    model.quantize_lm_head()
    model.tie_weights()
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert model.lm_head.weight_int8.dtype == torch.int8
    ids = torch.randint(3, config.vocab_size, (1, 5))
    with torch.no_grad():
        assert model(ids).logits.shape == (1, 5, config.vocab_size)
