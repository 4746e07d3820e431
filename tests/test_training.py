"""The two-stage recipe on Trainer: stages, optimiser state across the switch, resume, CLI, bad input, DDP."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from bitnet_a48 import cli, create_model
from bitnet_a48.data import PackedDataset, load_documents, pack_documents
from bitnet_a48.quantization import quantize_act_int4
from bitnet_a48.resume import RESUME_FILE, last_complete_checkpoint
from bitnet_a48.sparsity import measure_sparsity
from bitnet_a48.tokenization_bitnet_a48 import train_bpe_tokenizer
from bitnet_a48.training import RecipeConfig, TrainResult, build_model, evaluate_perplexity, get_preset, train_recipe

SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def play_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real English: the first 40,000 characters of five embedded plays, one file each."""
    folder = tmp_path_factory.mktemp("plays")
    for doc in load_documents("shakespeare")[:5]:
        (folder / f"{doc.name.replace('/', '_')}.txt").write_text(doc.text[:40_000])
    return folder


@pytest.fixture(scope="module")
def data(play_folder: Path) -> tuple[PreTrainedTokenizerFast, PackedDataset, PackedDataset]:
    docs = load_documents(str(play_folder))
    tokenizer = train_bpe_tokenizer((d.text for d in docs[1:]), vocab_size=300)
    return tokenizer, pack_documents(tokenizer, docs[1:], 16, shuffle_seed=0), pack_documents(tokenizer, docs[:1], 16)


def _train(data: tuple, tmp: Path, recipe: RecipeConfig, act: str = "relu2", **kwargs: object) -> TrainResult:
    tokenizer, train, valid = data
    model = build_model(SHAPE, tokenizer, recipe.stage_modes[0], seed=0, hidden_act=act)
    return train_recipe(model, recipe, train, valid, tmp, tokenizer=tokenizer, **kwargs)


def _losses(history: list[dict]) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def test_schedules() -> None:
    r = RecipeConfig(recipe="a4.8", max_steps=100, warmup_steps=10, lr=1.5e-3, second_lr=1e-3, stage2_fraction=0.05)
    lr = [r.lr_factor_at(s) * r.lr for s in range(100)]
    assert lr[0] == pytest.approx(1.5e-4) and lr[9] == pytest.approx(1.5e-3)
    assert all(a >= b for a, b in zip(lr[9:], lr[10:], strict=False))  # never rises after warm-up
    assert lr[49] > 1.2e-3 and lr[50] == pytest.approx(1e-3)  # the drop to the second peak at mid-training
    assert lr[99] == pytest.approx(1e-4)
    assert [r.weight_decay_at(s) for s in (0, 49, 50, 99)] == [0.1, 0.1, 0.0, 0.0]
    assert r.switch_step == 95 and r.quant_mode_at(94) == "a8" and r.quant_mode_at(95) == "a4.8"
    assert RecipeConfig(recipe="a8").switch_step == RecipeConfig(recipe="a8").max_steps
    with pytest.raises(ValueError, match="unknown recipe"):
        RecipeConfig(recipe="a2")
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")


def test_two_steps_of_each_stage_keep_the_optimiser_state(data: tuple, tmp_path: Path) -> None:
    recipe = RecipeConfig(recipe="a4.8", max_steps=4, batch_size=4, warmup_steps=1, stage2_fraction=0.5,
                          eval_steps=0, logging_steps=1)
    result = _train(data, tmp_path, recipe)
    assert result.modes == ["a8", "a8", "a4.8", "a4.8"]
    assert result.model.config.quant_mode == "a4.8"
    assert {m.quant_mode for m in result.model.projections().values()} == {"a4.8"}
    assert all(math.isfinite(v) for v in _losses(result.log_history).values()) and len(result.log_history) >= 4
    optimizer = result.trainer.optimizer
    # The same Adam state went on through the switch: 4 steps counted for every parameter, moments non-zero.
    states = [optimizer.state[p] for g in optimizer.param_groups for p in g["params"]]
    assert states and all(int(s["step"]) == 4 for s in states)
    assert all(s["exp_avg_sq"].abs().sum() > 0 for s in states)
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0}  # stage 2: weight decay 0
    assert any(g["decayed"] for g in optimizer.param_groups)
    assert (tmp_path / "checkpoint-4" / "optimizer.pt").exists()


