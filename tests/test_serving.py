"""The serving core: continuous batching, logprobs, /metrics, limits, CORS and a clean SIGTERM.

Real servers on loopback ports, the real `openai` client and httpx. A tiny random Llama with a long
context (2048) keeps most of it fast; where a reply must last long enough to be interrupted or to fill
the queue, a copy of it is slowed to a real model's pace (2 ms per forward, a hook). The 16-request
concurrency test also runs on the real default model (slow). ~60 s without the slow test.
"""

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

import gptchat  # noqa: E402
from gptchat import SamplingParams  # noqa: E402
from gptchat.chat import prompt_ids as chat_prompt_ids  # noqa: E402
from gptchat.engine import DecodeBatch, Engine  # noqa: E402
from gptchat.server import create_app  # noqa: E402
from gptchat.server.scheduler import Scheduler  # noqa: E402
from test_server import KEY, USER, error_of, free_port, serving, wait_until_serving  # noqa: E402

LONG = 1500  # a reply that runs for seconds on the slowed tiny model: time to disconnect or to queue


@pytest.fixture(scope="module")
def long_lm(long_llama_dir):
    return gptchat.load_model(long_llama_dir, quant="none")


@pytest.fixture(scope="module")
def slow_lm(long_llama_dir):
    """The same tiny model at about a real model's pace, so that a long reply lasts seconds."""
    lm = gptchat.load_model(long_llama_dir, quant="none")
    lm.model.register_forward_pre_hook(lambda module, args: time.sleep(0.002))
    return lm


def no_eos(lm) -> dict:
    return {str(i): -100 for i in lm.tokenizer.eos_ids}


def prompts_of(n: int) -> list[list[dict]]:
    """n different conversations of different lengths."""
    return [[{"role": "user", "content": "Tell me something about the number " + " and ".join(map(str, range(i + 1)))}]
            for i in range(n)]


def metric(url: str, name: str, headers=None) -> float:
    text = httpx.get(url + "/metrics", headers=headers or {}).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


# -- DecodeBatch and Scheduler, without HTTP --------------------------------------------------------


def test_rows_joining_and_leaving_mid_batch_decode_as_alone(long_lm):
    """Rows join a running batch with prompts shorter and longer than its width, and leave early: each
    row's greedy tokens equal its tokens decoded alone. (~2 s)"""
    engine = Engine(long_lm)
    prompts = [list(range(5, 5 + n)) for n in (7, 30, 3, 12)]
    budgets = [25, 10, 30, 5]
    params = [SamplingParams(temperature=0, max_new_tokens=b, logit_bias={i: -100 for i in long_lm.tokenizer.eos_ids})
              for b in budgets]
    alone = [engine.generate(p, q).token_ids for p, q in zip(prompts, params)]
    batch = DecodeBatch(engine.model)
    outs = [engine.start(p, q) for p, q in zip(prompts, params)]
    join_at = {0: 0, 1: 3, 2: 4, 3: 9}  # step at which each row joins
    with torch.inference_mode():
        for step in range(40):
            for i in [i for i, s in join_at.items() if s == step]:
                cache = long_lm.model.new_cache(1, len(prompts[i]))  # as the server makes it
                delta = outs[i].step(engine.prefill_chunk(cache, prompts[i]))
                batch.join(cache, torch.ones(1, len(prompts[i]), dtype=torch.bool), [outs[i]], [delta])
            if batch:
                batch.step()
            if batch:  # columns only padding uses are dropped as rows leave: the width is the longest row's
                assert batch.cache.length == max(o.prompt_len + len(o.tokens) - 1 for o in batch.outs)
    assert [o.result().token_ids for o in outs] == alone
    assert not batch


