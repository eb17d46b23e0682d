"""`picochat serve`: the web chat UI and an OpenAI-compatible API on http://127.0.0.1:8000.

    picochat serve                       # newest of rl, sft, mid, base
    picochat serve --stage sft --port 8080 --workers 2
    curl http://127.0.0.1:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "hi"}]}'

On GPUs every device holds one model replica (one worker each); on CPU `--workers N` engines share
one model. Binds to 127.0.0.1 unless --host says otherwise. `--api-key KEY` (or the environment
variable PICOCHAT_API_KEY) makes /v1/* require `Authorization: Bearer KEY`; binding another address
without a key prints a warning.
"""

from __future__ import annotations

import argparse
import ipaddress
import os

import torch
import uvicorn

from picochat.config import add_checkpoint_arguments, add_device_arguments
from picochat.errors import ConfigError
from picochat.infer import Engine
from picochat.infer.chat_defaults import add_sampling_arguments, check_sampling_arguments
from picochat.infer.loading import load_for_inference
from picochat.runtime import pick_device, pick_dtype, warn
from picochat.serve.app import create_app
from picochat.serve.http import server_options
from picochat.serve.pool import serving_pool
from picochat.serve.requests import Defaults, Limits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server to the network)")
    parser.add_argument("--port", type=int, default=8000)
    add_device_arguments(parser)
    parser.add_argument("--workers", type=int, default=None,
                        help="engines generating at once (default: one per GPU; 1 on CPU); each takes up to "
                             "--max-batch requests at once where it batches")
    parser.add_argument("--max-batch", type=int, default=8,
                        help="requests one worker decodes together (continuous batching: picochat models in fp32 or bf16), "
                             "also the largest n a request may ask for; 1 turns batching off")
    parser.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a worker before 503")
    add_sampling_arguments(parser, ", the chat default; a request's own value wins")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1/* (default: $PICOCHAT_API_KEY; none: open)")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse flags no request could use, before anything is loaded or bound."""
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: must be in 0..65535")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: need at least 1")
    if args.max_batch < 1:
        raise ConfigError(f"--max-batch {args.max_batch}: need at least 1")
    if args.max_queue < 0:
        raise ConfigError(f"--max-queue {args.max_queue}: must be >= 0")
    # the same ranges as the request fields these flags stand in for (picochat.serve.requests)
    check_sampling_arguments(args, Limits.max_top_k, Limits.max_tokens)
    if api_key(args) is not None and not api_key(args).strip():
        raise ConfigError("--api-key / PICOCHAT_API_KEY is empty; give a key or unset it")


def api_key(args: argparse.Namespace) -> str | None:
    return args.api_key if args.api_key is not None else os.environ.get("PICOCHAT_API_KEY")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_app(args: argparse.Namespace):
    """(FastAPI app, model id) for the checkpoint and pool the flags describe."""
    check_arguments(args)
    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    if device.type == "cuda" and args.device in (None, "", "auto", "cuda"):
        # the first --workers devices (all of them when it is not given)
        devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())][: args.workers]
    else:
        devices = [device]
    engines, tokenizer, path = [], None, None
    for d in devices:
        model, tokenizer, _, path = load_for_inference(args.stage, args.tag, args.step, d, dtype)
        engines.append(Engine(model, tokenizer, compute_dtype=dtype))
    if device.type != "cuda" and (args.workers or 1) > 1:  # CPU: engines share the one read-only model
        engines = [Engine(engines[0].model, tokenizer, compute_dtype=dtype) for _ in range(args.workers)]
    model_id = f"picochat-{path.parts[-3]}-{path.parts[-2]}-step{path.name.removeprefix('step_')}"
    defaults = Defaults(args.temperature, args.top_k, args.max_tokens, args.repetition_penalty)
    pool = serving_pool(engines, args.max_batch, args.max_queue)
    batching = len(pool.engines) > len(pool.replicas())
    limits = Limits(max_n=min(Limits.max_n, args.max_batch)) if batching else None
    return create_app(pool, model_id, limits=limits, defaults=defaults, api_key=api_key(args)), model_id


def run(args: argparse.Namespace) -> int:
    app, model_id = build_app(args)
    if not is_loopback(args.host) and not api_key(args):
        warn(f"--host {args.host} serves anyone who can reach port {args.port}, with no API key; "
             "set --api-key (or PICOCHAT_API_KEY) to require one")
    print(f"serving {model_id} on http://{args.host}:{args.port}  (chat UI at /, API at /v1/chat/completions "
          "and /v1/completions)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", **server_options())
    return 0