@pytest.mark.parametrize("recipe_name, mode", [("b1.58", "a8"), ("fp", "none")])
def test_baselines_stay_in_one_mode(data: tuple, tmp_path: Path, recipe_name: str, mode: str) -> None:
    recipe = RecipeConfig(recipe=recipe_name, max_steps=2, batch_size=4, warmup_steps=1, eval_steps=0)
    result = _train(data, tmp_path, recipe, act="silu")
    assert result.modes == [mode, mode] and result.model.config.quant_mode == mode
    assert result.tokens == 2 * 4 * 16


def test_resume_gives_the_same_next_loss(data: tuple, tmp_path: Path) -> None:
    recipe = RecipeConfig(recipe="a4.8", max_steps=4, batch_size=4, warmup_steps=1, stage2_fraction=0.25,
                          eval_steps=0, logging_steps=1, save_steps=2)
    full = _losses(_train(data, tmp_path / "full", recipe).log_history)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert checkpoint.is_dir()
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-2")
    resume_from = str(tmp_path / "resumed" / "checkpoint-2")
    resumed = _train(data, tmp_path / "resumed", recipe, resume_from_checkpoint=resume_from)
    again = _losses(resumed.log_history)
    assert resumed.modes == ["a8", "a4.8"]  # steps 3 and 4: the switch happens after the resume
    assert again[3] == pytest.approx(full[3], rel=1e-5, abs=1e-6)
    assert again[4] == pytest.approx(full[4], rel=1e-5, abs=1e-6)

    # Another recipe from a checkpoint: refused, unless the run says it branches off and the steps taken agree.
    after_switch = str(tmp_path / "full" / "checkpoint-4")
    b158 = RecipeConfig(**{**vars(recipe), "recipe": "b1.58"})
    with pytest.raises(ValueError, match=r"the recipe differs: recipe 'b1.58' \(checkpoint: 'a4.8'\)"):
        _train(data, tmp_path / "b158", b158, resume_from_checkpoint=after_switch)
    with pytest.raises(ValueError, match="its 4 steps ran in other quant modes"):
        _train(data, tmp_path / "b158", b158, resume_from_checkpoint=after_switch, allow_recipe_change=True)
    assert not (tmp_path / "b158").exists()  # refused before Trainer existed


def test_perplexity_and_sparsity(data: tuple) -> None:
    tokenizer, _, valid = data
    model = build_model(SHAPE, tokenizer, "a4.8", seed=0, hidden_act="relu2")
    ppl = evaluate_perplexity(model, valid, batch_size=4, max_blocks=8)
    with torch.no_grad():
        loss = model(input_ids=valid.blocks[:8], labels=valid.blocks[:8]).loss
    assert ppl == pytest.approx(math.exp(loss.item()), rel=1e-4)
    shares = measure_sparsity(model, valid.blocks, max_blocks=8)
    assert set(shares) >= {"qkv", "out", "up", "gate", "down", "overall"}
    assert shares["out"] >= 0.5  # TopK keeps ⌈0.5·d⌉ per token
    # up: a multiply is skipped where its input is zero or the gate's activation is zero, so per token
    # 1 - nnz(input)·nnz(gate output) / (d·f). Counted here with our own hooks on the one MLP.
    mlp, seen = model.model.layers[0].mlp, {}
    hooks = [mlp.up_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0])),
             mlp.act_fn.register_forward_hook(lambda m, a, out: seen.__setitem__("g", out))]
    skipped = []
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, 8, 4):
                model(input_ids=valid.blocks[i : i + 4], use_cache=False)
                nnz_in = (quantize_act_int4(seen["x"]).codes != 0).float().mean(-1)
                nnz_gate = (seen["g"] != 0).float().mean(-1)
                skipped.append((1 - nnz_in * nnz_gate).flatten())
    finally:
        for hook in hooks:
            hook.remove()
    assert shares["up"] == pytest.approx(torch.cat(skipped).mean().item(), abs=1e-6)
    assert shares["up"] > shares["up_input"] + 0.2  # ReLU² zeroes most gate outputs: far more than the input zeros
    assert 0.02 < shares["qkv"] < 0.3  # INT4 absmean rounds roughly 12% of inputs to zero
    model.set_quant_mode("none")
    assert measure_sparsity(model, valid.blocks, max_blocks=8)["qkv"] == 0.0