def test_scheduler_requests_join_and_leave(long_lm):
    """Through the Scheduler itself: requests that arrive while others run get their solo results. (~3 s)"""
    engine = Engine(long_lm)
    scheduler = Scheduler(engine, max_concurrency=4)
    bias = {i: -100 for i in long_lm.tokenizer.eos_ids}
    # the last prompt (1100 tokens) is prefilled in three chunks, between decode steps of the others
    jobs = [(list(range(5, 25)), 60), (list(range(40, 44)), 15), (list(range(7, 60)), 30),
            ((list(range(5, 380)) * 3)[:1100], 20)]
    alone = [engine.generate(p, SamplingParams(temperature=0, max_new_tokens=n, logit_bias=bias)).token_ids
             for p, n in jobs]

    async def run(prompt, n, delay):
        await asyncio.sleep(delay)
        out = scheduler.prepare(prompt, SamplingParams(temperature=0, max_new_tokens=n, logit_bias=bias))
        return (await scheduler.generate(prompt, out)).token_ids

    async def main():
        return await asyncio.gather(*(run(p, n, 0.05 * i) for i, (p, n) in enumerate(jobs)))

    try:
        assert asyncio.run(main()) == alone
        assert scheduler.running == 0 and len(scheduler.waiting) == 0
    finally:
        scheduler.close()


# -- the HTTP server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(long_lm):
    app = create_app(long_lm, model_name="tiny", api_key=KEY, max_concurrency=16, max_body_bytes=64 * 1024)
    with serving(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


AUTH = {"Authorization": f"Bearer {KEY}"}


def concurrent_equals_sequential(client, model: str, n: int, max_tokens) -> None:
    """n greedy streaming requests of different lengths at once: each equals its sequential result."""
    convs = prompts_of(n)

    def ask(i, stream):
        kw = dict(model=model, messages=convs[i], max_tokens=max_tokens(i), temperature=0)
        if not stream:
            return client.chat.completions.create(**kw).choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True))

    sequential = [ask(i, False) for i in range(n)]
    together = [None] * n
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(i, True))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert together == sequential


def test_16_concurrent_greedy_streams_equal_sequential(client):
    concurrent_equals_sequential(client, "tiny", 16, lambda i: 5 + 7 * i)


def test_seeds_are_reproducible_under_concurrency(client):
    convs = prompts_of(6)
    kw = [dict(model="tiny", messages=convs[i], max_tokens=20, temperature=1.0, top_p=0.9, seed=100 + i)
          for i in range(6)]
    alone = [client.chat.completions.create(**k).choices[0].message.content for k in kw]
    together = [None] * 6
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(
        i, client.chat.completions.create(**kw[i]).choices[0].message.content)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone and len(set(alone)) > 1


def test_n_choices_stream_together(client):
    kw = dict(model="tiny", messages=USER, max_tokens=12, temperature=1.0, seed=3, n=3)
    whole = client.chat.completions.create(**kw)
    texts = ["", "", ""]
    finished = set()
    for chunk in client.chat.completions.create(**kw, stream=True):
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finished.add(choice.index)
    assert texts == [c.message.content for c in whole.choices] and finished == {0, 1, 2}


def test_disconnect_frees_the_slot_within_a_second(slow_lm):
    with serving(create_app(slow_lm, api_key=KEY)) as url:
        disconnect_frees_the_slot(url, slow_lm)
        # a client that gives up on a non-streaming request frees its slot too
        body = {"messages": USER, "max_tokens": LONG, "temperature": 0, "logit_bias": no_eos(slow_lm)}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH, timeout=0.5)
        left = time.monotonic()
        while metric(url, "gptchat_running_requests", AUTH) != 0:
            assert time.monotonic() - left < 1.0, "the slot was not freed within a second"
            time.sleep(0.02)


def disconnect_frees_the_slot(url, lm):
    body = {"messages": USER, "max_tokens": LONG, "temperature": 0, "stream": True, "logit_bias": no_eos(lm)}
    before = metric(url, "gptchat_completion_tokens_total", AUTH)
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(5):
            next(line for line in lines if '"content": "' in line and '"role"' not in line)
        assert metric(url, "gptchat_running_requests", AUTH) == 1
    left = time.monotonic()
    while metric(url, "gptchat_running_requests", AUTH) != 0:
        assert time.monotonic() - left < 1.0, "the slot was not freed within a second"
        time.sleep(0.02)
    generated = metric(url, "gptchat_completion_tokens_total", AUTH) - before
    assert 5 <= generated < LONG / 2  # generation stopped early, not at the end of the reply


