"""Fixtures of the end-to-end tests: the whole system as processes."""

from __future__ import annotations

from typing import Any

import pytest

from infermesh.libs.bus import NatsServer

from ..conftest import ProcessManager
from ..stack import Stack, start_stack


@pytest.fixture
def stack_factory(procs: ProcessManager, nats_server: NatsServer):
    """Call with start_stack's keyword arguments; everything stops at teardown."""

    def make(**kw: Any) -> Stack:
        return start_stack(procs, nats_server, **kw)

    return make
