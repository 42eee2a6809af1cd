"""Conversations kept on disk: SQLite (stdlib sqlite3) in WAL mode, one file under the data directory.

Messages form a tree through `parent_id`: editing a message or regenerating a reply adds a sibling
instead of overwriting, and each conversation remembers the leaf of the branch it shows (`current_leaf`),
its system prompt and its sampling settings. A reply ends in one of three states: complete, stopped (by the
user or a client that left) or error.

Every write is its own transaction with synchronous=FULL, so what was committed survives a killed
process. One connection is shared behind a lock, which makes a store safe to use from any thread; several
stores (or processes) on one file wait for each other through SQLite's busy timeout.

The schema is versioned with `PRAGMA user_version`: MIGRATIONS[v] takes a database from version v to v+1.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import GptchatError

STATUSES = ("complete", "stopped", "error")
ROLES = ("user", "assistant")
DEFAULT_TITLE = "New conversation"
EXPORT_FORMAT = "gptchat.conversations"

MIGRATIONS = [
    # 0 -> 1: conversations and their message trees
    """
    CREATE TABLE conversations (
        id            TEXT PRIMARY KEY,
        title         TEXT NOT NULL,
        system_prompt TEXT NOT NULL DEFAULT '',
        settings      TEXT NOT NULL DEFAULT '{}',
        current_leaf  TEXT,
        created_at    REAL NOT NULL,
        updated_at    REAL NOT NULL
    );
    CREATE TABLE messages (
        id              TEXT PRIMARY KEY,
        conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        parent_id       TEXT REFERENCES messages(id) ON DELETE CASCADE,
        role            TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content         TEXT NOT NULL,
        status          TEXT NOT NULL DEFAULT 'complete' CHECK (status IN ('complete', 'stopped', 'error')),
        created_at      REAL NOT NULL
    );
    CREATE INDEX messages_by_conversation ON messages(conversation_id, created_at);
    CREATE INDEX messages_by_parent ON messages(parent_id);
    CREATE INDEX conversations_by_update ON conversations(updated_at);
    """,
    # 1 -> 2: a reply's per-token probabilities (JSON, OpenAI's logprobs content) and why it ended
    """
    ALTER TABLE messages ADD COLUMN logprobs TEXT;
    ALTER TABLE messages ADD COLUMN finish_reason TEXT;
    """,
]
VERSION = len(MIGRATIONS)


class StoreError(GptchatError):
    """A bad request to the store (an unknown id, a malformed import)."""


class NotFound(StoreError):
    pass


def default_data_dir() -> Path:
    """$XDG_DATA_HOME/gptchat, else ~/.local/share/gptchat."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "gptchat"


def new_id() -> str:
    return uuid.uuid4().hex


