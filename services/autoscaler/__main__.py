"""`infermesh autoscaler`: run one autoscaler replica."""

from infermesh.libs.runtime import service_main

from .config import AutoscalerConfig
from .service import AutoscalerService

main = service_main("autoscaler", AutoscalerConfig, AutoscalerService,
                    "Run the autoscaler: heartbeats, request events and demand → desired "
                    "replicas per pool, published on im.scale.<pool>.")

if __name__ == "__main__":
    raise SystemExit(main())