def test_logprobs_chat(client, long_lm, monkeypatch):
    # the reference below is the float32 forward: prompts in float32 too (bfloat16 where the CPU has it fast)
    monkeypatch.setenv("GPTCHAT_PREFILL_DTYPE", "float32")
    convs = prompts_of(2)
    r = client.chat.completions.create(model="tiny", messages=convs[1], max_tokens=12, temperature=0, logprobs=True,
                                       top_logprobs=5, logit_bias=no_eos(long_lm))
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 12
    # the model's own distribution, computed here directly: log_softmax of its logits at each position
    engine = Engine(long_lm)
    prompt = chat_prompt_ids(engine, convs[1])
    reply = engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=12,
                                                   logit_bias={int(k): v for k, v in no_eos(long_lm).items()}))
    assert [e.token for e in content] == [long_lm.tokenizer.decode([t], skip_special_tokens=False)
                                          for t in reply.token_ids]
    ids = prompt + reply.token_ids
    with torch.no_grad():
        logp = torch.log_softmax(long_lm.model(torch.tensor([ids]))[0].float(), dim=-1)
    for k, e in enumerate(content):
        pos = len(prompt) - 1 + k
        assert e.logprob == pytest.approx(float(logp[pos, ids[pos + 1]]), abs=1e-4)
        assert bytes(e.bytes).decode(errors="replace") == e.token or "\ufffd" in e.token
        top = [t.logprob for t in e.top_logprobs]
        assert len(top) == 5 and top == sorted(top, reverse=True)
        assert e.top_logprobs[0].token == e.token  # greedy: the chosen token is the most likely
        assert top[0] == pytest.approx(float(logp[pos].max()), abs=1e-4)
    # a token may be part of a character: its bytes, joined, spell the reply
    assert b"".join(bytes(e.bytes) for e in content).decode(errors="replace") == r.choices[0].message.content
    chunks = list(client.chat.completions.create(model="tiny", messages=convs[1], max_tokens=12, temperature=0,
                                                 logprobs=True, top_logprobs=2, logit_bias=no_eos(long_lm),
                                                 stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)
    assert all(len(e.top_logprobs) == 2 for e in streamed)
    plain = client.chat.completions.create(model="tiny", messages=convs[1], max_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None


def test_logprobs_completions(client, long_lm):
    kw = dict(model="tiny", prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=3,
              logit_bias=no_eos(long_lm))
    r = client.completions.create(**kw)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert token in top and top[token] == logprob and max(top.values()) == logprob  # greedy
        assert 1 <= len(top) <= 4 and logprob <= 0  # tokens that print alike ("\ufffd") share a key
    streamed = list(client.completions.create(**kw, stream=True))
    parts = [c.choices[0].logprobs for c in streamed if c.choices[0].logprobs]
    assert sum((p.tokens for p in parts), []) == lp.tokens
    assert sum((p.text_offset for p in parts), []) == lp.text_offset


def test_metrics(server, client):
    url, _ = server
    error_of(httpx.get(url + "/metrics"), 401, None, "invalid_api_key")  # behind the key like the API
    client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, temperature=0)
    r = httpx.get(url + "/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    for name in ("gptchat_requests_total", "gptchat_prompt_tokens_total", "gptchat_completion_tokens_total",
                 "gptchat_time_to_first_token_seconds", "gptchat_inter_token_latency_seconds",
                 "gptchat_queue_depth", "gptchat_running_requests"):
        assert f"# TYPE {name} " in text
    assert 'gptchat_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert 'gptchat_requests_total{endpoint="/metrics",status="401"}' in text
    assert metric(url, "gptchat_time_to_first_token_seconds_count", AUTH) >= 1
    assert 'gptchat_time_to_first_token_seconds_bucket{le="+Inf"}' in text
    assert metric(url, "gptchat_prompt_tokens_total", AUTH) > 0


def test_body_size_limit(server):
    url, _ = server
    big = {"messages": [{"role": "user", "content": "x" * 70_000}]}
    err = error_of(httpx.post(url + "/v1/chat/completions", json=big, headers=AUTH), 413, None, "request_too_large")
    assert err["type"] == "invalid_request_error" and "65536" in err["message"]

    def chunked():  # no Content-Length: the limit counts what arrives
        data = json.dumps(big).encode()
        for i in range(0, len(data), 8192):
            yield data[i : i + 8192]

    r = httpx.post(url + "/v1/chat/completions", content=chunked(), headers={**AUTH, "Content-Type": "application/json"})
    error_of(r, 413, None, "request_too_large")


def test_queue_full_is_429(slow_lm):
    app = create_app(slow_lm, max_concurrency=1, max_queue=1)
    body = {"messages": USER, "max_tokens": LONG, "temperature": 0, "stream": True, "logit_bias": no_eos(slow_lm)}
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as running:
            running_lines = running.iter_lines()  # kept: a dropped iterator closes the connection
            next(running_lines)
            with http.stream("POST", "/v1/chat/completions", json=body) as waiting:
                assert waiting.status_code == 200
                deadline = time.monotonic() + 5
                while metric(url, "gptchat_queue_depth") != 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                assert metric(url, "gptchat_running_requests") == 1
                err = error_of(http.post("/v1/chat/completions", json={**body, "stream": False}), 429,
                               None, "rate_limit_exceeded")
                assert "busy" in err["message"]
                with pytest.raises(openai.RateLimitError):
                    openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0).chat.completions.create(
                        model="default", messages=USER, max_tokens=2)
        deadline = time.monotonic() + 2
        while metric(url, "gptchat_running_requests") + metric(url, "gptchat_queue_depth"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}).status_code == 200


