#!/usr/bin/env python
"""Load-test an OpenAI-compatible server: Poisson arrivals of streaming chat requests.

Against gptchat (`gptchat serve`, started here on a free loopback port, or an already running one with
--url) and, when `llama_cpp` is importable, against llama-cpp-python's server on the same GGUF (also
started here). Every request is a streaming /v1/chat/completions call, greedy, with a prompt drawn
from a fixed list and max_tokens = --max-tokens; arrivals are a Poisson process of rate --rate.

Reported per server (Markdown table on stdout, progress on stderr):

    requests/s          requests completed / wall time from the first arrival to the last reply
    output tokens/s     completion tokens (usage of the last chunk, else content chunks) / the same time
    TTFT p50 / p95      request sent -> first content chunk
    TPOT p50 / p95      time per output token after the first: (last - first chunk) / (tokens - 1)

    python bench/bench_serve.py                                # 32 requests at 2/s against both servers
    python bench/bench_serve.py --requests 8 --rate 4 --max-tokens 16 --only gptchat
    python bench/bench_serve.py --url http://127.0.0.1:8000 --api-key K   # a server already running
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a neural network is in two sentences.",
    "Give me three tips for learning a new language.",
    "What is 12 times 13?",
    "Tell me a short story about a robot who learns to paint.",
    "Summarize the plot of Romeo and Juliet.",
    "What are the primary colors?",
]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], url: str, timeout: float = 300) -> subprocess.Popen:
    log("starting: " + " ".join(cmd))
    # stderr to a file, not a pipe: llama.cpp logs a lot while loading, and an unread pipe that fills up
    # blocks the server before it ever answers
    errors = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errors, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            errors.seek(0)
            raise SystemExit(f"bench_serve: error: the server exited: {errors.read()[-2000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code < 500:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"bench_serve: error: the server did not start within {timeout:.0f} s")


async def one_request(client: httpx.AsyncClient, model: str | None, prompt: str, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    sent = time.perf_counter()
    try:
        return await _stream_reply(client, body, sent)
    except httpx.HTTPError as e:  # a stream the server closed midway counts as a failed request
        return {"error": f"{type(e).__name__}: {e}"}


async def _stream_reply(client: httpx.AsyncClient, body: dict, sent: float) -> dict:
    first = last = None
    chunks, usage = 0, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return {"error": event["error"].get("message")}
            usage = event.get("usage") or usage
            if any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                last = time.perf_counter()
                first = first or last
                chunks += 1
    tokens = usage["completion_tokens"] if usage else chunks
    return {"sent": sent, "first": first or time.perf_counter(), "last": last or time.perf_counter(),
            "tokens": tokens}


async def run_load(url: str, model: str | None, api_key: str | None, n: int, rate: float, max_tokens: int,
                   seed: int) -> dict:
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        await one_request(client, model, "Hello", 4)  # warm-up, not counted
        tasks = []
        start = time.perf_counter()
        for i in range(n):
            tasks.append(asyncio.create_task(one_request(client, model, rng.choice(PROMPTS), max_tokens)))
            await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    for r in results:
        if "error" in r:
            log(f"request failed: {r['error']}")
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["first"] - r["sent"] for r in ok]
    tpot = [(r["last"] - r["first"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    return {"requests": len(ok), "failed": len(results) - len(ok), "wall_s": wall, "rps": len(ok) / wall,
            "out_tps": tokens / wall, "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95),
            "tpot_p50": pct(tpot, 50), "tpot_p95": pct(tpot, 95)}


def pct(values: list[float], p: int) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def measure_server(name: str, cmd: list[str], url: str, load: dict) -> dict:
    """Start a server, put the load on it, stop it; its figures."""
    proc = start_server(cmd, url)
    try:
        log(f"{name}: {load['n']} requests at {load['rate']}/s")
        return asyncio.run(run_load(url, None, None, **load))
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server's base URL (without /v1); default: start gptchat serve")
    p.add_argument("--api-key", default=os.environ.get("GPTCHAT_API_KEY"), help="for --url")
    p.add_argument("--model", help="GGUF for both servers (default: the default model)")
    p.add_argument("--quant", default="auto", choices=("auto", "none", "int8", "int4"), help="gptchat's weights")
    p.add_argument("--max-concurrency", type=int, default=8, help="gptchat's running batch (default 8)")
    p.add_argument("--requests", type=int, default=32, help="requests per server (default 32)")
    p.add_argument("--rate", type=float, default=2.0, help="Poisson arrival rate, requests/s (default 2)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (default 64)")
    p.add_argument("--threads", type=int, help="torch / llama.cpp threads (default: all cores)")
    p.add_argument("--only", choices=("gptchat", "llama.cpp"), help="one server only")
    p.add_argument("--seed", type=int, default=0, help="arrival times and prompt choice")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args()

    from gptchat import default_model_path

    gguf = args.model or default_model_path()
    env_threads = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    figures = {}
    load = dict(n=args.requests, rate=args.rate, max_tokens=args.max_tokens, seed=args.seed)

    if args.only in (None, "gptchat"):
        if args.url:
            figures["gptchat"] = asyncio.run(run_load(args.url.rstrip("/"), None, args.api_key, **load))
        else:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = [sys.executable, "-m", "gptchat.cli", "serve", "--model", gguf, "--quant", args.quant, "--port",
                   str(port), "--max-concurrency", str(args.max_concurrency), "--log-level", "warning"]
            os.environ.update(env_threads)
            figures["gptchat"] = measure_server("gptchat", cmd, url, load)

    if args.only in (None, "llama.cpp"):
        if importlib.util.find_spec("llama_cpp") is None:
            log("llama.cpp: skipped (llama_cpp is not importable: pip install 'llama-cpp-python[server]')")
        else:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port),
                   "--n_ctx", "2048",
                   # its default cancels the running stream whenever a new request arrives; queue them instead
                   "--interrupt_requests", "False"] + (["--n_threads", str(args.threads)] if args.threads else [])
            figures["llama.cpp"] = measure_server("llama.cpp", cmd, url, load)

    print(f"\n{args.requests} streaming chat requests, Poisson arrivals at {args.rate}/s, max_tokens "
          f"{args.max_tokens}, greedy\n")
    print("| server | requests/s | output tok/s | TTFT p50 (s) | TTFT p95 (s) | TPOT p50 (ms) | TPOT p95 (ms) | failed |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, f in figures.items():
        print(f"| {name} | {f['rps']:.2f} | {f['out_tps']:.1f} | {f['ttft_p50']:.2f} | {f['ttft_p95']:.2f} | "
              f"{1000 * f['tpot_p50']:.0f} | {1000 * f['tpot_p95']:.0f} | {f['failed']} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
