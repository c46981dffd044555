"""The Tiltfile parses with Tilt's Starlark dialect and runs the same processes as `infermesh up`.

The Tiltfile is executed by the Go Starlark interpreter (PyPI ``starlark-go``, the implementation
Tilt embeds) against stubs of the Tilt builtins it may use. The stubs are written in Starlark,
with Tilt's signatures, and only record their calls: an unknown builtin or keyword fails the test
the way ``tilt up`` would fail. Tilt's ``os`` and ``config`` modules are attribute namespaces, which
plain Starlark cannot build, so ``os.getenv`` etc. are renamed token by token (``os__getenv``)
before execution.

The recorded resources are then checked against the launcher (services/launcher.py): the same
modules, flags, default ports and port scheme (engine i: HTTP P+i, KV events K+2i, replay K+2i+1).
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

starlark_go = pytest.importorskip("starlark_go")

ROOT = Path(__file__).resolve().parents[2]
TILTFILE = ROOT / "Tiltfile"
LAUNCHER = ROOT / "services" / "launcher.py"

# `infermesh.X` → folder, as in pyproject.toml's package-dir.
PACKAGE_DIRS = {
    "infermesh.proto": ROOT / "proto",
    "infermesh.libs": ROOT / "libs",
    "infermesh.services": ROOT / "services",
    "infermesh": ROOT / "infermesh",
}
SIM_MAIN = ROOT / "services" / "sim" / "__main__.py"

# Tilt's builtins, with the signatures of Tilt's API reference (docs.tilt.dev/api.html); every
# call is appended to `_calls`, and values such as probes and links are tagged dicts.
PRELUDE = r'''
_calls = []
_defined = {}
TRIGGER_MODE_AUTO = "TRIGGER_MODE_AUTO"
TRIGGER_MODE_MANUAL = "TRIGGER_MODE_MANUAL"

def local_resource(name, cmd="", deps=None, trigger_mode=TRIGGER_MODE_AUTO, resource_deps=[],
                   ignore=[], auto_init=True, serve_cmd="", cmd_bat="", serve_cmd_bat="",
                   allow_parallel=False, links=[], tags=[], env={}, serve_env={},
                   readiness_probe=None, dir="", serve_dir="", labels=[]):
    _calls.append({"fn": "local_resource", "name": name, "cmd": cmd, "deps": deps,
                   "trigger_mode": trigger_mode, "resource_deps": resource_deps,
                   "ignore": ignore, "auto_init": auto_init, "serve_cmd": serve_cmd,
                   "allow_parallel": allow_parallel, "links": links, "tags": tags, "env": env,
                   "serve_env": serve_env, "readiness_probe": readiness_probe, "dir": dir,
                   "serve_dir": serve_dir, "labels": labels})

def probe(initial_delay_secs=0, timeout_secs=1, period_secs=10, success_threshold=1,
          failure_threshold=3, exec=None, http_get=None, tcp_socket=None):
    return {"__type": "probe", "initial_delay_secs": initial_delay_secs,
            "timeout_secs": timeout_secs, "period_secs": period_secs,
            "success_threshold": success_threshold, "failure_threshold": failure_threshold,
            "exec": exec, "http_get": http_get, "tcp_socket": tcp_socket}

def http_get_action(port, host="localhost", scheme="http", path=""):
    return {"__type": "http_get_action", "port": port, "host": host, "scheme": scheme,
            "path": path}

def tcp_socket_action(port, host="localhost"):
    return {"__type": "tcp_socket_action", "port": port, "host": host}

def exec_action(command):
    return {"__type": "exec_action", "command": command}

def link(url, name=""):
    return {"__type": "link", "url": url, "name": name}

def os__getenv(key, default=None):
    return _env.get(key, default)

os__environ = _env

def os__path__join(path, *paths):
    out = path
    for p in paths:
        if p.startswith("/"):
            out = p
        elif out == "" or out.endswith("/"):
            out = out + p
        else:
            out = out + "/" + p
    return out

def _define(kind, name, args, usage):
    if name in _defined:
        fail("config setting %r defined twice" % name)
    _defined[name] = {"kind": kind, "args": args, "usage": usage}

def config__define_string(name, args=False, usage=""):
    _define("string", name, args, usage)

def config__define_string_list(name, args=False, usage=""):
    _define("string_list", name, args, usage)

def config__define_bool(name, args=False, usage=""):
    _define("bool", name, args, usage)

def config__parse():
    for k in _args:
        if k not in _defined:
            fail("unknown config setting %r (tilt up -- --%s)" % (k, k))
    return {k: v for k, v in _args.items()}

config__main_dir = _main_dir
config__main_path = _main_dir + "/Tiltfile"
config__tilt_subcommand = "up"
# ---- the Tiltfile follows
'''
PRELUDE_LINES = PRELUDE.count("\n")

NAMESPACES = {"os", "config"}


def rename_namespaces(source: str) -> str:
    """``os.path.join`` → ``os__path__join`` (names only; strings and comments are untouched)."""
    toks = list(tokenize.generate_tokens(io.StringIO(source).readline))
    lines = source.splitlines(keepends=True)
    edits: list[tuple[int, int, int, str]] = []  # (row, start col, end col, text)
    i = 0
    while i < len(toks):
        t = toks[i]
        prev = toks[i - 1] if i else None
        if (t.type == tokenize.NAME and t.string in NAMESPACES
                and not (prev and prev.type == tokenize.OP and prev.string == ".")):
            parts, j = [t.string], i
            while (j + 2 < len(toks) and toks[j + 1].string == "."
                   and toks[j + 2].type == tokenize.NAME):
                parts.append(toks[j + 2].string)
                j += 2
            if j > i:
                assert toks[j].end[0] == t.start[0], "a dotted name split over lines"
                edits.append((t.start[0], t.start[1], toks[j].end[1], "__".join(parts)))
                i = j
        i += 1
    for row, c0, c1, text in reversed(edits):
        line = lines[row - 1]
        lines[row - 1] = line[:c0] + text + line[c1:]
    return "".join(lines)


def run_tiltfile(env: dict[str, str] | None = None,
                 args: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Execute the Tiltfile as `tilt up` would; return its local resources by name."""
    # Tilt's dialect: top-level if/for, global reassignment, set() and while/recursion.
    starlark_go.configure_starlark(allow_set=True, allow_global_reassign=True,
                                   allow_recursion=True)
    sl = starlark_go.Starlark(globals={"_env": dict(env or {}), "_args": dict(args or {}),
                                       "_main_dir": str(ROOT)})
    # One exec: a module's globals (the record list too) freeze when its exec ends.
    try:
        sl.exec(PRELUDE + rename_namespaces(TILTFILE.read_text()), filename="Tiltfile")
    except starlark_go.StarlarkError as e:
        e.add_note(f"(Tiltfile line = reported line - {PRELUDE_LINES}: the stubs come first)")
        raise
    calls = sl.get("_calls")
    resources: dict[str, dict[str, Any]] = {}
    for c in calls:
        assert c["name"] not in resources, f"resource {c['name']!r} defined twice"
        resources[c["name"]] = c
    return resources


