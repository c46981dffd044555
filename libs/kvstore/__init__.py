"""KV blocks in a shared directory: one verified file per block, written atomically, LRU-evicted.

This is the storage tier behind both the simulator and the vLLM extension (``libs/vllm_ext``):
every engine of a pool mounts the same directory (a ReadWriteMany volume on Kubernetes) and
reads what any of them wrote. It imports only the standard library, because it runs inside
vLLM's own interpreter.

Layout: ``<root>/<namespace>/<first two hex digits>/<key hex>.kv``. The namespace names what
makes blocks interchangeable (model, dtype, block size, hash seed, layout; see
:func:`namespace_for`): engines that differ in any of these never read each other's bytes.

A file is a fixed header, the key, then the payload::

    magic "IMKV" | version u16 | key length u16 | payload length u64 | crc32(payload) u32

so a reader detects a foreign, truncated or corrupted file (and a file whose key is not the
one asked for) and treats it as a miss: it is removed and counted, never served.

Writers never expose a partial file: they write a temporary file in the same directory and
rename it over the final name (``os.replace`` is atomic on POSIX filesystems, NFS included).
Two engines writing the same block at once each rename a complete file; the last rename wins
and one good file remains.

Eviction is least-recently-used by modification time: a read touches the file (``utime``),
because access times are unreliable (``noatime``/``relatime`` mounts). Any process may evict;
the directory is the only shared state, so each process scans it (at most every
``rescan_s``, or when its own writes push its estimate over the capacity) and removes the
oldest files until the total is under ``capacity × low_watermark``. Two processes evicting at
once race on ``unlink``: only the one whose ``unlink`` succeeded reports the key, so a removal
event goes out once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

MAGIC = b"IMKV"
VERSION = 1
_HEADER = struct.Struct("<4sHHQI")
HEADER_SIZE = _HEADER.size
SUFFIX = ".kv"
_TMP_PREFIX = ".tmp-"
# A temporary file older than this was left by a writer that died: the scan removes it.
_STALE_TMP_S = 300.0


def namespace_for(**parts: object) -> str:
    """A stable directory name for blocks made under ``parts`` (model, dtype, block size, hash
    seed, …): the same parts in any order give the same name, any difference another."""
    text = "\n".join(f"{k}={parts[k]!r}" for k in sorted(parts))
    return "kv-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_block(key: bytes, payload: bytes | memoryview) -> list[bytes | memoryview]:
    """A block file's content as buffers (header + key, payload)."""
    if len(key) > 0xFFFF:
        raise ValueError("key longer than 65535 bytes")
    head = _HEADER.pack(MAGIC, VERSION, len(key), len(payload), zlib.crc32(payload))
    return [head + key, payload]


class BlockFileError(ValueError):
    """A block file that is not a whole, valid block for the key asked."""


def decode_block(key: bytes, data: bytes | memoryview) -> memoryview:
    """The payload of a block file's ``data``; raise :class:`BlockFileError` if it is not a
    complete, uncorrupted block for ``key``."""
    view = memoryview(data)
    if len(view) < HEADER_SIZE:
        raise BlockFileError(f"truncated header ({len(view)} bytes)")
    magic, version, klen, plen, crc = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise BlockFileError("not a block file (bad magic)")
    if version != VERSION:
        raise BlockFileError(f"unknown block file version {version}")
    start = HEADER_SIZE + klen
    if len(view) != start + plen:
        raise BlockFileError(f"size {len(view)} != {start + plen} (truncated or padded)")
    if view[HEADER_SIZE:start] != key:
        raise BlockFileError("the file holds another key")
    payload = view[start:]
    if zlib.crc32(payload) != crc:
        raise BlockFileError("checksum mismatch")
    return payload


@dataclass
class StoreStats:
    """What one process's store did (exported as metrics by its users)."""

    writes: int = 0
    write_bytes: int = 0
    write_s: float = 0.0
    write_errors: int = 0
    reads: int = 0  # verified hits
    read_bytes: int = 0
    read_s: float = 0.0
    read_errors: int = 0
    misses: int = 0
    corrupt: int = 0
    evicted: int = 0
    scans: int = 0
    errors: list[str] = field(default_factory=list)  # the last few error messages

    def error(self, msg: str) -> None:
        """Remember an error message (the last 16)."""
        self.errors.append(msg)
        del self.errors[:-16]


