"""Per-engine Prometheus metrics with vLLM 0.32's exact family names, labels and buckets.

Every simulated engine owns one :class:`EngineMetrics` and therefore one
``CollectorRegistry``: many engines share a process, but each serves its own
``/metrics`` page, exactly as one vLLM server would. Family names carry vLLM's
``vllm:`` prefix; prometheus_client accepts colons in metric names (only label
names must avoid them), so no renaming is needed.

The reference is ``vllm/v1/metrics/loggers.py`` (``PrometheusStatLogger``) and
``vllm/v1/metrics/buckets.py`` of vLLM 0.32; ``docs/vllm-interfaces.md`` has the table.
Only the families vLLM registers in a default text-generation deployment are
created here (plus ``vllm:lora_requests_info`` when LoRA is on, and the NIXL
connector's families with ``kv_connector``); families that vLLM gates behind
speculative decoding, other KV connectors, watermarking, NaN checks or
``--kv-cache-metrics`` are left out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import choose_encoder

__all__ = [
    "ADMISSION_REASONS",
    "CACHE_HIT_SOURCES",
    "DEFAULT_MAX_MODEL_LEN",
    "FINISH_REASONS",
    "INTER_TOKEN_LATENCY_BUCKETS",
    "ITERATION_TOKENS_BUCKETS",
    "KV_FETCH_STAGES",
    "NIXL_BYTES_BUCKETS",
    "NIXL_DESCRIPTORS_BUCKETS",
    "NIXL_POST_TIME_BUCKETS",
    "NIXL_XFER_TIME_BUCKETS",
    "PROMPT_TOKEN_SOURCES",
    "REQUEST_LATENCY_BUCKETS",
    "REQUEST_NUM_PREEMPTIONS_BUCKETS",
    "REQUEST_PARAMS_N_BUCKETS",
    "TIME_TO_FIRST_TOKEN_BUCKETS",
    "EngineMetrics",
    "build_1_2_5_buckets",
    "vllm_cache_config_labels",
]

# Bucket boundaries, one list per vLLM histogram family (vllm/v1/metrics/buckets.py).
TIME_TO_FIRST_TOKEN_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
INTER_TOKEN_LATENCY_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS: tuple[float, ...] = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
    30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
ITERATION_TOKENS_BUCKETS: tuple[float, ...] = (
    1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
)  # fmt: skip
REQUEST_PARAMS_N_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 20)
# The NIXL connector's (vllm/distributed/kv_transfer/kv_connector/v1/nixl/stats.py).
NIXL_POST_TIME_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0,
)  # fmt: skip
NIXL_XFER_TIME_BUCKETS: tuple[float, ...] = NIXL_POST_TIME_BUCKETS[1:]
NIXL_BYTES_BUCKETS: tuple[float, ...] = tuple(float(2 ** (10 + i)) for i in range(1, 25, 2))
NIXL_DESCRIPTORS_BUCKETS: tuple[float, ...] = (
    10, 20, 30, 50, 75, 100, 200, 400, 1000, 2000, 4000, 10000, 20000, 50000,
)  # fmt: skip
#: ``stage`` label values of ``vllm:num_requests_kv_fetch_by_stage`` (vllm/v1/metrics/stats.py).
KV_FETCH_STAGES: tuple[str, ...] = ("waiting_to_start", "in_progress", "completed_waiting")
REQUEST_NUM_PREEMPTIONS_BUCKETS: tuple[float, ...] = (1, 2, 3, 4, 5, 10, 20)

#: ``finished_reason`` label values, in vLLM's FinishReason order.
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "abort", "error", "repetition")
#: ``source`` label values of ``vllm:prompt_tokens_by_source``.
PROMPT_TOKEN_SOURCES: tuple[str, ...] = ("local_compute", "local_cache_hit", "external_kv_transfer")
#: ``source`` label values of ``vllm:prompt_tokens_cached_by_source`` (vLLM's CacheHitSource).
CACHE_HIT_SOURCES: tuple[str, ...] = ("device", "host", "p2p", "disk", "external_unspecified")
#: ``reason`` label values of ``vllm:admission_rejections``.
ADMISSION_REASONS: tuple[str, ...] = ("max_num_queued_reqs", "max_num_queued_tokens")

DEFAULT_MAX_MODEL_LEN = 2048

# vLLM keeps every label combination of the LoRA info gauge it ever set; a
# long-running simulator with churning adapters would grow without bound, so
# the oldest combinations are dropped past this many.
_MAX_LORA_INFO_SERIES = 256

_LABELS = ("model_name", "engine")


def build_1_2_5_buckets(max_value: int) -> list[float]:
    """Return 1, 2, 5, 10, 20, 50, ... up to and including ``max_value`` (vLLM's token buckets)."""
    buckets: list[float] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * scale
            if value > max_value:
                return buckets
            buckets.append(value)
        scale *= 10


def vllm_cache_config_labels(
    *,
    block_size: int,
    num_gpu_blocks: int,
    max_model_len: int = DEFAULT_MAX_MODEL_LEN,
    num_cpu_blocks: int | None = None,
    enable_prefix_caching: bool = True,
    gpu_memory_utilization: float = 0.92,
    cache_dtype: str = "auto",
    prefix_caching_hash_algo: str = "sha256",
    num_gpu_blocks_override: int | None = None,
    kv_cache_memory_bytes: int | None = None,
    sliding_window: int | None = None,
    kv_offloading_size: float | None = None,
    kv_offloading_backend: str = "native",
) -> dict[str, str]:
    """Labels of ``vllm:cache_config_info`` as a vLLM 0.32 server prints them for a dense model.

    vLLM stringifies every attribute of its ``CacheConfig`` with ``str()``, so
    ``None`` becomes ``"None"``, booleans ``"True"``/``"False"`` and floats keep
    their ``.0``. The keys are the 0.32 attribute set, in vLLM's order, with the
    values a started server reports (checked against a live ``vllm serve`` of a
    Llama-style model); pass the result as the ``cache_config`` argument of
    :class:`EngineMetrics`, which adds ``engine``.
    """
    size_tokens = num_gpu_blocks * block_size
    values: dict[str, object] = {
        "block_size": block_size,
        "user_specified_block_size": True,
        "kv_cache_layout": None,
        "prefix_match_unit": None,
        "gpu_memory_utilization": gpu_memory_utilization,
        "cache_dtype": cache_dtype,
        "is_attention_free": False,
        "num_gpu_blocks_override": num_gpu_blocks_override,
        "sliding_window": sliding_window,
        "enable_prefix_caching": enable_prefix_caching,
        "prefix_caching_hash_algo": prefix_caching_hash_algo,
        "prefix_cache_retention_interval": 0,
        "kv_cache_dtype_skip_layers": [],
        "mamba_page_size_padded": None,
        "skip_page_size_padded": None,
        "mamba_block_size": None,
        "mamba_cache_dtype": "auto",
        "mamba_ssm_cache_dtype": "float32",
        "mamba_cache_mode": "none",
        "enable_mamba_shared_prefix_checkpoint": False,
        "replayssm_buffer_len": 16,
        "use_replayssm": False,
        "use_kda_recoverssm": False,
        "num_gpu_blocks": num_gpu_blocks,
        "num_cpu_blocks": num_cpu_blocks,
        "effective_attention_block_size": block_size,
        "kv_cache_size_tokens": size_tokens,
        "kv_cache_max_concurrency": size_tokens / max_model_len if max_model_len > 0 else None,
        "hash_block_size": None,
        "cache_hit_alignment_tokens": None,
        "kv_sharing_fast_prefill": False,
        "swa_bounded_replay": True,
        "kv_cache_memory_bytes": kv_cache_memory_bytes,
        "kv_offloading_size": kv_offloading_size,
        "kv_offloading_backend": kv_offloading_backend,
        "_block_size_resolved": True,
    }
    return {key: str(value) for key, value in values.items()}


class EngineMetrics:
    """The ``vllm:*`` metric families of one simulated engine, in a registry of its own.

    Every series is labelled ``model_name`` (the served model name) and
    ``engine`` (the engine index as a string), as in vLLM. Children are bound
    once at construction so the per-token calls stay cheap.
    """

    def __init__(
        self,
        model_name: str,
        engine_index: int,
        cache_config: Mapping[str, str],
        *,
        max_model_len: int = DEFAULT_MAX_MODEL_LEN,
        enable_lora: bool = False,
        process_metrics: bool = False,
        kv_connector: bool = False,
        storage_tier: bool = False,
    ) -> None:
        """Register all families.

        ``max_model_len`` caps the token-count buckets as in vLLM. With ``kv_connector``
        the registry also carries what vLLM registers with the NIXL connector as
        ``kv_both``: ``vllm:num_requests_kv_fetch_by_stage`` and the ``vllm:nixl_*``
        families. With ``storage_tier`` it carries the families of vLLM's offloading connector
        with a tiering spec (``vllm:kv_offload_tiering_*``, labelled by ``tier``). With
        ``process_metrics`` the registry also carries prometheus_client's
        ``process_*``, ``python_gc_*`` and ``python_info`` families, which a real
        server exposes from its default registry (they describe the shared
        simulator process, not one engine).
        """
        self.model_name = model_name
        self.engine_index = engine_index
        self._values = (model_name, str(engine_index))
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        values = (model_name, str(engine_index))

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(
                name, doc, (*_LABELS, *extra), registry=reg, multiprocess_mode="mostrecent"
            )

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, (*_LABELS, *extra), registry=reg)

        def histogram(name: str, doc: str, buckets: Iterable[float]) -> Histogram:
            return Histogram(name, doc, _LABELS, buckets=list(buckets), registry=reg)

        if process_metrics:
            GCCollector(registry=reg)
            PlatformCollector(registry=reg)
            ProcessCollector(registry=reg)

        # The NIXL connector's families (vLLM registers them before the MFU estimates).
        self._nixl: _NixlFamilies | None = None
        if kv_connector:
            self._nixl = _NixlFamilies(reg, values)
        self._tiering: _TieringFamilies | None = None
        if storage_tier:
            self._tiering = _TieringFamilies(reg, values)

        # Model-FLOPs-utilisation estimates. vLLM registers them first, always, but only
        # advances them with --enable-mfu-metrics, which the simulator does not model: 0.
        for kind, what in (
            ("flops", "floating point operations"),
            ("read_bytes", "bytes read from memory"),
            ("write_bytes", "bytes written to memory"),
        ):
            counter(
                f"vllm:estimated_{kind}_per_gpu",
                f"Estimated number of {what} per GPU (for Model Flops Utilization calculations).",
            ).labels(*values)

        # Scheduler state.
        self._running = gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches."
        ).labels(*values)
        self._waiting = gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed."
        ).labels(*values)
        waiting_by_reason = gauge(
            "vllm:num_requests_waiting_by_reason",
            "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for "
            "scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, "
            "KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.",
            ("reason",),
        )
        self._waiting_capacity = waiting_by_reason.labels(*values, "capacity")
        self._waiting_deferred = waiting_by_reason.labels(*values, "deferred")
        self._kv_fetch: dict[str, Gauge] = {}
        if kv_connector:  # vLLM: only for a kv_consumer (or kv_both) engine
            by_stage = gauge(
                "vllm:num_requests_kv_fetch_by_stage",
                "Number of waiting requests by async KV load stage. Stage labels: "
                "'waiting_to_start' = needs an async KV load that has not started; "
                "'in_progress' = load started and not yet reported finished; "
                "'completed_waiting' = load finished, request not running yet.",
                ("stage",),
            )
            self._kv_fetch = {s: by_stage.labels(*values, s) for s in KV_FETCH_STAGES}
        sleep_state = gauge(
            "vllm:engine_sleep_state",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is "
            "awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep "
            "level 2.",
            ("sleep_state",),
        )
        self._sleep = {
            s: sleep_state.labels(*values, s) for s in ("awake", "weights_offloaded", "discard_all")
        }
        self.set_sleep_state(sleeping=False)
        self._kv_usage = gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."
        ).labels(*values)

        # Prefix caches.
        self._prefix_queries = counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
        ).labels(*values)
        self._prefix_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        ).labels(*values)
        self._external_queries = counter(
            "vllm:external_prefix_cache_queries",
            "External prefix cache queries from KV connector cross-instance cache sharing, in "
            "terms of number of queried tokens.",
        ).labels(*values)
        self._external_hits = counter(
            "vllm:external_prefix_cache_hits",
            "External prefix cache hits from KV connector cross-instance cache sharing, in "
            "terms of number of cached tokens.",
        ).labels(*values)
        counter(
            "vllm:mm_cache_queries",
            "Multi-modal cache queries, in terms of number of queried items.",
        ).labels(*values)
        counter(
            "vllm:mm_cache_hits", "Multi-modal cache hits, in terms of number of cached items."
        ).labels(*values)

        # Token and request counters. The simulator reserves a request's output blocks when
        # it admits it, so it never runs out of KV mid-generation and never preempts (vLLM
        # would): the preemption counter stays 0.
        counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.").labels(
            *values
        )
        self._prompt_tokens = counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed."
        ).labels(*values)
        by_source = counter(
            "vllm:prompt_tokens_by_source", "Number of prompt tokens by source.", ("source",)
        )
        self._prompt_by_source = {s: by_source.labels(*values, s) for s in PROMPT_TOKEN_SOURCES}
        self._prompt_cached = counter(
            "vllm:prompt_tokens_cached", "Number of cached prompt tokens (local + external)."
        ).labels(*values)
        cached_by_source = counter(
            "vllm:prompt_tokens_cached_by_source",
            "Prefix-cache hit tokens by the cache tier that supplied them: device (local HBM), "
            "host (offloaded to DRAM), disk, p2p (transferred from another vLLM instance) or "
            "external_unspecified. Counted at admission; sums to vllm:prefix_cache_hits + "
            "vllm:external_prefix_cache_hits.",
            ("source",),
        )
        self._cached_by_source = {s: cached_by_source.labels(*values, s) for s in CACHE_HIT_SOURCES}
        self._generation_tokens = counter(
            "vllm:generation_tokens", "Number of generation tokens processed."
        ).labels(*values)
        success = counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            ("finished_reason",),
        )
        self._success = {r: success.labels(*values, r) for r in FINISH_REASONS}
        # vLLM counts requests refused by --max-num-queued-reqs/-tokens; the simulator has no
        # such limit (nor has vLLM by default), so these stay 0.
        admission = Counter(
            "vllm:admission_rejections",
            "Number of admission attempts rejected by a queue limit, by reason.",
            ("model_name", "reason"),
            registry=reg,
        )
        for reason in ADMISSION_REASONS:
            admission.labels(model_name, reason)

        # Histograms of counts.
        token_buckets = build_1_2_5_buckets(max_model_len)
        self._req_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", token_buckets
        ).labels(*values)
        self._req_generation_tokens = histogram(
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            token_buckets,
        ).labels(*values)
        self._iteration_tokens = histogram(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            ITERATION_TOKENS_BUCKETS,
        ).labels(*values)
        self._req_max_gen_tokens = histogram(
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.",
            token_buckets,
        ).labels(*values)
        self._req_n = histogram(
            "vllm:request_params_n",
            "Histogram of the n request parameter.",
            REQUEST_PARAMS_N_BUCKETS,
        ).labels(*values)
        self._req_max_tokens = histogram(
            "vllm:request_params_max_tokens",
            "Histogram of the max_tokens request parameter.",
            token_buckets,
        ).labels(*values)

        # Histograms of timing intervals.
        self._ttft = histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TIME_TO_FIRST_TOKEN_BUCKETS,
        ).labels(*values)
        self._itl = histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            INTER_TOKEN_LATENCY_BUCKETS,
        ).labels(*values)
        self._tpot = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            INTER_TOKEN_LATENCY_BUCKETS,
        ).labels(*values)
        self._e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        ).labels(*values)
        self._queue = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        ).labels(*values)
        self._inference = histogram(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        ).labels(*values)
        self._prefill = histogram(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            REQUEST_LATENCY_BUCKETS,
        ).labels(*values)
        self._decode = histogram(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            REQUEST_LATENCY_BUCKETS,
        ).labels(*values)
        self._req_preemptions = histogram(
            "vllm:request_num_preemptions",
            "Histogram of the number of times a request was preempted.",
            REQUEST_NUM_PREEMPTIONS_BUCKETS,
        ).labels(*values)
        self._req_prefill_computed = histogram(
            "vllm:request_prefill_kv_computed_tokens",
            "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
            token_buckets,
        ).labels(*values)

        # LoRA: vLLM registers the family only when LoRA is configured.
        self._lora_info: Gauge | None = None
        self._lora_series: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        if enable_lora:
            self._ensure_lora_gauge()

        # Cache config: an info metric emulated by a gauge fixed at 1.
        info = dict(cache_config)
        info["engine"] = str(engine_index)
        Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            tuple(info),
            registry=reg,
            multiprocess_mode="mostrecent",
        ).labels(**info).set(1)

    # -- scheduler state -------------------------------------------------------------------

    def set_queue(self, running: int, waiting: int, *, deferred: int = 0) -> None:
        """Set the running and waiting request gauges.

        ``deferred`` counts waiting requests held back by transient limits (LoRA
        slots, KV transfer); vLLM reports waiting = capacity-waiting + deferred.
        """
        self._running.set(running)
        self._waiting.set(waiting + deferred)
        self._waiting_capacity.set(waiting)
        self._waiting_deferred.set(deferred)

    def set_kv_fetch(self, waiting_to_start: int, in_progress: int,
                     completed_waiting: int = 0) -> None:
        """Set ``vllm:num_requests_kv_fetch_by_stage`` (a no-op without a connector)."""
        if self._kv_fetch:
            self._kv_fetch["waiting_to_start"].set(waiting_to_start)
            self._kv_fetch["in_progress"].set(in_progress)
            self._kv_fetch["completed_waiting"].set(completed_waiting)

    def set_kv_usage(self, frac: float) -> None:
        """Set ``vllm:kv_cache_usage_perc`` (a fraction: 1.0 means full)."""
        self._kv_usage.set(frac)

    def set_sleep_state(self, *, sleeping: bool, level: int = 1) -> None:
        """Set ``vllm:engine_sleep_state`` the way vLLM maps sleep level 1 and 2."""
        self._sleep["awake"].set(0 if sleeping else 1)
        self._sleep["weights_offloaded"].set(1 if sleeping and level == 1 else 0)
        self._sleep["discard_all"].set(1 if sleeping and level == 2 else 0)

    # -- per-step and per-token events -----------------------------------------------------

    def on_prefix_query(
        self,
        queried_tokens: int,
        hit_tokens: int,
        *,
        external_queried_tokens: int = 0,
        external_hit_tokens: int = 0,
        external_source: str = "host",
    ) -> None:
        """Count one prefix-cache lookup, in tokens.

        Local (GPU) hits count under ``vllm:prefix_cache_*`` and source ``device``;
        hits served by an offload tier (CPU, shared storage) count under
        ``vllm:external_prefix_cache_*`` and ``external_source``, as vLLM's KV
        connectors report them.
        """
        self._prefix_queries.inc(queried_tokens)
        self._prefix_hits.inc(hit_tokens)
        self._cached_by_source["device"].inc(hit_tokens)
        if external_queried_tokens or external_hit_tokens:
            self._external_queries.inc(external_queried_tokens)
            self._external_hits.inc(external_hit_tokens)
            source = (
                external_source
                if external_source in self._cached_by_source
                else "external_unspecified"
            )
            self._cached_by_source[source].inc(external_hit_tokens)

    def on_offload_query(self, queried_tokens: int, gpu_tokens: int, *, host_tokens: int,
                         disk_tokens: int) -> None:
        """Count one lookup of an engine with vLLM's offloading connector: GPU hits are local
        (``device``); the connector is asked about every token past them and answers with
        the CPU tier's (``host``) and the storage tier's (``disk``) blocks."""
        self.on_prefix_query(queried_tokens, gpu_tokens,
                             external_queried_tokens=queried_tokens - gpu_tokens,
                             external_hit_tokens=host_tokens, external_source="host")
        if disk_tokens:
            self._external_hits.inc(disk_tokens)
            self._cached_by_source["disk"].inc(disk_tokens)

    def on_tier_lookup(self, tier: str, queries: int, hits: int) -> None:
        """Count chunk lookups in an offload tier (``tier`` as vLLM labels it)."""
        if self._tiering is not None and queries:
            self._tiering.queries.labels(*self._values, tier).inc(queries)
            if hits:
                self._tiering.hits.labels(*self._values, tier).inc(hits)

    def on_storage_read(self, tier: str, nbytes: int, seconds: float) -> None:
        """A promotion from a secondary tier finished: its bytes and (modelled) time."""
        if self._tiering is not None:
            self._tiering.read_bytes.labels(*self._values, tier).inc(nbytes)
            self._tiering.read_time.labels(*self._values, tier).inc(seconds)

    def on_storage_write(self, tier: str, nbytes: int, seconds: float) -> None:
        """A cascade to a secondary tier finished: its bytes and (modelled) time."""
        if self._tiering is not None:
            self._tiering.write_bytes.labels(*self._values, tier).inc(nbytes)
            self._tiering.write_time.labels(*self._values, tier).inc(seconds)

    def on_storage_promotion_failed(self, tier: str) -> None:
        """A load from a secondary tier failed (a bad file): the block is recomputed."""
        if self._tiering is not None:
            self._tiering.promotion_failures.labels(*self._values, tier).inc()

    def on_storage_cascade_failed(self, tier: str) -> None:
        """A store to a secondary tier failed."""
        if self._tiering is not None:
            self._tiering.cascade_failures.labels(*self._values, tier).inc()

    def on_storage_store_dropped(self, tier: str, blocks: int) -> None:
        """A store was dropped because the tier is too far behind (back-pressure)."""
        if self._tiering is not None:
            self._tiering.stores_dropped.labels(*self._values, tier).inc()
            self._tiering.blocks_dropped.labels(*self._values, tier).inc(blocks)

    def on_connector_query(self, queried_tokens: int, hit_tokens: int) -> None:
        """Count one lookup by the KV connector (NIXL: hits are read from a prefill
        engine, source ``p2p``), as vLLM records it at admission."""
        if queried_tokens:
            self.on_prefix_query(0, 0, external_queried_tokens=queried_tokens,
                                 external_hit_tokens=hit_tokens, external_source="p2p")

    def on_kv_transfer(self, seconds: float, nbytes: int, descriptors: int) -> None:
        """Observe one successful NIXL read."""
        if self._nixl is not None:
            self._nixl.observe(seconds, nbytes, descriptors)

    def on_kv_transfer_failed(self) -> None:
        """Count a failed NIXL read (vLLM groups handshake failures in it)."""
        if self._nixl is not None:
            self._nixl.failed_transfers.inc()

    def on_kv_expired(self) -> None:
        """Count a prefill whose held blocks were freed when the lease ran out."""
        if self._nixl is not None:
            self._nixl.expired.inc()

    def on_kv_read_after_expiry(self) -> None:
        """Count a read of blocks whose lease had already run out."""
        if self._nixl is not None:
            self._nixl.after_expiry.inc()

    def on_step(self, scheduled_tokens: int) -> None:
        """Observe one engine step's computed tokens (prefill + decode)."""
        self._iteration_tokens.observe(scheduled_tokens)

    def on_first_token(self, ttft_s: float) -> None:
        """Observe a request's time to first token; the first token counts as generated."""
        self._ttft.observe(ttft_s)
        self._generation_tokens.inc()

    def on_token(self, itl_s: float) -> None:
        """Observe the gap before one later output token; the token counts as generated."""
        self._itl.observe(itl_s)
        self._generation_tokens.inc()

    def on_finished(
        self,
        reason: str,
        prompt_tokens: int,
        gen_tokens: int,
        e2e_s: float,
        queue_s: float,
        prefill_s: float,
        decode_s: float,
        *,
        cached_tokens: int = 0,
        external_cached_tokens: int = 0,
        max_tokens: int | None = None,
        n: int = 1,
        prefilled: bool = True,
        reported_cached_tokens: int | None = None,
    ) -> None:
        """Record a finished request (``reason`` is one of :data:`FINISH_REASONS`).

        Prompt-token counters are advanced here, once per request; vLLM
        advances them when prefill completes, so totals agree once requests end.
        A request that never got through prefill (``prefilled=False``, e.g. a failed
        KV load) advances none. ``reported_cached_tokens`` is what the request's usage
        reports as cached when that differs from local + external (a decode engine
        reports its prefill engine's hits).
        """
        try:
            success = self._success[reason]
        except KeyError:
            raise ValueError(
                f"unknown finish reason {reason!r}; expected one of {FINISH_REASONS}"
            ) from None
        success.inc()
        cached = max(cached_tokens, 0) + max(external_cached_tokens, 0)
        if prefilled:
            computed = max(prompt_tokens - cached, 0)
            self._prompt_tokens.inc(prompt_tokens)
            self._prompt_by_source["local_compute"].inc(computed)
            self._prompt_by_source["local_cache_hit"].inc(max(cached_tokens, 0))
            self._prompt_by_source["external_kv_transfer"].inc(
                max(external_cached_tokens, 0))
            self._prompt_cached.inc(cached)
        reported = cached if reported_cached_tokens is None else reported_cached_tokens

        self._e2e.observe(e2e_s)
        self._queue.observe(queue_s)
        self._prefill.observe(prefill_s)
        self._inference.observe(prefill_s + decode_s)
        self._decode.observe(decode_s)
        self._req_preemptions.observe(0)  # never preempted (see vllm:num_preemptions)
        self._req_prefill_computed.observe(prompt_tokens - max(reported, 0))
        self._req_prompt_tokens.observe(prompt_tokens)
        self._req_generation_tokens.observe(gen_tokens)
        # vLLM leaves the first token (produced by prefill) out of the mean.
        self._tpot.observe(decode_s / (gen_tokens - 1) if gen_tokens > 1 else 0.0)
        if max_tokens:
            self._req_max_tokens.observe(max_tokens)
        self._req_max_gen_tokens.observe(gen_tokens)
        self._req_n.observe(n)

    # -- LoRA ------------------------------------------------------------------------------

    def _ensure_lora_gauge(self) -> Gauge:
        if self._lora_info is None:
            self._lora_info = Gauge(
                "vllm:lora_requests_info",
                "Running stats on lora requests.",
                ("max_lora", "waiting_lora_adapters", "running_lora_adapters"),
                registry=self.registry,
                multiprocess_mode="sum",
            )
        return self._lora_info

    def set_lora_info(self, running: list[str], waiting: list[str], max_lora: int) -> None:
        """Stamp the current adapter sets on ``vllm:lora_requests_info``.

        Like vLLM, the series for the current (running, waiting) combination is
        set to the current Unix time and earlier combinations keep their old
        timestamps; readers take the series with the largest value.
        """
        gauge = self._ensure_lora_gauge()
        key = (str(max_lora), ",".join(waiting), ",".join(running))
        gauge.labels(*key).set_to_current_time()
        self._lora_series[key] = None
        self._lora_series.move_to_end(key)
        while len(self._lora_series) > _MAX_LORA_INFO_SERIES:
            old, _ = self._lora_series.popitem(last=False)
            gauge.remove(*old)

    # -- exposition ------------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4) of this engine's registry."""
        return generate_latest(self.registry)

    def render_for(self, accept: str | None) -> tuple[bytes, str]:
        """Exposition negotiated on an HTTP ``Accept`` header, with its content type.

        vLLM serves ``/metrics`` through prometheus_client's ASGI app, which
        switches to OpenMetrics when the scraper asks for it.
        """
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class _TieringFamilies:
    """The counters of vLLM's ``TieringOffloadingSpec`` the simulator feeds, labelled by
    ``tier`` (``vllm/v1/kv_offload/tiering/spec.py``, ``metrics.py``)."""

    def __init__(self, reg: CollectorRegistry, values: tuple[str, str]) -> None:
        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, (*_LABELS, "tier"), registry=reg)

        self.read_bytes = counter(
            "vllm:kv_offload_tiering_read_bytes",
            "Total bytes read from secondary tiers into the primary tier, labeled by tier.")
        self.read_time = counter(
            "vllm:kv_offload_tiering_read_time",
            "Total time spent reading from secondary tiers into the primary tier, in seconds, "
            "labeled by tier.")
        self.write_bytes = counter(
            "vllm:kv_offload_tiering_write_bytes",
            "Total bytes written from the primary tier to secondary tiers, labeled by tier.")
        self.write_time = counter(
            "vllm:kv_offload_tiering_write_time",
            "Total time spent writing from the primary tier to secondary tiers, in seconds, "
            "labeled by tier.")
        self.promotion_failures = counter(
            "vllm:kv_offload_tiering_promotion_job_failures",
            "Number of failed secondary-tier promotion jobs, labeled by tier.")
        self.cascade_failures = counter(
            "vllm:kv_offload_tiering_cascade_job_failures",
            "Number of failed secondary-tier cascade jobs, labeled by tier.")
        self.queries = counter(
            "vllm:kv_offload_tiering_chunk_queries",
            "Number of chunk lookup queries sent to a tier, labeled by tier.")
        self.hits = counter(
            "vllm:kv_offload_tiering_chunk_hits",
            "Number of chunk lookup hits in a tier, labeled by tier.")
        self.stores_dropped = counter(
            "vllm:kv_offload_tiering_backpressure_stores_dropped",
            "Number of store operations dropped due to back-pressure on a secondary tier.")
        self.blocks_dropped = counter(
            "vllm:kv_offload_tiering_backpressure_blocks_dropped",
            "Number of blocks dropped due to back-pressure on a secondary tier.")