def test_reentrant_activation_checkpointing_gives_the_same_gradients_bit_for_bit(tiny_config_kwargs: dict) -> None:
    # use_reentrant=True runs each layer without grad, then again with grad in the backward: the quantisers give
    # the same values both times (quantization.ste), so nothing differs from a run without checkpointing.
    plain = create_model(**tiny_config_kwargs).train()
    checkpointed = create_model(**tiny_config_kwargs).train()
    checkpointed.load_state_dict(plain.state_dict())
    ids = torch.randint(3, 101, (2, 10))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if hasattr(checkpointed, "activation_checkpointing_enable"):  # in transformers 5.24, not in 5.17
            checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
            enabled = checkpointed.is_activation_checkpointing
        else:  # 5.17: only the older name, not deprecated there
            checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            enabled = checkpointed.is_gradient_checkpointing
        losses = [model(ids, labels=ids).loss for model in (plain, checkpointed)]
        for loss in losses:
            loss.backward()
    assert not [str(w.message) for w in caught if "deprecated" in str(w.message)]
    assert enabled and torch.equal(losses[0], losses[1])
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name


def test_quickstart_two_steps_writes_summary(play_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import quickstart  # the thin wrapper script
    finally:
        sys.path.pop(0)
    out = tmp_path / "qs"
    quickstart.main(["--preset", "tiny", "--steps", "2", "--data", str(play_folder), "--output-dir", str(out),
                     "--max-new-tokens", "4", "--eval-steps", "0", "--seq-len", "16", "--vocab-size", "300"])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"perplexity", "sparsity", "steps", "tokens", "seconds", "sample"}
    models = {"full precision", "BitNet b1.58", "BitNet a4.8"}
    assert set(summary["perplexity"]) >= models | {"a4.8 without stage 2"}
    assert set(summary["steps"]) == models | {"BitNet b1.58 (ReLU²GLU)"} and set(summary["steps"].values()) == {2}
    assert all(set(s) >= {"qkv", "out", "up", "gate", "down", "overall"} for s in summary["sparsity"].values())
    assert summary["tokens"]["BitNet a4.8"] == 2 * 8 * 16
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "bitnet-a48-model" / "tokenizer.json").exists()
    # Trainer turns config.use_cache off while training; the saved model must generate with its KV cache.
    assert json.loads((out / "bitnet-a48-model" / "config.json").read_text())["use_cache"] is True
    assert "valid PPL" in capsys.readouterr().out
    # The saved folder loads through the Auto classes and generates.
    assert cli.main(["generate", str(out / "bitnet-a48-model"), "--prompt", "KING:", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("KING:")


@pytest.mark.parametrize("argv, message", [
    (["--data", "missing-file.txt"], "not found"),
    (["--data", "EMPTY"], "no text found"),
    (["--data", "SHORT", "--seq-len", "256"], "shorter than one sequence"),
    (["--preset", "enormous"], "invalid choice"),
])
def test_bad_input_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str],
                                         message: str) -> None:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("Too short to fill a sequence.\n")
    argv = [{"EMPTY": str(tmp_path / "empty.txt"), "SHORT": str(tmp_path / "short.txt")}.get(a, a) for a in argv]
    out = tmp_path / "out"
    for command in ("quickstart", "train"):
        with pytest.raises(SystemExit) as exc:
            cli.main([command, "--output-dir", str(out), *argv])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    assert not out.exists()  # nothing was trained or written
    with pytest.raises(SystemExit):
        cli.main(["train", "--recipe", "a2", "--output-dir", str(out)])
    assert "invalid choice" in capsys.readouterr().err


def _train_argv(play_folder: Path, out: Path) -> list[str]:
    return ["train", "--recipe", "a4.8", "--preset", "tiny", "--steps", "3", "--stage2-fraction", "0.34",
            "--data", str(play_folder), "--seq-len", "16", "--vocab-size", "300", "--batch-size", "8",
            "--eval-steps", "0", "--output-dir", str(out)]


