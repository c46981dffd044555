"""Caches that make repeated and prefix-sharing prompts cheap, with exactly the ids of a full
tokenization.

Three caches, each bounded in bytes (the prompt cache in entries too):

* the **prompt cache** maps a whole text (a prompt, or a rendered chat) to its ids, plus the block
  keys already computed for it, so a repeated prompt costs a dictionary lookup;
* the **chunk cache** maps chunks of a text, cut at boundaries where the tokenizer cannot merge
  across (:mod:`.chunking`), to their ids (and the chunk's text, which plans then share, so that
  later lookups by that text compare by identity); a text is tokenized chunk by chunk and only
  the chunks never seen before reach the HF tokenizer, so a shared system prompt or document is
  tokenized once. A chunk's ids do not depend on what precedes it (that is what a safe boundary
  means), so chunks are keyed by their text alone;
* the **key chain** remembers, per chunk *and the exact chain of chunks before it*, the block keys
  of the blocks that end inside it. Block keys chain over the whole prefix, so a prompt that
  shares chunks with an earlier one reuses their keys and hashes only the blocks after them.
  A chain node is keyed by ``(id of the parent node, chunk text)``; node ids are never reused,
  so a node is found only after exactly the same chunks from the same root (model, block size,
  LoRA, salt, special tokens) — that is, after exactly the same token ids.

Tokenizing is split into :meth:`CachingTokenizer.plan` (cache lookups), :meth:`~.run` (the HF
tokenizer on the missing chunks; touches no cache, so it may run in a worker thread) and
:meth:`~.finish` (stores and assembles), so the service can keep its event loop free while a long
cold prompt is tokenized. Before ``run`` is done, :meth:`~.known_prefix` gives the token count
and block keys of the chunks tokenized so far from the start: exactly the first ids and keys of a
full tokenization, which is all the routing needs when the rest was never seen.
"""

from __future__ import annotations

import itertools
import json
import sys
from array import array
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from infermesh.libs.kvblock import block_extra, prompt_keys
from infermesh.libs.kvblock import key as block_key
from infermesh.libs.telemetry import get_logger

from .chunking import TextChunker, chunking_unsafe_reason
from .errors import TokenizationError
from .tokenizer import ModelTokenizer

log = get_logger("tokenizer.cache")

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Bookkeeping per entry beyond its payload: the OrderedDict node, the key tuple, the sizes.
_ENTRY_OVERHEAD = 200
# Key variants (block size, LoRA, salt) remembered per cached prompt.
_MAX_KEY_VARIANTS = 4
#: Texts with at least this many characters to tokenize go to the HF tokenizer's parallel batch.
PARALLEL_MIN_CHARS = 16384
# Pieces per chunk (about): a chunk of chunk_chars is also cached as pieces of chunk_chars / 8.
PIECES_PER_CHUNK = 8
#: Characters per token assumed before a model has tokenized enough text to measure its own.
DEFAULT_CHARS_PER_TOKEN = 4.0
# Tokens a model must have tokenized before its measured characters per token are used.
_MIN_MEASURED_TOKENS = 1000
# Roots of key chains remembered (one per model, block size, LoRA, salt and special tokens).
_MAX_CHAIN_ROOTS = 4096
#: Texts this long skip the prompt cache (hashing one costs more than what follows) and start
#: from the chunks of the last long text that began with the same first chunk.
RECALL_MIN_CHARS = 16384
# First chunks whose last long text is remembered.
_MAX_RECALLED = 32

Variant = tuple[str, int, str | None, str | None]  # (model, block size, LoRA name, cache salt)


