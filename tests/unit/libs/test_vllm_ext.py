"""The vLLM extension's logic without vLLM: the copy plan, the storage tier's jobs and events,
and the ``--kv-transfer-config`` it is wired in with (tests/vllm runs it inside real vLLM)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from infermesh.libs.kvstore import BlockStore
from infermesh.libs.vllm_ext import (
    SPEC_MODULE,
    SPEC_NAME,
    TIER_MODULE,
    TIER_TYPE,
    kv_transfer_config,
    shm_region_names,
)
from infermesh.libs.vllm_ext.copyplan import plan_copy
from infermesh.libs.vllm_ext.storage import StorageTierCore

CHUNK = 64


def test_the_package_imports_without_vllm_or_torch() -> None:
    assert "vllm" not in sys.modules
    assert "torch" not in sys.modules


# ---------------------------------------------------------------------- copy plan


def test_one_block_per_chunk_maps_blocks_to_chunks_in_order() -> None:
    [g] = plan_copy([7, 3, 9], [0, 5, 2], [3], [0], 1)
    assert (g.blocks, g.chunks, g.slots) == ([7, 3, 9], [0, 5, 2], [0, 0, 0])


def test_a_group_starting_mid_chunk_skips_the_first_slots() -> None:
    # 4 blocks per chunk; the group's first block is the 6th of the request: slot 1 of chunk 10.
    [g] = plan_copy([1, 2, 3, 4, 5], [10, 11], [5], [5], 4)
    assert g.chunks == [10, 10, 10, 11, 11]
    assert g.slots == [1, 2, 3, 0, 1]


def test_groups_take_their_blocks_and_chunks_in_turn() -> None:
    plans = plan_copy([1, 2, 3, 4], [20, 21, 22], [2, 0, 2], [0, 0, 3], 2)
    assert [(p.group, p.blocks, p.chunks, p.slots) for p in plans] == [
        (0, [1, 2], [20, 20], [0, 1]),
        (2, [3, 4], [21, 22], [1, 0]),
    ]


@pytest.mark.parametrize("args", [
    ([1, 2], [0, 1], [3], [0], 1),      # sizes do not add up
    ([1, 2], [0], [2], [0], 1),         # too few chunks
    ([1, 2], [0, 1, 2], [2], [0], 1),   # chunks left over
    ([1], [0], [1], [0, 0], 1),         # sizes and indices differ
])
def test_inconsistent_transfers_are_refused(args: tuple) -> None:
    with pytest.raises(ValueError):
        plan_copy(*args)


# ---------------------------------------------------------------------- storage tier core


def _region(chunks: int) -> tuple[bytearray, memoryview]:
    buf = bytearray(chunks * CHUNK)
    return buf, memoryview(buf)


def _fill(buf: bytearray, chunk: int, byte: int) -> None:
    buf[chunk * CHUNK:(chunk + 1) * CHUNK] = bytes([byte]) * CHUNK


def _finish(core: StorageTierCore) -> dict[int, object]:
    core.drain()
    return {j.job_id: j for j in core.finished()}


def _key(i: int) -> bytes:
    return i.to_bytes(32, "big") + b"\0\0\0\0"


def test_store_then_load_round_trips_through_the_directory(tmp_path: Path) -> None:
    store = BlockStore(tmp_path, "ns")
    buf, region = _region(4)
    core = StorageTierCore(store, region, CHUNK)
    _fill(buf, 0, 1)
    _fill(buf, 1, 2)
    core.submit_store(1, [_key(1), _key(2)], [0, 1])
    [job] = _finish(core).values()
    assert job.success and job.nbytes == 2 * CHUNK
    assert core.contains(_key(1)) and core.contains(_key(2)) and not core.contains(_key(3))
    [ev] = core.take_events()
    assert ev.keys == (_key(1), _key(2)) and not ev.removed

    # Another engine's region: loads land in its chunks 3 and 2.
    buf2, region2 = _region(4)
    other = StorageTierCore(BlockStore(tmp_path, "ns"), region2, CHUNK)
    other.submit_load(7, [_key(1), _key(2)], [3, 2])
    [job] = _finish(other).values()
    assert job.success and job.loaded is None
    assert buf2[3 * CHUNK:4 * CHUNK] == bytes([1]) * CHUNK
    assert buf2[2 * CHUNK:3 * CHUNK] == bytes([2]) * CHUNK
    assert other.counters().blocks_loaded == 2
    core.shutdown()
    other.shutdown()


def test_a_block_already_there_is_not_rewritten_but_still_announced(tmp_path: Path) -> None:
    store = BlockStore(tmp_path, "ns")
    buf, region = _region(2)
    core = StorageTierCore(store, region, CHUNK)
    core.submit_store(1, [_key(1)], [0])
    _finish(core)
    core.take_events()
    core.submit_store(2, [_key(1)], [1])
    [job] = _finish(core).values()
    assert job.success and job.nbytes == 0
    assert [e.keys for e in core.take_events()] == [(_key(1),)]
    c = core.take_counters()
    assert (c.blocks_written, c.blocks_present) == (1, 1)
    assert core.take_counters().blocks_written == 0  # deltas
    core.shutdown()


@pytest.mark.parametrize("damage", ["truncate", "flip", "other_key"])
def test_a_bad_file_is_a_miss_never_served_and_its_removal_is_announced(
        tmp_path: Path, damage: str) -> None:
    store = BlockStore(tmp_path, "ns")
    buf, region = _region(3)
    core = StorageTierCore(store, region, CHUNK)
    _fill(buf, 0, 5)
    _fill(buf, 1, 6)
    core.submit_store(1, [_key(1), _key(2)], [0, 1])
    _finish(core)
    core.take_events()
    path = store.path(_key(2))
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:-10])
    elif damage == "flip":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        path.write_bytes(store.path(_key(1)).read_bytes())
    _fill(buf, 2, 0xAA)
    core.submit_load(2, [_key(1), _key(2)], [1, 2])
    [job] = _finish(core).values()
    assert not job.success and job.loaded == (_key(1),)
    assert buf[2 * CHUNK:3 * CHUNK] == bytes([0xAA]) * CHUNK  # untouched: nothing served
    assert buf[CHUNK:2 * CHUNK] == bytes([5]) * CHUNK
    assert not core.contains(_key(2))  # removed, so the next lookup is a miss
    [ev] = core.take_events()
    assert ev.removed and ev.keys == (_key(2),)
    c = core.counters()
    assert (c.corrupt_blocks, c.load_misses, c.failed_load_jobs) == (1, 1, 1)
    core.shutdown()


def test_a_missing_file_fails_the_load_without_raising(tmp_path: Path) -> None:
    core = StorageTierCore(BlockStore(tmp_path, "ns"), _region(1)[1], CHUNK)
    core.submit_load(3, [_key(9)], [0])
    [job] = _finish(core).values()
    assert not job.success and job.loaded == ()
    assert [e.removed for e in core.take_events()] == [True]
    core.shutdown()


def test_write_errors_fail_the_job_and_are_counted(tmp_path: Path) -> None:
    store = BlockStore(tmp_path, "ns")
    core = StorageTierCore(store, _region(1)[1], CHUNK)
    # A file where the block's subdirectory should be: every write there fails.
    sub = store.path(_key(1)).parent
    sub.parent.mkdir(parents=True, exist_ok=True)
    sub.write_text("not a directory")
    core.submit_store(4, [_key(1)], [0])
    [job] = _finish(core).values()
    assert not job.success
    assert core.take_events() == []
    c = core.counters()
    assert (c.write_errors, c.failed_store_jobs) == (1, 1)
    core.shutdown()


def test_a_bug_in_a_job_fails_it_and_keeps_the_tier_running(tmp_path: Path) -> None:
    core = StorageTierCore(BlockStore(tmp_path, "ns"), _region(1)[1], CHUNK)
    core.submit_store(5, [_key(1)], [99])  # no such chunk
    [job] = _finish(core).values()
    assert not job.success
    core.submit_store(6, [_key(1)], [0])
    assert _finish(core)[6].success
    core.shutdown()


def test_capacity_eviction_announces_the_removed_blocks(tmp_path: Path) -> None:
    probe = BlockStore(tmp_path, "probe")
    probe.put(_key(0), bytes(CHUNK))
    file_bytes = probe.path(_key(0)).stat().st_size
    store = BlockStore(tmp_path, "ns", capacity_bytes=4 * file_bytes, low_watermark=0.5)
    buf, region = _region(8)
    core = StorageTierCore(store, region, CHUNK)
    for i in range(8):
        _fill(buf, i, i)
    core.submit_store(1, [_key(i) for i in range(8)], list(range(8)))
    [job] = _finish(core).values()
    assert job.success
    events = core.take_events()
    stored = [k for e in events if not e.removed for k in e.keys]
    removed = [k for e in events if e.removed for k in e.keys]
    assert len(stored) == 8 and removed
    assert all(not core.contains(k) for k in removed)
    assert sum(core.contains(_key(i)) for i in range(8)) == 8 - len(removed)
    assert core.counters().evicted_blocks == len(removed)
    core.shutdown()


def test_tick_evicts_what_other_engines_filled(tmp_path: Path) -> None:
    now = [0.0]
    probe = BlockStore(tmp_path, "probe")
    probe.put(_key(0), bytes(CHUNK))
    file_bytes = probe.path(_key(0)).stat().st_size
    store = BlockStore(tmp_path, "ns", capacity_bytes=3 * file_bytes, low_watermark=0.5)
    core = StorageTierCore(store, _region(1)[1], CHUNK, evict_every_s=5, clock=lambda: now[0])
    other = BlockStore(tmp_path, "ns")  # unbounded: an engine that never evicts
    for i in range(6):
        other.put(_key(i), bytes(CHUNK))
    core.tick()
    core.drain()
    assert core.take_events() == []  # not yet due
    now[0] = 6.0
    core.tick()
    core.drain()
    [ev] = core.take_events()
    assert ev.removed and len(ev.keys) >= 4
    core.shutdown()


def test_events_can_be_turned_off(tmp_path: Path) -> None:
    core = StorageTierCore(BlockStore(tmp_path, "ns"), _region(1)[1], CHUNK, emit_events=False)
    core.submit_store(1, [_key(1)], [0])
    _finish(core)
    assert core.take_events() == []
    core.shutdown()


def test_jobs_run_off_the_calling_thread(tmp_path: Path) -> None:
    store = BlockStore(tmp_path, "ns")
    gate = threading.Event()
    real_put = store.put
    threads: list[str] = []

    def slow_put(key: bytes, payload: bytes | memoryview) -> bool:
        threads.append(threading.current_thread().name)
        gate.wait(5)
        return real_put(key, payload)

    store.put = slow_put  # type: ignore[method-assign]
    core = StorageTierCore(store, _region(1)[1], CHUNK)
    core.submit_store(1, [_key(1)], [0])  # returns at once although the write blocks
    assert core.has_pending_work()
    assert core.finished() == []
    gate.set()
    assert _finish(core)[1].success
    assert threads and threads[0].startswith("im-kv-store")
    assert not core.has_pending_work()
    core.shutdown()


def test_a_two_dimensional_region_is_addressed_by_rows(tmp_path: Path) -> None:
    buf = bytearray(3 * CHUNK)
    region = memoryview(buf).cast("B", (3, CHUNK))  # the shape vLLM's primary view has
    core = StorageTierCore(BlockStore(tmp_path, "ns"), region, CHUNK)
    _fill(buf, 2, 9)
    core.submit_store(1, [_key(1)], [2])
    core.drain()  # loads and stores run on separate threads
    core.submit_load(2, [_key(1)], [0])
    assert all(j.success for j in _finish(core).values())
    assert buf[:CHUNK] == bytes([9]) * CHUNK
    core.shutdown()


# ---------------------------------------------------------------------- kv-transfer-config


def test_the_kv_transfer_config_names_our_spec_and_tier() -> None:
    cfg = kv_transfer_config("/shared/kv", cpu_bytes=1 << 30, capacity_bytes=5 << 30,
                             engine_id="infermesh-vllm-0", namespace_parts={"pool": "p"})
    assert cfg["kv_connector"] == "OffloadingConnector" and cfg["kv_role"] == "kv_both"
    assert cfg["engine_id"] == "infermesh-vllm-0"
    extra = cfg["kv_connector_extra_config"]
    assert (extra["spec_module_path"], extra["spec_name"]) == (SPEC_MODULE, SPEC_NAME)
    assert extra["cpu_bytes_to_use"] == 1 << 30
    [tier] = extra["secondary_tiers"]
    assert tier == {"type": TIER_TYPE, "module_path": TIER_MODULE, "root_dir": "/shared/kv",
                    "capacity_bytes": 5 << 30, "locality": "REMOTE", "enable_kv_events": True,
                    "io_threads": 4, "namespace_parts": {"pool": "p"}}
    assert "self_describing_kv_events" not in extra


def test_the_kv_transfer_config_refuses_what_vllm_would_not_run() -> None:
    with pytest.raises(ValueError):
        kv_transfer_config("/x", cpu_bytes=0)
    with pytest.raises(ValueError):
        kv_transfer_config("/x", cpu_bytes=1, locality="ELSEWHERE")


def test_shm_region_names_cover_data_parallel_ranks() -> None:
    assert shm_region_names("e1") == ["vllm_offload_e1.mmap", "vllm_offload_e1_dp*.mmap"]
