"""The indexer's Prometheus metrics.

The hot paths count into plain ints (:class:`IndexStats`); a collector turns them into metrics
when /metrics is scraped, so applying a block costs no metric call. Lookup latency is a real
histogram (one observation per lookup).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from infermesh.libs.kvindex import StreamTracker

LOOKUP_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05,
)


class _StatsCollector(Collector):
    def __init__(self, tracker: StreamTracker) -> None:
        self.tracker = tracker

    def collect(self) -> Iterator[Metric]:
        t = self.tracker
        st = t.stats
        idx = t.index

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        ev = CounterMetricFamily("infermesh_indexer_events", "KV events applied, per type",
                                 labels=["type"])
        for k, v in st.events.items():
            ev.add_metric([k], v)
        yield ev
        yield counter("infermesh_indexer_blocks_stored", "Blocks in BlockStored events applied",
                      st.blocks_stored)
        yield counter("infermesh_indexer_blocks_removed", "Blocks in BlockRemoved events applied",
                      st.blocks_removed)
        yield counter("infermesh_indexer_batches", "KVEventBatch messages received", st.batches)
        yield counter("infermesh_indexer_stale_batches",
                      "Batches already applied or in the snapshot applied (seq not above the "
                      "last one): copies and late arrivals", st.stale_batches)
        bad = CounterMetricFamily("infermesh_indexer_bad_messages",
                                  "Malformed messages dropped, per stream (kv, pod)",
                                  labels=["stream"])
        for k, v in st.bad_messages.items():
            bad.add_metric([k], v)
        yield bad
        gaps = CounterMetricFamily(
            "infermesh_indexer_gaps",
            "Times a pod's view was found incomplete, per reason (seq, epoch, unknown_pod, "
            "heartbeat, unkeyable, model)", labels=["reason"])
        for k, v in st.gaps.items():
            gaps.add_metric([k], v)
        yield gaps
        yield counter("infermesh_indexer_unkeyable_blocks",
                      "Stored blocks whose parent or tokens were unknown", st.unkeyable)
        yield counter("infermesh_indexer_snapshots_requested", "Snapshot requests sent",
                      st.snapshots_requested)
        yield counter("infermesh_indexer_snapshots_failed",
                      "Snapshot requests that failed (timeout, no agent, bad parts)",
                      st.snapshots_failed)
        yield counter("infermesh_indexer_snapshots_applied", "Snapshots applied",
                      st.snapshots_applied)
        yield counter("infermesh_indexer_buffer_overflows",
                      "Buffered batches dropped while a snapshot was in flight",
                      st.buffer_overflows)
        yield counter("infermesh_indexer_evictions",
                      "(key, pod) entries evicted by the max_blocks cap", st.evictions)
        yield counter("infermesh_indexer_pods_dropped", "Pods dropped for a stopped heartbeat",
                      st.pods_dropped)
        yield counter("infermesh_indexer_lookups", "Lookups answered", st.lookups)
        yield counter("infermesh_indexer_lookup_reads",
                      "Block keys read by lookups (few per pod whose chains have no holes)",
                      st.lookup_reads)
        storage = CounterMetricFamily(
            "infermesh_indexer_storage_blocks",
            "Shared-storage blocks taken into a pool's holder (stored), removed by an engine's "
            "event (removed) or aged out by storage_ttl_s / storage_max_blocks (expired)",
            labels=["outcome"])
        storage.add_metric(["stored"], st.storage_stored)
        storage.add_metric(["removed"], st.storage_removed)
        storage.add_metric(["expired"], st.storage_expired)
        yield storage
        held = GaugeMetricFamily("infermesh_indexer_pool_storage_blocks",
                                 "Shared-storage blocks the index holds per pool",
                                 labels=["pool"])
        for pool in idx.storage_pools():
            held.add_metric([pool], idx.storage_blocks(pool))
        yield held
        yield gauge("infermesh_indexer_pods", "Pods known", len(t.streams))
        yield gauge("infermesh_indexer_pods_syncing", "Pods waiting for a snapshot",
                    sum(1 for s in t.streams.values() if s.syncing))
        yield gauge("infermesh_indexer_keys", "Distinct block keys held", len(idx))
        yield gauge("infermesh_indexer_entries", "(key, pod) entries held (capped by max_blocks)",
                    idx.entries)


class IndexerMetrics:
    """Every metric of one indexer, in its own registry."""

    def __init__(self, tracker: StreamTracker) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StatsCollector(tracker))
        self.lookup_seconds = Histogram(
            "infermesh_indexer_lookup_seconds",
            "Time to compute one lookup's answer in the index (decoding and reply excluded)",
            buckets=LOOKUP_BUCKETS,
            registry=self.registry,
        )
