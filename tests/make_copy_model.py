"""Write tests/data/copy_model/: the tiny a4.8 model that the KV-cache quality tests evaluate.

The model learns to copy a repeated random segment (an induction task that needs the cached past). Training it in
the test made the test depend on the CPU: float rounding differs between vector instruction sets and 250 steps turn
it into a different model (3-bit perplexity gap 1.2% on AVX-512, 4.7% on AVX2). The tests load these fixed weights
instead, so every machine evaluates the same model. Run from the repository root to regenerate:

    python tests/make_copy_model.py
"""

from __future__ import annotations

from pathlib import Path

import torch

from bitnet_a48 import BitNetA48Config, BitNetA48ForCausalLM

OUT = Path(__file__).parent / "data" / "copy_model"
SEED, STEPS = 3, 300  # a seed and length at which the copy behaviour is learned (loss 1.56; seed 0 reached 2.17)


def copy_corpus(n: int, seed: int, segment: int = 21, repeats: int = 3) -> torch.Tensor:
    """BOS + a random segment repeated: the repeats are predictable only by attending to the cached past."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(3, 101, (n, segment), generator=g)
    return torch.cat([torch.ones(n, 1, dtype=torch.long), seg.repeat(1, repeats)], 1)


def main() -> None:
    torch.manual_seed(SEED)
    config = BitNetA48Config(vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                             eos_token_id=2, kv_cache_bits=3)  # fmt: skip
    model = BitNetA48ForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(STEPS):  # the copy (induction) behaviour appears after ~150 steps
        x = copy_corpus(32, seed=step)
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"final training loss {loss.item():.3f}")
    model.save_pretrained(OUT)
    for code in OUT.glob("*.py"):  # the runtime code save_pretrained copies for remote code: the tests use the package
        code.unlink()


if __name__ == "__main__":
    main()
