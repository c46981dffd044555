"""The pipeline YAML: the shipped default, and a clear ConfigError for every mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from infermesh.libs.config import ConfigError, load_config
from infermesh.libs.scheduling.config import (
    DEFAULT_PIPELINE_YAML,
    build_pipeline,
    load_pipeline,
    parse_pipeline,
)
from infermesh.libs.scheduling.framework import Parameters
from infermesh.libs.scheduling.plugins import (
    PLUGIN_TYPES,
    LoraFilter,
    MaxScorePicker,
    PDProfileHandler,
    PrecisePrefixCacheScorer,
    PrefixBasedPDDecider,
    RoleFilter,
)
from infermesh.services.scheduler.config import SchedulerConfig

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy" / "local" / "scheduler.yaml"


def build(doc: str, handle):
    return build_pipeline(parse_pipeline(yaml.safe_load(doc), "test.yaml"), handle)


def test_built_in_default_is_the_deploy_file():
    assert DEPLOY.read_text() == DEFAULT_PIPELINE_YAML


def test_default_pipeline_has_the_benchmark_profiles(handle):
    p = load_pipeline(None, handle)
    assert p.default_profile == "default"
    assert {"default", "random", "round-robin", "load", "approx-prefix",
            "precise-prefix", "llm-d"} <= set(p.profiles)
    d = p.profiles["default"]
    assert [type(f) for f in d.filters] == [RoleFilter, LoraFilter]
    assert [(s.type_name, w) for s, w in d.scorers] == [
        ("precise-prefix-cache-scorer", 1.0), ("token-load-scorer", 1.0),
        ("lora-affinity-scorer", 1.0), ("session-affinity-scorer", 1.0)]
    # The old default, under the name benchmarks use.
    assert [(s.type_name, w) for s, w in p.profiles["precise-prefix"].scorers] == [
        ("precise-prefix-cache-scorer", 3.0), ("load-aware-scorer", 1.0)]
    # pd-always and pd-never are the default with the other deciders.
    for name in ("pd-always", "pd-never"):
        assert [(s.name, w) for s, w in p.profiles[name].scorers] == [
            (s.name, w) for s, w in d.scorers]
        assert [type(f) for f in p.profiles[name].filters] == [RoleFilter, LoraFilter]
    assert [(s.type_name, w) for s, w in p.profiles["llm-d"].scorers] == [
        ("precise-prefix-cache-scorer", 3.0), ("queue-scorer", 2.0),
        ("kv-cache-utilization-scorer", 2.0)]
    assert isinstance(d.picker, MaxScorePicker)
    assert p.profiles["random"].scorers == [] and p.profiles["round-robin"].scorers == []
    # Prefill/decode: the pd handler, deciding by the uncached prompt on the decode pod.
    assert isinstance(p.handler, PDProfileHandler)
    assert p.handler.prefill_profile == "prefill"
    assert isinstance(p.handler.decider, PrefixBasedPDDecider)
    assert p.handler.decider.threshold == 512
    assert [f.roles for f in p.profiles["prefill"].filters] == [frozenset({"prefill"})]
    # Both prefix scorers follow routed requests (precise: its speculative matches).
    assert [o.name for o in p.observers()] == ["precise-prefix", "session", "approx-prefix"]
    # One instance per YAML entry, shared by the profiles that refer to it.
    assert p.profiles["precise-prefix"].scorers[0][0] is d.scorers[0][0]
    assert load_pipeline(DEPLOY, handle).profiles.keys() == p.profiles.keys()


def test_every_registered_type_builds_with_defaults_or_documented_parameters(handle):
    required = {"label-filter": {"match_labels": {"a": "b"}}}
    for type_name, factory in PLUGIN_TYPES.items():
        plugin = factory(type_name, Parameters(required.get(type_name), type_name), handle)
        assert plugin.type_name == type_name and plugin.name == type_name


MINIMAL = """
plugins:
  - type: precise-prefix-cache-scorer
    parameters: {timeout_s: 0.2, tier_weights: {CPU: 0.5}}
  - {name: q, type: queue-scorer}
profiles:
  - name: only
    plugins:
      - {ref: precise-prefix-cache-scorer, weight: 2.5}
      - ref: q
