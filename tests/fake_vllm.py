"""A stand-in for the ``vllm`` command: ``fake_vllm.py serve MODEL [vllm serve flags]``.

It reads the flags an agent passes to ``vllm serve`` (port, served name, block size and the
``--kv-events-config`` JSON) and becomes the simulator with the same endpoints, so the agent's
``--launch-vllm`` supervision is tested in every run without a real vLLM. Writes its pid to
``$FAKE_VLLM_PIDFILE`` (the simulator keeps the pid: it is exec'd).
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> None:
    if not argv or argv[0] != "serve" or len(argv) < 2:
        sys.exit("usage: fake_vllm.py serve MODEL [flags]")
    model, flags = argv[1], argv[2:]

    def opt(name: str, default: str) -> str:
        return flags[flags.index(name) + 1] if name in flags else default

    events = json.loads(opt("--kv-events-config", "{}"))
    kv = events["endpoint"].rsplit(":", 1)[1]
    replay = events["replay_endpoint"].rsplit(":", 1)[1]
    pidfile = os.environ.get("FAKE_VLLM_PIDFILE")
    if pidfile:
        with open(pidfile, "w") as f:
            f.write(str(os.getpid()))
    block = ["--block-size", opt("--block-size", "")] if "--block-size" in flags else []
    os.execv(sys.executable, [
        sys.executable, "-m", "infermesh.services.sim", "--engines", "1",
        "--http-host", opt("--host", "127.0.0.1"), "--http-port", opt("--port", "8000"),
        "--kv-port", kv, "--kv-replay-port", replay, "--kv-topic", events.get("topic", ""),
        "--served-model-name", opt("--served-model-name", model), "--time-scale", "0", *block,
    ])


if __name__ == "__main__":
    main(sys.argv[1:])
