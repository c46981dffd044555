"""`infermesh sim`: run N simulated vLLM engines in one process."""

from infermesh.libs.runtime import service_main

from .config import SimConfig
from .service import SimService

main = service_main("sim", SimConfig, SimService,
                    "Run simulated vLLM engines: OpenAI API, /metrics with vLLM's names, "
                    "KV events on ZMQ.")

if __name__ == "__main__":
    raise SystemExit(main())
