"""Inference benchmark: engine decode speed per compute dtype, the server under load, and a soak.

    python bench/infer.py                                        # picochat engine, server and soak
    python bench/infer.py --reference-dir ~/src/nanochat         # also the reference engine, same shapes
    python bench/infer.py --dtypes fp32 --skip-server --soak 0   # engine rows in fp32 only
    python bench/infer.py --skip-engines --skip-server --soak 1500   # the soak alone

Model: a randomly initialised GPT of --depth 4 (width 256, 2 heads of 128), vocab 32,768; prompt
64 tokens, 256 new tokens (stop tokens ignored by picochat so every run decodes the full length),
top-k 50, temperature 1. --arch picks picochat's architecture: classic (default; the reference's,
so the two run side by side), cpu (the cpu preset's: value embeddings, smear, backout, sliding
windows) or 2026 (the 2026 recipe's); the reference has only the classic one, so its rows are
skipped for the others.

Engine rows: time to first token (prefill + first sample) and decode tokens/s at batch 1 and 8
(aggregate over the batch) for every (system, dtype): fp32 always, bf16 too on CUDA and on CPUs with
AMX/AVX512-BF16 (--dtypes chooses). Each (system, dtype) runs in its own worker process, because
the reference fixes its compute dtype when it is imported (NANOCHAT_DTYPE); picochat's model is
cast to the dtype once, as `picochat serve` loads it. The workers take turns run by run (a warm-up,
then --repeats rounds), so a slow spell of the machine hits all alike; each row keeps its best and
median run. Each system's best row is the dtype it runs fastest in, and the speedup is picochat's
best over the reference's best, at batch 1 and at batch 8.

Server rows (per dtype, in a fresh process): N concurrent streaming clients against `picochat
serve`'s app on 127.0.0.1 (--server-workers engines, each batching up to --server-max-batch requests
as `picochat serve` does); p50/p99 request latency and aggregate tokens/s. The clients run in a
process of their own (bench/load_client.py), so their parsing does not hold the server's
interpreter lock.

Soak (per dtype, in a fresh process, --soak N requests, 0 skips): N mixed requests against that
process's server, --soak-concurrency at a time: chat and raw-token completions, random prompt
length and max_tokens, n from 1 to 4, half of them streamed. The process's resident memory (VmRSS)
is read when the server is up, after a warm-up, and at the middle and the end of the soak: flat
memory under load shows as middle ~ end.

Prints the machine, the tables, then one JSON line with every number, also written to --out
(default $PICOCHAT_HOME/bench/infer-<time>.json).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import picochat  # noqa: F401 - before torch: sets the OpenMP environment torch's runtime reads as it loads

# isort: split
import torch
from machine import DTYPE_NAMES, describe_machine, format_machine
from results import default_out, write_results

from picochat.errors import UserError
from picochat.infer import Engine
from picochat.model.gpt import GPTConfig, build_model
from picochat.runtime import cpu_supports_fast_bf16, pick_device
from picochat.tokenizer import SPECIAL_TOKENS

# The server rows and the soak need `picochat serve`'s packages (fastapi, uvicorn) and the load
# client's (httpx); a bare GPU image may lack them, and the engine rows do not need them.
try:
    import uvicorn
    from load_client import rss_mb

    from picochat.infer.chat_defaults import CHAT_SAMPLING
    from picochat.serve.app import create_app
    from picochat.serve.pool import serving_pool
    from picochat.serve.requests import Defaults
except ImportError as e:
    SERVING_MISSING: str | None = str(e)
else:
    SERVING_MISSING = None

VOCAB = 32768
SPECIALS = {name: VOCAB - len(SPECIAL_TOKENS) + i for i, name in enumerate(SPECIAL_TOKENS)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
REFERENCE_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # NANOCHAT_DTYPE values
RESULT_PREFIX = "BENCH_RESULT "
BATCHES = (1, 8)


class StubTokenizer:
    """Just enough tokenizer for the engines and the server: text is one token per byte (so a
    prompt's length is its length in bytes), and output decodes to nothing (never looked at)."""

    bos_id = SPECIALS["<|bos|>"]
    vocab_size = VOCAB

    def encode_special(self, name: str) -> int:
        return SPECIALS[name if name.startswith("<|") else f"<|{name}|>"]

    def get_bos_token_id(self) -> int:
        return self.bos_id

    def is_special(self, token_id: int) -> bool:
        return token_id >= VOCAB - len(SPECIAL_TOKENS)

    def id_to_text(self, token_id: int) -> str:
        return ""

    def decode(self, ids) -> str:
        return ""

    def decode_bytes(self, ids) -> bytes:
        return b"x" * len(ids)

    def encode(self, text, prepend=None, append=None):
        ids = list(text.encode())
        return ([] if prepend is None else [prepend]) + ids + ([] if append is None else [append])


# ---- worker side: one (system, dtype) per process -------------------------------------------------

def arch_options(arch: str) -> dict:
    """GPTConfig's architecture fields for --arch as base-train resolves them: none (classic), the cpu
    preset's, or the 2026 recipe's."""
    if arch == "classic":
        return {}
    # Only here: the training modules would add ~30 MB to every worker's resident memory (the soak's figure).
    from picochat.config import architecture_options
    from picochat.train.base_train import BaseTrainConfig

    given = {"preset": "cpu"} if arch == "cpu" else {"recipe": "2026"}
    return architecture_options(BaseTrainConfig.defaults(**given))


def picochat_engine(device: torch.device, dtype: torch.dtype, args) -> Engine:
    """picochat's engine on the benchmark model, its weights cast once to `dtype` as the server does."""
    config = GPTConfig.from_depth(args.depth, VOCAB, max_seq_len=2048, **arch_options(args.arch))
    torch.manual_seed(0)
    model = build_model(config, device).eval()
    model.cast_weights_(dtype)
    engine = Engine(model, StubTokenizer(), compute_dtype=dtype)
    engine.stop_tokens = set()  # decode the full length
    return engine


def reference_engine(device: torch.device, args):
    """(engine, its compute dtype) of the reference, imported from --reference-dir; its dtype is
    whatever NANOCHAT_DTYPE said when it was imported (the parent sets it per worker)."""
    sys.path.insert(0, str(args.reference_dir.expanduser()))
    from nanochat import common
    from nanochat.engine import Engine as ReferenceEngine
    from nanochat.gpt import GPT as ReferenceGPT
    from nanochat.gpt import GPTConfig as ReferenceConfig

    shape = GPTConfig.from_depth(args.depth, VOCAB, max_seq_len=2048)
    config = ReferenceConfig(sequence_len=2048, vocab_size=VOCAB, n_layer=shape.n_layer, n_head=shape.n_head,
                             n_kv_head=shape.n_kv_head, n_embd=shape.n_embd, window_pattern="L")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = ReferenceGPT(config)
    model.to_empty(device=device)
    model.init_weights()
    model.eval()
    return ReferenceEngine(model, StubTokenizer()), DTYPE_NAMES.get(common.COMPUTE_DTYPE, str(common.COMPUTE_DTYPE))


def time_one(generate, batch: int, max_tokens: int) -> tuple[float, float]:
    """One run of a generator of token columns: (TTFT ms, decode tokens/s over all rows): the
    columns after the first over the time from the first to the last (work a generator does
    after its last column, such as the reference's forward pass for a step it never takes, is
    not decoding)."""
    start = time.perf_counter()
    first = last = None
    steps = 0
    for _ in generate():
        last = time.perf_counter() - start
        steps += 1
        if first is None:
            first = last
    if steps != max_tokens:
        print(f"  note: {steps} steps instead of {max_tokens}", file=sys.stderr)
    return first * 1000, (steps - 1) * batch / (last - first) if steps > 1 else 0.0


def engine_worker(system: str, dtype_name: str, device: torch.device, args) -> None:
    """Build one engine, say READY, then time one run per {"batch": B} line on stdin until EOF."""
    prompt = list(range(1, args.prompt_tokens + 1))
    try:
        if system == "picochat":
            engine = picochat_engine(device, DTYPES[dtype_name], args)
            info = {"compute_dtype": dtype_name, "weights_dtype": DTYPE_NAMES[engine.model.weights_dtype()]}
            extra = {"use_tools": False}
        else:
            engine, compute = reference_engine(device, args)
            info, extra = {"compute_dtype": compute}, {}
    except Exception as e:  # noqa: BLE001 - any build or import problem becomes this worker's error
        info = {"error": f"{type(e).__name__}: {e}"}
    print(RESULT_PREFIX + json.dumps(info), flush=True)
    if "error" in info:
        return
    for line in sys.stdin:
        batch = json.loads(line)["batch"]
        run = functools.partial(engine.generate, prompt, num_samples=batch, max_tokens=args.new_tokens,
                                temperature=1.0, top_k=50, seed=0, **extra)
        ttft_ms, tok_s = time_one(run, batch, args.new_tokens)
        print(RESULT_PREFIX + json.dumps({"ttft_ms": ttft_ms, "decode_tok_s": tok_s}), flush=True)


@contextlib.contextmanager
def serving(device: torch.device, dtype: torch.dtype, args):
    """`picochat serve`'s app on the benchmark model, on a free port of 127.0.0.1; yields the port."""
    engines = [picochat_engine(device, dtype, args)]  # cast once; CPU workers share the one model
    engines += [Engine(engines[0].model, engines[0].tokenizer, compute_dtype=dtype)
                for _ in range(args.server_workers - 1)]
    for engine in engines:
        engine.stop_tokens = set()
    s = CHAT_SAMPLING  # the defaults `picochat serve` gives requests, the repetition penalty included
    app = create_app(serving_pool(engines, args.server_max_batch, max_queue=64), "bench",
                     defaults=Defaults(s.temperature, s.top_k, s.max_tokens, s.repetition_penalty))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        app.state.pool.shutdown()


def run_clients(job: dict) -> dict:
    """bench/load_client.py's answer to `job`, the clients in a process of their own (see there)."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().with_name("load_client.py"))],
                          input=json.dumps(job), stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"load_client.py exited with status {proc.returncode} (its stderr is above)")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def server_worker(device: torch.device, dtype: torch.dtype, args) -> dict:
    """p50/p99 latency and aggregate tokens/s for 1, 8, 32 concurrent streaming clients."""
    # The prompt is the chat markup around the 2-byte message.
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": args.server_tokens,
            "temperature": 1.0, "top_k": 50, "stream_options": {"include_usage": True}}
    with serving(device, dtype, args) as port:
        out = run_clients({"job": "waves", "port": port, "body": body, "waves": [1, 8, 32]})
    for n in (1, 8, 32):
        print(f"  server {DTYPE_NAMES[dtype]} {n} clients: {out[f'clients{n}']}", file=sys.stderr, flush=True)
    return {**out, "server_pid": os.getpid()}


def soak_plan(count: int, seed: int, max_prompt: int, max_tokens: int) -> list[tuple[str, dict]]:
    """`count` mixed requests (route, body): chat or raw-token completions, random prompt length in
    [1, max_prompt] and max_tokens in [1, max_tokens], n in [1, 4], streamed or not; reproducible."""
    rng = random.Random(seed)
    plan = []
    for i in range(count):
        length = rng.randint(1, max_prompt)
        body: dict = {"max_tokens": rng.randint(1, max_tokens), "n": rng.randint(1, 4), "temperature": 1.0,
                      "top_k": 50, "seed": i, "stream": rng.random() < 0.5}
        if body["stream"]:
            body["stream_options"] = {"include_usage": True}
        if rng.random() < 0.5:
            plan.append(("chat/completions", {**body, "messages": [{"role": "user", "content": "x" * length}]}))
        else:
            plan.append(("completions", {**body, "prompt": [rng.randrange(1, 256) for _ in range(length)]}))
    return plan


def soak_worker(device: torch.device, dtype: torch.dtype, args) -> dict:
    """Run the soak against this process's server; RSS at load, start, middle and end, and throughput."""
    plan = soak_plan(args.soak, args.seed, args.soak_max_prompt, args.soak_max_tokens)
    warmup = soak_plan(args.soak_concurrency, args.seed + 1, args.soak_max_prompt, args.soak_max_tokens)
    rss: dict[str, float | None] = {}
    with serving(device, dtype, args) as port:
        rss["loaded"] = rss_mb()
        job = {"job": "requests", "port": port, "concurrency": args.soak_concurrency}
        warm = run_clients({**job, "requests": warmup})
        rss["start"] = rss_mb()
        soak = run_clients({**job, "requests": plan, "server_pid": os.getpid()})
        rss["middle"] = soak.pop("rss_middle_mb")
        rss["end"] = rss_mb()
    out = {"requests": len(plan), **soak, "warmup_errors": warm["errors"],
           "first_error": soak["first_error"] or warm["first_error"], "concurrency": args.soak_concurrency,
           "rss_mb": rss, "server_pid": os.getpid(),
           "choices": sum(body["n"] for _, body in plan), "streamed": sum(body["stream"] for _, body in plan)}
    print(f"  soak {DTYPE_NAMES[dtype]}: {soak['ok']} of {len(plan)} requests answered, RSS MB {rss}",
          file=sys.stderr, flush=True)
    return out


def worker_main(spec: str, args) -> None:
    """--worker SYSTEM:DTYPE: an engine worker (picochat, reference) or a one-shot server/soak run."""
    kind, _, dtype_name = spec.partition(":")
    device = pick_device(args.device)
    if kind in ("picochat", "reference"):
        engine_worker(kind, dtype_name, device, args)
        return
    run = {"server": server_worker, "soak": soak_worker}[kind]
    print(RESULT_PREFIX + json.dumps(run(device, DTYPES[dtype_name], args)), flush=True)


# ---- driver side ---------------------------------------------------------------------------------

def worker_env(system: str, dtype_name: str, args) -> dict:
    """A worker's environment: the threads asked for, and the reference's dtype switch."""
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    if system == "reference":
        env["NANOCHAT_DTYPE"] = REFERENCE_DTYPES[dtype_name]
    return env


def worker_command(spec: str) -> list[str]:
    """This script in worker mode, with the flags it was started with (the worker reads the same)."""
    return [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--worker", spec]


class EngineWorker:
    """One (system, dtype) engine in its own process, timed one run at a time over a pipe."""

    def __init__(self, system: str, dtype_name: str, args) -> None:
        self.system, self.dtype, self.name = system, dtype_name, f"{system}:{dtype_name}"
        self.proc = subprocess.Popen(worker_command(self.name), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=worker_env(system, dtype_name, args))

    def read(self) -> dict:
        """The worker's next result line (other output is skipped), or an error once it has exited."""
        for line in self.proc.stdout:
            if line.startswith(RESULT_PREFIX):
                return json.loads(line[len(RESULT_PREFIX):])
        return {"error": f"worker {self.name} exited with status {self.proc.wait()} (its stderr is above)"}

    def run(self, batch: int) -> dict:
        try:
            self.proc.stdin.write(json.dumps({"batch": batch}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return {"error": f"worker {self.name} exited with status {self.proc.wait()}"}
        return self.read()

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def bench_engines(workers: list[EngineWorker], args, on_batch=None) -> tuple[dict, dict]:
    """({system: {dtype: {batchB: row}}}, {worker: error}). Per batch size: one warm-up run per
    worker, then --repeats rounds in which the workers take turns; a row keeps the best TTFT and
    decode tok/s of its runs, and the median decode tok/s. `on_batch(engines)` gets the rows so far
    after each batch size (to save them as they come)."""
    engines: dict[str, dict[str, dict]] = {}
    failed: dict[str, str] = {}
    for batch in BATCHES:
        runs: dict[str, list[dict]] = {w.name: [] for w in workers}
        for round_index in range(args.repeats + 1):  # round 0 is the warm-up
            for worker in workers:
                if worker.name in failed:
                    continue
                result = worker.run(batch)
                if "error" in result:
                    failed[worker.name] = result["error"]
                elif round_index > 0:
                    runs[worker.name].append(result)
        for worker in workers:
            done = runs[worker.name]
            if worker.name in failed or not done:
                continue
            row = {"ttft_ms": round(min(r["ttft_ms"] for r in done), 2),
                   "decode_tok_s": round(max(r["decode_tok_s"] for r in done), 1),
                   "decode_tok_s_median": round(statistics.median(r["decode_tok_s"] for r in done), 1),
                   "runs": len(done)}
            engines.setdefault(worker.system, {}).setdefault(worker.dtype, {})[f"batch{batch}"] = row
            print(f"  {worker.name} batch {batch}: {row}", flush=True)
        if on_batch is not None:
            on_batch(engines)
    return engines, failed


def best_rows(engines: dict) -> dict:
    """{system: {batchB: row of its fastest dtype at that batch, with "dtype"}}."""
    best: dict[str, dict] = {}
    for system, by_dtype in engines.items():
        for batch in (f"batch{b}" for b in BATCHES):
            timed = [(rows[batch]["decode_tok_s"], dtype) for dtype, rows in by_dtype.items() if batch in rows]
            if timed:
                _, dtype = max(timed)
                best.setdefault(system, {})[batch] = {"dtype": dtype, **by_dtype[dtype][batch]}
    return best


def best_speedups(best: dict) -> dict | None:
    """picochat's best decode tok/s over the reference's best, per batch; None without both."""
    if "picochat" not in best or "reference" not in best:
        return None
    return {batch: round(row["decode_tok_s"] / max(best["reference"][batch]["decode_tok_s"], 1e-9), 2)
            for batch, row in best["picochat"].items() if batch in best["reference"]}


def run_once(kind: str, dtype_name: str, args) -> dict:
    """A server or soak run for one dtype in a fresh process (so memory figures are its own)."""
    spec = f"{kind}:{dtype_name}"
    proc = subprocess.run(worker_command(spec), stdout=subprocess.PIPE, text=True, check=False,
                          env=worker_env(kind, dtype_name, args))
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return {"error": f"{spec} exited with status {proc.returncode} (its stderr is above)"}


def engine_systems(args, notes: list[str]) -> list[str]:
    """The engines to time: picochat, and the reference where --reference-dir holds a checkout
    (else a note says why not); none with --skip-engines."""
    if args.skip_engines:
        return []
    if args.reference_dir is None:
        notes.append("no --reference-dir given; the reference engine is skipped")
        return ["picochat"]
    if args.arch != "classic":
        notes.append(f"--arch {args.arch}: the reference has the classic architecture only; its engine is skipped")
        return ["picochat"]
    if not (args.reference_dir.expanduser() / "nanochat" / "engine.py").exists():
        notes.append(f"no reference checkout at {args.reference_dir} (nanochat/engine.py missing); skipped")
        return ["picochat"]
    return ["picochat", "reference"]


def default_dtypes(device: torch.device) -> list[str]:
    """fp32 always; bf16 too where it has fast matmuls (CUDA sm80+, CPUs with AMX/AVX512-BF16)."""
    fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_supports_fast_bf16()
    return ["fp32", "bf16"] if fast else ["fp32"]


def print_engines(results: dict) -> None:
    if not results["engines"]:
        return
    print(f"\n{'engine':<12}{'dtype':>6}{'batch':>6}{'TTFT ms':>10}{'decode tok/s':>14}{'median':>10}")
    for system, by_dtype in results["engines"].items():
        for dtype, rows in by_dtype.items():
            for batch, row in rows.items():
                print(f"{system:<12}{dtype:>6}{batch.removeprefix('batch'):>6}{row['ttft_ms']:>10}"
                      f"{row['decode_tok_s']:>14}{row['decode_tok_s_median']:>10}")
    for system, rows in results["best"].items():
        print(f"{system} best: " + ", ".join(f"batch {b.removeprefix('batch')} {r['decode_tok_s']} tok/s in {r['dtype']}"
                                           for b, r in rows.items()))
    if results["speedup"]:
        print("speedup (decode tok/s, picochat best / reference best): "
              + ", ".join(f"batch {b.removeprefix('batch')} {x}x" for b, x in results["speedup"].items()))


def print_serving(results: dict) -> None:
    for dtype, waves in results.get("server", {}).items():
        print(f"\nserver, {dtype}: {results['server_setup']}")
        if "error" in waves:
            print(f"  error: {waves['error']}")
            continue
        print(f"{'clients':<10}{'p50 ms':>10}{'p99 ms':>10}{'tok/s':>10}")
        for clients, row in waves.items():
            if not clients.startswith("clients"):  # the processes' ids
                continue
            print(f"{clients.removeprefix('clients'):<10}{row['p50_ms']:>10}{row['p99_ms']:>10}{row['tok_s']:>10}")
    if results.get("soak"):
        print(f"\nsoak ({results['soak_setup']})")
        print(f"{'dtype':<6}{'requests':>9}{'errors':>7}{'RSS MB: loaded':>15}{'start':>8}{'middle':>8}{'end':>8}"
              f"{'p50 ms':>9}{'p99 ms':>9}{'tok/s':>8}")
        for dtype, soak in results["soak"].items():
            if "rss_mb" not in soak:
                print(f"{dtype:<6} error: {soak.get('error')}")
                continue
            rss = soak["rss_mb"]
            print(f"{dtype:<6}{soak['requests']:>9}{soak['errors']:>7}{rss['loaded']!s:>15}{rss['start']!s:>8}"
                  f"{rss.get('middle')!s:>8}{rss['end']!s:>8}{soak.get('p50_ms', '-')!s:>9}"
                  f"{soak.get('p99_ms', '-')!s:>9}{soak.get('tok_s', '-')!s:>8}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-dir", type=Path, default=None, help="a karpathy/nanochat checkout to compare with")
    parser.add_argument("--device", default=None, help="auto (default) | cpu | cuda | cuda:N | mps")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None,
                        help="compute dtypes to time (default: fp32, and bf16 on CUDA and on CPUs with fast bf16)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--depth", type=int, default=4, help="model depth (width depth*64, 128-wide heads)")
    parser.add_argument("--arch", choices=("classic", "cpu", "2026"), default="classic",
                        help="picochat's architecture: classic (the reference's), cpu (the cpu preset's) or 2026")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per engine and batch size (best is reported)")
    parser.add_argument("--server-tokens", type=int, default=64, help="tokens per request in the server test")
    parser.add_argument("--server-workers", type=int, default=1, help="engines serving at once (sharing the model)")
    parser.add_argument("--server-max-batch", type=int, default=8,
                        help="requests an engine decodes together (picochat serve --max-batch); 1: one at a time")
    parser.add_argument("--skip-engines", action="store_true", help="no engine rows (server and soak only)")
    parser.add_argument("--skip-server", action="store_true", help="no server rows")
    parser.add_argument("--soak", type=int, default=300, help="mixed requests in the soak, per dtype (0: no soak)")
    parser.add_argument("--soak-concurrency", type=int, default=8, help="soak requests in flight at once")
    parser.add_argument("--soak-max-prompt", type=int, default=512, help="longest soak prompt, in tokens")
    parser.add_argument("--soak-max-tokens", type=int, default=64, help="largest max_tokens of a soak request")
    parser.add_argument("--seed", type=int, default=0, help="seed of the soak's request mix")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results file (default: $PICOCHAT_HOME/bench/infer-<time>.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for flag in ("depth", "prompt_tokens", "new_tokens", "repeats", "server_tokens", "server_workers",
                 "server_max_batch", "soak_concurrency", "soak_max_prompt", "soak_max_tokens"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1 (leave it out for torch's default)")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2: decode tok/s is timed from the first new token to the last")
    if args.soak < 0:
        parser.error("--soak must be 0 (no soak) or a number of requests")
    if args.soak_max_prompt + args.soak_max_tokens + 16 > 2048:
        parser.error("--soak-max-prompt + --soak-max-tokens must leave room in the 2048-token context")
    if SERVING_MISSING and (not args.skip_server or args.soak):
        parser.error(f"the server rows and the soak need fastapi, uvicorn and httpx ({SERVING_MISSING}); "
                     "give --skip-server --soak 0 for the engine rows alone")
    return args


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker_main(args.worker, args)
        return 0
    try:
        device = pick_device(args.device)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    machine = describe_machine(device)
    print(format_machine(machine), flush=True)
    dtypes = args.dtypes or default_dtypes(device)
    notes = []
    if "bf16" in dtypes and device.type == "cpu" and not cpu_supports_fast_bf16():
        notes.append("bf16 on a CPU without AMX/AVX512-BF16: its matmuls fall back to slow code")
    results: dict = {"machine": machine, "dtypes": dtypes, "depth": args.depth, "arch": args.arch,
                     "arch_options": arch_options(args.arch), "prompt_tokens": args.prompt_tokens,
                     "new_tokens": args.new_tokens, "repeats": args.repeats, "notes": notes}

    out = args.out or default_out("infer")
    workers = [EngineWorker(system, dtype, args) for system in engine_systems(args, notes) for dtype in dtypes]
    try:
        ready = {w.name: w.read() for w in workers}  # each builds its engine, then says so
        for name, info in ready.items():
            if "error" in info:
                notes.append(f"{name} could not start: {info['error']}")
            elif info["compute_dtype"] != name.partition(":")[2]:
                notes.append(f"{name} computes in {info['compute_dtype']}, not in the dtype asked for")
        live = [w for w in workers if "error" not in ready[w.name]]
        # The rows of each batch size as it finishes, kept if a time limit stops the run.
        results["engines"], failed = bench_engines(live, args, on_batch=lambda engines: write_results(
            out, {**results, "workers": ready, "engines": engines, "partial": True}, announce=False))
    finally:
        for worker in workers:
            worker.close()
    notes += [f"{name} failed: {error}" for name, error in failed.items()]
    results["workers"] = ready
    results["best"] = best_rows(results["engines"])
    results["speedup"] = best_speedups(results["best"])
    write_results(out, {**results, "partial": True}, announce=False)  # kept if a time limit stops the server rows

    if not args.skip_server:
        results["server_setup"] = {"workers": args.server_workers, "max_batch": args.server_max_batch,
                                   "tokens_per_request": args.server_tokens}
        results["server"] = {dtype: run_once("server", dtype, args) for dtype in dtypes}
        write_results(out, {**results, "partial": True}, announce=False)
    if args.soak:
        results["soak_setup"] = {"requests": args.soak, "concurrency": args.soak_concurrency,
                                 "max_prompt": args.soak_max_prompt, "max_tokens": args.soak_max_tokens,
                                 "n": "1-4", "seed": args.seed, "max_batch": args.server_max_batch}
        results["soak"] = {dtype: run_once("soak", dtype, args) for dtype in dtypes}
    results["load_avg_end"] = round(os.getloadavg()[0], 2)

    print_engines(results)
    print_serving(results)
    for note in notes:
        print(f"note: {note}")
    print(json.dumps(results))
    return 0 if write_results(out, results) else 1


if __name__ == "__main__":
    sys.exit(main())
