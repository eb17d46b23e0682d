"""Inference benchmark: engine decode speed and time to first token, then the server under load.

    python bench/infer.py                                  # picochat engine + server
    python bench/infer.py --reference-dir ~/src/nanochat   # also the reference engine, same shapes

Model: a randomly initialised GPT of depth 4 (width 256, 2 heads of 128), vocab 32,768; prompt
64 tokens, 256 new tokens (stop tokens ignored so every run decodes the full length), top-k 50,
temperature 1. Engine rows: time to first token (prefill + first sample) and decode tokens/s at
batch 1 and 8 (aggregate over the batch), best (and median) of --repeats runs, the engines taking turns run by run. Server rows: N concurrent streaming
clients against `picochat serve`'s app on 127.0.0.1 (--server-workers engines, each batching up to
--server-max-batch requests as `picochat serve` does; --server-max-batch 1 serves one request per
engine at a time); p50/p99 request latency and aggregate tokens/s.
Prints a table, then one JSON line with every number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import picochat  # noqa: F401 - before torch: sets the OpenMP environment torch's runtime reads as it loads

# isort: split
import torch

from picochat.infer import Engine
from picochat.model.gpt import GPTConfig, build_model
from picochat.runtime import pick_device, pick_dtype
from picochat.tokenizer import SPECIAL_TOKENS

VOCAB = 32768
SPECIALS = {name: VOCAB - len(SPECIAL_TOKENS) + i for i, name in enumerate(SPECIAL_TOKENS)}


class StubTokenizer:
    """Just enough tokenizer for the engines: ids only, no text (the benchmark never decodes)."""

    bos_id = SPECIALS["<|bos|>"]
    vocab_size = VOCAB

    def encode_special(self, name: str) -> int:
        return SPECIALS[name if name.startswith("<|") else f"<|{name}|>"]

    def get_bos_token_id(self) -> int:
        return self.bos_id

    def is_special(self, token_id: int) -> bool:
        return token_id >= VOCAB - len(SPECIAL_TOKENS)

    def decode(self, ids) -> str:
        return ""

    def decode_bytes(self, ids) -> bytes:
        return b"x" * len(ids)

    def encode(self, text, prepend=None, append=None):
        return []


def time_one(generate, batch: int, max_tokens: int) -> tuple[float, float]:
    """One run of a generator of token columns: (TTFT ms, decode tokens/s over all rows)."""
    start = time.perf_counter()
    first, steps = None, 0
    for _ in generate():
        steps += 1
        if first is None:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    if steps != max_tokens:
        print(f"  note: {steps} steps instead of {max_tokens}", file=sys.stderr)
    return first * 1000, (steps - 1) * batch / (total - first) if steps > 1 else 0.0


def picochat_generator(device, dtype, args):
    """run(batch) -> a generator of token columns from picochat's engine on the benchmark model."""
    config = GPTConfig.from_depth(4, VOCAB, max_seq_len=2048)
    torch.manual_seed(0)
    engine = Engine(build_model(config, device).eval(), StubTokenizer(), compute_dtype=dtype)
    engine.stop_tokens = set()  # decode the full length
    prompt = list(range(1, args.prompt_tokens + 1))
    return lambda batch: engine.generate(prompt, num_samples=batch, max_tokens=args.new_tokens, temperature=1.0,
                                         top_k=50, seed=0, use_tools=False)


def reference_generator(reference_dir: Path, device, args):
    """The same for the reference engine, imported from a checkout; None (with a note) if unusable."""
    if not (reference_dir / "nanochat" / "engine.py").exists():
        print(f"note: no reference checkout at {reference_dir} (nanochat/engine.py missing); skipping it")
        return None
    sys.path.insert(0, str(reference_dir))
    try:
        from nanochat.engine import Engine as ReferenceEngine
        from nanochat.gpt import GPT as ReferenceGPT
        from nanochat.gpt import GPTConfig as ReferenceConfig
    except Exception as e:  # noqa: BLE001 - any import problem just skips the comparison
        print(f"note: could not import the reference engine from {reference_dir} ({type(e).__name__}: {e}); skipping it")
        return None
    config = ReferenceConfig(sequence_len=2048, vocab_size=VOCAB, n_layer=4, n_head=2, n_kv_head=2, n_embd=256,
                             window_pattern="L")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = ReferenceGPT(config)
    model.to_empty(device=device)
    model.init_weights()
    model.eval()
    engine = ReferenceEngine(model, StubTokenizer())
    prompt = list(range(1, args.prompt_tokens + 1))
    return lambda batch: engine.generate(prompt, num_samples=batch, max_tokens=args.new_tokens, temperature=1.0,
                                         top_k=50, seed=0)


