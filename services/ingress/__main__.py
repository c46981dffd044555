"""`infermesh ingress`: the OpenAI-compatible front door."""

from infermesh.libs.runtime import service_main

from .config import IngressConfig
from .service import IngressService

main = service_main("ingress", IngressConfig, IngressService,
                    "Serve the OpenAI API and route every request to the best engine.")

if __name__ == "__main__":
    raise SystemExit(main())
