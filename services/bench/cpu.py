"""CPU time of groups of processes over a measured window, read from ``/proc`` (Linux).

A group is a list of root pids; its CPU time is the user + system time (``utime + stime``,
fields 14 and 15 of ``/proc/<pid>/stat``) of every root and of every live descendant, plus the
children each of them has already reaped (``cutime + cstime``, fields 16 and 17), so a process
that forks helpers and waits for them is charged for them. :class:`CpuMeter` samples every group
at :meth:`~CpuMeter.start` and :meth:`~CpuMeter.stop` and returns the difference in seconds.

What is not seen: a process that exits inside the window and is not reaped by a member of the
group (its time goes to whoever reaps it), and a root that is replaced by a restart (the new pid
was not sampled at the start; its time since the start is counted in full, the dead one's lost).
A difference is never negative.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")


def clock_ticks() -> int:
    """Clock ticks per second of the ``/proc/<pid>/stat`` times."""
    try:
        return os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not Linux
        return 100


@dataclass(frozen=True)
class ProcStat:
    """What ``/proc/<pid>/stat`` says of one process (times in seconds)."""

    pid: int
    ppid: int
    cpu_s: float  # utime + stime
    children_cpu_s: float  # cutime + cstime: reaped children


def parse_stat(text: str, ticks: int | None = None) -> ProcStat:
    """Parse one ``/proc/<pid>/stat`` line. The command name (field 2) may hold spaces and
    parentheses, so the fields are counted from the last ``)``."""
    hz = ticks or clock_ticks()
    pid = int(text.split(" ", 1)[0])
    rest = text[text.rindex(")") + 2:].split()
    # rest[0] is field 3 (state): field n is rest[n - 3].
    ppid = int(rest[1])
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    return ProcStat(pid=pid, ppid=ppid, cpu_s=(utime + stime) / hz,
                    children_cpu_s=(cutime + cstime) / hz)


def read_stat(pid: int, ticks: int | None = None) -> ProcStat | None:
    """The stat of ``pid``, or None when it is gone (or unreadable)."""
    try:
        return parse_stat((_PROC / str(pid) / "stat").read_text(), ticks)
    except (OSError, ValueError, IndexError):
        return None


def all_stats(ticks: int | None = None) -> dict[int, ProcStat]:
    """Every process this user can see."""
    hz = ticks or clock_ticks()
    out: dict[int, ProcStat] = {}
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            st = read_stat(int(entry.name), hz)
            if st is not None:
                out[st.pid] = st
    return out


def descendants(root: int, stats: Mapping[int, ProcStat]) -> list[int]:
    """``root`` (when alive) and every live process below it."""
    children: dict[int, list[int]] = {}
    for st in stats.values():
        children.setdefault(st.ppid, []).append(st.pid)
    out: list[int] = []
    todo = [root] if root in stats else []
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def tree_cpu_s(roots: Iterable[int], stats: Mapping[int, ProcStat] | None = None) -> float:
    """CPU seconds used so far by ``roots``, their live descendants and the children they
    reaped (each process counted once)."""
    stats = all_stats() if stats is None else stats
    seen: set[int] = set()
    total = 0.0
    for root in roots:
        for pid in descendants(root, stats):
            if pid not in seen:
                seen.add(pid)
                total += stats[pid].cpu_s + stats[pid].children_cpu_s
    return total


class CpuMeter:
    """CPU seconds used by named groups of processes between :meth:`start` and :meth:`stop`."""

    def __init__(self, groups: Mapping[str, Iterable[int | None]]) -> None:
        self.groups = {name: [p for p in pids if p is not None] for name, pids in groups.items()}
        self._start: dict[str, float] = {}

    def sample(self) -> dict[str, float]:
        """Every group's CPU seconds so far."""
        stats = all_stats()
        return {name: tree_cpu_s(pids, stats) for name, pids in self.groups.items()}

    def start(self) -> CpuMeter:
        """Open the window."""
        self._start = self.sample()
        return self

    def stop(self) -> dict[str, float]:
        """Close the window: each group's CPU seconds since :meth:`start` (never negative)."""
        end = self.sample()
        return {name: max(0.0, end[name] - self._start.get(name, 0.0)) for name in end}


def self_cpu_s() -> float:
    """CPU seconds used so far by this process (every thread)."""
    t = os.times()
    return t.user + t.system


__all__ = ["CpuMeter", "ProcStat", "all_stats", "clock_ticks", "descendants", "parse_stat",
           "read_stat", "self_cpu_s", "tree_cpu_s"]
