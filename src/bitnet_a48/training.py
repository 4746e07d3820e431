"""The two-stage training recipe of BitNet a4.8 (arXiv 2411.04965, section 2.4) on transformers' `Trainer`.

Stage 1 trains the model with ternary weights and INT8 activations everywhere (``quant_mode="a8"``, the b1.58
arithmetic with ReLU²GLU); stage 2 switches the *same* model to the hybrid a4.8 quantisers (``"a4.8"``) for the last
share of the steps (paper: 5%) and continues with the same optimiser state and weight decay 0.

Schedules (b1.58's, SPEC section 3), as multiples of the first peak ``lr``:

* learning rate: linear warm-up to ``lr``; then a linear decay from ``lr`` that would reach ``second_lr`` at the
  last step; at mid-training it drops to ``second_lr`` and decays linearly to ``min_lr_ratio · second_lr``. Stage 2
  continues that decay **[choice: the paper gives no stage-2 learning rate]**.
* weight decay: ``weight_decay`` in the first half of the steps, 0 after (so stage 2 runs with 0).
* Adam β = (0.9, 0.95).

The baselines use the same code: ``recipe="b1.58"`` stays in ``"a8"`` all the way, ``recipe="fp"`` in ``"none"``
(full precision).

Data order: the packed training blocks are shuffled once with the seed and then read in order, so one process and
``accelerate launch --num_processes N`` see the same global batches (DDP averages the gradients of the shards).

Resume is Trainer's own (``resume_from_checkpoint``: weights, optimizer, scheduler, RNG states, `TrainerState` and
with it the data position); `train_recipe` adds what Trainer lacks (resume.py): every checkpoint gets a fingerprint
of the data, tokenizer, model config and recipe, written last so that it also marks the folder complete, and a
resume refuses in one line when any of them differs.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .configuration_bitnet_a48 import PRESETS as MODEL_PRESETS
from .data import PackedDataset
from .resume import (
    check_resume,
    config_fingerprint,
    last_complete_checkpoint,
    recipe_fingerprint,
    remove_resume_file,
    tokenizer_sha256,
    write_resume_file,
)

# Recipe -> (stage-1 quant_mode, stage-2 quant_mode). "a8" and "none" are accepted as aliases of the baselines.
RECIPES: dict[str, tuple[str, str]] = {"a4.8": ("a8", "a4.8"), "b1.58": ("a8", "a8"), "fp": ("none", "none")}
RECIPE_ALIASES = {"a8": "b1.58", "none": "fp", "fp16": "fp", "full": "fp"}
RECIPE_LABELS = {"fp": "full precision", "b1.58": "BitNet b1.58", "a4.8": "BitNet a4.8"}


def resolve_recipe(name: str) -> str:
    """Canonical recipe name ("a4.8", "b1.58" or "fp"); raises `ValueError` for an unknown one."""
    name = RECIPE_ALIASES.get(name, name)
    if name not in RECIPES:
        raise ValueError(f"unknown recipe/mode {name!r}; choose one of {sorted(RECIPES) + sorted(RECIPE_ALIASES)}")
    return name


# ---------------------------------------------------------------------------------------------------------
# Presets: model shape + schedule. "tiny" is for tests, "quickstart" fits three models in 15 min on 2 CPU cores.
# ---------------------------------------------------------------------------------------------------------

_SMALL_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=2),
    "quickstart": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8),
}
# Paper learning rates (first -> second peak), SPEC section 3.
_PAPER_LR = {"700M": (1.5e-3, 1e-3), "1.3B": (1.2e-3, 8e-4), "3B": (1.2e-3, 6.4e-4), "7B": (1e-3, 6e-4),
             "2B-4T": (1.2e-3, 8e-4)}

TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(model=_SMALL_SHAPES["tiny"], vocab_size=512, seq_len=32, batch_size=8, max_steps=20,
                 lr=3e-3, second_lr=2e-3, warmup_steps=2, eval_steps=10, eval_blocks=32, final_eval_blocks=256),
    "quickstart": dict(model=_SMALL_SHAPES["quickstart"], vocab_size=2048, seq_len=128, batch_size=16,
                       max_steps=600, lr=3e-3, second_lr=2e-3, warmup_steps=40, eval_steps=100, eval_blocks=128,
                       final_eval_blocks=None),
    "small": dict(model=_SMALL_SHAPES["small"], vocab_size=8192, seq_len=256, batch_size=32, max_steps=4000,
                  lr=2e-3, second_lr=1.3e-3, warmup_steps=200, eval_steps=250, eval_blocks=512,
                  final_eval_blocks=None),
}
for _name, _shape in MODEL_PRESETS.items():
    TRAIN_PRESETS[_name] = dict(model=dict(_shape), vocab_size=32000, seq_len=2048, batch_size=256,
                                max_steps=20000, lr=_PAPER_LR[_name][0], second_lr=_PAPER_LR[_name][1],
                                warmup_steps=375, eval_steps=1000, eval_blocks=256,
                                final_eval_blocks=2048)


def get_preset(name: str) -> dict[str, Any]:
    """A copy of a training preset; raises `ValueError` naming the known ones."""
    if name not in TRAIN_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {list(TRAIN_PRESETS)}")
    return copy.deepcopy(TRAIN_PRESETS[name])


@dataclass
class RecipeConfig:
    """Hyper-parameters of one training run (one recipe).

    Args:
        recipe: "a4.8" (two stages), "b1.58" ("a8" all the way) or "fp" (full precision).
        max_steps: optimiser steps in total (both stages).
        batch_size: sequences per optimiser step, over all processes and accumulation steps.
        lr: first peak learning rate; second_lr: the lower peak after mid-training.
        min_lr_ratio: final learning rate as a share of `second_lr`.
        warmup_steps: linear warm-up steps.
        weight_decay: weight decay of the first `weight_decay_until` share of the steps (0 after).
        stage2_fraction: share of the steps run in stage 2 (a4.8 only; paper: 0.05).
        betas: Adam β.
        max_grad_norm: gradient clipping (0 disables).
        gradient_accumulation_steps: micro-batches per optimiser step.
        eval_steps: evaluate the validation loss every this many steps (0: never during training).
        eval_blocks: validation blocks used by the periodic evaluation (0: all).
        save_steps: write a resumable checkpoint every this many steps (0: only at the end).
        logging_steps: log the training loss every this many steps.
        seed: seed of the initialisation, the data order and dropout.
        bf16: train in bfloat16 autocast (default: on CUDA GPUs that support it).
    """

    recipe: str = "a4.8"
    max_steps: int = 600
    batch_size: int = 16
    lr: float = 1.5e-3
    second_lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 40
    weight_decay: float = 0.1
    weight_decay_until: float = 0.5
    stage2_fraction: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    eval_steps: int = 100
    eval_blocks: int = 128
    save_steps: int = 0
    logging_steps: int = 10
    seed: int = 0
    bf16: bool | None = None

    def __post_init__(self) -> None:
        self.recipe = resolve_recipe(self.recipe)
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.stage2_fraction < 1.0:
            raise ValueError(f"stage2_fraction must lie in [0, 1), got {self.stage2_fraction}")
        if self.lr <= 0 or self.second_lr <= 0:
            raise ValueError(f"learning rates must be positive, got lr={self.lr}, second_lr={self.second_lr}")
        if self.warmup_steps < 0 or self.eval_steps < 0 or self.save_steps < 0 or self.eval_blocks < 0:
            raise ValueError("warmup_steps, eval_steps, save_steps and eval_blocks must not be negative")

    @property
    def stage_modes(self) -> tuple[str, str]:
        return RECIPES[self.recipe]

    @property
    def switch_step(self) -> int:
        """Index (0-based) of the first stage-2 step; equals `max_steps` when there is no stage 2."""
        if self.recipe != "a4.8" or self.stage2_fraction == 0:
            return self.max_steps
        return self.max_steps - max(1, round(self.stage2_fraction * self.max_steps))

    def quant_mode_at(self, step: int) -> str:
        """quant_mode of the optimiser step with 0-based index `step`."""
        first, second = self.stage_modes
        return second if step >= self.switch_step else first

    def weight_decay_at(self, step: int) -> float:
        stage2 = self.recipe == "a4.8" and step >= self.switch_step
        return 0.0 if stage2 or step >= self.weight_decay_until * self.max_steps else self.weight_decay

    def lr_factor_at(self, step: int) -> float:
        """Learning rate of step `step` as a multiple of `lr` (two linear phases with a drop at mid-training)."""
        total, warmup = self.max_steps, min(self.warmup_steps, self.max_steps - 1)
        middle = max(warmup, total // 2)
        second = self.second_lr / self.lr
        if step < warmup:
            return (step + 1) / warmup
        if step < middle:
            return 1.0 - (1.0 - second) * (step - warmup) / max(1, total - warmup)
        progress = (step - middle) / max(1, total - 1 - middle)
        return second * (1.0 - (1.0 - self.min_lr_ratio) * min(1.0, progress))


# ---------------------------------------------------------------------------------------------------------
# Trainer pieces
# ---------------------------------------------------------------------------------------------------------


class TwoStageCallback(TrainerCallback):
    """Sets quant_mode and weight decay before every optimiser step from the recipe; works after a resume.

    With ``keep_stage1=True`` it keeps a CPU copy of the weights at the switch (to evaluate the stage-1 model in
    a4.8 mode without stage 2). ``modes`` records the quant_mode of every step taken.
    """

    def __init__(self, recipe: RecipeConfig, keep_stage1: bool = False) -> None:
        self.recipe = recipe
        self.keep_stage1 = keep_stage1
        self.stage1_state: dict[str, torch.Tensor] | None = None
        self.modes: list[str] = []

    def _apply(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        mode = self.recipe.quant_mode_at(step)
        if getattr(model.config, "quant_mode", None) != mode:
            if self.keep_stage1 and step == self.recipe.switch_step and self.stage1_state is None:
                self.stage1_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            model.set_quant_mode(mode)
        if optimizer is not None:
            decay = self.recipe.weight_decay_at(step)
            for group in optimizer.param_groups:
                if group.get("decayed", False):
                    group["weight_decay"] = decay

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self._apply(state.global_step, kwargs["model"], kwargs.get("optimizer"))

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        self._apply(state.global_step, kwargs["model"], kwargs.get("optimizer"))
        self.modes.append(kwargs["model"].config.quant_mode)


class BarOnlyProgressCallback(ProgressCallback):
    """Trainer's progress bars, with the latest loss shown on the bar instead of one printed line per log."""

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if self.training_bar is not None and logs:
            shown = {k: f"{v:.3f}" for k, v in logs.items() if k in ("loss", "eval_loss")}
            if shown:
                self.training_bar.set_postfix(shown, refresh=False)