def test_ddp_two_processes_match_one(play_folder: Path, tmp_path: Path) -> None:
    """accelerate launch with configs/accelerate/ddp.yaml, 2 processes (torchrun, gloo on CPU): the losses of one.

    Without a GPU, accelerate needs ``MULTI_GPU`` (``--multi_gpu``) to start two processes; ``--cpu`` alone runs one.
    """
    pytest.importorskip("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    config = Path(__file__).resolve().parent.parent / "configs" / "accelerate" / "ddp.yaml"  # the shipped file
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
           "--main_process_port", "29533", "-m", "bitnet_a48.cli", *_train_argv(play_folder, tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.set_num_threads(1)
    try:
        cli.main(_train_argv(play_folder, tmp_path / "single"))
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp["processes"] == 2
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    ddp_losses, single_losses = _losses(ddp["log_history"]), _losses(single["log_history"])
    assert set(ddp_losses) == set(single_losses) == {1, 2, 3}
    for step in ddp_losses:
        assert ddp_losses[step] == pytest.approx(single_losses[step], rel=1e-3), (ddp_losses, single_losses)
    assert ddp["perplexity"] == pytest.approx(single["perplexity"], rel=1e-3)


# ---------------------------------------------------------------------------------------------------------
# `bitnet-a48 train --resume`: the same losses as without the interruption, refusals, a kill while saving
# ---------------------------------------------------------------------------------------------------------

RESUME_STEPS = 6


def _resume_argv(play_folder: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--recipe", "a4.8", "--preset", "tiny", "--steps", str(RESUME_STEPS), "--stage2-fraction", "0.34",
            "--data", str(play_folder), "--seq-len", "16", "--vocab-size", "300", "--batch-size", "8",
            "--eval-steps", "0", "--save-steps", "2", "--output-dir", str(out), *extra]


def _logged(metrics_file: Path) -> dict[int, tuple[float, float]]:
    history = json.loads(metrics_file.read_text())["log_history"]
    return {h["step"]: (h["loss"], h["learning_rate"]) for h in history if "loss" in h}


@pytest.fixture(scope="module")
def uninterrupted(play_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`bitnet-a48 train` for 6 steps (stage 2 from step 5), a checkpoint every 2 steps: its output folder."""
    out = tmp_path_factory.mktemp("uninterrupted")
    assert cli.main(_resume_argv(play_folder, out)) == 0
    return out


def _kill_while_writing(argv: list[str], blocking_file: Path) -> None:
    """Run the command in a process and SIGKILL it while it writes `blocking_file`, a FIFO made here.

    Opening a FIFO for writing blocks until a reader opens it: once the reader here has read the first byte, the
    process is inside that write, whatever the machine's speed.
    """
    os.mkfifo(blocking_file)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "bitnet_a48.cli", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    got: dict[str, Any] = {}

    def read_first_byte() -> None:
        got["fd"] = os.open(blocking_file, os.O_RDONLY)
        got["byte"] = os.read(got["fd"], 1)

    reader = threading.Thread(target=read_first_byte, daemon=True)
    reader.start()
    while reader.is_alive() and proc.poll() is None:
        reader.join(0.05)
    if "byte" not in got:  # the process ended without writing the file: unblock the reader, show why
        os.close(os.open(blocking_file, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"the training process ended (status {proc.wait()}) before writing {blocking_file}: "
                    f"{proc.stderr.read()[-2000:]}")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    proc.stderr.close()
    os.close(got["fd"])
    # What a kill leaves of a file being written: its first bytes, in a regular file.
    blocking_file.unlink()
    blocking_file.write_bytes(got["byte"])


def test_killed_while_writing_a_checkpoint_resumes_from_the_last_complete_one(
    play_folder: Path, uninterrupted: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "killed"
    # A complete checkpoint-4 of an earlier run is there to be written again: its resume file must go first.
    shutil.copytree(uninterrupted / "checkpoint-4", out / "checkpoint-4")
    (out / "checkpoint-4" / "optimizer.pt").unlink()
    # Trainer writes the model and tokenizer, then optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json.
    _kill_while_writing(_resume_argv(play_folder, out), out / "checkpoint-4" / "optimizer.pt")
    assert (out / "checkpoint-4" / "model.safetensors").is_file()
    assert not (out / "checkpoint-4" / RESUME_FILE).exists() and (out / "checkpoint-2" / RESUME_FILE).is_file()
    assert last_complete_checkpoint(out) == (out / "checkpoint-2", [out / "checkpoint-4"])
    # Trainer's own choice would be the torn checkpoint-4.
    from transformers.trainer_utils import get_last_checkpoint

    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-4")

    assert cli.main(_resume_argv(play_folder, out, "--resume")) == 0
    printed = capsys.readouterr().out
    assert f"skipping {out / 'checkpoint-4'}: incomplete" in printed
    assert f"resuming from {out / 'checkpoint-2'}" in printed
    # Steps 1-2 ran in the killed process, 3-6 after the resume: losses and learning rates of the uninterrupted run.
    resumed, reference = _logged(out / "metrics.json"), _logged(uninterrupted / "metrics.json")
    assert set(resumed) == set(reference) == set(range(1, RESUME_STEPS + 1))
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), (step, resumed, reference)
    assert (out / "checkpoint-4" / RESUME_FILE).is_file()  # written again, complete this time
    assert torch.load(out / "checkpoint-4" / "optimizer.pt", weights_only=True)["state"]


def _one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("bitnet-a48 train: error: "), err
    return err[0]


@pytest.mark.parametrize("extra, message", [
    (["--seq-len", "32"], "the data differs: seq_len 32 (checkpoint: 16), train_blocks_sha256"),
    (["--data", "ONE_PLAY"], "the data differs: source "),
    (["--seed", "1"], "the data differs: shuffle_seed 1 (checkpoint: 0)"),
    (["--vocab-size", "280"], "the tokenizer differs: bpe_vocab_size 280 (checkpoint: 300)"),
    (["--tokenizer", "OTHER_TOKENIZER"], "the tokenizer differs: name "),
    (["--hidden-act", "silu"], "the model config differs: hidden_act 'silu' (checkpoint: 'relu2')"),
    (["--steps", "12"], "the recipe differs: max_steps 12 (checkpoint: 6)"),
    (["--lr", "1e-3"], "the recipe differs: lr 0.001 (checkpoint: 0.003), second_lr"),
])
def test_resume_refuses_what_differs_in_one_line(play_folder: Path, uninterrupted: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture, extra: list[str],
                                                 message: str) -> None:
    other = tmp_path / "other-tokenizer"
    train_bpe_tokenizer([(play_folder / sorted(os.listdir(play_folder))[1]).read_text()], 280).save_pretrained(other)
    one_play = play_folder / sorted(os.listdir(play_folder))[0]
    extra = [{"ONE_PLAY": str(one_play), "OTHER_TOKENIZER": str(other)}.get(a, a) for a in extra]
    out = tmp_path / "resumed"
    argv = _resume_argv(play_folder, out, "--resume", str(uninterrupted / "checkpoint-2"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, *extra])
    assert exit_info.value.code == 2
    line = _one_error_line(capsys)
    assert f"cannot resume from {uninterrupted / 'checkpoint-2'}: " in line and message in line, line
    assert not out.exists()  # nothing trained or written
    # The same command without the difference resumes (in this process, as the uninterrupted run: bit for bit).
    if extra[0] == "--seq-len":
        assert cli.main(argv) == 0
        assert _logged(out / "metrics.json") == _logged(uninterrupted / "metrics.json")


def test_resume_refuses_incomplete_or_missing_checkpoints(play_folder: Path, uninterrupted: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    torn = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(uninterrupted / "checkpoint-2", torn)
    (torn / RESUME_FILE).unlink()
    for resume, message in [([], "no complete checkpoint-* folder in"), ([str(torn)], "is not a complete checkpoint"),
                            ([str(tmp_path / "nothing")], "checkpoint folder not found")]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(_resume_argv(play_folder, tmp_path / "run", "--resume", *resume))
        assert exit_info.value.code == 2 and message in _one_error_line(capsys)
    # A checkpoint whose files changed after it was marked complete.
    changed = tmp_path / "changed" / "checkpoint-2"
    shutil.copytree(uninterrupted / "checkpoint-2", changed)
    with open(changed / "optimizer.pt", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(SystemExit):
        cli.main(_resume_argv(play_folder, tmp_path / "changed", "--resume"))
    assert "changed after it was written: optimizer.pt has" in _one_error_line(capsys)
