"""`bitnet-a48 serve`: the OpenAI-compatible server, driven by the official `openai` client against a live uvicorn.

One tiny packed a4.8 model (tests/conftest.py's shape, the default 3-bit KV cache) with a BPE tokenizer is saved,
loaded through the server's loader (safetensors only) and served on 127.0.0.1 from a background thread. Greedy text
is compared with `generate()` on a second copy of the model loaded from the same folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import httpx2
import openai
import pytest
import torch
from conftest import TINY_CONFIG
from torch import nn
from transformers import pipeline

from bitnet_a48 import create_model
from bitnet_a48.head_native import MAX_NATIVE_HEAD_ROWS, head_logits
from bitnet_a48.kernels_cpu_native import native_available
from bitnet_a48.serve import add_serve_parser, create_server, load_for_serving, main
from bitnet_a48.serving_engine import CertifiedHead, SamplingParams, Sequence, wait_until
from bitnet_a48.tokenization_bitnet_a48 import DEFAULT_CHAT_TEMPLATE, train_bpe_tokenizer

TEXTS = [
    "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n",
    "To be, or not to be: that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.\n",
] * 20
PROMPTS = [
    "To be",
    "Now is the winter of our discontent",
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him. Whether",
    "a",
    "summer by this sun of York",
    "the question",
    "Made glorious summer by this sun of York; To be, or not to be: that is",
    "lend me",
]
MODEL_NAME = "tiny-a48"
MAX_BATCH, MAX_QUEUE = 4, 8
STARTUP_S = 20.0


class Served(NamedTuple):
    url: str
    client: openai.OpenAI
    engine: Any
    reference: Any  # a second copy of the model, for generate()
    tokenizer: Any
    folder: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    folder = tmp_path_factory.mktemp("serve") / MODEL_NAME
    tokenizer = train_bpe_tokenizer(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    model = create_model(**{**TINY_CONFIG, "vocab_size": len(tokenizer)}).eval().pack()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    served_model, served_tokenizer = load_for_serving(str(folder))
    reference, _ = load_for_serving(str(folder))
    port = _free_port()
    engine, server = create_server(
        served_model, served_tokenizer, MODEL_NAME, port=port, max_batch_size=MAX_BATCH, max_queue=MAX_QUEUE
    )
    engine.start()
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_until(lambda: server.started, STARTUP_S), "the server did not start"
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield Served(url, client, engine, reference, served_tokenizer, folder)
    server.should_exit = True
    thread.join(10)
    engine.stop()


def generate_text(served: Served, ids: list[int], max_tokens: int) -> tuple[str, int, str]:
    """generate()'s greedy text, token count and finish reason for ``ids``."""
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = served.reference.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0
        )
    new = out[0, prompt.shape[1] :].tolist()
    eos = served.reference.config.eos_token_id
    reason = "stop" if new[-1] == eos else "length"
    return served.tokenizer.decode(new, skip_special_tokens=True), len(new), reason


def prompt_ids(served: Served, prompt: str) -> list[int]:
    return served.tokenizer(prompt)["input_ids"]


