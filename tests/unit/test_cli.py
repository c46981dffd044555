"""The `infermesh` command: help lists every sub-command; `schema export` writes valid schemas."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from infermesh.cli import COMMANDS, main
from infermesh.proto import codec
from infermesh.proto.messages import (
    MESSAGE_TYPES,
    SCHEMA_VERSION,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    LookupReply,
    LookupRequest,
    LoraInfo,
    PodMatch,
    PodState,
    RequestEvent,
    ScaleDecision,
    ScaleDemand,
    ScheduleDecision,
    ScheduleRequest,
    Snapshot,
    SnapshotBlock,
    SnapshotRequest,
    TokenizeReply,
    TokenizeRequest,
)

EXPECTED_COMMANDS = {"up", "sim", "agent", "events", "schema", "model"}

# --------------------------------------------------------------------------- help


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert EXPECTED_COMMANDS <= set(COMMANDS)
    for name, (_, text) in COMMANDS.items():
        assert name in out
        assert text.split()[0] in out, f"help of {name!r} missing"


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "schema" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_help_names_itself(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`infermesh CMD --help` prints `usage: infermesh CMD`, not the module that implements it."""
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    usage = capsys.readouterr().out.splitlines()[0]
    assert usage.startswith(f"usage: infermesh {name} "), usage


def test_console_script_help() -> None:
    script = Path(sys.executable).parent / "infermesh"
    if not script.exists():
        pytest.skip("console script not installed next to this interpreter")
    r = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for name in EXPECTED_COMMANDS:
        assert name in r.stdout


# --------------------------------------------------------------------------- a small validator
#
# jsonschema is not a dependency; this checks the subset of JSON Schema 2020-12 that msgspec
# emits, and `test_schemas_use_only_known_keywords` fails if msgspec starts emitting more.

ANNOTATIONS = {"title", "description", "default", "$comment", "discriminator", "examples",
               "$defs", "$schema"}
ASSERTIONS = {"$ref", "type", "properties", "required", "additionalProperties", "items",
              "prefixItems", "minItems", "maxItems", "enum", "const", "anyOf", "oneOf", "allOf",
              "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength",
              "maxLength", "format"}
JSON_TYPES = {"object", "array", "string", "integer", "number", "boolean", "null"}


def _is_type(value: Any, t: str) -> bool:
    return {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
    }[t](value)


def _resolve(root: dict[str, Any], ref: str) -> dict[str, Any]:
    assert ref.startswith("#/"), f"only local refs expected, got {ref}"
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part]
    return node  # type: ignore[no-any-return]


