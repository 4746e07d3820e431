"""The ``bitnet-a48`` command line.

Subcommands are registered in :data:`SUBCOMMANDS`: each entry is a function that adds its parser (with
``set_defaults(func=...)``) to the subparsers. Building the parsers imports neither torch nor transformers, so
``--help`` answers at once: each command imports what it needs when it runs, and :func:`main` registers the Auto
classes first. Bad input (a usage error, ``ValueError``, ``OSError`` such as a missing file, ``ImportError`` of an
optional package) ends as one ``error:`` line on stderr, exit status 2.

    bitnet-a48 quickstart                         # fp / b1.58 / a4.8 on the embedded Shakespeare corpus, ~12 min
    bitnet-a48 train --recipe a4.8 --data corpus.jsonl --preset small --output-dir runs/a48
    accelerate launch --num_processes 2 -m bitnet_a48.cli train --recipe a4.8 ...
    bitnet-a48 generate runs/a48/final --prompt "ROMEO:"
    bitnet-a48 convert bitnet-b1.58-2B-4T-bf16 b158-latent --dtype fp32
    bitnet-a48 serve runs/a48/final --port 8000        # OpenAI-compatible API
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Choices spelled out here rather than imported from training.py (which imports transformers' Trainer, seconds):
# training.TRAIN_PRESETS and training.RECIPES / RECIPE_ALIASES, in that order; tests/test_cli.py checks they agree.
TRAIN_PRESET_NAMES = ("tiny", "quickstart", "small", "700M", "1.3B", "3B", "7B", "2B-4T")
RECIPE_NAMES = ("a4.8", "b1.58", "fp", "a8", "fp16", "full", "none")

# ---------------------------------------------------------------------------------------------------------
# Shared options
# ---------------------------------------------------------------------------------------------------------


def _add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="shakespeare",
                   help="'shakespeare' (embedded, default), a .txt/.md/.jsonl/.json/.parquet file or folder, or a "
                        "datasets Hub name")
    g.add_argument("--text-field", default="text", help="field holding the text in jsonl/parquet/Hub records")
    g.add_argument("--dataset-config", default=None, help="configuration name of a Hub dataset (e.g. 'en' for c4)")
    g.add_argument("--dataset-split", default="train", help="split of a Hub dataset to read documents from")
    g.add_argument("--max-documents", type=int, default=None, help="read only the first N documents (streams Hub)")
    g.add_argument("--validation-every", type=int, default=10,
                   help="document i goes to validation when i %% N == 0 (default 10)")
    g.add_argument("--tokenizer", default=None,
                   help="an existing tokenizer (folder or Hub name); default: train a byte-level BPE on the data")
    g.add_argument("--vocab-size", type=int, default=None, help="vocabulary of the trained BPE (default: preset)")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per packed sequence (default: preset)")


def _add_schedule_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("schedule")
    g.add_argument("--preset", default="quickstart", choices=TRAIN_PRESET_NAMES,
                   help="model shape and schedule (default: quickstart)")
    g.add_argument("--steps", "--max-steps", dest="steps", type=int, default=None, help="optimiser steps in total")
    g.add_argument("--batch-size", type=int, default=None, help="sequences per optimiser step, all processes")
    g.add_argument("--lr", type=float, default=None, help="first peak learning rate")
    g.add_argument("--second-lr", type=float, default=None, help="peak learning rate after mid-training")
    g.add_argument("--warmup-steps", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=0.1, help="weight decay of the first half (0 after)")
    g.add_argument("--stage2-fraction", type=float, default=0.05, help="share of steps in stage 2 (a4.8)")
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--eval-steps", type=int, default=None, help="validation loss every N steps (0: off)")
    g.add_argument("--seed", type=int, default=0)


def _recipe_from_args(args: argparse.Namespace, preset: dict[str, Any], recipe: str, **extra: Any) -> Any:
    from .training import RecipeConfig

    max_steps = args.steps or preset["max_steps"]
    return RecipeConfig(
        recipe=recipe,
        max_steps=max_steps,
        logging_steps=max(1, min(10, max_steps // 10)),
        batch_size=args.batch_size or preset["batch_size"],
        lr=args.lr or preset["lr"],
        second_lr=args.second_lr or preset["second_lr"] * (args.lr / preset["lr"] if args.lr else 1.0),
        warmup_steps=preset["warmup_steps"] if args.warmup_steps is None else args.warmup_steps,
        weight_decay=args.weight_decay,
        stage2_fraction=args.stage2_fraction,
        gradient_accumulation_steps=args.grad_accum,
        eval_steps=preset["eval_steps"] if args.eval_steps is None else args.eval_steps,
        eval_blocks=preset["eval_blocks"],
        seed=args.seed,
        **extra,
    )


def _prepare(args: argparse.Namespace, preset: dict[str, Any], resume: str | None = None) -> Any:
    from .training import prepare_data

    return prepare_data(
        args.data,
        seq_len=args.seq_len or preset["seq_len"],
        tokenizer_name=args.tokenizer,
        vocab_size=args.vocab_size or preset["vocab_size"],
        seed=args.seed,
        validation_every=args.validation_every,
        tokenizer_from=resume,  # on resume, the checkpoint's tokenizer
        text_field=args.text_field,
        dataset_config=args.dataset_config,
        dataset_split=args.dataset_split,
        max_documents=args.max_documents,
        streaming=getattr(args, "streaming", False),
        cache_dir=getattr(args, "data_cache_dir", None),
        num_proc=getattr(args, "num_proc", None),
    )


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _check_model_folder(model: str, hub_names: bool = False) -> None:
    """Before loading: a local folder needs a config.json (`from_pretrained` then checks its safetensors files).

    With ``hub_names``, a name that is not a local path (``org/model``) is left to transformers to resolve.
    """
    if not os.path.isdir(model):
        if hub_names and not model.startswith((".", "/", "~")) and not os.path.exists(model):
            return
        raise FileNotFoundError(f"model folder not found: {model}")
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise FileNotFoundError(f"{model}: no config.json, not a folder written by save_pretrained")


def _from_pretrained(auto_class: Any, name: str, trust_remote_code: bool) -> Any:
    """`auto_class.from_pretrained(name)`; an `OSError` (no such folder or Hub model, no network) names `name`."""
    try:
        return auto_class.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise OSError(f"cannot load {name!r}: {err}") from err


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


# ---------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one model with one recipe (a4.8 two-stage, b1.58 or full precision)",
                       description="Train one model on transformers' Trainer; resumable checkpoints, loss plot, "
                                   "validation perplexity and activation sparsity.")
    p.add_argument("--recipe", "--mode", dest="recipe", default="a4.8",
                   choices=RECIPE_NAMES,
                   help="a4.8 (a8 then a4.8), b1.58 (= a8), fp (= none)")
    p.add_argument("--hidden-act", default=None, choices=["relu2", "silu"],
                   help="GLU activation (default: relu2 for a4.8 as in the paper, silu for b1.58 and fp as published)")
    p.add_argument("--output-dir", default="bitnet-a48-run")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from a checkpoint folder, or the last complete one in --output-dir; refuses when "
                        "the data, tokenizer, model config or schedule differ from the checkpoint's")
    p.add_argument("--save-steps", type=int, default=0, help="write a resumable checkpoint every N steps")
    _add_schedule_options(p)
    _add_data_options(p)
    g = p.add_argument_group("data pipeline")
    g.add_argument("--streaming", action="store_true",
                   help="tokenise and pack while training, nothing cached (corpora larger than the disk); the "
                        "training blocks go through a 1024-block shuffle buffer instead of one permutation")
    g.add_argument("--data-cache-dir", default=None,
                   help="where tokens and blocks are cached (default: $BITNET_A48_DATA_CACHE or bitnet_a48 under "
                        "the datasets cache, ~/.cache/huggingface/datasets)")
    g.add_argument("--num-proc", type=int, default=None, help="processes of the tokenisation map (default: 1)")
    p.set_defaults(func=cmd_train)


def _resume_checkpoint(resume: str, output_dir: str) -> str:
    """The checkpoint `--resume` names: a folder, or ("latest") the last complete one in `output_dir`."""
    from .resume import RESUME_FILE, last_complete_checkpoint, read_resume_file

    if resume != "latest":
        read_resume_file(resume)  # a missing or incomplete folder fails here, in one line
        return resume
    found, skipped = last_complete_checkpoint(output_dir)
    if found is None:
        what = f" ({', '.join(p.name for p in skipped)} incomplete: no {RESUME_FILE})" if skipped else ""
        raise FileNotFoundError(f"--resume: no complete checkpoint-* folder in {output_dir}{what}")
    for folder in skipped:
        print(f"skipping {folder}: incomplete (no {RESUME_FILE}; its write was interrupted)", flush=True)
    return str(found)


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from .sparsity import format_sparsity_table, measure_sparsity
    from .training import (
        RECIPE_LABELS,
        RecipeConfig,
        build_model,
        evaluate_perplexity,
        get_preset,
        plot_loss_curves,
        resolve_recipe,
        save_model_and_tokenizer,
        train_recipe,
        world_size,
        write_json,
    )

    preset = get_preset(args.preset)
    recipe_name = resolve_recipe(args.recipe)
    _check_positive(args, "steps", "batch_size", "seq_len", "vocab_size", "grad_accum")
    recipe: RecipeConfig = _recipe_from_args(args, preset, recipe_name, save_steps=args.save_steps)
    resume = _resume_checkpoint(args.resume, args.output_dir) if args.resume else None
    if resume is not None:
        print(f"resuming from {resume}", flush=True)
    data = _prepare(args, preset, resume=resume)
    print(data.description, flush=True)
    model = build_model(preset["model"], data.tokenizer, recipe.stage_modes[0], seed=args.seed,
                        hidden_act=args.hidden_act or ("relu2" if recipe_name == "a4.8" else "silu"))
    result = train_recipe(model, recipe, data.train, data.validation, args.output_dir, tokenizer=data.tokenizer,
                          resume_from_checkpoint=resume, fingerprint=data.fingerprint)
    if not _is_main_process():
        return {}
    out = Path(args.output_dir)
    ppl = evaluate_perplexity(result.model, data.validation, batch_size=recipe.batch_size,
                              max_blocks=preset["final_eval_blocks"])
    sparsity = measure_sparsity(result.model, data.validation.select_blocks(64))
    save_model_and_tokenizer(result.model, data.tokenizer, out / "final")
    plot_loss_curves({RECIPE_LABELS[recipe.recipe]: result.log_history}, out / "loss_curve.png",
                     switch_step=result.switch_step if recipe.recipe == "a4.8" else None)
    metrics = {"recipe": recipe.recipe, "perplexity": ppl, "sparsity": sparsity, "steps": result.steps,
               "tokens": result.tokens, "seconds": result.seconds, "processes": world_size(), "data": data.description,
               "log_history": result.log_history}
    write_json(out / "metrics.json", metrics)
    print(format_sparsity_table({recipe.recipe: sparsity}, {recipe.recipe: ppl}))
    print(f"saved {out / 'final'}, {out / 'loss_curve.png'}, {out / 'metrics.json'}")
    return metrics


# ---------------------------------------------------------------------------------------------------------
# quickstart
# ---------------------------------------------------------------------------------------------------------


def add_quickstart_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="reproduce the paper's central result in miniature (~12 min on 2 cores)",
                       description="Train full precision, BitNet b1.58 and BitNet a4.8 (two stages) of one shape on "
                                   "the same data, print perplexity and sparsity, save and reload the a4.8 model, "
                                   "and generate a sample.")
    p.add_argument("--output-dir", default="bitnet-a48-quickstart")
    p.add_argument("--baseline-act", default="silu", choices=["silu", "relu2"],
                   help="GLU activation of the fp and b1.58 baselines (silu: LLaMA and b1.58 as published)")
    p.add_argument("--prompt", default="ROMEO:\n")
    p.add_argument("--max-new-tokens", type=int, default=60)
    _add_schedule_options(p)
    _add_data_options(p)
    p.set_defaults(func=cmd_quickstart)


def cmd_quickstart(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline, set_seed

    from .sparsity import format_sparsity_table, measure_sparsity
    from .training import (
        RECIPE_LABELS,
        RecipeConfig,
        build_model,
        evaluate_perplexity,
        get_preset,
        plot_loss_curves,
        save_model_and_tokenizer,
        train_recipe,
        write_json,
    )

    start = time.perf_counter()
    preset = get_preset(args.preset)
    _check_positive(args, "steps", "batch_size", "seq_len", "vocab_size", "grad_accum", "max_new_tokens")
    recipes = {name: _recipe_from_args(args, preset, name) for name in ("fp", "b1.58", "a4.8")}
    switch = recipes["a4.8"].switch_step
    recipes["a4.8"].save_steps = switch  # a checkpoint at the switch, where b1.58 with ReLU²GLU branches off
    data = _prepare(args, preset)
    print(data.description, flush=True)
    out = Path(args.output_dir)

    def perplexity_of(model: Any) -> float:
        return evaluate_perplexity(model, data.validation, batch_size=recipes["fp"].batch_size,
                                   max_blocks=preset["final_eval_blocks"])

    ppl: dict[str, float] = {}
    sparsity: dict[str, dict[str, float]] = {}
    steps: dict[str, int] = {}
    tokens: dict[str, int] = {}
    seconds: dict[str, float] = {"tokenizer": data.tokenizer_seconds}
    histories: dict[str, list[dict[str, float]]] = {}
    sparsity_blocks = data.validation.select_blocks(64)
    final_model = None
    for name, recipe in recipes.items():
        act = "relu2" if name == "a4.8" else args.baseline_act
        print(f"\n== {RECIPE_LABELS[name]} ({name}: {' -> '.join(dict.fromkeys(recipe.stage_modes))}, {act}) ==",
              flush=True)
        model = build_model(preset["model"], data.tokenizer, recipe.stage_modes[0], seed=args.seed, hidden_act=act)
        result = train_recipe(model, recipe, data.train, data.validation, out / "runs" / name,
                              tokenizer=data.tokenizer, keep_stage1=name == "a4.8", fingerprint=data.fingerprint)
        tick = time.perf_counter()
        label = RECIPE_LABELS[name]
        ppl[label] = perplexity_of(result.model)
        sparsity[label] = measure_sparsity(result.model, sparsity_blocks)
        steps[label], tokens[label], seconds[label] = result.steps, result.tokens, result.seconds
        histories[label] = result.log_history
        if name == "a4.8" and result.stage1_state is not None:
            # The stage-1 model without stage 2: the same weights at the switch, evaluated in a4.8 and a8.
            stage1 = build_model(preset["model"], data.tokenizer, "a4.8", seed=args.seed, hidden_act=act)
            stage1.load_state_dict(result.stage1_state)
            stage1.to(next(result.model.parameters()).device)
            ppl["a4.8 without stage 2"] = perplexity_of(stage1)
            sparsity["a4.8 without stage 2"] = measure_sparsity(stage1, sparsity_blocks)
            del stage1
            # b1.58 with ReLU²GLU (a8 all the way): its first `switch` steps are the a4.8 run's stage 1 (same seed,
            # init, data order and schedule), so it resumes from the checkpoint at the switch and stays in a8.
            relu2_label = "BitNet b1.58 (ReLU²GLU)"
            branch = out / "runs" / "b1.58-relu2"
            shutil.rmtree(branch, ignore_errors=True)
            shutil.copytree(out / "runs" / "a4.8" / f"checkpoint-{switch}", branch / f"checkpoint-{switch}")
            relu2_recipe = RecipeConfig(**{**vars(recipe), "recipe": "b1.58", "save_steps": 0})
            relu2 = train_recipe(
                build_model(preset["model"], data.tokenizer, "a8", seed=args.seed, hidden_act=act), relu2_recipe,
                data.train, data.validation, branch, tokenizer=data.tokenizer,
                resume_from_checkpoint=str(branch / f"checkpoint-{switch}"), fingerprint=data.fingerprint,
                allow_recipe_change=True,
            )
            ppl[relu2_label] = perplexity_of(relu2.model)
            sparsity[relu2_label] = measure_sparsity(relu2.model, sparsity_blocks)
            steps[relu2_label], tokens[relu2_label] = relu2.steps, relu2.tokens
            seconds[relu2_label] = relu2.seconds
            del relu2
        seconds[label] += time.perf_counter() - tick
        print(f"{label}: validation perplexity {ppl[label]:.3f} ({result.steps} steps, {result.seconds:.0f} s)",
              flush=True)
        final_model = result.model

    # Save the a4.8 model with its tokenizer, reload it through the Auto classes, sample from a pipeline.
    model_dir = save_model_and_tokenizer(final_model, data.tokenizer, out / "bitnet-a48-model")
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reload_ppl = evaluate_perplexity(reloaded, data.validation, batch_size=16, max_blocks=32)
    saved_ppl = evaluate_perplexity(final_model, data.validation, batch_size=16, max_blocks=32)
    generator = pipeline("text-generation", model=reloaded, tokenizer=tokenizer, device=-1)
    set_seed(args.seed)
    sample = generator(args.prompt, max_new_tokens=args.max_new_tokens, do_sample=True, top_k=40, temperature=0.8,
                       return_full_text=True)[0]["generated_text"]
    plot = plot_loss_curves(histories, out / "loss_curve.png", switch_step=switch,
                            title=f"fp / b1.58 / a4.8 on {args.data} ({args.preset})")
    seconds["total"] = time.perf_counter() - start

    a48, b158 = ppl[RECIPE_LABELS["a4.8"]], ppl[RECIPE_LABELS["b1.58"]]
    b158_relu2 = ppl.get("BitNet b1.58 (ReLU²GLU)", math.nan)
    summary = {
        "perplexity": ppl,
        "sparsity": sparsity,
        "steps": steps,
        "tokens": tokens,
        "seconds": seconds,
        "a48_over_b158_perplexity": a48 / b158,
        "a48_over_b158_relu2_perplexity": a48 / b158_relu2,
        "stage2_gain": ppl.get("a4.8 without stage 2", math.nan) - a48,
        "reloaded_perplexity_check": {"saved": saved_ppl, "reloaded": reload_ppl},
        "switch_step": switch,
        "preset": args.preset,
        "model": {**preset["model"], "vocab_size": len(data.tokenizer), "seq_len": data.train.seq_len},
        "recipe": {k: v for k, v in vars(recipes["a4.8"]).items() if k != "recipe"},
        "data": data.description,
        "torch_threads": torch.get_num_threads(),
        "sample": sample,
    }
    write_json(out / "summary.json", summary)
    print("\n" + format_sparsity_table(sparsity, ppl))
    print(f"\na4.8 / b1.58 perplexity: {a48 / b158:.4f} (SwiGLU b1.58), {a48 / b158_relu2:.4f} (ReLU²GLU b1.58)")
    print(f"stage 2 lowers the a4.8 perplexity of the stage-1 model "
          f"from {ppl.get('a4.8 without stage 2', math.nan):.3f} to {a48:.3f}")
    print(f"saved {model_dir} (reloaded with AutoModelForCausalLM: perplexity {reload_ppl:.3f} vs {saved_ppl:.3f})")
    print(f"loss curves: {plot}; summary: {out / 'summary.json'}; total {seconds['total'] / 60:.1f} min")
    print(f"\nsample ({args.prompt!r}):\n{sample}")
    return summary


# ---------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample text from a saved model folder",
                       description="Load a folder written by save_pretrained and generate with transformers' "
                                   "text-generation pipeline.")
    p.add_argument("model", help="model folder (with its tokenizer) or Hub name")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or name (default: the model's)")
    p.add_argument("--prompt", default="ROMEO:\n")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline, set_seed

    _check_positive(args, "max_new_tokens")
    _check_model_folder(args.model, hub_names=True)
    model = _from_pretrained(AutoModelForCausalLM, args.model, args.trust_remote_code)
    tokenizer = _from_pretrained(AutoTokenizer, args.tokenizer or args.model, args.trust_remote_code)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    set_seed(args.seed)
    options: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": not args.greedy}
    if not args.greedy:
        options.update(temperature=args.temperature, top_k=args.top_k)
    text = generator(args.prompt, **options)[0]["generated_text"]
    print(text)
    return {"generated_text": text}


# ---------------------------------------------------------------------------------------------------------
# convert, export, pack: the checkpoint tools of convert.py
# ---------------------------------------------------------------------------------------------------------

# Option values spelled out so that `--help` needs no torch; tests/test_cli.py checks them against convert.py's
# DTYPES and LINEAR_CLASSES.
DTYPE_NAMES = ("bf16", "bfloat16", "fp16", "float16", "fp32", "float32")
LINEAR_CLASS_NAMES = ("autobitlinear", "bitlinear")


def _torch_dtype(name: str) -> Any:
    from .convert import DTYPES

    return DTYPES.get(name)  # None for "keep"


def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert",
                       help="convert a transformers bitnet (latent or packed) or llama folder into bitnet_a48",
                       description="Convert a transformers bitnet (latent, or packed autobitlinear/bitlinear) or llama "
                                   "folder (config.json and safetensors) into a bitnet_a48 folder.")
    p.add_argument("src", help="source folder")
    p.add_argument("out", help="output folder")
    p.add_argument("--weight-format", choices=("latent", "packed"), default="latent",
                   help="latent (trainable, default) or packed 2-bit ternary weights (inference)")
    p.add_argument("--quant-mode", choices=("a8", "a4.8", "none"), default="a8",
                   help="arithmetic of the converted model (default a8: the b1.58 arithmetic of the checkpoints)")
    p.add_argument("--dtype", choices=(*DTYPE_NAMES, "keep"), default="keep",
                   help="cast the floating tensors to it (default: keep the source's dtypes)")
    p.add_argument("--kv-cache-bits", type=int, default=3, help="KV-cache bits (default 3; 0: full precision)")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> dict[str, Any]:
    from .convert import convert_checkpoint

    convert_checkpoint(args.src, args.out, weight_format=args.weight_format, quant_mode=args.quant_mode,
                       dtype=_torch_dtype(args.dtype), kv_cache_bits=args.kv_cache_bits or None)
    print(f"wrote {args.weight_format} bitnet_a48 checkpoint to {args.out}")
    return {"out": args.out}


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a bitnet_a48 folder to transformers' bitnet format",
                       description="Write a bitnet_a48 folder as a transformers model_type 'bitnet' folder. "
                                   "transformers' BitNet has only the b1.58 arithmetic (INT8 inputs).")
    p.add_argument("src", help="bitnet_a48 folder (latent or packed)")
    p.add_argument("out", help="output folder")
    p.add_argument("--weight-format", choices=("latent", "packed"), default="latent",
                   help="latent float weights with an online quantization_config (default), or packed uint8")
    p.add_argument("--linear-class", choices=LINEAR_CLASS_NAMES, default="autobitlinear",
                   help="packed only: autobitlinear (weight_scale = alpha, default) or bitlinear (1/alpha)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16", help="dtype of the float tensors (default bf16)")
    p.add_argument("--no-quantization-config", action="store_true",
                   help="latent only: a plain full-precision BitNet config")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from .convert import export_checkpoint

    export_checkpoint(args.src, args.out, weight_format=args.weight_format, linear_class=args.linear_class,
                      dtype=_torch_dtype(args.dtype), with_quantization_config=not args.no_quantization_config)
    print(f"wrote transformers bitnet ({args.weight_format}) checkpoint to {args.out}")
    return {"out": args.out}


def add_pack_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pack", help="pack a latent bitnet_a48 folder into 2-bit ternary weights",
                       description="Load a latent bitnet_a48 folder, pack its projections into 2-bit ternary weights "
                                   "and save the packed model.")
    p.add_argument("src", help="latent bitnet_a48 folder")
    p.add_argument("out", help="output folder")
    p.set_defaults(func=cmd_pack)


def cmd_pack(args: argparse.Namespace) -> dict[str, Any]:
    from .convert import pack_checkpoint

    pack_checkpoint(args.src, args.out)
    print(f"wrote packed bitnet_a48 checkpoint to {args.out}")
    return {"out": args.out}


# ---------------------------------------------------------------------------------------------------------
# eval: validation perplexity and activation sparsity of a saved model
# ---------------------------------------------------------------------------------------------------------


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="validation perplexity and activation sparsity of a saved model",
                       description="Perplexity on the validation split of --data (packed blocks of --seq-len tokens) "
                                   "and the activation sparsity per projection, as the paper's Tables 1-2.")
    p.add_argument("model", help="model folder written by save_pretrained (with its tokenizer)")
    p.add_argument("--data", default="shakespeare", help="'shakespeare' (embedded) or a local text/jsonl/parquet path")
    p.add_argument("--text-field", default="text")
    p.add_argument("--validation-every", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-blocks", type=int, default=64, help="validation blocks evaluated (0: all)")
    p.add_argument("--quant-mode", default=None, choices=["a4.8", "a8", "none"],
                   help="evaluate in this mode (default: the saved one)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--output", default=None, help="also write the result as JSON here")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import load_corpus, pack_documents
    from .sparsity import format_sparsity_table, measure_sparsity
    from .training import evaluate_perplexity, write_json

    _check_positive(args, "seq_len")
    _check_model_folder(args.model)
    model = _from_pretrained(AutoModelForCausalLM, args.model, args.trust_remote_code)
    tokenizer = _from_pretrained(AutoTokenizer, args.model, args.trust_remote_code)
    if args.quant_mode is not None:
        model.set_quant_mode(args.quant_mode)
    corpus = load_corpus(args.data, args.validation_every, text_field=args.text_field)
    validation = pack_documents(tokenizer, corpus.validation, args.seq_len, what="validation text")
    max_blocks = args.max_blocks or None
    ppl = evaluate_perplexity(model, validation, max_blocks=max_blocks)
    label = f"{Path(args.model).name} ({model.config.quant_mode})"
    sparsity = measure_sparsity(model, validation.blocks, max_blocks=max_blocks or validation.blocks.shape[0])
    print(format_sparsity_table({label: sparsity}, {label: ppl}))
    result = {"perplexity": ppl, "sparsity": sparsity, "quant_mode": model.config.quant_mode,
              "blocks": min(len(validation), max_blocks or len(validation)), "seq_len": args.seq_len}
    if args.output:
        write_json(Path(args.output), result)
    return result


# ---------------------------------------------------------------------------------------------------------
# bench: decode speed of a saved model (the full comparisons are the scripts in benchmarks/)
# ---------------------------------------------------------------------------------------------------------


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="decode tokens/s of a saved model, latent against packed, in one run",
                       description="Greedy decode speed of a saved model as saved and, for a latent model, after "
                                   "model.pack() (both CPU layouts), measured in the same run. The comparisons "
                                   "against LLaMA and transformers' BitNet are benchmarks/bench_decode.py.")
    p.add_argument("model", help="model folder written by save_pretrained")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=cmd_bench)


def _decode_seconds_per_token(model: Any, ids: Any, new_tokens: int, reps: int) -> float:
    """Median over `reps` of (generate(n) - generate(1)) / (n - 1): decode steps without the prefill."""
    import statistics

    import torch

    def run(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - start

    run(2)  # warm-up
    return statistics.median((run(new_tokens) - run(1)) / (new_tokens - 1) for _ in range(reps))


def cmd_bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    for name in ("prompt_tokens", "new_tokens", "batch_size", "reps"):
        _check_positive(args, name)
    if args.new_tokens < 2:
        raise ValueError("--new-tokens must be at least 2")
    _check_model_folder(args.model, hub_names=True)
    model = _from_pretrained(AutoModelForCausalLM, args.model, args.trust_remote_code).eval()
    ids = torch.randint(3, model.config.vocab_size, (args.batch_size, args.prompt_tokens),
                        generator=torch.Generator().manual_seed(0))
    variants = {f"as saved ({model.config.weight_format})": model}
    if model.config.weight_format == "latent" and model.config.quant_mode != "none":
        packed = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=args.trust_remote_code).eval()
        packed.pack()
        variants["packed, 2-bit in memory"] = packed
        packed_int8 = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        packed_int8.eval().pack()
        for layer in packed_int8.projections().values():
            layer.set_cpu_layout("int8")
        variants["packed, int8 CPU layout"] = packed_int8
    rows = {name: 1.0 / _decode_seconds_per_token(m, ids, args.new_tokens, args.reps) * args.batch_size
            for name, m in variants.items()}
    base = next(iter(rows.values()))
    print(f"{'model':32s} {'tokens/s':>10s} {'ratio':>7s}")
    for name, tps in rows.items():
        print(f"{name:32s} {tps:10.2f} {tps / base:6.2f}x")
    return {"tokens_per_second": rows}


# ---------------------------------------------------------------------------------------------------------
# serve: the OpenAI-compatible server of serve.py (its parser and command live there)
# ---------------------------------------------------------------------------------------------------------


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    from .serve import add_serve_parser as add_parser  # argparse only at its top: --help stays light

    add_parser(sub)


# ---------------------------------------------------------------------------------------------------------
# Registration: one entry per subcommand
# ---------------------------------------------------------------------------------------------------------

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_train_parser,
    add_quickstart_parser,
    add_generate_parser,
    add_convert_parser,
    add_export_parser,
    add_pack_parser,
    add_eval_parser,
    add_bench_parser,
    add_serve_parser,
]


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``PROG: error: MESSAGE (see PROG --help)``) without the usage block.

    Subparsers are made of the parent's class, so every subcommand answers the same way.
    """

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="bitnet-a48", description="BitNet a4.8 for Hugging Face transformers")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand: 0 on success; bad input exits with status 2 and one line on stderr, as argparse does."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from . import register_auto_classes

        register_auto_classes()  # the package skipped it for `bitnet-a48` (see bitnet_a48/__init__.py)
        result = args.func(args)
    except (ValueError, OSError, ImportError) as err:
        # Bad input, a missing file, folder or Hub model (OSError), an optional package: one line, no traceback.
        # Other exceptions are bugs.
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        parser.exit(2, f"bitnet-a48 {args.command}: error: {message}\n")
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
