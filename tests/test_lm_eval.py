"""lm-evaluation-harness on a saved packed model: ``lm_eval --model hf`` with remote code, local tasks, offline.

The harness runs in a subprocess (its CLI, as a user would call it) where nothing imports ``bitnet_a48``: the model
can only load through the remote code that ``save_pretrained`` copied next to the weights. Its per-sample
log-likelihoods must equal the ones computed here with the same model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitnet_a48 import BitNetA48Config, BitNetA48ForCausalLM

pytest.importorskip("lm_eval")

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

MC_DOCS = [
    {"question": "the cat sat on the", "choices": ["mat", "sky", "dog"], "answer": 0},
    {"question": "a bird can", "choices": ["fly", "swim", "read"], "answer": 1},
    {"question": "the sun is", "choices": ["hot", "cold"], "answer": 0},
    {"question": "two plus two is", "choices": ["four", "five", "six"], "answer": 2},
    {"question": "the dog can", "choices": ["read", "fly"], "answer": 1},
]
TEXT_DOCS = [{"text": "the cat sat on the mat"}, {"text": "a bird can fly and the sun is hot"}]

MC_TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
ROLLING_TASK = """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
"""


def _word_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace word-level vocabulary; ids 0-2 are the tiny config's pad, bos and eos."""
    texts = [d["question"] for d in MC_DOCS] + [c for d in MC_DOCS for c in d["choices"]]
    texts += [d["text"] for d in TEXT_DOCS]
    words = sorted({w for t in texts for w in t.split()})
    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2, "[UNK]": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", bos_token="<s>", eos_token="</s>", unk_token="[UNK]"
    )


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _sum_logprob(model: BitNetA48ForCausalLM, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context), summed over the continuation tokens."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)  # (T, V)
    positions = range(len(context) - 1, ids.shape[1] - 1)
    return sum(float(logprobs[p, t]) for p, t in zip(positions, continuation, strict=True))


def _samples(folder: Path, task: str) -> list[dict]:
    (path,) = folder.rglob(f"samples_{task}_*.jsonl")
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])


def test_lm_eval_hf_runs_local_tasks_on_packed_model(tiny_config_kwargs: dict, tmp_path: Path) -> None:
    tokenizer = _word_tokenizer()
    assert len(tokenizer) <= tiny_config_kwargs["vocab_size"]
    model = BitNetA48ForCausalLM(BitNetA48Config(**tiny_config_kwargs)).pack().eval()
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(MC_TASK.format(data=_write_jsonl(tasks / "mc.jsonl", MC_DOCS)))
    (tasks / "tiny_ppl.yaml").write_text(ROLLING_TASK.format(data=_write_jsonl(tasks / "text.jsonl", TEXT_DOCS)))

    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={model_dir},trust_remote_code=True,dtype=float32", "--tasks", "tiny_mc,tiny_ppl",
           "--include_path", str(tasks), "--device", "cpu", "--batch_size", "4", "--output_path", str(out),
           "--log_samples"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]

    # Multiple choice: each choice's log-likelihood " choice" after the question, and the argmax accuracy.
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    samples = _samples(out, "tiny_mc")
    assert [s["doc_id"] for s in samples] == list(range(len(MC_DOCS)))
    correct = 0
    for doc, sample in zip(MC_DOCS, samples, strict=True):
        theirs = [float(resp[0][0]) for resp in sample["resps"]]
        ours = [_sum_logprob(model, encode(doc["question"]), encode(" " + c)) for c in doc["choices"]]
        assert theirs == pytest.approx(ours, abs=1e-4), (doc, theirs, ours)
        correct += max(range(len(ours)), key=ours.__getitem__) == doc["answer"]
    assert results["tiny_mc"]["acc,none"] == pytest.approx(correct / len(MC_DOCS))

    # Rolling log-likelihood: the whole text after the prefix token (bos, else eos), and word perplexity from it.
    samples = _samples(out, "tiny_ppl")
    total_ll, total_words = 0.0, 0
    for doc, sample in zip(TEXT_DOCS, samples, strict=True):
        ours = _sum_logprob(model, [tokenizer.bos_token_id], encode(doc["text"]))
        assert float(sample["resps"][0][0]) == pytest.approx(ours, abs=1e-4)
        total_ll += ours
        total_words += len(doc["text"].split())
    expected_ppl = float(torch.tensor(-total_ll / total_words).exp())
    assert results["tiny_ppl"]["word_perplexity,none"] == pytest.approx(expected_ppl, rel=1e-4)
