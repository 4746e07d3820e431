"""The model card template of a BitNet a4.8 checkpoint (``string.Template`` placeholders, filled by ``hub.py``).

A Python module rather than a data file: transformers' remote-code loader copies a model's ``.py`` files and their
relative imports into its modules cache, and nothing else, so a model loaded with ``trust_remote_code=True`` finds
the template only this way. ``model_card.md`` at the repository root is a readable copy (tests/test_hub.py keeps
the two equal).
"""

MODEL_CARD_TEMPLATE = """---
library_name: transformers
pipeline_tag: text-generation
license: ${license}
tags:
- bitnet
- bitnet-a4.8
- ternary
- 1.58-bit
- 4-bit-activations
- custom_code
${base_model_line}---

# ${model_name}

A BitNet a4.8 language model ("BitNet a4.8: 4-bit Activations for 1-bit LLMs", Wang, Ma, Wei, arXiv 2411.04965):
ternary (1.58-bit) weights, 4-bit inputs to the attention and gate/up projections, TopK-sparse 8-bit input to the
attention output projection, 8-bit input to the down projection, and a ${kv_cache} KV cache. Built with the
`bitnet-a48` package for Hugging Face transformers.

## Architecture

| field | value |
|---|---|
| parameters | ${parameters} |
| layers / hidden / FFN | ${num_hidden_layers} / ${hidden_size} / ${intermediate_size} |
| attention heads / KV heads / head dim | ${num_attention_heads} / ${num_key_value_heads} / ${head_dim} |
| vocabulary | ${vocab_size} |
| gate activation | ${hidden_act} (GLU, SubLN before o_proj and down_proj) |
| RoPE | ${rope} |
| tied embeddings | ${tie_word_embeddings} |
| context length | ${max_position_embeddings} |

## Quantisation

| field | value |
|---|---|
| arithmetic (`quant_mode`) | ${quant_mode} |
| weight format | ${weight_format} |
| 4-bit activation format | ${act4_format} |
| TopK ratio of the o_proj input | ${topk_ratio} |
| KV cache | ${kv_cache} |
| weight bytes (latent bf16 → packed 2-bit) | ${weight_bytes} |

## Training recipe

${recipe}

## Data

${data}

## Evaluation

${metrics}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("${repo_id}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("${repo_id}")
inputs = tokenizer("The quick brown fox", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))
```

With `bitnet-a48` installed, `trust_remote_code` is not needed. `model.set_quant_mode("a8" | "a4.8")` switches the
activation arithmetic of a latent model; `model.pack()` turns it into 2-bit inference weights.

## Limitations

The quantised arithmetic is simulated in PyTorch (fake quantisation for latent weights, integer matmuls for packed
ones); speed depends on the kernels available on the device. The model inherits the biases and failure modes of its
training data and has not been evaluated for safety.

## Citation

```bibtex
@article{wang2024bitnet,
  title   = {BitNet a4.8: 4-bit Activations for 1-bit LLMs},
  author  = {Wang, Hongyu and Ma, Shuming and Wei, Furu},
  journal = {arXiv preprint arXiv:2411.04965},
  year    = {2024}
}
```
"""
