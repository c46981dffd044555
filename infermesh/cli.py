"""The `infermesh` command: one entry point for every service and tool."""

from __future__ import annotations

import argparse
import sys


def _up(argv: list[str]) -> int:
    from infermesh.services.system.up import main

    return main(argv)


def _tilt_plan(argv: list[str]) -> int:
    from infermesh.services.system.tilt import main

    return main(argv)


def _sim(argv: list[str]) -> int:
    from infermesh.services.sim.__main__ import main

    return main(argv)


def _agent(argv: list[str]) -> int:
    from infermesh.services.agent.__main__ import main

    return main(argv)


def _ingress(argv: list[str]) -> int:
    from infermesh.services.ingress.__main__ import main

    return main(argv)


def _tokenizer(argv: list[str]) -> int:
    from infermesh.services.tokenizer.__main__ import main

    return main(argv)


def _indexer(argv: list[str]) -> int:
    from infermesh.services.indexer.__main__ import main

    return main(argv)


def _scheduler(argv: list[str]) -> int:
    from infermesh.services.scheduler.__main__ import main

    return main(argv)


def _autoscaler(argv: list[str]) -> int:
    from infermesh.services.autoscaler.__main__ import main

    return main(argv)


def _console(argv: list[str]) -> int:
    from infermesh.services.console.__main__ import main

    return main(argv)


def _bench(argv: list[str]) -> int:
    from infermesh.services.bench.runner import main

    return main(argv)


def _events(argv: list[str]) -> int:
    from infermesh.services.tools.events import main

    return main(argv)


def _schema(argv: list[str]) -> int:
    from infermesh.services.tools.schema import main

    return main(argv)


def _chaos(argv: list[str]) -> int:
    from infermesh.services.tools.kvchaos import main

    return main(argv)


def _nats_auth(argv: list[str]) -> int:
    from infermesh.services.tools.natsauth import main

    return main(argv)


def _model(argv: list[str]) -> int:
    from infermesh.libs.tinymodel.__main__ import main

    return main(argv)


COMMANDS = {
    "up": (_up, "start nats-server, simulated engines, their agents and every service"),
    "sim": (_sim, "run simulated vLLM engines"),
    "agent": (_agent, "run the vLLM worker agent for one engine"),
    "ingress": (_ingress, "run the OpenAI-compatible ingress"),
    "tokenizer": (_tokenizer, "run the tokenizer service (im.tokenize)"),
    "indexer": (_indexer, "run the KV-block indexer (im.index.lookup)"),
    "scheduler": (_scheduler, "run the scheduler (im.schedule)"),
    "autoscaler": (_autoscaler, "run the autoscaler (desired replicas per pool on im.scale.*)"),
    "console": (_console, "serve the live fleet console web page (/console)"),
    "bench": (_bench, "benchmark scheduler profiles on one workload (presets: quick, ...)"),
    "events": (_events, "bus tools: `events tail SUBJECT` prints live messages"),
    "schema": (_schema, "`schema export DIR` writes a JSON Schema per bus message"),
    "chaos": (_chaos, "fault-injecting hop between agents and the bus (drops, duplicates, "
              "reorders KV batches)"),
    "nats-auth": (_nats_auth, "NATS users for Kubernetes: a Secret of passwords and the official "
                  "NATS chart's values (docs/kubernetes.md)"),
    "model": (_model, "build the deterministic tiny model folder"),
    "tilt-plan": (_tilt_plan, "print the processes `up` runs, for the Tiltfile (JSON)"),
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a sub-command; each parses its own options (`infermesh CMD --help`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        p = argparse.ArgumentParser(prog="infermesh", description=__doc__)
        p.add_argument(
            "command",
            choices=sorted(COMMANDS),
            help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()),
        )
        if not argv or argv[0] in ("-h", "--help"):
            p.print_help()
            return 0 if argv else 2
        p.parse_args(argv[:1])  # exits with a usage error for an unknown command
        return 2
    fn, _ = COMMANDS[argv[0]]
    return fn(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
