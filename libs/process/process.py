"""One child process: its own process group, its log file, and no life beyond its parent's.

Every child starts in a new session, so stopping it stops everything it started (a `vllm serve`
API server and its engine-core processes, say). On Linux it also gets ``PR_SET_PDEATHSIG``: when
the process that started it dies — even by ``kill -9``, when no clean-up code runs — the kernel
sends it SIGTERM, so nothing is left holding the system's ports.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _libc_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive ``sig`` when this process dies.

    The kernel ties the signal to the thread that forks, not the process: from any thread but the
    main one the child would die with that thread, so there it returns None (no tie).
    """
    if _PRCTL is None or threading.current_thread() is not threading.main_thread():
        return None
    parent = os.getpid()
    prctl = _PRCTL

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the tie was made
            os._exit(1)

    return preexec


def group_alive(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` is still there."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class Process:
    """A child process started from ``argv``; always stopped as a whole process group."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
        cwd: str | None = None,
        tie_to_parent: bool = True,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env or {})
        self.log = log
        self.cwd = cwd
        self.tie_to_parent = tie_to_parent
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> Process:
        """Start (or restart) the process; output goes to :attr:`log` (appended) or nowhere."""
        out: int | object = subprocess.DEVNULL
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            self.proc = subprocess.Popen(
                self.argv, env={**os.environ, **self.env}, cwd=self.cwd,
                stdin=subprocess.DEVNULL, stdout=out, stderr=out,  # type: ignore[arg-type]
                start_new_session=True,
                preexec_fn=die_with_parent() if self.tie_to_parent else None,
            )
        finally:
            if not isinstance(out, int):
                out.close()  # type: ignore[attr-defined]
        self.started_at = time.monotonic()
        return self

    @property
    def pid(self) -> int | None:
        """The pid (also the process group id) while it runs."""
        return self.proc.pid if self.proc is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit status once it exited (negative: killed by that signal)."""
        return self.proc.poll() if self.proc is not None else None

    def alive(self) -> bool:
        """Whether the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the whole process group."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the exit; the status, or None after ``timeout``."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """``sig`` to the group, SIGKILL after ``timeout``; what the group left behind goes too."""
        if self.proc is None:
            return
        pid = self.proc.pid
        if self.proc.poll() is None:
            self.send_signal(sig)
            if self.wait(timeout) is None:
                self.send_signal(signal.SIGKILL)
                self.wait(5)
        # Children that outlived the leader (same group) must not keep ports bound.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL the group, as a crash would."""
        self.stop(signal.SIGKILL)

    def tail(self, n: int = 3000) -> str:
        """The end of the log."""
        try:
            return self.log.read_text(errors="replace")[-n:] if self.log else ""
        except OSError:
            return ""

    def __repr__(self) -> str:
        return f"Process({self.name!r}, pid={self.pid}, alive={self.alive()})"
