"""vLLM-exact prefix-cache block hashing for the engine simulator.

The simulator announces the same block hashes in its KV-cache events as a real vLLM
(v1 engine, checked against vLLM 0.32.0) configured with the same
``--prefix-caching-hash-algo``, ``--block-size`` and ``PYTHONHASHSEED``. The rules, as
read from vLLM's ``vllm/v1/core/kv_cache_utils.py`` and ``vllm/utils/hashing.py``, and
pinned by ``tests/unit/sim/vllm_hash_vectors.json`` (generated with real vLLM):

Block hash
    ``H((parent, tokens, extra_keys))`` where ``parent`` is the 32-byte hash of the
    previous block (the *none hash* for the first block, or whenever the parent is
    ``None``/empty), ``tokens`` is a ``tuple`` of the block's Python ``int`` token ids
    and ``extra_keys`` is ``None`` or a non-empty ``tuple`` of tagged keys. Only full
    blocks are hashed; a partial last block has no hash.

``H`` (the algorithm)
    ``sha256``: SHA-256 of ``pickle.dumps(obj, protocol=5)`` (vLLM passes
    ``pickle.HIGHEST_PROTOCOL``, which is 5 on every Python vLLM supports; it is pinned
    here so the simulator does not drift if a future Python raises it).
    ``sha256_cbor``: SHA-256 of ``cbor2.dumps(obj, canonical=True)`` (tuples encode as
    CBOR arrays, ``bytes`` as byte strings, ``None`` as null).

None hash (the first block's parent)
    ``H(seed)`` where ``seed`` is the *string* value of ``PYTHONHASHSEED`` (hashed as a
    ``str``, not as a number: ``"0"`` and ``"00"`` differ). When ``PYTHONHASHSEED`` is
    unset, vLLM 0.32 uses the fixed seed ``"vllm-none-hash"`` for the cryptographic
    algorithms (``sha256``, ``sha256_cbor``), so unseeded engines agree with each other.
    Only the non-cryptographic ``xxhash`` algorithms (not modelled here) fall back to a
    random per-process seed. Older vLLM releases (before the fixed default) used
    ``os.urandom(32)`` as the none hash when the variable was unset; that behaviour is
    not reproduced.

Extra keys (per block, in this order, ``None`` when the list is empty)
    * LoRA: ``("lora", lora_name, lora_path)`` on every block of a LoRA request.
    * multimodal: ``("mm", identifier, offset_in_block)`` per multimodal item
      overlapping the block (not modelled: the simulator is text-only).
    * cache salt: ``("cache_salt", salt)`` on the first block only (the block that
      starts at token 0), and only when the salt is a non-empty string.
    * prompt embeddings: ``("prompt_embeds", sha256(tensor bytes))`` (not modelled).

Wire form (KV events)
    With ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`` (the default) vLLM publishes
    ``int.from_bytes(hash, "big") & (2**64 - 1)``: the *last* 8 bytes of the 32-byte
    digest read as a big-endian unsigned 64-bit integer (msgpack uint64; often >= 2**63).
    With the variable set to 0 (and in older releases) the raw 32 bytes are sent.
    The ``extra_keys`` field of ``BlockStored`` carries the keys *untagged* (the LoRA
    name only, the bare salt): see :func:`event_extra_keys`.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Sequence
from typing import Any, Literal, get_args

import cbor2

__all__ = [
    "DEFAULT_NONE_HASH_SEED",
    "FROM_ENV",
    "HashAlgo",
    "PICKLE_PROTOCOL",
    "BlockHasher",
    "block_extra_keys",
    "event_extra_keys",
    "hash_object",
    "none_hash",
    "to_wire",
    "to_wire_bytes",
]

HashAlgo = Literal["sha256", "sha256_cbor"]
"""The ``--prefix-caching-hash-algo`` values the simulator reproduces."""

_ALGOS: frozenset[str] = frozenset(get_args(HashAlgo))

PICKLE_PROTOCOL = 5
"""Pickle protocol of the ``sha256`` algorithm (vLLM's ``pickle.HIGHEST_PROTOCOL``)."""

DEFAULT_NONE_HASH_SEED = "vllm-none-hash"
"""Seed vLLM 0.32 derives the none hash from when ``PYTHONHASHSEED`` is unset."""

_U64_MASK = (1 << 64) - 1


class _FromEnv:
    """Type of :data:`FROM_ENV`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "FROM_ENV"


FROM_ENV = _FromEnv()
"""Default ``hash_seed`` of :class:`BlockHasher`: read ``PYTHONHASHSEED`` from the environment."""


def _check_algo(algo: str) -> None:
    if algo not in _ALGOS:
        raise ValueError(f"unsupported hash algorithm {algo!r}; expected one of {sorted(_ALGOS)}")


def hash_object(algo: HashAlgo, obj: Any) -> bytes:
    """Serialise ``obj`` the way vLLM's ``algo`` does and return its SHA-256 digest.

    Args:
        algo: ``"sha256"`` (pickle protocol 5) or ``"sha256_cbor"`` (canonical CBOR).
        obj: The object to hash (a block tuple or a seed string).

    Returns:
        The 32-byte digest.
    """
    if algo == "sha256":
        data = pickle.dumps(obj, protocol=PICKLE_PROTOCOL)
    elif algo == "sha256_cbor":
        data = cbor2.dumps(obj, canonical=True)
    else:
        _check_algo(algo)
        raise AssertionError("unreachable")
    return hashlib.sha256(data).digest()


def none_hash(algo: HashAlgo, hash_seed: str | None) -> bytes:
    """Return vLLM's initial parent hash (``NONE_HASH``) for ``algo`` and a seed.

    Args:
        algo: The prefix-caching hash algorithm.
        hash_seed: The engine's ``PYTHONHASHSEED`` value as a string, or ``None`` when
            the variable is unset. vLLM 0.32 then uses the fixed seed
            :data:`DEFAULT_NONE_HASH_SEED` for both SHA-256 algorithms, so the result is
            deterministic (it is *not* random for these algorithms).

    Returns:
        The 32-byte none hash.
    """
    _check_algo(algo)
    seed = DEFAULT_NONE_HASH_SEED if hash_seed is None else hash_seed
    return hash_object(algo, seed)


def _fresh(value: str) -> str:
    # Pickle memoises by object identity: a str object that occurs twice in one tuple is
    # written once and then referenced. In vLLM the LoRA name, LoRA path and cache salt
    # come from separate parsing, so they are distinct objects even when equal. Return a
    # distinct object for strings the caller passes in, so that passing one object for
    # two fields (or an interned "lora") pickles like vLLM. Strings of length <= 1 are
    # CPython singletons in vLLM as well, so they are left alone.
    if len(value) <= 1:
        return value
    return value[:1] + value[1:]


def block_extra_keys(
    start_token_idx: int,
    *,
    lora_name: str | None = None,
    lora_path: str | None = None,
    cache_salt: str | None = None,
) -> tuple[Any, ...] | None:
    """Build the tagged extra keys vLLM hashes into the block starting at a token index.

    Args:
        start_token_idx: Index of the block's first token in the request.
        lora_name: The LoRA adapter name, or ``None`` for the base model.
        lora_path: The adapter path vLLM registered for ``lora_name`` (vLLM requires a
            non-empty path for every LoRA request and hashes it).
        cache_salt: The request's ``cache_salt``; only the first block uses it, and an
            empty string counts as no salt.

    Returns:
        ``None`` when the block has no extra keys, else the tuple of tagged keys
        (LoRA first, then the cache salt).

    Raises:
        ValueError: ``lora_name`` is given without a non-empty ``lora_path``, or
            ``lora_path`` is given without ``lora_name``.
    """
    keys: list[Any] = []
    if lora_name is not None:
        if not lora_path:
            raise ValueError("a LoRA request needs its non-empty lora_path (vLLM hashes it)")
        keys.append(("lora", _fresh(lora_name), _fresh(lora_path)))
    elif lora_path is not None:
        raise ValueError("lora_path given without lora_name")
    if start_token_idx == 0 and cache_salt:
        keys.append(("cache_salt", _fresh(cache_salt)))
    return tuple(keys) if keys else None


def event_extra_keys(extra_keys: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
    """Convert tagged block-hash extra keys to the untagged form of ``BlockStored``.

    vLLM 0.32 publishes each block's extra keys without their tags: the LoRA name
    alone (not its path), the bare cache salt, ``(identifier, offset)`` for multimodal
    items and the bare digest for prompt embeddings.

    Args:
        extra_keys: One block's tagged keys as from :func:`block_extra_keys`, or ``None``.

    Returns:
        The untagged tuple, or ``None`` when ``extra_keys`` is ``None``.
    """
    if extra_keys is None:
        return None
    return tuple(key[1:] if key[0] == "mm" else key[1] for key in extra_keys)


def to_wire(block_hash: bytes) -> int:
    """Return the uint64 vLLM publishes for a block hash in its KV events.

    This is vLLM's conversion with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`` (the
    default): the whole digest read as a big-endian integer, masked to its low 64 bits,
    i.e. the last 8 bytes of the digest as a big-endian unsigned integer.

    Args:
        block_hash: A block hash (32 bytes from :class:`BlockHasher`).

    Returns:
        An integer in ``[0, 2**64)``.
    """
    return int.from_bytes(block_hash, "big") & _U64_MASK


def to_wire_bytes(block_hash: bytes) -> bytes:
    """Return the block hash as vLLM publishes it with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``.

    In that mode (the default of older releases) the raw digest goes on the wire
    unchanged.

    Args:
        block_hash: A block hash.

    Returns:
        The same bytes.
    """
    return bytes(block_hash)


class BlockHasher:
    """Chained prefix-cache block hasher that reproduces one vLLM engine's hashes.

    Args:
        algo: The engine's ``--prefix-caching-hash-algo`` (vLLM's default is ``sha256``).
        hash_seed: The engine's ``PYTHONHASHSEED`` string, or ``None`` for "unset". When
            omitted, this process's own ``PYTHONHASHSEED`` environment variable is read,
            like vLLM does at engine start-up.

    Attributes:
        algo: The hash algorithm.
        hash_seed: The seed in use (``None`` when unset).
        none_hash: The parent hash of every first block.
    """

    __slots__ = ("algo", "hash_seed", "none_hash")

    def __init__(
        self, algo: HashAlgo = "sha256", hash_seed: str | None | _FromEnv = FROM_ENV
    ) -> None:
        _check_algo(algo)
        seed = os.environ.get("PYTHONHASHSEED") if isinstance(hash_seed, _FromEnv) else hash_seed
        if seed is not None and not isinstance(seed, str):
            raise TypeError(f"hash_seed must be a str or None, not {type(seed).__name__}")
        self.algo: HashAlgo = algo
        self.hash_seed: str | None = seed
        self.none_hash: bytes = none_hash(algo, seed)

    def __repr__(self) -> str:
        return f"BlockHasher(algo={self.algo!r}, hash_seed={self.hash_seed!r})"

    def hash_block(
        self,
        parent: bytes | None,
        token_ids: Sequence[int],
        extra_keys: tuple[Any, ...] | None = None,
    ) -> bytes:
        """Hash one full block.

        Args:
            parent: The previous block's hash; ``None`` (or empty) for the first block,
                which then chains from :attr:`none_hash`.
            token_ids: The block's token ids.
            extra_keys: The block's tagged extra keys (see :func:`block_extra_keys`),
                or ``None``.

        Returns:
            The 32-byte block hash.
        """
        if not parent:
            parent = self.none_hash
        tokens = tuple(int(t) for t in token_ids)
        return hash_object(self.algo, (bytes(parent), tokens, extra_keys))

    def hash_prompt(
        self,
        token_ids: Sequence[int],
        block_size: int,
        *,
        lora_name: str | None = None,
        lora_path: str | None = None,
        cache_salt: str | None = None,
    ) -> list[bytes]:
        """Hash every full block of a token sequence, chained from the first block.

        Args:
            token_ids: All tokens of the request so far (prompt, plus any generated
                tokens: vLLM hashes blocks completed by output tokens the same way).
            block_size: Tokens per block (``--block-size``), at least 1.
            lora_name: LoRA adapter name, ``None`` for the base model.
            lora_path: The adapter's path as registered in vLLM; required with
                ``lora_name``.
            cache_salt: The request's ``cache_salt`` (mixed into the first block only).

        Returns:
            One 32-byte hash per full block; a trailing partial block is not hashed.
        """
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        hashes: list[bytes] = []
        parent: bytes | None = None
        for start in range(0, len(token_ids) - block_size + 1, block_size):
            extra = block_extra_keys(
                start, lora_name=lora_name, lora_path=lora_path, cache_salt=cache_salt
            )
            parent = self.hash_block(parent, token_ids[start : start + block_size], extra)
            hashes.append(parent)
        return hashes
