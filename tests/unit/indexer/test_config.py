"""The indexer's config: defaults, environment and flags, and refused values."""

from __future__ import annotations

import pytest

from infermesh.libs.config import ConfigError, load_config
from infermesh.services.indexer.__main__ import main
from infermesh.services.indexer.config import IndexerConfig


def test_env_and_flags() -> None:
    args = main.parser().parse_args(["--pod-timeout-s", "2.5", "--http-port", "-1"])
    cfg = load_config(IndexerConfig, args, env_prefix="INFERMESH_INDEXER",
                      env={"INFERMESH_INDEXER_MAX_BLOCKS": "1000",
                           "INFERMESH_INDEXER_POD_TIMEOUT_S": "9"})
    assert (cfg.max_blocks, cfg.pod_timeout_s, cfg.http_port) == (1000, 2.5, -1)
    assert (IndexerConfig().pod_timeout_s, IndexerConfig().pod_late_s) == (10.0, 1.0)


@pytest.mark.parametrize("field,value", [("max_blocks", "0"), ("pod_timeout_s", "0"),
                                         ("snapshot_backoff_s", "9")])
def test_bad_values_are_refused(field: str, value: str) -> None:
    with pytest.raises(ConfigError):
        load_config(IndexerConfig, env_prefix="X", env={f"X_{field.upper()}": value})
