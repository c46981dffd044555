"""Tests for the deterministic tiny model folder (infermesh.libs.tinymodel)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infermesh.libs import tinymodel
from infermesh.libs.tinymodel import (
    CHAT_TEMPLATE,
    DEFAULT_MODEL_NAME,
    SPECIAL_TOKENS,
    STAMP_FILE,
    build_model_folder,
    default_model_dir,
    ensure_model_folder,
    is_built,
)
from infermesh.libs.tinymodel.build import MODEL_FILES

VECTORS = Path(__file__).with_name("tokenizer_vectors.json")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    dest = tmp_path_factory.mktemp("tiny") / "model"
    start = time.perf_counter()
    build_model_folder(dest)
    return dest, time.perf_counter() - start


@pytest.fixture(scope="module")
def folder(built: tuple[Path, float]) -> Path:
    return built[0]


def test_build_is_fast(built: tuple[Path, float]) -> None:
    assert built[1] < 15.0


def test_folder_has_all_files(folder: Path) -> None:
    names = set(_snapshot(folder))
    assert names == {*MODEL_FILES, STAMP_FILE}


def test_two_builds_are_byte_identical(folder: Path, tmp_path: Path) -> None:
    other = build_model_folder(tmp_path / "again")
    assert _snapshot(other) == _snapshot(folder)


def test_build_in_fresh_process_is_byte_identical(folder: Path, tmp_path: Path) -> None:
    """A separate interpreter with another hash seed produces the same bytes."""
    dest = tmp_path / "cli"
    env = {"PYTHONHASHSEED": "12345", "RAYON_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "infermesh.libs.tinymodel", str(dest)],
        capture_output=True, text=True, env=env, check=True, timeout=120,
    )
    assert result.stdout.strip() == str(dest)
    assert _snapshot(dest) == _snapshot(folder)


def test_matches_pinned_hashes(folder: Path) -> None:
    """The files equal those the committed tokenizer vectors were generated from."""
    pinned = json.loads(VECTORS.read_text(encoding="utf-8"))["files_sha256"]
    for name, digest in pinned.items():
        actual = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert actual == digest, (
            f"{name} changed: bump GENERATOR_VERSION and regenerate the vectors with "
            "tests/unit/libs/gen_tokenizer_vectors.py"
        )


def test_stamp_records_parameters_and_hashes(folder: Path) -> None:
    stamp = json.loads((folder / STAMP_FILE).read_text(encoding="utf-8"))
    assert stamp["generator_version"] == tinymodel.GENERATOR_VERSION
    assert stamp["vocab_size"] == 4096 and stamp["seed"] == 0
    assert stamp["model_name"] == DEFAULT_MODEL_NAME
    for name in MODEL_FILES:
        assert stamp["files"][name] == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    assert is_built(folder)
    assert not is_built(folder, seed=1)
    assert not is_built(folder, vocab_size=2048)


def test_rebuild_is_a_noop(folder: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    start = time.perf_counter()
    assert build_model_folder(folder) == folder
    assert time.perf_counter() - start < 0.5
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_rebuilds_when_incomplete_or_stale(folder: Path, tmp_path: Path) -> None:
    dest = tmp_path / "m"
    build_model_folder(dest)
    (dest / "tokenizer.json").unlink()
    (dest / "weights.bin").write_bytes(b"kept")
    assert not is_built(dest)
    build_model_folder(dest)
    assert (dest / "weights.bin").read_bytes() == b"kept"
    assert (dest / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()

    stamp = json.loads((dest / STAMP_FILE).read_text(encoding="utf-8"))
    stamp["generator_version"] = -1
    (dest / STAMP_FILE).write_text(json.dumps(stamp), encoding="utf-8")
    assert not is_built(dest)
    build_model_folder(dest)
    assert _snapshot(dest) == {**_snapshot(folder), "weights.bin": b"kept"}
    assert not list(tmp_path.glob(".tinymodel-*")), "temporary build folder left behind"


def test_other_seed_gives_other_tokenizer(folder: Path, tmp_path: Path) -> None:
    other = build_model_folder(tmp_path / "seed1", seed=1)
    assert (other / "tokenizer.json").read_bytes() != (folder / "tokenizer.json").read_bytes()
    assert is_built(other, seed=1)


def test_vocab_too_small_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        build_model_folder(tmp_path / "small", vocab_size=200)


def test_model_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tokenizer = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    n_tokens = len(tokenizer["model"]["vocab"]) + len(tokenizer["added_tokens"])
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["hidden_size"] == 128
    assert config["num_hidden_layers"] == 2
    assert config["num_attention_heads"] == 4
    assert config["num_key_value_heads"] == 2
    assert config["intermediate_size"] == 256
    assert config["head_dim"] == 128 // 4
    assert config["max_position_embeddings"] == 4096
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert config["vocab_size"] == n_tokens == 4096


def test_tokenizer_files(folder: Path) -> None:
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    gen_cfg = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    special = json.loads((folder / "special_tokens_map.json").read_text(encoding="utf-8"))

    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok_cfg["chat_template"] == CHAT_TEMPLATE
    assert tok_cfg["bos_token"] == special["bos_token"] == "<|begin_of_text|>"
    assert tok_cfg["eos_token"] == special["eos_token"] == "<|eot_id|>"
    assert tok_cfg["model_max_length"] == 4096
    assert tok_cfg["clean_up_tokenization_spaces"] is False

    # Special tokens come after the BPE vocabulary, Llama-3 style, in order.
    added = [(t["id"], t["content"]) for t in tokenizer["added_tokens"]]
    base = len(tokenizer["model"]["vocab"])
    assert added == [(base + i, tok) for i, tok in enumerate(SPECIAL_TOKENS)]
    assert all(t["special"] for t in tokenizer["added_tokens"])
    ids = dict((content, i) for i, content in added)
    assert {str(i) for i, _ in added} == set(tok_cfg["added_tokens_decoder"])
    assert gen_cfg["bos_token_id"] == ids["<|begin_of_text|>"]
    assert gen_cfg["eos_token_id"] == [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]
    assert tokenizer["model"]["type"] == "BPE"
    assert tokenizer["decoder"]["type"] == "ByteLevel"


def test_default_model_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("INFERMESH_MODEL_DIR", str(tmp_path / "env-model"))
    assert default_model_dir() == tmp_path / "env-model"
    monkeypatch.delenv("INFERMESH_MODEL_DIR")
    repo = Path(__file__).resolve().parents[3]
    assert default_model_dir() == repo / ".cache" / "tiny-model"


def test_ensure_model_folder(monkeypatch: pytest.MonkeyPatch, folder: Path, tmp_path: Path) -> None:
    monkeypatch.setenv("INFERMESH_MODEL_DIR", str(tmp_path / "ensured"))
    path = ensure_model_folder()
    assert path == tmp_path / "ensured"
    assert _snapshot(path) == _snapshot(folder)
    assert ensure_model_folder(tmp_path / "explicit") == tmp_path / "explicit"
