"""Tokenizers for BitNet a4.8 models: a small byte-level BPE that trains offline, or any existing tokenizer.

The default tokenizer is a byte-level BPE (GPT-2's pre-tokenisation and byte alphabet, so every string round-trips
and no unknown token exists) trained with the `tokenizers` library on the training text in about a second. It is
wrapped as a transformers fast tokenizer with ``bos`` / ``eos`` / ``pad`` tokens; ``save_pretrained`` writes a
``tokenizer.json`` that ``AutoTokenizer.from_pretrained`` loads without this package.

Special token ids are fixed: ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, matching the defaults of
``BitNetA48Config`` (``bos_token_id=1``, ``eos_token_id=2``).

Built from ``tokenizers`` objects on purpose: in transformers 5, ``GPT2TokenizerFast(vocab_file=..., merges_file=...)``
silently yields an empty vocabulary.

Chat template (:data:`DEFAULT_CHAT_TEMPLATE`, given to every tokenizer this module builds, and to saved or converted
tokenizers that have none): turns written like the lines of a play script, the role in capitals, each assistant turn
closed by ``</s>`` (so generation stops at the end of a reply); ``add_generation_prompt`` opens an assistant turn::

    <s>SYSTEM:
    You are a poet.

    USER:
    Speak.

    ASSISTANT:
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2 in this order
DEFAULT_VOCAB_SIZE = 4096
BYTE_ALPHABET_SIZE = 256
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers reads it beside tokenizer_config.json
# Newlines sit in expressions: transformers renders templates with trim_blocks, which drops a newline after a tag.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ (message['role'] | upper) ~ ':\\n' ~ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:\\n' }}{% endif %}"
)


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    min_frequency: int = 2,
    model_max_length: int = 2048,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it as a transformers fast tokenizer.

    Args:
        texts: training documents (an iterator is consumed once).
        vocab_size: size of the vocabulary including the 256 bytes and the 3 special tokens.
        min_frequency: a pair must occur this often to be merged.
        model_max_length: the longest sequence the model takes (stored in the tokenizer config).

    Encoding prepends ``<s>``; append ``</s>`` yourself where a document ends (packing does).
    """
    if vocab_size < BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must be at least {BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)} (bytes + special tokens), "
            f"got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = [0]

    def counted(docs: Iterable[str]) -> Iterable[str]:
        for doc in docs:
            seen[0] += len(doc)
            yield doc

    tok.train_from_iterator(counted(texts), trainer=trainer)
    if seen[0] == 0:
        raise ValueError("cannot train a tokenizer on empty text")
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return wrap_tokenizer(tok, model_max_length=model_max_length)


def wrap_tokenizer(tok: Tokenizer, model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """A transformers fast tokenizer around a `tokenizers.Tokenizer` holding the three special tokens."""
    for token in SPECIAL_TOKENS:
        if tok.token_to_id(token) is None:
            raise ValueError(f"tokenizer lacks the special token {token!r}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        padding_side="left",  # batched generation continues from the right end
        clean_up_tokenization_spaces=False,
        chat_template=DEFAULT_CHAT_TEMPLATE,
    )


def add_default_chat_template(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give ``tokenizer`` :data:`DEFAULT_CHAT_TEMPLATE` if it has no chat template (in place; returned)."""
    if tokenizer.chat_template is None:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def write_default_chat_template(folder: str | Path) -> bool:
    """Write :data:`DEFAULT_CHAT_TEMPLATE` as ``chat_template.jinja`` into a saved tokenizer's ``folder`` unless it
    has a template already (that file, ``chat_template.json`` or a ``chat_template`` entry of its
    ``tokenizer_config.json``); returns whether it wrote one. The other tokenizer files are left as they are."""
    folder = Path(folder)
    if (folder / CHAT_TEMPLATE_FILE).is_file() or (folder / "chat_template.json").is_file():
        return False
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file() and json.loads(config_file.read_text(encoding="utf-8")).get("chat_template"):
        return False
    (folder / CHAT_TEMPLATE_FILE).write_text(DEFAULT_CHAT_TEMPLATE, encoding="utf-8")
    return True


def load_tokenizer(name_or_path: str, **kwargs: object) -> PreTrainedTokenizerBase:
    """Any existing tokenizer (a folder or a Hub name) via ``AutoTokenizer``, given a pad token and
    :data:`DEFAULT_CHAT_TEMPLATE` if it has none."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    check_tokenizer(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return add_default_chat_template(tokenizer)


def check_tokenizer(
    tokenizer: PreTrainedTokenizerBase, sample: str = "To be, or not to be: that is the question."
) -> None:
    """Raise `ValueError` if the vocabulary is empty, there is no eos token, or ``sample`` does not round-trip."""
    if len(tokenizer) == 0:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has an empty vocabulary")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs an eos token to separate packed documents")
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    if not ids or tokenizer.decode(ids, skip_special_tokens=True).strip() != sample:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} does not round-trip text: {sample!r} -> {ids}")