class BitNetTrainer(Trainer):
    """`Trainer` with the two-peak learning-rate schedule, per-step weight decay, a fixed data order and checkpoints
    that carry the run's fingerprint (`fingerprint`, see resume.py) in a file written last."""

    def __init__(self, *args: Any, recipe: RecipeConfig, fingerprint: dict[str, Any], **kwargs: Any) -> None:
        self.recipe = recipe
        self.fingerprint = fingerprint
        super().__init__(*args, **kwargs)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        # Trainer writes checkpoint-N in place (5.17 to 5.24): unmark the folder first (a rewrite killed halfway must
        # not look complete), mark it once every process has written its files.
        folder = os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            remove_resume_file(folder)
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()
        if self.args.should_save and os.path.isdir(folder):
            write_resume_file(folder, self.fingerprint, self.state.global_step)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        for group in optimizer.param_groups:
            group["decayed"] = group["weight_decay"] > 0  # saved with the optimiser, so a resume keeps it
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> LambdaLR:
        if self.lr_scheduler is None:
            self.lr_scheduler = LambdaLR(self.optimizer if optimizer is None else optimizer, self.recipe.lr_factor_at)
        return self.lr_scheduler

    def _get_train_sampler(self, train_dataset: torch.utils.data.Dataset | None = None) -> torch.utils.data.Sampler:
        # The blocks are shuffled once with the seed (data.PackedDataset's order); reading them in order makes the
        # global batches identical for any number of processes.
        return torch.utils.data.SequentialSampler(self.train_dataset if train_dataset is None else train_dataset)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def training_arguments(recipe: RecipeConfig, output_dir: str | Path, has_eval: bool) -> TrainingArguments:
    """`TrainingArguments` for one recipe; the per-device batch is `batch_size / (processes · accumulation)`."""
    per_step = world_size() * recipe.gradient_accumulation_steps
    if recipe.batch_size % per_step:
        raise ValueError(
            f"batch_size {recipe.batch_size} is not divisible by processes ({world_size()}) x gradient accumulation "
            f"steps ({recipe.gradient_accumulation_steps})"
        )
    cuda = torch.cuda.is_available()
    bf16 = recipe.bf16 if recipe.bf16 is not None else bool(cuda and torch.cuda.is_bf16_supported())
    eval_steps = recipe.eval_steps if has_eval and recipe.eval_steps else None
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=recipe.max_steps,
        per_device_train_batch_size=recipe.batch_size // per_step,
        per_device_eval_batch_size=recipe.batch_size // per_step,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        learning_rate=recipe.lr,
        weight_decay=recipe.weight_decay,
        adam_beta1=recipe.betas[0],
        adam_beta2=recipe.betas[1],
        max_grad_norm=recipe.max_grad_norm if recipe.max_grad_norm > 0 else None,
        optim="adamw_torch",
        logging_steps=recipe.logging_steps,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=recipe.save_steps if recipe.save_steps else recipe.max_steps,
        save_total_limit=3,
        seed=recipe.seed,
        data_seed=recipe.seed,
        bf16=bf16,
        use_cpu=not cuda,
        ddp_backend=("gloo" if not cuda else None) if world_size() > 1 else None,
        prediction_loss_only=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        report_to="none",
        disable_tqdm=False,
    )


