"""The shared-directory block store: verified reads, atomic writes, LRU eviction."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from infermesh.libs.kvstore import (
    HEADER_SIZE,
    BlockFileError,
    BlockStore,
    decode_block,
    encode_block,
    namespace_for,
)


def _key(i: int) -> bytes:
    return i.to_bytes(8, "big")


def test_namespace_is_stable_and_distinguishes() -> None:
    a = namespace_for(model="m", block_size=16, seed="0")
    assert a == namespace_for(seed="0", block_size=16, model="m")
    assert a != namespace_for(model="m", block_size=32, seed="0")
    assert a.startswith("kv-") and "/" not in a


def test_put_get_roundtrip_and_layout(tmp_path) -> None:
    s = BlockStore(tmp_path, "ns")
    assert s.get(_key(1)) is None and s.stats.misses == 1
    assert s.put(_key(1), b"payload-1") is True
    assert s.put(_key(1), b"other") is False  # already there: not rewritten
    assert s.get(_key(1)) == b"payload-1"
    p = s.path(_key(1))
    assert p.parent.parent == tmp_path / "ns" and p.name == _key(1).hex() + ".kv"
    assert s.contains(_key(1)) and not s.contains(_key(2))
    assert list(s.keys()) == [_key(1)]
    assert s.stats.writes == 1 and s.stats.reads == 1
    out = bytearray(9)
    assert s.read_into(_key(1), memoryview(out)) and bytes(out) == b"payload-1"
    assert not s.read_into(_key(1), memoryview(bytearray(4)))  # wrong size: refused
    # Another store on the same directory (another engine) reads it.
    assert BlockStore(tmp_path, "ns").get(_key(1)) == b"payload-1"
    assert BlockStore(tmp_path, "other").get(_key(1)) is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "header", "empty", "key", "pad"])
def test_bad_file_is_a_miss_and_removed(tmp_path, damage: str) -> None:
    s = BlockStore(tmp_path, "ns")
    payload = bytes(range(256)) * 4
    s.put(_key(7), payload)
    p = s.path(_key(7))
    raw = bytearray(p.read_bytes())
    if damage == "truncate":
        raw = raw[:-10]
    elif damage == "flip":
        raw[-1] ^= 0x01
    elif damage == "header":
        raw = raw[: HEADER_SIZE - 3]
    elif damage == "empty":
        raw = bytearray()
    elif damage == "key":  # a whole, valid file of another block under this name
        raw = bytearray(b"".join(bytes(b) for b in encode_block(_key(8), payload)))
    elif damage == "pad":
        raw += b"\0"
    p.write_bytes(bytes(raw))
    assert s.get(_key(7)) is None
    assert s.stats.corrupt == 1 and s.stats.reads == 0
    assert not p.exists()  # removed: the next store rewrites it
    assert s.put(_key(7), payload) and s.get(_key(7)) == payload


def test_decode_block_errors() -> None:
    good = b"".join(bytes(b) for b in encode_block(b"k", b"abc"))
    assert bytes(decode_block(b"k", good)) == b"abc"
    with pytest.raises(BlockFileError, match="magic"):
        decode_block(b"k", b"XXXX" + good[4:])
    with pytest.raises(BlockFileError, match="checksum"):
        decode_block(b"k", good[:-1] + b"x")


def test_write_error_is_counted_not_raised(tmp_path) -> None:
    s = BlockStore(tmp_path, "ns")
    # A file where the fan-out directory should be: the write cannot happen.
    sub = s.path(_key(1)).parent
    sub.parent.mkdir(parents=True, exist_ok=True)
    sub.write_bytes(b"not a dir")
    assert s.put(_key(1), b"x") is False
    assert s.stats.write_errors == 1 and s.stats.errors
    assert not any(n.startswith(".tmp-") for n in os.listdir(sub.parent))


def test_capacity_evicts_least_recently_used(tmp_path) -> None:
    size = HEADER_SIZE + 8 + 100
    s = BlockStore(tmp_path, "ns", capacity_bytes=5 * size, low_watermark=0.6)
    t = time.time() - 1000
    for i in range(5):
        assert s.put(_key(i), bytes(100))
        os.utime(s.path(_key(i)), (t + i, t + i))  # 0 oldest … 4 newest
    assert s.take_evicted() == []
    s.get(_key(0))  # a read makes 0 the newest
    assert s.put(_key(5), bytes(100))  # 6 blocks > 5: down to 3 (0.6 × 5)
    gone = s.take_evicted()
    assert gone == [_key(1), _key(2), _key(3)]
    assert sorted(s.keys()) == [_key(0), _key(4), _key(5)]
    assert s.take_evicted() == [] and s.stats.evicted == 3
    assert s.usage_bytes() == 3 * size


def test_two_evictors_report_each_file_once(tmp_path) -> None:
    size = HEADER_SIZE + 8 + 10
    a = BlockStore(tmp_path, "ns", capacity_bytes=4 * size, low_watermark=0.5)
    b = BlockStore(tmp_path, "ns", capacity_bytes=4 * size, low_watermark=0.5)
    for i in range(8):
        a.put(_key(i), bytes(10))
    a.take_evicted()
    for i in range(8, 16):
        b.put(_key(i), bytes(10))
    b.take_evicted()
    # Both decide to evict the same over-full directory: a file is reported by one of them.
    for i in range(16, 24):
        (a if i % 2 else b).put(_key(i), bytes(10))
    ra, rb = a.take_evicted(), b.take_evicted()
    assert not set(ra) & set(rb)
    left = set(a.keys())
    assert not left & (set(ra) | set(rb))


def _writer(root: str, payload: bytes, n: int) -> None:
    s = BlockStore(root, "ns")
    for _ in range(n):
        os.unlink(s.path(b"same")) if s.contains(b"same") else None
        s.put(b"same", payload)


def test_concurrent_writers_leave_one_good_file(tmp_path) -> None:
    """Two processes writing (and rewriting) one block at once: every read sees a whole
    block from one of them, and one good file remains."""
    pa, pb = b"a" * 200_000, b"b" * 200_000
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), p, 40)) for p in (pa, pb)]
    for p in procs:
        p.start()
    s = BlockStore(tmp_path, "ns")
    seen = set()
    while any(p.is_alive() for p in procs):
        got = s.get(b"same")
        if got is not None:
            seen.add(got[:1])
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert s.stats.corrupt == 0
    assert s.get(b"same") in (pa, pb)
    names = os.listdir(s.path(b"same").parent)
    assert names == [s.path(b"same").name]  # no temporary files left behind


def test_bad_arguments(tmp_path) -> None:
    with pytest.raises(ValueError):
        BlockStore(tmp_path, "../x")
    with pytest.raises(ValueError):
        BlockStore(tmp_path, "ns", capacity_bytes=-1)
    assert BlockStore.key_of("/x/ab/zz.kv") is None
    assert BlockStore.key_of("/x/ab/.tmp-1") is None
