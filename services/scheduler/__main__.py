"""`infermesh scheduler`: run one scheduler replica."""

from infermesh.libs.runtime import service_main

from .config import SchedulerConfig
from .service import SchedulerService

main = service_main("scheduler", SchedulerConfig, SchedulerService,
                    "Run a scheduler replica: im.schedule over a plugin pipeline.")

if __name__ == "__main__":
    raise SystemExit(main())
