"""The block index: keys from events equal the tokenizer's keys, stores are idempotent, removals
and clears per tier, longest-prefix lookups with tiers, the LRU cap, and agreement with a brute
force over a simulated engine's real cache."""

from __future__ import annotations

import random

from infermesh.libs import kvblock
from infermesh.libs.kvindex import KVIndex
from infermesh.proto.messages import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    PodMatch,
    SnapshotBlock,
)
from infermesh.proto.vllm_kv import VllmEventDecoder, VllmEventEncoder
from infermesh.services.sim.block_hash import BlockHasher, to_wire
from infermesh.services.sim.cache import PrefixCache

M = "infermesh/tiny-llama"
BS = 4


def stored(hashes: list[int], toks: list[int], parent: int | None = None, **kw) -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_hash=parent, token_ids=toks, block_size=BS,
                       **kw)


def chain(n: int, base: int = 1000) -> tuple[list[int], list[int]]:
    """n engine hashes and n blocks of tokens."""
    return [base + i for i in range(n)], [base * 10 + i for i in range(n * BS)]


def keys_of(idx: KVIndex, pod: str, hashes: list[int]) -> list[int]:
    blocks = idx.pod_blocks(pod)
    return [blocks[h][0] for h in hashes]


# ---------------------------------------------------------------------------- block keys


def test_keys_from_events_equal_prompt_keys_across_events() -> None:
    hashes, toks = chain(7)
    idx = KVIndex()
    # The same chain as three events (as an engine stores a prompt, then its continuations).
    idx.apply("p", M, [stored(hashes[:3], toks[: 3 * BS])])
    idx.apply("p", M, [stored(hashes[3:5], toks[3 * BS : 5 * BS], parent=hashes[2])])
    idx.apply("p", M, [stored(hashes[5:], toks[5 * BS :], parent=hashes[4])])
    assert keys_of(idx, "p", hashes) == kvblock.prompt_keys(M, toks, BS)
    assert idx.stats.unkeyable == 0


def test_keys_with_lora_and_cache_salt() -> None:
    hashes, toks = chain(4)
    idx = KVIndex()
    # LoRA without extra_keys (older engines, the simulator): the LoRA name is the extra key.
    idx.apply("a", M, [stored(hashes, toks, lora_name="ad1")])
    assert keys_of(idx, "a", hashes) == kvblock.prompt_keys(M, toks, BS, lora_name="ad1")
    # extra_keys as vLLM publishes them: one entry per block, the salt on the first only.
    extra = [["ad1", "s1"], ["ad1"], ["ad1"], ["ad1"]]
    idx.apply("b", M, [stored(hashes, toks, lora_name="ad1", extra_keys=extra)])
    want = kvblock.prompt_keys(M, toks, BS, lora_name="ad1", cache_salt="s1")
    assert keys_of(idx, "b", hashes) == want
    idx.apply("c", M, [stored(hashes, toks, extra_keys=[["s2"], None, None, None])])
    assert keys_of(idx, "c", hashes) == kvblock.prompt_keys(M, toks, BS, cache_salt="s2")
    # Salted keys differ from plain ones from the first block on.
    assert keys_of(idx, "c", hashes)[0] != kvblock.prompt_keys(M, toks, BS)[0]


def test_keys_from_vllm_exact_hashes_and_snapshot() -> None:
    hasher = BlockHasher("sha256", "0")
    rng = random.Random(1)
    toks = [rng.randrange(10, 4000) for _ in range(6 * BS + 2)]
    eng = [to_wire(h) for h in hasher.hash_prompt(toks, BS, lora_name="ad1",
                                                   lora_path="/loras/ad1")]
    idx = KVIndex()
    idx.apply("p", M, [stored(eng, toks[: 6 * BS], lora_name="ad1")])
    want = kvblock.prompt_keys(M, toks, BS, lora_name="ad1")
    assert keys_of(idx, "p", eng) == want
    # A snapshot of the same blocks gives the same keys, on a pod never seen before.
    snap = [SnapshotBlock(h, eng[i - 1] if i else None, toks[i * BS : (i + 1) * BS], ["GPU"],
                          "ad1") for i, h in enumerate(eng)]
    idx.replace("q", M, snap)
    assert keys_of(idx, "q", eng) == want
    assert idx.lookup(want) == [PodMatch(pod="p", blocks=6, tiers=[]),
                                PodMatch(pod="q", blocks=6, tiers=[])]