def bench_engines(generators: dict, args) -> dict[str, dict[str, dict]]:
    """Best-of-`repeats` TTFT and decode tok/s per engine and batch size. The engines take turns
    run by run, so a slow spell of the machine (other tenants, clock changes) hits both alike."""
    out: dict[str, dict[str, dict]] = {name: {} for name in generators}
    for batch in (1, 8):
        for run in generators.values():
            time_one(lambda run=run, batch=batch: run(batch), batch, args.new_tokens)  # warm-up
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in generators}
        for _ in range(args.repeats):
            for name, run in generators.items():
                runs[name].append(time_one(lambda run=run, batch=batch: run(batch), batch, args.new_tokens))
        for name, results in runs.items():
            out[name][f"batch{batch}"] = {"ttft_ms": round(min(r[0] for r in results), 2),
                                          "decode_tok_s": round(max(r[1] for r in results), 1),
                                          "decode_tok_s_median": round(statistics.median(r[1] for r in results), 1)}
            print(f"  {name} batch {batch}: {out[name][f'batch{batch}']}", flush=True)
    return out


def bench_server(device, dtype, args) -> dict[str, dict]:
    """p50/p99 latency and aggregate tokens/s for 1, 8, 32 concurrent streaming clients."""
    import httpx
    import uvicorn

    from picochat.serve.app import create_app
    from picochat.serve.pool import serving_pool

    config = GPTConfig.from_depth(4, VOCAB, max_seq_len=2048)
    torch.manual_seed(0)
    model = build_model(config, device).eval()
    engines = [Engine(model, StubTokenizer(), compute_dtype=dtype) for _ in range(args.server_workers)]
    for engine in engines:
        engine.stop_tokens = set()
    app = create_app(serving_pool(engines, args.server_max_batch, max_queue=64), "bench")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    # The stub tokenizer encodes text to nothing: server prompts are just the chat markup tokens.
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": args.server_tokens,
            "temperature": 1.0, "top_k": 50, "stream_options": {"include_usage": True}}

    async def one(http: httpx.AsyncClient) -> tuple[float, int]:
        start = time.perf_counter()
        tokens = 0
        async with http.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"usage": {' in line:
                    tokens = json.loads(line[6:])["usage"]["completion_tokens"]
        return time.perf_counter() - start, tokens

    async def wave(clients: int) -> dict:
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:
            start = time.perf_counter()
            results = await asyncio.gather(*(one(http) for _ in range(clients)))
            wall = time.perf_counter() - start
        latencies = sorted(r[0] for r in results)
        p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
        return {"p50_ms": round(statistics.median(latencies) * 1000, 1), "p99_ms": round(p99 * 1000, 1),
                "tok_s": round(sum(r[1] for r in results) / wall, 1)}

    try:
        asyncio.run(wave(1))  # warm-up
        out = {}
        for n in (1, 8, 32):
            out[f"clients{n}"] = asyncio.run(wave(n))
            print(f"  server {n} clients: {out[f'clients{n}']}", flush=True)
        return out
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        app.state.pool.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-dir", type=Path, default=None, help="a karpathy/nanochat checkout to compare with")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="auto | bf16 | fp32 (picochat engine)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per engine and batch size (best is reported)")
    parser.add_argument("--server-tokens", type=int, default=64, help="tokens per request in the server test")
    parser.add_argument("--server-workers", type=int, default=1, help="engines serving at once (sharing the model)")
    parser.add_argument("--server-max-batch", type=int, default=8,
                        help="requests an engine decodes together (picochat serve --max-batch); 1: one at a time")
    parser.add_argument("--skip-server", action="store_true")
    args = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the table
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    print(f"device {device}, dtype {dtype}, torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}",
          flush=True)
    results: dict = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
                     "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens}
    generators = {"picochat": picochat_generator(device, dtype, args)}
    if args.reference_dir is not None:
        reference = reference_generator(args.reference_dir.expanduser(), device, args)
        if reference is not None:
            generators["reference"] = reference
    else:
        print("note: no --reference-dir given; the reference engine is skipped")
    results.update(bench_engines(generators, args))
    if not args.skip_server:
        results["server"] = bench_server(device, dtype, args)
        results["server_setup"] = {"workers": args.server_workers, "max_batch": args.server_max_batch,
                                   "tokens_per_request": args.server_tokens}

    print(f"\n{'engine':<12}{'batch':>6}{'TTFT ms':>10}{'decode tok/s':>14}{'median':>10}")
    for name in ("picochat", "reference"):
        for batch, row in (results.get(name) or {}).items():
            print(f"{name:<12}{batch.removeprefix('batch'):>6}{row['ttft_ms']:>10}{row['decode_tok_s']:>14}"
                  f"{row['decode_tok_s_median']:>10}")
    if results.get("reference"):
        for batch in ("batch1", "batch8"):
            ratio = results["picochat"][batch]["decode_tok_s"] / max(results["reference"][batch]["decode_tok_s"], 1e-9)
            results.setdefault("speedup", {})[batch] = round(ratio, 2)
        print(f"speedup (decode tok/s, picochat / reference): {results['speedup']}")
    if "server" in results:
        print(f"\nserver: {results['server_setup']}")
        print(f"{'clients':<10}{'p50 ms':>10}{'p99 ms':>10}{'tok/s':>10}")
        for clients, row in results["server"].items():
            print(f"{clients.removeprefix('clients'):<10}{row['p50_ms']:>10}{row['p99_ms']:>10}{row['tok_s']:>10}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
