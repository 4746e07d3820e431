"""The `bitnet-a48` command line: the checkpoint tools, eval and bench through `cli.main`."""

import json
from pathlib import Path

import pytest
import torch

from bitnet_a48 import cli, create_model
from bitnet_a48.data import load_documents
from bitnet_a48.tokenization_bitnet_a48 import train_bpe_tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny latent a4.8 model with a BPE tokenizer, and a folder of two real plays (the second is validation)."""
    root = tmp_path_factory.mktemp("cli")
    plays = root / "plays"
    plays.mkdir()
    docs = load_documents("shakespeare")[:2]
    for i, doc in enumerate(docs):
        (plays / f"{i}.txt").write_text(doc.text[:20_000])
    tokenizer = train_bpe_tokenizer((d.text for d in docs), vocab_size=300)
    model = create_model(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    folder = root / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, plays


def test_eval_prints_perplexity_and_sparsity(saved: tuple[Path, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    model, plays = saved
    out = tmp_path / "eval.json"
    assert cli.main(["eval", str(model), "--data", str(plays), "--validation-every", "2", "--seq-len", "32",
                     "--max-blocks", "4", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["quant_mode"] == "a4.8" and result["blocks"] == 4
    assert 1.0 < result["perplexity"] < 400  # an untrained model: about the vocabulary size
    assert result["sparsity"]["out"] >= 0.5 and 0.05 < result["sparsity"]["qkv"] < 0.25
    assert "valid PPL" in capsys.readouterr().out


def test_pack_then_eval_gives_the_same_perplexity(saved: tuple[Path, Path], tmp_path: Path) -> None:
    model, plays = saved
    assert cli.main(["pack", str(model), str(tmp_path / "packed")]) == 0
    assert json.loads((tmp_path / "packed" / "config.json").read_text())["weight_format"] == "packed"
    results = []
    for folder in (model, tmp_path / "packed"):
        out = tmp_path / f"{folder.name}.json"
        cli.main(["eval", str(folder), "--data", str(plays), "--validation-every", "2", "--seq-len", "32",
                  "--max-blocks", "4", "--quant-mode", "a8", "--output", str(out)])
        results.append(json.loads(out.read_text())["perplexity"])
    assert results[0] == pytest.approx(results[1], rel=1e-4)


def test_checkpoint_tools_report_errors_with_exit_status_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert cli.main(["pack", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_bench_compares_latent_and_packed(saved: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    model, _ = saved
    torch.manual_seed(0)
    assert cli.main(["bench", str(model), "--new-tokens", "3", "--reps", "1", "--prompt-tokens", "4"]) == 0
    text = capsys.readouterr().out
    assert "as saved (latent)" in text and "packed, 2-bit in memory" in text and "packed, int8 CPU layout" in text


def test_eval_refuses_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", str(tmp_path / "nothing")])
    assert exit_info.value.code == 2 and "model folder not found" in capsys.readouterr().err
