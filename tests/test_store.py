"""The conversation store on its own: message trees and branches, migrations, WAL, export/import, and
several writers at once (threads sharing a store, and separate stores on one file). Runs in about a second."""

import json
import sqlite3
import threading

import pytest

from gptchat.errors import GptchatError
from gptchat.server import store as store_mod
from gptchat.server.store import ConversationStore, NotFound, StoreError


@pytest.fixture
def store(tmp_path):
    s = ConversationStore.in_dir(tmp_path)
    yield s
    s.close()


def contents(messages):
    return [m["content"] for m in messages]


def test_tree_branches_and_current_leaf(store):
    c = store.create(system_prompt="Be brief.", settings={"temperature": 0.5})
    assert c["title"] == "New conversation" and c["current_leaf"] is None and store.path(None) == []
    u1 = store.add_message(c["id"], "user", "What is 2+2?")
    a1 = store.add_message(c["id"], "assistant", "4", u1["id"])
    a2 = store.add_message(c["id"], "assistant", "Four.", u1["id"], status="stopped")  # a regeneration
    u2 = store.add_message(c["id"], "user", "And 3+3?", a2["id"])
    edit = store.add_message(c["id"], "user", "What is 2+3?", None)  # an edit of the first message: a new root
    got = store.get(c["id"])
    assert got["current_leaf"] == edit["id"] and got["title"] == "What is 2+2?"  # the first message names it
    assert got["system_prompt"] == "Be brief." and got["settings"] == {"temperature": 0.5}
    assert contents(store.path(u2["id"])) == ["What is 2+2?", "Four.", "And 3+3?"]
    assert [m["status"] for m in store.path(u2["id"])] == ["complete", "stopped", "complete"]
    assert contents(store.children(c["id"], u1["id"])) == ["4", "Four."]
    assert contents(store.children(c["id"], None)) == ["What is 2+2?", "What is 2+3?"]
    assert len(store.messages(c["id"])) == 5
    store.update(c["id"], current_leaf=a1["id"])
    assert store.get(c["id"])["current_leaf"] == a1["id"]


def test_errors(store):
    c = store.create()
    other = store.create()
    u = store.add_message(other["id"], "user", "hi")
    with pytest.raises(NotFound):
        store.get("nope")
    with pytest.raises(NotFound):
        store.add_message(c["id"], "assistant", "x", u["id"])  # a parent from another conversation
    with pytest.raises(NotFound):
        store.update(c["id"], current_leaf=u["id"])
    with pytest.raises(StoreError):
        store.add_message(c["id"], "system", "x")
    with pytest.raises(StoreError):
        store.add_message(c["id"], "assistant", "x", status="lost")
    with pytest.raises(NotFound):
        store.delete("nope")
    assert store.messages(c["id"]) == []  # nothing half-written


def test_list_search_rename_delete(store):
    a = store.create("Paris trip")
    b = store.create("Python 100% tips_and_tricks")
    store.add_message(a["id"], "user", "hello")  # the newest update comes first
    assert [c["id"] for c in store.list()] == [a["id"], b["id"]]
    assert [c["id"] for c in store.list("PARIS")] == [a["id"]]
    assert [c["id"] for c in store.list("100%")] == [b["id"]]
    assert store.list("P%s") == [] and store.list("p_t") == []  # LIKE wildcards are literal
    store.update(b["id"], title="Renamed")
    assert store.get(b["id"])["title"] == "Renamed" and store.get(a["id"])["title"] == "Paris trip"
    store.delete(a["id"])
    assert [c["id"] for c in store.list()] == [b["id"]]
    assert store.db.execute("SELECT count(*) FROM messages").fetchone()[0] == 0  # its messages went with it


