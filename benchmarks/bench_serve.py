"""Serving throughput: `bitnet-a48 serve` against the same model run sequentially and llama-cpp-python's server.

Kept out of CI: it needs llama-cpp-python with its ``server`` extras and ``gguf`` (see ``bench_llamacpp.py``'s HOW TO
RUN; then ``VENV/bin/pip install "DIR/llama_cpp_python-*.whl[server]"``), a few GB of disk and minutes.

Models, all random weights of the 2B-4T shape (``--layers``, default 30), one machine, ``--threads`` each:

- ``bitnet-a48 serve``: ``python -m bitnet_a48.serve`` (a subprocess) on ``bench_llamacpp.build_ours_defaults``
  saved to ``--work-dir`` (packed 2-bit weights, bf16 embeddings / norms / head, the default 3-bit KV cache), with a
  word-level tokenizer of the model's 128256 ids (``t<id>``); continuous batching up to 16 sequences. With
  ``--lm-head int8`` as a second row (``--variants``).
- ``sequential generate()``: the same model in this process, one request after another through ``generate()``
  (greedy, prefill included): what a server without batching can do, whatever the number of clients.
- ``llama.cpp server``: ``python -m llama_cpp.server`` (a subprocess) on the TQ2_0 GGUF of ``bench_llamacpp``
  (``prepare_ggufs``, cached in ``--work-dir``), ``n_threads`` = ``n_threads_batch`` = ``--threads``; it runs one
  request at a time.

Load: C clients (1, 4, 16), each a closed loop of non-streaming ``/v1/completions`` requests (``max_tokens`` 32,
``temperature`` 0; no end-of-sequence token in our model's generation config, and llama.cpp's left as it is: a
``logit_bias`` against it costs llama-cpp-python ~150 ms a token in Python, and the completion tokens counted are
``usage``'s), at least ``--min-requests`` requests per row (rounds of C requests); prompts of 16
tokens, each request's first token different (llama.cpp reuses a cached common prefix). requests/s and tokens/s
(completion tokens from ``usage``) over the wall time of all requests of a row. The greedy texts of our server are
checked against ``generate()``'s for the prompts the sequential row ran.

    python benchmarks/bench_serve.py                       # 30 layers, 2 threads (long on 2 cores)
    python benchmarks/bench_serve.py --layers 4 --min-requests 2 --clients 1 4   # a quick try
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_llamacpp import VOCAB, build_ours_defaults, log, prepare_ggufs
from tokenizers import Tokenizer, models, pre_tokenizers

from bitnet_a48.tokenization_bitnet_a48 import SPECIAL_TOKENS, wrap_tokenizer

MAX_TOKENS = 32
PROMPT_WORDS = 15  # + BOS = 16 tokens
SERVE_MODEL_VERSION = 1  # bump when the saved model changes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def word_tokenizer() -> object:
    """A word-level tokenizer over all 128256 ids: id i is the word ``t<i>`` (ids 0-2 the special tokens)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"t{i}": i for i in range(len(SPECIAL_TOKENS), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return wrap_tokenizer(tok, model_max_length=4096)


def our_prompt(k: int) -> str:
    return " ".join(f"t{1000 + 97 * k + j}" for j in range(PROMPT_WORDS))


def llama_prompt(k: int) -> str:
    # byte tokens of llama.cpp's generated vocabulary: 16 distinct letters, the first one different per request
    return "".join(chr(ord("a") + (k + 5 * j) % 26) for j in range(16))


def prepare_our_model(work_dir: Path, layers: int) -> Path:
    folder = work_dir / f"bitnet-a48-serve-2b4t-shape-random-L{layers}-v{SERVE_MODEL_VERSION}"
    if (folder / "config.json").exists():
        log(f"reusing {folder}")
        return folder
    log(f"saving our packed model ({layers} layers) to {folder}")
    model = build_ours_defaults(layers)
    model.generation_config.eos_token_id = None  # every completion runs its 32 tokens
    partial = folder.with_suffix(".partial")
    model.save_pretrained(partial)
    word_tokenizer().save_pretrained(partial)
    partial.rename(folder)
    return folder


def post(port: int, body: dict[str, object], timeout: float = 1800) -> dict[str, object]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data}")
        return data
    finally:
        conn.close()