class ByteLRU(Generic[K, V]):
    """A least-recently-used map bounded by the total size of its entries, in bytes."""

    def __init__(self, max_bytes: int, max_entries: int = 0) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries  # 0: no limit on the count
        self._data: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: K) -> bool:
        return key in self._data

    def get(self, key: K) -> V | None:
        """The value of ``key`` (now the most recently used), or None; counts hits and misses."""
        item = self._data.get(key)
        if item is None:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return item[0]

    def put(self, key: K, value: V, size: int) -> None:
        """Store (or replace) ``key``; evict the least recently used entries to stay in bounds.

        An entry larger than the whole budget is not stored.
        """
        old = self._data.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        if size > self.max_bytes:
            return
        self._data[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes or (
            self.max_entries and len(self._data) > self.max_entries
        ):
            _, (_, evicted) = self._data.popitem(last=False)
            self.bytes -= evicted
            self.evictions += 1

    def resize(self, key: K, value: V, size: int) -> None:
        """Update the size of ``key`` if it still maps to ``value`` (which grew or shrank)."""
        item = self._data.get(key)
        if item is not None and item[0] is value:
            self.put(key, value, size)

    def clear(self) -> None:
        """Drop every entry."""
        self._data.clear()
        self.bytes = 0


@dataclass(eq=False)
class PromptEntry:
    """A tokenized text and the block keys computed for it so far."""

    cache_key: tuple[str, bool, str]  # (model, add_special_tokens, text)
    ids: array[int]  # array("I")
    keys: dict[Variant, array[int]] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Memory held by this entry and its text."""
        return (
            sys.getsizeof(self.cache_key[2])
            + _array_bytes(self.ids)
            + sum(_array_bytes(k) + _ENTRY_OVERHEAD for k in self.keys.values())
            + _ENTRY_OVERHEAD
        )


@dataclass(eq=False)
class EncodePlan:
    """What :meth:`CachingTokenizer.plan` found, and what is left to tokenize."""

    text: str
    add_special_tokens: bool
    entry: PromptEntry | None = None  # the whole text was cached
    chunks: list[str] = field(default_factory=list)
    parts: list[array[int] | None] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)  # indexes of chunks to tokenize
    whole: bool = False  # tokenize the text in one piece, specials included, no chunk caching
    # The first missing chunk's leading pieces found in the chunk cache: their ids and chars,
    # and the piece after them (None when every piece was found): see run_head().
    head: array[int] | None = None
    head_chars: int = 0
    head_piece: str | None = None
    head_ids: array[int] | None = None  # after run_head(): head + the head piece's ids
    # What run() tokenized, per chunk index: its pieces and their ids (finish() caches them).
    pieces: dict[int, list[tuple[str, array[int]]]] = field(default_factory=dict)

    @property
    def missing_chars(self) -> int:
        """Characters of the chunks the caches did not have."""
        return sum(len(self.chunks[i]) for i in self.missing)

    @property
    def pending(self) -> list[int]:
        """Indexes of the missing chunks not tokenized yet."""
        return [i for i in self.missing if self.parts[i] is None]

    @property
    def pending_chars(self) -> int:
        """Characters the HF tokenizer still has to go through."""
        return sum(len(self.chunks[i]) for i in self.pending)

    @property
    def known(self) -> int:
        """How many leading chunks have their ids (those before the first pending one)."""
        pending = self.pending
        return pending[0] if pending else len(self.chunks)

    def known_ids_head(self) -> array[int] | None:
        """The head's ids (run_head()) when they continue the known chunks, else None."""
        if self.head_ids is None or not self.missing or self.known != self.missing[0]:
            return None
        return self.head_ids

    @property
    def known_chars(self) -> int:
        """Characters of the text whose ids known_prefix() counts (chunks, then the head)."""
        chars = sum(len(c) for c in self.chunks[: self.known])
        if self.known_ids_head() is not None:
            chars += self.head_chars + len(self.head_piece or "")
        return chars


@dataclass(eq=False, slots=True)
class ChainNode:
    """One chunk in a key chain: where it ends (in tokens) and the keys of blocks ending in it."""

    id: int
    end: int
    keys: array[int]  # array("Q")


def _array_bytes(a: array[int]) -> int:
    return a.itemsize * len(a) + 64


def _special_affixes(tok: ModelTokenizer) -> tuple[list[int], list[int]] | None:
    """(prefix, suffix) the post-processor puts around a text's ids, when it does only that."""
    probes = ["", "a", "Hello world\n", " x <|eot_id|>y", "12345 ,.;\n\n  z", "日本 🙂"]
    empty = tok.encode("", add_special_tokens=True)
    for cut in range(len(empty) + 1):
        prefix, suffix = empty[:cut], empty[cut:]
        if all(
            tok.encode(p, add_special_tokens=True)
            == prefix + tok.encode(p, add_special_tokens=False) + suffix
            for p in probes
        ):
            return prefix, suffix
    return None


class CachingTokenizer:
    """A model's tokenizer behind the prompt and chunk caches; ids equal ``tok.encode``'s."""

    def __init__(
        self,
        name: str,
        tok: ModelTokenizer,
        *,
        prompt_cache: ByteLRU[tuple[str, bool, str], PromptEntry],
        chunk_cache: ByteLRU[tuple[str, str], tuple[array[int], str]],
        key_cache: ByteLRU[tuple[int, str], ChainNode] | None = None,
        chunk_chars: int = 2048,
    ) -> None:
        self.name = name
        self.tok = tok
        self.prompt_cache = prompt_cache
        self.chunk_cache = chunk_cache
        self.key_cache = key_cache if key_cache is not None else ByteLRU(0)
        self._roots: OrderedDict[tuple[Variant, bool], int] = OrderedDict()
        # (special tokens, first chunk) → the plan of the last long text that began with it.
        self._recent: OrderedDict[tuple[bool, str], EncodePlan] = OrderedDict()
        self.recalled_chars = 0  # characters of long texts found cut already (_recall())
        self.recall_hits = 0  # long texts found whole
        self.recall_misses = 0  # long texts whose first chunk no recent long text began with
        self.chunker = TextChunker(chunk_chars)
        # Pieces: a chunk cut finer, cached beside the chunks, so that the part of a text's
        # first missing chunk that was seen before is found without the HF tokenizer.
        self.piecer = TextChunker(max(1, chunk_chars // PIECES_PER_CHUNK))
        self.chunking_off_reason = chunking_unsafe_reason(json.loads(tok.backend.to_str()))
        self.affixes = _special_affixes(tok) if self.chunking_off_reason is None else None
        self.encoded_chars = 0  # characters that went through the HF tokenizer
        self.encoded_tokens = 0  # the ids they gave
        if self.chunking_off_reason is not None:
            log.info("chunk_cache_off", model=name, reason=self.chunking_off_reason)

    @property
    def chunking(self) -> bool:
        """Whether texts are tokenized chunk by chunk (the tokenizer allows safe boundaries)."""
        return self.chunking_off_reason is None

    # ------------------------------------------------------------------ three steps

    def plan(self, text: str, add_special_tokens: bool) -> EncodePlan:
        """Look ``text`` up in the caches; say which chunks still need the HF tokenizer."""
        plan = EncodePlan(text, add_special_tokens)
        whole = not self.chunking or (add_special_tokens and self.affixes is None)
        if self._in_prompt_cache(text, whole):
            plan.entry = self.prompt_cache.get((self.name, add_special_tokens, text))
            if plan.entry is not None:
                return plan
            if whole:
                plan.whole = True
                plan.chunks = [text]
                plan.parts = [None]
                plan.missing = [0]
                return plan
            chunks = plan.chunks = self.chunker.split(text) if text else []
        else:
            chunks = plan.chunks = self._recall(plan)
            if plan.entry is not None:
                return plan
        get = self.chunk_cache.get
        name = self.name
        for i, chunk in enumerate(chunks):
            hit = get((name, chunk))
            if hit is None:
                plan.parts.append(None)
                plan.missing.append(i)
            else:
                # The cached copy of the chunk's text: the key chain's keys hold that same
                # object, so its lookups compare by identity rather than by content.
                plan.parts.append(hit[0])
                chunks[i] = hit[1]
        if plan.missing:
            head = plan.head = array("I")
            for piece in self.piecer.split(chunks[plan.missing[0]]):
                hit = get((name, piece))
                if hit is None:
                    plan.head_piece = piece
                    break
                head.extend(hit[0])
                plan.head_chars += len(piece)
        return plan

    def _in_prompt_cache(self, text: str, whole: bool) -> bool:
        """Whether the prompt cache holds ``text`` (when seen): not a long text cut into
        chunks, which :meth:`_recall` finds."""
        return whole or len(text) < RECALL_MIN_CHARS or not self.chunk_cache.max_bytes

    def _recall(self, plan: EncodePlan) -> list[str]:
        """The chunks of a long text: those it shares with the last long text that began with
        the same first chunk (the cached copies, whose hashes are known and which compare by
        identity in the caches), then its own; the entry too when it is that very text.

        A cut depends only on the characters before it and the one after, so a chunk that ends
        at a cut both texts share, with the same character after it, is a chunk of both.
        Matching the earlier text's chunks costs a memory comparison each, where cutting and
        looking the text up afresh hashes every character (a 100k-token prompt: half a
        millisecond).
        """
        text = plan.text
        first = self.chunker.first_cut(text)
        if first is None:
            return self.chunker.split(text)
        head = (plan.add_special_tokens, text[:first])
        recent = self._recent
        old = recent.get(head)
        recent[head] = plan
        if old is None:
            self.recall_misses += 1
            if len(recent) > _MAX_RECALLED:
                recent.popitem(last=False)
            return self.chunker.split(text)
        recent.move_to_end(head)
        if old.entry is not None and old.text == text:
            self.recall_hits += 1
            self.recalled_chars += len(text)
            plan.entry = old.entry
            plan.parts = old.parts  # all tokenized (finished)
            return old.chunks
        chunks = old.chunks
        last = len(chunks) - 1  # ends with its text, not at a cut
        at = j = 0
        startswith = text.startswith
        while j < last and startswith(chunks[j], at):
            at += len(chunks[j])
            j += 1
        if j and text[at : at + 1] != chunks[j][:1]:
            j -= 1  # the cut before chunk j needs the same character after it
            at -= len(chunks[j])
        self.recalled_chars += at
        if not j:
            return self.chunker.split(text)
        return chunks[:j] + self.chunker.split(text[at:])

    def run_head(self, plan: EncodePlan) -> None:
        """Tokenize the plan's head piece: the first piece of its first missing chunk that the
        cache lacks (thread-safe: touches no cache). Text seen before reaches at most into that
        piece (the argument of :meth:`known_prefix`, one level down: pieces are cut as chunks
        are, finer), so after this the known prefix holds every block a seen text shares.

        Raises :class:`~infermesh.libs.tokenization.TokenizationError` for text the tokenizer
        refuses.
        """
        if plan.head is None:
            return
        ids = array("I", plan.head)
        if plan.head_piece:
            try:
                ids.extend(self.tok.backend.encode_batch_fast(
                    [plan.head_piece], add_special_tokens=False)[0].ids)
            except TypeError as exc:
                raise TokenizationError(f"text cannot be tokenized: {exc}") from exc
        plan.head_ids = ids

    def run(self, plan: EncodePlan, *, first: bool = False, parallel: bool = True) -> None:
        """Tokenize the plan's pending chunks, or only the first of them (thread-safe: touches
        no cache); long texts on every core unless not ``parallel``.

        Raises :class:`~infermesh.libs.tokenization.TokenizationError` for text the tokenizer
        refuses.
        """
        todo = plan.pending[:1] if first else plan.pending
        if not todo:
            return
        special = plan.whole and plan.add_special_tokens
        # Each chunk as its pieces (the whole text when not chunked): the same ids, since
        # pieces are cut at safe boundaries, and finish() caches the pieces too.
        split = (lambda c: [c]) if plan.whole else self.piecer.split
        cut = [split(plan.chunks[i]) for i in todo]
        texts = [p for pieces in cut for p in pieces]
        # The HF tokenizer's batch encode without offsets: the ids of ModelTokenizer.encode in
        # 60-70% of its time, and without the GIL.
        fast = self.tok.backend.encode_batch_fast
        try:
            if parallel and sum(map(len, texts)) >= PARALLEL_MIN_CHARS:  # on the Rust side
                encoded = [e.ids for e in fast(texts, add_special_tokens=special)]
            else:  # a few small chunks: the thread pool's hand-offs would cost more than they save
                encoded = [e.ids for pieces in cut
                           for e in fast(pieces, add_special_tokens=special)]
        except TypeError as exc:  # e.g. a lone surrogate that is not valid UTF-8
            raise TokenizationError(f"text cannot be tokenized: {exc}") from exc
        at = 0
        for i, pieces in zip(todo, cut, strict=True):
            ids = array("I")
            if len(pieces) == 1:
                ids.extend(encoded[at])
            else:
                done = plan.pieces[i] = []
                for j, piece in enumerate(pieces):
                    part = array("I", encoded[at + j])
                    done.append((piece, part))
                    ids.extend(part)
            at += len(pieces)
            plan.parts[i] = ids

    def finish(self, plan: EncodePlan) -> PromptEntry:
        """Store what :meth:`run` tokenized; assemble and cache the whole text's entry."""
        if plan.entry is not None:
            return plan.entry
        self.encoded_chars += plan.missing_chars
        self.encoded_tokens += sum(len(plan.parts[i] or ()) for i in plan.missing)
        ids = array("I")
        if plan.add_special_tokens and not plan.whole:
            assert self.affixes is not None
            ids.extend(self.affixes[0])
        name = self.name
        missing = set(plan.missing)
        for i, (chunk, part) in enumerate(zip(plan.chunks, plan.parts, strict=True)):
            if part is None:
                raise RuntimeError("finish() before run()")
            if i in missing and not plan.whole:
                self.chunk_cache.put(
                    (name, chunk), (part, chunk),
                    sys.getsizeof(chunk) + _array_bytes(part) + _ENTRY_OVERHEAD,
                )
                for piece, piece_ids in plan.pieces.get(i, ()):
                    self.chunk_cache.put(
                        (name, piece), (piece_ids, piece),
                        sys.getsizeof(piece) + _array_bytes(piece_ids) + _ENTRY_OVERHEAD,
                    )
            ids.extend(part)
        if plan.add_special_tokens and not plan.whole:
            assert self.affixes is not None
            ids.extend(self.affixes[1])
        entry = PromptEntry((self.name, plan.add_special_tokens, plan.text), ids)
        if self._in_prompt_cache(plan.text, plan.whole):
            self.prompt_cache.put(entry.cache_key, entry, entry.nbytes())
        plan.entry = entry
        return entry

    # ------------------------------------------------------------------ conveniences

    def encode(self, text: str, add_special_tokens: bool = True) -> array[int]:
        """Ids of ``text``, equal to ``ModelTokenizer.encode(text, add_special_tokens)``."""
        plan = self.plan(text, add_special_tokens)
        self.run(plan)
        return self.finish(plan).ids

    def block_keys(
        self,
        plan: EncodePlan,
        model: str,
        block_size: int,
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> array[int]:
        """``kvblock.prompt_keys`` of a finished plan's ids, from the entry's memo, the key
        chain of its chunks, or hashed afresh."""
        entry = plan.entry
        if entry is None:
            raise RuntimeError("block_keys() before finish()")
        variant = (model, block_size, lora_name, cache_salt)
        keys = entry.keys.get(variant)
        if keys is not None:
            return keys
        if plan.chunks and not plan.whole and self.key_cache.max_bytes > 0:
            keys = self._chain_keys(plan, variant)
        else:
            keys = array("Q", prompt_keys(model, entry.ids, block_size, lora_name=lora_name,
                                          cache_salt=cache_salt))
        if len(entry.keys) >= _MAX_KEY_VARIANTS:
            del entry.keys[next(iter(entry.keys))]
        entry.keys[variant] = keys
        if self._in_prompt_cache(plan.text, plan.whole):
            self.prompt_cache.resize(entry.cache_key, entry, entry.nbytes())
        return keys

    @property
    def chars_per_token(self) -> float:
        """Characters per token of the text this model has tokenized (a default until enough)."""
        if self.encoded_tokens < _MIN_MEASURED_TOKENS:
            return DEFAULT_CHARS_PER_TOKEN
        return self.encoded_chars / self.encoded_tokens

    def known_prefix(
        self,
        plan: EncodePlan,
        model: str,
        block_size: int,
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> tuple[int, array[int]]:
        """(token count, block keys) of the known prefix of a plan not run to the end: the
        special-token prefix, the chunks before the first pending one, and, when that one is
        the first missing chunk and :meth:`run_head` ran, its head (the pieces of it the cache
        had, and the next piece, tokenized).

        Each chunk ends at a safe boundary, so its ids do not depend on the text after it: the
        count and keys are exactly the first ids' and the first blocks' of a full tokenization.
        A block that would reach into the first pending chunk gets no key. Keys come from the key
        chain where the same chunks were chained before, the rest are hashed; nothing is stored
        (:meth:`block_keys` chains them once the plan is finished).

        Text seen before may run into the first *missing* chunk (an earlier text ended inside
        it, or went on differently right after its end), never past it: a text sharing the
        characters up to one past a chunk's end is cut there too, so it would have brought that
        chunk. Hence ``run(plan, first=True)`` or :meth:`run_head` before this call covers all
        that may be cached.
        """
        if plan.whole:
            return 0, array("Q")
        variant: Variant = (model, block_size, lora_name, cache_salt)
        known = plan.known
        head = self.affixes[0] if plan.add_special_tokens and self.affixes else []
        parts = plan.parts[:known]
        n_tokens = len(head) + sum(len(p) for p in parts if p is not None)
        n_blocks = n_tokens // block_size
        keys = array("Q", prompt_keys(model, head, block_size, lora_name=lora_name,
                                      cache_salt=cache_salt))
        if self.key_cache.max_bytes > 0 and len(keys) < n_blocks:
            parent = self._root(variant, plan.add_special_tokens)
            for chunk in plan.chunks[:known]:
                node = self.key_cache.get((parent, chunk))
                if node is None:
                    break
                keys.extend(node.keys)
                parent = node.id
        tail = plan.known_ids_head()
        if tail is not None:  # the head of the first missing chunk (run_head())
            n_tokens += len(tail)
            n_blocks = n_tokens // block_size
        if len(keys) < n_blocks:
            # Only the ids from the first block without a key on (not the whole prefix again).
            start, stop = len(keys) * block_size, n_blocks * block_size
            ids = array("I")
            pos = 0
            for seg in (head, *parts, *(() if tail is None else (tail,))):
                assert seg is not None
                end = pos + len(seg)
                if end > start:
                    ids.extend(seg[max(0, start - pos) :])
                pos = end
                if pos >= stop:
                    break
            keys = _extend_keys(keys, ids, n_blocks, variant, offset=start)
        return n_tokens, keys

    def _root(self, variant: Variant, special: bool) -> int:
        root = self._roots.get((variant, special))
        if root is None:
            root = self._roots[(variant, special)] = next(_node_ids)
            if len(self._roots) > _MAX_CHAIN_ROOTS:
                self._roots.popitem(last=False)
        else:
            self._roots.move_to_end((variant, special))
        return root

    def _chain_keys(self, plan: EncodePlan, variant: Variant) -> array[int]:
        assert plan.entry is not None
        model, bs, lora_name, cache_salt = variant
        ids = plan.entry.ids
        parent = self._root(variant, plan.add_special_tokens)
        end = len(self.affixes[0]) if plan.add_special_tokens and self.affixes else 0
        # Blocks that end inside the special-token prefix belong to no chunk.
        keys = array("Q", prompt_keys(model, ids[:end], bs, lora_name=lora_name,
                                      cache_salt=cache_salt))
        found = 0
        for chunk in plan.chunks:  # the chunks already chained: their keys as they were
            node = self.key_cache.get((parent, chunk))
            if node is None:
                break
            keys.extend(node.keys)
            parent, end = node.id, node.end
            found += 1
        keys = _extend_keys(keys, ids, len(ids) // bs, variant)
        for chunk, part in zip(plan.chunks[found:], plan.parts[found:], strict=True):
            assert part is not None
            new_end = end + len(part)
            node = ChainNode(next(_node_ids), new_end, keys[end // bs : new_end // bs])
            self.key_cache.put((parent, chunk), node,
                               sys.getsizeof(chunk) + _array_bytes(node.keys) + _ENTRY_OVERHEAD)
            parent, end = node.id, new_end
        return keys


def _extend_keys(keys: array[int], ids: array[int], n_blocks: int,
                 variant: Variant, offset: int = 0) -> array[int]:
    """``keys`` (the first blocks' keys of a prompt) continued to ``n_blocks`` blocks, from
    ``ids``: the prompt's ids from token ``offset`` on."""
    model, bs, lora_name, cache_salt = variant
    if not keys:
        assert offset == 0
        return array("Q", prompt_keys(model, ids[: n_blocks * bs], bs, lora_name=lora_name,
                                      cache_salt=cache_salt))
    last = keys[-1]  # continue the chain after the last known block
    for j in range(len(keys), n_blocks):
        at = j * bs - offset
        last = block_key(last, ids[at : at + bs],
                         block_extra(j, lora_name=lora_name, cache_salt=cache_salt))
        keys.append(last)
    return keys


# Node ids of key chains: unique for the life of the process, so a dropped node's id never
# comes back to make a stale child reachable.
_node_ids = itertools.count(1)
