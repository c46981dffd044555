"""A deterministic tiny HF-style model folder generated from our own code.

``python -m infermesh.libs.tinymodel DEST`` builds it; services call
:func:`ensure_model_folder` to get the default one. ``--weights`` (or
:func:`add_random_weights`, run with ``.venv-vllm/bin/python``) adds seeded random
weights so real vLLM can serve the folder; ``--loras a,b`` (or :func:`ensure_adapters`)
builds deterministic PEFT LoRA adapters for it (no torch needed).
"""

from .build import (
    DEFAULT_MODEL_NAME,
    DEFAULT_SEED,
    DEFAULT_VOCAB_SIZE,
    GENERATOR_VERSION,
    MODEL_DIR_ENV,
    SPECIAL_TOKENS,
    STAMP_FILE,
    build_model_folder,
    default_model_dir,
    ensure_model_folder,
    is_built,
    render_files,
)
from .chat_template import CHAT_TEMPLATE
from .lora import build_adapter, default_lora_root, ensure_adapters
from .weights import WEIGHTS_FILE, WEIGHTS_STAMP_FILE, add_random_weights, has_weights

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_MODEL_NAME",
    "DEFAULT_SEED",
    "DEFAULT_VOCAB_SIZE",
    "GENERATOR_VERSION",
    "MODEL_DIR_ENV",
    "SPECIAL_TOKENS",
    "STAMP_FILE",
    "WEIGHTS_FILE",
    "WEIGHTS_STAMP_FILE",
    "add_random_weights",
    "build_adapter",
    "default_lora_root",
    "ensure_adapters",
    "build_model_folder",
    "default_model_dir",
    "ensure_model_folder",
    "has_weights",
    "is_built",
    "render_files",
]
