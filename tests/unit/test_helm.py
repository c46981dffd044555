"""The Helm charts of deploy/helm, rendered offline (helm-python-sdk: Helm v4's own engine) and
checked the way a cluster would check them, without one:

- every chart and the umbrella render with their defaults and with realistic value sets
  (replicas, auth and TLS on, autoscaling with KEDA, P/D pools, vLLM with monitoring);
- every manifest is valid for Kubernetes 1.37 (kubernetes-validate, strict: unknown fields are
  errors), and the custom resources against their CRDs' own schemas (tests/unit/helm_crds);
- values that break a chart's values.schema.json are refused, and the schemas are the ones
  deploy/helm/schema.py writes from the services' config classes;
- every config file a chart renders, and every INFERMESH_* variable it sets, is made of fields of
  that service's config class, and loads into it;
- every container running the control-plane image runs an `infermesh` command that exists, with
  flags its parser accepts (the entrypoint read from the Dockerfile).
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import re
import shlex
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from infermesh.cli import COMMANDS
from infermesh.libs.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / "deploy" / "helm"
CRDS = Path(__file__).resolve().parent / "helm_crds"
K8S_VERSION = "1.37.0"

def _schema_module() -> Any:
    """deploy/helm/schema.py (a script, not a package): loaded by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("infermesh_helm_schema", HELM / "schema.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SCHEMA = _schema_module()
CHARTS = [*SCHEMA.CONTROL_PLANE, *SCHEMA.ENGINE_CHARTS]


def render(chart: str, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every manifest of ``chart`` rendered as release ``infermesh`` in namespace ``llm``.

    A fresh load per render: Helm drops disabled dependencies from the loaded chart in place.
    """
    c = helm.Chart.load(str(HELM / chart))
    out = c.render(copy.deepcopy(values), name="infermesh", namespace="llm", is_install=True)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


PROFILES = (ROOT / "deploy" / "local" / "scheduler.yaml").read_text()

# Realistic value sets of the umbrella chart.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "replicas": {
        "ingress": {"replicaCount": 4, "antiAffinity": "hard"},
        "scheduler": {"replicaCount": 3},
        "tokenizer": {"replicaCount": 3, "podDisruptionBudget": {"minAvailable": 2}},
        "indexer": {"replicaCount": 3, "config": {"max_blocks": 2_000_000}},
        "sim": {"replicaCount": 8, "sim": {"config": {"num_gpu_blocks": 4000,
                                                       "max_num_seqs": 64}}},
    },
    "auth-tls": {
        "global": {"nats": {"url": "tls://nats.nats.svc:4222",
                            "auth": {"enabled": True, "secretName": "infermesh-nats"},
                            "tls": {"enabled": True, "secretName": "infermesh-nats-tls",
                                    "clientCertificates": True}}},
        "ingress": {"tls": {"secretName": "infermesh-https", "clientCaKey": "ca.crt"},
                    "apiKeysFile": {"secretName": "infermesh-api-keys"},
                    "config": {"rate_limit_rps": 50.0}},
    },
    "autoscaling": {
        "autoscaler": {"config": {"min_replicas": 0, "max_replicas": 16, "mode": "slo",
                                  "ttft_p90_target_s": 0.5,
                                  "pool_overrides": {"default.max_replicas": "12"}}},
        "ingress": {"config": {"no_pod_wait_s": 120.0}, "apiKey": {"secretName": "keys"}},
        "sim": {"keda": {"enabled": True, "minReplicas": 0, "maxReplicas": 16},
                "sim": {"config": {"startup_delay_s": 20.0}}},
    },
    "pd-pools": {
        "sim": {"enabled": False},
        "prefill": {"enabled": True, "replicaCount": 2, "model": {"path": "Qwen/Qwen3-8B"},
                    "vllm": {"extraArgs": ["--max-model-len", "32768"]}},
        "decode": {"enabled": True, "model": {"path": "Qwen/Qwen3-8B"},
                   "keda": {"enabled": True, "minReplicas": 1}},
    },
    "vllm-observed": {
        "global": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
                   "otel": {"endpoint": "http://otel-collector.observability:4318"}},
        "sim": {"enabled": False},
        "engine": {"enabled": True, "replicaCount": 4,
                   "model": {"path": "/models/llama-3.1-8b", "name": "llama-3.1-8b",
                             "volume": {"persistentVolumeClaim": {"claimName": "models"}}},
                   "agent": {"config": {"scrape_interval_s": 1.0, "labels": {"zone": "a"}}}},
        "ingress": {"config": {"models": ["llama-3.1-8b=/models/llama-3.1-8b"]},
                    "extraVolumes": [{"name": "models", "persistentVolumeClaim":
                                      {"claimName": "models"}}],
                    "extraVolumeMounts": [{"name": "models", "mountPath": "/models"}]},
        "scheduler": {"profiles": PROFILES},
    },
    "storage": {
        "sim": {"replicaCount": 3, "storage": {
            "enabled": True, "volume": {"persistentVolumeClaim": {"claimName": "kv-sim"}}},
            "sim": {"config": {"storage_capacity_bytes": 50_000_000_000}}},
        "engine": {"enabled": True, "replicaCount": 4,
                   "model": {"path": "Qwen/Qwen3-8B"},
                   "storage": {"enabled": True, "capacityBytes": 500_000_000_000,
                               "cpuBytes": 17_179_869_184,
                               "volume": {"persistentVolumeClaim": {"claimName": "kv"}}}},
        "indexer": {"config": {"storage_max_blocks": 2_000_000}},
    },
    "lora": {
        "sim": {"enabled": False},
        "engine": {"enabled": True, "model": {"path": "/models/llama-3.1-8b"},
                   "lora": {"enabled": True, "maxLoras": 2, "maxLoraRank": 32,
                            "modules": [{"name": "sql", "path": "/models/loras/sql"},
                                        {"name": "chat", "path": "/models/loras/chat"}],
                            "volume": {"persistentVolumeClaim": {"claimName": "loras"}}}},
    },
}

# Standalone charts need little: the engine chart only a model.
STANDALONE = {c: {} for c in CHARTS} | {"engine": {"model": {"path": "Qwen/Qwen3-8B"}}}


@functools.cache
def rendered(chart: str, value_set: str) -> tuple[dict[str, Any], ...]:
    values = VALUE_SETS[value_set] if chart == SCHEMA.UMBRELLA else STANDALONE[chart]
    return tuple(render(chart, values))


CASES = [(SCHEMA.UMBRELLA, v) for v in VALUE_SETS] + [(c, "defaults") for c in CHARTS]


def _ids(case: tuple[str, str]) -> str:
    return f"{case[0]}-{case[1]}"


# ------------------------------------------------------------------------ schemas and lint


def test_committed_schemas_are_the_generated_ones() -> None:
    for chart, schema in SCHEMA.schemas().items():
        path = HELM / chart / "values.schema.json"
        assert path.read_text() == SCHEMA.render(schema), (
            f"{path} is stale: run `make helm-schemas`")


@pytest.mark.parametrize("chart", [*CHARTS, SCHEMA.UMBRELLA])
def test_lint_finds_no_error(chart: str) -> None:
    values = {} if chart == SCHEMA.UMBRELLA else STANDALONE[chart]
    report = helm.lint(str(HELM / chart), values, with_subcharts=True,
                       kube_version=f"v{K8S_VERSION}")
    errors = [m for m in report["messages"] if m["severity"] >= 3]
    assert not errors and not report.get("errors"), report


@pytest.mark.parametrize(("values", "complaint"), [
    ({"ingress": {"config": {"not_a_knob": 1}}}, "additional properties 'not_a_knob'"),
    ({"scheduler": {"config": {"warmup_s": "soon"}}}, "/config/warmup_s"),
    ({"autoscaler": {"config": {"mode": 3}}}, "/config/mode"),
    ({"sim": {"agent": {"config": {"heartbeat_s": "fast"}}}}, "/agent/config/heartbeat_s"),
    ({"sim": {"agent": {"config": {"engine_url": "http://x"}}}}, "'engine_url' not allowed"),
    ({"ingress": {"config": {"http_port": 9}}}, "'http_port' not allowed"),
    ({"ingress": {"replicacount": 3}}, "'replicacount' not allowed"),
    ({"sim": {"role": "teacher"}}, "/role"),
    ({"global": {"nats": {"url": "http://nats:4222"}}}, "/global/nats/url"),
    ({"tokenizer": {"antiAffinity": "sometimes"}}, "/antiAffinity"),
    ({"engine": {"enabled": True, "model": {"path": "m"}, "vllm": {"extraArgs": [1]}}},
     "/vllm/extraArgs/0"),
    ({"ingres": {"enabled": True}}, "'ingres' not allowed"),
])
def test_values_that_break_the_schema_are_refused(values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm.HelmValuesError) as e:
        render(SCHEMA.UMBRELLA, values)
    assert complaint in str(e.value)


def test_engine_chart_needs_a_model() -> None:
    with pytest.raises(helm.HelmRenderError, match="model.path"):
        render("engine", {})


def test_schema_config_is_every_field_the_chart_does_not_own() -> None:
    import dataclasses

    for service, (cls, owned) in SCHEMA.SERVICES.items():
        props = SCHEMA.config_schema(service)["properties"]
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(props) == fields - owned, service
        assert owned <= fields, f"{service}: owned fields that do not exist: {owned - fields}"


# ------------------------------------------------------------------- manifests are valid


def _strict(schema: Any) -> Any:
    """A CRD's structural schema made strict, as `kubectl --validate=strict` is: an object with
    properties and no other allowance takes no unknown field."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            schema = _strict(v["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = {"type": "object"}
            out[(f"{group}/{v['name']}", kind)] = schema
    return out


def validate(doc: dict[str, Any]) -> None:
    key = (doc["apiVersion"], doc["kind"])
    if key in crd_schemas():
        jsonschema.validate(doc, crd_schemas()[key])
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_every_manifest_is_valid(case: tuple[str, str]) -> None:
    docs = rendered(*case)
    assert docs
    for doc in docs:
        try:
            validate(doc)
        except Exception as e:  # noqa: BLE001 - name the manifest
            pytest.fail(f"{doc['kind']} {doc['metadata'].get('name')}: {e}")
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"


def test_the_crd_check_catches_a_bad_custom_resource() -> None:
    (so,) = [d for d in rendered(SCHEMA.UMBRELLA, "autoscaling") if d["kind"] == "ScaledObject"]
    validate(so)
    bad = copy.deepcopy(so)
    bad["spec"]["scaleTargetRef"]["nmae"] = bad["spec"]["scaleTargetRef"].pop("name")
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)


# -------------------------------------------------------------------- what the charts run


def objects(docs: Any, kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def containers(docs: Any) -> list[dict[str, Any]]:
    return [c for d in objects(docs, "Deployment") for c in d["spec"]["template"]["spec"]
            ["containers"]]


@functools.cache
def entrypoint() -> list[str]:
    """The ENTRYPOINT of the Dockerfile (exec form)."""
    text = (ROOT / "Dockerfile").read_text()
    (line,) = [ln for ln in text.splitlines() if ln.startswith("ENTRYPOINT")]
    value = json.loads(line.removeprefix("ENTRYPOINT").strip())
    assert isinstance(value, list) and value
    return value


def our_image(c: dict[str, Any]) -> bool:
    return c["image"].startswith("ghcr.io/infermesh/infermesh:")


def service_parser(command: str) -> Any:
    main = importlib.import_module(f"infermesh.services.{command}.__main__").main
    return main.parser()


def config_class(service: str) -> type[Any]:
    return SCHEMA.SERVICES[service][0]  # type: ignore[no-any-return]


def check_config(service: str, text: str, env: dict[str, str] | None = None) -> Any:
    """A rendered config file of ``service``: only fields of its class, and it loads (with the
    container's environment, as the service reads both)."""
    import dataclasses
    import tempfile

    cls = config_class(service)
    data = yaml.safe_load(text) or {}
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - fields
    assert not unknown, f"{service}: the chart sets fields {cls.__name__} does not have: {unknown}"
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        try:
            return load_config(cls, None, env_prefix=f"INFERMESH_{service.upper()}",
                               env=env or {}, file=f.name)
        except ConfigError as e:
            pytest.fail(f"{service}: the rendered config does not load: {e}")


def _env(c: dict[str, Any]) -> dict[str, str]:
    """The container's variables, with what Kubernetes fills in at run time made up."""
    known = {"POD_IP": "10.1.2.3"}  # (a variable set from the downward API)
    out: dict[str, str] = {}
    for e in c.get("env", []):
        if "value" in e:
            v = re.sub(r"\$\((\w+)\)", lambda m: known.get(m.group(1), m.group(0)), e["value"])
        elif "fieldRef" in e.get("valueFrom", {}):
            v = {"metadata.name": "infermesh-sim-6d4b9c7f5-x2x9z",
                 "status.podIP": "10.1.2.3"}[e["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            v = "secret-value"
        out[e["name"]] = known[e["name"]] = v
    return out


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_every_command_exists_with_its_flags_and_config(case: tuple[str, str]) -> None:
    docs = rendered(*case)
    config_maps = {d["metadata"]["name"]: d.get("data", {}) for d in objects(docs, "ConfigMap")}
    ran = 0
    for d in objects(docs, "Deployment"):
        spec = d["spec"]["template"]["spec"]
        mounted = {v["name"]: v["configMap"]["name"] for v in spec.get("volumes", [])
                   if "configMap" in v}
        for c in spec["containers"]:
            if not our_image(c):
                continue
            argv = [*(c.get("command") or entrypoint()), *c.get("args", [])]
            assert argv[0] == "infermesh", argv
            command, args = argv[1], argv[2:]
            assert command in COMMANDS, f"`infermesh {command}` does not exist"
            try:
                ns = service_parser(command).parse_args(args)
            except SystemExit:
                pytest.fail(f"`infermesh {shlex.join(argv[1:])}`: flags the CLI refuses")
            env = _env(c)
            for name in env:
                if name.startswith("INFERMESH_"):
                    prefix = f"INFERMESH_{command.upper()}_"
                    assert name.startswith(prefix), f"{command} reads no {name}"
                    field = name.removeprefix(prefix).lower()
                    assert field in {f for f in config_class(command).__dataclass_fields__}, (
                        f"{name}: {command} has no field {field}")
            # The config file it is given: in a ConfigMap the pod mounts at /etc/infermesh.
            path = Path(ns.config)
            assert path.parent == Path("/etc/infermesh"), ns.config
            mount = [m for m in c["volumeMounts"] if m["mountPath"] == "/etc/infermesh"]
            assert mount, f"{c['name']}: /etc/infermesh is not mounted"
            data = config_maps[mounted[mount[0]["name"]]]
            assert path.name in data, f"{path.name} is not in the ConfigMap"
            check_config(command, data[path.name], env)
            ran += 1
    assert ran, "no container runs the control-plane image"


def test_the_config_check_catches_a_field_the_service_does_not_have() -> None:
    ok = "pod_timeout_s: 5.0\n"
    check_config("scheduler", ok)
    with pytest.raises(AssertionError, match="does not have"):
        check_config("scheduler", ok + "pod_timeout: 5.0\n")
    with pytest.raises(pytest.fail.Exception, match="does not load"):
        check_config("scheduler", "pod_timeout_s: soon\n")


def test_every_chart_sets_what_it_owns_from_values() -> None:
    """Values reach the pods: replicas, config, secrets, pool and role, KEDA's address."""
    docs = rendered(SCHEMA.UMBRELLA, "replicas")
    deps = {d["metadata"]["name"]: d for d in objects(docs, "Deployment")}
    assert deps["infermesh-ingress"]["spec"]["replicas"] == 4
    assert deps["infermesh-sim"]["spec"]["replicas"] == 8
    pdbs = {d["metadata"]["name"]: d["spec"] for d in objects(docs, "PodDisruptionBudget")}
    assert pdbs["infermesh-tokenizer"] == {"minAvailable": 2, "selector": pdbs[
        "infermesh-tokenizer"]["selector"]}
    hard = deps["infermesh-ingress"]["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" in hard

    docs = rendered(SCHEMA.UMBRELLA, "auth-tls")
    (ing,) = [c for c in containers(docs) if c["name"] == "ingress"]
    env = {e["name"]: e for e in ing["env"]}
    assert env["INFERMESH_INGRESS_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "infermesh-nats", "key": "ingress"}
    assert env["INFERMESH_INGRESS_NATS_TLS_CERT"]["value"] == "/etc/infermesh/nats-tls/tls.crt"
    assert ing["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    agents = [c for c in containers(docs) if c["name"] == "agent"]
    assert {e["valueFrom"]["secretKeyRef"]["key"] for c in agents for e in c["env"]
            if e["name"] == "INFERMESH_AGENT_NATS_PASSWORD"} == {"agent-default"}
    for d in objects(docs, "ConfigMap"):  # nothing secret in a ConfigMap
        assert "secret-value" not in json.dumps(d) and "password" not in json.dumps(d)

    docs = rendered(SCHEMA.UMBRELLA, "pd-pools")
    roles = {d["metadata"]["name"]: d["metadata"]["labels"]["infermesh.io/role"]
             for d in objects(docs, "Deployment") if "infermesh.io/role" in
             d["metadata"]["labels"]}
    assert roles == {"infermesh-prefill": "prefill", "infermesh-decode": "decode"}
    agent_cfg = {d["metadata"]["name"]: yaml.safe_load(d["data"]["agent.yaml"])
                 for d in objects(docs, "ConfigMap") if "agent.yaml" in d["data"]}
    assert agent_cfg["infermesh-decode"]["role"] == "decode"
    (so,) = objects(docs, "ScaledObject")
    assert so["spec"]["scaleTargetRef"]["name"] == "infermesh-decode"
    (trigger,) = so["spec"]["triggers"]
    assert trigger["metadata"] == {"scalerAddress": "infermesh-autoscaler:9090",
                                   "pool": "default"}
    decode = [d for d in objects(docs, "Deployment") if d["metadata"]["name"] ==
              "infermesh-decode"][0]
    assert "replicas" not in decode["spec"], "KEDA owns the replica count"
    autoscaler = yaml.safe_load(
        [d for d in objects(docs, "ConfigMap")
         if d["metadata"]["name"] == "infermesh-autoscaler"][0]["data"]["autoscaler.yaml"])
    assert autoscaler["keda_port"] == 9090 and autoscaler["keda_host"] == "0.0.0.0"


def test_vllm_engines_publish_kv_events_where_the_agent_reads_them() -> None:
    docs = rendered(SCHEMA.UMBRELLA, "vllm-observed")
    (dep,) = [d for d in objects(docs, "Deployment") if d["metadata"]["name"] ==
              "infermesh-engine"]
    vllm, agent = dep["spec"]["template"]["spec"]["containers"]
    assert vllm["command"] == ["vllm", "serve"]
    args = vllm["args"]
    events = json.loads(args[args.index("--kv-events-config") + 1])
    cfg = yaml.safe_load([d for d in objects(docs, "ConfigMap") if d["metadata"]["name"] ==
                          "infermesh-engine"][0]["data"]["agent.yaml"])
    # vLLM binds (wildcard), the agent connects over localhost to the same ports.
    assert events["endpoint"].replace("*", "127.0.0.1") == cfg["kv_endpoint"]
    assert events["replay_endpoint"].replace("*", "127.0.0.1") == cfg["replay_endpoint"]
    assert events["enable_kv_cache_events"] is True and events["publisher"] == "zmq"
    assert args[0] == "/models/llama-3.1-8b" and "--enable-prefix-caching" in args
    assert args[args.index("--served-model-name") + 1] == "llama-3.1-8b"
    # The agent advertises the engine at the pod's address.
    env = _env(agent)
    assert env["INFERMESH_AGENT_ENGINE_URL"] == "http://10.1.2.3:8000"
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "models"}} in \
        dep["spec"]["template"]["spec"]["volumes"]
    monitors = {d["metadata"]["name"]: d for d in objects(docs, "ServiceMonitor")}
    assert {e["port"] for e in monitors["infermesh-engine"]["spec"]["endpoints"]} == {
        "http", "agent"}
    assert monitors["infermesh-ingress"]["metadata"]["labels"]["release"] == "prometheus"
    assert all(e["value"] == "http://otel-collector.observability:4318"
               for c in containers(docs) for e in c["env"]
               if e["name"] == "OTEL_EXPORTER_OTLP_ENDPOINT")
    sched = [d for d in objects(docs, "ConfigMap") if d["metadata"]["name"] ==
             "infermesh-scheduler"][0]["data"]
    assert yaml.safe_load(sched["scheduler.yaml"])["profiles_file"] == \
        "/etc/infermesh/profiles.yaml"
    assert sched["profiles.yaml"].strip() == PROFILES.strip()


def test_the_profiles_a_chart_ships_parse() -> None:
    from infermesh.libs.scheduling.config import parse_pipeline

    parse_pipeline(yaml.safe_load(PROFILES), "values.scheduler.profiles")


def test_nats_auth_secret_has_every_password_the_charts_read(tmp_path: Path) -> None:
    """`infermesh nats-auth` writes the Secret the charts' global.nats.auth names."""
    from infermesh.services.tools.natsauth import write

    secret_path, _ = write(tmp_path, ["default"], secret_name="infermesh-nats", namespace="llm")
    secret = yaml.safe_load(secret_path.read_text())
    validate(secret)
    docs = rendered(SCHEMA.UMBRELLA, "auth-tls")
    wanted = {e["valueFrom"]["secretKeyRef"]["key"] for c in containers(docs)
              for e in c.get("env", []) if e["name"].endswith("_NATS_PASSWORD")}
    assert wanted and wanted <= set(secret["stringData"]), wanted - set(secret["stringData"])


def test_simulated_prefill_and_decode_engines_speak_the_nixl_protocol() -> None:
    for role, connector in (("prefill", True), ("decode", True), ("both", False)):
        docs = render("sim", {"role": role})
        (cm,) = objects(docs, "ConfigMap")
        cfg = check_config("sim", cm["data"]["sim.yaml"])
        assert cfg.kv_connector is connector
        (sim,) = [c for c in containers(docs) if c["name"] == "sim"]
        # The decode engine reads the blocks from the prefill pod's own address.
        assert _env(sim)["INFERMESH_SIM_KV_TRANSFER_HOST"] == "10.1.2.3"
    docs = render("sim", {"role": "prefill", "sim": {"config": {"kv_connector": False}}})
    assert check_config("sim", objects(docs, "ConfigMap")[0]["data"]["sim.yaml"]
                        ).kv_connector is False


def test_the_storage_tier_mounts_one_volume_and_wires_vllm_as_the_agent_does() -> None:
    """The engine chart's storage tier: the shared claim mounted, infermesh's vLLM extension
    copied in and on PYTHONPATH, and exactly the --kv-transfer-config the agent gives vLLM
    (libs/vllm_ext.kv_transfer_config); the simulator chart sets storage_dir to the mount."""
    from infermesh.libs.vllm_ext import kv_transfer_config

    docs = rendered(SCHEMA.UMBRELLA, "storage")
    deps = {d["metadata"]["name"]: d for d in objects(docs, "Deployment")}
    pod = deps["infermesh-engine"]["spec"]["template"]["spec"]
    vllm = pod["containers"][0]
    args = vllm["args"]
    got = json.loads(args[args.index("--kv-transfer-config") + 1])
    want = kv_transfer_config("/kv-storage", cpu_bytes=17_179_869_184,
                              capacity_bytes=500_000_000_000, engine_id="$(POD_NAME)")
    assert got == want
    env = _env(vllm)
    assert env["PYTHONPATH"] == "/opt/infermesh-ext" and env["PYTHONHASHSEED"] == "0"
    assert any(e["name"] == "POD_NAME" for e in vllm["env"])
    mounts = {m["name"]: m["mountPath"] for m in vllm["volumeMounts"]}
    assert mounts["kv-storage"] == "/kv-storage" and mounts["vllm-ext"] == "/opt/infermesh-ext"
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["kv-storage"]["persistentVolumeClaim"] == {"claimName": "kv"}
    (init,) = pod["initContainers"]
    assert init["command"][:2] == ["python", "-c"] and "infermesh" in init["command"][2]
    assert init["volumeMounts"] == [{"name": "vllm-ext", "mountPath": "/opt/infermesh-ext"}]
    # The simulator: its config names the mount.
    sim_pod = deps["infermesh-sim"]["spec"]["template"]["spec"]
    (sim,) = [c for c in sim_pod["containers"] if c["name"] == "sim"]
    assert {m["name"]: m["mountPath"] for m in sim["volumeMounts"]}["kv-storage"] == "/kv-storage"
    (cm,) = [d for d in objects(docs, "ConfigMap") if d["metadata"]["name"] == "infermesh-sim"]
    cfg = check_config("sim", cm["data"]["sim.yaml"])
    assert cfg.storage_dir == "/kv-storage" and cfg.storage_capacity_bytes == 50_000_000_000


@pytest.mark.parametrize(("values", "complaint"), [
    ({"role": "prefill", "storage": {"enabled": True, "volume": {"emptyDir": {}}}},
     "does not combine with role prefill/decode"),
    ({"storage": {"enabled": True}}, "storage.volume"),
])
def test_the_storage_tier_refuses_what_cannot_work(values: dict[str, Any],
                                                   complaint: str) -> None:
    with pytest.raises(Exception, match=complaint):
        render("engine", {"model": {"path": "m"}, **values})


def test_lora_gives_vllm_the_agents_flags_and_the_agent_the_lora_directory() -> None:
    """The engine chart's lora block: the same `vllm serve` flags and environment as the agent's
    --vllm-*lora* knobs give an engine it launches, and the LoRA directory mounted in both
    containers, the agent told where (it lists the adapters there as the pod's)."""
    from infermesh.services.agent.vllm_launcher import LoraSettings

    docs = rendered(SCHEMA.UMBRELLA, "lora")
    (dep,) = [d for d in objects(docs, "Deployment") if d["metadata"]["name"] ==
              "infermesh-engine"]
    vllm, agent = dep["spec"]["template"]["spec"]["containers"]
    want = LoraSettings(modules=(("sql", "/models/loras/sql"), ("chat", "/models/loras/chat")),
                        max_loras=2, max_lora_rank=32, lora_dir="/loras")
    args = vllm["args"]
    i = args.index("--enable-lora")
    assert args[i : i + len(want.args())] == want.args()
    env = _env(vllm)
    assert {k: env[k] for k in want.environ()} == want.environ()
    mounts = {m["name"]: m["mountPath"] for m in vllm["volumeMounts"]}
    assert mounts["loras"] == "/loras"
    assert {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}["loras"] == "/loras"
    cfg = yaml.safe_load([d for d in objects(docs, "ConfigMap") if d["metadata"]["name"] ==
                          "infermesh-engine"][0]["data"]["agent.yaml"])
    assert cfg["lora_dir"] == "/loras"
    # off by default: no LoRA flag
    (dep,) = [d for d in objects(rendered(SCHEMA.UMBRELLA, "vllm-observed"), "Deployment")
              if d["metadata"]["name"] == "infermesh-engine"]
    assert not any("lora" in a for a in dep["spec"]["template"]["spec"]["containers"][0]["args"])
