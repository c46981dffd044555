"""`infermesh console`: serve the live fleet console."""

from infermesh.libs.runtime import service_main

from .config import ConsoleConfig
from .service import ConsoleService

main = service_main("console", ConsoleConfig, ConsoleService,
                    "Serve the fleet console: a live web page (/console) of the pods, routing "
                    "decisions, prefix-cache hit rate and autoscaler state, read from the bus.")

if __name__ == "__main__":
    raise SystemExit(main())