class _NixlFamilies:
    """The ``vllm:nixl_*`` families of one engine (vLLM's ``NixlPromMetrics``)."""

    def __init__(self, reg: CollectorRegistry, values: tuple[str, str]) -> None:
        def histogram(name: str, doc: str, buckets: Iterable[float]) -> Histogram:
            return Histogram(name, doc, _LABELS, buckets=list(buckets), registry=reg)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, _LABELS, registry=reg)

        self.xfer_time = histogram(
            "vllm:nixl_xfer_time_seconds",
            "Histogram of transfer duration for NIXL KV Cache transfers.",
            NIXL_XFER_TIME_BUCKETS,
        ).labels(*values)
        self.post_time = histogram(
            "vllm:nixl_post_time_seconds",
            "Histogram of transfer post time for NIXL KV Cache transfers.",
            NIXL_POST_TIME_BUCKETS,
        ).labels(*values)
        self.nbytes = histogram(
            "vllm:nixl_bytes_transferred",
            "Histogram of bytes transferred per NIXL KV Cache transfers.",
            NIXL_BYTES_BUCKETS,
        ).labels(*values)
        self.descriptors = histogram(
            "vllm:nixl_num_descriptors",
            "Histogram of number of descriptors per NIXL  KV Cache transfers.",
            NIXL_DESCRIPTORS_BUCKETS,
        ).labels(*values)
        self.failed_transfers = counter(
            "vllm:nixl_num_failed_transfers",
            "Number of failed NIXL KV Cache transfers, including handshake and notification "
            "failures. NOTE: KV expiry is tracked separately in vllm:nixl_num_kv_expired_reqs.",
        ).labels(*values)
        counter(
            "vllm:nixl_num_failed_notifications",
            "Number of failed NIXL KV Cache notifications. Retained for compatibility; these "
            "failures are also included in vllm:nixl_num_failed_transfers.",
        ).labels(*values)
        self.expired = counter(
            "vllm:nixl_num_kv_expired_reqs",
            "Number of requests that had their KV expire. NOTE: This metric is tracked on the "
            "P instance.",
        ).labels(*values)
        self.after_expiry = counter(
            "vllm:nixl_num_notifications_after_expiry",
            "Number of completion notifications for requests that were no longer tracked, "
            "usually because their KV lease expired. The KV blocks may have been reused "
            "before the transfer finished. Counted per notification (one per remote rank), "
            "not per request.",
        ).labels(*values)

    def observe(self, seconds: float, nbytes: int, descriptors: int) -> None:
        self.xfer_time.observe(seconds)
        self.post_time.observe(0.0)  # posting a read costs no modelled time
        self.nbytes.observe(nbytes)
        self.descriptors.observe(descriptors)
