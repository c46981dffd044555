"""Seeded random weights for the tiny model folder, so real vLLM can serve it.

``add_random_weights(folder)`` creates ``LlamaForCausalLM`` from the folder's
``config.json`` with a fixed torch seed and writes its ``bfloat16`` state dict to
``model.safetensors`` in the same folder. Only that file and a stamp are
written: ``config.json`` and the tokenizer files stay exactly as
:func:`~infermesh.libs.tinymodel.build.build_model_folder` wrote them (the sim,
the tokenizer service and the pinned test hashes read them too).

torch, transformers and safetensors live in ``.venv-vllm`` only (``make
vllm-env``), so they are imported inside the function; the rest of the package
keeps working in the project's own venv.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

#: Bump whenever the generated weights may change for the same seed and config.
WEIGHTS_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_STAMP_FILE = ".infermesh-weights.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _expected_stamp(folder: Path, seed: int) -> dict[str, Any]:
    return {
        "generator": "infermesh.libs.tinymodel.weights",
        "weights_version": WEIGHTS_VERSION,
        "seed": seed,
        "config_sha256": _sha256(folder / "config.json"),
    }


def has_weights(folder: Path, *, seed: int = 0) -> bool:
    """True when ``folder`` holds weights made with ``seed`` for its current config.json."""
    folder = Path(folder)
    try:
        stamp = json.loads((folder / WEIGHTS_STAMP_FILE).read_text(encoding="utf-8"))
        expected = _expected_stamp(folder, seed)
    except (OSError, ValueError):
        return False
    if not isinstance(stamp, dict):
        return False
    if any(stamp.get(key) != value for key, value in expected.items()):
        return False
    weights = folder / WEIGHTS_FILE
    return weights.is_file() and stamp.get("weights_sha256") == _sha256(weights)


def add_random_weights(folder: Path, seed: int = 0) -> Path:
    """Write seeded random ``model.safetensors`` into ``folder``; return its path.

    Idempotent: a stamp (``.infermesh-weights.json``) records the seed, the
    config.json hash and the weights hash; when they match nothing is done.
    The same seed, config and torch version give byte-identical weights.
    """
    folder = Path(folder)
    weights = folder / WEIGHTS_FILE
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder / 'config.json'} is missing: build the folder first")
    if has_weights(folder, seed=seed):
        return weights
    try:
        import torch
        from safetensors.torch import save_file
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:  # pragma: no cover - depends on the venv
        raise RuntimeError(
            "random weights need torch, transformers and safetensors: run with "
            ".venv-vllm/bin/python (make vllm-env)"
        ) from exc

    config = LlamaConfig.from_pretrained(str(folder))
    dtype = getattr(torch, str(config.to_dict().get("dtype") or "bfloat16"))
    # Initialise in float32 on CPU with a private seed, then cast: the init
    # (normal(0, initializer_range), RMSNorm weights at 1) is the same on every run.
    fork_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        with torch.device("cpu"):
            model = LlamaForCausalLM(config).to(torch.float32)
        model.eval()
    finally:
        torch.random.set_rng_state(fork_state)
    tensors = {
        name: tensor.detach().to(dtype).contiguous()
        for name, tensor in model.state_dict().items()
    }

    stamp_path = folder / WEIGHTS_STAMP_FILE
    stamp_path.unlink(missing_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".weights-", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the folder's other files are 0644
        os.replace(tmp, weights)
    finally:
        tmp.unlink(missing_ok=True)

    stamp = {
        **_expected_stamp(folder, seed),
        "weights_sha256": _sha256(weights),
        "parameters": sum(t.numel() for t in tensors.values()),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
    }
    tmp_stamp = folder / f".{WEIGHTS_STAMP_FILE}.tmp-{os.getpid()}"
    tmp_stamp.write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_stamp, stamp_path)
    return weights
