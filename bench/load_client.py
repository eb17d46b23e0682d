"""The load generator of bench/infer.py's server rows and soak, in a process of its own.

bench/infer.py starts this script with a job on stdin (one JSON object) and reads one JSON line
back. The clients parse every streamed chunk; in the server's process they would take the
interpreter's lock and a core's time from the server they measure, so they run here, beside it,
as a user's clients on another process would.

Jobs:
    {"job": "waves", "port": P, "body": {...}, "waves": [1, 8, 32]}
        one untimed request, then each wave: that many concurrent requests of the same body;
        p50/p99 latency and tok/s
    {"job": "requests", "port": P, "requests": [[route, body], ...], "concurrency": C,
     "server_pid": PID}
        the requests in order, C in flight; the server's resident memory (VmRSS) at the middle and at
        every tenth of the requests
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import httpx


def rss_mb(pid: int | str = "self") -> float | None:
    """A process's resident memory in MB (VmRSS), or None where /proc does not say."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


async def post(http: httpx.AsyncClient, port: int, route: str, body: dict) -> tuple[float, int]:
    """(seconds, completion tokens) of one request, streamed or not; raises on a non-200 answer."""
    url = f"http://127.0.0.1:{port}/v1/{route}"
    start = time.perf_counter()
    tokens = 0
    if not body.get("stream"):
        response = await http.post(url, json=body)
        response.raise_for_status()
        return time.perf_counter() - start, response.json()["usage"]["completion_tokens"]
    async with http.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"usage": {' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    return time.perf_counter() - start, tokens


def latency_stats(results: list[tuple[float, int]], wall: float) -> dict:
    latencies = sorted(r[0] for r in results)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    return {"p50_ms": round(statistics.median(latencies) * 1000, 1), "p99_ms": round(p99 * 1000, 1),
            "tok_s": round(sum(r[1] for r in results) / wall, 1)}


async def waves(port: int, body: dict, sizes: list[int]) -> dict:
    out = {}
    for i, clients in enumerate([1, *sizes]):  # the first is the warm-up
        limits = httpx.Limits(max_connections=clients + 4)
        async with httpx.AsyncClient(timeout=600, limits=limits) as http:
            start = time.perf_counter()
            results = await asyncio.gather(*(post(http, port, "chat/completions", body) for _ in range(clients)))
            if i:
                out[f"clients{clients}"] = latency_stats(results, time.perf_counter() - start)
    return out


async def requests(port: int, plan: list[list], concurrency: int, server_pid: int | None) -> dict:
    queue = list(reversed(plan))
    every = max(1, len(plan) // 10)
    results: list[tuple[float, int]] = []
    errors: list[str] = []
    trace: list[tuple[int, float | None]] = []
    middle = None

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal middle
        while queue:
            route, body = queue.pop()
            try:
                results.append(await post(http, port, route, body))
            except httpx.HTTPError as e:
                errors.append(f"{route}: {type(e).__name__}: {e}")
            done = len(results) + len(errors)
            if server_pid is not None and done == len(plan) // 2:
                middle = rss_mb(server_pid)
            if server_pid is not None and done % every == 0:
                trace.append((done, rss_mb(server_pid)))

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    out = {"ok": len(results), "errors": len(errors), "first_error": (errors or [None])[0],
           "wall_s": round(wall, 1), "rss_middle_mb": middle, "rss_trace": trace}
    if results:
        out.update(latency_stats(results, wall))
    return out


def main() -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    job = json.loads(sys.stdin.read())
    if job["job"] == "waves":
        out = asyncio.run(waves(job["port"], job["body"], job["waves"]))
    elif job["job"] == "requests":
        out = asyncio.run(requests(job["port"], job["requests"], job["concurrency"], job.get("server_pid")))
    else:
        print(f"load_client.py: unknown job {job['job']!r} (waves or requests)", file=sys.stderr)
        return 2
    out["client_pid"] = os.getpid()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
