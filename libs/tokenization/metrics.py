"""Tokenizing metrics (the tokenizer service's, and an ingress that tokenizes itself): counters,
and the caches' (read at scrape time)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from .prompts import PromptTokenizer


class CacheCollector:
    """Exports the caches' counters and sizes at scrape time (nothing on the request path)."""

    def __init__(self, service: PromptTokenizer) -> None:
        self._svc = service

    def collect(self) -> Iterator[Metric]:
        """Prometheus collector protocol."""
        caches = {"prompt": self._svc.prompt_cache, "chunk": self._svc.chunk_cache,
                  "keys": self._svc.key_cache}
        fams = {
            "hits": CounterMetricFamily(
                "infermesh_tokenizer_cache_hits", "Cache lookups that found an entry",
                labels=["cache"]),
            "misses": CounterMetricFamily(
                "infermesh_tokenizer_cache_misses", "Cache lookups that found nothing",
                labels=["cache"]),
            "evictions": CounterMetricFamily(
                "infermesh_tokenizer_cache_evictions", "Entries evicted to stay within bounds",
                labels=["cache"]),
        }
        size = GaugeMetricFamily("infermesh_tokenizer_cache_bytes",
                                 "Memory held by a cache (estimate)", labels=["cache"])
        count = GaugeMetricFamily("infermesh_tokenizer_cache_entries", "Entries in a cache",
                                  labels=["cache"])
        for name, c in caches.items():
            fams["hits"].add_metric([name], c.hits)
            fams["misses"].add_metric([name], c.misses)
            fams["evictions"].add_metric([name], c.evictions)
            size.add_metric([name], c.bytes)
            count.add_metric([name], len(c))
        # Long texts skip the prompt cache: the last one per first chunk is recalled instead
        # (hits: found whole; misses: no recent long text began with the same chunk).
        toks = self._svc.tokenizers.values()
        fams["hits"].add_metric(["recall"], sum(t.recall_hits for t in toks))
        fams["misses"].add_metric(["recall"], sum(t.recall_misses for t in toks))
        encoded = CounterMetricFamily(
            "infermesh_tokenizer_encoded_chars",
            "Characters run through the HF tokenizer (cache misses)", labels=["model"])
        recalled = CounterMetricFamily(
            "infermesh_tokenizer_recalled_chars",
            "Characters of long texts found already cut into chunks, in the last long text "
            "that began like them", labels=["model"])
        for model, tok in self._svc.tokenizers.items():
            encoded.add_metric([model], tok.encoded_chars)
            recalled.add_metric([model], tok.recalled_chars)
        yield from (*fams.values(), size, count, encoded, recalled)


class TokenizerMetrics:
    """The service's own metrics, next to the bus service's per-endpoint ones."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "infermesh_tokenizer_requests", "Tokenize requests by model and input kind",
            ["model", "kind"], registry=r,
        )
        self.errors = Counter(
            "infermesh_tokenizer_errors", "Requests answered with an error, by code",
            ["code"], registry=r,
        )
        self.latency = Histogram(
            "infermesh_tokenizer_seconds",
            "Time to render, tokenize and key one request, by input kind",
            ["kind"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.tokens = Counter(
            "infermesh_tokenizer_tokens", "Prompt tokens answered", ["model"], registry=r
        )
        self.partial = Counter(
            "infermesh_tokenizer_partial_replies",
            "Replies with the block keys of the known prefix only (the rest never seen), "
            "by model", ["model"], registry=r,
        )
        self.background = Counter(
            "infermesh_tokenizer_background_jobs",
            "Tokenizations after an early reply, by outcome: started, joined (the same text "
            "already in the background), inlined (too many running: tokenized before the "
            "reply), failed", ["outcome"], registry=r,
        )
        self.background_running = Gauge(
            "infermesh_tokenizer_background_running", "Background tokenizations now running",
            registry=r,
        )
