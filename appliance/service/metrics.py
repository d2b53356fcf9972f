"""Prometheus metrics, in a registry owned by the app (no module-level collectors)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the route)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("bankllm_requests", "HTTP requests by route and status.", ["route", "status"],
                                registry=r)
        self.latency = Histogram("bankllm_request_latency_seconds", "Request latency by route.", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("bankllm_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.completion_tokens = Counter("bankllm_completion_tokens", "Tokens generated.", registry=r)
        self.tokens_per_second = Gauge("bankllm_tokens_per_second", "Recent decode throughput (all sequences).",
                                       registry=r)
        self.prompt_tokens_cached = Gauge("bankllm_prompt_tokens_cached", "Prompt tokens whose KV a slot already "
                                          "held (not prefilled again), since start.", registry=r)
        self.slot_moves = Gauge("bankllm_kv_slot_moves", "Running sequences moved down into a free slot to keep "
                                "running slots contiguous, since start.", registry=r)
        self.lanes = Gauge("bankllm_decode_lanes", "llama.cpp contexts decoding (a second one is made when two "
                           "adapter groups run at once; see decode_lanes).", registry=r)
        self.queue_depth = Gauge("bankllm_queue_depth", "Requests waiting for a slot.", registry=r)
        self.active = Gauge("bankllm_active_sequences", "Sequences being decoded.", registry=r)

    def bind_engine(self, engine) -> None:
        """Read the engine's gauges at scrape time (the engine starts after the metrics exist)."""
        self.queue_depth.set_function(lambda: engine.queue_depth)
        self.active.set_function(lambda: engine.active)
        self.tokens_per_second.set_function(lambda: engine.tokens_per_second)
        self.prompt_tokens_cached.set_function(lambda: engine.prompt_cached_total)
        self.slot_moves.set_function(lambda: engine.slot_moves)
        self.lanes.set_function(lambda: engine.n_lanes)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
