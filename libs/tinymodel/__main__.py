"""``infermesh model [DEST] [--weights]``: build the tiny model folder.

``--weights`` also writes seeded random ``model.safetensors`` so real vLLM can
serve the folder; it needs torch and transformers, so run it with
``.venv-vllm/bin/python -m infermesh.libs.tinymodel`` (``make vllm-env``), the same
command under the name that venv has.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .build import DEFAULT_SEED, DEFAULT_VOCAB_SIZE, build_model_folder, default_model_dir, is_built


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build the folder and print its path."""
    parser = argparse.ArgumentParser(
        prog="infermesh model",
        description="Build the deterministic tiny Llama-style model folder.",
    )
    parser.add_argument("dest", nargs="?", type=Path, default=None,
                        help="target folder (default: $INFERMESH_MODEL_DIR, else .cache/tiny-model "
                             "in a source checkout, else "
                             "${XDG_CACHE_HOME:-~/.cache}/infermesh/tiny-model)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--weights", action="store_true",
                        help="also add seeded random bf16 weights (model.safetensors); needs "
                             "torch + transformers: run `.venv-vllm/bin/python -m "
                             "infermesh.libs.tinymodel --weights`")
    parser.add_argument("--loras", default="",
                        help="also build these LoRA adapters for the model (comma-separated "
                             "names; PEFT folders under --lora-root, one per name)")
    parser.add_argument("--lora-root", type=Path, default=None,
                        help="where adapters go (default: $INFERMESH_LORA_DIR, else tiny-loras "
                             "beside the default model folder)")
    args = parser.parse_args(argv)
    dest = args.dest if args.dest is not None else default_model_dir()
    fresh = not is_built(dest, vocab_size=args.vocab_size, seed=args.seed)
    start = time.perf_counter()
    path = build_model_folder(dest, vocab_size=args.vocab_size, seed=args.seed)
    took = time.perf_counter() - start
    state = f"built in {took:.2f}s" if fresh else "already up to date"
    print(f"{path} ({state})", file=sys.stderr)
    if args.weights:
        from .weights import add_random_weights, has_weights

        fresh = not has_weights(path, seed=args.seed)
        start = time.perf_counter()
        try:
            weights = add_random_weights(path, seed=args.seed)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        took = time.perf_counter() - start
        state = f"written in {took:.2f}s" if fresh else "already up to date"
        print(f"{weights} ({state})", file=sys.stderr)
    names = [n for n in args.loras.split(",") if n]
    if names:
        from .lora import ensure_adapters

        for name, folder in ensure_adapters(names, root=args.lora_root, model_dir=path).items():
            print(f"{folder} (adapter {name})", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
