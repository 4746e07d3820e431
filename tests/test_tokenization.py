"""The default byte-level BPE tokenizer: vocabulary, special tokens, round trip, save/reload through AutoTokenizer."""

from pathlib import Path

import pytest
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from bitnet_a48.tokenization_bitnet_a48 import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    check_tokenizer,
    load_tokenizer,
    train_bpe_tokenizer,
)

TEXTS = [
    "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n",
    "To be, or not to be: that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.\n",
] * 20


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_bpe_tokenizer(TEXTS, vocab_size=400)


def test_vocabulary_is_not_empty_and_special_ids_are_fixed(tokenizer: PreTrainedTokenizerFast) -> None:
    assert 259 <= len(tokenizer) <= 400  # 256 bytes + 3 special tokens + merges
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    # Merges were learnt: a frequent word is a single token.
    assert len(tokenizer(" question", add_special_tokens=False)["input_ids"]) == 1


@pytest.mark.parametrize("text", ["To be, or not to be", "Unseen wörds, ünïcode ✓ and\ttabs\n\nnewlines  ", ""])
def test_round_trip(tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id  # encoding prepends <s>
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Byte-level: all 256 byte symbols are in the vocabulary, so no text needs an unknown token (there is none),
    # and the text itself encodes to ordinary tokens only.
    assert tokenizer.unk_token is None and tokenizer.backend_tokenizer.model.unk_token is None
    assert set(pre_tokenizers.ByteLevel.alphabet()) <= set(tokenizer.get_vocab())
    specials = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
    assert not specials & set(ids[1:]) and all(0 <= i < len(tokenizer) for i in ids)


def test_save_and_reload_with_auto_tokenizer(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == len(tokenizer)
    text = "Whether 'tis nobler in the mind"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.pad_token_id == 0 and reloaded.eos_token_id == 2
    assert load_tokenizer(str(tmp_path)).get_vocab() == tokenizer.get_vocab()


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="empty text"):
        train_bpe_tokenizer(["", ""], vocab_size=300)
    with pytest.raises(ValueError, match="at least 259"):
        train_bpe_tokenizer(TEXTS, vocab_size=100)


def test_check_tokenizer_rejects_an_empty_vocabulary(tokenizer: PreTrainedTokenizerFast) -> None:
    class Empty:
        eos_token_id = 2

        def __len__(self) -> int:
            return 0

    with pytest.raises(ValueError, match="empty vocabulary"):
        check_tokenizer(Empty())  # type: ignore[arg-type]
    check_tokenizer(tokenizer)
