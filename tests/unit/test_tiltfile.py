"""The Tiltfile runs the processes of the system plan, as `infermesh up` does.

The Tiltfile is executed by the Go Starlark interpreter (PyPI ``starlark-go``, the implementation
Tilt embeds) against stubs of the Tilt builtins it may use. The stubs are written in Starlark,
with Tilt's signatures, and only record their calls: an unknown builtin or keyword fails the test
the way ``tilt up`` would fail. Tilt's ``os`` and ``config`` modules are attribute namespaces, which
plain Starlark cannot build, so ``os.getenv`` etc. are renamed token by token (``os__getenv``)
before execution. The stub of ``local`` answers `infermesh tilt-plan ARGS` with the plan this
test computes for the same ARGS; the resources the Tiltfile declares must be that plan.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tokenize
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from infermesh.services.system.plan import plan
from infermesh.services.system.tilt import resources
from infermesh.services.system.up import build_parser, spec_from_args

starlark_go = pytest.importorskip("starlark_go")

ROOT = Path(__file__).resolve().parents[2]
TILTFILE = ROOT / "Tiltfile"

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

def local(command, quiet=False, command_bat="", echo_off=False, env={}, dir="", stdin=None):
    _calls.append({"fn": "local", "command": command, "quiet": quiet})
    return _outputs[" ".join(command[4:])]

def decode_json(json):
    return _decoded[json]

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


def plan_json(args: list[str]) -> dict[str, Any]:
    """What `infermesh tilt-plan ARGS` prints (without writing a state folder)."""
    p = plan(spec_from_args(build_parser().parse_args(args)))
    return {"resources": resources(p), "state_dir": str(p.state_dir)}


def run_tiltfile(args: list[str] | None = None) -> tuple[dict[str, dict[str, Any]], list[Any]]:
    """Execute the Tiltfile as `tilt up -- ARGS` would; return its local resources by name and
    the `local` commands it ran."""
    args = list(args or [])
    text = json.dumps(plan_json(args))
    # Tilt's dialect: top-level if/for, global reassignment, set() and while/recursion.
    starlark_go.configure_starlark(allow_set=True, allow_global_reassign=True,
                                   allow_recursion=True)
    sl = starlark_go.Starlark(globals={
        "_env": {}, "_args": {"args": args} if args else {}, "_main_dir": str(ROOT),
        "_outputs": {" ".join(args): text}, "_decoded": {text: json.loads(text)}})
    # One exec: a module's globals (the record list too) freeze when its exec ends.
    try:
        sl.exec(PRELUDE + rename_namespaces(TILTFILE.read_text()), filename="Tiltfile")
    except starlark_go.StarlarkError as e:
        e.add_note(f"(Tiltfile line = reported line - {PRELUDE_LINES}: the stubs come first)")
        raise
    calls = sl.get("_calls")
    out: dict[str, dict[str, Any]] = {}
    for c in calls:
        if c["fn"] == "local_resource":
            assert c["name"] not in out, f"resource {c['name']!r} defined twice"
            out[c["name"]] = c
    return out, [c["command"] for c in calls if c["fn"] == "local"]


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
    sl = starlark_go.Starlark(globals={"_env": {}, "_args": {}, "_main_dir": str(ROOT),
                                       "_outputs": {}, "_decoded": {}})
    with pytest.raises(starlark_go.EvalError, match="unexpected keyword"):
        sl.exec(PRELUDE + 'local_resource("x", serve_cmd="y", readiness="z")\n', filename="t")


@pytest.mark.parametrize("args", [
    [], ["--engines", "2"], ["--engines", "2", "--schedulers", "2", "--nats-cluster", "3"],
    ["--engine", "vllm", "--engines", "1", "--block-size", "64"],
])
def test_every_process_of_the_plan_is_a_resource(args: list[str]) -> None:
    res, commands = run_tiltfile(args)
    assert commands == [[str(ROOT / ".venv" / "bin" / "python"), "-m", "infermesh.cli",
                         "tilt-plan", *args]]
    p = plan(spec_from_args(build_parser().parse_args(args)))
    assert set(res) == {"model"} | {q.name for q in p.processes}
    assert res["model"]["cmd"][-1] == str(p.model_dir) and not res["model"]["serve_cmd"]
    for q in p.processes:
        r = res[q.name]
        assert r["serve_cmd"] == list(q.argv) and not r["cmd"], q.name
        assert r["serve_env"] == {"PYTHONUNBUFFERED": "1", **q.env}, q.name
        assert set(q.after) <= set(r["resource_deps"]) <= set(res), q.name
        for d in r["deps"]:
            assert (ROOT / d).exists(), f"{q.name}: watched path {d!r} does not exist"
        probe = r["readiness_probe"]
        if q.health_url:
            u = urlparse(q.health_url)
            got = probe["http_get"]
            assert (got["host"], got["port"], got["path"]) == (u.hostname, u.port, u.path)
        else:
            assert probe is None, q.name
        for ln in r["links"]:
            assert ln["__type"] == "link" and urlparse(ln["url"]).scheme in ("http", "https")
        assert r["labels"], q.name


def test_tilt_runs_the_bus_with_users_as_up_does() -> None:
    res, _ = run_tiltfile()
    for name, r in res.items():
        if name.startswith(("agent-", "tokenizer", "indexer", "scheduler", "ingress")):
            creds = [k for k in r["serve_env"] if k.endswith("_NATS_CREDENTIALS")]
            assert creds, f"{name} has no NATS identity"


def test_tilt_plan_writes_the_state_tilt_needs(tmp_path: Path) -> None:
    env = {**os.environ, "INFERMESH_STATE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "infermesh.cli", "tilt-plan", "--engines", "1"],
                         capture_output=True, text=True, env=env, timeout=120, check=True)
    data = json.loads(out.stdout)
    assert Path(data["state_dir"]) == tmp_path.resolve()
    nats = next(r for r in data["resources"] if r["name"] == "nats")
    conf = Path(nats["serve_cmd"][nats["serve_cmd"].index("-c") + 1])
    assert 'include "nats-auth.conf"' in conf.read_text()
    for r in data["resources"]:
        for k, v in r.get("serve_env", {}).items():
            if k.endswith("_NATS_CREDENTIALS"):
                assert Path(v).is_file(), (r["name"], v)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["pid"] == os.getpid()  # Tilt (our process here) owns the run
    # Loading the Tiltfile again keeps the passwords the running services hold.
    creds = {p.name: p.read_text() for p in (tmp_path / "bus" / "credentials").iterdir()}
    subprocess.run([sys.executable, "-m", "infermesh.cli", "tilt-plan", "--engines", "1"],
                   capture_output=True, env=env, timeout=120, check=True)
    assert creds == {p.name: p.read_text() for p in (tmp_path / "bus" / "credentials").iterdir()}


def test_commands_parse_with_the_services_own_options() -> None:
    import importlib

    res, _ = run_tiltfile(["--engines", "2"])
    for r in res.values():
        cmd = r["serve_cmd"] or r["cmd"]
        if cmd[1:3] != ["-m", "infermesh.libs.tinymodel"] and cmd[1] == "-m":
            main = importlib.import_module(cmd[2] + ".__main__").main
            argv = cmd[3:]
            if "--" in argv:
                argv = argv[:argv.index("--")]
            main.parser().parse_args(argv)  # exits (fails the test) on an unknown flag
