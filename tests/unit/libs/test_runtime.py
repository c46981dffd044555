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