@dataclass
class TrainResult:
    """What `train_recipe` returns: the trained model, its logs and the cost."""

    model: PreTrainedModel
    log_history: list[dict[str, float]]
    steps: int
    tokens: int
    seconds: float
    switch_step: int
    stage1_state: dict[str, torch.Tensor] | None = None
    modes: list[str] = field(default_factory=list)
    trainer: Trainer | None = None


def train_recipe(
    model: PreTrainedModel,
    recipe: RecipeConfig,
    train_dataset: PackedDataset | torch.utils.data.IterableDataset,
    eval_dataset: PackedDataset | None,
    output_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    resume_from_checkpoint: str | bool | None = None,
    keep_stage1: bool = False,
    callbacks: list[TrainerCallback] | None = None,
    fingerprint: dict[str, dict[str, Any]] | None = None,
    allow_recipe_change: bool = False,
) -> TrainResult:
    """Train `model` with one recipe on Trainer; checkpoints go to `output_dir/checkpoint-*` and resume.

    Args:
        resume_from_checkpoint: a checkpoint folder, or True for the last complete one in `output_dir`. Raises
            `ValueError` (one line) when the data, tokenizer, model config or recipe differ from the checkpoint's.
        fingerprint: what the caller knows of the data and tokenizer (`PreparedData.fingerprint`: sources and
            settings), saved with every checkpoint beside the hashes read here off the dataset, tokenizer, model
            config and recipe.
        allow_recipe_change: the run branches off the checkpoint with another recipe (the quickstart's b1.58 with
            ReLU²GLU from the a4.8 run's stage 1): the recipe name and stage-2 share may differ, as long as the steps
            already taken ran in the same quant modes.
    """
    if recipe.eval_blocks and eval_dataset is not None and len(eval_dataset) > recipe.eval_blocks:
        eval_dataset = PackedDataset(eval_dataset.select_blocks(recipe.eval_blocks))
    known = fingerprint or {}
    run_fingerprint = {
        "data": {**known.get("data", {}), "train_blocks_sha256": train_dataset.content_sha256()},
        "tokenizer": {**known.get("tokenizer", {}),
                      "sha256": tokenizer_sha256(tokenizer) if tokenizer is not None else None},
        "model_config": config_fingerprint(model.config),
        "recipe": recipe_fingerprint(asdict(recipe)),
    }
    if resume_from_checkpoint is True:
        found, _ = last_complete_checkpoint(output_dir)
        if found is None:
            raise FileNotFoundError(f"no complete checkpoint-* folder in {output_dir}")
        resume_from_checkpoint = str(found)
    if resume_from_checkpoint:
        saved = check_resume(resume_from_checkpoint, run_fingerprint,
                             recipe_may_change=("recipe", "stage2_fraction") if allow_recipe_change else ())
        if allow_recipe_change:
            taken = saved["global_step"]
            before = RecipeConfig(**saved["recipe"])
            if [before.quant_mode_at(s) for s in range(taken)] != [recipe.quant_mode_at(s) for s in range(taken)]:
                raise ValueError(f"cannot resume from {resume_from_checkpoint}: its {taken} steps ran in other quant "
                                 f"modes than recipe {recipe.recipe!r} would have")
    args = training_arguments(recipe, output_dir, has_eval=eval_dataset is not None)
    stages = TwoStageCallback(recipe, keep_stage1=keep_stage1)
    # transformers' Trainer sets `model.config.use_cache = args.use_cache` (False): put the model's own value back
    # afterwards, or every saved model would generate without a KV cache.
    use_cache = model.config.use_cache
    trainer = BitNetTrainer(
        model=model,
        args=args,
        recipe=recipe,
        fingerprint=run_fingerprint,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=[stages, *(callbacks or [])],
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(BarOnlyProgressCallback)
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=resume_from_checkpoint or None)
    finally:
        model.config.use_cache = use_cache
    seconds = time.perf_counter() - start
    model = trainer.model
    model.set_quant_mode(recipe.stage_modes[1])  # the final mode, also when max_steps <= switch step
    steps = trainer.state.global_step
    return TrainResult(
        model=model,
        log_history=list(trainer.state.log_history),
        steps=steps,
        tokens=steps * recipe.batch_size * train_dataset.seq_len,
        seconds=seconds,
        switch_step=recipe.switch_step,
        stage1_state=stages.stage1_state,
        modes=stages.modes,
        trainer=trainer,
    )


