"""GET /metrics in the Prometheus text format (version 0.0.4), written by hand: it is a few lines.

    gptchat_requests_total{endpoint, status}     HTTP requests answered, by route and status code
    gptchat_prompt_tokens_total                  prompt tokens of the sequences generated
    gptchat_completion_tokens_total              tokens sampled (also for replies stopped early)
    gptchat_time_to_first_token_seconds          histogram: request queued -> first token sampled
    gptchat_inter_token_latency_seconds          histogram: between two tokens of one sequence
    gptchat_queue_depth                          sequences waiting for a place in the batch
    gptchat_running_requests                     sequences in the running batch (prefilling included)

The scheduler thread records, the event loop renders: one lock keeps them apart.
"""

from __future__ import annotations

import bisect
import threading
from typing import Callable

from starlette.routing import Match

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


def _labels(pairs) -> str:
    if not pairs:
        return ""
    escaped = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in pairs)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(pairs, escaped)) + "}"


def _number(x: float) -> str:
    return "+Inf" if x == float("inf") else repr(float(x)) if isinstance(x, float) else str(x)


class Histogram:
    def __init__(self, buckets):
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            total += count
            out.append(f'{name}_bucket{{le="{_number(float(bound))}"}} {total}')
        return out + [f"{name}_sum {self.sum!r}", f"{name}_count {total}"]


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}  # name -> (help, read at scrape time)

    def count_request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[endpoint, status] = self.requests.get((endpoint, status), 0) + 1

    def first_token(self, seconds: float) -> None:
        with self.lock:
            self.ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        with self.lock:
            self.itl.observe(seconds)

    def sequence_done(self, prompt_tokens: int, completion_tokens: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help, read)

    def render(self) -> str:
        lines: list[str] = []

        def family(name, kind, help):
            lines.extend((f"# HELP {name} {help}", f"# TYPE {name} {kind}"))

        with self.lock:
            family("gptchat_requests_total", "counter", "HTTP requests answered, by endpoint and status code.")
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f"gptchat_requests_total{_labels([('endpoint', endpoint), ('status', status)])} {n}")
            family("gptchat_prompt_tokens_total", "counter", "Prompt tokens of the sequences generated.")
            lines.append(f"gptchat_prompt_tokens_total {self.prompt_tokens}")
            family("gptchat_completion_tokens_total", "counter", "Tokens sampled.")
            lines.append(f"gptchat_completion_tokens_total {self.completion_tokens}")
            family("gptchat_time_to_first_token_seconds", "histogram", "From queued to the first token sampled.")
            lines += self.ttft.lines("gptchat_time_to_first_token_seconds")
            family("gptchat_inter_token_latency_seconds", "histogram", "Between two tokens of one sequence.")
            lines += self.itl.lines("gptchat_inter_token_latency_seconds")
        for name, (help, read) in self.gauges.items():
            family(name, "gauge", help)
            lines.append(f"{name} {read()}")
        return "\n".join(lines) + "\n"


class RequestCounter:
    """ASGI middleware: count each HTTP response by route (its path template) and status code."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = self._endpoint(scope)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.count_request(endpoint, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)

    def _endpoint(self, scope) -> str:
        """The matching route's path ("/v1/models/{model}"), so labels stay few whatever clients ask for."""
        for route in scope["app"].routes if "app" in scope else ():
            if route.matches(scope)[0] == Match.FULL:
                return getattr(route, "path", "other")
        return "other"