def test_models_seed_keys() -> None:
    hashes, toks = chain(2)
    idx = KVIndex()
    idx.apply("p", "m1", [stored(hashes, toks)])
    idx.apply("q", "m2", [stored(hashes, toks)])
    assert keys_of(idx, "p", hashes) == kvblock.prompt_keys("m1", toks, BS)
    assert keys_of(idx, "q", hashes) == kvblock.prompt_keys("m2", toks, BS)
    assert idx.lookup(kvblock.prompt_keys("m1", toks, BS))[0].pod == "p"


# ---------------------------------------------------------------------------- events


def test_stores_are_idempotent() -> None:
    hashes, toks = chain(5)
    idx = KVIndex()
    ev = stored(hashes, toks)
    idx.apply("p", M, [ev])
    before = (len(idx), idx.entries, idx.pod_blocks("p"))
    idx.apply("p", M, [ev, ev])
    idx.apply("p", M, [stored(hashes[2:], toks[2 * BS :], parent=hashes[1])])
    assert (len(idx), idx.entries, idx.pod_blocks("p")) == before == (5, 5, before[2])


def test_removal_is_per_tier_and_offloads_resolve_by_hash() -> None:
    hashes, toks = chain(3)
    keys = kvblock.prompt_keys(M, toks, BS)
    idx = KVIndex()
    idx.apply("p", M, [stored(hashes, toks)])
    # Offload without tokens: resolved through the pod's engine-hash map.
    idx.apply("p", M, [BlockStored(block_hashes=hashes[:2], tier="CPU")])
    assert idx.holders(keys[0]) == {"p": ["GPU", "CPU"]}
    idx.apply("p", M, [BlockRemoved(block_hashes=hashes, tier="GPU")])
    assert idx.lookup(keys) == [PodMatch(pod="p", blocks=2, tiers=["CPU", "CPU"])]
    assert idx.holders(keys[2]) == {}
    # Removing what is not there changes nothing.
    idx.apply("p", M, [BlockRemoved(block_hashes=[hashes[2], 12345], tier="CPU")])
    assert idx.entries == 2
    idx.apply("p", M, [BlockRemoved(block_hashes=hashes[:1], tier="CPU")])
    assert idx.lookup(keys) == []
    # Back from CPU: the hash of a removed block is still known, so a tokenless store keys it.
    idx.apply("p", M, [BlockStored(block_hashes=hashes[:1], tier="GPU")])
    assert idx.lookup(keys) == [PodMatch(pod="p", blocks=2, tiers=["GPU", "CPU"])]


def test_clear_per_tier_and_all() -> None:
    hashes, toks = chain(3)
    keys = kvblock.prompt_keys(M, toks, BS)
    idx = KVIndex()
    idx.apply("p", M, [stored(hashes, toks), stored(hashes[:2], toks[: 2 * BS], tier="CPU")])
    idx.apply("q", M, [stored(hashes, toks)])
    idx.apply("p", M, [AllBlocksCleared(tier="GPU")])
    assert idx.lookup(keys, ["p"]) == [PodMatch(pod="p", blocks=2, tiers=["CPU", "CPU"])]
    idx.apply("p", M, [AllBlocksCleared()])
    assert idx.lookup(keys) == [PodMatch(pod="q", blocks=3, tiers=[])]
    assert idx.entries == 3
    idx.drop_pod("q")
    assert idx.lookup(keys) == [] and idx.entries == 0 and len(idx) == 0