# ---------------------------------------------------------------------------------------------------------
# Evaluation and plots
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_perplexity(
    model: PreTrainedModel, dataset: PackedDataset, batch_size: int = 16, max_blocks: int | None = None
) -> float:
    """exp(mean next-token loss) over the blocks of `dataset` (every predicted token weighs the same)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stop = len(dataset) if max_blocks is None else min(len(dataset), max_blocks)
    total, count = 0.0, 0
    for start in range(0, stop, batch_size):
        batch = dataset.select_blocks(min(batch_size, stop - start), start).to(device)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        n = batch.shape[0] * (batch.shape[1] - 1)
        total += loss.float().item() * n
        count += n
    model.train(was_training)
    return math.exp(total / count)


def plot_loss_curves(
    runs: dict[str, list[dict[str, float]]], path: str | Path, switch_step: int | None = None,
    title: str = "BitNet a4.8 training",
) -> Path:
    """PNG of training and validation loss per run, with the stage-1 -> stage-2 switch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    late: list[float] = []  # losses after the first 10% of steps set the y range (the first steps are far higher)
    last_step = max((h.get("step", 0) for history in runs.values() for h in history), default=0)
    for i, (name, history) in enumerate(runs.items()):
        color = f"C{i}"
        train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
        evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
        late += [y for x, y in train + evals if x >= 0.1 * last_step]
        if train:
            ax.plot(*zip(*train, strict=True), color=color, alpha=0.6, label=f"{name} train")
        if evals:
            ax.plot(*zip(*evals, strict=True), "o-", color=color, label=f"{name} validation")
    if switch_step is not None:
        ax.axvline(switch_step, color="k", linestyle="--", linewidth=1)
        ax.annotate("stage 2: a4.8", (switch_step, 0.98), xycoords=("data", "axes fraction"), ha="right",
                    va="top", rotation=90, fontsize=9)
    if len(late) > 1 and max(late) > min(late):
        span = max(late) - min(late)
        ax.set_ylim(min(late) - 0.05 * span, max(late) + 0.1 * span)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def recipe_dict(recipe: RecipeConfig) -> dict[str, Any]:
    return asdict(recipe)



