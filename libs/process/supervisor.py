"""Many child processes kept running: started in order, restarted with backoff, stopped in
reverse order."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .process import Process

# A child that ran this long before dying was not crash-looping: its backoff starts over.
STABLE_S = 60.0


class Supervisor:
    """Owns a set of :class:`Process` es, one log file each under ``log_dir``."""

    def __init__(self, log_dir: Path | None = None, *, backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0,
                 on_restart: Callable[[Process, int | None], None] | None = None) -> None:
        self.log_dir = log_dir
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.on_restart = on_restart
        self.procs: dict[str, Process] = {}
        self._restart_at: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        self._restarts: dict[str, int] = {}
        self._supervised: set[str] = set()
        self._restartable: set[str] = set()
        self._stage: dict[str, int] = {}
        # start/stop may come from another thread (the autoscaler's actuator) than check().
        self._lock = threading.RLock()

    def add(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
            *, restart: bool = True, log: Path | None = None, stage: int = 0) -> Process:
        """Register a process (not started); ``restart``: bring it back when it dies.

        ``stage`` orders the stop: higher stages stop first (the ingress before the services
        it calls, the bus last, so nobody logs the bus vanishing under it).
        """
        if name in self.procs:
            raise ValueError(f"process {name!r} is already supervised")
        if log is None and self.log_dir is not None:
            log = self.log_dir / f"{name}.log"
        p = Process(name, argv, env=env, log=log)
        self.procs[name] = p
        self._stage[name] = stage
        if restart:
            self._supervised.add(name)
            self._restartable.add(name)
        return p

    def start(self, name: str) -> Process:
        """Start a registered process (supervised again if :meth:`stop` took it out)."""
        with self._lock:
            if name in self._restartable:
                self._supervised.add(name)
            return self.procs[name].start()

    def stop(self, name: str, timeout: float = 10.0) -> None:
        """Stop one process and leave it stopped (not restarted) until :meth:`start`."""
        with self._lock:
            self._supervised.discard(name)
            self._restart_at.pop(name, None)
            p = self.procs[name]
        p.stop(timeout=timeout)

    def restarts(self, name: str) -> int:
        """How many times ``name`` was restarted after dying."""
        return self._restarts.get(name, 0)

    def check(self) -> list[Process]:
        """Restart supervised processes that died, each after its backoff; return those
        restarted."""
        with self._lock:
            return self._check()

    def _check(self) -> list[Process]:
        now = time.monotonic()
        out: list[Process] = []
        for name in list(self._supervised):
            p = self.procs[name]
            if p.proc is None or p.alive():
                continue
            at = self._restart_at.get(name)
            if at is None:
                ran = now - p.started_at
                backoff = self._backoff.get(name, self.backoff_s)
                if ran > STABLE_S:
                    backoff = self.backoff_s
                self._restart_at[name] = now + backoff
                self._backoff[name] = min(backoff * 2, self.max_backoff_s)
                continue
            if now < at:
                continue
            del self._restart_at[name]
            code = p.returncode
            p.stop()  # what the dead leader left in its group
            p.start()
            self._restarts[name] = self._restarts.get(name, 0) + 1
            if self.on_restart is not None:
                self.on_restart(p, code)
            out.append(p)
        return out

    def stop_all(self, timeout: float = 10.0) -> None:
        """Stop every process, one stage at a time from the highest: SIGTERM to all of a stage
        at once, SIGKILL to what is left after ``timeout``."""
        with self._lock:
            self._supervised.clear()
        for stage in sorted(set(self._stage.values()), reverse=True):
            live = [p for n, p in self.procs.items() if self._stage[n] == stage and p.alive()]
            for p in live:
                p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for p in live:
                p.wait(max(0.0, deadline - time.monotonic()))
        for p in self.procs.values():
            p.stop(signal.SIGKILL, timeout=5)