def stream_completion_text(served: Served, **kwargs: Any) -> tuple[str, str | None]:
    text, reason = "", None
    for chunk in served.client.completions.create(model=MODEL_NAME, stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.text
            reason = choice.finish_reason or reason
    return text, reason


# -----------------------------------------------------------------------------------------------------------------
# What works
# -----------------------------------------------------------------------------------------------------------------


def test_models_endpoint_lists_the_served_model(served: Served) -> None:
    assert [m.id for m in served.client.models.list().data] == [MODEL_NAME]
    assert served.client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_greedy_completion_equals_generate_streaming_or_not(served: Served) -> None:
    for prompt, max_tokens in ((PROMPTS[1], 24), (PROMPTS[3], 7)):
        ids = prompt_ids(served, prompt)
        expected, count, reason = generate_text(served, ids, max_tokens)
        reply = served.client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0)
        assert reply.choices[0].text == expected
        assert reply.choices[0].finish_reason == reason
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), count)
        assert stream_completion_text(served, prompt=prompt, max_tokens=max_tokens, temperature=0) == (expected, reason)
    # token ids as the prompt
    ids = prompt_ids(served, PROMPTS[0])
    reply = served.client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=10, temperature=0)
    assert reply.choices[0].text == generate_text(served, ids, 10)[0]
    # several prompts of one length in one request: prefilled together, each choice still generate()'s
    batch = [prompt_ids(served, p)[:5] for p in PROMPTS[1:4]] + [prompt_ids(served, PROMPTS[2])[:9]]
    reply = served.client.completions.create(model=MODEL_NAME, prompt=batch, max_tokens=20, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert [c.text for c in reply.choices] == [generate_text(served, ids, 20)[0] for ids in batch]


def test_eight_concurrent_clients_get_generate_text(served: Served) -> None:
    """8 clients at once (batch 4, so requests also join a running batch); prompts of 2 to 25 tokens and up to 30 new
    tokens: rows are left-padded, pass the 16-token high-precision window and leave at different steps."""
    jobs = [(prompt, 18 + 4 * (i % 4), i % 2 == 0) for i, prompt in enumerate(PROMPTS)]
    expected = [generate_text(served, prompt_ids(served, p), n)[0] for p, n, _ in jobs]
    start_steps = served.engine.stats()["steps"]

    def call(job: tuple[str, int, bool]) -> str:
        prompt, max_tokens, stream = job
        if stream:
            return stream_completion_text(served, prompt=prompt, max_tokens=max_tokens, temperature=0)[0]
        reply = served.client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0)
        return reply.choices[0].text

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(call, jobs, timeout=60))
    assert texts == expected
    steps = served.engine.stats()["steps"] - start_steps
    assert steps < sum(n for _, n, _ in jobs) - 8, f"{steps} decode steps for 8 requests: they were not batched"


