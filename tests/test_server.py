"""The OpenAI-compatible server, end to end: a real uvicorn on a loopback port, driven by the real `openai`
client (and raw HTTP for the error shapes), on a tiny random Llama so the whole file runs in seconds."""

import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import gptchat  # noqa: E402
from gptchat.server import create_app  # noqa: E402

KEY = "sk-test"
USER = [{"role": "user", "content": "What is the capital of France?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app):
    """Run `app` under uvicorn in a thread on a free loopback port; yield its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def wait_until_serving(proc: subprocess.Popen, port: int, timeout: float = 60) -> str:
    """Wait for a `gptchat serve` subprocess to answer /health; its base URL."""
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "gptchat serve did not start"
        try:
            if httpx.get(url + "/health").status_code == 200:
                return url
        except httpx.TransportError:
            time.sleep(0.1)


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama_dir):
    return gptchat.load_model(tiny_llama_dir[0], quant="none")


@pytest.fixture(scope="module")
def server(tiny_lm):
    app = create_app(tiny_lm, model_name="tiny", api_key=KEY)
    with serving(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server[0], headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        yield c


def test_chat(client):
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny" and r.created > 0
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_chat_equals_whole(client):
    kw = dict(model="tiny", messages=USER, max_completion_tokens=20, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)


def test_stream_include_usage(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, max_tokens=7, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 7 and last.usage.prompt_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_completions(client):
    r = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 8
    streamed = list(client.completions.create(model="tiny", prompt=["The capital of France is"], max_tokens=8,
                                              temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    assert streamed[-1].choices[0].finish_reason == r.choices[0].finish_reason
    default = client.completions.create(model="tiny", prompt="Hello", temperature=0, logit_bias={"2": -100})
    assert default.usage.completion_tokens == 16  # the legacy endpoint's default max_tokens


def test_models(client, http):
    (m,) = client.models.list().data
    assert m.id == "tiny" and m.object == "model"
    assert http.get("/v1/models/tiny").json()["id"] == "tiny"


def test_seed_and_n(client):
    kw = dict(model="tiny", messages=USER, max_tokens=16, temperature=1.0, seed=7)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    two = client.chat.completions.create(**kw, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].message.content == a.choices[0].message.content  # choice i samples with seed + i
    assert two.choices[1].message.content == client.chat.completions.create(**{**kw, "seed": 8}).choices[0].message.content
    assert two.usage.completion_tokens == sum(
        r.usage.completion_tokens for r in (a, client.chat.completions.create(**{**kw, "seed": 8})))


def test_sampling_extensions_accepted(client):
    r = client.chat.completions.create(
        model="default", messages=USER, max_tokens=8, temperature=0.8, top_p=0.9, stop=["\n", "."], seed=1,
        presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"5": -100}, user="u1", logprobs=False,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "no_repeat_ngram_size": 2})
    assert r.choices[0].finish_reason in ("stop", "length")


def test_concurrent_requests_match_serial(client):
    kw = dict(model="tiny", messages=USER, max_tokens=24, temperature=0)
    alone = client.chat.completions.create(**kw).choices[0].message.content
    texts = [None] * 4

    def ask(i):
        texts[i] = client.chat.completions.create(**kw).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert texts == [alone] * 4


def test_tokenize_and_health(server, http):
    r = http.post("/tokenize", json={"text": "Hello there"}).json()
    assert r["count"] == len(r["tokens"]) > 0
    r2 = http.post("/tokenize", json={"messages": USER}).json()
    assert r2["count"] == len(r2["tokens"]) > r["count"] - 1
    assert httpx.get(server[0] + "/health").json() == {"status": "ok"}  # public: no key


def error_of(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param and err["code"] == code, err
    return err


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": USER, "temperature": -0.1}, "temperature"),
    ({"messages": USER, "temperature": 2.5}, "temperature"),
    ({"messages": USER, "temperature": "hot"}, "temperature"),
    ({"messages": USER, "top_p": 0}, "top_p"),
    ({"messages": USER, "top_p": 1.5}, "top_p"),
    ({"messages": USER, "n": 0}, "n"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "presence_penalty": 3}, "presence_penalty"),
    ({"messages": USER, "stop": [""]}, "stop"),
    ({"messages": USER, "logit_bias": {"99999": 1}}, "logit_bias"),
])
def test_bad_values(http, body, param):
    err = error_of(http.post("/v1/chat/completions", json=body), 400, param, "invalid_value")
    assert err["type"] == "invalid_request_error"


def test_malformed_and_missing(http):
    r = http.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    error_of(r, 400)
    error_of(http.post("/v1/chat/completions", json={}), 400, "messages", "missing_required_parameter")
    error_of(http.post("/v1/completions", json={"prompt": ["a", "b"]}), 400, "prompt", "invalid_value")
    error_of(http.post("/v1/chat/completions", json={"messages": USER, "top_logprobs": 2}), 400, "top_logprobs",
             "invalid_value")
    error_of(http.post("/v1/chat/completions", json={"messages": USER, "logprobs": True, "top_logprobs": 21}), 400,
             "top_logprobs", "invalid_value")
    error_of(http.post("/v1/completions", json={"prompt": "a", "logprobs": -1}), 400, "logprobs", "invalid_value")
    error_of(http.post("/nowhere"), 404, None, "not_found")


def test_unknown_model(http):
    err = error_of(http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": USER}), 404, "model",
                   "model_not_found")
    assert "gpt-4o" in err["message"]


def test_api_key(server, http):
    url = server[0]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("POST", "/tokenize")):
            r = httpx.request(method, url + path, json={"messages": USER}, headers=headers)
            error_of(r, 401, None, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_context_length_exceeded(http, tiny_lm):
    ctx = tiny_lm.config.max_seq_len
    n_prompt = http.post("/tokenize", json={"messages": USER}).json()["count"]
    err = error_of(http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": ctx}), 400, "messages",
                   "context_length_exceeded")
    assert str(ctx) in err["message"] and str(n_prompt) in err["message"]
    long = "Paris " * ctx
    err = error_of(http.post("/v1/completions", json={"prompt": long}), 400, "prompt", "context_length_exceeded")
    assert str(ctx) in err["message"]
    # exactly filling the context is fine
    r = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": ctx - n_prompt, "temperature": 0})
    assert r.status_code == 200, r.text


def test_error_after_stream_began(tiny_lm, monkeypatch):
    """A failure in the middle of a stream ends it with an error chunk that tells nothing of the internals."""
    from gptchat.engine import DecodeBatch

    def failing_step(self):
        raise RuntimeError("boom")

    monkeypatch.setattr(DecodeBatch, "step", failing_step)
    with serving(create_app(tiny_lm)) as url:
        no_end = {str(i): -100 for i in tiny_lm.tokenizer.eos_ids}  # a sampled end of turn would end it before a step
        r = httpx.post(url + "/v1/chat/completions",
                       json={"messages": USER, "max_tokens": 10, "stream": True, "logit_bias": no_end})
        events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert '"error"' in events[-2] and "server_error" in events[-2] and "boom" not in events[-2]
        monkeypatch.undo()  # the scheduler carries on with the next request
        r = httpx.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_cli_serve(tiny_llama_dir, tmp_path):
    """`gptchat serve` binds loopback, takes the key from $GPTCHAT_API_KEY, and answers."""
    port = free_port()
    env = {**os.environ, "GPTCHAT_API_KEY": KEY}
    cmd = [sys.executable, "-m", "gptchat.cli", "serve", "--model", str(tiny_llama_dir[0]), "--quant", "none",
           "--port", str(port), "--max-tokens-cap", "5", "--log-level", "warning", "--data-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = wait_until_serving(proc, port)
        assert httpx.get(url + "/v1/models").status_code == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        body = {"messages": USER, "temperature": 0}
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=auth, timeout=30).json()
        assert r["usage"]["completion_tokens"] <= 5  # the cap is also the default budget
        r = httpx.post(url + "/v1/chat/completions", json={**body, "max_tokens": 6}, headers=auth, timeout=30)
        error_of(r, 400, "max_tokens", "invalid_value")
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.slow
def test_default_model_knows_paris(default_lm):
    with serving(create_app(default_lm)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        r = client.chat.completions.create(model=default_lm.name, messages=USER, max_tokens=30, temperature=0)
        assert "Paris" in r.choices[0].message.content
