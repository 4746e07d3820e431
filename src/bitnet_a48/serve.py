"""`bitnet-a48 serve MODEL_DIR`: an OpenAI-compatible server (FastAPI + uvicorn) with continuous batching.

    bitnet-a48 serve runs/a48/final --host 127.0.0.1 --port 8000
    python -m bitnet_a48.serve runs/a48/final            # the same

The model folder must be a ``bitnet_a48`` folder written by ``save_pretrained`` (``config.json`` and safetensors
weights: ``BitNetA48ForCausalLM.from_pretrained`` never unpickles) with its tokenizer. The HTTP API is
``serving_app.py``, the batching ``serving_engine.py``. This module keeps its top-level imports light (argparse,
typing), so that building the command line's parsers imports neither torch nor FastAPI.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any

DTYPE_CHOICES = ("auto", "bf16", "fp32")
LM_HEAD_CHOICES = ("saved", "int8")


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a saved model over an OpenAI-compatible HTTP API (continuous batching)",
        description="Serve a bitnet_a48 model folder (safetensors only) with FastAPI + uvicorn: "
        "/v1/models, /v1/completions and /v1/chat/completions, streaming included. "
        "Concurrent requests are decoded together; a full queue answers 429.",
    )
    p.add_argument("model", help="model folder written by save_pretrained, with its tokenizer")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument(
        "--served-model-name", default=None, help="the name clients pass as `model` (default: the folder's name)"
    )
    p.add_argument("--max-batch-size", type=int, default=16, help="sequences decoded together (default 16)")
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="sequences waiting for a batch slot; beyond, requests get 429 at once (default 64)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="dtype of the embeddings, norms, head and activations (default: as saved)",
    )
    p.add_argument(
        "--lm-head",
        choices=LM_HEAD_CHOICES,
        default="saved",
        help="saved: the high-precision head (default); int8: model.quantize_lm_head('int8'), faster "
        "on CPUs, slightly different logits",
    )
    p.add_argument("--chat-template", default=None, help="a Jinja chat template file to use instead of the tokenizer's")
    p.add_argument(
        "--log-level",
        default="warning",
        choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn's log level (default warning)",
    )
    p.set_defaults(func=cmd_serve)


def load_for_serving(
    model_dir: str, dtype: str = "auto", lm_head: str = "saved", chat_template: str | None = None
) -> tuple[Any, Any]:
    """The model (eval mode) and tokenizer of ``model_dir``; a folder of another model type or without safetensors
    weights is refused with a one-line error."""
    import torch
    from transformers import AutoTokenizer

    from . import register_auto_classes
    from .modeling_bitnet_a48 import BitNetA48ForCausalLM

    register_auto_classes()
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model folder not found: {model_dir}")
    config_file = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{model_dir}: no config.json, not a folder written by save_pretrained")
    with open(config_file, encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    if model_type != "bitnet_a48":
        raise ValueError(
            f"{model_dir}: model_type {model_type!r} is not 'bitnet_a48' (convert it with `bitnet-a48 convert`)"
        )
    torch_dtype = {"auto": "auto", "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    model = BitNetA48ForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)  # safetensors only
    model.eval()
    if lm_head == "int8":
        model.quantize_lm_head("int8")
    elif lm_head != "saved":
        raise ValueError(f"--lm-head must be one of {LM_HEAD_CHOICES}, got {lm_head!r}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if chat_template is not None:
        with open(chat_template, encoding="utf-8") as f:
            tokenizer.chat_template = f.read()
    return model, tokenizer


def create_server(
    model: Any,
    tokenizer: Any,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 16,
    max_queue: int = 64,
    log_level: str = "warning",
) -> tuple[Any, Any]:
    """An engine (not started) and a ``uvicorn.Server`` for ``model``. ``cmd_serve`` runs the server in a thread and
    the engine in the main thread (``engine.run()``, see ``BatchingEngine.start`` for why); in-process users may
    instead call ``engine.start()`` and ``server.run()``, and ``engine.stop()`` afterwards."""
    import uvicorn

    from .serving_app import build_app
    from .serving_engine import BatchingEngine

    engine = BatchingEngine(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue)
    app = build_app(engine, model_name, context_length=model.config.max_position_embeddings)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False))
    return engine, server


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_until_interrupted(engine: Any, server: Any, address: str) -> None:
    """Serve HTTP from a thread and run the engine here (the thread that loaded the model) until Ctrl-C or SIGTERM;
    a server that fails to start (e.g. the port is taken) stops the engine and raises ``OSError``."""

    def http() -> None:
        try:
            server.run()
        except SystemExit:  # uvicorn's exit on a failed startup (logged by uvicorn); reported below as OSError
            pass
        finally:  # however the server ends, the engine ends too
            engine.stop()

    thread = threading.Thread(target=http, name="bitnet-a48-http", daemon=True)
    # Ctrl-C and SIGTERM end the engine's loop, as uvicorn's own handlers do when it runs in the main thread: set
    # explicitly, since a process started with SIGINT ignored (a background job of a non-interactive shell) gets no
    # KeyboardInterrupt from Python. Only the main thread may set handlers.
    in_main = threading.current_thread() is threading.main_thread()
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, _raise_keyboard_interrupt) for sig in handled} if in_main else {}
    thread.start()
    try:
        engine.run()
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.should_exit = True
        thread.join(10)
    if not server.started:
        raise OSError(f"the HTTP server could not start on {address} (see uvicorn's message above)")


def cmd_serve(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model and serve it until interrupted (Ctrl-C)."""
    import torch

    for name in ("max_batch_size", "threads", "port"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be at least 0, got {args.max_queue}")
    if args.chat_template is not None and not os.path.isfile(args.chat_template):
        raise FileNotFoundError(f"--chat-template: file not found: {args.chat_template}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_for_serving(args.model, args.dtype, args.lm_head, args.chat_template)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    engine, server = create_server(
        model, tokenizer, name, args.host, args.port, args.max_batch_size, args.max_queue, args.log_level
    )
    print(
        f"serving {name} ({args.model}) on http://{args.host}:{args.port}/v1 "
        f"(batch {args.max_batch_size}, queue {args.max_queue}, {torch.get_num_threads()} threads)",
        flush=True,
    )
    run_until_interrupted(engine, server, f"{args.host}:{args.port}")
    return {"model": name, "host": args.host, "port": args.port}


def main(argv: list[str] | None = None) -> int:
    """``python -m bitnet_a48.serve MODEL_DIR ...``: the `serve` subcommand on its own."""
    parser = argparse.ArgumentParser(prog="python -m bitnet_a48.serve")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, OSError) as err:
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        parser.exit(2, f"bitnet-a48 serve: error: {message}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
