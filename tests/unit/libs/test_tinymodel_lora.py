"""The tiny model's LoRA adapters: PEFT's layout, vLLM's target modules, shapes that fit the
model, the same bytes for the same name, different weights for different names, idempotent
builds outside the repo."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from infermesh.libs.tinymodel.lora import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    LORA_ROOT_ENV,
    TARGET_MODULES,
    build_adapter,
    default_lora_root,
    ensure_adapters,
    render_adapter,
)

ROOT = Path(__file__).resolve().parents[3]


def read_safetensors(data: bytes) -> dict[str, tuple[list[int], tuple[float, ...]]]:
    """name → (shape, values) of a float32 safetensors file, parsed by the format's spec."""
    (n,) = struct.unpack("<Q", data[:8])
    header: dict[str, Any] = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    body = data[8 + n :]
    out = {}
    for name, meta in header.items():
        assert meta["dtype"] == "F32"
        start, end = meta["data_offsets"]
        out[name] = (meta["shape"], struct.unpack(f"<{(end - start) // 4}f", body[start:end]))
    return out


def test_adapter_is_peft_lora_for_every_linear_layer(model_dir: Path) -> None:
    files = render_adapter("a", model_dir)
    cfg = json.loads(files[ADAPTER_CONFIG_FILE])
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert cfg["base_model_name_or_path"] == str(model_dir)  # vLLM's resolver compares it
    assert set(cfg["target_modules"]) == set(TARGET_MODULES)
    model = json.loads((model_dir / "config.json").read_text())
    tensors = read_safetensors(files[ADAPTER_WEIGHTS_FILE])
    assert len(tensors) == 2 * len(TARGET_MODULES) * model["num_hidden_layers"]
    hidden, kv = model["hidden_size"], model["num_key_value_heads"] * model["head_dim"]
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert tensors[f"{q}.lora_A.weight"][0] == [8, hidden]
    assert tensors[f"{q}.lora_B.weight"][0] == [hidden, 8]
    v = "base_model.model.model.layers.1.self_attn.v_proj"
    assert tensors[f"{v}.lora_B.weight"][0] == [kv, 8]
    down = "base_model.model.model.layers.1.mlp.down_proj"
    assert tensors[f"{down}.lora_A.weight"][0] == [8, model["intermediate_size"]]
    # B is not PEFT's zero init: the adapter changes the output
    assert any(x != 0.0 for x in tensors[f"{q}.lora_B.weight"][1])


def test_same_name_same_bytes_other_name_other_weights(model_dir: Path) -> None:
    a1, a2, b = (render_adapter(n, model_dir) for n in ("a", "a", "b"))
    assert a1 == a2
    assert a1[ADAPTER_WEIGHTS_FILE] != b[ADAPTER_WEIGHTS_FILE]
    assert a1[ADAPTER_CONFIG_FILE] == b[ADAPTER_CONFIG_FILE]


def test_build_is_idempotent_and_stays_out_of_the_repo(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LORA_ROOT_ENV, str(tmp_path / "root"))
    assert default_lora_root() == tmp_path / "root"
    paths = ensure_adapters(["a", "b"], model_dir=model_dir)
    assert paths == {"a": tmp_path / "root" / "a", "b": tmp_path / "root" / "b"}
    weights = paths["a"] / ADAPTER_WEIGHTS_FILE
    before = weights.stat().st_mtime_ns
    assert build_adapter(paths["a"], "a", model_dir) == paths["a"]
    assert weights.stat().st_mtime_ns == before  # the stamp matched: nothing rewritten
    assert weights.read_bytes() == render_adapter("a", model_dir)[ADAPTER_WEIGHTS_FILE]
    monkeypatch.delenv(LORA_ROOT_ENV)
    root = default_lora_root()
    assert root.parent == model_dir.parent or not root.is_relative_to(ROOT / "libs")
    assert ".cache" in root.parts or not root.is_relative_to(ROOT)


def test_bad_names_are_refused(model_dir: Path) -> None:
    for name in ("", "a/b", ".hidden"):
        with pytest.raises(ValueError):
            render_adapter(name, model_dir)