def argv(res: dict[str, Any]) -> list[str]:
    """The resource's command (serve_cmd if any) as an argv list."""
    cmd = res["serve_cmd"] or res["cmd"]
    assert isinstance(cmd, list) and cmd, f"{res['name']}: command should be an argv list"
    assert all(isinstance(a, str) for a in cmd), f"{res['name']}: non-string argument in {cmd}"
    return cmd


def flags(cmd: list[str]) -> dict[str, str]:
    """``--flag value`` pairs of a command line (every flag of ours takes a value)."""
    out: dict[str, str] = {}
    for i, a in enumerate(cmd):
        if a.startswith("--"):
            assert i + 1 < len(cmd) and not cmd[i + 1].startswith("--"), f"{a} has no value"
            assert a not in out, f"{a} given twice"
            out[a] = cmd[i + 1]
    return out


def module_of(cmd: list[str]) -> str:
    assert cmd[1] == "-m", f"expected `python -m MODULE`, got {cmd[:3]}"
    return cmd[2]


def module_path(module: str) -> Path:
    """The file `python -m module` runs, per the package-dir mapping of pyproject.toml."""
    for pkg, folder in sorted(PACKAGE_DIRS.items(), key=lambda kv: -len(kv[0])):
        if module == pkg or module.startswith(pkg + "."):
            rest = module[len(pkg) :].lstrip(".")
            base = folder.joinpath(*rest.split(".")) if rest else folder
            return base / "__main__.py" if base.is_dir() else base.with_suffix(".py")
    raise AssertionError(f"{module} is not an infermesh module")