class BlockStore:
    """One namespace of a shared block directory. Thread-safe; never raises on I/O errors
    during put/get (they are counted and the call answers as a miss/no-write)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        namespace: str,
        capacity_bytes: int = 0,
        *,
        low_watermark: float = 0.9,
        rescan_s: float = 5.0,
    ) -> None:
        if capacity_bytes < 0:
            raise ValueError("capacity_bytes must be >= 0 (0: unbounded)")
        if not 0.0 < low_watermark <= 1.0:
            raise ValueError("low_watermark must be in (0, 1]")
        if not namespace or "/" in namespace or namespace.startswith("."):
            raise ValueError(f"bad namespace {namespace!r}")
        self.root = Path(root)
        self.dir = self.root / namespace
        self.dir.mkdir(parents=True, exist_ok=True)
        self.capacity_bytes = capacity_bytes
        self.low_watermark = low_watermark
        self.rescan_s = rescan_s
        self.stats = StoreStats()
        self._lock = threading.Lock()
        self._usage = 0  # bytes at the last scan plus this process's writes since
        self._scanned_at = float("-inf")
        self._evicted: list[bytes] = []
        self._tmp_seq = 0

    # ------------------------------------------------------------------ paths

    def path(self, key: bytes) -> Path:
        """Where ``key``'s file lives."""
        h = key.hex()
        return self.dir / h[:2] / (h + SUFFIX)

    @staticmethod
    def key_of(path: str | os.PathLike[str]) -> bytes | None:
        """The key a block file's name stands for (None for other files)."""
        name = os.path.basename(path)
        if not name.endswith(SUFFIX) or name.startswith("."):
            return None
        try:
            return bytes.fromhex(name[: -len(SUFFIX)])
        except ValueError:
            return None

    # ------------------------------------------------------------------ writes

    def put(self, key: bytes, payload: bytes | memoryview) -> bool:
        """Write ``key``'s block unless a file is already there; True if this call wrote it.

        I/O errors (full disk, permissions, a vanished mount) are counted in
        ``stats.write_errors`` and answered False."""
        path = self.path(key)
        if self.touch(key):
            return False
        t0 = time.perf_counter()
        with self._lock:
            self._tmp_seq += 1
            seq = self._tmp_seq
        tmp = path.parent / f"{_TMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{seq}"
        try:
            path.parent.mkdir(exist_ok=True)
            parts = encode_block(key, payload)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                for buf in parts:
                    view = memoryview(buf)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            with self._lock:
                self.stats.write_errors += 1
                self.stats.error(f"write {path.name}: {e}")
            return False
        size = sum(len(p) for p in parts)
        with self._lock:
            st = self.stats
            st.writes += 1
            st.write_bytes += size
            st.write_s += time.perf_counter() - t0
            self._usage += size
            over = self.capacity_bytes and (
                self._usage > self.capacity_bytes
                or time.monotonic() - self._scanned_at >= self.rescan_s
            )
        if over:
            removed = self.evict()
            if removed:
                with self._lock:
                    self._evicted.extend(removed)
        return True

    # ------------------------------------------------------------------ reads

    def contains(self, key: bytes) -> bool:
        """Whether a file for ``key`` exists (not verified: a read may still find it bad)."""
        return self.path(key).exists()

    def touch(self, key: bytes) -> bool:
        """Mark ``key`` as just used (for LRU eviction); False if it has no file."""
        try:
            os.utime(self.path(key))
        except OSError:
            return False
        return True

    def get(self, key: bytes) -> bytes | None:
        """The verified payload of ``key``, or None (missing, unreadable, corrupt)."""
        data = self._read(key)
        return None if data is None else bytes(data)

    def read_into(self, key: bytes, out: memoryview) -> bool:
        """Copy ``key``'s verified payload into ``out`` (of exactly its size); False on a miss,
        a bad file or a size that does not match."""
        data = self._read(key)
        if data is None:
            return False
        if len(data) != out.nbytes:
            with self._lock:
                self.stats.read_errors += 1
                self.stats.error(f"read {key.hex()}: {len(data)} bytes for {out.nbytes}")
            return False
        out.cast("B")[:] = data
        return True

    def _read(self, key: bytes) -> memoryview | None:
        path = self.path(key)
        t0 = time.perf_counter()
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            with self._lock:
                self.stats.misses += 1
            return None
        except OSError as e:
            with self._lock:
                self.stats.read_errors += 1
                self.stats.misses += 1
                self.stats.error(f"read {path.name}: {e}")
            return None
        try:
            payload = decode_block(key, raw)
        except BlockFileError as e:
            self._discard(path, raw)
            with self._lock:
                self.stats.corrupt += 1
                self.stats.misses += 1
                self.stats.error(f"corrupt {path.name}: {e}")
            return None
        with contextlib.suppress(OSError):
            os.utime(path)
        with self._lock:
            st = self.stats
            st.reads += 1
            st.read_bytes += len(raw)
            st.read_s += time.perf_counter() - t0
        return payload

    def _discard(self, path: Path, seen: bytes) -> None:
        """Remove a bad file, unless a writer has replaced it with another since it was read."""
        try:
            with open(path, "rb") as f:
                if f.read() != seen:
                    return
            os.unlink(path)
        except OSError:
            pass

    # ------------------------------------------------------------------ listing and eviction

    def keys(self) -> Iterator[bytes]:
        """Every key with a file (in no particular order)."""
        for _, _, path in self._entries():
            k = self.key_of(path)
            if k is not None:
                yield k

    def _entries(self) -> Iterator[tuple[float, int, str]]:
        """(mtime, size, path) of every block file; stale temporary files are removed."""
        now = time.time()
        try:
            subdirs = list(os.scandir(self.dir))
        except OSError:
            return
        for sub in subdirs:
            if not sub.is_dir(follow_symlinks=False):
                continue
            try:
                files = list(os.scandir(sub.path))
            except OSError:
                continue
            for f in files:
                try:
                    st = f.stat(follow_symlinks=False)
                except OSError:
                    continue
                if f.name.startswith(_TMP_PREFIX):
                    if now - st.st_mtime > _STALE_TMP_S:
                        with contextlib.suppress(OSError):
                            os.unlink(f.path)
                    continue
                if f.name.endswith(SUFFIX):
                    yield st.st_mtime, st.st_size, f.path

    def usage_bytes(self) -> int:
        """Bytes of block files in the namespace now (a scan)."""
        total = sum(size for _, size, _ in self._entries())
        with self._lock:
            self._usage = total
            self._scanned_at = time.monotonic()
            self.stats.scans += 1
        return total

    def evict(self) -> list[bytes]:
        """Remove the least recently used files until the namespace is under
        ``capacity × low_watermark``; the keys whose files this call removed."""
        if not self.capacity_bytes:
            return []
        entries = list(self._entries())
        total = sum(size for _, size, _ in entries)
        removed: list[bytes] = []
        target = int(self.capacity_bytes * self.low_watermark)
        if total > self.capacity_bytes:
            entries.sort()
            for _, size, path in entries:
                if total <= target:
                    break
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    total -= size  # another process evicted it: gone, but not ours to report
                    continue
                except OSError:
                    continue
                total -= size
                k = self.key_of(path)
                if k is not None:
                    removed.append(k)
        with self._lock:
            self._usage = total
            self._scanned_at = time.monotonic()
            self.stats.scans += 1
            self.stats.evicted += len(removed)
        return removed

    def maybe_evict(self) -> list[bytes]:
        """:meth:`evict` if the last scan is older than ``rescan_s`` (other writers may have
        filled the directory meanwhile); the keys removed."""
        if not self.capacity_bytes or time.monotonic() - self._scanned_at < self.rescan_s:
            return []
        removed = self.evict()
        return removed

    def take_evicted(self) -> list[bytes]:
        """Keys evicted by :meth:`put` since the last call (for removal events)."""
        with self._lock:
            out, self._evicted = self._evicted, []
        return out