def test_cors_only_when_asked(long_lm):
    preflight = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    with serving(create_app(long_lm, api_key=KEY)) as url:
        r = httpx.options(url + "/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
        r = httpx.get(url + "/v1/models", headers={**AUTH, "Origin": "http://ui.example"})
        assert "access-control-allow-origin" not in r.headers
    with serving(create_app(long_lm, api_key=KEY, cors_origins=["http://ui.example"])) as url:
        r = httpx.options(url + "/v1/chat/completions", headers=preflight)  # a preflight carries no key
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ui.example"
        r = httpx.get(url + "/v1/models", headers={**AUTH, "Origin": "http://ui.example"})
        assert r.headers["access-control-allow-origin"] == "http://ui.example"
        r = httpx.options(url + "/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
        assert r.headers.get("access-control-allow-origin") != "http://evil.example"


def test_sigterm_ends_streams_cleanly_and_exits_0(long_llama_dir, long_lm):
    """`gptchat serve` gets SIGTERM during a stream: the stream ends with a final error chunk and [DONE],
    nothing half-written, and the process exits with status 0. (~8 s) With --shutdown-grace 0 the reply
    (2000 tokens) is ended at once; a grace of N seconds would let it run on for N seconds first."""
    port = free_port()
    cmd = [sys.executable, "-m", "gptchat.cli", "serve", "--model", str(long_llama_dir), "--quant", "none",
           "--port", str(port), "--shutdown-grace", "0", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = wait_until_serving(proc, port)
        body = {"messages": USER, "max_tokens": 2000, "temperature": 0, "stream": True,
                "logit_bias": no_eos(long_lm)}
        events = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line:
                    events.append(line)
                if len(events) == 5:
                    proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stdout.read()
        assert all(e.startswith("data: ") for e in events)
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2][len("data: "):])
        assert last["error"]["code"] == "server_shutting_down" and last["error"]["type"] == "server_error"
        assert 5 < len(events) < 500
        for e in events[:-1]:
            json.loads(e[len("data: "):])  # every event whole
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.slow
def test_16_concurrent_greedy_streams_on_the_default_model(default_lm):
    """The real model: 16 greedy streams at once give their sequential texts. (98 s measured on 2 cores under
    a load average of 12, model load excluded)"""
    with serving(create_app(default_lm, max_concurrency=16)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        concurrent_equals_sequential(client, default_lm.name, 16, lambda i: 3 + i)
