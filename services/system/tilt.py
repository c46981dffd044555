"""`infermesh tilt-plan [up flags]`: the plan of `infermesh up`, as the Tiltfile's resources.

The Tiltfile runs this when Tilt loads it and turns every entry into a ``local_resource``, so
`tilt up` runs exactly the processes `infermesh up` runs — the same command lines, NATS users and
permissions included. Like `up`, it writes the state folder (NATS configs, credentials; existing
passwords are kept, so a reload does not lock out running services) and a run.json naming Tilt
as the owner of the run, so `infermesh events tail` finds the bus.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any
from urllib.parse import urlparse

from infermesh.libs.config import ConfigError
from infermesh.libs.process.runfile import RunFile, write_run_file
from infermesh.libs.tinymodel import ensure_model_folder

from .plan import SystemPlan, plan
from .run import prepare_state
from .up import build_parser, spec_from_args

LABELS = {"nats": "infra", "sim": "engines", "agent": "agents", "tokenizer": "routing",
          "indexer": "routing", "scheduler": "routing", "ingress": "routing",
          "autoscaler": "scaling", "console": "console"}


def resources(plan_: SystemPlan) -> list[dict[str, Any]]:
    """One Tilt ``local_resource`` per process (plus the model build), as plain data."""
    out: list[dict[str, Any]] = [{
        "name": "model",
        "cmd": [sys.executable, "-m", "infermesh.libs.tinymodel", str(plan_.model_dir)],
        "deps": ["libs/tinymodel"], "labels": ["infra"],
    }]
    for p in plan_.processes:
        if p.parked:
            continue  # engine slots only `up`'s actuator starts (autoscale)
        probe = None
        if p.health_url:
            u = urlparse(p.health_url)
            probe = {"host": u.hostname, "port": u.port, "path": u.path,
                     "scheme": u.scheme}
        needs_model = p.kind in ("sim", "tokenizer") or (p.kind == "agent"
                                                        and "--launch-vllm" in p.argv)
        out.append({
            "name": p.name,
            "serve_cmd": list(p.argv),
            "serve_env": {"PYTHONUNBUFFERED": "1", **p.env},
            "deps": list(p.watch),
            "resource_deps": [*(["model"] if needs_model else []), *p.after],
            "readiness": probe,
            "links": [{"url": v, "name": k} for k, v in p.links.items()
                      if v.startswith(("http://", "https://"))],
            "labels": [LABELS[p.kind]],
        })
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the plan as JSON on stdout."""
    parser = build_parser("infermesh tilt-plan", __doc__ or "")
    args = parser.parse_args(argv)
    try:
        plan_ = plan(spec_from_args(args))
    except ConfigError as e:
        print(f"infermesh tilt-plan: {e}", file=sys.stderr)
        return 2
    if not plan_.spec.model:
        ensure_model_folder(plan_.model_dir)
    prepare_state(plan_)
    spec = plan_.spec
    write_run_file(RunFile(
        pid=os.getppid(), started=time.time(), state_dir=str(plan_.state_dir),
        nats_url=plan_.nats_url, subject_prefix=spec.subject_prefix,
        ingress_url=plan_.ingress_urls[0],
        observer_credentials=str(plan_.credentials("observer")) if spec.bus_auth else ""))
    json.dump({"resources": resources(plan_), "state_dir": str(plan_.state_dir)}, sys.stdout,
              indent=1)
    sys.stdout.write("\n")
    return 0
