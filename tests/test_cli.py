"""The `bitnet-a48` command line: the checkpoint tools, eval and bench through `cli.main`, `--help` and its speed."""

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F

from bitnet_a48 import cli, convert, create_model, training
from bitnet_a48.data import load_corpus, load_documents, pack_documents
from bitnet_a48.tokenization_bitnet_a48 import train_bpe_tokenizer

EVAL_ARGS = ["--validation-every", "2", "--seq-len", "32", "--max-blocks", "4"]


class Saved(NamedTuple):
    folder: Path  # the trained model with its tokenizer
    untrained: Path  # the same model before training
    plays: Path  # two plays; the first is the validation split of EVAL_ARGS
    model: Any  # the trained model, in memory
    tokenizer: Any


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    """A tiny latent a4.8 model with a BPE tokenizer, saved before and after 60 Adam steps on the training play."""
    root = tmp_path_factory.mktemp("cli")
    plays = root / "plays"
    plays.mkdir()
    docs = load_documents("shakespeare")[:2]
    for i, doc in enumerate(docs):
        (plays / f"{i}.txt").write_text(doc.text[:20_000])
    tokenizer = train_bpe_tokenizer((d.text for d in docs), vocab_size=300)
    torch.manual_seed(0)
    model = create_model(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(root / "untrained")
    tokenizer.save_pretrained(root / "untrained")
    train = pack_documents(tokenizer, load_corpus(str(plays), 2).train, 32).blocks
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(60):
        batch = train[torch.randint(0, train.shape[0], (8,), generator=generator)]
        optimizer.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return Saved(root / "model", root / "untrained", plays, model, tokenizer)


def _eval(folder: Path, plays: Path, out: Path, *extra: str) -> dict[str, Any]:
    assert cli.main(["eval", str(folder), "--data", str(plays), *EVAL_ARGS, "--output", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_eval_prints_perplexity_and_sparsity(saved: Saved, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    result = _eval(saved.folder, saved.plays, tmp_path / "eval.json")
    assert result["quant_mode"] == "a4.8" and result["blocks"] == 4
    assert result["sparsity"]["out"] >= 0.5 and 0.05 < result["sparsity"]["qkv"] < 0.25
    assert "valid PPL" in capsys.readouterr().out

    # The reported perplexity is exp(mean next-token cross-entropy) of the saved model on the first 4 validation
    # blocks: recomputed here from the logits of the model as trained in memory (before save and load).
    blocks = pack_documents(saved.tokenizer, load_corpus(str(saved.plays), 2).validation, 32).blocks[:4]
    with torch.no_grad():
        logits = saved.model(blocks).logits.float()
    expected = math.exp(F.cross_entropy(logits[:, :-1].flatten(0, 1), blocks[:, 1:].flatten()).item())
    assert result["perplexity"] == pytest.approx(expected, rel=1e-4)

    # An untrained model is close to uniform (perplexity = vocabulary size); the trained one is far below it, so a
    # command that evaluated fresh weights, or a model that ignores its input, would fail here.
    untrained = _eval(saved.untrained, saved.plays, tmp_path / "untrained.json")["perplexity"]
    vocab = len(saved.tokenizer)
    assert 0.8 * vocab < untrained < 1.25 * vocab
    assert result["perplexity"] < 0.4 * untrained


def test_pack_then_eval_gives_the_same_perplexity(saved: Saved, tmp_path: Path) -> None:
    assert cli.main(["pack", str(saved.folder), str(tmp_path / "packed")]) == 0
    assert json.loads((tmp_path / "packed" / "config.json").read_text())["weight_format"] == "packed"
    results = [_eval(folder, saved.plays, tmp_path / f"{folder.name}.json", "--quant-mode", "a8")["perplexity"]
               for folder in (saved.folder, tmp_path / "packed")]
    assert results[0] == pytest.approx(results[1], rel=1e-4)


def _one_error_line(capsys: pytest.CaptureFixture, command: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bitnet-a48 {command}: error: "), captured.err
    assert "error" not in captured.out
    return lines[0]


def test_checkpoint_tools_report_errors_on_stderr_with_exit_status_2(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    for command in ("convert", "export", "pack"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, str(tmp_path / "missing"), str(tmp_path / "out")])
        assert exit_info.value.code == 2
        assert "no config.json" in _one_error_line(capsys, command)
    # convert.py's Python entry points return the status instead.
    assert convert.main_convert([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "no config.json" in _one_error_line(capsys, "convert")
    assert not (tmp_path / "out").exists()


def test_commands_refuse_corrupt_weights_in_one_line(saved: Saved, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((saved.folder / name).read_bytes())
    (broken / "model.safetensors").write_bytes((saved.folder / "model.safetensors").read_bytes()[:-100])
    for argv in (["eval", str(broken)], ["bench", str(broken)], ["pack", str(broken), str(tmp_path / "out")]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        assert f"{broken / 'model.safetensors'}: truncated: header says" in _one_error_line(capsys, argv[0])
    (broken / "model.safetensors").unlink()
    (broken / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(SystemExit):
        cli.main(["eval", str(broken)])
    assert "only safetensors weights are loaded" in _one_error_line(capsys, "eval")


def test_bench_compares_latent_and_packed(saved: Saved, capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)
    assert cli.main(["bench", str(saved.folder), "--new-tokens", "3", "--reps", "1", "--prompt-tokens", "4"]) == 0
    text = capsys.readouterr().out
    assert "as saved (latent)" in text and "packed, 2-bit in memory" in text and "packed, int8 CPU layout" in text


def test_eval_refuses_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", str(tmp_path / "nothing")])
    assert exit_info.value.code == 2 and "model folder not found" in capsys.readouterr().err


def test_choices_spelled_in_cli_match_their_modules() -> None:
    assert cli.TRAIN_PRESET_NAMES == tuple(training.TRAIN_PRESETS)
    assert cli.RECIPE_NAMES == (*sorted(training.RECIPES), *sorted(training.RECIPE_ALIASES))
    assert set(cli.DTYPE_NAMES) == set(convert.DTYPES)
    assert cli.LINEAR_CLASS_NAMES == convert.LINEAR_CLASSES


# ---------------------------------------------------------------------------------------------------------
# The console entry, in fresh processes: --help of every command, its speed, the light package import
# ---------------------------------------------------------------------------------------------------------


def _console(*args: str) -> list[str]:
    script = Path(sys.executable).parent / "bitnet-a48"
    return [str(script), *args] if script.is_file() else [sys.executable, "-m", "bitnet_a48.cli", *args]


# Every subcommand with options its --help must list (`test_every_subcommand_is_listed` keeps this complete).
HELP_OPTIONS = {
    "train": ["--recipe", "--resume", "--save-steps", "--data", "--tokenizer", "--seq-len", "--steps", "--lr"],
    "quickstart": ["--output-dir", "--baseline-act", "--prompt", "--preset", "--data"],
    "generate": ["model", "--prompt", "--max-new-tokens", "--greedy", "--trust-remote-code"],
    "convert": ["src", "--weight-format", "--quant-mode", "--dtype", "--kv-cache-bits"],
    "export": ["src", "--weight-format", "--linear-class", "--dtype", "--no-quantization-config"],
    "pack": ["src", "out"],
    "eval": ["model", "--data", "--seq-len", "--max-blocks", "--quant-mode", "--output"],
    "bench": ["model", "--prompt-tokens", "--new-tokens", "--batch-size", "--reps"],
    "serve": ["model", "--host", "--port"],
}
HEAVY_MODULES = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "fastapi", "uvicorn")


def test_every_subcommand_is_listed() -> None:
    commands = [register.__name__.removeprefix("add_").removesuffix("_parser") for register in cli.SUBCOMMANDS]
    assert commands == list(HELP_OPTIONS)


def _imported(importtime_log: str) -> dict[str, int]:
    """Top-level modules in a ``python -X importtime`` log and their cumulative microseconds."""
    modules = {}
    for line in importtime_log.splitlines():
        if line.startswith("import time:") and "|" in line and not line.endswith("| package"):
            _, cumulative, name = line.split("|")
            if cumulative.strip().isdigit() and not name[1:].startswith(" "):  # nested imports are indented
                modules[name.strip()] = int(cumulative)
    return modules


@pytest.mark.parametrize("command", [None, *HELP_OPTIONS])
def test_help_of_every_command_prints_its_options_fast(command: str | None) -> None:
    """`bitnet-a48 [COMMAND] --help` in a fresh process: its options, exit 0, no heavy import, under 1 s of imports.

    The imports are timed by ``-X importtime`` (what the process spends besides starting Python): the wall time of a
    process on a shared 2-core machine varies too much for a 1 s bound. An eager import of torch and transformers
    takes 5-9 s here, and any import of them fails the test whatever its time.
    """
    args = [command, "--help"] if command else ["--help"]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "bitnet_a48.cli", *args], capture_output=True,
                          text=True, timeout=60)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"usage: bitnet-a48 {command or ''}".rstrip())
    for option in HELP_OPTIONS.get(command, list(HELP_OPTIONS)):
        assert option in proc.stdout, option
    modules = _imported(proc.stderr)
    assert "bitnet_a48" in modules and "argparse" in modules  # the log was read
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY_MODULES)
    assert not heavy, f"--help imported {heavy}"
    seconds = sum(modules.values()) / 1e6
    print(f"bitnet-a48 {' '.join(args)}: imports {seconds:.3f} s, wall {wall:.2f} s")
    assert seconds < 1.0, sorted(modules.items(), key=lambda kv: -kv[1])[:10]


def test_console_script_help_is_fast() -> None:
    """The installed `bitnet-a48` script itself (wall time, generous for a loaded machine)."""
    for args in (["--help"], ["train", "--help"], ["serve", "--help"]):
        start = time.perf_counter()
        proc = subprocess.run(_console(*args), capture_output=True, text=True, timeout=60)
        seconds = time.perf_counter() - start
        assert proc.returncode == 0, proc.stderr
        assert seconds < 3.0, (args, seconds)


def test_parsing_every_command_leaves_torch_unimported() -> None:
    """In one process: build the parser, parse each command's --help and real arguments; torch stays out."""
    script = textwrap.dedent(f"""
        import contextlib, io, sys
        import bitnet_a48.cli as cli  # as the console script imports it (bitnet_a48/__init__.py then stays light)
        parser = cli.build_parser()
        for command in {list(HELP_OPTIONS)!r}:
            with contextlib.redirect_stdout(io.StringIO()):
                try:
                    parser.parse_args([command, "--help"])
                except SystemExit as exit:
                    assert exit.code == 0, (command, exit.code)
        parser.parse_args(["train", "--preset", "tiny", "--resume"])
        parser.parse_args(["serve", "some-folder", "--port", "9000"])
        print(sorted(m for m in {list(HEAVY_MODULES)!r} if m in sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["[]"]


# ---------------------------------------------------------------------------------------------------------
# User errors: one line on stderr naming the problem, exit status 2, no traceback; for every subcommand
# ---------------------------------------------------------------------------------------------------------

USER_ERRORS = [
    (["train", "--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["train", "--steps", "0"], "--steps must be at least 1, got 0"),
    (["train", "--data", "MISSING/corpus.txt"], "data file or folder not found: MISSING/corpus.txt"),
    (["train", "--output-dir", "MISSING", "--resume"], "--resume: no complete checkpoint-* folder in MISSING"),
    (["train", "--resume", "MISSING"], "checkpoint folder not found: MISSING"),
    (["quickstart", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["quickstart", "--bogus"], "unrecognized arguments: --bogus"),
    (["generate"], "the following arguments are required: model"),
    (["generate", "MISSING"], "model folder not found: MISSING"),
    (["generate", "MODEL", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["convert", "MISSING", "OUT"], "MISSING: no config.json"),
    (["convert", "MODEL", "OUT", "--dtype", "int3"], "argument --dtype: invalid choice: 'int3'"),
    (["export", "MISSING", "OUT"], "MISSING: no config.json"),
    (["export", "MODEL"], "the following arguments are required: out"),
    (["pack", "MISSING", "OUT"], "MISSING: no config.json"),
    (["eval", "MISSING"], "model folder not found: MISSING"),
    (["eval", "MODEL", "--seq-len", "0"], "--seq-len must be at least 1, got 0"),
    (["bench", "MODEL", "--new-tokens", "1"], "--new-tokens must be at least 2"),
    (["bench", "MODEL", "--reps", "x"], "argument --reps: invalid int value: 'x'"),
    (["serve", "MISSING"], "model folder not found: MISSING"),
    (["serve", "MODEL", "--port", "0"], "--port must be at least 1, got 0"),
    (["bogus"], "argument COMMAND: invalid choice: 'bogus'"),
]


def test_every_subcommand_has_user_errors_tested() -> None:
    assert {argv[0] for argv, _ in USER_ERRORS} == {*HELP_OPTIONS, "bogus"}


@pytest.mark.parametrize("argv, message", USER_ERRORS, ids=[" ".join(a) for a, _ in USER_ERRORS])
def test_user_errors_are_one_line_with_exit_status_2(saved: Saved, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     argv: list[str], message: str) -> None:
    names = {"MISSING": str(tmp_path / "missing"), "MODEL": str(saved.folder), "OUT": str(tmp_path / "out")}
    for name, value in names.items():
        argv = [a.replace(name, value) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    # argparse reports an unknown command or option from the top parser, the rest from the subcommand's.
    top = argv[0] == "bogus" or message.startswith("unrecognized arguments")
    prefix = "bitnet-a48: error: " if top else f"bitnet-a48 {argv[0]}: error: "
    assert len(lines) == 1 and lines[0].startswith(prefix), captured.err
    for name, value in names.items():
        message = message.replace(name, value)
    assert message in lines[0]
    assert not (tmp_path / "out").exists()


def test_user_errors_of_the_console_script_have_no_traceback(tmp_path: Path) -> None:
    """In a real process, offline: a Hub name that cannot be fetched (transformers' OSError) is one line too."""
    proc = subprocess.run(_console("generate", "no-such-org/no-such-model"), capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("bitnet-a48 generate: error: cannot load 'no-such-org/no-such-model': ")


def test_the_cli_imports_light_and_registers_on_first_use(saved: Saved) -> None:
    script = textwrap.dedent(f"""
        import sys
        import bitnet_a48.cli
        print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
        import bitnet_a48
        from transformers import AutoConfig
        bitnet_a48.BitNetA48Config  # the first access imports and registers
        print(type(AutoConfig.from_pretrained({str(saved.folder)!r})).__name__)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["[]", "BitNetA48Config"]


def test_importing_the_package_registers_the_auto_classes(saved: Saved) -> None:
    """`import bitnet_a48` alone, no attribute touched, then transformers' Auto classes load our folder."""
    script = textwrap.dedent(f"""
        import bitnet_a48
        from transformers import AutoModelForCausalLM
        print(type(AutoModelForCausalLM.from_pretrained({str(saved.folder)!r})).__name__)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["BitNetA48ForCausalLM"]
