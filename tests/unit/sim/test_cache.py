"""The simulator's paged prefix cache: hits, LRU eviction, CPU tier, events, accounting."""

import pytest

from infermesh.services.sim.block_hash import BlockHasher, to_wire
from infermesh.services.sim.cache import NoSpace, PrefixCache

BS = 4
H = BlockHasher("sha256", "0")


def prompt(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def hashes(toks: list[int]) -> list[bytes]:
    return H.hash_prompt(toks, BS)


def admit(c: PrefixCache, toks: list[int], out: int = 0):
    return c.allocate(hashes(toks), toks, len(toks), out)


def test_prefix_hit_leaves_last_token_uncached() -> None:
    c = PrefixCache(16, BS, wire=to_wire)
    toks = prompt(0, 12)  # exactly 3 blocks
    a, hit, _ = admit(c, toks)
    assert hit == 0
    ev = c.drain_events()
    assert len(ev) == 1 and ev[0].kind == "stored" and len(ev[0].block_hashes) == 3
    assert ev[0].parent_block_hash is None and ev[0].token_ids == toks
    c.release(a)
    # The same prompt again: vLLM always recomputes the last token, so 2 of 3 blocks hit.
    a2, hit2, _ = admit(c, toks)
    assert hit2 == 2
    assert c.drain_events() == []  # the recomputed last block is cached already: no event
    c.release(a2)
    # A longer prompt sharing the prefix hits all three and stores the fourth.
    a3, hit3, _ = admit(c, toks + [99, 98, 97, 96, 95])
    assert hit3 == 3
    (ev3,) = c.drain_events()
    assert ev3.parent_block_hash == to_wire(hashes(toks)[2]) and ev3.token_ids == [99, 98, 97, 96]
    c.release(a3)


def test_lru_eviction_reports_removed_and_respects_capacity() -> None:
    c = PrefixCache(6, BS, wire=to_wire)
    a, _, _ = admit(c, prompt(0, 12))  # 3 blocks
    c.release(a)
    b, _, _ = admit(c, prompt(100, 12))  # 3 more: full
    c.release(b)
    c.drain_events()
    assert c.num_allocated == 6 and c.used == 0
    d, _, _ = admit(c, prompt(200, 8))  # needs 2: evicts the 2 least recently used
    ev = c.drain_events()
    removed = [e for e in ev if e.kind == "removed"]
    assert len(removed) == 1 and len(removed[0].block_hashes) == 2
    # The tail blocks of the oldest request go first.
    old = [to_wire(h) for h in hashes(prompt(0, 12))]
    assert set(removed[0].block_hashes) == {old[2], old[1]}
    assert c.num_allocated <= c.capacity
    c.release(d)


def test_no_space_changes_nothing() -> None:
    c = PrefixCache(4, BS)
    a, _, _ = admit(c, prompt(0, 12), out=4)  # all 4 blocks referenced
    before = (c.num_allocated, c.used, dict(c.blocks))
    c.drain_events()
    with pytest.raises(NoSpace):
        admit(c, prompt(50, 4))
    assert (c.num_allocated, c.used, dict(c.blocks)) == before and c.drain_events() == []
    c.release(a)
    assert c.used == 0


def test_request_larger_than_the_cache_never_fits() -> None:
    c = PrefixCache(3, BS)
    with pytest.raises(NoSpace):
        admit(c, prompt(0, 13))  # 4 slots needed, 3 exist


def test_cpu_tier_offload_events_and_hits() -> None:
    c = PrefixCache(4, BS, num_cpu_blocks=8, wire=to_wire)
    first = prompt(0, 9)  # 2 full blocks + partial = 3 slots
    a, _, _ = admit(c, first)
    c.release(a)
    b, _, _ = admit(c, prompt(500, 13))  # 3 full + partial = 4 slots: evicts first's blocks
    c.release(b)
    ev = c.drain_events()
    cpu_stored = [e for e in ev if e.kind == "stored" and e.medium == "CPU"]
    assert {h for e in cpu_stored for h in e.block_hashes} >= {to_wire(h) for h in hashes(first)}
    # Asking for the first prompt again: its blocks come from the CPU tier.
    _, gpu_hit, cpu_hit = admit(c, first)
    assert gpu_hit == 0 and cpu_hit == 2


def test_generated_blocks_join_the_chain() -> None:
    c = PrefixCache(8, BS, wire=to_wire)
    toks = prompt(0, 6)
    a, _, _ = admit(c, toks, out=6)
    c.drain_events()
    seq = toks + [7, 8]
    h2 = H.hash_block(a.chain[-1], seq[4:8], None)
    c.cache_generated(a, h2, seq[4:8])
    (ev,) = c.drain_events()
    assert ev.block_hashes == [to_wire(h2)] and ev.token_ids == seq[4:8]
    assert ev.parent_block_hash == to_wire(hashes(toks)[0])
    assert H.hash_prompt(seq, BS)[1] == h2
    c.release(a)
    assert c.used == 0


def test_reset_refused_while_busy_then_clears() -> None:
    c = PrefixCache(8, BS)
    a, _, _ = admit(c, prompt(0, 8))
    assert c.reset() is False
    c.release(a)
    c.drain_events()
    assert c.reset() is True
    ev = c.drain_events()
    assert [e.kind for e in ev] == ["cleared"] and c.num_allocated == 0