def validate(value: Any, schema: dict[str, Any], root: dict[str, Any],
             path: str = "$") -> list[str]:
    """Errors of ``value`` against ``schema`` (empty when valid)."""
    errs: list[str] = []
    if "$ref" in schema:
        errs += validate(value, _resolve(root, schema["$ref"]), root, path)
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, t) for t in types):
            return errs + [f"{path}: {value!r} is not of type {types}"]
    if "enum" in schema and value not in schema["enum"]:
        errs.append(f"{path}: {value!r} not in {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        errs.append(f"{path}: {value!r} != {schema['const']!r}")
    for key in ("anyOf", "oneOf"):
        if key in schema:
            ok = sum(not validate(value, s, root, path) for s in schema[key])
            if ok == 0 or (key == "oneOf" and ok > 1):
                errs.append(f"{path}: {value!r} matches {ok} of {key}")
    for s in schema.get("allOf", []):
        errs += validate(value, s, root, path)
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                errs.append(f"{path}: required field {name!r} missing")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                errs += validate(v, props[k], root, f"{path}.{k}")
            elif extra is False:
                errs.append(f"{path}: unexpected field {k!r}")
            elif isinstance(extra, dict):
                errs += validate(v, extra, root, f"{path}.{k}")
    if isinstance(value, list):
        prefix = schema.get("prefixItems", [])
        for i, v in enumerate(value):
            if i < len(prefix):
                errs += validate(v, prefix[i], root, f"{path}[{i}]")
            elif "items" in schema:
                errs += validate(v, schema["items"], root, f"{path}[{i}]")
        if len(value) < schema.get("minItems", 0):
            errs.append(f"{path}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errs.append(f"{path}: more than {schema['maxItems']} items")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errs.append(f"{path}: {value} < {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errs.append(f"{path}: {value} > {schema['maximum']}")
    return errs


def walk(node: Any) -> list[dict[str, Any]]:
    """Every schema object below ``node`` (dicts under schema-valued keywords)."""
    out: list[dict[str, Any]] = []
    if isinstance(node, dict):
        out.append(node)
        for key, v in node.items():
            if key in ("properties", "$defs"):
                for sub in v.values():
                    out += walk(sub)
            elif key in ("items", "additionalProperties") and isinstance(v, dict):
                out += walk(v)
            elif key in ("anyOf", "oneOf", "allOf", "prefixItems"):
                for sub in v:
                    out += walk(sub)
    return out


# --------------------------------------------------------------------------- schema export


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    dest = tmp_path_factory.mktemp("schema") / "out"  # does not exist yet: export creates it
    assert main(["schema", "export", str(dest)]) == 0
    files = sorted(dest.iterdir())
    assert [f.name for f in files] == sorted(f"{n}.schema.json" for n in MESSAGE_TYPES)
    return {f.name.removesuffix(".schema.json"): json.loads(f.read_text()) for f in files}


def message_schema(doc: dict[str, Any], name: str) -> dict[str, Any]:
    """The message's own object schema (msgspec puts it under $defs and refers to it)."""
    assert doc["$ref"] == f"#/$defs/{name}"
    return _resolve(doc, doc["$ref"])


def test_export_prints_the_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema", "export", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(tmp_path / f"{n}.schema.json") for n in MESSAGE_TYPES)


def test_export_needs_a_directory(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["schema", "export"])
    assert e.value.code == 2


def test_one_schema_per_message(exported: dict[str, dict[str, Any]]) -> None:
    assert set(exported) == set(MESSAGE_TYPES)
    for name, doc in exported.items():
        assert f"version {SCHEMA_VERSION}" in doc["$comment"], name
        s = message_schema(doc, name)
        assert s["type"] == "object" and s["title"] == name


@pytest.mark.parametrize("name", sorted(MESSAGE_TYPES))
def test_schema_has_every_field(exported: dict[str, dict[str, Any]], name: str) -> None:
    s = message_schema(exported[name], name)
    fields = {f.encode_name: f for f in msgspec.structs.fields(MESSAGE_TYPES[name])}
    assert set(s["properties"]) == set(fields)
    assert "v" in s["properties"]  # every message carries its schema version
    required = {n for n, f in fields.items() if f.required}
    assert set(s.get("required", [])) == required


def test_named_fields(exported: dict[str, dict[str, Any]]) -> None:
    kv = message_schema(exported["KVEventBatch"], "KVEventBatch")
    assert {"seq", "epoch", "events"} <= set(kv["properties"])
    assert kv["properties"]["seq"]["type"] == "integer"
    assert {"seq", "epoch", "events"} <= set(kv["required"])
    pod = message_schema(exported["PodState"], "PodState")
    assert pod["properties"]["kv_usage"]["type"] == "number"
    assert {"pod", "pool", "epoch", "kv_seq"} <= set(pod["required"])


def test_schemas_are_well_formed(exported: dict[str, dict[str, Any]]) -> None:
    if importlib.util.find_spec("jsonschema") is not None:
        import jsonschema

        for doc in exported.values():
            jsonschema.Draft202012Validator.check_schema(doc)
    for name, doc in exported.items():
        for node in walk(doc):
            if "$ref" in node:
                _resolve(doc, node["$ref"])  # raises KeyError when dangling
            t = node.get("type")
            for tt in t if isinstance(t, list) else [t] if t else []:
                assert tt in JSON_TYPES, f"{name}: unknown type {tt!r}"
            if "required" in node:
                assert set(node["required"]) <= set(node.get("properties", {})), name


def test_schemas_use_only_known_keywords(exported: dict[str, dict[str, Any]]) -> None:
    for name, doc in exported.items():
        for node in walk(doc):
            unknown = set(node) - ANNOTATIONS - ASSERTIONS
            assert not unknown, f"{name}: keywords this test does not check: {unknown}"


# --------------------------------------------------------------------------- samples validate

SAMPLES: dict[str, msgspec.Struct] = {
    "KVEventBatch": KVEventBatch(
        pod="sim-0", pool="default", epoch="e1", seq=7, ts=1.5, engine_seq=3,
        events=[
            BlockStored(block_hashes=[1, 2**64 - 1], parent_hash=None, token_ids=list(range(32)),
                        block_size=16, lora_name="adapter", extra_keys=["x", 1]),
            BlockRemoved(block_hashes=[1], tier="CPU"),
            AllBlocksCleared(),
        ]),
    "SnapshotRequest": SnapshotRequest(pod="sim-0"),
    "Snapshot": Snapshot(
        pod="sim-0", pool="default", epoch="e1", seq=7, block_size=16, part=0, parts=1,
        blocks=[SnapshotBlock(5, None, [1, 2], ["GPU"]), SnapshotBlock(6, 5, [3], ["CPU"], "a")]),
    "PodState": PodState(
        pod="sim-0", pool="default", model="tiny", url="http://127.0.0.1:8100", ts=2.0,
        epoch="e1", kv_seq=7, running=2, waiting=1, kv_usage=0.25, block_size=16,
        num_gpu_blocks=100, lora=LoraInfo(running=["a"], max_lora=2), role="decode",
        labels={"zone": "a"}),
    "TokenizeRequest": TokenizeRequest(
        model="tiny", block_size=16, messages=[{"role": "user", "content": "hi"}],
        chat_template_kwargs={"enable_thinking": False}),
    "TokenizeReply": TokenizeReply(num_tokens=40, block_keys=[1, 2], token_ids=None),
    "LookupRequest": LookupRequest(model="tiny", block_keys=[1, 2, 3], pods=["sim-0"]),
    "LookupReply": LookupReply(matches=[PodMatch(pod="sim-0", blocks=2, tiers=["GPU", "CPU"])]),
    "ScheduleRequest": ScheduleRequest(request_id="r1", model="tiny", num_tokens=40,
                                       block_keys=[1, 2], session_id="s"),
    "ScheduleDecision": ScheduleDecision(request_id="r1", pod="sim-0", url="http://x",
                                         profile="default", scores={"queue": {"sim-0": 0.5}}),
    "RequestEvent": RequestEvent(kind="first_token", request_id="r1", pod="sim-0",
                                 pool="default", model="tiny", ts=3.0, ttft_s=0.01),
    "ScaleDemand": ScaleDemand(pool="default", model="tiny", ts=4.0, queued=3, rate_rps=1.5),
    "ScaleDecision": ScaleDecision(pool="default", model="tiny", ts=4.0, target_replicas=0,
                                   reason="idle"),
}


def test_every_message_has_a_sample() -> None:
    assert set(SAMPLES) == set(MESSAGE_TYPES), "add a sample for each new bus message"
    for name, msg in SAMPLES.items():
        assert type(msg) is MESSAGE_TYPES[name]


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_encoded_sample_validates(exported: dict[str, dict[str, Any]], name: str) -> None:
    msg = SAMPLES[name]
    wire = msgspec.msgpack.decode(codec.encode(msg))  # the payload as any reader sees it
    doc = exported[name]
    assert validate(wire, doc, doc) == []
    if importlib.util.find_spec("jsonschema") is not None:
        import jsonschema

        jsonschema.validate(wire, doc)
    assert codec.decode(codec.encode(msg), type(msg)) == msg


@pytest.mark.parametrize(("name", "mutate", "error"), [
    ("KVEventBatch", lambda w: w.pop("seq"), "required field 'seq'"),
    ("KVEventBatch", lambda w: w.update(epoch=5), "$.epoch"),
    ("KVEventBatch", lambda w: w["events"].append({"type": "Nope"}), "$.events[3]"),
    ("PodState", lambda w: w.update(kv_usage="high"), "$.kv_usage"),
    ("PodState", lambda w: w.update(role="leader"), "$.role"),
    ("Snapshot", lambda w: w["blocks"][0].clear(), "$.blocks[0]: fewer than 4 items"),
    ("RequestEvent", lambda w: w.update(ttft_s=True), "$.ttft_s"),
])
def test_invalid_payloads_are_caught(exported: dict[str, dict[str, Any]], name: str,
                                     mutate: Any, error: str) -> None:
    wire = msgspec.msgpack.decode(codec.encode(SAMPLES[name]))
    mutate(wire)
    doc = exported[name]
    errs = validate(wire, doc, doc)
    assert any(error in e for e in errs), errs
    # The schema and the decoder agree that the payload is invalid.
    with pytest.raises(codec.DecodeError):
        codec.decode(msgspec.msgpack.encode(wire), MESSAGE_TYPES[name])


def test_readers_accept_unknown_fields(exported: dict[str, dict[str, Any]]) -> None:
    wire = msgspec.msgpack.decode(codec.encode(SAMPLES["PodState"]))
    wire["added_in_v2"] = {"x": 1}
    doc = exported["PodState"]
    assert validate(wire, doc, doc) == []
    assert codec.decode(msgspec.msgpack.encode(wire), PodState).pod == "sim-0"