def test_unknown_parent_waits_and_is_keyed_when_the_parent_comes() -> None:
    hashes, toks = chain(4)
    idx = KVIndex()
    # The tail arrives first (its parent unknown): it cannot be keyed yet.
    assert idx.apply("p", M, [stored(hashes[2:], toks[2 * BS :], parent=hashes[1])]) == 2
    assert idx.pod_blocks("p") == {}
    idx.apply("p", M, [stored(hashes[:2], toks[: 2 * BS])])
    assert keys_of(idx, "p", hashes) == kvblock.prompt_keys(M, toks, BS)


def test_unknown_tier_names_rank_last() -> None:
    hashes, toks = chain(2)
    keys = kvblock.prompt_keys(M, toks, BS)
    idx = KVIndex()
    idx.apply("p", M, [stored(hashes, toks, tier="NVME"),
                       stored(hashes[:1], toks[:BS], tier="SHARED_STORAGE")])
    assert idx.lookup(keys) == [PodMatch(pod="p", blocks=2, tiers=["SHARED_STORAGE", "NVME"])]


# ---------------------------------------------------------------------------- lookups


def test_longest_prefix_with_tiers_per_pod() -> None:
    hashes, toks = chain(6)
    keys = kvblock.prompt_keys(M, toks, BS)
    idx = KVIndex()
    idx.apply("all", M, [stored(hashes, toks)])
    idx.apply("three", M, [stored(hashes[:3], toks[: 3 * BS])])
    # A hole at block 2: only blocks 0-1 count, though 3-5 are held.
    idx.apply("hole", M, [stored(hashes, toks), BlockRemoved(block_hashes=[hashes[2]])])
    idx.apply("mixed", M, [stored(hashes[:4], toks[: 4 * BS], tier="CPU"),
                           stored(hashes[:1], toks[:BS]),
                           stored(hashes[:4], toks[: 4 * BS], tier="SHARED_STORAGE")])
    idx.apply("other", M, [stored([1, 2], [7] * 2 * BS)])
    assert idx.lookup(keys) == [
        PodMatch(pod="all", blocks=6, tiers=[]),
        PodMatch(pod="mixed", blocks=4, tiers=["GPU", "CPU", "CPU", "CPU"]),
        PodMatch(pod="three", blocks=3, tiers=[]),
        PodMatch(pod="hole", blocks=2, tiers=[]),
    ]
    # Asked about given pods: those only, in that order, with 0 for unknown or unmatched ones.
    assert idx.lookup(keys, ["ghost", "three", "other", "three"]) == [
        PodMatch(pod="ghost", blocks=0),
        PodMatch(pod="three", blocks=3, tiers=[]),
        PodMatch(pod="other", blocks=0),
    ]
    assert idx.lookup([]) == [] and idx.lookup([], ["all"]) == [PodMatch(pod="all", blocks=0)]
    assert idx.lookup([12345, *keys]) == []  # a match starts at the prompt's first block
    assert idx.stats.lookups == 5


def test_many_pods_slots_are_reused() -> None:
    hashes, toks = chain(3)
    keys = kvblock.prompt_keys(M, toks, BS)
    idx = KVIndex()
    for i in range(100):
        idx.apply(f"p{i}", M, [stored(hashes[: 1 + i % 3], toks[: (1 + i % 3) * BS])])
    got = {m.pod: m.blocks for m in idx.lookup(keys)}
    assert got == {f"p{i}": 1 + i % 3 for i in range(100)}
    for i in range(50):
        idx.drop_pod(f"p{i}")
    idx.apply("new", M, [stored(hashes, toks)])
    assert idx.pods["new"].slot == 0  # the lowest free slot
    got = {m.pod: m.blocks for m in idx.lookup(keys)}
    assert got == {"new": 3, **{f"p{i}": 1 + i % 3 for i in range(50, 100)}}


