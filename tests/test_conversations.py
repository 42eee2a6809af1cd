"""The web UI's conversation API end to end: a real uvicorn on a loopback port over a tiny random Llama with a
long context (so a reply can be stopped midway), a real SQLite store in a temporary directory, raw HTTP.
Also the durability test: a `gptchat serve` process killed with SIGKILL mid-reply. About 25 s in all."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest

import gptchat
from gptchat.server import create_app
from gptchat.server.conversations import LOGPROBS
from gptchat.server.store import ConversationStore
from test_server import error_of, free_port, serving

KEY = "sk-ui"
AUTH = {"Authorization": f"Bearer {KEY}"}
EOS = 2  # the tiny Llama's end-of-sequence token
ENDLESS = {"temperature": 1.0, "seed": 0, "max_tokens": 1500, "logit_bias": {str(EOS): -100}}  # runs for seconds


@pytest.fixture(scope="module")
def server(long_llama_dir, tmp_path_factory):
    lm = gptchat.load_model(long_llama_dir, quant="none")
    store = ConversationStore.in_dir(tmp_path_factory.mktemp("data"))
    app = create_app(lm, model_name="tiny", api_key=KEY, store=store)
    with serving(app) as url:
        yield url, store


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server[0], headers=AUTH, timeout=60) as c:
        yield c


def events(lines):
    """The JSON events of an SSE body (an iterable of lines), up to [DONE]."""
    for line in lines:
        if line.startswith("data: "):
            if line == "data: [DONE]":
                return
            yield json.loads(line[len("data: "):])


def send(http, cid, **body):
    """POST a send and read the whole stream: (start event, the delta texts, the last event)."""
    r = http.post(f"/api/conversations/{cid}/messages", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    evs = list(events(r.text.splitlines()))
    assert evs[0]["type"] == "start" and evs[-1]["type"] in ("done", "error")
    return evs[0], [e["text"] for e in evs if e["type"] == "delta"], evs[-1]


def new_conversation(http, **body):
    r = http.post("/api/conversations", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def branch_of(http, cid):
    """The shown branch of a conversation, root first, as (role, content, status)."""
    conv = http.get(f"/api/conversations/{cid}").json()
    by_id = {m["id"]: m for m in conv["messages"]}
    out, at = [], conv["current_leaf"]
    while at:
        m = by_id[at]
        out.insert(0, (m["role"], m["content"], m["status"]))
        at = m["parent_id"]
    return out


def test_send_regenerate_edit(http):
    conv = new_conversation(http, system_prompt="You are terse.", settings={"temperature": 0, "max_tokens": 8})
    assert conv["settings"] == {"temperature": 0.0, "max_tokens": 8}
    start, deltas, done = send(http, conv["id"], content="Hello there")
    user, reply = start["user"], done["message"]
    assert user["role"] == "user" and user["content"] == "Hello there" and user["parent_id"] is None
    assert reply["role"] == "assistant" and reply["parent_id"] == user["id"] and reply["content"] == "".join(deltas)
    assert reply["status"] == "complete" and reply["finish_reason"] in ("stop", "length")
    # the reply is the one the OpenAI endpoint gives for the same messages: the branch is rendered right
    same = http.post("/v1/chat/completions", json={"messages": [
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}],
        "temperature": 0, "max_tokens": 8}).json()
    assert same["choices"][0]["message"]["content"] == reply["content"]
    got = http.get(f"/api/conversations/{conv['id']}").json()
    assert got["title"] == "Hello there" and got["current_leaf"] == reply["id"]

    # regenerate: a second answer to the same user message, a sibling of the first (greedy: the same text)
    start2, _, done2 = send(http, conv["id"], parent_id=user["id"])
    assert start2["user"]["id"] == user["id"] and done2["message"]["parent_id"] == user["id"]
    assert done2["message"]["id"] != reply["id"] and done2["message"]["content"] == reply["content"]

    # continue the first branch, then edit the first message: a new root, the old branch kept
    start3, _, done3 = send(http, conv["id"], content="And then?", parent_id=reply["id"])
    assert start3["user"]["parent_id"] == reply["id"]
    assert [m[:2] for m in branch_of(http, conv["id"])] == [
        ("user", "Hello there"), ("assistant", reply["content"]), ("user", "And then?"),
        ("assistant", done3["message"]["content"])]
    start4, _, done4 = send(http, conv["id"], content="Hi!", parent_id=None)
    assert start4["user"]["parent_id"] is None
    assert [m[1] for m in branch_of(http, conv["id"])] == ["Hi!", done4["message"]["content"]]
    assert len(http.get(f"/api/conversations/{conv['id']}").json()["messages"]) == 7
    # switching back to the old branch
    r = http.patch(f"/api/conversations/{conv['id']}", json={"current_leaf": done3["message"]["id"]})
    assert r.status_code == 200 and branch_of(http, conv["id"])[2][1] == "And then?"


def test_stop_mid_stream(http):
    conv = new_conversation(http, settings=ENDLESS)
    with http.stream("POST", f"/api/conversations/{conv['id']}/messages", json={"content": "Tell me a story"}) as r:
        stream = events(r.iter_lines())
        start = next(stream)
        first = next(stream)
        assert start["type"] == "start" and first["type"] == "delta"
        # the user's message was committed before the reply began
        assert branch_of(http, conv["id"]) == [("user", "Tell me a story", "complete")]
        assert http.post(f"/api/conversations/{conv['id']}/stop").json()["stopped"] == 1
        rest = list(stream)
    assert rest[-1]["type"] == "done"
    reply = rest[-1]["message"]
    texts = [first["text"]] + [e["text"] for e in rest if e["type"] == "delta"]
    assert reply["status"] == "stopped" and reply["finish_reason"] is None and reply["content"] == "".join(texts)
    assert len(texts) < 1500
    assert branch_of(http, conv["id"])[-1] == ("assistant", reply["content"], "stopped")


def test_client_disconnect_keeps_reply_marked_stopped(http, server):
    conv = new_conversation(http, settings=ENDLESS)
    with httpx.Client(base_url=server[0], headers=AUTH, timeout=60) as other:
        with other.stream("POST", f"/api/conversations/{conv['id']}/messages", json={"content": "Go on"}) as r:
            stream = events(r.iter_lines())
            assert next(stream)["type"] == "start"
            # leave once the reply has some text (a token's delta may be empty: text the detokenizer holds back)
            assert next(e for e in stream if e["type"] == "delta" and e["text"])
    deadline = time.monotonic() + 10
    while len(branch := branch_of(http, conv["id"])) < 2:
        assert time.monotonic() < deadline, "the reply of a client that left was not kept"
        time.sleep(0.05)
    assert branch[-1][0] == "assistant" and branch[-1][2] == "stopped" and branch[-1][1]
    assert http.post(f"/api/conversations/{conv['id']}/stop").json()["stopped"] == 0  # nothing left running


def test_list_search_rename_delete(http):
    a = new_conversation(http, title="Holiday <plans>")
    b = new_conversation(http, title="Work notes")
    ids = [c["id"] for c in http.get("/api/conversations").json()["conversations"]]
    assert ids.index(b["id"]) < ids.index(a["id"])  # newest first
    found = http.get("/api/conversations", params={"search": "holiday"}).json()["conversations"]
    assert [c["id"] for c in found] == [a["id"]]
    assert http.patch(f"/api/conversations/{b['id']}", json={"title": "Renamed"}).json()["title"] == "Renamed"
    assert http.delete(f"/api/conversations/{a['id']}").json() == {"id": a["id"], "deleted": True}
    error_of(http.get(f"/api/conversations/{a['id']}"), 404, None, "not_found")


def test_export_import(http):
    conv = new_conversation(http, system_prompt="S", settings={"temperature": 0, "max_tokens": 3})
    send(http, conv["id"], content="one")
    exported = http.get(f"/api/conversations/{conv['id']}/export").json()
    assert exported["format"] == "gptchat.conversations" and len(exported["conversations"]) == 1
    (imported,) = http.post("/api/import", json=exported).json()["conversations"]
    assert imported["id"] != conv["id"] and imported["system_prompt"] == "S"
    assert branch_of(http, imported["id"]) == branch_of(http, conv["id"])
    assert any(c["id"] == imported["id"] for c in http.get("/api/export").json()["conversations"])
    error_of(http.post("/api/import", json={"conversations": [{"messages": [{"role": "x"}]}]}),
             400, "conversations", "invalid_value")
    error_of(http.post("/api/import", content=b"{nope", headers={"Content-Type": "application/json"}), 400, None, None)


def test_errors(http, server):
    url, store = server
    # the key: everything under /api needs it; the page and its static files do not
    error_of(httpx.get(url + "/api/conversations"), 401, None, "invalid_api_key")
    error_of(httpx.post(url + "/api/import", json={}), 401, None, "invalid_api_key")
    assert httpx.get(url + "/").status_code == 200 and httpx.get(url + "/static/app.js").status_code == 200
    # unknown conversation or message
    for method, path in [("GET", ""), ("PATCH", ""), ("DELETE", ""), ("GET", "/export"), ("POST", "/stop")]:
        error_of(http.request(method, "/api/conversations/nope" + path, json={} if method == "PATCH" else None),
                 404, None, "not_found")
    error_of(http.post("/api/conversations/nope/messages", json={"content": "hi"}), 404, None, "not_found")
    conv = new_conversation(http, settings={"max_tokens": 4})
    cid = conv["id"]
    error_of(http.post(f"/api/conversations/{cid}/messages", json={"content": "hi", "parent_id": "nope"}),
             404, "parent_id", "not_found")
    # bad sends
    error_of(http.post(f"/api/conversations/{cid}/messages", json={"content": "  "}), 400, "content", "invalid_value")
    error_of(http.post(f"/api/conversations/{cid}/messages", json={"parent_id": None}), 400, "parent_id", "invalid_value")
    error_of(http.post(f"/api/conversations/{cid}/messages", json={"content": 3}), 400, "content", "invalid_value")
    # bad settings
    error_of(http.patch(f"/api/conversations/{cid}", json={"settings": {"temperature": 5}}),
             400, "settings.temperature", "invalid_value")
    error_of(http.post("/api/conversations", json={"settings": {"temprature": 1}}), 400, "settings.temprature",
             "invalid_value")
    # a conversation beyond the context is refused with both counts, and nothing is committed
    r = http.post(f"/api/conversations/{cid}/messages", json={"content": "hello " * 3000})
    error_of(r, 400, "messages", "context_length_exceeded")
    assert "2048" in r.json()["error"]["message"]
    http.patch(f"/api/conversations/{cid}", json={"settings": {"max_tokens": 4000}})
    error_of(http.post(f"/api/conversations/{cid}/messages", json={"content": "hi"}), 400, "messages",
             "context_length_exceeded")
    assert http.get(f"/api/conversations/{cid}").json()["messages"] == []


def test_web_ui_is_served(server):
    page = httpx.get(server[0] + "/")
    assert page.headers["content-type"].startswith("text/html") and "Content-Security-Policy" in page.text
    for name in ("app.js", "markdown.js", "style.css"):
        assert httpx.get(f"{server[0]}/static/{name}").status_code == 200
    error_of(httpx.get(server[0] + "/static/nope.js"), 404, None, "not_found")


@pytest.mark.skipif(not LOGPROBS, reason="the engine gives no token probabilities yet")
def test_token_probabilities(http):
    conv = new_conversation(http, settings={"temperature": 0, "max_tokens": 5, "logprobs": True, "top_logprobs": 3})
    _, _, done = send(http, conv["id"], content="Hello")
    lps = done["message"]["logprobs"]
    assert len(lps) >= 1 and all(len(t["top_logprobs"]) == 3 and t["logprob"] <= 0 for t in lps)
    assert http.get(f"/api/conversations/{conv['id']}").json()["messages"][-1]["logprobs"] == lps


def wait_healthy(proc, url):
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "gptchat serve did not start"
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)


def test_sigkill_mid_reply_keeps_the_users_message(long_llama_dir, tmp_path):
    """A server killed with SIGKILL while it streams: on restart the message is there and the file is sound."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "gptchat.cli", "serve", "--model", str(long_llama_dir), "--quant", "none",
           "--port", str(port), "--data-dir", str(tmp_path), "--api-key", KEY, "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(proc, url)
        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:
            cid = new_conversation(http, settings=ENDLESS)["id"]
            with http.stream("POST", f"/api/conversations/{cid}/messages", json={"content": "Keep me"}) as r:
                stream = events(r.iter_lines())
                assert next(stream)["type"] == "start" and next(stream)["type"] == "delta"
                os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    db = sqlite3.connect(tmp_path / "conversations.db")
    assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    assert db.execute("SELECT role, content, status FROM messages").fetchall() == [("user", "Keep me", "complete")]
    db.close()

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(proc, url)
        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:
            assert branch_of(http, cid) == [("user", "Keep me", "complete")]
            http.patch(f"/api/conversations/{cid}", json={"settings": {"max_tokens": 3}})
            user_id = http.get(f"/api/conversations/{cid}").json()["current_leaf"]
            _, _, done = send(http, cid, parent_id=user_id)  # the UI's "Answer" on the unanswered message
            assert done["message"]["status"] == "complete"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_serve_refuses_an_unusable_data_dir(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    r = subprocess.run([sys.executable, "-m", "gptchat.cli", "serve", "--data-dir", str(not_a_dir)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("gptchat: error: cannot open the conversation store")
    assert len(r.stderr.strip().splitlines()) == 1