def agents(res: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in res.values()
            if argv(r)[1:3] == ["-m", "infermesh.services.agent"]]


def launcher_flags() -> dict[str, set[str]]:
    """The ``--flags`` launcher.main passes to each module it starts (read from its source).

    Only the simulator mode is modelled by the Tiltfile: the agent call that launches real vLLM
    (it has ``--launch-vllm``) is left out.
    """
    out: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(LAUNCHER.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "_py" and node.args
                and isinstance(node.args[0], ast.Constant)):
            found = {a.value for a in node.args[1:]
                     if isinstance(a, ast.Constant) and isinstance(a.value, str)
                     and a.value.startswith("--")}
            if "--launch-vllm" in found:
                continue
            out.setdefault(node.args[0].value, set()).update(found)
    assert out, "no _py(...) calls found in services/launcher.py"
    return out


@pytest.fixture(scope="module")
def default() -> dict[str, dict[str, Any]]:
    return run_tiltfile()


@pytest.fixture(scope="module")
def launcher_defaults() -> Any:
    from infermesh.services.launcher import build_parser

    return build_parser().parse_args([])


# --------------------------------------------------------------------------- parsing


def test_parses_with_go_starlark() -> None:
    try:
        starlark_go.Starlark().exec(TILTFILE.read_text(), filename="Tiltfile")
    except starlark_go.SyntaxError as e:
        pytest.fail(f"Tiltfile does not parse: {e}")
    except starlark_go.StarlarkError:
        pass  # no Tilt builtins here: parsing is all this checks


def test_rename_namespaces_only_touches_names() -> None:
    src = 'x = os.getenv("os.getenv", config.main_dir)  # os.path.join\ny = a.os.b\n'
    assert rename_namespaces(src) == (
        'x = os__getenv("os.getenv", config__main_dir)  # os.path.join\ny = a.os.b\n')


def test_unknown_keyword_is_rejected() -> None:
    starlark_go.configure_starlark(allow_global_reassign=True)
    sl = starlark_go.Starlark(globals={"_env": {}, "_args": {}, "_main_dir": str(ROOT)})
    with pytest.raises(starlark_go.EvalError, match="unexpected keyword"):
        sl.exec(PRELUDE + 'local_resource("x", serve_cmd="y", readiness="z")\n', filename="t")


# --------------------------------------------------------------------------- resources


@pytest.mark.parametrize(("env", "args", "n"), [
    ({}, {}, 4),
    ({"INFERMESH_ENGINES": "2"}, {}, 2),
    ({}, {"engines": "2"}, 2),
    ({"INFERMESH_ENGINES": "3"}, {"engines": "1"}, 1),
])
def test_one_agent_per_engine(env: dict[str, str], args: dict[str, str], n: int) -> None:
    res = run_tiltfile(env, args)
    assert {"nats", "model", "sim"} <= set(res)
    assert flags(argv(res["sim"]))["--engines"] == str(n)
    ag = agents(res)
    assert len(ag) == n
    assert sorted(flags(argv(a))["--pod"] for a in ag) == [f"sim-{i}" for i in range(n)]
    routing = {"tokenizer", "indexer", "scheduler", "ingress"}
    assert set(res) == {"nats", "model", "sim"} | routing | {a["name"] for a in ag}
    assert len(res["sim"]["links"]) == n


def test_engines_must_be_positive() -> None:
    with pytest.raises(starlark_go.EvalError, match="engines"):
        run_tiltfile(args={"engines": "0"})


def test_unknown_setting_fails() -> None:
    with pytest.raises(starlark_go.EvalError, match="unknown config setting"):
        run_tiltfile(args={"engine": "2"})


def test_launcher_default_engine_count(default: dict, launcher_defaults: Any) -> None:
    assert len(agents(default)) == launcher_defaults.engines


def test_routing_services_match_the_launcher(default: dict[str, dict[str, Any]],
                                             launcher_defaults: Any) -> None:
    for svc in ("tokenizer", "indexer", "scheduler", "ingress"):
        assert f"infermesh.services.{svc}" in argv(default[svc])
        assert flags(argv(default[svc]))["--nats-url"].endswith(":4222")
        assert set(default[svc]["resource_deps"]) >= {"nats"}
    assert flags(argv(default["ingress"]))["--port"] == str(launcher_defaults.ingress_port)
    assert set(default["ingress"]["resource_deps"]) >= {"tokenizer", "indexer", "scheduler"}