# ---------------------------------------------------------------------------- LRU cap


def test_lru_cap_evicts_least_recently_used_keys() -> None:
    idx = KVIndex(max_blocks=10)
    a_h, a_t = chain(4, base=100)
    b_h, b_t = chain(4, base=200)
    c_h, c_t = chain(4, base=300)
    a, b, c = (kvblock.prompt_keys(M, t, BS) for t in (a_t, b_t, c_t))
    idx.apply("p", M, [stored(a_h, a_t)])
    idx.apply("q", M, [stored(a_h[:2], a_t[: 2 * BS])])  # 6 entries
    idx.apply("p", M, [stored(b_h, b_t)])  # 10
    assert idx.lookup(a)[0].blocks == 4  # a is now fresher than b
    idx.apply("p", M, [stored(c_h, c_t)])  # 14 > 10: b goes (4 entries)
    assert idx.entries == 10 and idx.stats.evictions == 4
    assert idx.lookup(b) == []
    assert idx.lookup(a)[0].blocks == 4 and idx.lookup(c)[0].blocks == 4
    # The evicted blocks' hashes are still known: a child of b's last block can be keyed.
    more = [b_t[-1] + 1 + i for i in range(BS)]
    idx.apply("p", M, [stored([999], more, parent=b_h[-1])])
    assert idx.pod_blocks("p")[999][0] == kvblock.prompt_keys(M, b_t + more, BS)[-1]
    assert idx.entries <= 10


def test_lru_keeps_a_chain_parents_first() -> None:
    idx = KVIndex(max_blocks=6)
    a_h, a_t = chain(6, base=100)
    idx.apply("p", M, [stored(a_h, a_t)])
    b_h, b_t = chain(2, base=200)
    idx.apply("p", M, [stored(b_h, b_t)])
    # The tail of the chain goes first: its prefix still matches.
    assert idx.lookup(kvblock.prompt_keys(M, a_t, BS))[0].blocks == 4


# ---------------------------------------------------------------------------- brute force


def test_random_engine_traffic_matches_brute_force() -> None:
    """A real simulated block pool (LRU evictions, CPU offload, resets, LoRA) through vLLM's wire
    format: every lookup equals what the engines' caches say."""
    rng = random.Random(5)
    hasher = BlockHasher("sha256", "0")
    engines = {f"e{i}": PrefixCache(40, BS, num_cpu_blocks=12, wire=to_wire) for i in range(4)}
    enc, dec = VllmEventEncoder("map"), VllmEventDecoder()
    idx = KVIndex(max_blocks=10_000)
    small = KVIndex(max_blocks=60)  # the same events, forgetting the least recently used keys
    prefixes = [[rng.randrange(10, 4000) for _ in range(rng.randrange(1, 5) * BS)]
                for _ in range(5)]
    probes: list[tuple[list[int], str | None]] = []
    for step in range(600):
        pod = rng.choice(list(engines))
        cache = engines[pod]
        if rng.random() < 0.02:
            cache.reset()
        else:
            lora = "ad1" if rng.random() < 0.2 else None
            ids = rng.choice(prefixes) + [rng.randrange(10, 4000)
                                          for _ in range(rng.randrange(0, 5 * BS))]
            hs = hasher.hash_prompt(ids, BS, lora_name=lora,
                                    lora_path="/loras/ad1" if lora else None)
            # Each block's extra keys as vLLM publishes them (the LoRA name, untagged).
            alloc, _, _ = cache.allocate(hs, ids, len(ids), 0, lora_name=lora,
                                         extra=lambda _i, lo=lora: (lo,) if lo else None)
            cache.release(alloc)
            probes.append((ids, lora))
        batch = dec.decode(enc.encode(float(step), cache.drain_events()))
        assert idx.apply(pod, M, batch.events) == 0
        small.apply(pod, M, batch.events)
        if step % 50 == 0:
            _check_holes(idx)
            _check_holes(small)
    _check_holes(idx)
    _check_holes(small)
    assert small.stats.evictions > 100
    contents = {pod: c.contents() for pod, c in engines.items()}
    seen_tiers: set[str] = set()
    matched = 0
    for ids, lora in probes[-150:]:
        hs = [to_wire(h) for h in hasher.hash_prompt(
            ids, BS, lora_name=lora, lora_path="/loras/ad1" if lora else None)]
        want = []
        for pod, cont in contents.items():
            gpu = {to_wire(h) for h in cont["GPU"]}
            cpu = {to_wire(h) for h in cont["CPU"]}
            tiers = []
            for h in hs:
                if h not in gpu and h not in cpu:
                    break
                tiers.append("GPU" if h in gpu else "CPU")
            if tiers:
                seen_tiers.update(tiers)
                all_gpu = all(t == "GPU" for t in tiers)
                want.append(PodMatch(pod=pod, blocks=len(tiers), tiers=[] if all_gpu else tiers))
        keys = kvblock.prompt_keys(M, ids, BS, lora_name=lora)
        got = idx.lookup(keys)
        assert sorted(got, key=lambda m: m.pod) == sorted(want, key=lambda m: m.pod)
        matched += bool(want)
        got_small = {m.pod: (m.blocks, m.tiers or None) for m in small.lookup(keys)}
        assert got_small == {p: v for p, v in _reference_lookup(small, keys, None).items()
                             if v[0]}
    assert matched > 100 and seen_tiers == {"GPU", "CPU"}  # the comparison is not vacuous
    assert idx.stats.events["AllBlocksCleared"] > 5 and idx.stats.blocks_removed > 1000


