"""When a silent pod is dead: the one rule the ingress, the scheduler and the indexer share.

A heartbeat that comes late is not a dead pod. On a loaded machine an agent's heartbeat can be
seconds late (its process starved of CPU, the bus slow), and a router that drops pods on
lateness answers 503 with engines that are up. So a pod is dropped on evidence:

* its agent says so (a heartbeat with ``ready=False``: the engine refuses connections or has not
  answered for a long time) — the callers handle that at once;
* or it has been silent for ``dead_s`` (seconds, not a few heartbeat periods) **while another
  pod of its group kept speaking all along** (heard within ``late_s`` now, with no gap longer
  than ``late_s`` for the last ``dead_s``). When every pod falls silent, the likelier story is
  that this process, the bus or the machine is the one behind: nobody is dropped, and after the
  silence the clock starts again (the first pod to speak again proves nothing about the rest).

``late_s`` also names the pods worth a look (gauges, health), which stay routable on their last
known state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

DEFAULT_LATE_S = 1.0
DEFAULT_DEAD_S = 10.0

__all__ = ["DEFAULT_DEAD_S", "DEFAULT_LATE_S", "check_times", "dead", "late", "since"]


def since(seen: float, since_: float, now: float, late_s: float) -> float:
    """The new start of a pod's unbroken run of heartbeats when one arrives at ``now``: kept,
    unless the previous one (``seen``) is older than ``late_s``."""
    return now if now - seen > late_s else since_


def dead(heard: Mapping[str, tuple[float, float]], now: float, late_s: float,
         dead_s: float) -> list[str]:
    """The pods of one group to drop. ``heard`` maps a pod to (last heard, start of its
    unbroken run of heartbeats, see :func:`since`), on the caller's clock: a pod is dead when
    silent for ``dead_s`` while some other pod has spoken without a break for ``dead_s`` and
    still does."""
    if not heard:
        return []
    fresh_after, steady_before = now - late_s, now - dead_s
    if not any(seen >= fresh_after and run <= steady_before for seen, run in heard.values()):
        return []  # nobody has spoken steadily through that silence: it proves nothing
    return [name for name, (seen, _) in heard.items() if seen < steady_before]


def late(seen: Iterable[float], now: float, late_s: float) -> int:
    """How many of these last-heard times are older than ``late_s``."""
    cutoff = now - late_s
    return sum(1 for t in seen if t < cutoff)


def check_times(late_s: float, dead_s: float) -> None:
    """Raise ValueError unless ``0 < late_s <= dead_s`` (the config classes call this)."""
    if not 0 < late_s <= dead_s:
        raise ValueError(f"pod_late_s must be > 0 and <= pod_timeout_s (got {late_s} and "
                         f"{dead_s})")