def test_dependencies(default: dict[str, dict[str, Any]]) -> None:
    assert set(default["sim"]["resource_deps"]) >= {"nats", "model"}
    for a in agents(default):
        assert set(a["resource_deps"]) >= {"nats", "sim"}, a["name"]
    for r in default.values():
        for d in r["resource_deps"]:
            assert d in default, f"{r['name']} depends on unknown resource {d!r}"


def test_long_running_processes_use_serve_cmd(default: dict[str, dict[str, Any]]) -> None:
    assert default["model"]["cmd"] and not default["model"]["serve_cmd"]
    for name in ["nats", "sim", *(a["name"] for a in agents(default))]:
        assert default[name]["serve_cmd"] and not default[name]["cmd"], name


def test_watched_paths_exist(default: dict[str, dict[str, Any]]) -> None:
    for r in default.values():
        deps = r["deps"] or []
        for d in [deps] if isinstance(deps, str) else deps:
            assert (ROOT / d).exists(), f"{r['name']}: deps {d!r} does not exist"
    for r in [default["sim"], *agents(default)]:
        assert "libs" in r["deps"] and "proto" in r["deps"], r["name"]
    assert "services/sim" in default["sim"]["deps"]
    for a in agents(default):
        assert "services/agent" in a["deps"]


def test_labels_and_links_are_valid(default: dict[str, dict[str, Any]]) -> None:
    label = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")
    for r in default.values():
        assert r["labels"], f"{r['name']} has no label"
        for lb in r["labels"]:
            assert label.match(lb), f"{r['name']}: bad label {lb!r}"
        for ln in r["links"]:
            url = ln if isinstance(ln, str) else ln["url"]
            assert isinstance(ln, str) or ln.get("__type") == "link"
            assert urlparse(url).scheme in ("http", "https"), url
    assert len({a["labels"][0] for a in agents(default)}) == 1


# --------------------------------------------------------------------------- commands


def test_python_and_nats_server_from_the_venv(default: dict[str, dict[str, Any]]) -> None:
    venv_bin = ROOT / ".venv" / "bin"
    assert argv(default["nats"])[0] == str(venv_bin / "nats-server")
    for r in default.values():
        if r["name"] != "nats":
            assert argv(r)[0] == str(venv_bin / "python"), r["name"]
    if venv_bin.is_dir():
        assert (venv_bin / "python").exists() and (venv_bin / "nats-server").exists()


@pytest.mark.parametrize("module", [
    "infermesh.libs.tinymodel",
    "infermesh.services.agent",
    pytest.param("infermesh.services.sim", marks=pytest.mark.xfail(
        not SIM_MAIN.exists(), reason="services/sim/__main__.py not written yet", strict=True)),
])
def test_modules_exist(default: dict[str, dict[str, Any]], module: str) -> None:
    used = {module_of(argv(r)) for r in default.values() if r["name"] != "nats"}
    assert module in used
    path = module_path(module)
    assert path.is_file(), f"`python -m {module}` would not find {path}"


def test_every_module_resolves(default: dict[str, dict[str, Any]]) -> None:
    assert module_path("infermesh.services.agent") == ROOT / "services/agent/__main__.py"
    for r in default.values():
        if r["name"] != "nats":
            path = module_path(module_of(argv(r)))
            assert path.parent.is_dir() and (path.parent / "__init__.py").is_file(), path


def test_model_dir_is_shared(default: dict[str, dict[str, Any]]) -> None:
    model_cmd = argv(default["model"])
    assert module_of(model_cmd) == "infermesh.libs.tinymodel"
    assert flags(argv(default["sim"]))["--model"] == model_cmd[3]
    assert model_cmd[3] == str(ROOT / ".cache" / "tiny-model")
    custom = run_tiltfile(env={"INFERMESH_MODEL_DIR": "/tmp/m"})
    assert argv(custom["model"])[3] == "/tmp/m"
    assert flags(argv(custom["sim"]))["--model"] == "/tmp/m"


def test_same_flags_as_the_launcher(default: dict[str, dict[str, Any]]) -> None:
    want = launcher_flags()
    sim_flags = set(flags(argv(default["sim"])))
    assert sim_flags == want["infermesh.services.sim"]
    for a in agents(default):
        assert set(flags(argv(a))) == want["infermesh.services.agent"], a["name"]