def _check_holes(idx: KVIndex) -> None:
    """Every pod's hole count and child counts equal a recount from the index's keys."""
    for p in idx.pods.values():
        held = [k for k, m in idx._held.items() if m & p.bit]
        holes, kids = 0, {}
        for k in held:
            parent = idx._parent[k]
            if parent == -1:
                holes += 1
                continue
            kids[parent] = kids.get(parent, 0) + 1
            if parent not in idx._roots and not idx._held.get(parent, 0) & p.bit:
                holes += 1
        assert (p.holes, p.kids) == (holes, kids), p.name
    assert set(idx._parent) == set(idx._held)


def _reference_lookup(idx: KVIndex, keys: list[int], pods: list[str] | None) -> dict[str, tuple]:
    """The lookup as a plain walk, one block at a time: each asked pod's longest run of held
    blocks from the start, and which blocks of it are held off the GPU (by tier)."""
    names = pods if pods is not None else list(idx.pods)
    out = {}
    for name in names:
        blocks = idx.pod_blocks(name) if name in idx.pods else {}
        held = {k: tiers for k, tiers in blocks.values()}
        n = 0
        while n < len(keys) and keys[n] in held:
            n += 1
        if n or pods is not None:
            tiers = [held[k] for k in keys[:n]]
            out[name] = (n, None if all("GPU" in t for t in tiers) else [t[0] for t in tiers])
    return out