def health(port: int) -> dict[str, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/health")
    return json.loads(conn.getresponse().read())


def wait_ready(port: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the server on port {port} did not answer within {timeout:.0f} s")


def load(port: int, clients: int, rounds: int, body_of: Callable[[int], dict[str, object]]) -> dict[str, object]:
    """C closed-loop clients, ``rounds`` requests each; request r of client c uses prompt index r * C + c."""
    results: list[dict[str, object]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(rounds):
            k = r * clients + c
            try:
                reply = post(port, body_of(k))
            except Exception as error:  # reported below: a benchmark row with failures is not a result
                with lock:
                    errors.append(f"{type(error).__name__}: {error}")
                return
            with lock:
                results.append({"k": k, "text": reply["choices"][0]["text"], "usage": reply["usage"]})

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    tokens = sum(r["usage"]["completion_tokens"] for r in results)
    return {
        "requests": len(results),
        "seconds": seconds,
        "requests_per_s": len(results) / seconds,
        "tokens_per_s": tokens / seconds,
        "completion_tokens": tokens,
        "prompt_tokens": results[0]["usage"]["prompt_tokens"],
        "texts": {r["k"]: r["text"] for r in results},
    }


def run_server(command: list[str], port: int, startup_s: float, env: dict[str, str] | None = None) -> subprocess.Popen:
    log(" ".join(command))
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_ready(port, process, startup_s)
    except RuntimeError:
        process.kill()
        raise RuntimeError(f"server failed: {process.communicate()[1][-2000:]}") from None
    return process


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


def bench_ours(folder: Path, args: argparse.Namespace, lm_head: str) -> dict[int, dict[str, object]]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "bitnet_a48.serve",
        str(folder),
        "--port",
        str(port),
        "--threads",
        str(args.threads),
        "--max-batch-size",
        "16",
        "--max-queue",
        "64",
        "--served-model-name",
        "ours",
        "--lm-head",
        lm_head,
    ]
    process = run_server(command, port, startup_s=600)
    rows = {}
    try:
        body = {"model": "ours", "max_tokens": MAX_TOKENS, "temperature": 0}
        post(port, {**body, "prompt": our_prompt(999)})  # warm-up
        for clients in args.clients:
            before = health(port)
            rounds = -(-args.min_requests // clients)
            rows[clients] = load(port, clients, rounds, lambda k: {**body, "prompt": our_prompt(k)})
            after = health(port)
            steps = after["steps"] - before["steps"]
            recomputed = after["recomputed_head_rows"] - before["recomputed_head_rows"]
            rows[clients].update(decode_steps=steps, recomputed_head_rows=recomputed)
            log(f"ours ({lm_head} head), {clients} clients: {rows[clients]['tokens_per_s']:.2f} tokens/s")
    finally:
        stop(process)
    return rows


def bench_llamacpp(gguf: Path, args: argparse.Namespace) -> dict[int, dict[str, object]]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_threads",
        str(args.threads),
        "--n_threads_batch",
        str(args.threads),
        "--n_ctx",
        "2048",
        "--interrupt_requests",
        "False",
        "--verbose",
        "False",
    ]
    process = run_server(command, port, startup_s=300)
    rows = {}
    try:
        body = {"model": "llama", "max_tokens": MAX_TOKENS, "temperature": 0}
        post(port, {**body, "prompt": "warm up"})
        for clients in args.clients:
            rounds = -(-args.min_requests // clients)
            rows[clients] = load(port, clients, rounds, lambda k: {**body, "prompt": llama_prompt(k)})
            log(f"llama.cpp, {clients} clients: {rows[clients]['tokens_per_s']:.2f} tokens/s")
    finally:
        stop(process)
    return rows


def bench_sequential(folder: Path, args: argparse.Namespace) -> dict[str, object]:
    """generate() one request after another, in this process (``--threads`` torch threads)."""
    from bitnet_a48.serve import load_for_serving

    torch.set_num_threads(args.threads)
    model, tokenizer = load_for_serving(str(folder))
    texts = {}

    def one(k: int) -> None:
        ids = tokenizer(our_prompt(k), return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False)
        texts[k] = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    one(999)  # warm-up
    start = time.perf_counter()
    for k in range(args.sequential_requests):
        one(k)
    seconds = time.perf_counter() - start
    n = args.sequential_requests
    return {
        "requests": n,
        "seconds": seconds,
        "requests_per_s": n / seconds,
        "tokens_per_s": n * MAX_TOKENS / seconds,
        "texts": texts,
    }


def print_table(report: dict[str, object]) -> None:
    rows: dict[str, dict[int, dict[str, object]]] = report["rows"]
    llama = rows.get("llama.cpp server (TQ2_0)", {})
    print(f"\n{report['settings']}\n")
    print(
        "| server | clients | requests/s | tokens/s | vs llama.cpp server | vs sequential generate() | head rows "
        "recomputed / decode steps |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    seq = report["sequential"]
    for name, by_clients in rows.items():
        for clients, row in by_clients.items():
            base = llama.get(clients)
            vs_llama = f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
            vs_seq = f"{row['tokens_per_s'] / seq['tokens_per_s']:.2f}x" if seq else "-"
            recomputed = f"{row['recomputed_head_rows']} / {row['decode_steps']}" if "decode_steps" in row else "-"
            print(
                f"| {name} | {clients} | {row['requests_per_s']:.3f} | {row['tokens_per_s']:.2f} | {vs_llama} | "
                f"{vs_seq} | {recomputed} |"
            )
    if seq:
        print(
            f"| sequential generate() | any | {seq['requests_per_s']:.3f} | {seq['tokens_per_s']:.2f} | - | 1.00x | - |"
        )
    for name, verdict in report["greedy_equal"].items():
        print(f"\ngreedy texts of {name} equal to generate()'s: {verdict}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--min-requests", type=int, default=8, help="requests per row at least (whole rounds)")
    parser.add_argument("--sequential-requests", type=int, default=3)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["saved", "int8"],
        choices=["saved", "int8"],
        help="our server's lm_head: saved (bf16, default) and/or int8",
    )
    parser.add_argument("--skip-llamacpp", action="store_true")
    parser.add_argument("--work-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "bitnet_a48_llamacpp")
    parser.add_argument("--output", type=Path, default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)

    folder = prepare_our_model(args.work_dir, args.layers)
    rows: dict[str, dict[int, dict[str, object]]] = {}
    if not args.skip_llamacpp:
        gguf = prepare_ggufs(args.work_dir, args.layers, ["TQ2_0"], keep_f16=False)["TQ2_0"]
        rows["llama.cpp server (TQ2_0)"] = bench_llamacpp(gguf, args)
    for variant in args.variants:
        rows[f"bitnet-a48 serve ({variant} head)"] = bench_ours(folder, args, variant)
    sequential = bench_sequential(folder, args) if args.sequential_requests else {}
    greedy_equal = {}
    for name, by_clients in rows.items():
        if name.startswith("bitnet-a48 serve (saved"):
            pairs = [
                (row["texts"][k], text)
                for row in by_clients.values()
                for k, text in sequential["texts"].items()
                if k in row["texts"]
            ]
            greedy_equal[name] = f"{sum(a == b for a, b in pairs)} of {len(pairs)}"
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    settings = (
        f"{args.layers} layers of 2B-4T, {args.threads} threads, {MAX_TOKENS}-token greedy completions, "
        f"at least {args.min_requests} requests a row; CPU {cpu} ({os.cpu_count()} cores), torch "
        f"{torch.__version__} ISA {torch.backends.cpu.get_cpu_capability()}"
    )
    report = {"settings": settings, "rows": rows, "sequential": sequential, "greedy_equal": greedy_equal}
    print_table(report)
    if args.output:
        args.output.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
