"""`infermesh indexer`: run one indexer replica."""

from infermesh.libs.runtime import service_main

from .config import IndexerConfig
from .service import IndexerService

main = service_main("indexer", IndexerConfig, IndexerService,
                    "Run the KV-cache indexer: every pod's KV events → block index → lookups.")

if __name__ == "__main__":
    raise SystemExit(main())