def test_wal_and_user_version(store):
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == store_mod.VERSION
    assert store.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_migrations_from_version_0_and_1(tmp_path):
    # version 0: a file sqlite created but nobody wrote to
    path0 = tmp_path / "v0.db"
    sqlite3.connect(path0).close()
    s = ConversationStore(path0)
    assert s.db.execute("PRAGMA user_version").fetchone()[0] == store_mod.VERSION
    s.close()
    # version 1: conversations written before the logprobs column existed keep their rows
    path1 = tmp_path / "v1.db"
    db = sqlite3.connect(path1)
    db.executescript(store_mod.MIGRATIONS[0] + "; PRAGMA user_version = 1;")
    db.execute("INSERT INTO conversations VALUES ('c', 'Old', '', '{}', 'm', 1, 1)")
    db.execute("INSERT INTO messages VALUES ('m', 'c', NULL, 'user', 'kept', 'complete', 1)")
    db.commit()
    db.close()
    s = ConversationStore(path1)
    (m,) = s.messages("c")
    assert m["content"] == "kept" and m["logprobs"] is None and m["finish_reason"] is None
    assert s.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    s.close()
    # a newer schema than we know is refused, not overwritten
    db = sqlite3.connect(path1)
    db.execute(f"PRAGMA user_version = {store_mod.VERSION + 1}")
    db.close()
    with pytest.raises(GptchatError, match="newer"):
        ConversationStore(path1)


def test_export_import_round_trip(store):
    c = store.create("Tree", system_prompt="sys", settings={"top_p": 0.9})
    u = store.add_message(c["id"], "user", "q <script>alert(1)</script>")
    store.add_message(c["id"], "assistant", "a1", u["id"], status="error")
    a2 = store.add_message(c["id"], "assistant", "a2", u["id"], logprobs=[{"token": "a2", "logprob": -0.1,
                                                                           "bytes": [97, 50], "top_logprobs": []}],
                           finish_reason="stop")
    store.update(c["id"], current_leaf=a2["id"])
    exported = json.loads(json.dumps(store.export([c["id"]])))  # through JSON text, as a file would
    (new,) = store.import_(exported)
    assert new["id"] != c["id"] and new["title"] == "Tree" and new["system_prompt"] == "sys"
    assert new["settings"] == {"top_p": 0.9}

    def shape(cid):
        msgs = store.messages(cid)
        index = {m["id"]: i for i, m in enumerate(msgs)}
        return [(m["role"], m["content"], m["status"], m["logprobs"], m["finish_reason"],
                 index.get(m["parent_id"])) for m in msgs]

    assert shape(new["id"]) == shape(c["id"])
    assert contents(store.path(new["current_leaf"])) == ["q <script>alert(1)</script>", "a2"]
    # a chat file ({"messages": [...]}, as `gptchat chat` saves) becomes a linear conversation
    (chat,) = store.import_({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "hello"}]})
    assert chat["system_prompt"] == "S" and chat["title"] == "hi" and contents(store.path(chat["current_leaf"])) == ["hi", "hello"]


@pytest.mark.parametrize("bad", [
    "text", {"conversations": [{"messages": [{"role": "robot", "content": "x"}]}]},
    {"conversations": [{"messages": [{"role": "user", "content": 3}]}]},
    {"conversations": [{"messages": [{"id": "b", "parent_id": "a", "role": "user", "content": "x"}]}]},
    {"conversations": [{"title": "ok", "messages": []}, {"settings": [], "messages": []}]},
])
def test_import_refuses_malformed_all_or_nothing(store, bad):
    with pytest.raises(StoreError):
        store.import_(bad)
    assert store.list() == []


def test_concurrent_writers(tmp_path):
    """8 threads on one shared store and 4 threads with their own store on the same file: nothing lost."""
    shared = ConversationStore.in_dir(tmp_path)
    c = shared.create()
    errors = []

    def write(s, tag, n=25):
        try:
            for i in range(n):
                s.add_message(c["id"], "user", f"{tag}-{i}")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def own_store(tag):
        s = ConversationStore.in_dir(tmp_path)
        write(s, tag)
        s.close()

    threads = [threading.Thread(target=write, args=(shared, f"t{k}")) for k in range(8)]
    threads += [threading.Thread(target=own_store, args=(f"s{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    got = contents(shared.messages(c["id"]))
    assert sorted(got) == sorted(f"{tag}-{i}" for tag in [f"t{k}" for k in range(8)] + [f"s{k}" for k in range(4)]
                                 for i in range(25))
    assert shared.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    shared.close()


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert store_mod.default_data_dir() == tmp_path / "gptchat"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert store_mod.default_data_dir() == tmp_path / ".local" / "share" / "gptchat"
