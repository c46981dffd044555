"""The KV block index and the stream tracking that keeps it in line with every pod's KV events:
shared by the indexer service and the schedulers' local index."""

from .follower import IndexFollower
from .index import IndexStats, KVIndex
from .streams import PodStream, StreamTracker

__all__ = ["IndexFollower", "IndexStats", "KVIndex", "PodStream", "StreamTracker"]