def test_chat_uses_the_tokenizers_template_like_pipeline(served: Served) -> None:
    messages = [{"role": "system", "content": "You are a poet."}, {"role": "user", "content": "To be?"}]
    assert served.tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE  # saved with the tokenizer, reloaded
    rendered = served.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<s>SYSTEM:\nYou are a poet.\n\nUSER:\nTo be?\n\nASSISTANT:\n"
    ids = served.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    expected, count, _ = generate_text(served, ids, 12)
    reply = served.client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), count)
    chunks = list(
        served.client.chat.completions.create(
            model=MODEL_NAME,
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == count
    generator = pipeline("text-generation", model=served.reference, tokenizer=served.tokenizer)
    out = generator(messages, max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert out[-1] == {"role": "assistant", "content": expected}


def test_stop_strings_cut_the_text_streaming_or_not(served: Served) -> None:
    expected, _, _ = generate_text(served, prompt_ids(served, PROMPTS[6]), 30)
    stop = expected[6:9]
    assert len(stop) == 3, f"the reference text is too short: {expected!r}"
    cut = expected[: expected.index(stop)]
    reply = served.client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[6], max_tokens=30, temperature=0, stop=[stop, "never in this text \u2603"]
    )
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == (cut, "stop")
    assert stream_completion_text(served, prompt=PROMPTS[6], max_tokens=30, temperature=0, stop=stop) == (cut, "stop")


def test_seeded_sampling_repeats_and_seeds_differ(served: Served) -> None:
    def sample(seed: int) -> str:
        return (
            served.client.completions.create(
                model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=16, temperature=1.0, top_p=0.9, seed=seed
            )
            .choices[0]
            .text
        )

    first = sample(1)
    assert sample(1) == first
    assert len({first, sample(2), sample(3)}) > 1


# -----------------------------------------------------------------------------------------------------------------
# Bad requests, a full queue, a client that goes away
# -----------------------------------------------------------------------------------------------------------------

LONG_PROMPT = " ".join(["To be, or not to be"] * 60)  # far past the 256-token context
BAD_REQUESTS = [
    # (path, raw body, status, param, code)
    ("completions", '{"model": "tiny-a48", "prompt": "x", ', 400, None, "invalid_json"),
    ("completions", "[1, 2]", 400, None, "invalid_body"),
    ("completions", {"model": "gpt-4", "prompt": "x"}, 404, "model", "model_not_found"),
    ("completions", {"model": MODEL_NAME, "prompt": LONG_PROMPT}, 400, "max_tokens", "context_length_exceeded"),
    (
        "completions",
        {"model": MODEL_NAME, "prompt": "x", "max_tokens": 255},
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    ("completions", {"model": MODEL_NAME, "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("completions", {"model": MODEL_NAME, "prompt": "x", "max_tokens": -5}, 400, "max_tokens", "invalid_value"),
    ("completions", {"model": MODEL_NAME, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "invalid_value"),
    ("completions", {"model": MODEL_NAME, "prompt": "x", "temperature": "hot"}, 400, "temperature", "invalid_value"),
    ("completions", {"model": MODEL_NAME, "prompt": "x", "temperature": 3}, 400, "temperature", "invalid_value"),
    ("completions", {"model": MODEL_NAME, "prompt": "x", "top_k": 5}, 400, "top_k", "unknown_parameter"),
    ("completions", {"model": MODEL_NAME}, 400, "prompt", "missing_required_parameter"),
    ("completions", {"model": MODEL_NAME, "prompt": [5, 9999]}, 400, "prompt", "invalid_value"),
    (
        "completions",
        {"model": MODEL_NAME, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]},
        400,
        "stop",
        "invalid_value",
    ),
    ("completions", {"model": MODEL_NAME, "prompt": "x", "logprobs": 2}, 400, "logprobs", "unsupported_value"),
    ("chat/completions", {"model": MODEL_NAME, "messages": "hi"}, 400, "messages", "invalid_value"),
    ("chat/completions", {"model": MODEL_NAME, "messages": []}, 400, "messages", "invalid_value"),
    (
        "chat/completions",
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        400,
        "max_tokens",
        "invalid_value",
    ),
    (
        "chat/completions",
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "tools": []},
        400,
        "tools",
        "unknown_parameter",
    ),
    (
        "chat/completions",
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": LONG_PROMPT}]},
        400,
        "messages",
        "context_length_exceeded",
    ),
]


@pytest.mark.parametrize("path, body, status, param, code", BAD_REQUESTS)
def test_bad_requests_get_the_openai_error_shape(
    served: Served, path: str, body: Any, status: int, param: str | None, code: str
) -> None:
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx2.post(
        f"{served.url}/v1/{path}", content=content, headers={"content-type": "application/json"}, timeout=10
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"]) == (param, code), error
    assert error["message"] and "\n" not in error["message"]


def test_the_client_raises_its_own_error_classes(served: Served) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        served.client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256 tokens"):
        served.client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": LONG_PROMPT}])


def test_a_full_queue_answers_429_at_once(served: Served) -> None:
    engine = served.engine
    assert wait_until(lambda: engine.stats()["running"] == 0, 10)
    # Fill every slot and the whole queue with long sequences, then ask once more.
    params = SamplingParams(max_tokens=250, temperature=0)
    fill = [
        Sequence(index=0, prompt_ids=[1, 5, 6], params=params, emit=lambda event: None)
        for _ in range(MAX_BATCH + MAX_QUEUE)
    ]
    engine.submit(fill)
    try:
        start = time.perf_counter()
        with pytest.raises(openai.RateLimitError, match="at capacity"):
            served.client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=4)
        assert time.perf_counter() - start < 5
    finally:
        engine.cancel(fill)
    assert wait_until(lambda: engine.stats()["running"] == engine.stats()["waiting"] == 0, 30)
    reply = served.client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=4)
    assert reply.usage.completion_tokens >= 1


def test_a_client_that_disconnects_mid_stream_frees_its_slot(served: Served) -> None:
    engine = served.engine
    assert wait_until(lambda: engine.stats()["running"] == 0, 10)
    body = {"model": MODEL_NAME, "prompt": "To be", "max_tokens": 240, "temperature": 0, "stream": True}
    lines = []
    with httpx2.stream("POST", f"{served.url}/v1/completions", json=body, timeout=10) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                lines.append(json.loads(line[6:]))
            if len(lines) == 3:
                break
        assert engine.stats()["running"] == 1
    # The connection is closed with most of the 240 tokens still to come: the row must leave the batch.
    assert wait_until(lambda: engine.stats()["running"] == 0, 10), engine.stats()
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in lines)


# -----------------------------------------------------------------------------------------------------------------
# Loading, the command line, the head
# -----------------------------------------------------------------------------------------------------------------


def test_loading_refuses_pickle_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = create_model(**TINY_CONFIG)
    model.save_pretrained(tmp_path)
    state = {k: v for k, v in model.state_dict().items()}
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only safetensors"):
        load_for_serving(str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--port", "1"])
    assert exit_info.value.code == 2
    assert "pytorch_model.bin" in capsys.readouterr().err


def test_serve_parser_and_light_import() -> None:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "some/folder", "--port", "9001", "--max-batch-size", "8"])
    assert (args.model, args.host, args.port, args.max_batch_size, args.max_queue) == (
        "some/folder",
        "127.0.0.1",
        9001,
        8,
        64,
    )
    assert args.func.__name__ == "cmd_serve"
    # Imported below the command line (whose package skips registration), serve.py loads neither torch nor FastAPI.
    code = "import sys, bitnet_a48.cli, bitnet_a48.serve; print(sorted({'torch', 'fastapi'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_certified_head_recomputes_near_ties_alone() -> None:
    """More rows than the native GEMV takes: a BLAS GEMM, whose near-tie rows are recomputed alone."""
    torch.manual_seed(0)
    rows = MAX_NATIVE_HEAD_ROWS + 12
    head = nn.Linear(64, 101, bias=False)
    hidden = torch.randn(rows, 1, 64)
    with torch.no_grad():
        head.weight[7] = head.weight[5] + 1e-7  # rows 5 and 7 tie within float error for every input
        hidden[:4] = head.weight[5] * 4  # ... and these inputs make them the top two
    certified = CertifiedHead(head)
    with torch.no_grad():
        logits = certified(hidden, [True] * rows)
        alone = torch.cat([head_logits(head, hidden[i : i + 1].clone())[:, -1] for i in range(rows)])
    tied = [set(row) == {5, 7} for row in alone.topk(2, dim=-1).indices.tolist()]  # the first 4, and random rows
    assert tied[:4] == [True] * 4 and certified.recomputed == sum(tied)
    assert rows - sum(tied) > MAX_NATIVE_HEAD_ROWS  # the check below stays on the GEMM path
    tied_rows = torch.tensor(tied)
    assert torch.equal(logits[tied_rows], alone[tied_rows])  # recomputed rows are the one-row call, bit for bit
    assert torch.equal(logits.argmax(-1), alone.argmax(-1))
    certified.recomputed = 0
    with torch.no_grad():
        certified(hidden[~tied_rows], [True] * (rows - sum(tied)))
    assert certified.recomputed == 0, "rows with a clear maximum must not be recomputed"


@pytest.mark.skipif(not native_available(), reason="needs the native kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_certified_head_takes_the_native_gemv_as_it_is(dtype: torch.dtype) -> None:
    """Up to MAX_NATIVE_HEAD_ROWS rows the head is the native GEMV, whose per-row sums the batch does not change: no
    row is recomputed, and every row equals the one-row call bit for bit, near ties included."""
    torch.manual_seed(0)
    head = nn.Linear(64, 101, bias=False).to(dtype)
    hidden = torch.randn(8, 1, 64).to(dtype)
    with torch.no_grad():
        head.weight[7] = head.weight[5]
        hidden[:4] = head.weight[5] * 4
        certified = CertifiedHead(head)
        logits = certified(hidden, [True] * 8)
        alone = torch.cat([head_logits(head, hidden[i : i + 1].clone())[:, -1] for i in range(8)]).float()
    assert certified.recomputed == 0
    assert torch.equal(logits, alone)


def test_transformers_serve_works_once_architectures_names_an_auto_class(served: Served, tmp_path: Path) -> None:
    """`transformers serve` loads `getattr(transformers, config.architectures[0])`, so our saved config (which names
    `BitNetA48ForCausalLM`, not exported by transformers) fails with AttributeError; naming `AutoModelForCausalLM`
    there makes it resolve the folder's `auto_map` (remote code), and greedy text is generate()'s."""
    import transformers
    from transformers.cli.serve import Serve

    assert not hasattr(transformers, json.loads((served.folder / "config.json").read_text())["architectures"][0])
    folder = tmp_path / "for-transformers-serve"
    shutil.copytree(served.folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["AutoModelForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    port = _free_port()
    server = Serve(
        force_model=str(folder), trust_remote_code=True, device="cpu", host="127.0.0.1", port=port, non_blocking=True
    )
    try:
        assert wait_until(lambda: server.server.started, STARTUP_S), "transformers serve did not start"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.completions.create(model=str(folder), prompt=PROMPTS[1], max_tokens=12)
        assert reply.choices[0].text == generate_text(served, prompt_ids(served, PROMPTS[1]), 12)[0]
    finally:
        server.kill_server()


def test_packed_and_converted_tokenizers_get_the_default_chat_template_unless_they_have_one(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from bitnet_a48.convert import pack_checkpoint
    from bitnet_a48.tokenization_bitnet_a48 import load_tokenizer

    tokenizer = train_bpe_tokenizer(TEXTS, vocab_size=300)
    model = create_model(**{**TINY_CONFIG, "vocab_size": len(tokenizer)})
    for name, template in (("plain", None), ("own", "{{ messages[0]['content'] }}")):
        tokenizer.chat_template = template
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        if template is None:
            assert AutoTokenizer.from_pretrained(tmp_path / name).chat_template is None
            assert load_tokenizer(str(tmp_path / name)).chat_template == DEFAULT_CHAT_TEMPLATE
        pack_checkpoint(tmp_path / name, tmp_path / f"{name}-packed")
        packed = AutoTokenizer.from_pretrained(tmp_path / f"{name}-packed")
        assert packed.chat_template == (DEFAULT_CHAT_TEMPLATE if template is None else template)


@pytest.mark.parametrize(
    "signal_name, started_ignoring_sigint", [("SIGINT", False), ("SIGTERM", False), ("SIGINT", True)]
)
def test_python_m_serve_runs_until_interrupted(served: Served, signal_name: str, started_ignoring_sigint: bool) -> None:
    """`python -m bitnet_a48.serve FOLDER` (what `bitnet-a48 serve` runs): serves, then exits 0 on Ctrl-C or
    SIGTERM, also when started with SIGINT ignored (a background job of a non-interactive shell)."""
    import signal

    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    port = _free_port()
    command = [sys.executable, "-m", "bitnet_a48.serve", str(served.folder), "--port", str(port), "--threads", "1",
               "--max-batch-size", "2", "--served-model-name", "cli-model"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=ignore_sigint if started_ignoring_sigint else None)  # fmt: skip
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)

        def ready() -> bool:
            try:
                return [m.id for m in client.models.list().data] == ["cli-model"]
            except openai.APIConnectionError:
                return process.poll() is not None  # stop waiting if it died

        assert wait_until(ready, 60, interval=0.2) and process.poll() is None, process.stderr.read()
        reply = client.completions.create(model="cli-model", prompt=PROMPTS[1], max_tokens=8, temperature=0)
        assert reply.choices[0].text == generate_text(served, prompt_ids(served, PROMPTS[1]), 8)[0]
    finally:
        process.send_signal(getattr(signal, signal_name))
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert f"on http://127.0.0.1:{port}/v1" in out


def test_a_taken_port_is_a_one_line_error(served: Served, capsys: pytest.CaptureFixture) -> None:
    """The HTTP server runs in a thread and the engine here: a server that cannot bind ends both, exit code 2."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            main([str(served.folder), "--port", str(port), "--log-level", "critical"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"bitnet-a48 serve: error: the HTTP server could not start on 127.0.0.1:{port} ")
