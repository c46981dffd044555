"""Deterministic PEFT LoRA adapters for the tiny model, written by our own code.

``build_adapter(folder, name, model_dir)`` writes ``adapter_config.json`` and
``adapter_model.safetensors`` (PEFT's layout, what ``vllm serve --lora-modules NAME=PATH``,
``/v1/load_lora_adapter`` and vLLM's filesystem resolver load). The weights come from a
pseudo-random stream seeded by the adapter's name, so every name gets its own weights (its own
outputs) and the same name the same bytes on every machine. No torch: the safetensors file is
written by hand (an 8-byte header length, a JSON header, raw little-endian float32), so the
project's own venv builds adapters and the simulator, ``infermesh up`` and the tests need nothing
else.

Adapters live in one folder per name under a LoRA root (:func:`default_lora_root`), the layout
vLLM's filesystem resolver reads (``VLLM_LORA_RESOLVER_CACHE_DIR/<name>``). Never in the repo.
"""

from __future__ import annotations

import json
import os
import random
import struct
import tempfile
from pathlib import Path
from typing import Any

from .build import default_model_dir

#: Bump whenever the generated adapter may change for the same name, model and rank.
ADAPTER_VERSION = 1
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_STAMP_FILE = ".infermesh-lora.json"
LORA_ROOT_ENV = "INFERMESH_LORA_DIR"
DEFAULT_RANK = 8
#: Every linear layer of a Llama decoder layer: all of them are LoRA targets vLLM supports, and
#: touching the MLP as well as attention makes each adapter's greedy output differ from the
#: base model's on the tiny random model.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Uniform(-u, u) entries for A and B: with rank 8 and scaling alpha / r = 2 the update's entries
# have a std of ≈ 0.05, larger than the base weights' 0.02, so outputs change visibly.
_UNIFORM = 0.16


def default_lora_root() -> Path:
    """Where generated adapters live: ``$INFERMESH_LORA_DIR``, else ``tiny-loras`` beside the
    default tiny model folder (``<repo>/.cache/tiny-loras`` in a source checkout)."""
    env = os.environ.get(LORA_ROOT_ENV)
    if env:
        return Path(env)
    return default_model_dir().parent / "tiny-loras"


def _module_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each target module, from the model's config.json."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = int(config["intermediate_size"])
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def _safetensors(tensors: dict[str, tuple[tuple[int, ...], list[float]]]) -> bytes:
    """The safetensors encoding of float32 tensors (name → (shape, row-major values))."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        shape, values = tensors[name]
        blob = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": list(shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # the format aligns the data to 8 bytes
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def render_adapter(
    name: str, model_dir: Path, *, rank: int = DEFAULT_RANK, base_model: str | None = None
) -> dict[str, bytes]:
    """The adapter's files (file name → bytes) for the model in ``model_dir``.

    ``base_model`` is what ``adapter_config.json`` names as its base (default: ``model_dir`` as
    given): vLLM's filesystem resolver loads an adapter only when it equals the served model's
    path (``vllm serve PATH``).
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad adapter name {name!r}")
    if rank < 1:
        raise ValueError("rank must be positive")
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    shapes = _module_shapes(config)
    rng = random.Random(f"infermesh-lora:{ADAPTER_VERSION}:{name}:{rank}")
    tensors: dict[str, tuple[tuple[int, ...], list[float]]] = {}
    for layer in range(int(config["num_hidden_layers"])):
        for module in TARGET_MODULES:
            fan_in, fan_out = shapes[module]
            part = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) \
                else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{module}"
            # PEFT's layout: lora_A is (r, in), lora_B is (out, r). PEFT starts B at zero; a
            # trained adapter does not, and ours must change the output.
            tensors[f"{prefix}.lora_A.weight"] = (
                (rank, fan_in), [rng.uniform(-_UNIFORM, _UNIFORM) for _ in range(rank * fan_in)])
            tensors[f"{prefix}.lora_B.weight"] = (
                (fan_out, rank), [rng.uniform(-_UNIFORM, _UNIFORM) for _ in range(fan_out * rank)])
    adapter_config = {
        "base_model_name_or_path": base_model if base_model is not None else str(model_dir),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "target_modules": list(TARGET_MODULES),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }
    return {
        ADAPTER_CONFIG_FILE: (json.dumps(adapter_config, indent=2, sort_keys=True) + "\n").encode(),
        ADAPTER_WEIGHTS_FILE: _safetensors(tensors),
    }


def _stamp(name: str, model_dir: Path, rank: int, base_model: str) -> dict[str, Any]:
    import hashlib

    cfg = (Path(model_dir) / "config.json").read_bytes()
    return {"generator": "infermesh.libs.tinymodel.lora", "adapter_version": ADAPTER_VERSION,
            "name": name, "rank": rank, "base_model": base_model,
            "config_sha256": hashlib.sha256(cfg).hexdigest()}


def build_adapter(
    dest: Path, name: str, model_dir: Path, *, rank: int = DEFAULT_RANK,
    base_model: str | None = None,
) -> Path:
    """Write adapter ``name`` for the model in ``model_dir`` into folder ``dest``; return it.

    Idempotent: a stamp records what was generated; a matching one means nothing is written.
    Files are written to temporary names and renamed, so a reader never sees half a file.
    """
    dest = Path(dest)
    base = base_model if base_model is not None else str(model_dir)
    stamp = _stamp(name, model_dir, rank, base)
    stamp_path = dest / ADAPTER_STAMP_FILE
    try:
        if json.loads(stamp_path.read_text(encoding="utf-8")) == stamp and all(
                (dest / f).is_file() for f in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)):
            return dest
    except (OSError, ValueError):
        pass
    dest.mkdir(parents=True, exist_ok=True)
    stamp_path.unlink(missing_ok=True)
    files = render_adapter(name, model_dir, rank=rank, base_model=base)
    files[ADAPTER_STAMP_FILE] = (json.dumps(stamp, indent=2, sort_keys=True) + "\n").encode()
    for fname, data in files.items():  # the stamp last: it vouches for the others
        fd, tmp = tempfile.mkstemp(prefix=f".{fname}-", suffix=".tmp", dir=dest)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest / fname)
    return dest


def ensure_adapters(
    names: list[str], *, root: Path | None = None, model_dir: Path | None = None,
    rank: int = DEFAULT_RANK,
) -> dict[str, Path]:
    """Build (when missing) adapter folders ``root/<name>`` for the tiny model; name → folder.

    ``model_dir`` defaults to the tiny model (built when missing); ``root`` to
    :func:`default_lora_root`.
    """
    from .build import ensure_model_folder

    model = ensure_model_folder(model_dir)
    base = Path(root) if root is not None else default_lora_root()
    return {n: build_adapter(base / n, n, model, rank=rank) for n in names}
