"""The `vllm serve` command lines the engine chart renders, parsed by real vLLM's own argument
parser (the .venv-vllm of `make vllm-env`): every flag exists, and the KV-event and KV-transfer
configs are read as vLLM reads them."""

from __future__ import annotations

import json
import subprocess

from ..unit.test_helm import SCHEMA, VALUE_SETS, render
from .test_real_vllm import ROOT, _needs_vllm

PARSE = r"""
import json, sys
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser
out = []
for argv in json.load(sys.stdin):
    ns = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    ev, kt = ns.kv_events_config, ns.kv_transfer_config
    out.append({"model": ns.model_tag, "served": ns.served_model_name, "port": ns.port,
                "prefix_caching": ns.enable_prefix_caching,
                "events": [ev.enable_kv_cache_events, ev.publisher, ev.endpoint,
                           ev.replay_endpoint],
                "transfer": [kt.kv_connector, kt.kv_role] if kt else None})
print("RESULT " + json.dumps(out))
"""


def test_vllm_accepts_every_command_line_the_charts_render() -> None:
    _needs_vllm()
    argvs, roles = [], []
    for value_set in ("pd-pools", "vllm-observed", "storage"):
        for d in render(SCHEMA.UMBRELLA, VALUE_SETS[value_set]):
            if d["kind"] != "Deployment":
                continue
            for c in d["spec"]["template"]["spec"]["containers"]:
                if c.get("command") == ["vllm", "serve"]:
                    argvs.append(c["args"])
                    role = d["metadata"]["labels"]["infermesh.io/role"]
                    roles.append("storage" if value_set == "storage" else role)
    assert sorted(roles) == ["both", "decode", "prefill", "storage"]
    r = subprocess.run([str(ROOT / ".venv-vllm" / "bin" / "python"), "-c", PARSE],
                       input=json.dumps(argvs), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    parsed = json.loads(line.removeprefix("RESULT "))
    for role, got in zip(roles, parsed, strict=True):
        assert got["port"] == 8000 and got["prefix_caching"] is True
        assert got["events"] == [True, "zmq", "tcp://*:5557", "tcp://*:5558"]
        want = {"both": None, "prefill": ["NixlConnector", "kv_producer"],
                "decode": ["NixlConnector", "kv_consumer"],
                "storage": ["OffloadingConnector", "kv_both"]}[role]
        assert got["transfer"] == want
    assert {g["served"][0] for g in parsed} == {"Qwen/Qwen3-8B", "llama-3.1-8b"}