"""


def test_names_default_to_types_weights_to_one_and_pickers_to_max_score(handle):
    p = build(MINIMAL, handle)
    assert p.default_profile == "only"  # no "default": the first profile
    prof = p.profiles["only"]
    scorer, weight = prof.scorers[0]
    assert isinstance(scorer, PrecisePrefixCacheScorer) and weight == 2.5
    assert scorer.timeout_s == 0.2 and scorer.tier_weights == {
        "GPU": 1.0, "CPU": 0.5, "LOCAL_STORAGE": 0.6, "SHARED_STORAGE": 0.5}
    assert prof.scorers[1][1] == 1.0
    assert isinstance(prof.picker, MaxScorePicker)


@pytest.mark.parametrize("doc,message", [
    ("plugins: []\n", "'profiles' must be a non-empty list"),
    ("[1, 2]", "must be a mapping"),
    ("profiles: [{name: a, plugins: [{ref: x}]}]\nextra: 1\n", r"unknown keys \['extra'\]"),
    ("plugins: [{type: nope}]\nprofiles: [{name: a, plugins: [{ref: nope}]}]\n",
     "unknown type 'nope'"),
    ("plugins: [{name: q}]\nprofiles: [{name: a, plugins: [{ref: q}]}]\n", "'type' is required"),
    ("plugins: [{type: queue-scorer}]\nprofiles: [{name: a, plugins: [{ref: queue}]}]\n",
     "unknown plugin 'queue'"),
    ("plugins: [{type: queue-scorer}]\n"
     "profiles: [{name: a, plugins: [{ref: queue-scorer, weight: -1}]}]\n",
     "weight must be a number >= 0"),
    ("plugins: [{type: queue-scorer}]\n"
     "profiles: [{name: a, plugins: [{ref: queue-scorer, weight: high}]}]\n",
     "weight must be a number >= 0"),
    ("plugins: [{type: random-picker}]\n"
     "profiles: [{name: a, plugins: [{ref: random-picker, weight: 2}]}]\n",
     "only scorers take a weight"),
    ("plugins: [{type: load-aware-scorer, parameters: {threshold: 0}}]\n"
     "profiles: [{name: a, plugins: [{ref: load-aware-scorer}]}]\n",
     "'threshold' must be >= 1"),
    ("plugins: [{type: load-aware-scorer, parameters: {treshold: 3}}]\n"
     "profiles: [{name: a, plugins: [{ref: load-aware-scorer}]}]\n",
     r"unknown parameters \['treshold'\]"),
    ("plugins: [{type: precise-prefix-cache-scorer, parameters: {tier_weights: {GPU: 2}}}]\n"
     "profiles: [{name: a, plugins: [{ref: precise-prefix-cache-scorer}]}]\n",
     "weights are <= 1"),
    ("plugins: [{type: precise-prefix-cache-scorer, parameters: {timeout_s: 0}}]\n"
     "profiles: [{name: a, plugins: [{ref: precise-prefix-cache-scorer}]}]\n",
     "'timeout_s' must be > 0"),
    ("plugins: [{type: queue-scorer, parameters: [1]}]\n"
     "profiles: [{name: a, plugins: [{ref: queue-scorer}]}]\n",
     "'parameters' must be a mapping"),
    ("plugins: [{type: queue-scorer}, {type: queue-scorer}]\n"
     "profiles: [{name: a, plugins: [{ref: queue-scorer}]}]\n", "used twice"),
    ("plugins: [{type: queue-scorer}]\n"
     "profiles: [{name: a, plugins: [{ref: queue-scorer}]}, {name: a, plugins: [{ref: "
     "queue-scorer}]}]\n", "profile name 'a' is used twice"),
    ("plugins: [{type: queue-scorer}]\n"
     "profiles: [{name: a, plugins: [{ref: queue-scorer}, {ref: queue-scorer}]}]\n",
     "twice"),
    ("plugins: [{type: random-picker}, {type: max-score-picker}]\n"
     "profiles: [{name: a, plugins: [{ref: random-picker}, {ref: max-score-picker}]}]\n",
     "2 pickers"),
    ("plugins: [{type: single-profile-handler}]\n"
     "profiles: [{name: a, plugins: [{ref: single-profile-handler}]}]\n",
     "cannot run in a profile"),
    ("plugins: [{type: queue-scorer, name: total}]\n"
     "profiles: [{name: a, plugins: [{ref: total}]}]\n", "reserved"),
    ("plugins: [{type: queue-scorer, name: 'a b'}]\n"
     "profiles: [{name: a, plugins: [{ref: 'a b'}]}]\n", "not a valid name"),
    ("plugins: [{type: queue-scorer}]\ndefault_profile: b\n"
     "profiles: [{name: a, plugins: [{ref: queue-scorer}]}]\n", "default_profile 'b'"),
    ("profiles: [{name: a, plugins: []}]\n", "non-empty list"),
    ("profiles: [{name: a, plugins: [{pluginRef: x}]}]\n", r"unknown keys \['pluginRef'\]"),
])
def test_config_errors_are_clear(handle, doc, message):
    with pytest.raises(ConfigError, match=message) as e:
        build(doc, handle)
    assert "test.yaml" in str(e.value)


def test_unreadable_profiles_file_is_a_config_error(tmp_path, handle):
    with pytest.raises(ConfigError, match="cannot read"):
        load_pipeline(tmp_path / "missing.yaml", handle)
    bad = tmp_path / "bad.yaml"
    bad.write_text("plugins: [\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_pipeline(bad, handle)


def test_service_config_from_env_and_file(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("pod_timeout_s: 2.5\nprofiles_file: /x.yaml\n")
    cfg = load_config(SchedulerConfig, env_prefix="INFERMESH_SCHEDULER", file=f,
                      env={"INFERMESH_SCHEDULER_INFLIGHT_TIMEOUT_S": "30",
                           "INFERMESH_SCHEDULER_PROFILES_FILE": "/y.yaml"})
    assert cfg.pod_timeout_s == 2.5 and cfg.inflight_timeout_s == 30.0
    assert cfg.profiles_file == "/y.yaml"
    with pytest.raises(ConfigError):
        load_config(SchedulerConfig, env_prefix="INFERMESH_SCHEDULER",
                    env={"INFERMESH_SCHEDULER_POD_TIMEOUT_S": "0"})


def test_main_reports_a_bad_profiles_file(tmp_path, capsys):
    from infermesh.services.scheduler.__main__ import main

    bad = tmp_path / "p.yaml"
    bad.write_text("profiles: [{name: a, plugins: [{ref: ghost}]}]\n")
    assert main(["--profiles-file", str(bad)]) == 2
    assert "unknown plugin 'ghost'" in capsys.readouterr().err
