"""One process class, one supervisor: process groups, ties to the parent, restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from infermesh.libs.process.process import Process
from infermesh.libs.process.ready import wait_for
from infermesh.libs.process.runfile import pid_alive
from infermesh.libs.process.supervisor import Supervisor

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def _pid_in(path: Path) -> int | None:
    """The pid a child wrote to ``path``, once it is all there (never a half-written file)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _wait_dead(pid: int, timeout: float = 10.0) -> None:
    wait_for(lambda: not pid_alive(pid), f"pid {pid} gone", timeout)


def test_stop_takes_the_whole_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild"
    script = ("import subprocess, sys, time; "
              f"p = subprocess.Popen({SLEEPER!r}); open({str(pidfile)!r}, 'w').write(str(p.pid)); "
              "time.sleep(600)")
    p = Process("parent", [sys.executable, "-c", script], log=tmp_path / "p.log").start()
    grandchild = wait_for(lambda: _pid_in(pidfile), "pid", 20)
    p.stop()
    assert not p.alive()
    _wait_dead(grandchild)


def test_children_die_with_their_parent_even_on_sigkill(tmp_path: Path) -> None:
    """A parent killed with SIGKILL runs no clean-up; its children must still go."""
    pidfile = tmp_path / "child"
    script = ("import time; from infermesh.libs.process.process import Process; "
              f"p = Process('c', {SLEEPER!r}).start(); "
              f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        child = wait_for(lambda: _pid_in(pidfile), "child", 30)
        assert pid_alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        _wait_dead(child)
    finally:
        if parent.poll() is None:
            parent.kill()


def test_supervisor_restarts_with_backoff_and_stops_by_stage(tmp_path: Path) -> None:
    restarted: list[tuple[str, int | None]] = []
    sup = Supervisor(tmp_path, backoff_s=0.05,
                     on_restart=lambda p, code: restarted.append((p.name, code)))
    sup.add("crash", [sys.executable, "-c", "import sys; sys.exit(3)"], stage=1)
    sup.add("steady", SLEEPER, stage=0)
    for name in ("steady", "crash"):
        sup.start(name)
    wait_for(lambda: (sup.check(), sup.restarts("crash") >= 3)[1], "three restarts", 30)
    assert restarted[0] == ("crash", 3)
    assert sup.restarts("steady") == 0
    # The backoff doubles: the third restart waited longer than the first.
    assert sup._backoff["crash"] > 0.05 * 4
    assert (tmp_path / "crash.log").exists()
    sup.stop_all()
    assert not any(p.alive() for p in sup.procs.values())


def test_stop_goes_from_the_highest_stage_down(tmp_path: Path) -> None:
    out = tmp_path / "order"
    sup = Supervisor(tmp_path)
    for name, stage in (("bus", 0), ("service", 1), ("front", 2)):
        script = ("import signal, sys, time\n"
                  "def bye(*_):\n"
                  f"    open({str(out)!r}, 'a').write({name!r} + '\\n'); sys.exit(0)\n"
                  "signal.signal(signal.SIGTERM, bye)\n"
                  f"open({str(tmp_path / name)!r}, 'w').close()\n"
                  "time.sleep(600)\n")
        sup.add(name, [sys.executable, "-c", script], stage=stage)
        sup.start(name)
    wait_for(lambda: all((tmp_path / n).exists() for n in ("bus", "service", "front")),
             "handlers installed", 30)
    sup.stop_all()
    assert out.read_text().split() == ["front", "service", "bus"]


def test_free_ports_are_never_handed_out_twice_and_avoid_the_ephemeral_range() -> None:
    from infermesh.libs.process import ports

    picked = [ports.free_port() for _ in range(300)]
    base = ports.free_port_range(8)
    picked += list(range(base, base + 8))
    assert len(picked) == len(set(picked))
    assert all(p < ports._ephemeral_low() for p in picked)
    assert all(ports.port_free(p) for p in picked)