def test_default_ports_match_the_launcher(default: dict, launcher_defaults: Any) -> None:
    nats = argv(default["nats"])
    assert nats[nats.index("-p") + 1] == str(launcher_defaults.nats_port)
    sim = flags(argv(default["sim"]))
    assert int(sim["--port"]) == launcher_defaults.sim_port
    assert int(sim["--kv-port"]) == launcher_defaults.kv_port
    assert int(sim["--block-size"]) == launcher_defaults.block_size
    assert int(sim["--num-gpu-blocks"]) == launcher_defaults.num_gpu_blocks
    assert float(sim["--time-scale"]) == launcher_defaults.time_scale
    for a in agents(default):
        f = flags(argv(a))
        assert f["--pool"] == launcher_defaults.pool
        assert f["--subject-prefix"] == launcher_defaults.prefix
        assert f["--nats-url"] == f"nats://127.0.0.1:{launcher_defaults.nats_port}"


@pytest.mark.parametrize("engines", ["2", None])
def test_agent_ports_follow_the_sim_scheme(engines: str | None) -> None:
    res = run_tiltfile(args={"engines": engines} if engines else {})
    sim = flags(argv(res["sim"]))
    p, k = int(sim["--port"]), int(sim["--kv-port"])
    n = int(sim["--engines"])
    by_pod = {flags(argv(a))["--pod"]: flags(argv(a)) for a in agents(res)}
    assert len(by_pod) == n
    for i in range(n):
        f = by_pod[f"sim-{i}"]
        assert f["--engine-url"] == f"http://127.0.0.1:{p + i}"
        assert f["--kv-endpoint"] == f"tcp://127.0.0.1:{k + 2 * i}"
        assert f["--replay-endpoint"] == f"tcp://127.0.0.1:{k + 2 * i + 1}"
    # Links point at the engines: the sim's at all of them, each agent's at its own.
    assert {urlparse(ln["url"]).port for ln in res["sim"]["links"]} == {p + i for i in range(n)}
    for a in agents(res):
        engine = urlparse(flags(argv(a))["--engine-url"]).netloc
        assert {urlparse(ln["url"]).netloc for ln in a["links"]} <= {engine}, a["name"]


def test_readiness_probes(default: dict[str, dict[str, Any]]) -> None:
    nats = argv(default["nats"])
    pr = default["nats"]["readiness_probe"]
    assert pr["__type"] == "probe" and pr["http_get"]["__type"] == "http_get_action"
    assert pr["http_get"]["port"] == int(nats[nats.index("-m") + 1])
    assert pr["http_get"]["path"] == "/healthz"
    sim = flags(argv(default["sim"]))
    pr = default["sim"]["readiness_probe"]
    assert pr["__type"] == "probe" and pr["http_get"]["__type"] == "http_get_action"
    assert pr["http_get"]["port"] == int(sim["--port"])  # engine 0
    assert pr["http_get"]["path"] == "/health"
    for r in default.values():
        p = r["readiness_probe"]
        if p is not None:
            actions = [a for a in (p["exec"], p["http_get"], p["tcp_socket"]) if a]
            assert len(actions) == 1, f"{r['name']}: a probe needs exactly one action"


def test_commands_parse_with_the_services_own_options(default: dict) -> None:
    import argparse

    from infermesh.libs.config import add_arguments, load_config
    from infermesh.services.agent.__main__ import build_parser as agent_parser
    from infermesh.services.agent.config import AgentConfig
    from infermesh.services.sim.config import SimConfig

    for a in agents(default):
        ns = agent_parser().parse_args(argv(a)[3:])
        cfg = load_config(AgentConfig, ns, env_prefix="INFERMESH_AGENT", env={})
        assert cfg.pod_name() == flags(argv(a))["--pod"]
    # The sim's own parser once it exists; until then its config's knobs plus --ready-file.
    build = None
    if SIM_MAIN.exists():
        import importlib

        build = getattr(importlib.import_module("infermesh.services.sim.__main__"),
                        "build_parser", None)
    if build is not None:
        p = build()
    else:
        p = argparse.ArgumentParser()
        p.add_argument("--ready-file")
        p.add_argument("--config")
        add_arguments(p, SimConfig)
    ns = p.parse_args(argv(default["sim"])[3:])
    cfg = load_config(SimConfig, ns, env_prefix="INFERMESH_SIM", env={})
    assert cfg.engines == len(agents(default))