def migrate(db: sqlite3.Connection) -> int:
    """Bring the schema to VERSION, one migration per transaction; return the version found.

    The version is read again inside each transaction, so two processes opening a new file do not both
    run the same step.
    """
    found = db.execute("PRAGMA user_version").fetchone()[0]
    if found > VERSION:
        raise GptchatError(f"the conversation store has schema version {found}, newer than this gptchat "
                           f"understands ({VERSION}); upgrade gptchat")
    while True:
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version >= VERSION:
                db.execute("COMMIT")
                return found
            for statement in MIGRATIONS[version].split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {version + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


class ConversationStore:
    """The conversations of one SQLite file (or of memory, with path ":memory:")."""

    FILENAME = "conversations.db"

    def __init__(self, path: str | Path = ":memory:"):
        self.file = str(path)
        try:
            if self.file != ":memory:":
                Path(self.file).parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.file, timeout=30, check_same_thread=False, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = FULL")
            self.db.execute("PRAGMA foreign_keys = ON")
            migrate(self.db)
        except (OSError, sqlite3.Error) as e:
            raise GptchatError(f"cannot open the conversation store {self.file}: {e}") from None
        self.lock = threading.RLock()

    @classmethod
    def in_dir(cls, data_dir: str | Path | None) -> "ConversationStore":
        """The store of a data directory (default: the user's data dir)."""
        return cls(Path(data_dir or default_data_dir()).expanduser() / cls.FILENAME)

    def close(self) -> None:
        with self.lock:
            self.db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction, taken with the write lock up front so concurrent writers queue instead of failing."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    # -- conversations ------------------------------------------------------------------------------

    def create(self, title: str | None = None, system_prompt: str = "", settings: dict | None = None) -> dict:
        cid, t = new_id(), time.time()
        with self._write() as db:
            db.execute("INSERT INTO conversations (id, title, system_prompt, settings, created_at, updated_at) "
                       "VALUES (?, ?, ?, ?, ?, ?)",
                       (cid, title or DEFAULT_TITLE, system_prompt or "", json.dumps(settings or {}), t, t))
        return self.get(cid)

    def get(self, conversation_id: str) -> dict:
        rows = self._read("SELECT * FROM conversations WHERE id = ?", (conversation_id,))
        if not rows:
            raise NotFound(f"No conversation with id '{conversation_id}'.")
        return _conversation(rows[0])

    def list(self, search: str | None = None, limit: int = 200) -> list[dict]:
        """Newest first; `search` keeps the ones whose title contains it (any case)."""
        if search:
            pattern = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            rows = self._read("SELECT * FROM conversations WHERE title LIKE ? ESCAPE '\\' "
                              "ORDER BY updated_at DESC LIMIT ?", (pattern, limit))
        else:
            rows = self._read("SELECT * FROM conversations ORDER BY updated_at DESC LIMIT ?", (limit,))
        return [_conversation(r) for r in rows]

    def update(self, conversation_id: str, *, title: str | None = None, system_prompt: str | None = None,
               settings: dict | None = None, current_leaf: str | None = None) -> dict:
        """Change what is given (None: leave as is). `current_leaf` must be a message of this conversation."""
        changes: dict[str, Any] = {}
        if title is not None:
            changes["title"] = title.strip() or DEFAULT_TITLE
        if system_prompt is not None:
            changes["system_prompt"] = system_prompt
        if settings is not None:
            changes["settings"] = json.dumps(settings)
        with self._write() as db:
            self._must_exist(db, conversation_id)
            if current_leaf is not None:
                self._message_in(db, conversation_id, current_leaf)
                changes["current_leaf"] = current_leaf
            changes["updated_at"] = time.time()
            sets = ", ".join(f"{k} = ?" for k in changes)
            db.execute(f"UPDATE conversations SET {sets} WHERE id = ?", (*changes.values(), conversation_id))
        return self.get(conversation_id)

    def delete(self, conversation_id: str) -> None:
        with self._write() as db:
            if db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,)).rowcount == 0:
                raise NotFound(f"No conversation with id '{conversation_id}'.")

    # -- messages -------------------------------------------------------------------------------------

    def add_message(self, conversation_id: str, role: str, content: str, parent_id: str | None = None, *,
                    status: str = "complete", logprobs: list | None = None,
                    finish_reason: str | None = None) -> dict:
        """Append a message under `parent_id` (None: a new root) and make it the conversation's current leaf.

        A conversation still titled by default takes its first user message as its title.
        """
        if role not in ROLES:
            raise StoreError(f"role must be one of {', '.join(ROLES)} (got {role!r})")
        if status not in STATUSES:
            raise StoreError(f"status must be one of {', '.join(STATUSES)} (got {status!r})")
        mid, t = new_id(), time.time()
        with self._write() as db:
            conv = self._must_exist(db, conversation_id)
            if parent_id is not None:
                self._message_in(db, conversation_id, parent_id)
            db.execute("INSERT INTO messages (id, conversation_id, parent_id, role, content, status, created_at, "
                       "logprobs, finish_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (mid, conversation_id, parent_id, role, content, status, t,
                        None if logprobs is None else json.dumps(logprobs), finish_reason))
            title = conv["title"]
            if role == "user" and title == DEFAULT_TITLE and content.strip():
                title = title_from(content)
            db.execute("UPDATE conversations SET current_leaf = ?, updated_at = ?, title = ? WHERE id = ?",
                       (mid, t, title, conversation_id))
        return self.message(mid)

    def message(self, message_id: str) -> dict:
        rows = self._read("SELECT * FROM messages WHERE id = ?", (message_id,))
        if not rows:
            raise NotFound(f"No message with id '{message_id}'.")
        return _message(rows[0])

    def messages(self, conversation_id: str) -> list[dict]:
        """Every message of the conversation, all branches, oldest first."""
        self.get(conversation_id)
        rows = self._read("SELECT * FROM messages WHERE conversation_id = ? ORDER BY created_at, rowid",
                          (conversation_id,))
        return [_message(r) for r in rows]

    def path(self, leaf_id: str | None) -> list[dict]:
        """The branch that ends at `leaf_id`, root first (empty for None)."""
        if leaf_id is None:
            return []
        rows = self._read("""
            WITH RECURSIVE up(id, parent_id, depth) AS (
                SELECT id, parent_id, 0 FROM messages WHERE id = ?
                UNION ALL
                SELECT m.id, m.parent_id, up.depth + 1 FROM messages m JOIN up ON m.id = up.parent_id
            )
            SELECT messages.* FROM up JOIN messages USING (id) ORDER BY up.depth DESC""", (leaf_id,))
        if not rows:
            raise NotFound(f"No message with id '{leaf_id}'.")
        return [_message(r) for r in rows]

    def children(self, conversation_id: str, parent_id: str | None) -> list[dict]:
        """The replies to `parent_id` (None: the roots), oldest first: the branches at that point."""
        rows = self._read("SELECT * FROM messages WHERE conversation_id = ? AND parent_id IS ? "
                          "ORDER BY created_at, rowid", (conversation_id, parent_id))
        return [_message(r) for r in rows]

    # -- export and import ----------------------------------------------------------------------------

    def export(self, ids: list[str] | None = None) -> dict:
        """The given conversations (default: all) with all their messages, as one JSON-able object."""
        convs = [self.get(i) for i in ids] if ids is not None else self.list(limit=-1)
        return {"format": EXPORT_FORMAT, "version": 1,
                "conversations": [{**c, "messages": self.messages(c["id"])} for c in convs]}

    def import_(self, data: Any) -> list[dict]:
        """Add the conversations of an export (or of `{"messages": [...]}` chat files) under new ids.

        Messages without ids are chained in order; a leading system message becomes the system prompt.
        All or nothing: a malformed entry imports nothing.
        """
        if isinstance(data, dict) and "conversations" in data:
            items = data["conversations"]
        elif isinstance(data, dict) and "messages" in data:
            items = [data]
        else:
            items = data
        if not isinstance(items, list):
            raise StoreError("an import must be {\"conversations\": [...]}, a list of conversations or "
                             "{\"messages\": [...]}")
        new_ids = []
        with self._write() as db:
            for n, item in enumerate(items):
                new_ids.append(self._import_one(db, item, f"conversations[{n}]"))
        return [self.get(i) for i in new_ids]

    def _import_one(self, db: sqlite3.Connection, item: Any, where: str) -> str:
        if not isinstance(item, dict) or not isinstance(item.get("messages", []), list):
            raise StoreError(f"{where}: expected an object with a list of messages")
        messages = list(item.get("messages", []))
        system = _text(item.get("system_prompt", ""), f"{where}.system_prompt")
        if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
            system = _text(messages.pop(0).get("content"), f"{where}.messages[0].content")
        settings = item.get("settings", {})
        if not isinstance(settings, dict):
            raise StoreError(f"{where}.settings: expected an object")
        first_user = next((m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"
                           and isinstance(m.get("content"), str) and m["content"].strip()), None)
        title = _text(item.get("title") or (title_from(first_user) if first_user else DEFAULT_TITLE), f"{where}.title")
        cid, t = new_id(), time.time()
        created = _number(item.get("created_at", t), f"{where}.created_at")
        updated = _number(item.get("updated_at", t), f"{where}.updated_at")
        db.execute("INSERT INTO conversations (id, title, system_prompt, settings, created_at, updated_at) "
                   "VALUES (?, ?, ?, ?, ?, ?)", (cid, title, system, json.dumps(settings), created, updated))
        mapped: dict[str, str] = {}  # old id -> new id
        previous = None
        for k, m in enumerate(messages):
            at = f"{where}.messages[{k}]"
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise StoreError(f"{at}: expected {{\"role\": user|assistant, \"content\": text}}")
            content = _text(m.get("content"), f"{at}.content")
            status = m.get("status", "complete")
            if status not in STATUSES:
                raise StoreError(f"{at}.status: must be one of {', '.join(STATUSES)}")
            if "parent_id" in m:
                old_parent = m["parent_id"]
                if old_parent is not None and old_parent not in mapped:
                    raise StoreError(f"{at}.parent_id: '{old_parent}' is not an earlier message of this conversation")
                parent = mapped.get(old_parent)
            else:
                parent = previous
            mid = new_id()
            if "id" in m:
                mapped[str(m["id"])] = mid
            logprobs = m.get("logprobs")
            db.execute("INSERT INTO messages (id, conversation_id, parent_id, role, content, status, created_at, "
                       "logprobs, finish_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (mid, cid, parent, m["role"], content, status,
                        _number(m.get("created_at", created + k * 1e-3), f"{at}.created_at"),
                        None if logprobs is None else json.dumps(logprobs), m.get("finish_reason")))
            previous = mid
        leaf = mapped.get(item.get("current_leaf"), previous) if item.get("current_leaf") else previous
        db.execute("UPDATE conversations SET current_leaf = ? WHERE id = ?", (leaf, cid))
        return cid

    # -- helpers --------------------------------------------------------------------------------------

    def _must_exist(self, db: sqlite3.Connection, conversation_id: str) -> sqlite3.Row:
        row = db.execute("SELECT * FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        if row is None:
            raise NotFound(f"No conversation with id '{conversation_id}'.")
        return row

    def _message_in(self, db: sqlite3.Connection, conversation_id: str, message_id: str) -> sqlite3.Row:
        row = db.execute("SELECT * FROM messages WHERE id = ? AND conversation_id = ?",
                         (message_id, conversation_id)).fetchone()
        if row is None:
            raise NotFound(f"No message with id '{message_id}' in this conversation.")
        return row


def title_from(text: str, limit: int = 60) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def _conversation(row: sqlite3.Row) -> dict:
    d = dict(row)
    d["settings"] = json.loads(d["settings"])
    return d


def _message(row: sqlite3.Row) -> dict:
    d = dict(row)
    d["logprobs"] = None if d.get("logprobs") is None else json.loads(d["logprobs"])
    return d


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise StoreError(f"{where}: expected text")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise StoreError(f"{where}: expected a number")
    return float(value)
