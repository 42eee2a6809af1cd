"""An OpenAI-compatible HTTP server: `create_app(lm)` gives a FastAPI app; `gptchat serve` runs it.

    app.py         the routes: /v1/chat/completions, /v1/completions, /v1/models, /tokenize, /health
    protocol.py    request bodies (pydantic) and the OpenAI response and chunk shapes
    scheduler.py   continuous batching: one thread runs the model for every request (app.state.generator)
    metrics.py     GET /metrics in the Prometheus text format
    limits.py      the request body size limit (413)
    errors.py      every failure as an OpenAI error object {"error": {message, type, param, code}}
    auth.py        the bearer API key
    store.py       conversations on disk: SQLite (WAL), message trees, schema migrations
    conversations.py  the web chat's /api: conversations, and replies streamed into them
    static/        the web chat page at / (HTML, CSS, JS; no build step)
"""

from .app import create_app

__all__ = ["create_app"]
