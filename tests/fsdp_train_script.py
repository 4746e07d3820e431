"""Two FSDP2 training steps of a tiny latent BitNet a4.8 model on CPU (gloo), checked against one process.

Launched by ``tests/test_accelerate.py``::

    ACCELERATE_USE_CPU=1 accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 \
        tests/fsdp_train_script.py --out result.json

accelerate 1.15 starts the two processes (torchrun) and the gloo process group, but it only turns on FSDP for
accelerator devices: on CPU its state reports ``MULTI_CPU`` and ``Accelerator.prepare`` would wrap the model in DDP,
the FSDP plugin being dropped (without ``cpu=True`` the processes even come up as two unconnected single runs,
``DistributedType.NO``). So the sharding here is torch's own ``fully_shard`` (FSDP2), applied to every module class
in ``model._no_split_modules`` and then to the root, which is what accelerate's transformer-based wrap policy does.

Every rank also trains an unsharded copy on the whole batch; the sharded run takes half the batch per rank, so its
averaged gradients, and after two AdamW steps its parameters, must equal the copy's up to rounding.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from bitnet_a48 import BitNetA48Config, BitNetA48ForCausalLM

TINY = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    kv_cache_bits=None,
)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON report written by rank 0")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4, help="global batch, split evenly over the ranks")
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--quant-mode", default="a4.8")
    args = parser.parse_args(argv)

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the {world} processes")

    torch.manual_seed(0)  # the same initial weights and data on every rank
    model = BitNetA48ForCausalLM(BitNetA48Config(**TINY, quant_mode=args.quant_mode)).train()
    reference = copy.deepcopy(model)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    data = torch.randint(3, TINY["vocab_size"], (args.steps, args.batch_size, args.seq_len))

    ref_opt = torch.optim.AdamW(reference.parameters(), lr=args.lr)
    ref_losses = [_step(reference, ref_opt, data[s]) for s in range(args.steps)]

    wrapped = []
    for name, module in model.named_modules():
        if type(module).__name__ in model._no_split_modules:
            fully_shard(module)
            wrapped.append(name)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = []
    for s in range(args.steps):
        local_loss = torch.tensor(_step(model, opt, data[s, rank::world]))
        dist.all_reduce(local_loss)  # equal token counts per rank: the mean of the rank losses is the batch loss
        losses.append(float(local_loss) / world)

    sharded = {name: p.to_local().numel() < p.numel() for name, p in model.named_parameters() if isinstance(p, DTensor)}
    ref_params = dict(reference.named_parameters())
    max_diff, diff_sq, change_sq = 0.0, 0.0, 0.0
    for name, p in model.named_parameters():
        full = _full(p.detach())
        diff = full - ref_params[name].detach()
        max_diff = max(max_diff, float(diff.abs().max()))
        diff_sq += float(diff.square().sum())
        change_sq += float((full - initial[name]).square().sum())
    report = {
        "world_size": world,
        "backend": dist.get_backend(),
        "accelerate_distributed_type": str(accelerator.distributed_type),
        "fsdp_modules": wrapped,
        "root_is_fsdp": isinstance(model, FSDPModule),
        "parameters": len(sharded),
        "sharded_parameters": sum(sharded.values()),
        "losses": losses,
        "reference_losses": ref_losses,
        "max_param_diff": max_diff,
        # |sharded - reference| / |update|: AdamW's first steps amplify rounding where a gradient is near 0
        "relative_param_diff": (diff_sq / change_sq) ** 0.5 if change_sq else float("inf"),
        "param_update_norm": change_sq**0.5,
    }
    if rank == 0:
        args.out.write_text(json.dumps(report, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return report


if __name__ == "__main__":
    main()
