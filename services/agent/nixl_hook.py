"""NIXL agents without the UCX progress thread, inside a launched vLLM engine's processes.

vLLM's NixlConnector creates its NIXL agent with the default config, whose UCX backend runs a
progress thread. On the CPU machines we run real vLLM on, that thread busy-polls a whole core
from the moment the engine is up (its ``ucp_worker_arm`` loop never settles with UCX's TCP
transport, the only one that connects here), idle or not: two P/D engines on 2 cores starve
everything else, and a decode engine's first KV pull took over a minute. Without the thread,
vLLM progresses its transfers itself, from its engine loop (``check_xfer_state``, notifications),
and a 1,000-token pull takes milliseconds (docs/vllm.md).

vLLM has no setting for it, so `.venv-vllm` carries a ``.pth`` line (deploy/local/vllm-env.sh)
that imports this module at interpreter start when ``INFERMESH_NIXL_PROGRESS_THREAD=0``, which the
agent sets for prefill and decode engines (``--vllm-nixl-progress-thread`` turns the thread back
on). It must stay importable without the project's dependencies: only the standard library and
NIXL.
"""

from __future__ import annotations

import os
from typing import Any

ENV = "INFERMESH_NIXL_PROGRESS_THREAD"


def without_progress_thread() -> bool:
    """Make ``enable_prog_thread=False`` the default of NIXL's agent config; False when NIXL is
    missing."""
    # vLLM sets this before it imports NIXL (a UCX memory-leak guard); we import NIXL first.
    os.environ.setdefault("UCX_RCACHE_MAX_UNRELEASED", "1024")
    try:
        from nixl import _api
    except ImportError:
        return False
    cls: Any = _api.nixl_agent_config
    if getattr(cls, "_infermesh_no_progress_thread", False):
        return True
    original = cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if not args:  # enable_prog_thread is the first positional parameter
            kwargs.setdefault("enable_prog_thread", False)
        original(self, *args, **kwargs)

    cls.__init__ = __init__
    cls._infermesh_no_progress_thread = True
    return True


if os.environ.get(ENV) == "0":
    without_progress_thread()
