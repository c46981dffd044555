"""Every service runs through one runner: a bad setting exits with status 2 and a message that
names the setting, before anything starts."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

SERVICES = ["sim", "agent", "tokenizer", "indexer", "scheduler", "ingress"]
# A value each service's config refuses, and the field name the message must carry.
BAD = {
    "sim": (["--engines", "0"], "engines"),
    "agent": (["--heartbeat-s", "5"], "heartbeat_s"),
    "tokenizer": (["--chunk-chars", "0"], "chunk_chars"),
    "indexer": (["--max-blocks", "0"], "max_blocks"),
    "scheduler": (["--pod-timeout-s", "0"], "pod_timeout_s"),
    "ingress": (["--max-attempts", "0"], "max_attempts"),
}


def _main(service: str):  # type: ignore[no-untyped-def]
    return importlib.import_module(f"infermesh.services.{service}.__main__").main


@pytest.mark.parametrize("service", SERVICES)
def test_a_bad_value_exits_2_naming_the_field(service: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    args, field = BAD[service]
    assert _main(service)(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"infermesh {service}: ") and field in err, err


@pytest.mark.parametrize("service", SERVICES)
def test_a_value_of_the_wrong_type_names_the_flag(service: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(service)(["--http-port", "eighty"]) == 2
    assert "--http-port" in capsys.readouterr().err


@pytest.mark.parametrize("service", SERVICES)
def test_environment_and_config_file_errors_too(service: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(f"INFERMESH_{service.upper()}_HTTP_PORT", "eighty")
    assert _main(service)([]) == 2
    assert f"INFERMESH_{service.upper()}_HTTP_PORT" in capsys.readouterr().err
    monkeypatch.delenv(f"INFERMESH_{service.upper()}_HTTP_PORT")
    conf = tmp_path / "c.yaml"
    conf.write_text("no_such_knob: 1\n")
    assert _main(service)(["--config", str(conf)]) == 2
    assert "no_such_knob" in capsys.readouterr().err


@pytest.mark.parametrize("service", SERVICES)
def test_help_names_the_command_and_shows_defaults(service: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        _main(service)(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: infermesh {service}") and "(default: " in out
    assert "--ready-file" in out and "--http-port" in out


STUBBORN = '''
import asyncio, dataclasses, sys
from infermesh.libs.runtime import service_main

@dataclasses.dataclass
class Cfg:
    pass

class Stubborn:
    """Leaves behind a task that swallows its cancellation (as a reconnect loop may)."""
    async def start(self):
        async def forever():
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    pass
        self.task = asyncio.create_task(forever(), name="stubborn")
    async def stop(self):
        if sys.argv[1] == "hang":
            await asyncio.Event().wait()

raise SystemExit(service_main("stubborn", Cfg, lambda cfg: Stubborn(), "test")(
    ["--ready-file", sys.argv[2]]))
'''


@pytest.mark.parametrize("stop", ["returns", "hang"])
def test_a_stop_signal_always_ends_the_process(stop: str, tmp_path: Path) -> None:
    """Whatever the service leaves behind (a task that ignores cancellation, a stop that never
    returns), SIGTERM ends the process: a supervisor must be able to count on it."""
    import signal
    import subprocess
    import sys

    from infermesh.libs.process.ready import wait_ready_file

    ready = tmp_path / "ready.json"
    p = subprocess.Popen([sys.executable, "-c", STUBBORN, stop, str(ready)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_ready_file(ready, 30).service == "stubborn"
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) in (0, 1)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
