"""Where `infermesh events tail` takes its bus from: flags > INFERMESH_EVENTS_* > the run file of
a running `infermesh up` > built-in defaults."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest

from infermesh.libs.config import ConfigError
from infermesh.libs.process.runfile import RunFile, write_run_file
from infermesh.services.tools.events import EventsConfig, build_parser, resolve_config

RUN_URL = "nats://127.0.0.1:4999"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No INFERMESH_EVENTS_* of the caller's, and no run file of a real `infermesh up`."""
    for key in list(os.environ):
        if key.startswith("INFERMESH_EVENTS_") or key == "INFERMESH_STATE_DIR":
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A state directory holding the run file of a secured `infermesh up`."""
    write_run_file(RunFile(pid=os.getpid(), started=time.time(), state_dir=str(tmp_path),
                           nats_url=RUN_URL, subject_prefix="run",
                           observer_credentials=str(tmp_path / "observer.json"),
                           nats_tls_ca="ca.pem"))
    return tmp_path


def resolve(argv: list[str], env: dict[str, str]) -> EventsConfig:
    args = build_parser().parse_args(["tail", "run.>", *argv])
    with pytest.MonkeyPatch.context() as m:
        for key, value in env.items():
            m.setenv(key, value)
        return resolve_config(args)[0]


def test_the_run_file_gives_every_default(state: Path) -> None:
    cfg = resolve([], {"INFERMESH_STATE_DIR": str(state)})
    assert cfg.nats_url == RUN_URL and cfg.subject_prefix == "run"
    assert cfg.nats_credentials == str(state / "observer.json")
    assert cfg.nats_tls_ca == str(state / "ca.pem")  # relative: to the state directory
    named = dataclasses.replace(cfg, state_dir=str(state))
    assert resolve(["--state-dir", str(state)], {}) == named
    assert resolve([], {"INFERMESH_EVENTS_STATE_DIR": str(state)}) == named


def test_flags_and_env_win_over_the_run_file(state: Path) -> None:
    env = {"INFERMESH_STATE_DIR": str(state)}
    cfg = resolve(["--subject-prefix", "flag"], {**env, "INFERMESH_EVENTS_SUBJECT_PREFIX": "env"})
    assert cfg.subject_prefix == "flag" and cfg.nats_url == RUN_URL
    assert resolve([], {**env, "INFERMESH_EVENTS_SUBJECT_PREFIX": "env"}).subject_prefix == "env"
    # Another identity: the observer's credentials stay out, the bus is still the run's.
    cfg = resolve(["--nats-user", "me"], {**env, "INFERMESH_EVENTS_NATS_PASSWORD": "pw"})
    assert (cfg.nats_user, cfg.nats_password, cfg.nats_credentials) == ("me", "pw", "")
    assert cfg.nats_url == RUN_URL
    # The run's own URL given again changes nothing; another bus leaves the run file out.
    assert resolve(["--nats-url", RUN_URL], env) == resolve([], env)
    cfg = resolve(["--nats-url", "nats://elsewhere:4222"], env)
    assert cfg == EventsConfig(nats_url="nats://elsewhere:4222")


def test_without_a_run_file_the_defaults_hold(tmp_path: Path) -> None:
    assert resolve([], {"INFERMESH_STATE_DIR": str(tmp_path)}) == EventsConfig()
    with pytest.raises(ConfigError, match="no run file"):
        resolve(["--state-dir", str(tmp_path)], {})


def test_prefix_is_now_subject_prefix(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["tail", "im.>", "--prefix", "x"])
    assert e.value.code == 2
    assert build_parser().parse_args(["tail", "im.>", "--subject-prefix", "x"]).subject_prefix \
        == "x"
