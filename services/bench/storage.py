"""What the ``tiered`` preset reads besides latencies: cache hits per tier and the storage tier's
bandwidth, from the engines' own metrics (vLLM's names), and the disk's raw rate from ``dd``.

Hits per tier are ``vllm:prompt_tokens_cached_by_source{source=device|host|disk|…}`` over
``vllm:prompt_tokens``: the share of all prompt tokens each tier supplied. The storage tier's
bandwidth is ``vllm:kv_offload_tiering_{read,write}_bytes`` over ``…_{read,write}_time`` (bytes
actually written to and read from the shared directory, and the seconds those reads and writes
took), next to what ``dd`` writes and reads in the same directory: how close the tier comes to
the disk it sits on. The simulator models those seconds (its bandwidth knobs); its real file
I/O — small files, one per block — comes from ``GET /sim/cache`` (:func:`file_stats`).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .peers import metric_values, scrape

SOURCES = ("device", "host", "disk", "p2p", "external_unspecified")


def _total(text: str, name: str, labels: str = "") -> float:
    """A counter's sum over its samples (``_total`` suffix or not)."""
    return sum(metric_values(text, name + "_total", labels)) + sum(
        metric_values(text, name, labels))


def tier_stats(urls: Sequence[str]) -> dict[str, Any]:
    """Prompt tokens, cached tokens per source and the storage tier's traffic, summed over the
    engines at ``urls`` (their /metrics)."""
    return tier_stats_of([scrape(url.rstrip("/") + "/metrics") for url in urls])


def tier_stats_of(pages: Sequence[str]) -> dict[str, Any]:
    """:func:`tier_stats` of Prometheus text pages."""
    out: dict[str, Any] = {"prompt_tokens": 0.0, "cached_by_source": dict.fromkeys(SOURCES, 0.0),
                           "storage_read_bytes": 0.0, "storage_read_s": 0.0,
                           "storage_write_bytes": 0.0, "storage_write_s": 0.0}
    for text in pages:
        if not text:
            continue
        out["prompt_tokens"] += _total(text, "vllm:prompt_tokens")
        for src in SOURCES:
            out["cached_by_source"][src] += _total(text, "vllm:prompt_tokens_cached_by_source",
                                                   f'source="{src}"')
        for what in ("read", "write"):
            out[f"storage_{what}_bytes"] += _total(text, f"vllm:kv_offload_tiering_{what}_bytes")
            out[f"storage_{what}_s"] += _total(text, f"vllm:kv_offload_tiering_{what}_time")
    return out


def file_stats(urls: Sequence[str]) -> dict[str, float]:
    """The simulators' real block-file I/O (``GET /sim/cache`` → ``storage``), summed: bytes
    and seconds spent writing and reading files, which the modelled rates do not show."""
    out = dict.fromkeys(("write_bytes", "write_s", "read_bytes", "read_s", "writes", "reads"),
                        0.0)
    for url in urls:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/sim/cache", timeout=10) as r:
                body = json.loads(r.read())
        except (OSError, ValueError):
            continue
        st = body.get("storage") if isinstance(body, dict) else None
        if isinstance(st, dict):
            for k in out:
                v = st.get(k)
                if isinstance(v, (int, float)):
                    out[k] += float(v)
    return out


def summarize_files(st: dict[str, float]) -> dict[str, Any]:
    """MB/s of the block files actually written and read (None when none were)."""
    s: dict[str, Any] = {}
    for what in ("write", "read"):
        b, t = st.get(f"{what}_bytes", 0.0), st.get(f"{what}_s", 0.0)
        s[f"files_{what}_MBps"] = b / t / 1e6 if t > 0 else None
        s[f"files_{what}_MB"] = b / 1e6
    s["files_written"] = int(st.get("writes", 0))
    s["files_read"] = int(st.get("reads", 0))
    return s


def summarize_tiers(st: dict[str, Any]) -> dict[str, Any]:
    """Hit rates per tier (share of prompt tokens) and the storage tier's MB/s."""
    total = st.get("prompt_tokens") or 0.0
    by = st.get("cached_by_source", {})
    s: dict[str, Any] = {}
    for key, src in (("hit_gpu", "device"), ("hit_cpu", "host"), ("hit_storage", "disk")):
        s[key] = by.get(src, 0.0) / total if total else None
    s["hit_total"] = sum(by.values()) / total if total else None
    for what in ("read", "write"):
        b, t = st.get(f"storage_{what}_bytes", 0.0), st.get(f"storage_{what}_s", 0.0)
        s[f"storage_{what}_MBps"] = b / t / 1e6 if t > 0 else None
        s[f"storage_{what}_MB"] = b / 1e6
    return s


def dd_rates(directory: str | os.PathLike[str], size_mb: int = 256) -> dict[str, Any]:
    """The disk's own sequential rates in ``directory``: ``dd`` writes ``size_mb`` MiB (flushed
    to the disk before it returns) and reads them back (with O_DIRECT where the filesystem
    allows it, else through the page cache, which the result says)."""
    path = Path(directory) / ".dd-probe"
    path.parent.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"dd_MB": size_mb * 1.048576}
    try:
        t0 = time.perf_counter()
        subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={size_mb}",
                        "conv=fdatasync", "status=none"], check=True, capture_output=True)
        out["dd_write_MBps"] = out["dd_MB"] / (time.perf_counter() - t0)
        for flag, cached in (("iflag=direct", False), ("", True)):
            argv = ["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"]
            if flag:
                argv.append(flag)
            t0 = time.perf_counter()
            r = subprocess.run(argv, capture_output=True)
            if r.returncode == 0:
                out["dd_read_MBps"] = out["dd_MB"] / (time.perf_counter() - t0)
                out["dd_read_cached"] = cached
                break
    except (OSError, subprocess.CalledProcessError) as e:
        out["dd_error"] = str(e)
    finally:
        path.unlink(missing_ok=True)
    return out
