"""The NIXL protocol pieces: reading a decode's kv_transfer_params as vLLM's connector reads
them (missing keys: computed locally; unusable values: a failed read), and the prefill's
answer, key for key."""

from __future__ import annotations

from typing import Any

import pytest

from infermesh.services.sim.nixl import (
    IncompleteKVParams,
    RemotePrefill,
    producer_params,
    remote_prefill,
    wants_remote_decode,
)


def answer(**kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"engine_id": "e-1", "request_id": "cmpl-1", "host": "10.0.0.7",
                            "port": 8000, "block_ids": [4, 5, 6], "num_tokens": 40,
                            "cached_tokens": 16}
    return producer_params(**{**args, **kw})


def test_the_prefill_answer_is_vllms_dict_in_vllms_order() -> None:
    assert answer() == {
        "do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [[4, 5, 6]],
        "remote_engine_id": "e-1", "remote_request_id": "cmpl-1", "remote_host": "10.0.0.7",
        "remote_port": 8000, "tp_size": 1, "dcp_size": 1, "pp_size": 1,
        "remote_num_tokens": 40, "remote_blocks_expiry_time": None, "transfer_mode": "pull",
        "remote_prefill_cached_tokens": 16,
    }
    assert list(answer())[:4] == ["do_remote_prefill", "do_remote_decode", "remote_block_ids",
                                  "remote_engine_id"]


def test_the_answer_passed_verbatim_names_the_remote_prefill() -> None:
    assert remote_prefill(answer()) == RemotePrefill("e-1", "cmpl-1", "10.0.0.7", 8000,
                                                     (4, 5, 6), 16)


@pytest.mark.parametrize("params", [
    None, {}, {"do_remote_prefill": False, "remote_block_ids": [[1]]},
    {"do_remote_decode": True, "do_remote_prefill": False},
])
def test_no_remote_prefill_named(params: dict[str, Any] | None) -> None:
    assert remote_prefill(params) is None


def test_only_a_truthy_do_remote_decode_asks_to_hold_blocks() -> None:
    assert wants_remote_decode({"do_remote_decode": True, "remote_engine_id": None})
    assert wants_remote_decode({"do_remote_decode": 1})
    assert not wants_remote_decode({"do_remote_decode": False})
    assert not wants_remote_decode(None)
    assert not wants_remote_decode({})


@pytest.mark.parametrize("change", [
    {"remote_block_ids": []}, {"remote_block_ids": None}, {"remote_engine_id": ...},
    {"remote_request_id": ...}, {"remote_host": ...}, {"remote_port": ...},
])
def test_missing_keys_mean_computing_locally(change: dict[str, Any]) -> None:
    params = answer()
    for k, v in change.items():
        if v is ...:
            del params[k]
        else:
            params[k] = v
    with pytest.raises(IncompleteKVParams):
        remote_prefill(params)


@pytest.mark.parametrize("change", [
    {"remote_port": "8000"}, {"remote_port": True}, {"remote_port": 0}, {"remote_port": 70000},
    {"remote_host": ""}, {"remote_host": 7}, {"remote_engine_id": None},
    {"remote_request_id": 12}, {"remote_block_ids": "1,2"}, {"remote_block_ids": [1, 2]},
    {"remote_block_ids": [[1], [2]]}, {"remote_block_ids": [[1, -2]]},
    {"remote_block_ids": [[1.5]]},
])
def test_unusable_values_make_a_read_that_fails(change: dict[str, Any]) -> None:
    remote = remote_prefill({**answer(), **change})
    assert remote is not None and remote.problem


@pytest.mark.parametrize("cached", [None, -1, "16", 2.0, True])
def test_a_bad_cached_token_count_is_ignored(cached: Any) -> None:
    remote = remote_prefill({**answer(), "remote_prefill_cached_tokens": cached})
    assert remote is not None and remote.problem is None and remote.cached_tokens is None
