"""Quality of the int8 lm_head option (``quantize_lm_head("int8")``) on a trained model, packed, on the CPU.

Loads a model folder (the quickstart writes ``outputs/quickstart/bitnet-a48-model``), packs it if it is latent, and
compares the model as it is (high-precision head) with the same model after ``quantize_lm_head("int8")``:

- validation perplexity on the quickstart's held-out documents (every tenth Shakespeare play, ``data.load_corpus``
  with its defaults), in blocks of ``--seq-len`` tokens (``--blocks`` of them);
- greedy-token agreement: ``--prompts`` prompts of 32 tokens from those documents, ``--new-tokens`` greedy tokens
  each through ``generate()`` with the default 3-bit KV cache; the share of positions where both models chose the
  same token (positions after a first disagreement count too: the continuations then differ in context).

    python benchmarks/eval_int8_head.py outputs/quickstart/bitnet-a48-model
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from bitnet_a48 import BitNetA48ForCausalLM
from bitnet_a48.data import load_corpus, pack_documents


@torch.no_grad()
def perplexity(model: BitNetA48ForCausalLM, blocks: torch.Tensor, batch: int = 8) -> float:
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch):
        ids = blocks[start : start + batch]
        logits = model(ids, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        total += nll.item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def greedy(model: BitNetA48ForCausalLM, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)  # fmt: skip
    return out[:, prompts.shape[1] :]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model folder written by save_pretrained (with its tokenizer)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = BitNetA48ForCausalLM.from_pretrained(args.model).eval()
    if model.config.weight_format == "latent":
        model.pack()
    validation = pack_documents(tokenizer, load_corpus().validation, args.seq_len).blocks
    blocks = validation[: args.blocks]
    prompts = validation[-args.prompts :, :32]
    base_ppl = perplexity(model, blocks)
    base_tokens = greedy(model, prompts, args.new_tokens)
    head_dtype = model.lm_head.weight.dtype
    model.quantize_lm_head("int8")
    int8_ppl = perplexity(model, blocks)
    int8_tokens = greedy(model, prompts, args.new_tokens)
    agree = (base_tokens == int8_tokens).float().mean().item()
    first = (base_tokens[:, 0] == int8_tokens[:, 0]).float().mean().item()
    print(f"{args.model}: {model.config.quant_mode}, packed, vocabulary {model.config.vocab_size}, "
          f"{blocks.numel()} validation tokens, {args.prompts} prompts x {args.new_tokens} greedy tokens")
    print("| head | validation perplexity | greedy tokens equal to the high-precision head's |")
    print("|---|---:|---:|")
    print(f"| {str(head_dtype).replace('torch.', '')} (default) | {base_ppl:.3f} | - |")
    print(f"| int8 per row | {int8_ppl:.3f} ({int8_ppl / base_ppl - 1:+.2%}) | {agree:.1%} (first token {first:.0%}) |")


if __name__ == "__main__":
    main()
