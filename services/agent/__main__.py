"""`infermesh agent`: run one agent for one engine (arguments after ``--`` go to `vllm serve`
when it launches one)."""

from infermesh.libs.runtime import service_main

from .config import AgentConfig
from .service import AgentService

main = service_main("agent", AgentConfig, AgentService,
                    "Run the vLLM worker agent: engine KV events and load → the bus.",
                    passthrough="vllm_args")

if __name__ == "__main__":
    raise SystemExit(main())
