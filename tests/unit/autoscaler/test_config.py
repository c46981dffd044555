"""Per-pool knobs (`pool_overrides`): parsed from the command line and YAML, applied to the
pool they name only, checked like the fields they override, and used by the service's
per-pool decisions."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest

from infermesh.libs.autoscaling import ReplicaLoad, analyze
from infermesh.libs.config import add_arguments, load_config, to_argv
from infermesh.proto.messages import PodState
from infermesh.services.autoscaler.config import AutoscalerConfig
from infermesh.services.autoscaler.service import AutoscalerService


def _load(argv: list[str], file: Path | None = None) -> AutoscalerConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser, AutoscalerConfig)
    return load_config(AutoscalerConfig, parser.parse_args(argv), env_prefix="X_TEST",
                       env={}, file=file)


def test_overrides_apply_to_their_pool_only(tmp_path: Path) -> None:
    cfg = _load([
        "--mode", "slo", "--ttft-p90-target-s", "2", "--pool-overrides",
        "chat.ttft_p90_target_s=0.5,chat.min_replicas=0,batch.kv_threshold=0.95"])
    assert cfg.slo_targets("chat").ttft_p90_s == 0.5 and cfg.bounds("chat").min_replicas == 0
    assert cfg.slo_targets("batch").ttft_p90_s == 2 and cfg.bounds("batch").min_replicas == 1
    assert cfg.saturation_model("batch").kv_threshold == 0.95
    assert cfg.saturation_model("chat").kv_threshold == 0.80 == cfg.saturation_model().kv_threshold
    # YAML: a mapping; and the launcher's flags round-trip.
    f = tmp_path / "a.yaml"
    f.write_text("pool_overrides:\n  chat.max_replicas: 3\n  chat.scale_to_zero_after_s: 60\n")
    y = _load([], file=f)
    assert y.bounds("chat").max_replicas == 3 and y.bounds("chat").scale_to_zero_after_s == 60
    again = _load(to_argv(AutoscalerConfig, {"pool_overrides": {"chat.max_replicas": "3"}}))
    assert again.bounds("chat").max_replicas == 3


@pytest.mark.parametrize("overrides, match", [
    ({"chat.interval_s": "1"}, "POOL.KNOB"),  # not a per-pool knob
    ({"min_replicas": "1"}, "POOL.KNOB"),  # no pool
    ({"bad pool.min_replicas": "1"}, "subject token"),
    ({"chat.min_replicas": "many"}, "chat.min_replicas"),
    ({"chat.min_replicas": "5", "chat.max_replicas": "2"}, "min_replicas"),
    ({"chat.ttft_p90_target_s": "-1"}, "positive"),
])
def test_bad_overrides_are_refused(overrides: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AutoscalerConfig(pool_overrides=overrides)


def test_slo_mode_with_targets_for_some_pools_only() -> None:
    with pytest.raises(ValueError, match="slo mode needs"):
        AutoscalerConfig(mode="slo")
    cfg = AutoscalerConfig(mode="slo", pool_overrides={"chat.ttft_p90_target_s": "0.5"})
    assert cfg.slo_targets("chat").any and not cfg.slo_targets("other").any


def test_the_service_decides_each_pool_with_its_own_knobs() -> None:
    """Two pools with the same load: the one whose replicas saturate at 0.5 KV scales up, the
    one at the common 0.8 holds."""
    cfg = AutoscalerConfig(pools=["a", "b"], pool_overrides={"b.kv_threshold": "0.5",
                                                             "b.kv_spare_trigger": "0.1"},
                           lease=False, http_port=-1, warmup_s=0)
    svc = AutoscalerService(cfg)
    assert svc.pools["b"].saturation.kv_threshold == 0.5
    loads = [ReplicaLoad(0.55, 0, 2)]
    assert not analyze(svc.pools["a"].saturation, loads).scale_up
    assert analyze(svc.pools["b"].saturation, loads).scale_up
    for pool in ("a", "b"):
        svc.pods.update(PodState(pod=f"{pool}0", pool=pool, model="m", url="", ts=1.0,
                                 epoch="e", kv_seq=0, kv_usage=0.55, running=2))
    now = time.monotonic()
    da = svc.decide(svc.pools["a"], now)
    db = svc.decide(svc.pools["b"], now)
    assert da.target_replicas == 1 and db.target_replicas == 2, (da.reason, db.reason)
