"""CPU accounting from /proc: the stat line, process trees, and a meter around processes that
burn a known amount of CPU (only a loose lower bound is asserted: the machine is shared)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from infermesh.services.bench import cpu

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n" \
       "import sys; sys.stdout.write('done\\n'); sys.stdout.flush(); time.sleep(30)\n"


def test_parse_stat_counts_fields_after_the_command_name() -> None:
    # The command name may hold spaces and parentheses; times are in clock ticks.
    line = ("4242 (we (ird) name) S 17 4242 4242 0 -1 4194560 100 0 0 0 "
            "250 50 30 20 20 0 3 0 1000 0 0\n")
    st = cpu.parse_stat(line, ticks=100)
    assert st.pid == 4242 and st.ppid == 17
    assert st.cpu_s == pytest.approx(3.0)  # (250 + 50) / 100
    assert st.children_cpu_s == pytest.approx(0.5)  # (30 + 20) / 100


def test_read_stat_of_this_process_and_of_a_gone_one() -> None:
    import os

    me = cpu.read_stat(os.getpid())
    assert me is not None and me.pid == os.getpid() and me.cpu_s >= 0
    assert cpu.read_stat(2**22 + 12345) is None


def test_descendants_walks_the_tree() -> None:
    stats = {p: cpu.ProcStat(pid=p, ppid=pp, cpu_s=1.0, children_cpu_s=0.0)
             for p, pp in [(1, 0), (10, 1), (11, 10), (12, 10), (13, 12), (20, 1)]}
    assert sorted(cpu.descendants(10, stats)) == [10, 11, 12, 13]
    assert cpu.descendants(99, stats) == []
    assert cpu.tree_cpu_s([10, 12], stats) == pytest.approx(4.0)  # each counted once


def _burner(seconds: float, via_shell: bool = False) -> subprocess.Popen[str]:
    code = BURN.format(s=seconds)
    argv = [sys.executable, "-c", code]
    if via_shell:  # the burner is a grandchild: a shell's child
        argv = ["/bin/sh", "-c", f"{sys.executable} -c \"$BURN\"; :"]
    import os

    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "BURN": code})


@pytest.mark.parametrize("via_shell", [False, True], ids=["process", "grandchild"])
def test_meter_sees_a_process_burning_cpu(via_shell: bool) -> None:
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    time.sleep(0.3)  # past its start-up
    burner = None
    try:
        burner = _burner(0.3, via_shell=via_shell)
        meter = cpu.CpuMeter({"burner": [burner.pid], "idle": [idle.pid], "none": [None]})
        meter.start()
        assert burner.stdout is not None
        assert burner.stdout.readline().strip() == "done"
        used = meter.stop()
    finally:
        for p in (burner, idle):
            if p is not None:
                p.kill()
                p.wait()
    assert used["burner"] > 0.05  # 0.3 s burnt; loose, as the ticks and the box allow
    assert used["idle"] < used["burner"]
    assert used["none"] == 0.0


def test_meter_counts_reaped_children() -> None:
    # A parent that starts a burner, waits for it, then lingers: the child's time moves to the
    # parent's cutime, and the meter still sees it.
    child = BURN.format(s=0.3).replace("time.sleep(30)", "pass")
    code = ("import subprocess, sys, time\n"
            f"subprocess.run([sys.executable, '-c', {child!r}])\n"
            "print('reaped', flush=True); time.sleep(30)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        meter = cpu.CpuMeter({"parent": [parent.pid]}).start()
        assert parent.stdout is not None
        lines = [parent.stdout.readline().strip() for _ in range(2)]
        assert lines[-1] == "reaped"
        used = meter.stop()
    finally:
        parent.kill()
        parent.wait()
    assert used["parent"] > 0.05


def test_self_cpu_grows() -> None:
    t0 = cpu.self_cpu_s()
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    assert cpu.self_cpu_s() > t0