def test_the_walk_matches_a_block_by_block_walk_on_random_indexes() -> None:
    """Random pods holding random prefixes with holes, some blocks on the CPU only, prompts of
    up to 2,000 blocks (the walk reads them a slice at a time): every pod's match is the plain
    walk's, with and without the pods named."""
    rng = random.Random(7)
    for trial in range(60):
        idx = KVIndex()
        n = rng.choice([5, 300, 700, 2000])
        hashes, toks = chain(n, base=1000 + trial * 10_000)
        names = [f"p{i}" for i in range(rng.randint(1, 9))]
        for name in names:
            upto = rng.randint(0, n)
            if not upto:
                continue
            idx.apply(name, M, [stored(hashes[:upto], toks[: upto * BS])])
            if rng.random() < 0.5:  # a hole somewhere
                idx.apply(name, M, [BlockRemoved(block_hashes=[rng.choice(hashes[:upto])])])
            if rng.random() < 0.3:  # some blocks offloaded to the CPU, then dropped from GPU
                off = hashes[: rng.randint(1, upto)]
                idx.apply(name, M, [BlockStored(block_hashes=off, tier="CPU")])
                drop = rng.sample(off, k=max(1, len(off) // 3))
                idx.apply(name, M, [BlockRemoved(block_hashes=drop, tier="GPU")])
        _check_holes(idx)
        keys = kvblock.prompt_keys(M, toks, BS)
        for pods in (None, names, names[::-1][:2]):
            want = _reference_lookup(idx, keys, pods)
            got = {m.pod: (m.blocks, [t for t in m.tiers] or None) for m in
                   idx.lookup(keys, pods)}
            if pods is None:
                assert got == {p: v for p, v in want.items() if v[0]}, trial
            else:
                assert got == want, trial


def test_pods_without_holes_are_found_by_bisection() -> None:
    """Pods holding whole chains from their first block (vLLM evicts a chain's tail first) are
    matched by reading a few keys of a 2,000-block prompt; a pod with a hole is walked block by
    block, and every answer equals the plain walk's."""
    n = 2000
    hashes, toks = chain(n)
    idx = KVIndex()
    for name, upto in (("a", 2000), ("b", 1500), ("c", 700), ("d", 1)):
        idx.apply(name, M, [stored(hashes[:upto], toks[: upto * BS])])
    keys = kvblock.prompt_keys(M, toks, BS)
    assert [p.holes for p in idx.pods.values()] == [0, 0, 0, 0]
    before = idx.stats.lookup_reads
    got = idx.lookup(keys)
    assert [(m.pod, m.blocks) for m in got] == [("a", 2000), ("b", 1500), ("c", 700), ("d", 1)]
    assert idx.stats.lookup_reads - before < 100
    # The tail evicted, as vLLM does: still no hole, still bisected.
    idx.apply("b", M, [BlockRemoved(block_hashes=hashes[1000:1500][::-1])])
    assert idx.pods["b"].holes == 0
    # A block in the middle of c's chain evicted: c has a hole (its 600 later blocks' first).
    idx.apply("c", M, [BlockRemoved(block_hashes=[hashes[99]])])
    assert idx.pods["c"].holes == 1
    before = idx.stats.lookup_reads
    for pods in (None, ["a", "b", "c", "d", "e"], ["c"]):
        want = _reference_lookup(idx, keys, pods)
        got = {m.pod: (m.blocks, m.tiers or None) for m in idx.lookup(keys, pods)}
        assert got == (want if pods else {p: v for p, v in want.items() if v[0]}), pods
    assert got == {"c": (99, None)}
    assert idx.stats.lookup_reads - before > 99  # c was walked
    # The hole filled again (the block stored anew): c is whole, bisected once more.
    idx.apply("c", M, [stored([hashes[99]], toks[99 * BS: 100 * BS], parent=hashes[98])])
    assert idx.pods["c"].holes == 0
    assert {m.pod: m.blocks for m in idx.lookup(keys)} == {"a": 2000, "b": 1000, "c": 700,
                                                            "d": 1}
    _check_holes(idx)
    # Snapshots keep whole chains whole; a pod dropped leaves no counts behind.
    blocks = [SnapshotBlock(block_hash=h, parent_hash=hashes[i - 1] if i else None,
                            token_ids=toks[i * BS: (i + 1) * BS], tiers=["GPU"])
              for i, h in enumerate(hashes[:300])]
    idx.replace("a", M, blocks)
    assert idx.pods["a"].holes == 0
    assert {m.pod: m.blocks for m in idx.lookup(keys)}["a"] == 300
    idx.drop_pod("b")
    _check_holes(idx)
