"""Corpora: the embedded Shakespeare, local files, deterministic split by document, packing and bad inputs."""

import json
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from bitnet_a48.data import (
    Document,
    load_corpus,
    load_documents,
    markdown_play_to_text,
    pack_documents,
    shakespeare_files,
    split_documents,
)
from bitnet_a48.tokenization_bitnet_a48 import train_bpe_tokenizer

PARAGRAPH = "The quality of mercy is not strain'd; it droppeth as the gentle rain from heaven.\n"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_bpe_tokenizer([PARAGRAPH * 50], vocab_size=300)


def test_embedded_corpus_is_38_plays_split_by_document() -> None:
    files = shakespeare_files()
    assert len(files) == 38
    corpus = load_corpus("shakespeare")
    assert len(corpus.train) == 34 and len(corpus.validation) == 4
    names = [d.name for d in corpus.validation]
    assert names == ["comedies/a-midsummer-night-s-dream", "histories/henry-iv-part-2",
                     "problems/measure-for-measure", "romances/pericles"]
    assert not set(names) & {d.name for d in corpus.train}
    assert sum(len(d.text) for d in corpus.train + corpus.validation) > 4_500_000
    # Deterministic: a second load gives the same split and text.
    again = load_corpus("shakespeare")
    assert [d.name for d in again.train] == [d.name for d in corpus.train]
    assert again.validation[0].text == corpus.validation[0].text


def test_markdown_is_turned_into_plain_script() -> None:
    md = "# Hamlet\n\n## ACT I\n\n_Enter Ghost_\n\n**HORATIO**  \nStay! speak, speak!  \nI charge thee.\n"
    text = "Hamlet\n\nACT I\n\n[Enter Ghost]\n\nHORATIO:\nStay! speak, speak!\nI charge thee.\n"
    assert markdown_play_to_text(md) == text


def test_split_rules() -> None:
    docs = [Document(f"d{i}", f"text {i}\n") for i in range(25)]
    corpus = split_documents(docs, validation_every=10)
    assert [d.name for d in corpus.validation] == ["d0", "d10", "d20"]
    assert len(corpus.train) == 22
    single = split_documents([Document("one", "line\n" * 100)], validation_every=10)
    assert single.train[0].text + single.validation[0].text == "line\n" * 100
    assert single.validation[0].text.count("\n") == 10


def test_local_text_jsonl_parquet_and_folder(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text(PARAGRAPH * 3)
    lines = [json.dumps({"text": f"{PARAGRAPH} {i}"}) for i in range(12)]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    assert len(load_documents(str(tmp_path / "a.txt"))) == 1
    assert len(load_documents(str(tmp_path / "b.jsonl"))) == 12
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": [PARAGRAPH, "", PARAGRAPH]}), tmp_path / "c.parquet")
    assert len(load_documents(str(tmp_path / "c.parquet"), text_field="content")) == 2
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.md").write_text(PARAGRAPH)
    assert [d.name for d in load_documents(str(folder))] == ["0.md", "1.md", "2.md"]


def test_bad_inputs_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_documents(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="no text found"):
        load_documents(str(tmp_path / "empty.txt"))
    (tmp_path / "wrong.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="no field 'text'"):
        load_documents(str(tmp_path / "wrong.jsonl"))


def test_packing(tokenizer: PreTrainedTokenizerFast) -> None:
    docs = [Document("a", PARAGRAPH * 4), Document("b", PARAGRAPH * 4)]
    packed = pack_documents(tokenizer, docs, seq_len=16)
    stream = packed.blocks.flatten().tolist()
    assert stream[0] == tokenizer.bos_token_id
    assert tokenizer.eos_token_id in stream  # documents are separated
    item = packed[0]
    assert torch.equal(item["input_ids"], item["labels"]) and item["input_ids"].shape == (16,)
    shuffled = pack_documents(tokenizer, docs, seq_len=16, shuffle_seed=3)
    assert torch.equal(shuffled.blocks, pack_documents(tokenizer, docs, seq_len=16, shuffle_seed=3).blocks)
    assert sorted(map(tuple, shuffled.blocks.tolist())) == sorted(map(tuple, packed.blocks.tolist()))


def test_text_shorter_than_one_sequence(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="shorter than one sequence of 512 tokens"):
        pack_documents(tokenizer, [Document("short", "Too short.")], seq_len=512)
