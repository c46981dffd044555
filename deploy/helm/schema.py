"""The ``values.schema.json`` of every chart under deploy/helm/, written from the code.

``python deploy/helm/schema.py`` (``make helm-schemas``) writes them; the committed files are what
this writes (tests/unit/test_helm.py checks it). The ``config`` section of a chart is the
service's own config class (``IngressConfig``, ``AgentConfig``, …): one property per field, with
its type, default and help, and nothing else allowed. So Helm itself refuses, at install time,
a config key the service does not have or a value of the wrong type, and a field renamed in the
code fails the test until the schema (and any chart setting it) follows. The fields a chart
sets itself (the bus, the HTTP listener, secrets, ports) are left out: values cannot set them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from infermesh.services.agent.config import AgentConfig
from infermesh.services.autoscaler.config import AutoscalerConfig
from infermesh.services.console.config import ConsoleConfig
from infermesh.services.indexer.config import IndexerConfig
from infermesh.services.ingress.config import IngressConfig
from infermesh.services.scheduler.config import SchedulerConfig
from infermesh.services.sim.config import SimConfig
from infermesh.services.tokenizer.config import TokenizerConfig

HERE = Path(__file__).resolve().parent

# Fields every chart sets from global values and Secrets, and the HTTP listener it probes.
BUS_AND_HTTP = frozenset({
    "nats_url", "subject_prefix", "nats_credentials", "nats_user", "nats_password",
    "nats_tls_ca", "nats_tls_cert", "nats_tls_key", "http_host", "http_port",
})

# service -> (config class, the fields its charts own).
SERVICES: dict[str, tuple[type[Any], frozenset[str]]] = {
    "ingress": (IngressConfig, BUS_AND_HTTP | {
        "tls_cert_file", "tls_key_file", "tls_ca_file", "api_key", "api_keys_file"}),
    "tokenizer": (TokenizerConfig, BUS_AND_HTTP),
    "indexer": (IndexerConfig, BUS_AND_HTTP),
    "scheduler": (SchedulerConfig, BUS_AND_HTTP | {"profiles_file"}),
    "autoscaler": (AutoscalerConfig, BUS_AND_HTTP | {"keda_host", "keda_port"}),
    "console": (ConsoleConfig, BUS_AND_HTTP),
    "agent": (AgentConfig, BUS_AND_HTTP | {
        "pool", "pod", "role", "engine_url", "kv_endpoint", "replay_endpoint", "launch_vllm",
        "vllm_command", "vllm_port", "vllm_kv_port", "vllm_replay_port", "vllm_args",
        "vllm_log", "vllm_nixl_port", "vllm_nixl_host", "vllm_kv_lease_s",
        "vllm_nixl_progress_thread", "vllm_storage_dir", "vllm_storage_capacity_bytes",
        "vllm_storage_locality", "vllm_offload_cpu_bytes", "vllm_hash_seed", "lora_dir",
        "vllm_loras", "vllm_enable_lora", "vllm_max_loras", "vllm_max_lora_rank",
        "vllm_lora_runtime_updating"}),
    "sim": (SimConfig, frozenset({"engines", "http_host", "http_port", "kv_port",
                                  "kv_replay_port", "kv_transfer_host", "storage_dir"})),
}

# chart -> the control-plane service it runs (None: an engine chart).
CONTROL_PLANE = {
    "ingress": "ingress", "tokenizer": "tokenizer", "indexer": "indexer",
    "scheduler": "scheduler", "autoscaler": "autoscaler", "console": "console",
}
ENGINE_CHARTS = ("engine", "sim")
UMBRELLA = "infermesh"
# The umbrella's sections: each is the values of the chart it names (prefill/decode: aliases of
# the engine chart).
UMBRELLA_SECTIONS = {**{c: c for c in CONTROL_PLANE}, "sim": "sim", "engine": "engine",
                     "prefill": "engine", "decode": "engine"}


def _json_type(tp: Any) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        (one,) = inner
        s = _json_type(one)
        s["type"] = [s["type"], "null"]
        return s
    if origin is Literal:
        return {"type": "string", "enum": list(typing.get_args(tp))}
    if origin is list:
        (item,) = typing.get_args(tp) or (str,)
        return {"type": "array", "items": _json_type(item)}
    if origin is dict or tp is dict:
        return {"type": "object", "additionalProperties": {"type": "string"}}
    simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if tp in simple:
        return {"type": simple[tp]}
    raise TypeError(f"no JSON Schema type for {tp!r}")


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def config_schema(service: str) -> dict[str, Any]:
    """The JSON Schema of a chart's ``config`` for ``service``: its config class, less the fields
    the chart owns, nothing else allowed."""
    cls, owned = SERVICES[service]
    hints = typing.get_type_hints(cls)
    props: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in owned:
            continue
        s = _json_type(hints[f.name])
        s["description"] = f.metadata.get("help", "")
        default = _default(f)
        if default is not None or isinstance(s["type"], list):
            s["default"] = default
        props[f.name] = s
    return {
        "type": "object",
        "description": f"The {service}'s own config ({cls.__name__}; docs/{service}.md)",
        "properties": props,
        "additionalProperties": False,
    }


def owned_fields(service: str) -> frozenset[str]:
    """The fields of ``service`` that its charts set themselves."""
    return SERVICES[service][1]


# ------------------------------------------------------------------ the values every chart has

_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_INT_OR_STR = {"type": ["integer", "string"]}
_OBJ = {"type": "object"}
_ARR = {"type": "array"}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}


def _obj(props: dict[str, Any], *, closed: bool = True, **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props, "additionalProperties": not closed, **extra}


IMAGE = _obj({
    "repository": _STR,
    "tag": _STR,
    "pullPolicy": {"type": "string", "enum": ["", "Always", "IfNotPresent", "Never"]},
})

GLOBAL = _obj({
    "image": IMAGE,
    "imagePullSecrets": _ARR,
    "nats": _obj({
        "url": {"type": "string", "pattern": r"^(nats|tls|ws|wss)://",
                "description": "NATS URL(s), comma-separated"},
        "subjectPrefix": {"type": "string", "pattern": r"^[A-Za-z0-9_-]+$"},
        "auth": _obj({"enabled": _BOOL, "secretName": _STR}),
        "tls": _obj({"enabled": _BOOL, "secretName": _STR, "clientCertificates": _BOOL}),
    }),
    "otel": _obj({"endpoint": _STR, "sampler": _STR, "samplerArg": _STR}),
    "serviceMonitor": _obj({"enabled": _BOOL, "interval": _STR, "labels": _STR_MAP}),
}, closed=False, description="Shared by every infermesh chart (the umbrella sets it once)")

POD = {
    "enabled": {**_BOOL, "description": "Used by the umbrella chart (condition)"},
    "replicaCount": {"type": "integer", "minimum": 0},
    "image": IMAGE,
    "fullnameOverride": _STR,
    "extraVolumes": _ARR,
    "extraVolumeMounts": _ARR,
    "podAnnotations": _STR_MAP,
    "antiAffinity": {"type": "string", "enum": ["soft", "hard", "none"]},
    "affinity": _OBJ,
    "nodeSelector": _STR_MAP,
    "tolerations": _ARR,
    "terminationGracePeriodSeconds": {"type": "integer", "minimum": 0},
    "podDisruptionBudget": _obj({"enabled": _BOOL, "maxUnavailable": _INT_OR_STR,
                                 "minAvailable": _INT_OR_STR}),
    "serviceMonitor": _obj({"enabled": _BOOL, "interval": _STR, "labels": _STR_MAP}),
    # Helm gives every chart a section for each of its dependencies: the library chart's.
    "infermesh-common": _OBJ,
}
RESOURCES = _obj({"requests": _OBJ, "limits": _OBJ, "claims": _ARR})
SERVICE = _obj({
    "type": {"type": "string", "enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
    "port": {"type": "integer", "minimum": 1, "maximum": 65535},
    "annotations": _STR_MAP,
})
SECRET_KEY = _obj({"secretName": _STR, "key": _STR})


def _root(props: dict[str, Any], title: str) -> dict[str, Any]:
    return {"$schema": "https://json-schema.org/draft-07/schema#", "title": title,
            **_obj({"global": GLOBAL, **props})}


def control_plane_schema(chart: str) -> dict[str, Any]:
    """A control-plane chart: the pod values, its service and its ``config``."""
    service = CONTROL_PLANE[chart]
    props: dict[str, Any] = {**POD, "extraEnv": _ARR, "resources": RESOURCES,
                             "service": SERVICE, "config": config_schema(service)}
    if chart == "ingress":
        props["tls"] = _obj({"secretName": _STR, "clientCaKey": _STR})
        props["apiKey"] = SECRET_KEY
        props["apiKeysFile"] = SECRET_KEY
    if chart == "scheduler":
        props["profiles"] = {**_STR, "description": "A profiles file (YAML text)"}
    if chart == "autoscaler":
        props["keda"] = _obj({"port": {"type": "integer", "minimum": -1, "maximum": 65535}})
    return _root(props, f"infermesh {chart} chart values")


def engine_schema(chart: str) -> dict[str, Any]:
    """An engine chart (vLLM or the simulator, with the agent beside it)."""
    props: dict[str, Any] = {
        **POD,
        "pool": {"type": "string", "pattern": r"^[A-Za-z0-9_-]+$"},
        "role": {"type": "string", "enum": ["both", "prefill", "decode"]},
        "drain": _obj({"enabled": _BOOL}),
        "agent": _obj({"resources": RESOURCES, "extraEnv": _ARR,
                       "config": config_schema("agent")}),
        "keda": _obj({
            "enabled": _BOOL, "scalerAddress": _STR, "push": _BOOL,
            "minReplicas": {"type": "integer", "minimum": 0},
            "maxReplicas": {"type": "integer", "minimum": 1},
            "pollingInterval": {"type": "integer", "minimum": 1},
            "cooldownPeriod": {"type": "integer", "minimum": 0},
        }),
    }
    if chart == "engine":
        props["model"] = _obj({"path": _STR, "name": _STR, "volume": _OBJ, "mountPath": _STR})
        props["vllm"] = _obj({
            "image": IMAGE, "extraArgs": {"type": "array", "items": _STR}, "env": _ARR,
            "hashSeed": _STR, "nixl": _BOOL, "shmSize": _STR,
            "startupFailureThreshold": {"type": "integer", "minimum": 1},
            "resources": RESOURCES,
        })
        props["storage"] = _obj({
            "enabled": _BOOL, "volume": _OBJ, "mountPath": _STR,
            "capacityBytes": {"type": "integer", "minimum": 0},
            "cpuBytes": {"type": "integer", "minimum": 1},
            "locality": {"type": "string", "enum": ["REMOTE", "LOCAL"]},
        })
        props["lora"] = _obj({
            "enabled": _BOOL,
            "maxLoras": {"type": "integer", "minimum": 1},
            "maxLoraRank": {"type": "integer", "minimum": 1},
            "modules": {"type": "array", "items": _obj(
                {"name": {"type": "string", "pattern": r"^[^/=]+$"}, "path": _STR},
                required=["name", "path"])},
            "runtimeUpdating": _BOOL, "volume": _OBJ, "mountPath": _STR,
        })
    else:
        props["sim"] = _obj({"resources": RESOURCES, "config": config_schema("sim")})
        props["storage"] = _obj({"enabled": _BOOL, "volume": _OBJ, "mountPath": _STR})
    return _root(props, f"infermesh {chart} chart values")


def umbrella_schema() -> dict[str, Any]:
    """The umbrella: ``global`` and one section per chart. Helm checks each section against its
    chart's own schema as well."""
    sections = {name: {"type": "object", "description": f"Values of the {chart} chart",
                       "properties": {"enabled": _BOOL}}
                for name, chart in UMBRELLA_SECTIONS.items()}
    return _root(sections, "infermesh umbrella chart values")


def schemas() -> dict[str, dict[str, Any]]:
    """chart folder name -> its values.schema.json."""
    out = {c: control_plane_schema(c) for c in CONTROL_PLANE}
    out.update({c: engine_schema(c) for c in ENGINE_CHARTS})
    out[UMBRELLA] = umbrella_schema()
    return out


def render(schema: dict[str, Any]) -> str:
    """The file text (stable: sorted keys)."""
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write every chart's values.schema.json."""
    for chart, schema in schemas().items():
        path = HERE / chart / "values.schema.json"
        path.write_text(render(schema))
        print(path.relative_to(HERE.parent.parent), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