# ---------------------------------------------------------------------------------------------------------
# Whole runs: data + tokenizer + model + recipe (used by `bitnet-a48 train` and `bitnet-a48 quickstart`)
# ---------------------------------------------------------------------------------------------------------


STREAMING_BPE_CHARS = 200_000_000  # text a BPE is trained on when the corpus is streamed


@dataclass
class PreparedData:
    """Tokenizer and packed splits of a corpus, built before any model exists (bad input fails here)."""

    tokenizer: PreTrainedTokenizerBase
    train: PackedDataset | torch.utils.data.IterableDataset  # data_pipeline.StreamingPackedDataset when streaming
    validation: PackedDataset
    description: str
    tokenizer_seconds: float
    fingerprint: dict[str, dict[str, Any]] = field(default_factory=dict)  # for train_recipe (resume.py)


def prepare_data(
    source: str = "shakespeare",
    seq_len: int = 128,
    tokenizer_name: str | None = None,
    vocab_size: int = 4096,
    seed: int = 0,
    validation_every: int = 10,
    tokenizer_from: str | Path | None = None,
    streaming: bool = False,
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
    **load_kwargs: Any,
) -> PreparedData:
    """Read and split the corpus, train (or load) the tokenizer on the training split, pack both splits, all through
    data_pipeline.CorpusPipeline (cached in `cache_dir`; `streaming`: packed on the fly while training).

    ``tokenizer_from``: a folder holding the tokenizer that `tokenizer_name` / `vocab_size` gave before (a
    checkpoint's, on resume), loaded instead of loading or training one again; the fingerprint still records
    `tokenizer_name` and `vocab_size`, so that a resume can compare them with the checkpoint's. A BPE trained here is
    kept in the cache; with `streaming`, it is trained on the first `STREAMING_BPE_CHARS` characters of the stream.
    """
    from .data_pipeline import CorpusOptions, CorpusPipeline
    from .tokenization_bitnet_a48 import load_tokenizer, train_bpe_tokenizer

    pipeline = CorpusPipeline(CorpusOptions(source, validation_every=validation_every, **load_kwargs),
                              cache_dir=cache_dir, num_proc=num_proc)
    start = time.perf_counter()
    if tokenizer_from is not None:
        tokenizer = load_tokenizer(str(tokenizer_from))
    elif tokenizer_name:
        tokenizer = load_tokenizer(tokenizer_name)
    elif streaming:
        tokenizer = train_bpe_tokenizer(pipeline.stream_train_texts(STREAMING_BPE_CHARS), vocab_size=vocab_size)
    else:
        tokenizer = pipeline.bpe_tokenizer(vocab_size)
    tokenizer_seconds = time.perf_counter() - start
    if streaming:
        splits = pipeline.stream(tokenizer, seq_len, shuffle_seed=seed)
        description = (f"{source} (streamed): {len(splits.validation)} validation blocks held, training blocks "
                       f"packed while training; blocks of {seq_len}; vocabulary {len(tokenizer)}")
    else:
        splits = pipeline.pack(tokenizer, seq_len, shuffle_seed=seed)
        train, validation = splits.stats["train"], splits.stats["validation"]
        description = (
            f"{source}: {train['documents']} training documents ({train['characters'] / 1e6:.2f} M characters), "
            f"{validation['documents']} validation documents ({validation['characters'] / 1e6:.2f} M characters); "
            f"{splits.train.num_tokens:,} training and {splits.validation.num_tokens:,} validation tokens in blocks "
            f"of {seq_len}; vocabulary {len(tokenizer)}{' (cached)' if splits.reused else ''}"
        )
    fingerprint = {
        "data": {
            "source": os.path.abspath(os.path.expanduser(source)) if os.path.exists(source) else source,
            **load_kwargs, "validation_every": validation_every, "seq_len": seq_len, "shuffle_seed": seed,
            "streaming": streaming, "train_blocks_sha256": splits.train.content_sha256(),
            "validation_blocks_sha256": splits.validation.content_sha256(),
        },
        "tokenizer": {"name": tokenizer_name or None, "bpe_vocab_size": None if tokenizer_name else vocab_size},
    }
    return PreparedData(tokenizer, splits.train, splits.validation, description, tokenizer_seconds, fingerprint)


def build_model(
    shape: dict[str, Any], tokenizer: PreTrainedTokenizerBase, quant_mode: str, seed: int = 0, **overrides: Any
) -> PreTrainedModel:
    """A freshly initialised `BitNetA48ForCausalLM` of `shape`, sized to the tokenizer, seeded."""
    from transformers import set_seed

    from . import create_model

    set_seed(seed)
    fields = {
        **shape,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "quant_mode": quant_mode,
        **overrides,
    }
    fields.setdefault("max_position_embeddings", 2048)
    return create_model(**fields)


def save_model_and_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> Path:
    """`save_pretrained` of both, so `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(path)` load them."""
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
