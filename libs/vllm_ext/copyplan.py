"""Which engine KV block goes to which slot of which offload chunk, for one transfer.

vLLM hands the offloading worker a transfer as two flat lists: the engine's block ids (grouped
per KV-cache group, ``group_sizes``) and the offload region's chunk ids. A chunk holds
``blocks_per_chunk`` engine blocks side by side; a group's first block may sit in the middle
of its first chunk (``block_indices[g] % blocks_per_chunk`` slots in), because the offloaded
prefix need not start on a chunk boundary. This module turns that into explicit
(engine block, chunk, slot) triples, so the copy itself is two indexed tensor operations.
Plain Python: tested without torch or vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class GroupCopy:
    """One KV-cache group's part of a transfer: engine block ``blocks[i]`` is slot
    ``slots[i]`` of chunk ``chunks[i]``."""

    group: int
    blocks: list[int]
    chunks: list[int]
    slots: list[int]


def plan_copy(
    block_ids: Sequence[int],
    chunk_ids: Sequence[int],
    group_sizes: Sequence[int],
    block_indices: Sequence[int],
    blocks_per_chunk: int,
) -> list[GroupCopy]:
    """The (block, chunk, slot) triples of a transfer, per group with blocks.

    ``group_sizes[g]`` engine blocks of ``block_ids`` belong to group ``g`` (in order), and its
    first one is the ``block_indices[g]``-th block of the request; the group's chunks follow in
    ``chunk_ids`` in the same order. Raises ValueError when the lists do not add up (vLLM
    asserts the same)."""
    if blocks_per_chunk < 1:
        raise ValueError("blocks_per_chunk must be positive")
    if len(group_sizes) != len(block_indices):
        raise ValueError("group_sizes and block_indices differ in length")
    if sum(group_sizes) != len(block_ids):
        raise ValueError(f"group sizes add up to {sum(group_sizes)}, not {len(block_ids)}")
    out: list[GroupCopy] = []
    b_off = c_off = 0
    for g, (n, first) in enumerate(zip(group_sizes, block_indices, strict=True)):
        if n == 0:
            continue
        skip = first % blocks_per_chunk
        n_chunks = -(-(n + skip) // blocks_per_chunk)
        chunks = chunk_ids[c_off:c_off + n_chunks]
        if len(chunks) != n_chunks:
            raise ValueError(f"group {g} needs {n_chunks} chunks, {len(chunks)} given")
        cells = [(c, s) for c in chunks for s in range(blocks_per_chunk)][skip:skip + n]
        out.append(GroupCopy(
            group=g,
            blocks=[int(b) for b in block_ids[b_off:b_off + n]],
            chunks=[int(c) for c, _ in cells],
            slots=[s for _, s in cells],
        ))
        b_off += n
        c_off += n_chunks
    if c_off != len(chunk_ids):
        raise ValueError(f"{len(chunk_ids)} chunks given, {c_off} used")
    return out
